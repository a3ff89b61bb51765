//! The relay's side of the bus: the datacenter's streams, the blob store, the index.
//!
//! Every publish carries a content-derived `Nats-Msg-Id` and awaits its ack. A message
//! larger than the server's `max_payload` is stored in the object store and announced
//! by a header naming it (DESIGN principle 7); file contents above
//! [`INLINE_LIMIT`] always travel that way, named by their git blob id so each is
//! stored once.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv, message::PublishMessage, object_store, stream};
use confcast_schemas::{decode, subject, Kind, ServiceHead};
use futures::StreamExt;

/// Files up to this size travel inside the update; larger ones go to the blob store.
pub const INLINE_LIMIT: usize = 64 * 1024;
/// NATS's default `max_payload`, assumed until the server has told its own.
const DEFAULT_MAX_PAYLOAD: usize = 1024 * 1024;
/// Room kept below `max_payload` for headers and framing.
const HEADROOM: usize = 8 * 1024;
/// Dedup window of the datacenter streams: covers a relay restarted mid-publish.
pub const DEDUP_WINDOW: Duration = Duration::from_secs(10 * 60);
/// Updates kept per service; a host further behind resyncs from the snapshot.
pub const UPDATES_PER_SERVICE: i64 = 1000;

/// Failures on the bus. All are worth retrying: none is caused by the content.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {message}")]
pub struct BusError {
    what: &'static str,
    message: String,
}

impl BusError {
    pub(crate) fn new(what: &'static str, error: impl std::fmt::Display) -> Self {
        BusError { what, message: error.to_string() }
    }

    /// Bus failures are transient: retry with backoff.
    pub fn is_transient(&self) -> bool {
        true
    }
}

/// The update stream of a datacenter.
pub fn updates_stream_config(dc: &str) -> stream::Config {
    stream::Config {
        name: subject::updates_stream(dc),
        subjects: subject::updates_stream_subjects(dc),
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::Limits,
        discard: stream::DiscardPolicy::Old,
        max_messages_per_subject: UPDATES_PER_SERVICE,
        duplicate_window: DEDUP_WINDOW,
        ..Default::default()
    }
}

/// The state stream of a datacenter: one message per subject.
pub fn state_stream_config(dc: &str) -> stream::Config {
    stream::Config {
        name: subject::state_stream(dc),
        subjects: subject::state_stream_subjects(dc),
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::Limits,
        discard: stream::DiscardPolicy::Old,
        max_messages_per_subject: 1,
        duplicate_window: DEDUP_WINDOW,
        allow_direct: true,
        ..Default::default()
    }
}

/// The relay's handles on the bus for one datacenter.
#[derive(Clone)]
pub struct Bus {
    js: jetstream::Context,
    blobs: object_store::ObjectStore,
    index: kv::Store,
    dc: String,
    client: async_nats::Client,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus").field("dc", &self.dc).finish_non_exhaustive()
    }
}

impl Bus {
    /// Creates (or finds) every stream and bucket the relay writes.
    pub async fn open(client: async_nats::Client, dc: &str) -> Result<Bus, BusError> {
        let js = jetstream::new(client.clone());
        js.get_or_create_stream(confcast_publisher::bus::commit_stream_config())
            .await
            .map_err(|e| BusError::new("commit stream", e))?;
        js.get_or_create_stream(updates_stream_config(dc)).await.map_err(|e| BusError::new("update stream", e))?;
        js.get_or_create_stream(state_stream_config(dc)).await.map_err(|e| BusError::new("state stream", e))?;
        let blobs = match js.get_object_store(subject::BLOBS_BUCKET).await {
            Ok(store) => store,
            Err(_) => js
                .create_object_store(object_store::Config {
                    bucket: subject::BLOBS_BUCKET.to_owned(),
                    description: Some("confcast: file contents by git blob id, oversized messages".to_owned()),
                    storage: stream::StorageType::File,
                    ..Default::default()
                })
                .await
                .map_err(|e| BusError::new("blob store", e))?,
        };
        let index = match js.get_key_value(subject::INDEX_BUCKET).await {
            Ok(store) => store,
            Err(_) => js
                .create_key_value(kv::Config {
                    bucket: subject::INDEX_BUCKET.to_owned(),
                    description: "confcast: configurations/<kind>s/<name>/<version> = <branch>/<commit>".to_owned(),
                    history: 5,
                    storage: stream::StorageType::File,
                    ..Default::default()
                })
                .await
                .map_err(|e| BusError::new("index bucket", e))?,
        };
        Ok(Bus { js, blobs, index, dc: dc.to_owned(), client })
    }

    /// The JetStream context.
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    /// The last published head of every service of the datacenter.
    pub async fn load_heads(&self) -> Result<BTreeMap<(Kind, String), ServiceHead>, BusError> {
        let mut heads = BTreeMap::new();
        for message in
            self.last_per_subject(&subject::state_stream(&self.dc), &subject::heads_wildcard(&self.dc)).await?
        {
            match decode::<ServiceHead>(&message) {
                Ok(head) => {
                    heads.insert((head.kind, head.name.clone()), head);
                }
                Err(e) => tracing::warn!(dc = %self.dc, error = %e, "ignoring unreadable service head"),
            }
        }
        Ok(heads)
    }

