//! The commit stream: connecting, creating the stream, publishing one event.

use std::time::Duration;

use async_nats::jetstream::{self, message::PublishMessage, stream};
use confcast_schemas::connect::NatsAuth;
use confcast_schemas::{encode, subject, CommitEvent};

/// How long JetStream remembers a dedup id. Long enough to cover a hook retried after a
/// lost ack and a spool drained within minutes; relays are idempotent beyond it.
pub const DEDUP_WINDOW: Duration = Duration::from_secs(10 * 60);
/// How long commit events are kept: a relay that was down for longer than this must be
/// re-seeded with `publisher backfill`.
pub const COMMITS_MAX_AGE: Duration = Duration::from_secs(30 * 24 * 3600);

/// Failures talking to the bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The server could not be reached.
    #[error("cannot connect to NATS at {url}: {reason}")]
    Connect {
        /// The URL tried (credentials redacted).
        url: String,
        /// Why.
        reason: String,
    },
    /// The commit stream could not be created or looked up.
    #[error("commit stream unavailable: {0}")]
    Stream(String),
    /// A publish was refused or not acknowledged.
    #[error("publish failed: {0}")]
    Publish(String),
}

impl BusError {
    /// Every bus failure is worth retrying later; none is the event's fault.
    pub fn is_transient(&self) -> bool {
        true
    }
}

/// Connects with a bounded wait and without background reconnect attempts at start.
/// `url` may list several servers of one cluster, separated by commas; any of them will do.
pub async fn connect(url: &str, auth: &NatsAuth, timeout: Duration) -> Result<async_nats::Client, BusError> {
    let failed = |reason: String| BusError::Connect { url: confcast_schemas::connect::redact_url(url), reason };
    let servers = confcast_schemas::connect::servers(url).map_err(|e| failed(e.to_string()))?;
    let options = auth.apply(async_nats::ConnectOptions::new()).await.map_err(|e| failed(e.to_string()))?;
    options
        .connection_timeout(timeout)
        .name("confcast-publisher")
        .connect(servers)
        .await
        .map_err(|e| failed(e.to_string()))
}

/// The commit stream's configuration (see RELIABILITY.md), with `replicas` copies
/// (3 on the master's NATS cluster).
pub fn commit_stream_config(replicas: usize) -> stream::Config {
    stream::Config {
        name: subject::COMMITS_STREAM.to_owned(),
        subjects: vec![subject::commits_wildcard()],
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::Limits,
        discard: stream::DiscardPolicy::Old,
        duplicate_window: DEDUP_WINDOW,
        max_age: COMMITS_MAX_AGE,
        num_replicas: replicas.max(1),
        ..Default::default()
    }
}

/// Creates the commit stream if it does not exist (an existing one is left as it is).
pub async fn ensure_commit_stream(js: &jetstream::Context, replicas: usize) -> Result<(), BusError> {
    js.get_or_create_stream(commit_stream_config(replicas)).await.map_err(|e| BusError::Stream(e.to_string()))?;
    Ok(())
}

/// Publishes one event and awaits its ack; returns whether JetStream already had it.
/// When nothing stores the commit subjects yet, creates the commit stream with
/// `replicas` copies and publishes again: the stream is looked up only when it is
/// missing, not before every push.
pub async fn publish_event(js: &jetstream::Context, event: &CommitEvent, replicas: usize) -> Result<bool, BusError> {
    let publish = || async {
        let message = PublishMessage::build().payload(encode(event).into()).message_id(event.dedup_id());
        js.send_publish(subject::commit_subject(&event.ref_name), message)
            .await
            .map_err(|e| BusError::Publish(e.to_string()))?
            .await
            .map_err(|e| match e.kind() {
                jetstream::context::PublishErrorKind::StreamNotFound => BusError::Stream(e.to_string()),
                _ => BusError::Publish(e.to_string()),
            })
    };
    let ack = match publish().await {
        Err(BusError::Stream(_)) => {
            ensure_commit_stream(js, replicas).await?;
            publish().await?
        }
        other => other?,
    };
    Ok(ack.duplicate)
}
