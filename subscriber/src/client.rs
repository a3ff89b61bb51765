//! Watching a service's configuration from an application: an async stream of changes.
//!
//! Two sources, same items ([`ServiceConfig`]: the commit and every file):
//!
//! * [`watch_local`] asks the host's subscriber (`subscriber --listen`, TCP or unix
//!   socket) with blocking queries, so it sees exactly the files the host applied and
//!   verified, and costs nothing while nothing changes; the answers are the API's own
//!   types ([`crate::api::types`]);
//! * [`watch_nats`] reads straight from the datacenter's NATS, for an application
//!   without a subscriber beside it: it follows the service's head, reads each new
//!   snapshot, checks its signature (when given trusted keys) and its git tree id, and
//!   keeps the files in memory. Nothing is written to disk.
//!
//! Both yield the current configuration first, then one item per change. A failure
//! (the subscriber restarting, NATS unreachable) is yielded as an error and the stream
//! goes on trying; drop the stream to stop.
//!
//! ```no_run
//! use futures::StreamExt;
//! # async fn example() {
//! let listen = "127.0.0.1:7070".parse().expect("address");
//! let mut changes = std::pin::pin!(confcast_subscriber::client::watch_local(listen, "service0"));
//! while let Some(change) = changes.next().await {
//!     match change {
//!         Ok(config) => println!("now at {:?}: {} files", config.commit, config.files.len()),
//!         Err(e) => eprintln!("watch: {e}"),
//!     }
//! }
//! # }
//! ```
//!
//! `examples/watch.rs` is a runnable version.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, context::GetStreamError, stream::ConsumerError};
use base64::Engine as _;
use bytes::Bytes;
use confcast_schemas::message::DecodeError;
use confcast_schemas::sign::{SignatureError, Verifier};
use confcast_schemas::{decode, subject, FileMode, Kind, ServiceHead, ServiceId, ServiceUpdate};
use futures::{Stream, StreamExt};
use http_body_util::{BodyExt, Empty};
use serde_json::Value;

use crate::api::{Listen, Service, TreeFile, INDEX_HEADER};
use crate::bus::{ReadError, Reader};

/// One file of a service's tree.
#[derive(Debug, Clone, PartialEq)]
pub enum File {
    /// A UTF-8 file, and its parsed document when it is JSON, YAML or TOML (through the
    /// local API only).
    Text {
        /// The content.
        text: String,
        /// The parsed document, if any.
        document: Option<Value>,
    },
    /// Any other file.
    Binary(Vec<u8>),
    /// A symbolic link and its target.
    Symlink(String),
}

impl File {
    /// The content's bytes (a link's target for a symlink).
    pub fn bytes(&self) -> &[u8] {
        match self {
            File::Text { text, .. } => text.as_bytes(),
            File::Binary(bytes) => bytes,
            File::Symlink(target) => target.as_bytes(),
        }
    }
}

/// A service's configuration at one commit.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceConfig {
    /// Service, application or device.
    pub kind: Kind,
    /// Its name.
    pub name: String,
    /// The commit in place; `None` once the service was dropped.
    pub commit: Option<String>,
    /// Its git tree id.
    pub tree: Option<String>,
    /// The ref it was resolved through.
    pub ref_name: String,
    /// Every file, by path relative to the service's directory.
    pub files: BTreeMap<String, File>,
}

