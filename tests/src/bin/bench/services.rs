//! Scenario 11: a push to one service of a datacenter that runs few services, and of
//! one that runs thousands.
//!
//! For each count N a fresh bus and master: configuration `big` pins services `s0` …
//! `s<N-1>` (each a tiny tree of three files, [`crate::synthetic`]), built with one
//! `git fast-import` and pushed in one `git push` of N refs; datacenter `dc0` follows
//! it; its relay (real process, master over `git://`) publishes them all; one host (real
//! `subscriber`) follows `s0` with `--exec`. Once every process is quiet, P one-line
//! changes of `s0` are pushed one after the other. Measured: from `git push` returning
//! to the host's `--exec` (p50 / p99), the relay's CPU per push (`/proc/<pid>/stat`, its
//! `git repack` included, before and after, every process quiet), and the relay's own
//! time per sync (`elapsed_ms` of its "synced" log lines); then a few more changes are
//! pushed with the master's hooks moved aside, to tell the hooks' share of `git push`.
//! Each count is compared with the first (fewest services) of the same run.

use std::time::{Duration, Instant};

use confcast_tests::{GitDaemon, Master, NatsServer, Relay, Subscriber};

use crate::latency::dc_doc;
use crate::observe::{exec_seen, settle, synced_ms};
use crate::report::{cpu_with_children_ms, ratio, summary, verdict, Table};
use crate::synthetic::{self, Import};

/// Files of each service's tree.
const FILES: usize = 3;

/// What P pushes to one service cost with N services in the datacenter.
struct Row {
    services: usize,
    pushes: usize,
    exec_p50: f64,
    exec_p99: f64,
    push_p50: f64,
    plain_push_p50: f64,
    relay_cpu_ms: f64,
    sync_p50: f64,
}

/// Runs the scenario with each of `counts` services (the first is the baseline of the
/// ratios), `pushes` pushes each, and returns its table.
pub(crate) fn services(counts: &[usize], pushes: usize) -> Table {
    let rows: Vec<Row> = counts.iter().map(|&n| one_count(n, pushes)).collect();
    let mut t = Table::new(
        "11. A push to one service against the number of services in the datacenter (real processes, master over `git://`)",
        &[
            "services",
            "pushes",
            "`git push` returning → `--exec` p50 / p99 ms",
            "`git push` p50 ms: with / without confcast's hooks",
            "relay CPU per push ms",
            "relay sync p50 ms (its log)",
            "`--exec` p50 / relay CPU × the first row",
            "target at 3,000: ≤ 1.5× both",
        ],
    );
    let base = rows.first().map(|r| (r.exec_p50, r.relay_cpu_ms));
    for row in &rows {
        let (exec_ratio, cpu_ratio) =
            base.map(|(exec, cpu)| (row.exec_p50 / exec, row.relay_cpu_ms / cpu)).unwrap_or_default();
        t.row(vec![
            row.services.to_string(),
            row.pushes.to_string(),
            format!("{:.1} / {:.1}", row.exec_p50, row.exec_p99),
            format!("{:.1} / {:.1}", row.push_p50, row.plain_push_p50),
            format!("{:.1}", row.relay_cpu_ms),
            format!("{:.0}", row.sync_p50),
            format!("{} / {}", ratio(exec_ratio), ratio(cpu_ratio)),
            if row.services >= 3_000 { verdict(exec_ratio <= 1.5 && cpu_ratio <= 1.5) } else { "—".into() },
        ]);
    }
    t
}

fn one_count(services: usize, pushes: usize) -> Row {
    let nats = NatsServer::start();
    let master = Master::new(&nats.url());
    let pins: Vec<String> = (0..services).map(|s| format!(r#"{{"name":"s{s}","branch":"master"}}"#)).collect();
    master.configuration("big", &format!(r#"{{"services":[{}]}}"#, pins.join(",")));
    master.datacenter("dc0", dc_doc());
    let mut import = Import::new();
    let roots: Vec<usize> =
        (0..services).map(|s| import.tree(&format!("refs/heads/services/s{s}/master"), FILES)).collect();
    let plain = synthetic::plain_pushes(pushes);
    let mut chain = import.one_line_changes("refs/bench/s0", roots[0], FILES, pushes + plain);
    let plain = chain.split_off(pushes);
    let ids = import.run(&master.work);
    let pushed = master.push_refspec("+refs/heads/services/*:refs/heads/services/*");
    assert!(pushed.ok, "push of {services} services: {}", pushed.stderr);
    let daemon = GitDaemon::start(&master.bare);
    let relay = Relay::start_url(&nats.url(), "dc0", &daemon.url("master.git"));
    let host = Subscriber::start(&nats.url(), "dc0", &["--service", "s0", "--verify-interval-secs", "0"]);
    exec_seen(&host, "s0", &ids[roots[0] - 1], Duration::from_secs(600)).expect("bootstrap");
    let relay_pid = relay.pid().expect("the relay runs");
    settle(&[relay_pid, host.pid().expect("the host runs")], Duration::from_secs(600));

    let log_from = relay.log().len();
    let cpu0 = cpu_with_children_ms(relay_pid);
    let (mut to_exec, mut push_only) = (Vec::new(), Vec::new());
    for mark in &chain {
        let commit = &ids[mark - 1];
        let (started, took) = synthetic::push(&master, "s0", commit);
        let seen = exec_seen(&host, "s0", commit, Duration::from_secs(60)).expect("exec of a one-service push");
        let returned: Instant = started + took;
        to_exec.push(seen.saturating_duration_since(returned).as_secs_f64() * 1000.0);
        push_only.push(took.as_secs_f64() * 1000.0);
    }
    settle(&[relay_pid], Duration::from_secs(60));
    let relay_cpu_ms = (cpu_with_children_ms(relay_pid) - cpu0) as f64 / pushes as f64;
    let (sync_p50, _, _, _) = summary(synced_ms(&relay.log(), log_from));
    let plain: Vec<f64> = plain
        .iter()
        .map(|mark| synthetic::push_without_hooks(&master, "s0", &ids[mark - 1]).as_secs_f64() * 1000.0)
        .collect();
    let (plain_push_p50, _, _, _) = summary(plain);
    let (exec_p50, _, exec_p99, _) = summary(to_exec);
    let (push_p50, _, _, _) = summary(push_only);
    eprintln!("services: {services} done");
    Row { services, pushes, exec_p50, exec_p99, push_p50, plain_push_p50, relay_cpu_ms, sync_p50 }
}
