//! Scenarios 2 and 6: what a push costs the master (requests and bytes through the
//! counting proxy, for D datacenters; none for a push nobody pins, none while idle), and
//! the polling design it replaces, against the same master.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use confcast_tests::{git, GitDaemon, NatsServer, Relay, Subscriber};

use crate::latency::{exec_seen, master};
use crate::proxy::{daemon_port, CountingProxy};
use crate::report::{summary, verdict, Table};

/// The table of master load, one row per number of datacenters.
pub(crate) fn load_table() -> Table {
    Table::new(
        "2. Master load per push (git requests and bytes through a counting proxy in front of `git daemon`)",
        &[
            "datacenters pinning the ref",
            "pushes",
            "master requests per push",
            "bytes served per push",
            "bytes changed per push",
            "requests for a push nobody pins",
            "requests in 5 s idle",
            "target ≤ D per push, 0 unpinned, 0 idle",
        ],
    )
}

/// The polling baseline's table: the measured row, and rows derived from it.
pub(crate) fn polling(hosts: usize, observe: Duration) -> Table {
    let mut polling = Table::new(
        "6. The polling baseline against the same master (H hosts running `git fetch` every T seconds)",
        &["design", "hosts", "master requests / s", "master bytes / s", "freshness p50 / p99 ms", "how"],
    );
    polling_baseline(hosts, Duration::from_secs(1), observe, &mut polling);
    for t in [10.0, 60.0] {
        polling.row(vec![
            format!("polling, T = {t} s"),
            hosts.to_string(),
            format!("{:.2}", hosts as f64 / t),
            "(as T = 1 s, scaled by 1/T)".into(),
            format!("{:.0} / {:.0}", t * 1000.0 / 2.0, t * 1000.0 * 0.99),
            "derived: a fetch every T s per host, a change waits T/2 on average".into(),
        ]);
    }
    polling.row(vec![
        "confcast".into(),
        "any".into(),
        "0 while idle; one per datacenter per relevant push".into(),
        "the change, once per datacenter".into(),
        "see table 1".into(),
        "measured (tables 1, 2)".into(),
    ]);
    polling
}

pub(crate) fn master_load(datacenters: usize, pushes: usize, t: &mut Table) {
    let nats = NatsServer::start();
    let (master, first) = master(&nats, datacenters);
    let daemon = GitDaemon::start(&master.bare);
    let proxy = CountingProxy::start(daemon_port(&daemon));
    let relays: Vec<Relay> =
        (0..datacenters).map(|d| Relay::start_url(&nats.url(), &format!("dc{d}"), &proxy.url())).collect();
    let subs: Vec<Subscriber> = (0..datacenters)
        .map(|d| {
            Subscriber::start(&nats.url(), &format!("dc{d}"), &["--service", "service0", "--verify-interval-secs", "0"])
        })
        .collect();
    for sub in &subs {
        exec_seen(sub, &first, Duration::from_secs(60)).expect("bootstrap");
    }
    thread::sleep(Duration::from_millis(300));
    let (c0, b0) = proxy.counts();
    let svc = master.on("services/service0/master");
    let mut change_bytes = 0u64;
    for i in 0..pushes {
        let content = format!("{i}: {}\n", "x".repeat(200));
        change_bytes += content.len() as u64;
        let commit = svc.write("app.conf", content).commit_push(&format!("push {i}")).commit;
        for sub in &subs {
            exec_seen(sub, &commit, Duration::from_secs(30)).expect("exec");
        }
    }
    thread::sleep(Duration::from_millis(300));
    let (c1, b1) = proxy.counts();
    // A push nobody pins.
    let other = master.on("services/unpinned/master").write("x", "1").commit_push("unpinned").commit;
    let _ = other;
    thread::sleep(Duration::from_secs(1));
    let (c2, _) = proxy.counts();
    thread::sleep(Duration::from_secs(5));
    let (c3, _) = proxy.counts();
    let per_push = (c1 - c0) as f64 / pushes as f64;
    let bytes_per_push = (b1 - b0) as f64 / pushes as f64;
    t.row(vec![
        datacenters.to_string(),
        pushes.to_string(),
        format!("{per_push:.2}"),
        format!("{:.0} B ({:.1} KB per DC)", bytes_per_push, bytes_per_push / datacenters as f64 / 1024.0),
        format!("{} B", change_bytes / pushes as u64),
        (c2 - c1).to_string(),
        (c3 - c2).to_string(),
        verdict(per_push <= datacenters as f64 && c2 == c1 && c3 == c2),
    ]);
    drop(relays);
}

