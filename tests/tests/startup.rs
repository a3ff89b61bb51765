//! An operator's mistakes are caught at the door: a relay given a master that can never
//! work, or a flag it does not know, stops at once with one line and exit status 2; one
//! whose master or bus is only down says so in one WARN line naming the URL and keeps
//! trying, without holding the datacenter's lease from a relay that works; `publisher
//! status` tells at once that a commit is unknown; the hooks answer `--help` and
//! `--version`; `--log-format json` writes one JSON object per line.

use std::process::Command;
use std::time::Duration;

use confcast_schemas::{subject, Kind};
use confcast_tests::{
    bin, free_port as closed_port, index_value, run_within as run, wait_for, Master, NatsServer, Ran, Relay, Subscriber,
};

fn relay(args: &[&str]) -> Ran {
    let state = tempfile::tempdir().expect("tempdir");
    let nats = format!("nats://127.0.0.1:{}", closed_port());
    let mut command = Command::new(bin("relay"));
    command.args(["--nats", &nats, "--state-dir"]).arg(state.path()).args(args).env_remove("RUST_LOG");
    run(&mut command, Duration::from_secs(10))
}

#[test]
fn mistakes_that_can_never_work_stop_at_once_in_one_line() {
    for (args, problem) in [
        (&["--dc", "dc1", "--master", "/no/such/path"][..], "--master /no/such/path"),
        (&["--dc", "dc1", "--master", "htp://x/master.git"], "unsupported scheme `htp`"),
        (&["--dc", "dc1", "--master", "/tmp", "--dcc", "dc2"], "unexpected argument '--dcc'"),
        (&["--master", "/tmp"], "--dc <DC>"),
    ] {
        let ran = relay(args);
        assert_eq!(ran.code, Some(2), "relay {args:?}: {ran:?}");
        assert!(ran.took < Duration::from_secs(2), "at once, without waiting for NATS: {ran:?}");
        assert_eq!(ran.stderr.lines().count(), 1, "one line: {ran:?}");
        assert!(ran.stderr.starts_with("relay: ") && ran.stderr.contains(problem), "names {problem:?}: {ran:?}");
        assert!(!ran.stderr.contains("Message {") && !ran.stderr.contains("Os {"), "no Debug dumps: {ran:?}");
    }

    // As one JSON object with --log-format json.
    let ran = relay(&["--dc", "dc1", "--master", "/no/such/path", "--log-format", "json"]);
    assert_eq!(ran.code, Some(2), "{ran:?}");
    let line: serde_json::Value = serde_json::from_str(ran.stderr.trim()).expect("one JSON object");
    assert_eq!(line["level"], "ERROR", "{line}");
    assert!(line["error"].as_str().is_some_and(|e| e.contains("/no/such/path")), "{line}");

    // The hooks answer a human at once, without reading the stdin git would give them.
    for (hook, args, answer) in [
        ("post-receive", &["--help"][..], "post-receive hook"),
        ("post-receive", &["--version"], "post-receive "),
        ("pre-receive", &["--help"], "pre-receive hook"),
        ("pre-receive", &["--version"], "pre-receive "),
    ] {
        let ran = run(Command::new(bin(hook)).args(args), Duration::from_secs(5));
        assert_eq!(ran.code, Some(0), "{hook} {args:?}: {ran:?}");
        assert!(ran.stdout.contains(answer), "{hook} {args:?}: {ran:?}");
    }
}

#[test]
fn a_relay_that_cannot_fetch_leaves_the_lease_to_one_that_can() {
    let nats = NatsServer::start();
    let (master, first) = Master::with_service0(&nats.url());
    let unreachable = format!("git://127.0.0.1:{}/master.git", closed_port());
    let broken = Relay::start_url(&nats.url(), "dc1", &unreachable);
    wait_for(Duration::from_secs(20), "the broken relay to say why it waits", || {
        broken.log().contains("the first fetch from the master failed; will retry").then_some(())
    });

    // A good relay of the same datacenter, started second, takes the lease at once and
    // delivers.
    let good = Relay::start(&nats.url(), "dc1", &master.bare);
    let sub = Subscriber::start(&nats.url(), "dc1", &["--service", "service0"]);
    sub.wait_exec("service0", &first);
    let pushed = master.on("services/service0/master").write("app.conf", "1\n").commit_push("second");
    sub.wait_exec("service0", &pushed.commit);
    sub.assert_tree(&master, "service0", &pushed.commit);
    assert!(good.log().contains("holding the datacenter's lease"), "{}", good.log());

    let log = broken.log();
    assert!(!log.contains("holding the datacenter's lease"), "the broken relay never took the lease:\n{log}");
    let warnings: Vec<&str> = log.lines().filter(|l| l.contains("WARN") && l.contains("first fetch")).collect();
    assert!(!warnings.is_empty() && warnings.len() <= 2, "rate-limited, not one per attempt:\n{log}");
    let line = warnings[0];
    assert!(line.contains(&unreachable) && line.contains("retry_in="), "cause, URL and next attempt: {line}");
    assert!(!log.contains("Message {") && !log.contains("Os {"), "no Debug dumps:\n{log}");
}

