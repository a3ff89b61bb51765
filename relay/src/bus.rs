//! The relay's side of the bus: the datacenter's streams, the blob store, the index.
//!
//! Every stream and bucket is configured in [`confcast_schemas::streams`]; here they are
//! opened (created when missing) with the datacenter's replicas. Every publish carries
//! a content-derived `Nats-Msg-Id` and awaits its ack. A message larger than the
//! server's `max_payload` is stored in the object store and announced by a header
//! naming it (DESIGN principle 7); file contents above [`INLINE_LIMIT`] always travel
//! that way, named by their git blob id ([`blob_object`]) so each is stored once.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, kv, message::PublishMessage, object_store, stream};
use confcast_schemas::sign::{Signer, SIGNATURE_HEADER};
use confcast_schemas::{decode, streams, subject, ServiceHead, ServiceId};
use futures::StreamExt;

use crate::config::StreamLayout;
use crate::error::BusError;

/// Files up to this size travel inside the update; larger ones go to the blob store.
pub const INLINE_LIMIT: usize = 64 * 1024;
/// NATS's default `max_payload`, assumed until the server has told its own.
const DEFAULT_MAX_PAYLOAD: usize = 1024 * 1024;
/// Room kept below `max_payload` for headers and framing.
const HEADROOM: usize = 8 * 1024;
/// How long reading the state stream may wait for its next message.
const STATE_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// The object store name of a file's content: its git blob id.
pub fn blob_object(blob: &gix::oid) -> String {
    format!("blob/{blob}")
}

/// The K/V bucket `config` names, created with `config` if it does not exist (an
/// existing one is used as it is).
pub(crate) async fn key_value(
    js: &jetstream::Context,
    what: &'static str,
    config: kv::Config,
) -> Result<kv::Store, BusError> {
    match js.get_key_value(&config.bucket).await {
        Ok(store) => Ok(store),
        Err(_) => js.create_key_value(config).await.map_err(|source| BusError::Bucket { what, source }),
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
    signer: Option<Arc<Signer>>,
    updates: stream::Stream,
    state: stream::Stream,
    /// Last stream sequence of each subject this relay published on (when signing).
    sequences: Arc<Mutex<HashMap<String, u64>>>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus").field("dc", &self.dc).finish_non_exhaustive()
    }
}

/// Opens the stream `config` names, creating it if it is missing.
async fn stream(
    js: &jetstream::Context,
    what: &'static str,
    config: stream::Config,
) -> Result<stream::Stream, BusError> {
    js.get_or_create_stream(config).await.map_err(|source| BusError::Stream { what, source })
}

impl Bus {
    /// Opens (creating what is missing) the datacenter's streams and buckets, and the
    /// commit stream: the master's own when the datacenter shares its JetStream, else
    /// (`layout.commits_domain`) a local mirror of the one in the master's domain.
    /// Existing streams are used as they are: an operator's changes to them stay.
    pub async fn open(client: async_nats::Client, dc: &str, layout: &StreamLayout) -> Result<Bus, BusError> {
        let js = jetstream::new(client.clone());
        let replicas = layout.replicas.max(1);
        let commits = match &layout.commits_domain {
            None => streams::commits(replicas),
            Some(domain) => streams::commits_mirror(domain, replicas),
        };
        stream(&js, "commit stream", commits).await?;
        let updates = stream(&js, "update stream", stream::Config { num_replicas: replicas, ..streams::updates(dc) });
        let updates = updates.await?;
        let state =
            stream(&js, "state stream", stream::Config { num_replicas: replicas, ..streams::state(dc) }).await?;
        stream(&js, "status stream", stream::Config { num_replicas: replicas, ..streams::status(dc) }).await?;
        let blobs = match js.get_object_store(subject::blobs_bucket(dc)).await {
            Ok(store) => store,
            Err(_) => js
                .create_object_store(object_store::Config { num_replicas: replicas, ..streams::blobs(dc) })
                .await
                .map_err(BusError::BlobStore)?,
        };
        // The hosts' exec slots (`subscriber --max-parallel`): hosts may use the bucket
        // but need not be allowed to create it.
        let slots = kv::Config { num_replicas: replicas, ..streams::exec_slots(dc) };
        key_value(&js, "exec slots bucket", slots).await?;
        let index = key_value(&js, "index bucket", kv::Config { num_replicas: replicas, ..streams::index() }).await?;
        let sequences = Arc::default();
        Ok(Bus { js, blobs, index, dc: dc.to_owned(), client, signer: None, updates, state, sequences })
    }

