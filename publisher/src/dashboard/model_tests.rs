//! The cache's views: host counts and host rows from heads, statuses and rollout
//! states, as `publisher status` computes them. [`fleet`] is the fixture the page's
//! tests draw too.

use std::collections::BTreeMap;

use confcast_schemas::message::{CommitAbout, Health, HealthState};
use confcast_schemas::rollout::{Phase, Policy, RolloutState, Wave};
use confcast_schemas::{ErrorEvent, HostStatus, Kind, ServiceHead, WIRE_VERSION};

use super::*;

pub(crate) const A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
pub(crate) const B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
/// What a hostile pusher writes where the page shows text.
pub(crate) const SCRIPT: &str = "<script>alert(1)</script>";

fn head(kind: Kind, name: &str, commit: &str, subject: &str) -> ServiceHead {
    ServiceHead {
        v: WIRE_VERSION,
        kind,
        name: name.into(),
        ref_name: format!("services/{name}/master"),
        branch: "master".into(),
        version: "latest".into(),
        commit: Some(commit.into()),
        tree: None,
        about: Some(CommitAbout {
            subject: subject.into(),
            author: "Ann <ann@example.com>".into(),
            authored_ms: 1_000,
            pushed_ms: 2_000,
        }),
    }
}

fn status(host: &str, commit: &str, ok: bool, exec_status: Option<i32>, at_ms: u64) -> HostStatus {
    HostStatus {
        v: WIRE_VERSION,
        dc: "dc1".into(),
        host: host.into(),
        kind: Kind::Service,
        name: "web".into(),
        commit: Some(commit.into()),
        ok,
        error: (!ok).then(|| "--exec exited with exit status: 1".to_owned()),
        exec_status,
        at_ms,
        health: None,
    }
}

/// dc1: service `web` rolling B out in waves, wave 0 of [h1 h3 h4 h6], [h2]: h1 done,
/// h2 held, h3 failed (exec 1), h4 reverted, h6 pending; application `evil` whose
/// subject is a script; an error event whose message is one too.
pub(crate) fn fleet() -> Fleet {
    let mut cache = DcCache::default();
    cache.seen.head(head(Kind::Service, "web", B, "Raise the pool size"));
    cache.seen.head(head(Kind::Application, "evil", A, SCRIPT));
    let mut reverted = status("h4", A, true, Some(0), 4_000);
    reverted.health =
        Some(Health { at_ms: 4_000, reason: Some("health: exited 3".into()), state: HealthState::Reverted });
    for s in [
        status("h1", B, true, Some(0), 3_000),
        status("h2", A, true, None, 500),
        status("h3", B, false, Some(1), 3_500),
        reverted,
        status("h6", A, true, None, 600),
    ] {
        cache.seen.status(s);
    }
    cache.seen.rollout(RolloutState {
        v: WIRE_VERSION,
        dc: "dc1".into(),
        kind: Kind::Service,
        name: "web".into(),
        ref_name: "services/web/master".into(),
        commit: B.into(),
        tree: None,
        previous: Some(A.into()),
        previous_tree: None,
        policy: Policy {
            waves: vec![Wave::Hosts(4), Wave::Percent("100%".into())],
            bake_secs: 30,
            max_unhealthy: 0,
            report_timeout_secs: 60,
        },
        waves: vec![vec!["h1".into(), "h3".into(), "h4".into(), "h6".into()], vec!["h2".into()]],
        wave: 0,
        wave_started_ms: 2_500,
        healthy_since_ms: None,
        phase: Phase::Rolling,
        started: true,
        reason: None,
        unhealthy: BTreeMap::new(),
        started_ms: 2_500,
        updated_ms: 3_000,
    });
    cache.note_wave_starts();
    let error = ErrorEvent {
        v: WIRE_VERSION,
        dc: "dc1".into(),
        ref_name: Some("services/<b>web</b>/master".into()),
        commit: Some(A.into()),
        message: format!("datacenter.json: {SCRIPT}"),
        at_ms: 5_000,
    };
    cache.error(7, error);
    Fleet { generation: 42, bus_ok: true, dcs: BTreeMap::from([("dc1".to_owned(), cache)]) }
}

#[test]
fn hosts_are_counted_as_status_computes_their_states() {
    let views = fleet().datacenters(None);
    assert_eq!(views.len(), 1);
    let names: Vec<&str> = views[0].services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["web", "evil"], "by kind, then name");
    let web = &views[0].services[0];
    assert_eq!(web.hosts, HostCounts { at: 1, pending: 1, held: 1, reverted: 1, failed: 1 });
    assert_eq!(web.commit, B);
    assert_eq!(web.subject.as_deref(), Some("Raise the pool size"));
    assert_eq!(web.pushed_ms, Some(2_000));
    let rollout = web.rollout.as_ref().expect("web rolls out in waves");
    assert_eq!((rollout.phase.as_str(), rollout.wave, rollout.waves.len()), ("rolling", 0, 2));
    let timeline = web.timeline.as_ref().expect("a timeline for a rollout");
    assert_eq!(timeline.arrivals, vec![3_000], "only h1 is at B with a good status");
    assert_eq!(timeline.wave_starts, vec![2_500]);
    assert!(views[0].services[1].rollout.is_none());
    assert!(fleet().datacenters(Some("dc2")).is_empty());
}

#[test]
fn a_service_lists_each_host_with_its_state_commit_exit_status_and_reason() {
    let detail = fleet().service("dc1", "service", "web").expect("web in dc1");
    let rows: Vec<(&str, &str, Option<i32>, Option<&str>)> =
        detail.hosts.iter().map(|h| (h.host.as_str(), h.state.as_str(), h.exec_status, h.reason.as_deref())).collect();
    assert_eq!(
        rows,
        [
            ("h1", "done", Some(0), None),
            ("h2", "held", None, None),
            ("h3", "failed", Some(1), Some("exec exited 1")),
            ("h4", "reverted", Some(0), Some("health: exited 3")),
            ("h6", "pending", None, None),
        ]
    );
    assert_eq!(detail.hosts[1].commit.as_deref(), Some(A));
    assert!(fleet().service("dc1", "application", "web").is_none(), "web is a service");
    assert!(fleet().service("dc1", "gadget", "web").is_none(), "no such kind");
    assert!(fleet().service("dc9", "service", "web").is_none());
}

#[test]
fn errors_come_newest_first() {
    let mut fleet = fleet();
    let later = ErrorEvent {
        v: WIRE_VERSION,
        dc: "dc2".into(),
        ref_name: None,
        commit: None,
        message: "unknown pin".into(),
        at_ms: 9_000,
    };
    fleet.dcs.entry("dc2".into()).or_default().error(1, later);
    let errors = fleet.errors();
    let order: Vec<(&str, u64)> = errors.iter().map(|e| (e.dc.as_str(), e.at_ms)).collect();
    assert_eq!(order, [("dc2", 9_000), ("dc1", 5_000)]);
}
