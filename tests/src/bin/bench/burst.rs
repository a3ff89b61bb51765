//! Scenario 4: one `git push` updating N services at once; time until every host
//! process has applied all of them (the first burst after start, and the third, when
//! hosts recycle old trees).

use std::collections::BTreeMap;
use std::thread;
use std::time::{Duration, Instant};

use confcast_tests::{git, Master, NatsServer, Relay, Subscriber};

use crate::report::{verdict, Table};

/// The burst table, one row per measured burst.
pub(crate) fn table() -> Table {
    Table::new(
        "4. Burst: one `git push` updating N services at once; time until every host has applied all of them",
        &[
            "burst",
            "ref updates",
            "hosts (real processes)",
            "`git push` ms",
            "every host current ms",
            "target ≤ 2000 ms",
        ],
    )
}

pub(crate) fn burst(hosts: usize, services: usize, t: &mut Table) {
    let nats = NatsServer::start();
    let master = Master::new(&nats.url());
    let pins: Vec<String> = (0..services).map(|s| format!(r#"{{"name":"s{s}","branch":"master"}}"#)).collect();
    master.configuration("big", &format!(r#"{{"services":[{}]}}"#, pins.join(",")));
    let names: Vec<String> = (0..services).map(|s| format!("\"s{s}\"")).collect();
    let inventory: Vec<String> =
        (0..hosts).map(|h| format!(r#""h{h}":{{"services":[{}]}}"#, names.join(","))).collect();
    master.datacenter(
        "dc0",
        &format!(r#"{{"conf":"datacenter-configuration/big","inventories":{{"hosts":{{{}}}}}}}"#, inventory.join(",")),
    );
    for s in 0..services {
        master.on(&format!("services/s{s}/master")).write("app.conf", "0\n").commit(&format!("s{s}"));
    }
    let all: Vec<String> =
        (0..services).map(|s| format!("+refs/heads/services/s{s}/master:refs/heads/services/s{s}/master")).collect();
    assert!(master.push_refspecs(&all).ok);
    let _relay = Relay::start(&nats.url(), "dc0", &master.bare);
    let subs: Vec<Subscriber> = (0..hosts)
        .map(|h| Subscriber::start(&nats.url(), "dc0", &["--host", &format!("h{h}"), "--verify-interval-secs", "0"]))
        .collect();
    let current = |sub: &Subscriber, want: &BTreeMap<String, String>| {
        let log = std::fs::read_to_string(&sub.exec_log).unwrap_or_default();
        let mut last: BTreeMap<&str, &str> = BTreeMap::new();
        for line in log.lines() {
            let mut parts = line.split(' ');
            if let (Some(s), Some(c)) = (parts.next(), parts.next()) {
                last.insert(s, c);
            }
        }
        want.iter().all(|(s, c)| last.get(s.as_str()) == Some(&c.as_str()))
    };
    // Every service's commit as the master's work tree has it now.
    let heads = || -> BTreeMap<String, String> {
        (0..services)
            .map(|s| (format!("s{s}"), git(&master.work, &["rev-parse", &format!("services/s{s}/master")])))
            .collect()
    };
    let initial = heads();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !subs.iter().all(|s| current(s, &initial)) {
        assert!(Instant::now() < deadline, "bootstrap of the burst scenario");
        thread::sleep(Duration::from_millis(20));
    }
    // One commit on every service, pushed in one `git push`: `services` ref updates
    // within a second. Three bursts: in the first every host builds every service's
    // second tree from scratch (the cold case, right after the hosts started); from the
    // third on, hosts have old trees to recycle (the steady state of a running system).
    for round in 1..=3 {
        for s in 0..services {
            master.on(&format!("services/s{s}/master")).write("app.conf", format!("burst {round}\n")).commit("burst");
        }
        let want = heads();
        let started = Instant::now();
        assert!(master.push_refspecs(&all).ok);
        let pushed = started.elapsed();
        while !subs.iter().all(|s| current(s, &want)) {
            assert!(started.elapsed() < Duration::from_secs(120), "burst convergence");
            thread::sleep(Duration::from_millis(5));
        }
        let took = started.elapsed();
        let case = match round {
            1 => "first (every tree new)",
            2 => continue,
            _ => "third (trees recycled)",
        };
        t.row(vec![
            case.to_owned(),
            services.to_string(),
            hosts.to_string(),
            format!("{:.0}", pushed.as_secs_f64() * 1000.0),
            format!("{:.0}", took.as_secs_f64() * 1000.0),
            verdict(took <= Duration::from_secs(2)),
        ]);
        thread::sleep(Duration::from_millis(500));
    }
}
