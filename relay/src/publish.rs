//! The relay's side of the bus: the datacenter's streams, the blob store, the index.
//!
//! Every publish carries a content-derived `Nats-Msg-Id` and awaits its ack. A message
//! larger than the server's `max_payload` is stored in the object store and announced
//! by a header naming it (DESIGN principle 7); file contents above
//! [`INLINE_LIMIT`] always travel that way, named by their git blob id so each is
//! stored once.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv, message::PublishMessage, object_store, stream};
use confcast_schemas::connect::{AuthError, NatsAuth};
use confcast_schemas::sign::{Signer, SIGNATURE_HEADER};
use confcast_schemas::{decode, subject, Kind, ServiceHead};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::retry::{Backoff, Warnings};

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

/// Connects to the datacenter's NATS (`url`: one server, or several of a cluster
/// separated by commas), retrying until it answers (`None` at shutdown). Every failed
/// attempt says `cannot connect to NATS at URL: cause` at WARN, as [`Warnings`] allow;
/// credentials that cannot be read end it (they will not appear by waiting). Once
/// connected, the client reconnects by itself, and losing and regaining the connection
/// are logged with the URL.
pub async fn connect(
    url: &str,
    auth: &NatsAuth,
    name: String,
    shutdown: &CancellationToken,
) -> Result<Option<async_nats::Client>, AuthError> {
    let servers = confcast_schemas::connect::servers(url)?;
    let shown = confcast_schemas::connect::redact_url(url);
    let mut backoff = Backoff::default();
    let mut warnings = Warnings::default();
    loop {
        let events = shown.clone();
        let options = auth
            .apply(async_nats::ConnectOptions::new())
            .await?
            .name(&name)
            // A relay must notice a dead connection (black-holed network) quickly: two
            // missed pings and it reconnects.
            .ping_interval(Duration::from_secs(5))
            .event_callback(move |event| {
                let url = events.clone();
                async move { log_event(&url, event) }
            });
        let attempt = tokio::select! {
            attempt = options.connect(servers.clone()) => attempt,
            () = shutdown.cancelled() => return Ok(None),
        };
        match attempt {
            Ok(client) => return Ok(Some(client)),
            Err(e) => {
                let delay = backoff.next_delay();
                if let Some(held_back) = warnings.admit(tokio::time::Instant::now(), &e.to_string()) {
                    let not_logged = (held_back > 0).then_some(held_back);
                    tracing::warn!(retry_in = ?delay, not_logged, "cannot connect to NATS at {shown}: {e}");
                }
                tokio::select! { () = tokio::time::sleep(delay) => {}, () = shutdown.cancelled() => return Ok(None) }
            }
        }
    }
}

