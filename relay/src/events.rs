//! The commit events: the datacenter's durable consumer of the commit stream, taken in
//! batches, each batch handled by one sync, then acked.
//!
//! An event is acked only after everything it caused is acknowledged by JetStream; a
//! failed sync naks the batch with the backoff's delay, so it comes back. Events for
//! refs the datacenter does not depend on are acked at once, unreadable ones
//! terminated.

use std::collections::BTreeSet;

use async_nats::jetstream::consumer::{pull, PullConsumer};
use async_nats::jetstream::{AckKind, Message};
use confcast_schemas::process::error_chain;
use confcast_schemas::retry::{Backoff, Warnings};
use confcast_schemas::{decode, streams, subject, CommitEvent};
use futures::{FutureExt, StreamExt};
use tokio_util::sync::CancellationToken;

use crate::bus::Bus;
use crate::cause::Cause;
use crate::error::BusError;
use crate::sync::Datacenter;

/// At most this many waiting events are handled together (the consumer's
/// `max_ack_pending` bounds it too).
const BATCH_MAX: usize = 64;

/// The datacenter's durable consumer of commit events, shared by its relays.
pub(crate) async fn consumer(bus: &Bus, dc: &str) -> Result<PullConsumer, BusError> {
    let commits = bus.jetstream().get_stream(subject::COMMITS_STREAM).await.map_err(BusError::CommitStream)?;
    commits
        .get_or_create_consumer(&subject::relay_consumer(dc), streams::relay_consumer(dc))
        .await
        .map_err(BusError::Consumer)
}

/// A commit event the datacenter depends on, with its message (to ack) and stream
/// sequence.
struct Relevant {
    message: Message,
    seq: u64,
    event: CommitEvent,
}

/// Handles the datacenter's commit events until `shutdown`.
pub(crate) async fn handle(
    datacenter: &mut Datacenter,
    consumer: &PullConsumer,
    nats_shown: &str,
    shutdown: &CancellationToken,
) {
    let mut backoff = Backoff::default();
    let mut consuming = Warnings::default();
    let mut syncing = Warnings::default();
    'outer: loop {
        let mut messages = tokio::select! {
            m = consumer.messages() => match m {
                Ok(m) => {
                    consuming.recovered("consuming commit events", nats_shown);
                    m
                }
                Err(e) => {
                    let delay = backoff.next_delay();
                    consuming.warn("consuming commit events", nats_shown, &error_chain(&e), delay);
                    tokio::select! { () = tokio::time::sleep(delay) => continue, () = shutdown.cancelled() => break }
                }
            },
            () = shutdown.cancelled() => break,
        };
        loop {
            let next = tokio::select! { n = messages.next() => n, () = shutdown.cancelled() => break 'outer };
            let first = match next {
                Some(Ok(message)) => message,
                Some(Err(e)) => {
                    consuming.warn("reading commit events", nats_shown, &error_chain(&e), None);
                    continue;
                }
                None => continue 'outer,
            };
            let batch = take_batch(first, &mut messages);
            datacenter.metrics.commit_events.inc_by(batch.len() as u64);
            let relevant = triage(batch, &datacenter.watched).await;
            if !relevant.is_empty() {
                let handled = handle_batch(datacenter, relevant, nats_shown, &mut backoff, &mut syncing);
                handled.await;
            }
        }
    }
}

/// `first` and whatever else is already waiting, up to [`BATCH_MAX`]. Events are
/// triggers: a batch is handled by one fetch of all its refs and one resolution, so a
/// burst of pushes costs the master and the relay about as much as one.
fn take_batch(first: Message, messages: &mut pull::Stream) -> Vec<Message> {
    let mut batch = vec![first];
    while batch.len() < BATCH_MAX {
        match messages.next().now_or_never() {
            Some(Some(Ok(message))) => batch.push(message),
            _ => break,
        }
    }
    batch
}

/// The events of `batch` for refs in `watched`; the others are acked (irrelevant) or
/// terminated (unreadable) at once.
async fn triage(batch: Vec<Message>, watched: &BTreeSet<String>) -> Vec<Relevant> {
    let mut relevant = Vec::new();
    for message in batch {
        let seq = message.info().map(|i| i.stream_sequence).unwrap_or(0);
        match decode::<CommitEvent>(&message.payload) {
            Ok(event) if watched.contains(&event.ref_name) => relevant.push(Relevant { message, seq, event }),
            Ok(_) => {
                let _ = message.ack().await;
            }
            Err(e) => {
                tracing::error!(seq, error = %e, "unreadable commit event, dropping it");
                let _ = message.ack_with(AckKind::Term).await;
            }
        }
    }
    relevant
}

/// Syncs for the relevant events of a batch: acks them when the sync succeeded, naks
/// them with the next backoff delay when it failed.
async fn handle_batch(
    datacenter: &mut Datacenter,
    relevant: Vec<Relevant>,
    nats_shown: &str,
    backoff: &mut Backoff,
    syncing: &mut Warnings,
) {
    let (Some(oldest), Some(newest)) = (relevant.first(), relevant.last()) else { return };
    let cause = Cause::events(oldest.seq, &oldest.event, newest.seq, &newest.event);
    let refs: BTreeSet<String> = relevant.iter().map(|r| r.event.ref_name.clone()).collect();
    match datacenter.sync(&cause, refs).await {
        Ok(()) => {
            *backoff = Backoff::default();
            syncing.recovered("handling commit events", "");
            for Relevant { message, seq, .. } in relevant {
                if let Err(e) = message.double_ack().await {
                    tracing::warn!(seq, error = %e, "ack of commit event failed; it will be redelivered and found done");
                }
            }
        }
        Err(e) => {
            datacenter.metrics.sync_failures.inc();
            let delay = backoff.next_delay();
            let url = e.url(nats_shown, &datacenter.mirror);
            let events = relevant.len();
            let what =
                format!("handling {events} commit event(s) ({cause}, {})", cause.ref_name.as_deref().unwrap_or("-"));
            syncing.warn(&what, &url, &error_chain(&e), delay);
            for Relevant { message, .. } in relevant {
                let _ = message.ack_with(AckKind::Nak(Some(delay))).await;
            }
        }
    }
}
