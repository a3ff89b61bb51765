//! Network faults between the relay and NATS and between the relay and the master,
//! through a proxy the test controls: black hole, connection resets, added latency.
//! After the network heals, every host converges on the last push.

use std::thread;
use std::time::Duration;

use confcast_tests::{Fault, FaultProxy, GitDaemon, Master, NatsServer, Relay, Subscriber};

fn pushes(master: &Master, n: usize, pushed: &mut Vec<String>) {
    let svc = master.on("services/service0/master");
    for i in 0..n {
        let p = svc.write("app.conf", format!("{i} {}\n", pushed.len())).commit_push("push");
        assert!(p.took < Duration::from_secs(2), "pushes never wait for the relay");
        pushed.push(p.commit);
    }
}

/// Runs `faults` in turn on the path chosen by `relay_via`, pushing during each.
fn scenario(between_relay_and_nats: bool, faults: &[(Fault, Duration)]) {
    let nats = NatsServer::start();
    let (master, first) = Master::with_service0(&nats.url());
    let daemon = GitDaemon::start(&master.bare);
    let proxy = FaultProxy::start(if between_relay_and_nats { nats.port() } else { daemon.port() });
    // A short fetch timeout, so a black-holed fetch fails and is retried within the test.
    let quick = ["--fetch-timeout-secs", "2"];
    let relay = if between_relay_and_nats {
        Relay::start_with(&format!("nats://127.0.0.1:{}", proxy.port()), "dc1", &daemon.url("master.git"), &quick)
    } else {
        Relay::start_with(&nats.url(), "dc1", &format!("git://127.0.0.1:{}/master.git", proxy.port()), &quick)
    };
    let sub = Subscriber::start(&nats.url(), "dc1", &["--service", "service0"]);
    sub.wait_exec("service0", &first);
    let mut pushed = vec![first];
    for (fault, hold) in faults {
        proxy.set(*fault);
        pushes(&master, 3, &mut pushed);
        thread::sleep(*hold);
        proxy.set(Fault::Pass);
        pushes(&master, 1, &mut pushed);
    }
    let last = pushed.last().expect("pushed").clone();
    let (_, duplicates) = sub.assert_converged(&master, "service0", &last, &pushed);
    assert_eq!(duplicates, 0);
    drop(relay);
}

#[test]
fn relay_to_master_black_hole_reset_and_latency() {
    scenario(
        false,
        &[
            (Fault::BlackHole, Duration::from_secs(2)),
            (Fault::Reset, Duration::from_secs(1)),
            (Fault::Latency(100), Duration::from_secs(1)),
        ],
    );
}

#[test]
fn relay_to_nats_black_hole_reset_and_latency() {
    scenario(
        true,
        &[
            (Fault::BlackHole, Duration::from_secs(2)),
            (Fault::Reset, Duration::from_secs(1)),
            (Fault::Latency(100), Duration::from_secs(1)),
        ],
    );
}
