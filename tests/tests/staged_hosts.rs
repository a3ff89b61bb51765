//! The host's half of staged rollouts, against a bus written by hand as a relay rolling
//! a commit out in waves would leave it: a host outside the released waves holds the
//! staged commit (its tree and its processes untouched, across a restart) until its
//! wave comes; a halted rollout sends the hosts that took the commit back to the one
//! before, `--exec` runs for it and the host reports health `reverted`; a host with
//! nothing in place takes the commit before the staged one; a wave host's
//! `--health-cmd` is watched while the wave bakes.

use std::fs;
use std::path::PathBuf;
use std::time::Duration;

use confcast_schemas::message::HealthState;
use confcast_schemas::rollout::Phase;
use confcast_schemas::HostStatus;
use confcast_tests::staged::{Commit, StagedBus, DC, SERVICE};
use confcast_tests::{free_port, host_status, http_get, wait_for, Subscriber};

/// The host of the first wave.
const CANARY: &str = "canary";
/// A host of the second wave.
const LATE: &str = "late";

/// A host of [`DC`] following [`SERVICE`] as `host`, with `extra` flags.
fn host(bus: &StagedBus, host: &str, extra: &[&str]) -> Subscriber {
    let mut flags = vec!["--service", SERVICE, "--host-id", host];
    flags.extend_from_slice(extra);
    Subscriber::start(&bus.url(), DC, &flags)
}

/// What `<dir>/service0/app.conf` holds on `sub`, if anything.
fn app_conf(sub: &Subscriber) -> Option<String> {
    fs::read_to_string(sub.service_dir(SERVICE).join("app.conf")).ok()
}

/// Waits until `sub` holds `commit`'s `app.conf` and its `--exec` ran for it.
fn wait_at(sub: &Subscriber, commit: &Commit) {
    sub.wait_exec_within(SERVICE, &commit.id, Duration::from_secs(10));
    assert_eq!(app_conf(sub).as_deref(), Some(commit.app_conf.as_str()));
}

/// What the local API at `addr` says of the service.
fn service_api(addr: &str) -> String {
    let mut stream = wait_for(Duration::from_secs(10), "the local API", || std::net::TcpStream::connect(addr).ok());
    let (status, body) = http_get(&mut stream, &format!("/v1/services/{SERVICE}"));
    let body = String::from_utf8_lossy(&body).into_owned();
    assert_eq!(status, 200, "{body}");
    body
}

/// How many times `--exec` ran on `sub` for `commit`.
fn execs_of(sub: &Subscriber, commit: &Commit) -> usize {
    sub.execs().iter().filter(|l| l.starts_with(&format!("{SERVICE} {} ", commit.id))).count()
}

/// Waits until the last status `host` reported satisfies `want`.
fn wait_status(bus: &StagedBus, host: &str, what: &str, want: impl Fn(&HostStatus) -> bool) -> HostStatus {
    wait_for(Duration::from_secs(10), what, || host_status(&bus.url(), DC, host, SERVICE).filter(|s| want(s)))
}

/// A bus whose service is at its first commit, not staged, and the second, staged,
/// announced after it: (bus, first, second). The hosts are started in between by `hosts`.
fn rolling_out<T>(hosts: impl FnOnce(&StagedBus, &Commit) -> T) -> (StagedBus, Commit, Commit, T) {
    let bus = StagedBus::start();
    let first = bus.commit("mode = first\n");
    bus.snapshot(&first, false);
    let started = hosts(&bus, &first);
    let second = bus.commit("mode = second\n");
    bus.rollout(&second, &first, &[&[CANARY], &[LATE]], 0, Phase::Rolling);
    bus.staged_update(&first, &second);
    (bus, first, second, started)
}