    /// Signs every message published from now on (see [`confcast_schemas::sign`]).
    pub fn with_signer(mut self, signer: Option<Signer>) -> Bus {
        self.signer = signer.map(Arc::new);
        self
    }

    /// The JetStream context.
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    /// The last published head of every service of the datacenter.
    pub async fn load_heads(&self) -> Result<BTreeMap<ServiceId, ServiceHead>, BusError> {
        let mut heads = BTreeMap::new();
        for message in self.last_per_subject(&subject::heads_wildcard(&self.dc)).await? {
            match decode::<ServiceHead>(&message) {
                Ok(head) => {
                    heads.insert(head.service(), head);
                }
                Err(e) => tracing::warn!(dc = %self.dc, error = %e, "ignoring unreadable service head"),
            }
        }
        Ok(heads)
    }

    /// The payload of the last message of every subject of the state stream matching
    /// `filter`.
    pub(crate) async fn last_per_subject(&self, filter: &str) -> Result<Vec<Vec<u8>>, BusError> {
        self.last_per_subject_of(&subject::state_stream(&self.dc), filter).await
    }

    /// The last report of every host of `service`, from the status stream.
    pub(crate) async fn statuses(&self, service: &ServiceId) -> Result<Vec<Vec<u8>>, BusError> {
        let filter = subject::service_status_wildcard(&self.dc, service.kind, &service.name);
        self.last_per_subject_of(&subject::status_stream(&self.dc), &filter).await
    }

