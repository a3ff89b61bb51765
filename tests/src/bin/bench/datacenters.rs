//! Scenario 10: push → every host current with several datacenters fetching over
//! `git://` from one `git daemon`, next to a plain `git fetch` of the same push from the
//! same daemon.
//!
//! D relays (real processes, `--master git://…`, `--listen` for their metrics) and H
//! hosts per datacenter (real `subscriber` processes following `service0`). Each push
//! changes one line of `service0`; it is timed from the start of `git push` to the last
//! host's `--exec`. Then, with every process done, a plain `git fetch` of the same ref
//! from the same daemon into a bare clone of its own is timed: what git itself takes for
//! that push on this machine at that moment. The relays' own fetch time comes from their
//! metrics (`confcast_relay_fetch_seconds`, sum and count before and after: a mean), so
//! the relay's fetch is compared with git's by their means.

use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use confcast_tests::{free_ports, git, GitDaemon, NatsServer, Relay, Subscriber};

use crate::latency::master;
use crate::observe::{execs_seen, fetch_seconds, settle};
use crate::report::{ratio, summary, verdict, Table};

/// The ref every push moves.
const REF: &str = "refs/heads/services/service0/master";

/// Runs `pushes` pushes to `datacenters` × `hosts` hosts and returns the table.
pub(crate) fn datacenters(datacenters: usize, hosts: usize, pushes: usize) -> Table {
    let nats = NatsServer::start();
    let (master, first) = master(&nats, datacenters);
    let daemon = GitDaemon::start(&master.bare);
    let ports = free_ports(datacenters);
    let relays: Vec<Relay> = ports
        .iter()
        .enumerate()
        .map(|(d, port)| {
            let listen = format!("127.0.0.1:{port}");
            Relay::start_with(&nats.url(), &format!("dc{d}"), &daemon.url("master.git"), &["--listen", &listen])
        })
        .collect();
    let subs: Vec<Subscriber> = (0..datacenters * hosts)
        .map(|h| {
            let dc = format!("dc{}", h % datacenters);
            Subscriber::start(&nats.url(), &dc, &["--service", "service0", "--verify-interval-secs", "0"])
        })
        .collect();
    let all: Vec<&Subscriber> = subs.iter().collect();
    execs_seen(&all, "service0", &first, Duration::from_secs(60)).expect("bootstrap");
    let pids: Vec<u32> = relays.iter().filter_map(Relay::pid).chain(subs.iter().filter_map(Subscriber::pid)).collect();
    settle(&pids, Duration::from_secs(30));

    let scratch = tempfile::tempdir().expect("tempdir");
    let clone = scratch.path().join("clone.git");
    git(scratch.path(), &["clone", "-q", "--bare", &daemon.url("master.git"), clone.to_str().expect("utf-8")]);
    let fetch_all = || ports.iter().map(|p| fetch_seconds(*p)).fold((0.0, 0), |(s, n), (ds, dn)| (s + ds, n + dn));
    let (relay_s0, relay_n0) = fetch_all();
    let svc = master.on("services/service0/master");
    let (mut every, mut push_only, mut plain) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..pushes {
        let commit = svc.write("app.conf", format!("{i}\n")).commit(&format!("push {i}"));
        let pushed = svc.push();
        let returned = Instant::now();
        assert!(pushed.ok, "push: {}", pushed.stderr);
        let started = returned - pushed.took;
        let seen = execs_seen(&all, "service0", &commit, Duration::from_secs(30)).expect("every host current");
        every.push((seen - started).as_secs_f64() * 1000.0);
        push_only.push(pushed.took.as_secs_f64() * 1000.0);
        thread::sleep(Duration::from_millis(50));
        let fetch = Instant::now();
        let out = Command::new("git")
            .arg("-C")
            .arg(&clone)
            .args(["fetch", "-q", "origin", &format!("+{REF}:{REF}")])
            .output()
            .expect("git fetch runs");
        plain.push(fetch.elapsed().as_secs_f64() * 1000.0);
        assert!(out.status.success(), "git fetch: {}", String::from_utf8_lossy(&out.stderr));
        thread::sleep(Duration::from_millis(20));
    }
    let (relay_s1, relay_n1) = fetch_all();
    let relay_fetches = relay_n1.saturating_sub(relay_n0);
    let relay_mean = if relay_fetches > 0 { (relay_s1 - relay_s0) * 1000.0 / relay_fetches as f64 } else { f64::NAN };
    let plain_mean = plain.iter().sum::<f64>() / plain.len().max(1) as f64;
    let (p50, _, p99, _) = summary(every);
    let (push50, _, _, _) = summary(push_only);
    let (plain50, _, _, _) = summary(plain);
    let mut t = Table::new(
        "10. Push → every host current, several datacenters fetching over `git://` from one `git daemon` (real processes), next to a plain `git fetch` of each push",
        &[
            "D × H",
            "pushes",
            "every host current p50 / p99 ms (from the start of `git push`)",
            "`git push` p50 ms",
            "plain `git fetch` p50 / mean ms",
            "relay fetch mean ms (its metrics; fetches)",
            "relay fetch / `git fetch` (means)",
            "target p50 ≤ 60 ms, relay fetch ≤ 1.5×",
        ],
    );
    let fetch_ratio = relay_mean / plain_mean;
    t.row(vec![
        format!("{datacenters} × {hosts}"),
        pushes.to_string(),
        format!("{p50:.1} / {p99:.1}"),
        format!("{push50:.1}"),
        format!("{plain50:.1} / {plain_mean:.1}"),
        format!("{relay_mean:.1} ({relay_fetches})"),
        ratio(fetch_ratio),
        verdict(p50 <= 60.0 && fetch_ratio <= 1.5),
    ]);
    t
}
