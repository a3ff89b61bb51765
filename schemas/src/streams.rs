//! Every stream, consumer and bucket confcast creates, with its configuration: the bus
//! topology in one place (RELIABILITY.md tells why each limit is what it is).
//!
//! | what | name | written by | read by |
//! |---|---|---|---|
//! | commit stream | `CONFCAST_COMMITS` | post-receive hook, `publisher` | relays (durable consumer per datacenter) |
//! | commit mirror | `CONFCAST_COMMITS` in a leaf's domain | the leaf's server | that datacenter's relays |
//! | update stream | `CONFCAST_DC_<dc>` | the datacenter's relay | hosts |
//! | state stream | `CONFCAST_STATE_<dc>` | the relay | hosts, `publisher status` |
//! | status stream | `CONFCAST_STATUS_<dc>` | hosts (core publishes it captures) | `publisher status` |
//! | blob store | object store per datacenter | the relay | hosts |
//! | exec slots | K/V per datacenter | hosts (`--max-parallel`) | hosts |
//! | index | `confcast-index` K/V | relays | operators, Consul mirror |
//! | leases | `confcast-leases` K/V | relays | relays |
//!
//! Every function returns the configuration with one replica; callers that run on a
//! NATS cluster set `num_replicas` (or pass `replicas`) themselves.

use std::time::Duration;

use async_nats::jetstream::context::{GetStreamError, GetStreamErrorKind};
use async_nats::jetstream::{consumer, kv, object_store, stream, ErrorCode};

use crate::subject;

/// How long JetStream remembers a dedup id. Long enough to cover a hook retried after a
/// lost ack, a spool drained within minutes, and a relay restarted mid-publish.
pub const DEDUP_WINDOW: Duration = Duration::from_secs(10 * 60);
/// How long commit events are kept: a relay that was down for longer than this must be
/// re-seeded with `publisher backfill`.
pub const COMMITS_MAX_AGE: Duration = Duration::from_secs(30 * 24 * 3600);
/// Updates kept per service; a host further behind resyncs from the snapshot.
pub const UPDATES_PER_SERVICE: i64 = 1000;
/// How long a host's last report is kept: hosts report again at start and every
/// [`crate::message::STATUS_REFRESH`], so only hosts gone for good age out.
pub const STATUS_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
/// The bucket of the relays' leases, one key per datacenter.
pub const LEASES_BUCKET: &str = "confcast-leases";
/// How long a relay has to acknowledge a commit event before it is redelivered.
pub const RELAY_ACK_WAIT: Duration = Duration::from_secs(120);