#[test]
fn a_relay_without_nats_says_where_it_tried_once_as_text_or_json() {
    let master = Master::new("nats://127.0.0.1:1");
    let down = format!("nats://127.0.0.1:{}", closed_port());
    let text = Relay::start(&down, "dc1", &master.bare);
    let json = Relay::start_with(&down, "dc1", &master.bare.display().to_string(), &["--log-format", "json"]);
    std::thread::sleep(Duration::from_secs(3));

    let log = text.log();
    let warnings: Vec<&str> = log.lines().filter(|l| l.contains("WARN")).collect();
    assert_eq!(warnings.len(), 1, "one line for the same cause:\n{log}");
    assert!(warnings[0].contains(&format!("cannot connect to NATS at {down}: ")), "{}", warnings[0]);
    assert!(warnings[0].contains("retry_in="), "{}", warnings[0]);
    assert!(!log.contains("IO error\n") && !log.contains("INFO async_nats"), "{log}");
    let start = log.lines().find(|l| l.contains("relay starting")).unwrap_or_else(|| panic!("a start line:\n{log}"));
    for part in ["version=", "dc=dc1", &format!("nats={down}"), "master=/", "state_dir=", "index=nats-kv"] {
        assert!(start.contains(part), "{part:?} in {start}");
    }

    let log = json.log();
    let lines: Vec<serde_json::Value> =
        log.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))).collect();
    assert!(lines.iter().any(|l| l["message"] == "relay starting" && l["dc"] == "dc1"), "{log}");
    let warning = lines.iter().find(|l| l["level"] == "WARN").unwrap_or_else(|| panic!("a warning:\n{log}"));
    assert!(warning["message"].as_str().is_some_and(|m| m.contains(&down)), "{warning}");
}

#[test]
fn publisher_status_tells_an_unknown_commit_at_once_and_exit_codes_agree() {
    let nats = NatsServer::start();
    let (master, first) = Master::with_service0(&nats.url());
    let _relay = Relay::start(&nats.url(), "dc1", &master.bare);
    let key = subject::index_key("dc1", Kind::Service, "service0", "latest");
    wait_for(Duration::from_secs(20), "the relay to publish service0", || index_value(&nats.url(), &key));

    let status = |args: &[&str], env: &[(&str, &str)]| {
        let mut command = Command::new(bin("publisher"));
        command.arg("status").args(args).envs(env.iter().copied());
        run(&mut command, Duration::from_secs(40))
    };
    let url = nats.url();
    let ran = status(&["deadbeefdeadbeef", "--nats", &url, "--timeout-secs", "30"], &[]);
    assert_eq!(ran.code, Some(1), "{ran:?}");
    assert!(ran.took < Duration::from_secs(10), "at once, not at its timeout: {ran:?}");
    assert!(ran.stdout.contains("commit deadbeefdeadbeef is unknown"), "{ran:?}");

    // A commit that is there: complete (no host reports yet). CONFCAST_DC, one
    // datacenter for relays and hosts, is no filter here; CONFCAST_STATUS_DC is.
    let ran = status(&[&first, "--nats", &url, "--timeout-secs", "10"], &[("CONFCAST_DC", "elsewhere")]);
    assert_eq!(ran.code, Some(0), "{ran:?}");
    let ran = status(&[&first, "--nats", &url, "--timeout-secs", "10"], &[("CONFCAST_STATUS_DC", "elsewhere")]);
    assert_eq!(ran.code, Some(2), "an unknown datacenter: {ran:?}");

    // NATS down: 2 from every command, in one line naming the URL.
    let down = format!("nats://127.0.0.1:{}", closed_port());
    let ran = status(&[&first, "--nats", &down, "--timeout-secs", "1"], &[]);
    assert_eq!(ran.code, Some(2), "{ran:?}");
    let mut drain = Command::new(bin("publisher"));
    drain.arg("drain").arg(&master.bare).args(["--nats", &down, "--timeout-secs", "1"]);
    let drained = run(&mut drain, Duration::from_secs(20));
    assert_eq!(drained.code, Some(2), "{drained:?}");
    for ran in [&ran, &drained] {
        assert_eq!(ran.stderr.lines().count(), 1, "{ran:?}");
        assert!(ran.stderr.contains(&format!("cannot connect to NATS at {down}")), "{ran:?}");
    }
}