/// Why a watch could not read the configuration this time.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The local service could not be reached.
    #[error("{listen:?}: {source}")]
    Connect {
        /// Where it serves.
        listen: Listen,
        /// Why not.
        #[source]
        source: std::io::Error,
    },
    /// The exchange with the local service broke off.
    #[error("{listen:?}: {source}")]
    Exchange {
        /// Where it serves.
        listen: Listen,
        /// Why.
        #[source]
        source: hyper::Error,
    },
    /// The service's name makes no request.
    #[error("{path}: {source}")]
    Request {
        /// The path asked for.
        path: String,
        /// Why it is not one.
        #[source]
        source: hyper::http::Error,
    },
    /// The local service answered with an error.
    #[error("{path}: HTTP {status}: {body}")]
    Refused {
        /// The path asked for.
        path: String,
        /// The HTTP status.
        status: u16,
        /// The answer, as sent.
        body: String,
    },
    /// Its answer is not a service.
    #[error("{path}: {source}")]
    Answer {
        /// The path asked for.
        path: String,
        /// Why it does not read as one.
        #[source]
        source: serde_json::Error,
    },
    /// Its answer lists no files.
    #[error("the local service's answer has no valid files")]
    NoFiles,
    /// A binary file of its answer does not decode.
    #[error("the local service's answer has no valid base64 for {path}")]
    Base64 {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: base64::DecodeError,
    },
    /// The trusted keys given are not keys.
    #[error(transparent)]
    TrustedKeys(SignatureError),
    /// The datacenter's state stream could not be found.
    #[error("datacenter {dc}: {source}")]
    StateStream {
        /// The datacenter.
        dc: String,
        /// Why.
        #[source]
        source: GetStreamError,
    },
    /// The service's head could not be followed.
    #[error("datacenter {dc}: {source}")]
    Consumer {
        /// The datacenter.
        dc: String,
        /// Why.
        #[source]
        source: ConsumerError,
    },
    /// The head's messages could not be read.
    #[error("datacenter {dc}: {source}")]
    Messages {
        /// The datacenter.
        dc: String,
        /// Why.
        #[source]
        source: consumer::StreamError,
    },
    /// Following the head broke off.
    #[error("following the head of {name}: {source}")]
    Follow {
        /// The service.
        name: String,
        /// Why.
        #[source]
        source: consumer::pull::OrderedError,
    },
    /// A message could not be read, or is not signed by a trusted key.
    #[error(transparent)]
    Read(ReadError),
    /// A head does not decode.
    #[error(transparent)]
    Decode(DecodeError),
    /// The service has a head but no snapshot.
    #[error("no snapshot of {kind} {name}")]
    NoSnapshot {
        /// Its kind.
        kind: Kind,
        /// Its name.
        name: String,
    },
    /// A file's content is not in the object store.
    #[error("object {0} missing")]
    MissingObject(String),
    /// A file of the snapshot carries no content.
    #[error("an entry without content")]
    NoContent,
    /// The snapshot's files are not the tree it names.
    #[error("snapshot of {name} hashes to tree {found}, not {}", expected.as_deref().unwrap_or("-"))]
    TreeMismatch {
        /// The service.
        name: String,
        /// What the files hash to.
        found: String,
        /// The tree the snapshot names.
        expected: Option<String>,
    },
}

/// How long a blocking query to the local service waits for a change.
const LOCAL_WAIT: &str = "5m";
/// Pause before trying again after a failure.
const RETRY: Duration = Duration::from_secs(1);

/// Watches `service` through the host's subscriber serving at `listen`.
pub fn watch_local(listen: Listen, service: &str) -> impl Stream<Item = Result<ServiceConfig, ClientError>> {
    let service = service.to_owned();
    futures::stream::unfold(
        (listen, service, None::<u64>, None::<Option<String>>),
        |(listen, service, index, seen)| async move {
            let mut index = index;
            loop {
                let path = match index {
                    None => format!("/v1/services/{service}"),
                    Some(index) => format!("/v1/services/{service}?index={index}&wait={LOCAL_WAIT}"),
                };
                match get(&listen, &path).await {
                    Ok((200, new_index, body)) => {
                        let parsed = serde_json::from_slice::<Service>(&body)
                            .map_err(|source| ClientError::Answer { path, source })
                            .and_then(from_local);
                        index = new_index.or(index);
                        match parsed {
                            // A change the application has already seen (exec status, say):
                            // keep waiting.
                            Ok(config) if seen.as_ref() == Some(&config.commit) => continue,
                            Ok(config) => {
                                let seen = Some(config.commit.clone());
                                return Some((Ok(config), (listen, service, index, seen)));
                            }
                            Err(e) => return Some((Err(e), (listen, service, index, seen))),
                        }
                    }
                    Ok((status, _, body)) => {
                        let body = String::from_utf8_lossy(&body).trim().to_owned();
                        tokio::time::sleep(RETRY).await;
                        return Some((Err(ClientError::Refused { path, status, body }), (listen, service, None, seen)));
                    }
                    Err(e) => {
                        tokio::time::sleep(RETRY).await;
                        return Some((Err(e), (listen, service, None, seen)));
                    }
                }
            }
        },
    )
}