#[test]
fn a_host_outside_the_released_waves_holds_the_commit_until_its_wave_comes() {
    let api = format!("127.0.0.1:{}", free_port());
    let (bus, first, second, (canary, mut late)) = rolling_out(|bus, first| {
        let (canary, late) = (host(bus, CANARY, &[]), host(bus, LATE, &["--listen", &api]));
        wait_at(&canary, first);
        wait_at(&late, first);
        (canary, late)
    });
    wait_at(&canary, &second);
    // The late host saw the staged update and holds it: same tree, no exec.
    wait_for(Duration::from_secs(5), "the late host to hold the staged commit", || {
        late.log().contains("holding the staged commit").then_some(())
    });
    assert_eq!(app_conf(&late).as_deref(), Some(first.app_conf.as_str()));
    assert_eq!(execs_of(&late, &second), 0, "{:?}", late.execs());
    let pending = format!("\"pending\":\"{}\"", second.id);
    assert!(service_api(&api).contains(&pending), "the local API shows the held commit: {}", service_api(&api));

    // Restarted, it replays the held update and holds it again.
    late.stop();
    let holds_before = late.log().matches("holding the staged commit").count();
    late.restart();
    wait_for(Duration::from_secs(5), "the restarted host to hold the staged commit again", || {
        (late.log().matches("holding the staged commit").count() > holds_before).then_some(())
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(app_conf(&late).as_deref(), Some(first.app_conf.as_str()));
    assert_eq!(execs_of(&late, &second), 0, "{:?}", late.execs());

    // Its wave comes: it takes the commit, the usual way.
    bus.rollout(&second, &first, &[&[CANARY], &[LATE]], 1, Phase::Rolling);
    wait_at(&late, &second);
    wait_status(&bus, LATE, "the late host reports the commit", |s| s.commit.as_deref() == Some(second.id.as_str()));
    assert!(!service_api(&api).contains("\"pending\""), "nothing held any more: {}", service_api(&api));
    assert_eq!(execs_of(&canary, &second), 1, "the canary is not told twice: {:?}", canary.execs());
}

#[test]
fn a_held_service_holds_up_no_other_service_before_or_after_a_restart() {
    let bus = StagedBus::start();
    let first = bus.commit("mode = first\n");
    bus.snapshot(&first, false);
    bus.plain("other", &first);
    let mut late = host(&bus, LATE, &["--service", "other"]);
    wait_at(&late, &first);
    late.wait_exec_within("other", &first.id, Duration::from_secs(10));
    let second = bus.commit("mode = second\n");
    bus.rollout(&second, &first, &[&[CANARY], &[LATE]], 0, Phase::Rolling);
    bus.staged_update(&first, &second);
    // The service without a policy moves on, behind the held one on the stream.
    let third = bus.commit("mode = third\n");
    bus.plain("other", &third);
    late.wait_exec_within("other", &third.id, Duration::from_secs(10));
    assert_eq!(app_conf(&late).as_deref(), Some(first.app_conf.as_str()), "service0 held");

    // After a restart the held update is replayed and held again; the other service,
    // already there, is not told again.
    late.stop();
    let holds_before = late.log().matches("holding the staged commit").count();
    late.restart();
    wait_for(Duration::from_secs(5), "the restarted host to hold the staged commit again", || {
        (late.log().matches("holding the staged commit").count() > holds_before).then_some(())
    });
    std::thread::sleep(Duration::from_millis(500));
    let other_execs = late.execs().iter().filter(|l| l.starts_with(&format!("other {} ", third.id))).count();
    assert_eq!(other_execs, 1, "{:?}", late.execs());
    assert_eq!(app_conf(&late).as_deref(), Some(first.app_conf.as_str()));
    assert_eq!(execs_of(&late, &second), 0, "{:?}", late.execs());
}

#[test]
fn a_halted_rollout_sends_the_hosts_that_took_it_back_and_they_say_reverted() {
    let (bus, first, second, (canary, late)) = rolling_out(|bus, first| {
        let (canary, late) = (host(bus, CANARY, &[]), host(bus, LATE, &[]));
        wait_at(&canary, first);
        wait_at(&late, first);
        (canary, late)
    });
    wait_at(&canary, &second);
    let late_execs = late.execs().len();

    bus.rollout(&second, &first, &[&[CANARY], &[LATE]], 0, Phase::Halted);
    wait_at(&canary, &first);
    assert_eq!(execs_of(&canary, &first), 2, "--exec ran for the commit it went back to: {:?}", canary.execs());
    let status = wait_status(&bus, CANARY, "the canary reports reverted", |s| {
        s.health.as_ref().is_some_and(|h| h.state == HealthState::Reverted)
    });
    assert_eq!(status.commit.as_deref(), Some(first.id.as_str()));
    assert!(status.ok, "{status:?}");
    let reason = status.health.and_then(|h| h.reason).unwrap_or_default();
    assert!(reason.contains(&second.id) && reason.contains("halted"), "the reason names the halt: {reason}");
    assert!(canary.log().contains("rollout halted: going back to the previous commit"), "said at warn");

    // The host that never took it does nothing.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(late.execs().len(), late_execs, "{:?}", late.execs());
    assert_eq!(app_conf(&late).as_deref(), Some(first.app_conf.as_str()));
}

#[test]
fn a_host_with_nothing_in_place_takes_the_commit_before_the_staged_one() {
    let (bus, first, second, ()) = rolling_out(|_, _| ());
    // A host that is in no wave comes up while the rollout runs.
    let newcomer = host(&bus, "newcomer", &[]);
    wait_at(&newcomer, &first);
    assert_eq!(execs_of(&newcomer, &second), 0);
    // Once the rollout completes, every host takes it.
    bus.rollout(&second, &first, &[&[CANARY], &[LATE]], 1, Phase::Complete);
    wait_at(&newcomer, &second);
}

#[test]
fn a_wave_host_reports_at_once_when_its_health_turns_during_the_bake() {
    let marker = tempfile::tempdir().expect("tempdir");
    let broken: PathBuf = marker.path().join("broken");
    let health = format!("test ! -e '{}'", broken.display());
    let (bus, _first, second, canary) = rolling_out(|bus, first| {
        let canary = host(bus, CANARY, &["--health-cmd", &health]);
        wait_at(&canary, first);
        canary
    });
    wait_at(&canary, &second);
    let at_second = |s: &HostStatus| s.commit.as_deref() == Some(second.id.as_str());
    wait_status(&bus, CANARY, "healthy at the commit", |s| {
        at_second(s) && s.health.as_ref().is_some_and(|h| h.state == HealthState::Healthy)
    });
    fs::write(&broken, "").expect("marker");
    wait_status(&bus, CANARY, "unhealthy during the bake", |s| {
        at_second(s) && s.health.as_ref().is_some_and(|h| h.state == HealthState::Unhealthy)
    });
    fs::remove_file(&broken).expect("marker");
    wait_status(&bus, CANARY, "healthy again", |s| {
        at_second(s) && s.health.as_ref().is_some_and(|h| h.state == HealthState::Healthy)
    });
}

#[test]
fn a_rollout_state_of_a_commit_the_service_does_not_announce_moves_nothing() {
    let bus = StagedBus::start();
    let first = bus.commit("mode = first\n");
    bus.snapshot(&first, false);
    let sub = host(&bus, CANARY, &[]);
    wait_at(&sub, &first);
    // A complete rollout of a commit the service's head does not name (left on its
    // subject after the service moved on): nothing happens.
    let second = bus.commit("mode = second\n");
    bus.rollout(&second, &first, &[&[CANARY], &[LATE]], 1, Phase::Complete);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(app_conf(&sub).as_deref(), Some(first.app_conf.as_str()));
    assert_eq!(execs_of(&sub, &second), 0, "{:?}", sub.execs());
    // Once the commit is announced, the state releases it.
    bus.staged_update(&first, &second);
    wait_at(&sub, &second);
}
