//! A push of one service of many moves that service alone, and the relay still converges
//! on the master: the configuration re-pinning a service is honoured (and from then on
//! the service follows its new pin only), and a ref moved while the relay was down,
//! without any event, is caught up when it starts again.

use confcast_schemas::{subject, Kind};
use confcast_tests::{git, index_value, wait_for, Datacenter, Master};
use std::time::Duration;

/// The services of the datacenter; the host runs the first four.
const SERVICES: [&str; 6] = ["service0", "service1", "service2", "service3", "service4", "service5"];

/// Configuration `big` pinning every service of [`SERVICES`] to its master branch.
fn all_on_master() -> String {
    let pins: Vec<String> = SERVICES.iter().map(|s| format!(r#"{{"name":"{s}","branch":"master"}}"#)).collect();
    format!(r#"{{"services":[{}]}}"#, pins.join(","))
}

/// Every service's first commit, configuration `big` and datacenter `dc1`; returns
/// service0's first commit.
fn many_services(master: &Master) -> String {
    let firsts: Vec<String> = SERVICES
        .iter()
        .map(|s| {
            master.on(&format!("services/{s}/master")).write("app.conf", format!("{s} 0\n")).commit_push("first").commit
        })
        .collect();
    master.configuration("big", &all_on_master());
    master.datacenter("dc1", r#"{"conf":"datacenter-configuration/big"}"#);
    firsts[0].clone()
}

/// The index key of `service` at `version` in `dc1`.
fn key(service: &str, version: &str) -> String {
    subject::index_key("dc1", Kind::Service, service, version)
}

/// The relay's log lines saying it synced.
fn syncs(log: &str) -> Vec<String> {
    log.lines().filter(|l| l.contains(" synced ")).map(str::to_owned).collect()
}

/// Commits a change of `app.conf` on `services/<service>/master` in the work clone.
fn commit(master: &Master, service: &str, content: &str) -> String {
    master.on(&format!("services/{service}/master")).write("app.conf", content).commit(content)
}

#[test]
fn a_push_of_one_service_moves_it_alone_and_repins_and_restarts_converge() {
    let dc = Datacenter::with_master(many_services)
        .host_flags(&[
            "--service",
            "service0",
            "--service",
            "service1",
            "--service",
            "service2",
            "--service",
            "service3",
        ])
        .start();
    let (nats, master, host) = (&dc.nats, &dc.master, &dc.host);
    let mut relay = dc.relay;
    let first = |service: &str| master.rev(&format!("refs/heads/services/{service}/master")).expect("first commit");
    for service in &SERVICES[..4] {
        host.wait_exec(service, &first(service));
    }
    let latest = |service: &str| index_value(&nats.url(), &key(service, "latest"));
    wait_for(Duration::from_secs(20), "every service in the index", || {
        SERVICES.iter().all(|s| latest(s) == Some(format!("master/{}", first(s)))).then_some(())
    });

    // One service of many: only it is followed again, and only it is published.
    let before = relay.log().len();
    let second = master.on("services/service1/master").write("app.conf", "service1 1\n").commit_push("second").commit;
    host.wait_exec("service1", &second);
    host.assert_tree(master, "service1", &second);
    let log = relay.log()[before..].to_owned();
    let published: Vec<&str> = log.lines().filter(|l| l.contains("published update")).collect();
    assert_eq!(published.len(), 1, "one update: {published:?}");
    assert!(published[0].contains("name=service1") && published[0].contains(&format!("to={second}")), "{log}");
    assert!(syncs(&log).iter().all(|l| l.contains("resolved=1 ")), "one service resolved: {log}");
    assert_eq!(latest("service1"), Some(format!("master/{second}")));
    for service in ["service0", "service2", "service3", "service4", "service5"] {
        assert_eq!(latest(service), Some(format!("master/{}", first(service))), "{service} did not move");
    }

    // The configuration re-pins service2 to a tag: honoured, and from then on a push to
    // its branch moves nothing while a move of its tag does.
    let tagged = commit(master, "service2", "service2 tagged\n");
    let tag = master.tag_push("services/service2/v1");
    assert_eq!(tag, tagged);
    let repinned = all_on_master()
        .replace(r#"{"name":"service2","branch":"master"}"#, r#"{"name":"service2","branch":"master","tag":"v1"}"#);
    master.configuration("big", &repinned);
    host.wait_exec("service2", &tag);
    host.assert_tree(master, "service2", &tag);
    wait_for(Duration::from_secs(20), "service2's index key to move to v1", || {
        (index_value(&nats.url(), &key("service2", "v1")) == Some(format!("master/{tag}"))).then_some(())
    });
    assert_eq!(latest("service2"), None, "the latest key went");

    let branch_only =
        master.on("services/service2/master").write("app.conf", "not pinned\n").commit_push("branch").commit;
    let third = master.on("services/service0/master").write("app.conf", "service0 1\n").commit_push("third").commit;
    // Events are handled in order: once service0's push is in, service2's was handled too.
    host.wait_exec("service0", &third);
    let execs = host.execs();
    assert!(!execs.iter().any(|l| l.contains(&branch_only)), "the branch is no longer service2's pin: {execs:?}");
    assert_eq!(index_value(&nats.url(), &key("service2", "v1")), Some(format!("master/{tag}")));

    let retagged = master.on("services/service2/master").write("app.conf", "service2 v1 again\n").commit("retag");
    assert_eq!(master.tag_push("services/service2/v1"), retagged);
    host.wait_exec("service2", &retagged);
    host.assert_tree(master, "service2", &retagged);

    // Moved while the relay was down, behind the hooks' back (no event): caught up at
    // start. service3 goes through the host, service5 through the index.
    relay.kill();
    let moved3 = commit(master, "service3", "service3 moved\n");
    let moved5 = commit(master, "service5", "service5 moved\n");
    let work = master.work.display().to_string();
    git(
        &master.bare,
        &[
            "fetch",
            "-q",
            &work,
            "+refs/heads/services/service3/master:refs/heads/services/service3/master",
            "+refs/heads/services/service5/master:refs/heads/services/service5/master",
        ],
    );
    relay.restart();
    host.wait_exec("service3", &moved3);
    host.assert_tree(master, "service3", &moved3);
    wait_for(Duration::from_secs(20), "service5's index key to catch up", || {
        (latest("service5") == Some(format!("master/{moved5}"))).then_some(())
    });

    // And after the restart, a push of one service is again that service's alone.
    let before = relay.log().len();
    let fourth = master.on("services/service0/master").write("app.conf", "service0 2\n").commit_push("fourth").commit;
    host.wait_exec("service0", &fourth);
    host.assert_tree(master, "service0", &fourth);
    let log = relay.log()[before..].to_owned();
    assert!(syncs(&log).iter().all(|l| l.contains("resolved=1 ")), "one service resolved: {log}");
    assert_eq!(latest("service1"), Some(format!("master/{second}")));
}