    /// The payload of the last message of every subject of `stream` matching `filter`.
    async fn last_per_subject_of(&self, stream: &str, filter: &str) -> Result<Vec<Vec<u8>>, BusError> {
        let stream = self.js.get_stream(stream).await.map_err(BusError::StateStream)?;
        let consumer =
            stream.create_consumer(streams::last_per_subject(filter)).await.map_err(BusError::StateReader)?;
        let mut remaining = consumer.cached_info().num_pending;
        let mut out = Vec::with_capacity(remaining as usize);
        if remaining == 0 {
            return Ok(out);
        }
        let mut messages = consumer.messages().await.map_err(BusError::StateMessages)?;
        while remaining > 0 {
            let next = tokio::time::timeout(STATE_READ_TIMEOUT, messages.next()).await;
            let message = match next {
                Ok(Some(message)) => message.map_err(BusError::StateMessage)?,
                Ok(None) | Err(_) => return Err(BusError::StateStalled),
            };
            out.push(self.payload_of(&message.message).await?);
            remaining = message.info().map(|i| i.pending).unwrap_or(0).min(remaining - 1);
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
        let mut object =
            self.blobs.get(name).await.map_err(|source| BusError::ReadObject { name: name.to_owned(), source })?;
        let mut bytes = Vec::new();
        object
            .read_to_end(&mut bytes)
            .await
            .map_err(|source| BusError::ReadObjectContent { name: name.to_owned(), source })?;
        Ok(bytes)
    }

    /// Stores `content` under [`blob_object`] unless already there; returns the name.
    pub async fn ensure_blob(&self, blob: &gix::oid, content: &[u8]) -> Result<String, BusError> {
        let name = blob_object(blob);
        if self.blobs.info(&name).await.is_ok_and(|info| !info.deleted) {
            return Ok(name);
        }
        self.store_object(&name, content).await?;
        Ok(name)
    }

    async fn store_object(&self, name: &str, content: &[u8]) -> Result<(), BusError> {
        let stored = self.blobs.put(name, &mut &content[..]).await;
        stored.map(drop).map_err(|source| BusError::StoreObject { name: name.to_owned(), source })
    }

    /// The server's `max_payload`, read from the current connection: it is unknown
    /// (zero) until the client has connected, and may differ after a reconnect.
    fn max_payload(&self) -> usize {
        match self.client.server_info().max_payload {
            0 => DEFAULT_MAX_PAYLOAD,
            n => n,
        }
    }

    /// Publishes a service's update on the update stream (see [`Bus::publish`]).
    pub async fn publish_update(&self, service: &ServiceId, msg_id: &str, payload: Vec<u8>) -> Result<u64, BusError> {
        let subject = subject::update_subject(&self.dc, service.kind, &service.name);
        self.publish(&self.updates, subject, msg_id, payload).await
    }

    /// Publishes a service's snapshot on the state stream.
    pub async fn publish_snapshot(&self, service: &ServiceId, msg_id: &str, payload: Vec<u8>) -> Result<u64, BusError> {
        let subject = subject::snapshot_subject(&self.dc, service.kind, &service.name);
        self.publish(&self.state, subject, msg_id, payload).await
    }

    /// Publishes a service's head on the state stream.
    pub async fn publish_head(&self, service: &ServiceId, msg_id: &str, payload: Vec<u8>) -> Result<u64, BusError> {
        let subject = subject::head_subject(&self.dc, service.kind, &service.name);
        self.publish(&self.state, subject, msg_id, payload).await
    }

    /// Publishes a service's rollout state on the state stream.
    pub async fn publish_rollout(&self, service: &ServiceId, msg_id: &str, payload: Vec<u8>) -> Result<u64, BusError> {
        let subject = subject::rollout_subject(&self.dc, service.kind, &service.name);
        self.publish(&self.state, subject, msg_id, payload).await
    }

    /// The NATS connection.
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// Publishes the datacenter's inventory on the state stream.
    pub async fn publish_inventory(&self, msg_id: &str, payload: Vec<u8>) -> Result<u64, BusError> {
        self.publish(&self.state, subject::inventory_subject(&self.dc), msg_id, payload).await
    }

    /// Publishes an error event on the update stream, where hosts and operators see it.
    pub async fn publish_error(&self, msg_id: &str, payload: Vec<u8>) -> Result<u64, BusError> {
        self.publish(&self.updates, subject::error_subject(&self.dc), msg_id, payload).await
    }

    /// Publishes with a dedup id and awaits the ack; spills oversized payloads.
    /// Returns the stream sequence.
    ///
    /// With a signing key, every message is also conditional on the subject's last
    /// sequence in `stream` (see [`confcast_schemas::sign`]): the relay is the only
    /// writer of its subjects, so the condition only fails after a restart or when
    /// somebody else wrote there; the relay then reads the subject's real last sequence
    /// and retries.
    async fn publish(
        &self,
        stream: &stream::Stream,
        subject: String,
        msg_id: &str,
        payload: Vec<u8>,
    ) -> Result<u64, BusError> {
        let spilled = if payload.len() + HEADROOM > self.max_payload() {
            tracing::debug!(%subject, bytes = payload.len(), "message larger than max_payload, spilling to the object store");
            let name = format!("msg/{msg_id}");
            self.store_object(&name, &payload).await?;
            Some(name)
        } else {
            None
        };
        let mut attempt = 0;
        loop {
            let mut message = match &spilled {
                Some(name) => PublishMessage::build().header(subject::SPILLED_HEADER, name.as_str()),
                None => PublishMessage::build().payload(payload.clone().into()),
            }
            .message_id(msg_id);
            if let Some(signer) = &self.signer {
                let expected = self.last_sequence_of(stream, &subject).await?;
                message = message
                    .expected_last_subject_sequence(expected)
                    .header(SIGNATURE_HEADER, signer.sign(&subject, Some(expected), &payload).as_str());
            }
            let acked = match self.js.send_publish(subject.clone(), message).await {
                Ok(ack) => ack.await,
                Err(source) => return Err(BusError::Publish { subject, source }),
            };
            match acked {
                Ok(ack) => {
                    if self.signer.is_some() {
                        self.sequences.lock().unwrap_or_else(|e| e.into_inner()).insert(subject, ack.sequence);
                    }
                    return Ok(ack.sequence);
                }
                Err(e) if e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence && attempt < 3 => {
                    tracing::warn!(%subject, "the subject moved on without this relay; reading its last sequence again");
                    self.sequences.lock().unwrap_or_else(|e| e.into_inner()).remove(&subject);
                    attempt += 1;
                }
                Err(source) => return Err(BusError::Publish { subject, source }),
            }
        }
    }

    /// The last sequence of `subject` in `stream` (0 if it has none), as this relay
    /// last published it or, the first time, as the stream says.
    async fn last_sequence_of(&self, stream: &stream::Stream, subject: &str) -> Result<u64, BusError> {
        if let Some(seq) = self.sequences.lock().unwrap_or_else(|e| e.into_inner()).get(subject) {
            return Ok(*seq);
        }
        let seq = match stream.get_last_raw_message_by_subject(subject).await {
            Ok(message) => message.sequence,
            Err(e) if e.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound => 0,
            Err(source) => return Err(BusError::LastSequence { subject: subject.to_owned(), source }),
        };
        self.sequences.lock().unwrap_or_else(|e| e.into_inner()).insert(subject.to_owned(), seq);
        Ok(seq)
    }

    /// Stores a service's git objects on the state stream, one message per object
    /// named by its id ([`subject::object_subject`]), in the order given; those larger
    /// than a message can hold go to the blob store, and their message names them. Many
    /// are in flight at once; returns once all are stored.
    pub async fn publish_objects(
        &self,
        service: &ServiceId,
        objects: &[(gix::ObjectId, Vec<u8>)],
    ) -> Result<(), BusError> {
        const IN_FLIGHT: usize = 256;
        let mut acks = Vec::with_capacity(IN_FLIGHT);
        for (id, content) in objects {
            let subject = subject::object_subject(&self.dc, service.kind, &service.name, &id.to_string());
            let message = if content.len() + HEADROOM > self.max_payload() {
                let name = self.ensure_blob(id, content).await?;
                PublishMessage::build().header(subject::SPILLED_HEADER, name.as_str())
            } else {
                PublishMessage::build().payload(content.clone().into())
            };
            // No `Nats-Msg-Id`: an object purged by a sweep may be needed again seconds
            // later (a file edited back to an earlier content), and JetStream would
            // drop its second publish within the dedup window as a duplicate of the
            // first. The state stream keeps one message per subject, so a publish
            // repeated by a retry replaces the copy instead of adding one.
            match self.js.send_publish(subject.clone(), message).await {
                Ok(ack) => acks.push((subject, ack)),
                Err(source) => return Err(BusError::Publish { subject, source }),
            }
            if acks.len() >= IN_FLIGHT {
                confirm(std::mem::take(&mut acks)).await?;
            }
        }
        confirm(acks).await
    }

    /// Whether the state stream holds object `id` of `service`.
    pub async fn has_object(&self, service: &ServiceId, id: &str) -> Result<bool, BusError> {
        let subject = subject::object_subject(&self.dc, service.kind, &service.name, id);
        match self.state.get_last_raw_message_by_subject(&subject).await {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound => Ok(false),
            Err(source) => Err(BusError::LastSequence { subject, source }),
        }
    }

    /// The ids of every object of `service` the state stream holds.
    pub async fn stored_objects(&self, service: &ServiceId) -> Result<Vec<String>, BusError> {
        let filter = subject::objects_wildcard(&self.dc, service.kind, &service.name);
        let prefix = filter.trim_end_matches('>').to_owned();
        let mut subjects = self.state.info_with_subjects(&filter).await.map_err(BusError::StateInfo)?;
        let mut ids = Vec::new();
        while let Some(entry) = subjects.next().await {
            let (subject, _count) = entry.map_err(BusError::StateSubjects)?;
            if let Some(id) = subject.strip_prefix(&prefix) {
                ids.push(id.to_owned());
            }
        }
        Ok(ids)
    }

    /// Removes objects of `service` from the state stream: those named, or with
    /// `None` all of them.
    pub async fn purge_objects(&self, service: &ServiceId, ids: Option<&[String]>) -> Result<u64, BusError> {
        let filters = match ids {
            Some(ids) => {
                ids.iter().map(|id| subject::object_subject(&self.dc, service.kind, &service.name, id)).collect()
            }
            None => vec![subject::objects_wildcard(&self.dc, service.kind, &service.name)],
        };
        let mut purged = 0;
        for filter in filters {
            let response = self.state.purge().filter(filter.as_str()).await;
            purged += response.map_err(|source| BusError::Purge { subject: filter, source })?.purged;
        }
        Ok(purged)
    }

    /// Writes one index key.
    pub async fn put_index(&self, key: String, value: String) -> Result<(), BusError> {
        match self.index.put(&key, value.into_bytes().into()).await {
            Ok(_) => Ok(()),
            Err(source) => Err(BusError::IndexPut { key, source }),
        }
    }

    /// Removes one index key.
    pub async fn delete_index(&self, key: String) -> Result<(), BusError> {
        self.index.delete(&key).await.map_err(|source| BusError::IndexDelete { key, source })
    }
}

/// Awaits the acks of publishes in flight.
async fn confirm(acks: Vec<(String, jetstream::context::PublishAckFuture)>) -> Result<(), BusError> {
    for (subject, ack) in acks {
        ack.await.map_err(|source| BusError::Publish { subject, source })?;
    }
    Ok(())
}
