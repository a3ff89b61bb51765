//! An operator's mistakes never cost a host its configuration, and the host says what is
//! wrong: an inventory entry naming a service the datacenter does not publish removes
//! nothing; a second subscriber on one state directory stops at once; a datacenter with
//! no relay, or a `--service` it does not publish, is named once; what `--exec` prints
//! reaches the log line by line, prefixed with the service.

use std::process::{Command, Stdio};
use std::time::Duration;

use confcast_tests::{bin, host_status, wait_for, Datacenter, Master, NatsServer, Relay, Subscriber};

/// `dc1`'s datacenter document with host-a's inventory entry listing `services`.
fn dc1_with_host_a(services: &str) -> String {
    format!(
        r#"{{ "conf": "datacenter-configuration/big",
        "inventories": {{ "hosts": {{ "host-a": {{ "services": {services} }} }} }} }}"#
    )
}

#[test]
fn an_inventory_typo_never_removes_the_live_tree() {
    let dc = Datacenter::with_master(|master| {
        let first = master.publish_service0();
        master.datacenter("dc1", &dc1_with_host_a(r#"["service0"]"#));
        first
    })
    .host_flags(&["--host", "host-a"])
    .start();
    let (nats, master, sub, first) = (&dc.nats, &dc.master, &dc.host, &dc.first);

    // `servcie0` for `service0`, pushed past pre-receive as a bypassed hook would let it.
    master.without_pre_receive(|| master.datacenter("dc1", &dc1_with_host_a(r#"["servcie0"]"#)));
    let warning = wait_for(Duration::from_secs(20), "the host to say why it keeps service0", || {
        sub.log().lines().find(|l| l.contains("WARN") && l.contains("servcie0")).map(str::to_owned)
    });
    assert!(warning.contains("does not publish") && warning.contains("keeping service service0"), "{warning}");
    let reported = wait_for(Duration::from_secs(10), "servcie0's status of host-a", || {
        host_status(&nats.url(), "dc1", "host-a", "servcie0").filter(|s| !s.ok)
    });
    let error = reported.error.unwrap_or_default();
    assert!(error.contains("not published in datacenter dc1") && error.contains("service service0"), "{error}");
    sub.assert_tree(master, "service0", first);
    assert_eq!(sub.execs().len(), 1, "no exec: {:?}", sub.execs());

    // The kept service still takes its updates.
    let second = master.on("services/service0/master").write("app.conf", "1\n").commit_push("second").commit;
    let execs = sub.wait_exec("service0", &second);
    sub.assert_tree(master, "service0", &second);
    assert_eq!(execs.len(), 2, "nothing was removed in between: {execs:?}");

    // An entry that explicitly lists nothing is a removal, said at WARN with its reason.
    master.datacenter("dc1", &dc1_with_host_a("[]"));
    sub.wait_exec("service0", "");
    assert!(!sub.service_dir("service0").exists());
    let log = sub.log();
    if std::env::var_os("CONFCAST_SHOW_LOGS").is_some() {
        eprintln!("--- subscriber\n{log}");
    }
    let removal = log.lines().find(|l| l.contains("removing service service0")).expect("the removal is logged");
    assert!(
        removal.contains("WARN") && removal.contains("host host-a's entry") && removal.contains("no longer lists it"),
        "{removal}"
    );
}

#[test]
fn a_second_subscriber_on_a_state_directory_stops_at_once() {
    let dc = Datacenter::with_service0().start();
    let (nats, master, sub) = (&dc.nats, &dc.master, &dc.host);

    let other = tempfile::tempdir().expect("tempdir");
    let mut second = Command::new(bin("subscriber"))
        .args(["--nats", &nats.url(), "--dc", "dc1", "--service", "service0", "--dir"])
        .arg(other.path())
        .arg("--state-dir")
        .arg(sub.state_dir())
        .args(["--exec", "echo second >> exec.log"])
        .current_dir(other.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("subscriber runs");
    let status =
        wait_for(Duration::from_secs(10), "the second subscriber to exit", || second.try_wait().ok().flatten());
    let stderr = std::io::read_to_string(second.stderr.take().expect("stderr")).expect("stderr");
    assert!(!status.success(), "{stderr}");
    let pid = sub.pid().expect("running");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    assert!(
        stderr.contains(&sub.state_dir().display().to_string())
            && stderr.contains("in use by another subscriber")
            && stderr.contains(&format!("pid {pid}")),
        "{stderr}"
    );
    assert!(!other.path().join("exec.log").exists() && !other.path().join("service0").exists());

    // The first one keeps working.
    let second_commit = master.on("services/service0/master").write("app.conf", "1\n").commit_push("second").commit;
    sub.wait_exec("service0", &second_commit);
    sub.assert_tree(master, "service0", &second_commit);
}

#[test]
fn a_datacenter_without_relay_and_an_unknown_service_are_named_once() {
    let nats = NatsServer::start();
    let (master, first) = Master::with_service0(&nats.url());
    let known = Subscriber::start(&nats.url(), "dc1", &["--service", "service0"]);
    let unknown = Subscriber::start(&nats.url(), "dc1", &["--service", "nosuch"]);
    let hint = |sub: &Subscriber| {
        sub.log()
            .lines()
            .filter(|l| l.contains("WARN") && l.contains("has no relay: stream CONFCAST_DC_dc1 does not exist"))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let line = wait_for(Duration::from_secs(5), "the no-relay hint", || hint(&known).into_iter().next());
    assert!(line.contains(&format!("relay --dc dc1 --nats {}", nats.url())), "{line}");
    wait_for(Duration::from_secs(5), "the no-relay hint of the other", || hint(&unknown).into_iter().next());

    // Once the relay runs, the known service arrives and the unknown one is named.
    let _relay = Relay::start(&nats.url(), "dc1", &master.bare);
    known.wait_exec("service0", &first);
    let named = wait_for(Duration::from_secs(20), "the unknown service to be named", || {
        unknown.log().lines().find(|l| l.contains("service nosuch is not published")).map(str::to_owned)
    });
    assert!(named.contains("WARN") && named.contains("datacenter dc1"), "{named}");
    // Each said it once in all that time, not once per attempt.
    assert_eq!(hint(&known).len(), 1, "{}", known.log());
    assert_eq!(hint(&unknown).len(), 1, "{}", unknown.log());
    assert_eq!(unknown.log().matches("service nosuch is not published").count(), 1, "{}", unknown.log());
    assert!(unknown.execs().is_empty());
    if std::env::var_os("CONFCAST_SHOW_LOGS").is_some() {
        eprintln!("--- known\n{}\n--- unknown\n{}", known.log(), unknown.log());
    }
}

#[test]
fn exec_output_and_outcome_are_in_the_log() {
    let dc = Datacenter::with_service0().exec_then("echo reloading the app; echo 'deprecated key' >&2").start();
    let (nats, sub, first) = (&dc.nats, &dc.host, &dc.first);
    let done = wait_for(Duration::from_secs(10), "the exec's INFO line", || {
        sub.log().lines().find(|l| l.contains("--exec succeeded")).map(str::to_owned)
    });
    assert!(
        done.contains("INFO") && done.contains("name=service0") && done.contains(&format!("commit={first}")),
        "{done}"
    );
    assert!(done.contains("exit_status=0") && done.contains("took_ms="), "{done}");

    let log = sub.log();
    let output: Vec<&str> =
        log.lines().filter(|l| l.contains("reloading the app") || l.contains("deprecated key")).collect();
    assert_eq!(output.len(), 2, "{log}");
    assert!(output.iter().all(|l| l.contains("INFO") && l.contains("service0: ")), "{output:?}");

    // How it was started, in one line.
    let start = log.lines().find(|l| l.contains("subscriber starting")).expect("a start-up line");
    for part in
        ["version=", "dc=dc1", "dir=", "state_dir=", &format!("nats={}", nats.url()), "selection=--service service0"]
    {
        assert!(start.contains(part), "{part} missing: {start}");
    }
}
