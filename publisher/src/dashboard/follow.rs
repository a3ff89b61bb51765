//! Keeping the cache in step with the bus: per datacenter, the last head, rollout state
//! and host status of every subject, then every new one, and the last error events;
//! datacenters found anew every [`REDISCOVER`]; the state of the connection, for the
//! page's banner. Readers that end or fail (NATS restarted, a stream not created yet)
//! are opened again after [`RETRY`]: the dashboard outlives the bus.

use std::collections::BTreeSet;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull::OrderedConfig, consumer::DeliverPolicy};
use confcast_schemas::rollout::RolloutState;
use confcast_schemas::{decode, subject, ErrorEvent, HostStatus, ServiceHead};
use futures::stream::{BoxStream, StreamExt};

use super::model::DcCache;
use super::App;
use crate::rollout::watch::open_feed;
use crate::rollout::{datacenters_to_follow, WatchError};

/// How often datacenters are looked for anew.
pub(crate) const REDISCOVER: Duration = Duration::from_secs(10);
/// How long after a reader failed it is opened again.
const RETRY: Duration = Duration::from_secs(1);
/// How often the connection's state is looked at.
const BUS_POLL: Duration = Duration::from_millis(250);

/// What a message of a feed is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Carries {
    Heads,
    Rollouts,
    Statuses,
    Errors,
}

type Feed = BoxStream<'static, (Carries, Result<jetstream::Message, jetstream::consumer::pull::OrderedError>)>;

