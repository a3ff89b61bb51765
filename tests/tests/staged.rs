//! Staged rollouts end to end: a real `git push` to a master whose configuration gives
//! service0 a rollout policy, the real relay planning and moving the waves, and real
//! hosts holding, taking and giving back the commit as the rollout state says. Bakes
//! are a couple of seconds so that each test stays short.

use std::time::{Duration, Instant};

use confcast_schemas::message::HealthState;
use confcast_schemas::rollout::{Phase, RolloutState};
use std::process::Command;

use confcast_tests::{
    bin, host_status, rollout_state, run, wait_error, wait_for, wait_rollout, Master, NatsServer, Ran, Relay,
    Subscriber,
};

/// Configuration `big` pinning service0 to its master branch, rolling out to one host,
/// then to all after a bake.
const CANARY_THEN_ALL: &str = r#"{"services":[{"name":"service0","branch":"master"}],
  "rollout":{"waves":[1,"100%"],"bake_secs":2,"report_timeout_secs":20}}"#;

/// A host's health check: `app.conf` must not say `bad`.
const HEALTH: &str = r#"! grep -q bad "$CONFCAST_DIR/app.conf""#;

/// A datacenter of `hosts` hosts (`h0`, `h1`, ...) following service0, each with
/// [`HEALTH`] as its `--health-cmd`.
struct Fleet {
    hosts: Vec<Subscriber>,
    relay: Relay,
    master: Master,
    nats: NatsServer,
    first: String,
}

impl Fleet {
    fn start(hosts: usize, configuration: &str) -> Fleet {
        Fleet::start_with(hosts, configuration, &[])
    }