/// One GET to the local service: status, `X-Confcast-Index`, body.
async fn get(listen: &Listen, path: &str) -> Result<(u16, Option<u64>, Bytes), ClientError> {
    let connect = |source| ClientError::Connect { listen: listen.clone(), source };
    let exchange = |source| ClientError::Exchange { listen: listen.clone(), source };
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, "localhost")
        .body(Empty::<Bytes>::new())
        .map_err(|source| ClientError::Request { path: path.to_owned(), source })?;
    let response = match listen {
        Listen::Tcp(addr) => send(tokio::net::TcpStream::connect(addr).await.map_err(connect)?, request).await,
        Listen::Unix(path) => send(tokio::net::UnixStream::connect(path).await.map_err(connect)?, request).await,
    }
    .map_err(exchange)?;
    let status = response.status().as_u16();
    let index = response.headers().get(INDEX_HEADER).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
    let body = response.into_body().collect().await.map_err(exchange)?.to_bytes();
    Ok((status, index, body))
}

async fn send<S>(
    stream: S,
    request: hyper::Request<Empty<Bytes>>,
) -> Result<hyper::Response<hyper::body::Incoming>, hyper::Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    sender.send_request(request).await
}

/// The configuration in the local API's answer about one service.
fn from_local(answer: Service) -> Result<ServiceConfig, ClientError> {
    let mut files = BTreeMap::new();
    for (path, file) in answer.files.ok_or(ClientError::NoFiles)? {
        let file = match file {
            TreeFile::Text { text, document, .. } => File::Text { text, document },
            TreeFile::Symlink { symlink } => File::Symlink(symlink),
            TreeFile::Binary { base64 } => match base64::engine::general_purpose::STANDARD.decode(base64) {
                Ok(bytes) => File::Binary(bytes),
                Err(source) => return Err(ClientError::Base64 { path, source }),
            },
        };
        files.insert(path, file);
    }
    Ok(ServiceConfig {
        kind: answer.kind,
        name: answer.name,
        commit: answer.commit,
        tree: answer.tree,
        ref_name: answer.ref_name,
        files,
    })
}

/// Watches a service straight from datacenter `dc`'s NATS, accepting only messages
/// signed by `trusted_keys` when there are any.
pub fn watch_nats(
    client: async_nats::Client,
    dc: &str,
    kind: Kind,
    name: &str,
    trusted_keys: &[String],
) -> impl Stream<Item = Result<ServiceConfig, ClientError>> {
    let verifier = Verifier::new(trusted_keys).map(Arc::new);
    let js = jetstream::new(client);
    let (dc, name) = (dc.to_owned(), name.to_owned());
    futures::stream::once(async move {
        let verifier = verifier.map_err(ClientError::TrustedKeys)?;
        let reader = Reader::new(js.clone(), &dc).with_verifier(verifier);
        Ok::<_, ClientError>((js, reader, dc, name))
    })
    .flat_map(move |setup| match setup {
        Err(e) => futures::stream::once(async move { Err(e) }).boxed(),
        Ok((js, reader, dc, name)) => heads(js, reader, dc, kind, name).boxed(),
    })
}