/// What the NATS client reports about its connection, told as the relay's own lines.
fn log_event(url: &str, event: async_nats::Event) {
    match event {
        async_nats::Event::Connected => tracing::info!(%url, "connected to NATS"),
        async_nats::Event::Disconnected => tracing::warn!(%url, "lost the connection to NATS; reconnecting"),
        async_nats::Event::ServerError(e) => tracing::warn!(%url, error = %e, "NATS server error"),
        async_nats::Event::SlowConsumer(sid) => tracing::warn!(%url, sid, "slow consumer: messages were dropped"),
        async_nats::Event::LameDuckMode => tracing::info!(%url, "the NATS server is shutting down (lame duck mode)"),
        // Failed reconnect attempts: the client says no more than "IO error"; the
        // disconnection was logged, and so is the reconnection.
        event => tracing::debug!(%url, %event, "NATS client event"),
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

/// A datacenter's copy of the commit stream of the master's JetStream domain.
///
/// A leaf node keeps its own JetStream domain, and hosts and relays only ever talk to
/// it. The mirror is kept by the datacenter's server itself: while the leaf link is
/// down the relay has nothing new to read, and when it returns the mirror catches up
/// from where it stopped, so the relay's durable consumer sees every event exactly as
/// it would on the master's stream. Same name as the master's stream: a relay reads
/// one or the other, never both.
pub fn commit_mirror_config(domain: &str, replicas: usize) -> stream::Config {
    let master = confcast_publisher::bus::commit_stream_config(replicas);
    stream::Config {
        name: master.name.clone(),
        description: Some(format!("confcast: mirror of {} in JetStream domain {domain}", master.name)),
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::Limits,
        discard: stream::DiscardPolicy::Old,
        max_age: master.max_age,
        num_replicas: replicas,
        // The domain as the API prefix it stands for: async-nats would also send a
        // `domain` field, which the server refuses as unknown.
        mirror: Some(stream::Source {
            name: master.name,
            external: Some(stream::External { api_prefix: format!("$JS.{domain}.API"), delivery_prefix: None }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Where the relay finds the commit stream and how its own streams are replicated.
#[derive(Debug, Clone, Default)]
pub struct StreamLayout {
    /// JetStream domain of the master's commit stream, if not the datacenter's own.
    pub commits_domain: Option<String>,
    /// Replicas of every stream and bucket the relay creates (3 on a NATS cluster).
    pub replicas: usize,
}

/// How long a host's last report is kept: hosts report again at start and every
/// [`confcast_schemas::message::STATUS_REFRESH`], so only hosts gone for good age out.
pub const STATUS_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);

/// The status stream of a datacenter: the latest report of each host per service,
/// captured from the hosts' core NATS publishes.
pub fn status_stream_config(dc: &str) -> stream::Config {
    stream::Config {
        name: subject::status_stream(dc),
        subjects: subject::status_stream_subjects(dc),
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::Limits,
        discard: stream::DiscardPolicy::Old,
        max_messages_per_subject: 1,
        max_age: STATUS_MAX_AGE,
        allow_direct: true,
        ..Default::default()
    }
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
        Err(_) => js.create_key_value(config).await.map_err(|e| BusError::new(what, e)),
    }
}

/// The hosts' exec slots bucket: one key per host running its exec for a change,
/// forgotten after 5 minutes if the host died holding it.
pub fn exec_slots_config(dc: &str) -> kv::Config {
    kv::Config {
        bucket: subject::exec_slots_bucket(dc),
        description: "confcast: hosts running their exec for a change (subscriber --max-parallel)".to_owned(),
        history: 1,
        max_age: Duration::from_secs(300),
        storage: stream::StorageType::File,
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
    signer: Option<Arc<Signer>>,
    updates: stream::Stream,
    state: stream::Stream,
    /// Last stream sequence of each subject this relay published on (when signing).
    sequences: Arc<std::sync::Mutex<std::collections::HashMap<String, u64>>>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus").field("dc", &self.dc).finish_non_exhaustive()
    }
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
            None => confcast_publisher::bus::commit_stream_config(replicas),
            Some(domain) => commit_mirror_config(domain, replicas),
        };
        js.get_or_create_stream(commits).await.map_err(|e| BusError::new("commit stream", e))?;
        let updates = js
            .get_or_create_stream(stream::Config { num_replicas: replicas, ..updates_stream_config(dc) })
            .await
            .map_err(|e| BusError::new("update stream", e))?;
        let state = js
            .get_or_create_stream(stream::Config { num_replicas: replicas, ..state_stream_config(dc) })
            .await
            .map_err(|e| BusError::new("state stream", e))?;
        js.get_or_create_stream(stream::Config { num_replicas: replicas, ..status_stream_config(dc) })
            .await
            .map_err(|e| BusError::new("status stream", e))?;
        let blobs = match js.get_object_store(subject::blobs_bucket(dc)).await {
            Ok(store) => store,
            Err(_) => js
                .create_object_store(object_store::Config {
                    bucket: subject::blobs_bucket(dc),
                    description: Some("confcast: file contents by git blob id, oversized messages".to_owned()),
                    storage: stream::StorageType::File,
                    num_replicas: replicas,
                    ..Default::default()
                })
                .await
                .map_err(|e| BusError::new("blob store", e))?,
        };
        // The hosts' exec slots (`subscriber --max-parallel`): hosts may use the bucket
        // but need not be allowed to create it.
        key_value(&js, "exec slots bucket", kv::Config { num_replicas: replicas, ..exec_slots_config(dc) }).await?;
        let index = key_value(
            &js,
            "index bucket",
            kv::Config {
                bucket: subject::INDEX_BUCKET.to_owned(),
                description: "confcast: configurations/<kind>s/<name>/<version> = <branch>/<commit>".to_owned(),
                history: 5,
                storage: stream::StorageType::File,
                num_replicas: replicas,
                ..Default::default()
            },
        )
        .await?;
        Ok(Bus { js, blobs, index, dc: dc.to_owned(), client, signer: None, updates, state, sequences: Arc::default() })
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
    ///
    /// With a signing key, every message is also conditional on the subject's last
    /// sequence (see [`confcast_schemas::sign`]): the relay is the only writer of its
    /// subjects, so the condition only fails after a restart or when somebody else
    /// wrote there; the relay then reads the subject's real last sequence and retries.
    pub async fn publish(&self, subject: String, msg_id: &str, payload: Vec<u8>) -> Result<u64, BusError> {
        let spilled = if payload.len() + HEADROOM > self.max_payload() {
            tracing::debug!(%subject, bytes = payload.len(), "message larger than max_payload, spilling to the object store");
            let name = format!("msg/{msg_id}");
            self.blobs
                .put(name.as_str(), &mut &payload[..])
                .await
                .map_err(|e| BusError::new("storing oversized message", e))?;
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
                let expected = self.last_sequence_of(&subject).await?;
                message = message
                    .expected_last_subject_sequence(expected)
                    .header(SIGNATURE_HEADER, signer.sign(&subject, Some(expected), &payload).as_str());
            }
            let acked = match self.js.send_publish(subject.clone(), message).await {
                Ok(ack) => ack.await,
                Err(e) => return Err(BusError::new("publish", e)),
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
                Err(e) => return Err(BusError::new("publish ack", e)),
            }
        }
    }

    /// The last stream sequence of `subject` (0 if it has none), as this relay last
    /// published it or, the first time, as the stream says.
    async fn last_sequence_of(&self, subject: &str) -> Result<u64, BusError> {
        if let Some(seq) = self.sequences.lock().unwrap_or_else(|e| e.into_inner()).get(subject) {
            return Ok(*seq);
        }
        let state_prefix = subject::state_stream_subjects(&self.dc).concat();
        let stream = if subject.starts_with(state_prefix.trim_end_matches('>')) { &self.state } else { &self.updates };
        let seq = match stream.get_last_raw_message_by_subject(subject).await {
            Ok(message) => message.sequence,
            Err(e) if e.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound => 0,
            Err(e) => return Err(BusError::new("reading a subject's last sequence", e)),
        };
        self.sequences.lock().unwrap_or_else(|e| e.into_inner()).insert(subject.to_owned(), seq);
        Ok(seq)
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
