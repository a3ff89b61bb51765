//! What a subscriber reads from the bus besides its update stream: snapshots, heads,
//! the inventory, contents kept in the object store, and spilled messages.

use std::collections::HashSet;
use std::sync::Arc;

use async_nats::jetstream::{self, object_store, stream::LastRawMessageErrorKind};
use confcast_schemas::message::DecodeError;
use confcast_schemas::rollout::RolloutState;
use confcast_schemas::sign::{SignatureError, Verifier, EXPECTED_SEQUENCE_HEADER, SIGNATURE_HEADER};
use confcast_schemas::{decode, streams, subject, Inventory, ServiceHead, ServiceId, ServiceUpdate};
use futures::StreamExt;
use tokio::io::AsyncReadExt;
use tokio::sync::OnceCell;

use crate::materialize::Objects;
use crate::tree_objects::{self, ObjectsError, TreeObjects};

/// How long reading a service's objects may wait for the next one.
const OBJECTS_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A failure reading from the bus: the bus's fault (transient, tried again later) or
/// the message's ([`ReadError::Forged`], never applied however often it is read).
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The message is not signed by a trusted key.
    #[error("refused: {subject}: {source}")]
    Forged {
        /// Where it was published.
        subject: String,
        /// What is wrong with its signature.
        #[source]
        source: SignatureError,
    },
    /// The datacenter's state stream cannot be opened.
    #[error("state stream: {0}")]
    StateStream(#[source] jetstream::context::GetStreamError),
    /// The last message on a subject of the state stream cannot be read.
    #[error("state stream: {0}")]
    LastMessage(#[source] jetstream::stream::LastRawMessageError),
    /// The datacenter's object store cannot be opened.
    #[error("blob store: {0}")]
    BlobStore(#[source] jetstream::context::ObjectStoreError),
    /// A content kept in the object store cannot be read.
    #[error("reading object {name}: {source}")]
    Object {
        /// The object.
        name: String,
        /// Why.
        #[source]
        source: ObjectError,
    },
    /// A service's objects cannot be read from the state stream.
    #[error("reading the objects of {service}: {reason}")]
    Objects {
        /// The service.
        service: String,
        /// What failed.
        reason: String,
    },
    /// A snapshot's objects do not make its tree.
    #[error("{service}: {source}")]
    Snapshot {
        /// The service.
        service: String,
        /// What is wrong.
        #[source]
        source: ObjectsError,
    },
    /// A message is not what its subject says it holds.
    #[error("{what}: {source}")]
    Decode {
        /// What it should be (`snapshot`, `head`, `inventory`).
        what: &'static str,
        /// Why it is not.
        #[source]
        source: DecodeError,
    },
}

/// Why an object of the store cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    /// The store does not give it.
    #[error(transparent)]
    Get(#[from] object_store::GetError),
    /// Its content breaks off.
    #[error(transparent)]
    Read(#[from] std::io::Error),
}

impl ReadError {
    /// The message is not signed by a trusted key: never applied, however often it is read.
    pub fn is_forged(&self) -> bool {
        matches!(self, ReadError::Forged { .. })
    }
}

/// `bytes` decoded as a rollout state, as the watch of the rollout subjects reads them.
pub fn decode_rollout(bytes: &[u8]) -> Result<RolloutState, ReadError> {
    decoded("rollout state", bytes)
}

/// Read access for one datacenter.
pub struct Reader {
    js: jetstream::Context,
    dc: String,
    blobs: OnceCell<object_store::ObjectStore>,
    verifier: Arc<Verifier>,
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader").field("dc", &self.dc).finish_non_exhaustive()
    }
}

impl Reader {
    /// A reader of datacenter `dc`.
    pub fn new(js: jetstream::Context, dc: &str) -> Reader {
        Reader { js, dc: dc.to_owned(), blobs: OnceCell::new(), verifier: Arc::default() }
    }

    /// Accept only messages signed by one of the verifier's keys (when it has any).
    pub fn with_verifier(mut self, verifier: Arc<Verifier>) -> Reader {
        self.verifier = verifier;
        self
    }

    /// The JetStream context.
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    async fn blobs(&self) -> Result<&object_store::ObjectStore, ReadError> {
        self.blobs
            .get_or_try_init(|| async {
                self.js.get_object_store(subject::blobs_bucket(&self.dc)).await.map_err(ReadError::BlobStore)
            })
            .await
    }

    async fn object(&self, name: &str) -> Result<Vec<u8>, ReadError> {
        let failed = |source: ObjectError| ReadError::Object { name: name.to_owned(), source };
        let mut object = self.blobs().await?.get(name).await.map_err(|e| failed(e.into()))?;
        let mut bytes = Vec::new();
        object.read_to_end(&mut bytes).await.map_err(|e| failed(e.into()))?;
        Ok(bytes)
    }

    /// The real payload of a message published on `subject`, following a spill header
    /// to the object store, and checked against the trusted keys.
    pub async fn payload(
        &self,
        subject: &str,
        headers: Option<&async_nats::HeaderMap>,
        payload: &[u8],
    ) -> Result<Vec<u8>, ReadError> {
        let payload = match headers.and_then(|h| h.get(subject::SPILLED_HEADER)) {
            Some(name) => self.object(name.as_str()).await?,
            None => payload.to_vec(),
        };
        let header = |name: &str| headers.and_then(|h| h.get(name)).map(|v| v.as_str());
        self.verifier
            .verify(subject, header(EXPECTED_SEQUENCE_HEADER), &payload, header(SIGNATURE_HEADER))
            .map_err(|source| ReadError::Forged { subject: subject.to_owned(), source })?;
        Ok(payload)
    }

    async fn last_on(&self, subject: &str) -> Result<Option<Vec<u8>>, ReadError> {
        let stream = self.js.get_stream(subject::state_stream(&self.dc)).await.map_err(ReadError::StateStream)?;
        match stream.get_last_raw_message_by_subject(subject).await {
            Ok(message) => Ok(Some(self.payload(subject, Some(&message.headers), &message.payload).await?)),
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(ReadError::LastMessage(e)),
        }
    }

    /// The latest full snapshot of a service, if the relay published one, with every
    /// file in its entries: a snapshot by objects is rebuilt from the service's objects
    /// on the state stream, each checked against its id ([`tree_objects`]).
    pub async fn snapshot(&self, id: &ServiceId) -> Result<Option<ServiceUpdate>, ReadError> {
        let Some(bytes) = self.last_on(&subject::snapshot_subject(&self.dc, id.kind, &id.name)).await? else {
            return Ok(None);
        };
        let mut snapshot: ServiceUpdate = decoded("snapshot", &bytes)?;
        if snapshot.is_by_objects() {
            snapshot.entries = self.tree_entries(id, snapshot.tree.as_deref()).await?;
        }
        Ok(Some(snapshot))
    }

    /// A full snapshot of `commit` of a service, whose tree is `tree`, rebuilt from the
    /// service's objects on the state stream as a snapshot by objects is: how a host
    /// reaches a commit that is not the service's latest snapshot (a rollout's commit or
    /// the one before it). `like` gives the ref, branch and version it is announced as.
    pub async fn commit_snapshot(
        &self,
        like: &ServiceUpdate,
        commit: &str,
        tree: &str,
    ) -> Result<ServiceUpdate, ReadError> {
        let entries = self.tree_entries(&like.service(), Some(tree)).await?;
        Ok(ServiceUpdate {
            dc: self.dc.clone(),
            from: None,
            to: Some(commit.to_owned()),
            tree: Some(tree.to_owned()),
            snapshot: true,
            entries,
            staged: false,
            ..like.clone()
        })
    }

    /// Every file of the tree `tree` of a service, as a snapshot's entries, from the
    /// service's objects on the state stream.
    async fn tree_entries(
        &self,
        id: &ServiceId,
        tree: Option<&str>,
    ) -> Result<Vec<confcast_schemas::Entry>, ReadError> {
        let objects = self.tree_objects(id).await?;
        tree_objects::entries(tree, &objects).map_err(|source| ReadError::Snapshot { service: id.to_string(), source })
    }

    /// The rollout state of a service, if its relay wrote one (only a service with a
    /// rollout policy has one).
    pub async fn rollout(&self, id: &ServiceId) -> Result<Option<RolloutState>, ReadError> {
        match self.last_on(&subject::rollout_subject(&self.dc, id.kind, &id.name)).await? {
            Some(bytes) => Ok(Some(decoded("rollout state", &bytes)?)),
            None => Ok(None),
        }
    }

    /// Every object of a service's trees the state stream holds, by id. Objects are
    /// content-addressed and checked against their ids when used, so they carry no
    /// signature; one too large for a message is read from the blob store.
    async fn tree_objects(&self, id: &ServiceId) -> Result<TreeObjects, ReadError> {
        let failed = |reason: String| ReadError::Objects { service: id.to_string(), reason };
        let stream = self.js.get_stream(subject::state_stream(&self.dc)).await.map_err(ReadError::StateStream)?;
        let filter = subject::objects_wildcard(&self.dc, id.kind, &id.name);
        let prefix = filter.trim_end_matches('>').to_owned();
        let consumer =
            stream.create_consumer(streams::last_per_subject(filter)).await.map_err(|e| failed(e.to_string()))?;
        let mut remaining = consumer.cached_info().num_pending;
        let mut objects = TreeObjects::with_capacity(remaining as usize);
        if remaining == 0 {
            return Ok(objects);
        }
        let mut messages = consumer.messages().await.map_err(|e| failed(e.to_string()))?;
        while remaining > 0 {
            let message = match tokio::time::timeout(OBJECTS_READ_TIMEOUT, messages.next()).await {
                Ok(Some(message)) => message.map_err(|e| failed(e.to_string()))?,
                Ok(None) | Err(_) => return Err(failed("the state stream stopped delivering".to_owned())),
            };
            remaining = message.info().map(|i| i.pending).unwrap_or(0).min(remaining - 1);
            let Some(object) = message.subject.strip_prefix(prefix.as_str()) else { continue };
            let Ok(object) = gix_hash::ObjectId::from_hex(object.as_bytes()) else { continue };
            let content = match message.headers.as_ref().and_then(|h| h.get(subject::SPILLED_HEADER)) {
                Some(name) => self.object(name.as_str()).await?,
                None => message.payload.to_vec(),
            };
            objects.insert(object, content);
        }
        Ok(objects)
    }

    /// The last head the relay published for a service: small, and enough to tell
    /// whether the datacenter publishes it (a commit) or removed it (none).
    pub async fn head(&self, id: &ServiceId) -> Result<Option<ServiceHead>, ReadError> {
        match self.last_on(&subject::head_subject(&self.dc, id.kind, &id.name)).await? {
            Some(bytes) => Ok(Some(decoded("head", &bytes)?)),
            None => Ok(None),
        }
    }

    /// The datacenter's inventory, if the relay published one.
    pub async fn inventory(&self) -> Result<Option<Inventory>, ReadError> {
        match self.last_on(&subject::inventory_subject(&self.dc)).await? {
            Some(bytes) => Ok(Some(decoded("inventory", &bytes)?)),
            None => Ok(None),
        }
    }

    /// Fetches every content the update keeps in the object store.
    pub async fn objects(&self, update: &ServiceUpdate) -> Result<Objects, ReadError> {
        let names: HashSet<&String> = update.entries.iter().filter_map(|e| e.object.as_ref()).collect();
        let mut objects = Objects::new();
        for name in names {
            objects.insert(name.clone(), self.object(name).await?);
        }
        Ok(objects)
    }
}

/// `bytes` decoded as the `what` they should be.
fn decoded<T: serde::de::DeserializeOwned + confcast_schemas::message::Versioned>(
    what: &'static str,
    bytes: &[u8],
) -> Result<T, ReadError> {
    decode(bytes).map_err(|source| ReadError::Decode { what, source })
}