/// Per host: when it fetched, and what the service's head was then.
type Observations = Arc<std::sync::Mutex<Vec<Vec<(Instant, String)>>>>;

fn polling_baseline(hosts: usize, period: Duration, observe: Duration, t: &mut Table) {
    let nats = NatsServer::start();
    let (master, _) = master(&nats, 1);
    let daemon = GitDaemon::start(&master.bare);
    let proxy = CountingProxy::start(daemon_port(&daemon));
    let root = tempfile::tempdir().expect("tempdir");
    let clones: Vec<std::path::PathBuf> = (0..hosts)
        .map(|h| {
            let dir = root.path().join(format!("host{h}"));
            git(root.path(), &["clone", "-q", "--bare", &proxy.url(), dir.to_str().expect("utf-8")]);
            git(&dir, &["config", "remote.origin.fetch", "+refs/heads/*:refs/heads/*"]);
            dir
        })
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    // Per host: when it fetched, and what the service's head was then.
    let seen: Observations = Arc::new(std::sync::Mutex::new(vec![Vec::new(); hosts]));
    let pollers: Vec<_> = clones
        .into_iter()
        .enumerate()
        .map(|(h, dir)| {
            let (stop, seen) = (stop.clone(), seen.clone());
            thread::spawn(move || {
                // Spread the hosts over the period, as real timers would be.
                thread::sleep(period.mul_f64(h as f64 / hosts as f64));
                while !stop.load(Ordering::SeqCst) {
                    let next = Instant::now() + period;
                    let _ =
                        std::process::Command::new("git").arg("-C").arg(&dir).args(["fetch", "-q", "origin"]).status();
                    let head = git(&dir, &["rev-parse", "refs/heads/services/service0/master"]);
                    seen.lock().expect("seen")[h].push((Instant::now(), head));
                    while Instant::now() < next && !stop.load(Ordering::SeqCst) {
                        thread::sleep(Duration::from_millis(5));
                    }
                }
            })
        })
        .collect();
    thread::sleep(period);
    let (c0, b0) = proxy.counts();
    let started = Instant::now();
    let mut pushes = Vec::new();
    let svc = master.on("services/service0/master");
    let mut i = 0;
    while started.elapsed() < observe {
        let c = svc.write("app.conf", format!("poll {i}\n")).commit_push("p").commit;
        pushes.push((c, Instant::now()));
        i += 1;
        thread::sleep(period.mul_f64(1.37));
    }
    thread::sleep(period + Duration::from_millis(500));
    let elapsed = started.elapsed().as_secs_f64();
    let (c1, b1) = proxy.counts();
    stop.store(true, Ordering::SeqCst);
    for p in pollers {
        let _ = p.join();
    }
    let seen = seen.lock().expect("seen");
    let index: BTreeMap<&str, usize> = pushes.iter().enumerate().map(|(i, (c, _))| (c.as_str(), i)).collect();
    let mut delays = Vec::new();
    for (i, (_, at)) in pushes.iter().enumerate() {
        // Each host's first fetch that saw this push or a later one.
        for host in seen.iter() {
            let first = host.iter().find(|(t, head)| t >= at && index.get(head.as_str()).is_some_and(|j| *j >= i));
            if let Some((t, _)) = first {
                delays.push((*t - *at).as_secs_f64() * 1000.0);
            }
        }
    }
    let (p50, _, p99, _) = summary(delays);
    t.row(vec![
        format!("polling, T = {} s", period.as_secs_f64()),
        hosts.to_string(),
        format!("{:.1}", (c1 - c0) as f64 / elapsed),
        format!("{:.0}", (b1 - b0) as f64 / elapsed),
        format!("{p50:.0} / {p99:.0}"),
        "measured".into(),
    ]);
}
