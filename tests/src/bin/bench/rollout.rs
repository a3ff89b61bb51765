//! Scenario 12: a staged rollout as an operator would watch it. Ten hosts follow
//! `service0` with a `--health-cmd` that fails when `app.conf` says `bad`; the policy is
//! `{"waves": [1, "30%", "100%"], "bake_secs": 2}`. A good commit is pushed and rolls
//! out wave by wave; then a bad one, which halts at its canary, who goes back. The table
//! is the timeline: which hosts, which wave, when, and why it halted, in milliseconds
//! from each push, read from the bus (the rollout state) and the hosts (their `--exec`
//! logs and status reports).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use confcast_schemas::message::HealthState;
use confcast_schemas::rollout::{Phase, RolloutState};
use confcast_tests::{host_status, rollout_state, wait_for, GitDaemon, Master, NatsServer, Relay, Subscriber};

use crate::report::Table;

const POLICY: &str = r#"{"services":[{"name":"service0","branch":"master"}],
  "rollout":{"waves":[1,"30%","100%"],"bake_secs":2,"report_timeout_secs":30}}"#;

const HEALTH: &str = r#"! grep -q bad "$CONFCAST_DIR/app.conf""#;

/// How long one rollout may take before the scenario gives up on it.
const ROLLOUT_TIMEOUT: Duration = Duration::from_secs(120);

/// The timeline of a good and a bad commit rolled out to `hosts` hosts.
pub(crate) fn rollout(hosts: usize) -> Table {
    let nats = NatsServer::start();
    let master = Master::new(&nats.url());
    master.configuration("big", POLICY);
    master.datacenter("dc0", crate::latency::dc_doc());
    let first = master.on("services/service0/master").write("app.conf", "0\n").commit_push("first").commit;
    let daemon = GitDaemon::start(&master.bare);
    let _relay = Relay::start_url(&nats.url(), "dc0", &daemon.url("master.git"));
    let fleet: Vec<Subscriber> = (0..hosts)
        .map(|i| {
            let id = format!("h{i}");
            Subscriber::start(&nats.url(), "dc0", &["--service", "service0", "--host-id", &id, "--health-cmd", HEALTH])
        })
        .collect();
    for (i, host) in fleet.iter().enumerate() {
        host.wait_exec_within("service0", &first, ROLLOUT_TIMEOUT);
        wait_for(ROLLOUT_TIMEOUT, "every host to report", || {
            host_status(&nats.url(), "dc0", &format!("h{i}"), "service0").filter(|s| s.commit.is_some())
        });
    }
    let mut table = Table::new(
        &format!("12. A staged rollout, {hosts} hosts, waves [1, \"30%\", \"100%\"], bake 2 s: the timeline"),
        &["push", "ms after the push", "what happened"],
    );
    let good = master.on("services/service0/master").write("app.conf", "1\n").commit_push("good").commit;
    watch(&nats.url(), &fleet, "good", &good, &first, &mut table);
    let bad = master.on("services/service0/master").write("app.conf", "bad\n").commit_push("bad").commit;
    watch(&nats.url(), &fleet, "bad", &bad, &good, &mut table);
    table
}

/// Follows the rollout of `commit` (`previous` before it) until it is complete, or
/// halted with every host that took it back, adding each event to `table`.
fn watch(nats: &str, fleet: &[Subscriber], label: &str, commit: &str, previous: &str, table: &mut Table) {
    let pushed = Instant::now();
    let short = |c: &str| c[..7].to_owned();
    let mut row = |what: String| {
        table.row(vec![format!("{label} {}", short(commit)), format!("{}", pushed.elapsed().as_millis()), what])
    };
    let mut last: Option<RolloutState> = None;
    let mut took: BTreeSet<usize> = BTreeSet::new();
    let mut back: BTreeSet<usize> = BTreeSet::new();
    let mut reported_back: BTreeSet<usize> = BTreeSet::new();
    let taken = format!("service0 {commit} ");
    let returned = format!("service0 {previous} ");
    loop {
        assert!(pushed.elapsed() < ROLLOUT_TIMEOUT, "the rollout of {commit} did not end");
        if let Some(state) = rollout_state(nats, "dc0", "service0").filter(|s| s.commit == commit) {
            if last.as_ref() != Some(&state) {
                if let Some(event) = describe(last.as_ref(), &state) {
                    row(event);
                }
                last = Some(state);
            }
        }
        for (i, host) in fleet.iter().enumerate() {
            let execs = host.execs();
            let at = execs.iter().position(|l| l.starts_with(&taken));
            if at.is_some() && took.insert(i) {
                row(format!("h{i} applied it, `--exec` ran"));
            }
            if at.is_some_and(|at| execs[at..].iter().any(|l| l.starts_with(&returned))) && back.insert(i) {
                row(format!("h{i} back at {}, `--exec` ran", short(previous)));
            }
        }
        for &i in back.difference(&reported_back.clone()) {
            let status = host_status(nats, "dc0", &format!("h{i}"), "service0");
            if status.and_then(|s| s.health).is_some_and(|h| h.state == HealthState::Reverted) {
                reported_back.insert(i);
                row(format!("h{i} reported `reverted`"));
            }
        }
        let phase = last.as_ref().map(|s| s.phase);
        let done = match phase {
            Some(Phase::Complete) => took.len() == fleet.len(),
            Some(Phase::Halted) => reported_back == took,
            _ => false,
        };
        if done {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What changed from `before` to `now`, in words; `None` for nothing worth a line.
fn describe(before: Option<&RolloutState>, now: &RolloutState) -> Option<String> {
    let hosts = |wave: usize| now.waves.get(wave).map(|w| w.join(", ")).unwrap_or_default();
    let waves = now.waves.len();
    match before {
        None => Some(format!(
            "relay planned {waves} waves ({}) and released wave 1: {}",
            now.waves.iter().map(|w| w.len().to_string()).collect::<Vec<_>>().join("+"),
            hosts(0)
        )),
        Some(b) if b.phase != now.phase && now.phase == Phase::Halted => Some(format!(
            "halted: {}; {}",
            now.reason.as_deref().unwrap_or(""),
            now.unhealthy.iter().map(|(h, why)| format!("{h}: {why}")).collect::<Vec<_>>().join("; ")
        )),
        Some(b) if b.phase != now.phase => Some(format!("rollout {}", now.phase)),
        Some(b) if b.wave != now.wave => {
            Some(format!("wave {} of {waves} released: {}", now.wave + 1, hosts(now.wave)))
        }
        Some(b) if b.healthy_since_ms.is_none() && now.healthy_since_ms.is_some() => {
            Some(format!("wave {} healthy, bake of {} s started", now.wave + 1, now.policy.bake_secs))
        }
        _ => None,
    }
}
