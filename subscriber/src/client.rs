//! Watching a service's configuration from an application: an async stream of changes.
//!
//! Two sources, same items ([`ServiceConfig`]: the commit and every file):
//!
//! * [`watch_local`] asks the host's subscriber (`subscriber --listen`, TCP or unix
//!   socket) with blocking queries, so it sees exactly the files the host applied and
//!   verified, and costs nothing while nothing changes;
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

use async_nats::jetstream::{self, consumer};
use base64::Engine as _;
use bytes::Bytes;
use confcast_schemas::sign::Verifier;
use confcast_schemas::{decode, subject, FileMode, Kind, ServiceHead, ServiceUpdate};
use futures::{Stream, StreamExt};
use http_body_util::{BodyExt, Empty};
use serde_json::Value;

use crate::bus::Reader;
use crate::serve::{Listen, INDEX_HEADER};

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
    /// The local service or NATS could not be reached.
    #[error("{0}")]
    Unreachable(String),
    /// It answered something this client cannot use.
    #[error("{0}")]
    Invalid(String),
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
                        let parsed = serde_json::from_slice::<Value>(&body)
                            .map_err(|e| ClientError::Invalid(format!("{path}: {e}")))
                            .and_then(|v| from_local(&v));
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
                        let message = format!("{path}: HTTP {status}: {}", String::from_utf8_lossy(&body).trim());
                        tokio::time::sleep(RETRY).await;
                        return Some((Err(ClientError::Unreachable(message)), (listen, service, None, seen)));
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
    let unreachable = |e: &dyn std::fmt::Display| ClientError::Unreachable(format!("{listen:?}: {e}"));
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, "localhost")
        .body(Empty::<Bytes>::new())
        .map_err(|e| ClientError::Invalid(e.to_string()))?;
    let response = match listen {
        Listen::Tcp(addr) => {
            let stream = tokio::net::TcpStream::connect(addr).await.map_err(|e| unreachable(&e))?;
            send(stream, request).await
        }
        Listen::Unix(path) => {
            let stream = tokio::net::UnixStream::connect(path).await.map_err(|e| unreachable(&e))?;
            send(stream, request).await
        }
    }
    .map_err(|e| unreachable(&e))?;
    let status = response.status().as_u16();
    let index = response.headers().get(INDEX_HEADER).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
    let body = response.into_body().collect().await.map_err(|e| unreachable(&e))?.to_bytes();
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

fn from_local(body: &Value) -> Result<ServiceConfig, ClientError> {
    let invalid = |what: &str| ClientError::Invalid(format!("the local service's answer has no valid {what}"));
    let text = |key: &str| body.get(key).and_then(Value::as_str).map(str::to_owned);
    let kind = match body.get("kind").and_then(Value::as_str) {
        Some(k) => Kind::ALL.into_iter().find(|kind| kind.as_str() == k).ok_or_else(|| invalid("kind"))?,
        None => return Err(invalid("kind")),
    };
    let mut files = BTreeMap::new();
    for (path, file) in body.get("files").and_then(Value::as_object).ok_or_else(|| invalid("files"))? {
        let file = if let Some(text) = file.get("text").and_then(Value::as_str) {
            File::Text { text: text.to_owned(), document: file.get("document").cloned() }
        } else if let Some(target) = file.get("symlink").and_then(Value::as_str) {
            File::Symlink(target.to_owned())
        } else if let Some(data) = file.get("base64").and_then(Value::as_str) {
            File::Binary(base64::engine::general_purpose::STANDARD.decode(data).map_err(|_| invalid("base64"))?)
        } else {
            return Err(invalid("file"));
        };
        files.insert(path.clone(), file);
    }
    Ok(ServiceConfig {
        kind,
        name: text("name").ok_or_else(|| invalid("name"))?,
        commit: text("commit"),
        tree: text("tree"),
        ref_name: text("ref").unwrap_or_default(),
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
        let verifier = verifier.map_err(|e| ClientError::Invalid(e.to_string()))?;
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
                    Some(Err(e)) => {
                        let e = ClientError::Unreachable(format!("following the head of {name}: {e}"));
                        return Some((Err(e), (js, reader, dc, name, None, seen)));
                    }
                    None => {
                        messages = None;
                        continue;
                    }
                };
                let subject = message.subject.to_string();
                let head = match reader.payload(&subject, message.headers.as_ref(), &message.payload).await {
                    Ok(bytes) => decode::<ServiceHead>(&bytes).map_err(|e| ClientError::Invalid(e.to_string())),
                    Err(e) => Err(ClientError::Invalid(e.to_string())),
                };
                let head = match head {
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

async fn follow_head(
    js: &jetstream::Context,
    dc: &str,
    kind: Kind,
    name: &str,
) -> Result<consumer::pull::Ordered, ClientError> {
    let unreachable = |e: &dyn std::fmt::Display| ClientError::Unreachable(format!("datacenter {dc}: {e}"));
    let stream = js.get_stream(subject::state_stream(dc)).await.map_err(|e| unreachable(&e))?;
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: subject::head_subject(dc, kind, name),
            deliver_policy: consumer::DeliverPolicy::LastPerSubject,
            ..Default::default()
        })
        .await
        .map_err(|e| unreachable(&e))?;
    consumer.messages().await.map_err(|e| unreachable(&e))
}

/// The service's latest snapshot, with its contents, checked against its tree id.
async fn snapshot(reader: &Reader, kind: Kind, name: &str) -> Result<ServiceConfig, ClientError> {
    let update: ServiceUpdate = reader
        .snapshot(kind, name)
        .await
        .map_err(|e| ClientError::Unreachable(e.to_string()))?
        .ok_or_else(|| ClientError::Invalid(format!("no snapshot of {kind} {name}")))?;
    let objects = reader.objects(&update).await.map_err(|e| ClientError::Unreachable(e.to_string()))?;
    let mut files = BTreeMap::new();
    let mut manifest = crate::tree_hash::Manifest::new();
    for entry in &update.entries {
        let (Some(mode), Some(_)) = (entry.mode, entry.blob.as_ref()) else { continue };
        let bytes = match (&entry.content, &entry.object) {
            (Some(content), _) => content.to_vec(),
            (None, Some(object)) => {
                objects.get(object).cloned().ok_or_else(|| ClientError::Invalid(format!("object {object} missing")))?
            }
            (None, None) => return Err(ClientError::Invalid("an entry without content".into())),
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
        return Err(ClientError::Invalid(format!(
            "snapshot of {name} hashes to tree {tree}, not {}",
            update.tree.as_deref().unwrap_or("-")
        )));
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
