//! The whole pipeline against a real nats-server and real `git push`: hook → relay →
//! subscriber → exec.

use std::time::Duration;

use confcast_tests::{wait_for, Master, NatsServer, Relay, Subscriber};

const CONF: &str = r#"{ "services": [
    { "name": "service0", "branch": "master", "tag": "latest" },
    { "name": "pinned", "branch": "master", "tag": "v1.0" } ] }"#;

/// A datacenter `dc1` following `datacenter-configuration/big`, with `service0` on its
/// master branch and `pinned` at tag v1.0.
fn master_with_dc1(nats: &NatsServer) -> (Master, String) {
    let master = Master::new(&nats.url());
    master.configuration("big", CONF);
    master.datacenter("dc1", r#"{ "conf": "datacenter-configuration/big",
        "inventories": { "hosts": { "host-a": { "services": ["service0", "pinned"] } } } }"#);
    let first = master.on("services/service0/master").write("app.conf", "port = 80\n").commit_push("first").commit;
    master.on("services/pinned/master").write("p.conf", "v1\n").commit_push("pinned v1");
    master.tag_push("services/pinned/v1.0");
    (master, first)
}

#[test]
fn a_push_reaches_the_subscriber_exactly_and_runs_exec_once() {
    let nats = NatsServer::start();
    let (master, first) = master_with_dc1(&nats);
    let _relay = Relay::start(&nats.url(), "dc1", &master.bare);
    let sub = Subscriber::start(&nats.url(), "dc1", &["--service", "service0"]);

    // Bootstrap: a fresh host gets the current state and runs exec for it.
    sub.wait_exec("service0", &first);
    sub.assert_tree(&master, "service0", &first);

    let pushed = master.on("services/service0/master").write("app.conf", "port = 8080\n").write("new/nested/file", "x").commit_push("second");
    assert!(pushed.stderr.contains("confcast: announced 1 ref update(s)"), "hook output: {}", pushed.stderr);
    let execs = sub.wait_exec("service0", &pushed.commit);
    sub.assert_tree(&master, "service0", &pushed.commit);
    let dir = sub.service_dir("service0");
    assert_eq!(
        execs,
        vec![
            format!("service0 {first} refs/heads/services/service0/master {}", dir.display()),
            format!("service0 {} refs/heads/services/service0/master {}", pushed.commit, dir.display()),
        ],
        "exec ran once per change with the contract's environment"
    );
}
