//! Why the relay stops ([`RelayError`]), why a sync fails and is retried
//! ([`SyncError`]), and what goes wrong on the bus ([`BusError`]).
//!
//! Decisions are taken on variants: [`RelayError::is_configuration`] tells a relay that
//! can never work (exit 2) from one that failed while running, and the mirror's own
//! [`MirrorError::is_transient`] tells a master worth waiting for from one that is not.
//! Every failure on the bus is worth retrying: none is caused by the content.

use std::net::SocketAddr;
use std::path::PathBuf;

use async_nats::jetstream::{consumer, context, kv, object_store, stream};

use crate::mirror::{Mirror, MirrorError};
use crate::resolve::ResolveError;

/// Why the relay stopped.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// Another relay holds the state directory's lock.
    #[error("{}: another relay is using this state directory", path.display())]
    StateDirInUse {
        /// The lock file.
        path: PathBuf,
    },
    /// The state directory or its lock file cannot be used.
    #[error("{}", path.display())]
    StateDir {
        /// The lock file.
        path: PathBuf,
        /// What the file system said.
        #[source]
        source: std::io::Error,
    },
    /// The mirror could not be opened.
    #[error(transparent)]
    Mirror(#[from] MirrorError),
    /// A NATS credential or certificate cannot be used.
    #[error(transparent)]
    Auth(confcast_schemas::connect::AuthError),
    /// The signing key cannot be used.
    #[error(transparent)]
    Signing(confcast_schemas::sign::SignatureError),
    /// The `--listen` address cannot be bound.
    #[error("cannot listen on {addr}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

impl RelayError {
    /// Whether the relay's configuration or environment is at fault (a master that can
    /// never be fetched, a state directory in use, a key that cannot be read, an
    /// address taken): found at start, fixed by the operator, never by waiting.
    pub fn is_configuration(&self) -> bool {
        match self {
            RelayError::Mirror(e) => !e.is_transient(),
            RelayError::StateDirInUse { .. }
            | RelayError::StateDir { .. }
            | RelayError::Auth(_)
            | RelayError::Signing(_)
            | RelayError::Listen { .. } => true,
        }
    }
}

/// A failure while handling events (or catching up at start): retried with backoff,
/// the events never acked.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SyncError {
    /// The master or the mirror failed.
    #[error(transparent)]
    Mirror(#[from] MirrorError),
    /// The bus failed.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// The resolution could not read the mirror.
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    /// A worker reading the mirror did not finish.
    #[error("worker panicked")]
    Worker(#[from] tokio::task::JoinError),
}

impl SyncError {
    /// The URL of what failed, for the log line: the master's or the bus's.
    pub(crate) fn url(&self, nats_shown: &str, mirror: &Mirror) -> String {
        match self {
            SyncError::Mirror(MirrorError::Fetch { .. } | MirrorError::Timeout { .. }) => mirror.shown_url().to_owned(),
            SyncError::Bus(_) => nats_shown.to_owned(),
            SyncError::Mirror(_) | SyncError::Resolve(_) | SyncError::Worker(_) => String::new(),
        }
    }
}

/// A failure on the bus, naming what the relay was doing. All are retried.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// A stream could not be found or created.
    #[error("{what}")]
    Stream {
        /// Which stream (`update stream`, ...).
        what: &'static str,
        /// What JetStream said.
        #[source]
        source: context::CreateStreamError,
    },
    /// The commit stream could not be found.
    #[error("commit stream")]
    CommitStream(#[source] context::GetStreamError),
    /// The relays' durable consumer could not be found or created.
    #[error("relay consumer")]
    Consumer(#[source] stream::ConsumerError),
    /// The blob store could not be found or created.
    #[error("blob store")]
    BlobStore(#[source] context::CreateObjectStoreError),
    /// A K/V bucket could not be found or created.
    #[error("{what}")]
    Bucket {
        /// Which bucket (`index bucket`, ...).
        what: &'static str,
        /// What JetStream said.
        #[source]
        source: context::CreateKeyValueError,
    },
    /// The state stream could not be found.
    #[error("reading state")]
    StateStream(#[source] context::GetStreamError),
    /// The reader of the state stream could not be created.
    #[error("reading state")]
    StateReader(#[source] stream::ConsumerError),
    /// The reader of the state stream could not be started.
    #[error("reading state")]
    StateMessages(#[source] consumer::StreamError),
    /// A message of the state stream could not be read.
    #[error("reading state")]
    StateMessage(#[source] consumer::pull::OrderedError),
    /// The state stream stopped delivering before every message was read.
    #[error("reading state: state stream stopped delivering")]
    StateStalled,
    /// An object could not be read from the blob store.
    #[error("reading object {name}")]
    ReadObject {
        /// The object's name.
        name: String,
        /// What the object store said.
        #[source]
        source: object_store::GetError,
    },
    /// An object's content could not be read from the blob store.
    #[error("reading object {name}")]
    ReadObjectContent {
        /// The object's name.
        name: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A blob or an oversized message could not be stored.
    #[error("storing {name}")]
    StoreObject {
        /// The object's name.
        name: String,
        /// What the object store said.
        #[source]
        source: object_store::PutError,
    },
    /// A message was not acknowledged by JetStream.
    #[error("publish on {subject}")]
    Publish {
        /// Its subject.
        subject: String,
        /// What JetStream said.
        #[source]
        source: context::PublishError,
    },
    /// A subject's last sequence could not be read (to sign what follows it).
    #[error("reading the last sequence of {subject}")]
    LastSequence {
        /// The subject.
        subject: String,
        /// What JetStream said.
        #[source]
        source: stream::LastRawMessageError,
    },
    /// The subjects of the state stream could not be listed.
    #[error("listing the state stream's objects")]
    StateInfo(#[source] stream::InfoError),
    /// The listing of the state stream's subjects broke off.
    #[error("listing the state stream's objects")]
    StateSubjects(#[source] stream::InfoError),
    /// Messages could not be removed from the state stream.
    #[error("purging {subject}")]
    Purge {
        /// The subject (or wildcard) purged.
        subject: String,
        /// What JetStream said.
        #[source]
        source: stream::PurgeError,
    },
    /// An index key could not be written.
    #[error("index put {key}")]
    IndexPut {
        /// The key.
        key: String,
        /// What the K/V store said.
        #[source]
        source: kv::PutError,
    },
    /// An index key could not be removed.
    #[error("index delete {key}")]
    IndexDelete {
        /// The key.
        key: String,
        /// What the K/V store said.
        #[source]
        source: kv::DeleteError,
    },
}