    /// A fleet whose relay has `relay_flags`.
    fn start_with(hosts: usize, configuration: &str, relay_flags: &[&str]) -> Fleet {
        let nats = NatsServer::start();
        let master = Master::new(&nats.url());
        master.configuration("big", configuration);
        master.datacenter("dc1", r#"{"conf":"datacenter-configuration/big"}"#);
        let first = master.on("services/service0/master").write("app.conf", "0\n").commit_push("first").commit;
        let relay = Relay::start_with(&nats.url(), "dc1", &master.bare.display().to_string(), relay_flags);
        let hosts = (0..hosts).map(|i| host(&nats.url(), "dc1", &format!("h{i}"))).collect();
        let fleet = Fleet { hosts, relay, master, nats, first };
        fleet.wait_all_at(&fleet.first.clone());
        fleet
    }

    fn url(&self) -> String {
        self.nats.url()
    }

    /// The host with id `id`.
    fn host(&self, id: &str) -> &Subscriber {
        &self.hosts[id.trim_start_matches('h').parse::<usize>().expect("host id")]
    }

    /// Waits until every host has run `--exec` for `commit` and reported it healthy.
    fn wait_all_at(&self, commit: &str) {
        for (i, host) in self.hosts.iter().enumerate() {
            host.wait_exec_within("service0", commit, Duration::from_secs(40));
            wait_for(Duration::from_secs(20), &format!("h{i} to report {commit}"), || {
                host_status(&self.url(), "dc1", &format!("h{i}"), "service0")
                    .filter(|s| s.commit.as_deref() == Some(commit))
            });
        }
    }

    /// The hosts that have run `--exec` for `commit`.
    fn took(&self, commit: &str) -> Vec<String> {
        let prefix = format!("service0 {commit} ");
        (0..self.hosts.len())
            .filter(|i| self.hosts[*i].execs().iter().any(|l| l.starts_with(&prefix)))
            .map(|i| format!("h{i}"))
            .collect()
    }

    fn push(&self, content: &str) -> String {
        self.master.on("services/service0/master").write("app.conf", content).commit_push(content.trim()).commit
    }
}

/// A host `id` of `dc` following service0 with [`HEALTH`].
fn host(nats: &str, dc: &str, id: &str) -> Subscriber {
    Subscriber::start(nats, dc, &["--service", "service0", "--host-id", id, "--health-cmd", HEALTH])
}

/// The state of the rollout of `commit`, once the relay wrote it.
fn rollout_of(nats: &str, dc: &str, commit: &str) -> RolloutState {
    wait_rollout(nats, dc, "service0", &format!("the rollout of {commit}"), |s| s.commit == commit)
}

#[test]
fn a_good_commit_reaches_the_canary_then_all_and_a_bad_one_stops_at_the_canary() {
    let fleet = Fleet::start(4, CANARY_THEN_ALL);
    let nats = fleet.url();

    // A good commit: the canary first, the others only after its bake.
    let good = fleet.push("1\n");
    let plan = rollout_of(&nats, "dc1", &good);
    assert_eq!(plan.waves.iter().map(Vec::len).collect::<Vec<_>>(), vec![1, 3], "waves of {:?}", plan.waves);
    let canary = plan.waves[0][0].clone();
    fleet.host(&canary).wait_exec("service0", &good);
    assert_eq!(fleet.took(&good), vec![canary.clone()], "only the canary before its bake");
    let baked = wait_rollout(&nats, "dc1", "service0", "the canary's bake", |s| s.healthy_since_ms.is_some());
    let complete = wait_rollout(&nats, "dc1", "service0", "the rollout to complete", |s| s.phase == Phase::Complete);
    fleet.wait_all_at(&good);
    let next_wave_began = complete.wave_started_ms;
    assert!(
        next_wave_began >= baked.healthy_since_ms.expect("baking") + 2_000,
        "the second wave began {next_wave_began} before the 2 s bake from {:?} ended",
        baked.healthy_since_ms
    );

    // A bad commit: the canary takes it, fails its health check, and goes back alone.
    let bad = fleet.push("bad\n");
    let plan = rollout_of(&nats, "dc1", &bad);
    let canary = plan.waves[0][0].clone();
    let halted = wait_rollout(&nats, "dc1", "service0", "the bad commit to halt", |s| s.phase == Phase::Halted);
    assert_eq!(halted.commit, bad);
    assert!(halted.unhealthy.get(&canary).is_some_and(|why| why.contains("--health-cmd")), "{:?}", halted.unhealthy);
    let message = wait_error(&nats, "dc1", &["halted", "service0", &bad[..12], &canary, "--health-cmd"]);
    assert!(message.contains(&good[..12]), "the event says where hosts go back: {message}");
    // The canary goes back to the good commit by itself, tells its processes, says so.
    let host = fleet.host(&canary);
    let execs = host.wait_exec("service0", &good);
    assert!(execs.iter().any(|l| l.starts_with(&format!("service0 {bad} "))), "the canary took {bad}: {execs:?}");
    host.assert_tree(&fleet.master, "service0", &good);
    let reverted = wait_for(Duration::from_secs(20), "the canary to report reverted", || {
        host_status(&nats, "dc1", &canary, "service0")
            .filter(|s| s.health.as_ref().is_some_and(|h| h.state == HealthState::Reverted))
    });
    assert_eq!(reverted.commit.as_deref(), Some(good.as_str()));
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(fleet.took(&bad), vec![canary.clone()], "the other hosts never see the bad commit");
    assert_eq!(rollout_state(&nats, "dc1", "service0").expect("state").phase, Phase::Halted, "it stays halted");
    let status = run(Command::new(bin("publisher")).args(["status", &bad, "--nats", &nats, "--timeout-secs", "5"]));
    assert_eq!(status.code, Some(1), "a halted rollout fails `publisher status`: {status:?}");
    let said = format!("{}{}", status.stdout, status.stderr);
    eprintln!("publisher status after the halt:\n{said}");
    assert!(said.contains("halted") && said.contains(&canary) && said.contains("--health-cmd"), "{said}");

    // The next good push rolls out normally, from the last good commit.
    let fixed = fleet.push("2\n");
    let plan = rollout_of(&nats, "dc1", &fixed);
    assert_eq!(plan.previous.as_deref(), Some(good.as_str()), "a halted commit is no one's previous");
    wait_rollout(&nats, "dc1", "service0", "the fix to complete", |s| s.commit == fixed && s.phase == Phase::Complete);
    fleet.wait_all_at(&fixed);
    for host in &fleet.hosts {
        host.assert_tree(&fleet.master, "service0", &fixed);
    }
    drop(fleet.relay);
}

#[test]
fn a_host_that_joins_during_a_rollout_gets_the_last_complete_commit() {
    let configuration = CANARY_THEN_ALL.replace("\"bake_secs\":2", "\"bake_secs\":600");
    let fleet = Fleet::start(2, &configuration);
    let nats = fleet.url();
    let next = fleet.push("1\n");
    let plan = rollout_of(&nats, "dc1", &next);
    fleet.host(&plan.waves[0][0]).wait_exec("service0", &next);
    // A host that was not there when the waves were planned is in none of them.
    let late = host(&nats, "dc1", "late");
    late.wait_exec("service0", &fleet.first);
    late.assert_tree(&fleet.master, "service0", &fleet.first);
    std::thread::sleep(Duration::from_secs(2));
    assert!(!late.execs().iter().any(|l| l.contains(&next)), "the late host holds the last complete commit");
}

#[test]
fn a_datacenter_that_follows_another_starts_only_once_it_completed_and_never_after_a_halt() {
    let nats = NatsServer::start();
    let master = Master::new(&nats.url());
    master.configuration("big", CANARY_THEN_ALL);
    master.datacenter("dc1", r#"{"conf":"datacenter-configuration/big"}"#);
    master.datacenter("dc2", r#"{"conf":"datacenter-configuration/big","rollout":{"after":["dc1"]}}"#);
    let first = master.on("services/service0/master").write("app.conf", "0\n").commit_push("first").commit;
    let _relays = [Relay::start(&nats.url(), "dc1", &master.bare), Relay::start(&nats.url(), "dc2", &master.bare)];
    let dc1 = [host(&nats.url(), "dc1", "a0"), host(&nats.url(), "dc1", "a1")];
    let dc2 = host(&nats.url(), "dc2", "b0");
    for h in dc1.iter().chain([&dc2]) {
        h.wait_exec("service0", &first);
    }
    wait_for(Duration::from_secs(20), "every host to report", || {
        ["a0", "a1"].iter().all(|h| host_status(&nats.url(), "dc1", h, "service0").is_some()).then_some(())
    });

    let good = master.on("services/service0/master").write("app.conf", "1\n").commit_push("good").commit;
    // While dc1 rolls out, dc2 waits.
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let dc1_state = rollout_state(&nats.url(), "dc1", "service0").filter(|s| s.commit == good);
        let complete = dc1_state.as_ref().is_some_and(|s| s.phase == Phase::Complete);
        let dc2_took = dc2.execs().iter().any(|l| l.contains(&good));
        assert!(complete || !dc2_took, "dc2 took {good} before dc1 completed it: {dc1_state:?}");
        if complete {
            break;
        }
        assert!(Instant::now() < deadline, "dc1 did not complete {good}");
        std::thread::sleep(Duration::from_millis(100));
    }
    dc2.wait_exec("service0", &good);

    // A halt in dc1: dc2 never takes the commit.
    let bad = master.on("services/service0/master").write("app.conf", "bad\n").commit_push("bad").commit;
    wait_rollout(&nats.url(), "dc1", "service0", "dc1 to halt", |s| s.commit == bad && s.phase == Phase::Halted);
    let waiting = wait_rollout(&nats.url(), "dc2", "service0", "dc2 to see the halt", |s| {
        s.commit == bad && s.reason.as_deref().is_some_and(|r| r.contains("dc1 halted it"))
    });
    assert_eq!(waiting.phase, Phase::Waiting);
    std::thread::sleep(Duration::from_secs(2));
    assert!(!dc2.execs().iter().any(|l| l.contains(&bad)), "dc2 never takes a commit dc1 halted");
}

/// Configuration `big` with a bake of `secs` seconds after the canary.
fn baking(secs: u64) -> String {
    CANARY_THEN_ALL.replace("\"bake_secs\":2", &format!("\"bake_secs\":{secs}"))
}

#[test]
fn fault_the_relay_killed_mid_bake_its_standby_finishes_the_rollout_as_planned() {
    let ttl = ["--lease-ttl-secs", "2"];
    let mut fleet = Fleet::start_with(3, &baking(4), &ttl);
    let nats = fleet.url();
    let mut standby = Relay::start_with(&nats, "dc1", &fleet.master.bare.display().to_string(), &ttl);
    let good = fleet.push("1\n");
    let baking = wait_rollout(&nats, "dc1", "service0", "the canary's bake", |s| {
        s.commit == good && s.healthy_since_ms.is_some()
    });
    // Whichever relay holds the lease dies mid-bake.
    let active_is_first = fleet.relay.log().contains("holding the datacenter's lease");
    if active_is_first {
        fleet.relay.kill();
    } else {
        standby.kill();
    }
    let complete = wait_rollout(&nats, "dc1", "service0", "the rollout to complete", |s| s.phase == Phase::Complete);
    assert_eq!(complete.waves, baking.waves, "the waves planned before the fault stand");
    assert!(
        complete.wave_started_ms >= baking.healthy_since_ms.expect("baking") + 4_000,
        "the second wave waited for the bake that began before the fault"
    );
    fleet.wait_all_at(&good);
}

#[test]
fn fault_a_host_killed_mid_wave_holds_after_restart_until_its_wave() {
    let mut fleet = Fleet::start(3, &baking(5));
    let nats = fleet.url();
    let good = fleet.push("1\n");
    let plan = rollout_of(&nats, "dc1", &good);
    let canary = plan.waves[0][0].clone();
    let waiting = plan.waves[1][0].clone();
    fleet.host(&canary).wait_exec("service0", &good);
    // Both the canary and a host of the next wave die and come back during the bake.
    for id in [&canary, &waiting] {
        let i: usize = id.trim_start_matches('h').parse().expect("host id");
        fleet.hosts[i].kill();
        fleet.hosts[i].restart();
    }
    std::thread::sleep(Duration::from_secs(2));
    let state = rollout_state(&nats, "dc1", "service0").expect("state");
    if state.wave == 0 {
        assert!(!fleet.took(&good).contains(&waiting), "{waiting} holds until its wave, restart or not");
    }
    fleet.host(&canary).assert_tree(&fleet.master, "service0", &good);
    wait_rollout(&nats, "dc1", "service0", "the rollout to complete", |s| s.phase == Phase::Complete);
    fleet.wait_all_at(&good);
}

#[test]
fn fault_nats_restarted_mid_rollout_the_rollout_ends_as_planned() {
    let mut fleet = Fleet::start(3, &baking(3));
    let nats = fleet.url();
    let good = fleet.push("1\n");
    let plan = rollout_of(&nats, "dc1", &good);
    fleet.host(&plan.waves[0][0]).wait_exec("service0", &good);
    fleet.nats.stop();
    std::thread::sleep(Duration::from_secs(1));
    fleet.nats.restart();
    let complete = wait_rollout(&nats, "dc1", "service0", "the rollout to complete", |s| s.phase == Phase::Complete);
    assert_eq!(complete.waves, plan.waves);
    fleet.wait_all_at(&good);
    for host in &fleet.hosts {
        host.assert_tree(&fleet.master, "service0", &good);
    }
}

/// `publisher rollout <args>` against `nats`.
fn control(nats: &str, args: &[&str]) -> Ran {
    run(Command::new(bin("publisher")).arg("rollout").args(args).args(["--nats", nats]))
}

#[test]
fn operators_pause_resume_abort_and_promote_with_signed_controls() {
    let keys = tempfile::tempdir().expect("tempdir");
    let key_file = keys.path().join("operator.nk");
    let made = run(Command::new(bin("publisher")).arg("keygen").arg(&key_file));
    assert_eq!(made.code, Some(0), "{made:?}");
    let public = made.stdout.trim().to_owned();
    let key = key_file.display().to_string();
    let fleet = Fleet::start_with(3, &baking(4), &["--trusted-key", &public]);
    let nats = fleet.url();
    let signed = |args: &[&str]| control(&nats, &[args, &["--signing-key", key.as_str()]].concat());

    // Pause: the canary keeps the commit, no further wave starts.
    let one = fleet.push("1\n");
    let plan = rollout_of(&nats, "dc1", &one);
    fleet.host(&plan.waves[0][0]).wait_exec("service0", &one);
    let forged = control(&nats, &["pause", "services/service0/master"]);
    assert_eq!(forged.code, Some(1), "an unsigned control is refused: {forged:?}");
    assert!(forged.stdout.contains("unsigned") || forged.stderr.contains("unsigned"), "{forged:?}");
    let paused = signed(&["pause", "services/service0/master"]);
    assert_eq!(paused.code, Some(0), "{paused:?}");
    assert!(paused.stdout.contains("rolling -> paused"), "{paused:?}");
    std::thread::sleep(Duration::from_secs(5));
    let state = rollout_state(&nats, "dc1", "service0").expect("state");
    assert_eq!((state.phase, state.wave), (Phase::Paused, 0), "paused past the bake");
    assert_eq!(fleet.took(&one).len(), 1, "no further wave while paused");
    // Resume: the wave bakes again, then the rest.
    assert_eq!(signed(&["resume", &one[..7]]).code, Some(0));
    wait_rollout(&nats, "dc1", "service0", "the resumed rollout to complete", |s| s.phase == Phase::Complete);
    fleet.wait_all_at(&one);

    // Abort: the canary goes back; nobody else takes it.
    let two = fleet.push("2\n");
    let canary = rollout_of(&nats, "dc1", &two).waves[0][0].clone();
    fleet.host(&canary).wait_exec("service0", &two);
    assert_eq!(signed(&["abort", &two]).code, Some(0));
    fleet.host(&canary).wait_exec("service0", &one);
    wait_for(Duration::from_secs(20), "the canary to report reverted", || {
        host_status(&nats, "dc1", &canary, "service0")
            .filter(|s| s.health.as_ref().is_some_and(|h| h.state == HealthState::Reverted))
    });
    assert_eq!(fleet.took(&two), vec![canary.clone()]);
    // Resume a halted commit: from its first wave again; promote: every host at once.
    assert_eq!(signed(&["resume", &two]).code, Some(0));
    fleet.host(&canary).wait_exec("service0", &two);
    let promoted = signed(&["promote", &two]);
    assert_eq!(promoted.code, Some(0), "{promoted:?}");
    let started = Instant::now();
    fleet.wait_all_at(&two);
    assert!(started.elapsed() < Duration::from_secs(4), "promote skips the bake");
    assert_eq!(rollout_state(&nats, "dc1", "service0").expect("state").phase, Phase::Promoted);
    // Nothing left to control: said, exit 1.
    let late = signed(&["pause", &two]);
    assert_eq!(late.code, Some(1), "{late:?}");
}

#[test]
fn the_push_output_says_the_commit_rolls_out_in_waves_without_waiting_for_the_bake() {
    let fleet = Fleet::start(2, &baking(600));
    fleet.master.install_hooks(&fleet.url(), &["--wait-rollout-secs", "20"]);
    let started = Instant::now();
    let pushed = fleet.master.on("services/service0/master").write("app.conf", "1\n").commit_push("waves");
    assert!(pushed.ok, "{}", pushed.stderr);
    assert!(pushed.stderr.contains("rolling out in waves in dc1"), "{}", pushed.stderr);
    assert!(started.elapsed() < Duration::from_secs(15), "the hook does not wait out a 600 s bake");
}

#[test]
fn a_canary_whose_check_refuses_the_commit_halts_the_rollout_and_keeps_its_tree() {
    let nats = NatsServer::start();
    let master = Master::new(&nats.url());
    master.configuration("big", CANARY_THEN_ALL);
    master.datacenter("dc1", r#"{"conf":"datacenter-configuration/big"}"#);
    let first = master.on("services/service0/master").write("app.conf", "0\n").commit_push("first").commit;
    let _relay = Relay::start(&nats.url(), "dc1", &master.bare);
    let check = r#"! grep -q bad "$CONFCAST_DIR/app.conf""#;
    let hosts: Vec<Subscriber> = (0..2)
        .map(|i| {
            let id = format!("h{i}");
            Subscriber::start(&nats.url(), "dc1", &["--service", "service0", "--host-id", &id, "--check-cmd", check])
        })
        .collect();
    for (i, host) in hosts.iter().enumerate() {
        host.wait_exec("service0", &first);
        wait_for(Duration::from_secs(20), "the host to report", || {
            host_status(&nats.url(), "dc1", &format!("h{i}"), "service0").filter(|s| s.commit.is_some())
        });
    }
    let bad = master.on("services/service0/master").write("app.conf", "bad\n").commit_push("bad").commit;
    let halted = wait_rollout(&nats.url(), "dc1", "service0", "the refused commit to halt", |s| {
        s.commit == bad && s.phase == Phase::Halted
    });
    let canary = halted.waves[0][0].clone();
    let why = halted.unhealthy.get(&canary).cloned().unwrap_or_default();
    assert!(why.contains("--check-cmd"), "the halt names the check: {why:?}");
    // The refused tree never went live anywhere: both hosts keep the first commit, no exec.
    std::thread::sleep(Duration::from_secs(2));
    for host in &hosts {
        assert!(!host.execs().iter().any(|l| l.contains(&bad)), "no exec of the refused commit");
        host.assert_tree(&master, "service0", &first);
    }
}
