//! The rollout computed from heads and host reports, and its summary lines.

use std::collections::BTreeMap;

use confcast_schemas::message::{Health, HealthState};
use confcast_schemas::rollout::{Phase, Policy, RolloutState, Wave};
use confcast_schemas::{HostStatus, Kind, ServiceHead, WIRE_VERSION};

use super::progress::host_state;
use super::*;

const A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
const C: &str = "cccccccccccccccccccccccccccccccccccccccc";
const REF: &str = "refs/heads/services/service0/master";

fn head(name: &str, ref_name: &str, commit: &str) -> ServiceHead {
    ServiceHead {
        v: WIRE_VERSION,
        kind: Kind::Service,
        name: name.into(),
        ref_name: ref_name.into(),
        branch: "master".into(),
        version: "latest".into(),
        commit: Some(commit.into()),
        tree: None,
        about: None,
    }
}

fn status(host: &str, name: &str, commit: &str, error: Option<&str>, exec: Option<i32>) -> HostStatus {
    HostStatus {
        v: WIRE_VERSION,
        dc: "dc".into(),
        host: host.into(),
        kind: Kind::Service,
        name: name.into(),
        commit: Some(commit.into()),
        ok: error.is_none(),
        error: error.map(Into::into),
        exec_status: exec,
        at_ms: 1,
        health: None,
    }
}

fn dc(heads: Vec<ServiceHead>, statuses: Vec<HostStatus>) -> Observed {
    let mut seen = Observed::default();
    heads.into_iter().for_each(|h| seen.head(h));
    statuses.into_iter().for_each(|s| seen.status(s));
    seen
}

#[test]
fn counts_done_failed_and_pending_hosts() {
    let observed = BTreeMap::from([(
        "dc1".to_owned(),
        dc(
            vec![head("service0", REF, B), head("other", "refs/heads/services/other/master", C)],
            vec![
                status("host-a", "service0", B, None, Some(0)),
                status("host-b", "service0", A, None, None),
                status("host-c", "service0", B, Some("--exec exited with exit status: 1"), None),
                status("host-d", "other", C, None, None),
            ],
        ),
    )]);
    let rollout = progress(&[Target::Ref("services/service0/master".into())], &observed);
    let dc1 = &rollout.dcs[0];
    assert_eq!((dc1.done(), dc1.total()), (1, 3), "host-d runs another service");
    assert_eq!(rollout.verdict(), Verdict::InProgress);
    assert_eq!(rollout.counts(), (1, 1));
    assert_eq!(
        dc1.line("services/service0/master"),
        "dc1: 1/3 at bbbbbbb (1 failed: host-c exec exited 1; 1 pending: host-b at aaaaaaa)"
    );
}

#[test]
fn complete_when_every_host_is_there_and_ok() {
    let observed = BTreeMap::from([
        ("dc1".to_owned(), dc(vec![head("service0", REF, B)], vec![status("h1", "service0", B, None, Some(0))])),
        ("dc2".to_owned(), dc(vec![head("web", "refs/heads/services/web/master", C)], vec![])),
    ]);
    let rollout = progress(&[Target::Commit("bbbbbbb".into())], &observed);
    assert_eq!(rollout.verdict(), Verdict::Complete, "dc2 runs nothing at the commit");
    assert_eq!(rollout.lines("bbbbbbb"), vec!["dc1: 1/1 at bbbbbbb", "dc2: nothing follows bbbbbbb"]);
}

#[test]
fn a_commit_not_yet_published_by_one_relay_is_pending_there() {
    let observed = BTreeMap::from([
        ("dc1".to_owned(), dc(vec![head("service0", REF, B)], vec![status("h1", "service0", B, None, None)])),
        ("dc2".to_owned(), dc(vec![head("service0", REF, A)], vec![status("h2", "service0", A, None, None)])),
    ]);
    let rollout = progress(&[Target::Commit(B[..10].into())], &observed);
    assert_eq!(rollout.verdict(), Verdict::InProgress);
    assert_eq!(
        rollout.dcs[1].line("x"),
        "dc2: 0/1 at bbbbbbb (relay has service service0 at aaaaaaa; 1 pending: h2 at aaaaaaa)"
    );
    assert!(!rollout.dcs[1].complete());
}

#[test]
fn a_pushed_ref_waits_for_its_relay_then_follows_a_later_push() {
    let pushed = Target::RefAt { ref_name: REF.into(), commit: B.into(), old: Some(A.into()) };
    let before = BTreeMap::from([(
        "dc1".to_owned(),
        dc(vec![head("service0", REF, A)], vec![status("h1", "service0", A, None, None)]),
    )]);
    let rollout = progress(std::slice::from_ref(&pushed), &before);
    assert_eq!(rollout.dcs[0].services[0].commit, B, "the relay has not published the push yet");
    assert_eq!(rollout.verdict(), Verdict::InProgress);

    let overtaken = BTreeMap::from([(
        "dc1".to_owned(),
        dc(vec![head("service0", REF, C)], vec![status("h1", "service0", C, None, None)]),
    )]);
    assert_eq!(progress(std::slice::from_ref(&pushed), &overtaken).verdict(), Verdict::Complete);

    let elsewhere = Target::RefAt { ref_name: "refs/heads/datacenters/dc1".into(), commit: B.into(), old: None };
    assert_eq!(progress(&[elsewhere], &before).verdict(), Verdict::NothingAffected);
}