    async fn last_per_subject(&self, stream: &str, filter: &str) -> Result<Vec<Vec<u8>>, BusError> {
        let err = |e| BusError::new("reading state", e);
        let stream = self.js.get_stream(stream).await.map_err(|e| err(e.to_string()))?;
        let mut consumer: consumer::PullConsumer = stream
            .create_consumer(consumer::pull::Config {
                filter_subject: filter.to_owned(),
                deliver_policy: consumer::DeliverPolicy::LastPerSubject,
                ack_policy: consumer::AckPolicy::None,
                inactive_threshold: Duration::from_secs(30),
                ..Default::default()
            })
            .await
            .map_err(|e| err(e.to_string()))?;
        let mut remaining = consumer.info().await.map_err(|e| err(e.to_string()))?.num_pending as usize;
        let mut out = Vec::with_capacity(remaining);
        while remaining > 0 {
            let mut batch = consumer
                .fetch()
                .max_messages(remaining.min(1000))
                .expires(Duration::from_secs(5))
                .messages()
                .await
                .map_err(|e| err(e.to_string()))?;
            let before = out.len();
            while let Some(message) = batch.next().await {
                let message = message.map_err(|e| err(e.to_string()))?;
                out.push(self.payload_of(&message.message).await?);
            }
            if out.len() == before {
                return Err(err("state stream stopped delivering".to_owned()));
            }
            remaining = remaining.saturating_sub(out.len() - before);
        }
        Ok(out)
    }

    /// The real payload of a message, following a spill header to the object store.
    pub async fn payload_of(&self, message: &async_nats::Message) -> Result<Vec<u8>, BusError> {
        match message.headers.as_ref().and_then(|h| h.get(subject::SPILLED_HEADER)) {
            Some(name) => self.read_object(name.as_str()).await,
            None => Ok(message.payload.to_vec()),
        }
    }

    async fn read_object(&self, name: &str) -> Result<Vec<u8>, BusError> {
        use tokio::io::AsyncReadExt;
        let mut object = self.blobs.get(name).await.map_err(|e| BusError::new("reading object", e))?;
        let mut bytes = Vec::new();
        object.read_to_end(&mut bytes).await.map_err(|e| BusError::new("reading object", e))?;
        Ok(bytes)
    }

    /// Stores `content` under `blob/<id>` unless already there; returns the name.
    pub async fn ensure_blob(&self, blob_hex: &str, content: &[u8]) -> Result<String, BusError> {
        let name = format!("blob/{blob_hex}");
        if self.blobs.info(&name).await.is_ok_and(|info| !info.deleted) {
            return Ok(name);
        }
        self.blobs.put(name.as_str(), &mut &content[..]).await.map_err(|e| BusError::new("storing blob", e))?;
        Ok(name)
    }

    /// The server's `max_payload`, read from the current connection: it is unknown
    /// (zero) until the client has connected, and may differ after a reconnect.
    fn max_payload(&self) -> usize {
        match self.client.server_info().max_payload {
            0 => DEFAULT_MAX_PAYLOAD,
            n => n,
        }
    }

    /// Publishes with a dedup id and awaits the ack; spills oversized payloads.
    /// Returns the stream sequence.
    pub async fn publish(&self, subject: String, msg_id: &str, payload: Vec<u8>) -> Result<u64, BusError> {
        if payload.len() + HEADROOM > self.max_payload() {
            tracing::debug!(%subject, bytes = payload.len(), "message larger than max_payload, spilling to the object store");
        }
        let message = if payload.len() + HEADROOM > self.max_payload() {
            let name = format!("msg/{msg_id}");
            self.blobs
                .put(name.as_str(), &mut &payload[..])
                .await
                .map_err(|e| BusError::new("storing oversized message", e))?;
            PublishMessage::build().header(subject::SPILLED_HEADER, name.as_str()).message_id(msg_id)
        } else {
            PublishMessage::build().payload(payload.into()).message_id(msg_id)
        };
        let ack = self
            .js
            .send_publish(subject, message)
            .await
            .map_err(|e| BusError::new("publish", e))?
            .await
            .map_err(|e| BusError::new("publish ack", e))?;
        Ok(ack.sequence)
    }

    /// Writes one index key.
    pub async fn put_index(&self, key: &str, value: &str) -> Result<(), BusError> {
        self.index.put(key, value.as_bytes().to_vec().into()).await.map_err(|e| BusError::new("index put", e))?;
        Ok(())
    }

    /// Removes one index key.
    pub async fn delete_index(&self, key: &str) -> Result<(), BusError> {
        self.index.delete(key).await.map_err(|e| BusError::new("index delete", e))?;
        Ok(())
    }
}
