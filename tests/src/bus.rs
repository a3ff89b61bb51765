//! The bus as a test sees it: reading what the relay and the hosts published (error
//! events, host status reports, the configuration index, the commit stream) as typed
//! values, and publishing what no component would (raw bytes, forged updates).

use std::time::Duration;

use confcast_schemas::{subject, ErrorEvent, HostStatus, Kind};

use crate::poll::wait_for;

/// Runs `f` to completion on a runtime of its own (the tests themselves are synchronous).
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime").block_on(f)
}

/// The latest error event the relay of `dc` published, if any.
pub fn latest_error(nats_url: &str, dc: &str) -> Option<ErrorEvent> {
    block_on(async {
        let client = async_nats::connect(nats_url).await.ok()?;
        let js = async_nats::jetstream::new(client);
        let stream = js.get_stream(subject::updates_stream(dc)).await.ok()?;
        let message = stream.get_last_raw_message_by_subject(&subject::error_subject(dc)).await.ok()?;
        // Error events are small: one that was spilled would be a relay bug.
        assert!(message.headers.get(subject::SPILLED_HEADER).is_none(), "error event was spilled");
        confcast_schemas::decode(&message.payload).ok()
    })
}

/// Waits until the latest error event of `dc` contains every one of `parts`.
pub fn wait_error(nats_url: &str, dc: &str, parts: &[&str]) -> String {
    wait_for(Duration::from_secs(20), &format!("an error event containing {parts:?}"), || {
        latest_error(nats_url, dc).map(|e| e.message).filter(|m| parts.iter().all(|p| m.contains(p)))
    })
}

/// The last status `host` of `dc` reported for service `service`, if any.
pub fn host_status(nats_url: &str, dc: &str, host: &str, service: &str) -> Option<HostStatus> {
    block_on(async {
        let js = async_nats::jetstream::new(async_nats::connect(nats_url).await.ok()?);
        let stream = js.get_stream(subject::status_stream(dc)).await.ok()?;
        let subject = subject::status_subject(dc, host, Kind::Service, service);
        let message = stream.get_last_raw_message_by_subject(&subject).await.ok()?;
        confcast_schemas::decode(&message.payload).ok()
    })
}

/// The rollout state the relay of `dc` last wrote for service `service`, if any.
pub fn rollout_state(nats_url: &str, dc: &str, service: &str) -> Option<confcast_schemas::rollout::RolloutState> {
    block_on(async {
        let js = async_nats::jetstream::new(async_nats::connect(nats_url).await.ok()?);
        let stream = js.get_stream(subject::state_stream(dc)).await.ok()?;
        let subject = subject::rollout_subject(dc, Kind::Service, service);
        let message = stream.get_last_raw_message_by_subject(&subject).await.ok()?;
        confcast_schemas::decode(&message.payload).ok()
    })
}

/// Waits until the rollout state of `service` in `dc` satisfies `want`.
pub fn wait_rollout(
    nats_url: &str,
    dc: &str,
    service: &str,
    what: &str,
    want: impl Fn(&confcast_schemas::rollout::RolloutState) -> bool,
) -> confcast_schemas::rollout::RolloutState {
    wait_for(Duration::from_secs(30), what, || rollout_state(nats_url, dc, service).filter(|s| want(s)))
}

/// The value of a key of the configuration index, if present.
pub fn index_value(nats_url: &str, key: &str) -> Option<String> {
    block_on(async {
        let js = async_nats::jetstream::new(async_nats::connect(nats_url).await.ok()?);
        let kv = js.get_key_value(subject::INDEX_BUCKET).await.ok()?;
        let value = kv.get(key).await.ok()??;
        Some(String::from_utf8_lossy(&value).into_owned())
    })
}

/// How many messages the commit stream holds.
pub fn commit_events(nats_url: &str) -> u64 {
    block_on(async {
        let js = async_nats::jetstream::new(async_nats::connect(nats_url).await.expect("connect"));
        let mut stream = js.get_stream(subject::COMMITS_STREAM).await.expect("commit stream");
        stream.info().await.expect("info").state.messages
    })
}

/// Publishes `payload` on `subject` through JetStream and awaits the ack.
pub fn publish_raw(nats_url: &str, subject: &str, payload: Vec<u8>) {
    block_on(async {
        let client = async_nats::connect(nats_url).await.expect("connect");
        let js = async_nats::jetstream::new(client);
        js.publish(subject.to_owned(), payload.into()).await.expect("publish").await.expect("ack");
    })
}

/// An update for `service0` of `dc1` that no relay published: `to` and `tree` as
/// given, the entries as given (a test forging what the bus could carry).
pub fn forged_update(
    from: Option<String>,
    to: &str,
    tree: &str,
    snapshot: bool,
    entries: Vec<confcast_schemas::Entry>,
) -> confcast_schemas::ServiceUpdate {
    confcast_schemas::ServiceUpdate {
        v: confcast_schemas::WIRE_VERSION,
        dc: "dc1".into(),
        kind: Kind::Service,
        name: "service0".into(),
        ref_name: "refs/heads/services/service0/master".into(),
        branch: "master".into(),
        version: "latest".into(),
        from,
        to: Some(to.to_owned()),
        tree: Some(tree.to_owned()),
        snapshot,
        entries,
        event_seq: 0,
        pushed_at_ms: 0,
        published_at_ms: 0,
        staged: false,
    }
}