/// The commit stream of the master's JetStream, with `replicas` copies (3 on the
/// master's NATS cluster).
pub fn commits(replicas: usize) -> stream::Config {
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

/// A datacenter's copy of the commit stream of the master's JetStream domain.
///
/// A leaf node keeps its own JetStream domain, and hosts and relays only ever talk to
/// it. The mirror is kept by the datacenter's server itself: while the leaf link is
/// down the relay has nothing new to read, and when it returns the mirror catches up
/// from where it stopped, so the relay's durable consumer sees every event exactly as
/// it would on the master's stream. Same name as the master's stream: a relay reads
/// one or the other, never both.
pub fn commits_mirror(domain: &str, replicas: usize) -> stream::Config {
    let master = commits(replicas);
    stream::Config {
        name: master.name.clone(),
        description: Some(format!("confcast: mirror of {} in JetStream domain {domain}", master.name)),
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::Limits,
        discard: stream::DiscardPolicy::Old,
        max_age: master.max_age,
        num_replicas: master.num_replicas,
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

/// The update stream of a datacenter: per-service updates and snapshots.
pub fn updates(dc: &str) -> stream::Config {
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

/// The state stream of a datacenter: heads, inventory, errors; one message per subject.
pub fn state(dc: &str) -> stream::Config {
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

/// The status stream of a datacenter: the latest report of each host per service,
/// captured from the hosts' core NATS publishes.
pub fn status(dc: &str) -> stream::Config {
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

/// The blob store of a datacenter: file contents by git blob id, and messages larger
/// than the server's `max_payload`.
pub fn blobs(dc: &str) -> object_store::Config {
    object_store::Config {
        bucket: subject::blobs_bucket(dc),
        description: Some("confcast: file contents by git blob id, oversized messages".to_owned()),
        storage: stream::StorageType::File,
        ..Default::default()
    }
}

/// The hosts' exec slots bucket: one key per host running its exec for a change,
/// forgotten after 5 minutes if the host died holding it.
pub fn exec_slots(dc: &str) -> kv::Config {
    kv::Config {
        bucket: subject::exec_slots_bucket(dc),
        description: "confcast: hosts running their exec for a change (subscriber --max-parallel)".to_owned(),
        history: 1,
        max_age: Duration::from_secs(300),
        storage: stream::StorageType::File,
        ..Default::default()
    }
}

/// The index every relay writes: `configurations/<kind>s/<name>/<version>` =
/// `<branch>/<commit>`.
pub fn index() -> kv::Config {
    kv::Config {
        bucket: subject::INDEX_BUCKET.to_owned(),
        description: "confcast: configurations/<kind>s/<name>/<version> = <branch>/<commit>".to_owned(),
        history: 5,
        storage: stream::StorageType::File,
        ..Default::default()
    }
}

/// The relays' leases: a key per datacenter that expires `ttl` after its holder last
/// renewed it.
pub fn leases(ttl: Duration) -> kv::Config {
    kv::Config {
        bucket: LEASES_BUCKET.to_owned(),
        description: "confcast: which relay handles each datacenter".to_owned(),
        max_age: ttl,
        history: 1,
        storage: stream::StorageType::File,
        ..Default::default()
    }
}

/// The durable consumer of commit events that the relays of `dc` share.
pub fn relay_consumer(dc: &str) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(subject::relay_consumer(dc)),
        description: Some(format!("confcast relay of datacenter {dc}")),
        filter_subject: subject::commits_wildcard(),
        deliver_policy: consumer::DeliverPolicy::New,
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: RELAY_ACK_WAIT,
        // Events are triggers (each handled by re-resolving the datacenter), so their
        // order does not matter: several may be pending, so that one held by a relay
        // that was killed does not block the others until ack_wait.
        max_ack_pending: 64,
        ..Default::default()
    }
}

/// A short-lived reader of the last message of every subject matching `filter`: how
/// heads, statuses and inventories are loaded.
pub fn last_per_subject(filter: impl Into<String>) -> consumer::pull::OrderedConfig {
    consumer::pull::OrderedConfig {
        filter_subject: filter.into(),
        deliver_policy: consumer::DeliverPolicy::LastPerSubject,
        ..Default::default()
    }
}

/// Whether looking a stream up failed because it does not exist (not because the
/// server could not be asked).
pub fn is_missing(error: &GetStreamError) -> bool {
    matches!(error.kind(), GetStreamErrorKind::JetStream(e) if e.error_code() == ErrorCode::STREAM_NOT_FOUND)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mirror_keeps_what_the_master_keeps() {
        let mirror = commits_mirror("hub", 3);
        assert_eq!(mirror.name, subject::COMMITS_STREAM);
        assert_eq!(mirror.max_age, COMMITS_MAX_AGE);
        assert_eq!(mirror.num_replicas, 3);
        let source = mirror.mirror.expect("a mirror");
        assert_eq!(source.external.expect("external").api_prefix, "$JS.hub.API");
    }

    #[test]
    fn per_datacenter_names_come_from_the_subject_module() {
        assert_eq!(updates("dc1").name, subject::updates_stream("dc1"));
        assert_eq!(state("dc1").max_messages_per_subject, 1);
        assert_eq!(status("dc1").max_age, STATUS_MAX_AGE);
        assert_eq!(relay_consumer("dc1").durable_name.as_deref(), Some(subject::relay_consumer("dc1").as_str()));
    }
}