/// Follows the datacenters (`named`, or all found), finding new ones every
/// [`REDISCOVER`], for as long as the process runs.
pub(crate) async fn discover(app: App, client: async_nats::Client, named: Vec<String>, in_domains: bool) {
    let mut followed = BTreeSet::new();
    loop {
        match datacenters_to_follow(&client, &named, in_domains).await {
            Ok(dcs) => {
                for (dc, js) in dcs {
                    if followed.insert(dc.clone()) {
                        app.update(|fleet| fleet.dcs.insert(dc.clone(), DcCache::default()).is_none());
                        tokio::spawn(follow_dc(app.clone(), dc, js));
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "looking for datacenters"),
        }
        tokio::time::sleep(REDISCOVER).await;
    }
}

/// Tells the page whether NATS is reachable, as the client sees it.
pub(crate) async fn watch_connection(app: App, client: async_nats::Client) {
    loop {
        let ok = client.connection_state() == async_nats::connection::State::Connected;
        let mut back = false;
        app.update(|fleet| {
            let was = std::mem::replace(&mut fleet.bus_ok, ok);
            back = ok && !was;
            was != ok
        });
        if back {
            app.reconnected.send_modify(|n| *n += 1);
        }
        tokio::time::sleep(BUS_POLL).await;
    }
}

/// Follows one datacenter for ever, opening its readers again whenever they end.
async fn follow_dc(app: App, dc: String, js: jetstream::Context) {
    loop {
        match follow_once(&app, &dc, &js).await {
            Ok(()) => tracing::debug!(dc = %dc, "the datacenter's readers ended; opening them again"),
            Err(e) => tracing::debug!(dc = %dc, error = %e, "following the datacenter; trying again"),
        }
        tokio::time::sleep(RETRY).await;
    }
}

/// Opens every reader of `dc` and records what they read until one fails or ends, or
/// the connection comes back after a loss. While a stream is missing (no relay or host
/// wrote it yet), returns after [`REDISCOVER`] to look for it again.
async fn follow_once(app: &App, dc: &str, js: &jetstream::Context) -> Result<(), WatchError> {
    let mut reconnected = app.reconnected.subscribe();
    let mut feeds: Vec<Feed> = Vec::new();
    let state = subject::state_stream(dc);
    let status_filter = subject::status_stream_subjects(dc).remove(0);
    let wanted = [
        (state.clone(), subject::heads_wildcard(dc), Carries::Heads),
        (state, subject::rollouts_wildcard(dc), Carries::Rollouts),
        (subject::status_stream(dc), status_filter, Carries::Statuses),
    ];
    for (stream, filter, carries) in wanted {
        if let Some((_, messages)) = open_feed(js, &stream, filter).await? {
            feeds.push(messages.map(move |m| (carries, m)).boxed());
        }
    }
    let after = app.read(|fleet| fleet.dcs.get(dc).and_then(DcCache::last_error));
    if let Some(errors) = open_errors(js, dc, after).await? {
        feeds.push(errors.map(|m| (Carries::Errors, m)).boxed());
    }
    let complete = feeds.len() == 4;
    let mut merged = futures::stream::select_all(feeds);
    let until = tokio::time::Instant::now() + REDISCOVER;
    loop {
        let next = tokio::select! {
            next = merged.next() => next,
            () = tokio::time::sleep_until(until), if !complete => return Ok(()),
            _ = reconnected.changed() => return Ok(()),
        };
        let Some((carries, message)) = next else { return Err(WatchError::Closed) };
        let message = message.map_err(WatchError::Follow)?;
        let sequence = message.info().map(|i| i.stream_sequence).unwrap_or(0);
        app.update(|fleet| {
            let cache = fleet.dcs.entry(dc.to_owned()).or_default();
            record(cache, dc, carries, sequence, &message.payload)
        });
    }
}

/// Opens the reader of the datacenter's error events (kept in its update stream): the
/// last [`super::model::ERRORS_KEPT`] at first, then from where the last one read stopped.
async fn open_errors(
    js: &jetstream::Context,
    dc: &str,
    after: Option<u64>,
) -> Result<Option<jetstream::consumer::pull::Ordered>, WatchError> {
    let name = subject::updates_stream(dc);
    let stream = match js.get_stream(&name).await {
        Ok(stream) => stream,
        Err(e) if confcast_schemas::streams::is_missing(&e) => return Ok(None),
        Err(source) => return Err(WatchError::OpenStream { stream: name, source }),
    };
    let deliver_policy = match after {
        Some(sequence) => DeliverPolicy::ByStartSequence { start_sequence: sequence + 1 },
        None => DeliverPolicy::All,
    };
    let config = OrderedConfig { filter_subject: subject::error_subject(dc), deliver_policy, ..Default::default() };
    let consumer = stream
        .create_consumer(config)
        .await
        .map_err(|source| WatchError::CreateReader { stream: name.clone(), source })?;
    let messages = consumer.messages().await.map_err(|source| WatchError::StartReader { stream: name, source })?;
    Ok(Some(messages))
}

/// Records one message in the datacenter's cache; whether anything changed (a report
/// repeated unchanged, or a message read again after a reconnection, changes nothing).
fn record(cache: &mut DcCache, dc: &str, carries: Carries, sequence: u64, payload: &[u8]) -> bool {
    let seen = &mut cache.seen;
    let changed = match carries {
        Carries::Heads => decoded::<ServiceHead>(dc, payload).is_some_and(|head| {
            let changed = seen.heads.get(&head.service()) != Some(&head);
            seen.head(head);
            changed
        }),
        Carries::Rollouts => decoded::<RolloutState>(dc, payload).is_some_and(|state| {
            let changed = seen.rollouts.get(&state.service()) != Some(&state);
            seen.rollout(state);
            changed
        }),
        Carries::Statuses => decoded::<HostStatus>(dc, payload).is_some_and(|status| {
            let changed = seen.hosts.get(&status.service()).and_then(|h| h.get(&status.host)) != Some(&status);
            seen.status(status);
            changed
        }),
        Carries::Errors => decoded::<ErrorEvent>(dc, payload).is_some_and(|event| cache.error(sequence, event)),
    };
    if changed && carries == Carries::Rollouts {
        cache.note_wave_starts();
    }
    changed
}

/// A message decoded, or `None` (said at debug level) when it cannot be read.
fn decoded<T: serde::de::DeserializeOwned + confcast_schemas::message::Versioned>(
    dc: &str,
    payload: &[u8],
) -> Option<T> {
    decode::<T>(payload).map_err(|e| tracing::debug!(dc = %dc, error = %e, "ignoring an unreadable message")).ok()
}

#[cfg(test)]
mod tests {
    use super::super::model::ERRORS_KEPT;
    use super::*;
    use confcast_schemas::{encode, Kind, WIRE_VERSION};

    fn error(at_ms: u64) -> Vec<u8> {
        let event = ErrorEvent {
            v: WIRE_VERSION,
            dc: "dc1".into(),
            ref_name: Some("services/web/master".into()),
            commit: None,
            message: format!("bad document {at_ms}"),
            at_ms,
        };
        encode(&event)
    }

    #[test]
    fn a_message_read_again_changes_nothing_and_errors_keep_the_last_fifty() {
        let mut cache = DcCache::default();
        let status = HostStatus {
            v: WIRE_VERSION,
            dc: "dc1".into(),
            host: "h1".into(),
            kind: Kind::Service,
            name: "web".into(),
            commit: Some("a".repeat(40)),
            ok: true,
            error: None,
            exec_status: None,
            at_ms: 5,
            health: None,
        };
        assert!(record(&mut cache, "dc1", Carries::Statuses, 1, &encode(&status)));
        assert!(!record(&mut cache, "dc1", Carries::Statuses, 1, &encode(&status)));
        assert!(!record(&mut cache, "dc1", Carries::Heads, 2, b"not msgpack"));
        for sequence in 1..=60 {
            assert!(record(&mut cache, "dc1", Carries::Errors, sequence, &error(sequence)));
        }
        assert!(!record(&mut cache, "dc1", Carries::Errors, 60, &error(60)), "seen already");
        assert_eq!(cache.errors.len(), ERRORS_KEPT);
        assert_eq!(cache.last_error(), Some(60));
        assert_eq!(cache.errors.front().map(|(s, _)| *s), Some(11));
    }
}