#[test]
fn a_commit_last_pushed_to_a_followed_ref_is_on_its_way_and_any_other_concerns_nobody() {
    let observed = BTreeMap::from([(
        "dc1".to_owned(),
        dc(vec![head("service0", REF, A)], vec![status("h1", "service0", A, None, None)]),
    )]);
    let pushed = Pushed { heads: BTreeMap::from([(REF.to_owned(), B.to_owned())]), known: true };
    let rollout = progress_pushed(&[Target::Commit(B[..7].into())], &observed, &pushed);
    assert_eq!(rollout.verdict(), Verdict::InProgress, "the relay has not published it yet");
    assert_eq!(rollout.dcs[0].services[0].relay_at.as_deref(), Some(A));
    assert_eq!(pushed.refs_at("bbbbbbb").count(), 1);

    let unknown = progress_pushed(&[Target::Commit("deadbeef".into())], &observed, &pushed);
    assert_eq!(unknown.verdict(), Verdict::NothingAffected);
    assert_eq!(pushed.refs_at("deadbeef").count(), 0, "nobody pushed it");

    let elsewhere =
        Pushed { heads: BTreeMap::from([("refs/heads/services/x/m".to_owned(), C.to_owned())]), known: true };
    let unfollowed = progress_pushed(&[Target::Commit(C.into())], &observed, &elsewhere);
    assert_eq!(unfollowed.verdict(), Verdict::NothingAffected, "pushed to a ref no datacenter follows");
}

#[test]
fn a_service_without_reporting_hosts_does_not_hold_the_rollout() {
    let observed = BTreeMap::from([("dc1".to_owned(), dc(vec![head("service0", REF, B)], vec![]))]);
    let rollout = progress(&[Target::Ref(REF.into())], &observed);
    assert_eq!(rollout.verdict(), Verdict::Complete);
    assert_eq!(rollout.lines(REF), vec!["dc1: 0/0 at bbbbbbb (no host reports status for service service0)"]);
}

#[test]
fn failures_say_why_and_long_lists_are_cut() {
    let mut statuses: Vec<HostStatus> =
        (0..7).map(|i| status(&format!("h{i}"), "service0", B, Some("integrity: x changed"), None)).collect();
    statuses.push(status("h9", "service0", A, Some("tree mismatch"), Some(3)));
    let observed = BTreeMap::from([("dc1".to_owned(), dc(vec![head("service0", REF, B)], statuses))]);
    let line = progress(&[Target::Ref(REF.into())], &observed).lines(REF).remove(0);
    assert_eq!(
        line,
        "dc1: 0/8 at bbbbbbb (8 failed: h0 integrity: x changed, h1 integrity: x changed, h2 integrity: x changed, \
         h3 integrity: x changed, h4 integrity: x changed, ...)"
    );
    let h9 = status("h9", "service0", A, Some("tree mismatch"), Some(3));
    assert_eq!(host_state(&h9, B), HostState::Failed { at: Some(A.into()), reason: "exec exited 3".into() });
}

#[test]
fn a_host_its_health_command_judged_unhealthy_is_failed_with_the_first_line_of_why() {
    let mut sick = status("h1", "service0", B, None, Some(0));
    sick.health = Some(Health {
        at_ms: 1,
        reason: Some("--health-cmd exited with exit status: 2; output:\nconnection refused\n".into()),
        state: HealthState::Unhealthy,
    });
    assert_eq!(
        host_state(&sick, B),
        HostState::Failed { at: None, reason: "unhealthy: --health-cmd exited with exit status: 2; output:".into() }
    );
    let mut well = sick.clone();
    well.health = Some(Health { at_ms: 1, reason: None, state: HealthState::Healthy });
    assert_eq!(host_state(&well, B), HostState::Done);
    // A host not at the target yet is pending whatever its health at its own commit.
    assert_eq!(host_state(&sick, C), HostState::Pending { at: Some(B.into()) });
}

fn rollout_state(phase: Phase, wave: usize) -> RolloutState {
    RolloutState {
        v: WIRE_VERSION,
        dc: "dc1".into(),
        kind: Kind::Service,
        name: "service0".into(),
        ref_name: REF.into(),
        commit: B.into(),
        tree: None,
        previous: Some(A.into()),
        previous_tree: None,
        policy: two_waves(),
        waves: vec![vec!["h3".into()], vec!["h1".into(), "h2".into()]],
        wave,
        wave_started_ms: 1_000,
        healthy_since_ms: Some(10_000),
        phase,
        started: true,
        reason: None,
        unhealthy: BTreeMap::new(),
        started_ms: 1_000,
        updated_ms: 10_000,
    }
}

