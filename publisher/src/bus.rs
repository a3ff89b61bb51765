//! The commit stream: connecting, creating the stream, publishing one event.

use std::time::Duration;

use async_nats::jetstream::{self, context::PublishErrorKind, message::PublishMessage};
use confcast_schemas::connect::{connect_once, ConnectError, Identity};
use confcast_schemas::{encode, streams, subject, CommitEvent};

use crate::settings::BusTarget;

/// Failures talking to the bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The server could not be reached, or the credentials cannot be used.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The commit stream could not be created or looked up.
    #[error("commit stream unavailable")]
    Stream(#[source] jetstream::context::CreateStreamError),
    /// Creating the commit stream took longer than the command may wait.
    #[error("creating the commit stream timed out")]
    StreamTimedOut,
    /// A publish was refused or not acknowledged.
    #[error("publish failed")]
    Publish(#[source] jetstream::context::PublishError),
}

/// How the publisher shows itself to the NATS server.
fn identity() -> Identity {
    Identity::named("confcast-publisher")
}

/// Connects with a bounded wait and without background reconnect attempts at start.
/// `url` may list several servers of one cluster, separated by commas; any of them will do.
pub async fn connect(
    url: &str,
    auth: &confcast_schemas::connect::NatsAuth,
    timeout: Duration,
) -> Result<async_nats::Client, ConnectError> {
    connect_once(url, auth, &identity(), timeout).await
}

/// Connects to `bus` and makes sure its commit stream exists, each within `timeout`:
/// what `publisher drain` and `publisher backfill` publish through.
pub async fn open(bus: &BusTarget, timeout: Duration) -> Result<jetstream::Context, BusError> {
    let js = jetstream::new(connect(&bus.nats_url, &bus.auth, timeout).await?);
    tokio::time::timeout(timeout, ensure_commit_stream(&js, bus.replicas))
        .await
        .map_err(|_| BusError::StreamTimedOut)??;
    Ok(js)
}

/// Creates the commit stream if it does not exist (an existing one is left as it is).
pub async fn ensure_commit_stream(js: &jetstream::Context, replicas: usize) -> Result<(), BusError> {
    js.get_or_create_stream(streams::commits(replicas)).await.map_err(BusError::Stream)?;
    Ok(())
}

/// Publishes one event and awaits its ack; returns whether JetStream already had it.
/// When nothing stores the commit subjects yet, creates the commit stream with
/// `replicas` copies and publishes again: the stream is looked up only when it is
/// missing, not before every push.
pub async fn publish_event(js: &jetstream::Context, event: &CommitEvent, replicas: usize) -> Result<bool, BusError> {
    let publish = || async {
        let message = PublishMessage::build().payload(encode(event).into()).message_id(event.dedup_id());
        js.send_publish(subject::commit_subject(&event.ref_name), message).await?.await
    };
    let ack = match publish().await {
        Err(e) if e.kind() == PublishErrorKind::StreamNotFound => {
            ensure_commit_stream(js, replicas).await?;
            publish().await.map_err(BusError::Publish)?
        }
        other => other.map_err(BusError::Publish)?,
    };
    Ok(ack.duplicate)
}