/// Follows the service's head; yields the configuration at each new commit.
fn heads(
    js: jetstream::Context,
    reader: Reader,
    dc: String,
    kind: Kind,
    name: String,
) -> impl Stream<Item = Result<ServiceConfig, ClientError>> {
    let reader = Arc::new(reader);
    futures::stream::unfold(
        (js, reader, dc, name, None::<consumer::pull::Ordered>, None::<Option<String>>),
        move |(js, reader, dc, name, mut messages, mut seen)| async move {
            loop {
                if messages.is_none() {
                    match follow_head(&js, &dc, kind, &name).await {
                        Ok(m) => messages = Some(m),
                        Err(e) => {
                            tokio::time::sleep(RETRY).await;
                            return Some((Err(e), (js, reader, dc, name, None, seen)));
                        }
                    }
                }
                let next = messages.as_mut()?.next().await;
                let message = match next {
                    Some(Ok(message)) => message,
                    Some(Err(source)) => {
                        let e = ClientError::Follow { name: name.clone(), source };
                        return Some((Err(e), (js, reader, dc, name, None, seen)));
                    }
                    None => {
                        messages = None;
                        continue;
                    }
                };
                let head = match read_head(&reader, &message).await {
                    Ok(head) => head,
                    Err(e) => return Some((Err(e), (js, reader, dc, name, messages, seen))),
                };
                if seen.as_ref() == Some(&head.commit) {
                    continue;
                }
                let config = match &head.commit {
                    None => Ok(ServiceConfig {
                        kind,
                        name: name.clone(),
                        commit: None,
                        tree: None,
                        ref_name: String::new(),
                        files: BTreeMap::new(),
                    }),
                    Some(_) => snapshot(&reader, kind, &name).await,
                };
                if let Ok(config) = &config {
                    seen = Some(config.commit.clone());
                }
                return Some((config, (js, reader, dc, name, messages, seen)));
            }
        },
    )
}

/// The head in `message`, its signature checked.
async fn read_head(reader: &Reader, message: &async_nats::Message) -> Result<ServiceHead, ClientError> {
    let bytes = reader
        .payload(message.subject.as_str(), message.headers.as_ref(), &message.payload)
        .await
        .map_err(ClientError::Read)?;
    decode::<ServiceHead>(&bytes).map_err(ClientError::Decode)
}

async fn follow_head(
    js: &jetstream::Context,
    dc: &str,
    kind: Kind,
    name: &str,
) -> Result<consumer::pull::Ordered, ClientError> {
    let stream = js
        .get_stream(subject::state_stream(dc))
        .await
        .map_err(|source| ClientError::StateStream { dc: dc.to_owned(), source })?;
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: subject::head_subject(dc, kind, name),
            deliver_policy: consumer::DeliverPolicy::LastPerSubject,
            ..Default::default()
        })
        .await
        .map_err(|source| ClientError::Consumer { dc: dc.to_owned(), source })?;
    consumer.messages().await.map_err(|source| ClientError::Messages { dc: dc.to_owned(), source })
}

/// The service's latest snapshot, with its contents, checked against its tree id.
async fn snapshot(reader: &Reader, kind: Kind, name: &str) -> Result<ServiceConfig, ClientError> {
    let update: ServiceUpdate = reader
        .snapshot(&ServiceId::new(kind, name))
        .await
        .map_err(ClientError::Read)?
        .ok_or_else(|| ClientError::NoSnapshot { kind, name: name.to_owned() })?;
    let objects = reader.objects(&update).await.map_err(ClientError::Read)?;
    let mut files = BTreeMap::new();
    let mut manifest = crate::tree_hash::Manifest::new();
    for entry in &update.entries {
        let (Some(mode), Some(_)) = (entry.mode, entry.blob.as_ref()) else { continue };
        let bytes = match (&entry.content, &entry.object) {
            (Some(content), _) => content.to_vec(),
            (None, Some(object)) => {
                objects.get(object).cloned().ok_or_else(|| ClientError::MissingObject(object.clone()))?
            }
            (None, None) => return Err(ClientError::NoContent),
        };
        manifest.insert(entry.path.to_vec(), (mode.git_mode(), crate::tree_hash::blob_id(&bytes)));
        let path = String::from_utf8_lossy(&entry.path).into_owned();
        let file = match (mode, String::from_utf8(bytes)) {
            (FileMode::Symlink, Ok(target)) => File::Symlink(target),
            (FileMode::Symlink, Err(e)) => File::Symlink(String::from_utf8_lossy(e.as_bytes()).into_owned()),
            (_, Ok(text)) => File::Text { text, document: None },
            (_, Err(e)) => File::Binary(e.into_bytes()),
        };
        files.insert(path, file);
    }
    let tree = crate::tree_hash::tree_id_of(&manifest);
    if update.tree.as_deref() != Some(tree.as_str()) {
        return Err(ClientError::TreeMismatch { name: name.to_owned(), found: tree, expected: update.tree });
    }
    Ok(ServiceConfig {
        kind,
        name: name.to_owned(),
        commit: update.to,
        tree: update.tree,
        ref_name: update.ref_name,
        files,
    })
}