/// Two waves (the canary, then the rest) with a 30 s bake.
fn two_waves() -> Policy {
    Policy {
        waves: vec![Wave::Hosts(1), Wave::Percent("100%".into())],
        bake_secs: 30,
        max_unhealthy: 0,
        report_timeout_secs: 60,
    }
}

/// dc1 running service0 on h1, h2 (at A) and h3 (at B), with `state` for B.
fn rolling(state: RolloutState) -> BTreeMap<String, Observed> {
    let mut seen = dc(
        vec![head("service0", REF, B)],
        vec![
            status("h1", "service0", A, None, None),
            status("h2", "service0", A, Some("held for its wave"), None),
            status("h3", "service0", B, None, Some(0)),
        ],
    );
    seen.rollout(state);
    BTreeMap::from([("dc1".to_owned(), seen)])
}

#[test]
fn hosts_outside_the_released_waves_are_held_and_the_line_names_the_wave_and_bake() {
    let rollout = progress(&[Target::Ref(REF.into())], &rolling(rollout_state(Phase::Rolling, 0)));
    let dc1 = &rollout.dcs[0];
    assert_eq!(dc1.services[0].hosts[1].state, HostState::Held { at: Some(A.into()) }, "held, not failed");
    assert_eq!(rollout.verdict(), Verdict::InProgress);
    assert_eq!(rollout.counts(), (0, 2));
    assert!(dc1.settled() && !rollout.stopped(), "nothing to wait for before the bake ends");
    assert_eq!(
        dc1.line_at("x", 20_000),
        "dc1: 1/3 at bbbbbbb (rolling out in waves, wave 1/2 (h3), bake 20 s left; 2 held: h1, h2)"
    );
    assert!(dc1.line_at("x", 45_000).contains("bake over, next wave due"), "{}", dc1.line_at("x", 45_000));

    // Released: h1 and h2 are on their way now, and waited for.
    let second = progress(&[Target::Ref(REF.into())], &rolling(rollout_state(Phase::Rolling, 1)));
    assert_eq!(second.counts(), (1, 1), "h2 reported a failure of its own");
    assert!(!second.dcs[0].settled(), "h1 is pending in a released wave");

    // A state for another commit says nothing of this one.
    let mut other = rollout_state(Phase::Rolling, 0);
    other.commit = C.into();
    let unrelated = progress(&[Target::Ref(REF.into())], &rolling(other));
    assert_eq!(unrelated.dcs[0].services[0].hosts[0].state, HostState::Pending { at: Some(A.into()) });
}

#[test]
fn a_halted_rollout_names_every_unhealthy_host_and_stops_the_watch() {
    let mut state = rollout_state(Phase::Halted, 0);
    state.reason = Some("wave 1 unhealthy".into());
    state.unhealthy = BTreeMap::from([
        ("h3".to_owned(), "exec exited 1".to_owned()),
        ("h4".to_owned(), "no report within 60 s".to_owned()),
    ]);
    let rollout = progress(&[Target::Ref(REF.into())], &rolling(state));
    let dc1 = &rollout.dcs[0];
    assert!(dc1.halted() && !dc1.complete() && rollout.stopped());
    assert_eq!(rollout.verdict(), Verdict::InProgress, "a halt is not complete: status exits 1");
    assert_eq!(
        dc1.line_at("x", 20_000),
        "dc1: 1/3 at bbbbbbb (rollout halted at wave 1/2: wave 1 unhealthy; unhealthy: h3 exec exited 1, \
         h4 no report within 60 s; 2 held: h1, h2)"
    );
}

#[test]
fn waiting_paused_and_finished_rollouts_say_so_or_nothing() {
    let mut waiting = rollout_state(Phase::Waiting, 0);
    waiting.reason = Some("after dc-canary".into());
    let line = progress(&[Target::Ref(REF.into())], &rolling(waiting)).dcs[0].line_at("x", 0);
    assert_eq!(line, "dc1: 1/3 at bbbbbbb (waiting to roll out in waves: after dc-canary; 2 held: h1, h2)");
    let mut paused = rollout_state(Phase::Paused, 0);
    paused.reason = Some("paused by ops@desk".into());
    let line = progress(&[Target::Ref(REF.into())], &rolling(paused)).dcs[0].line_at("x", 0);
    assert!(line.contains("rollout paused at wave 1/2 (h3): paused by ops@desk"), "{line}");
    let complete = progress(&[Target::Ref(REF.into())], &rolling(rollout_state(Phase::Complete, 1)));
    assert_eq!(
        complete.dcs[0].line_at("x", 0),
        "dc1: 1/3 at bbbbbbb (1 failed: h2 held for its wave at aaaaaaa; 1 pending: h1 at aaaaaaa)"
    );
}
