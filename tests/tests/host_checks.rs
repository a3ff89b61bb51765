//! A host's own verdict on a change. `--check-cmd` looks at a new tree before it goes
//! live: a tree it refuses is never switched to (the link keeps the last good tree,
//! `--exec` does not run) and the host reports the service unhealthy with what the check
//! said, on every path — a lone update, a bootstrap, a batch of services switched
//! together. `--health-cmd` runs after `--exec`; either failing makes the service
//! unhealthy, both passing healthy, on the bus and in the local API.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use confcast_schemas::message::HealthState;
use confcast_schemas::HostStatus;
use confcast_tests::{
    bin, free_port, host_status, http_get, run, wait_for, Datacenter, Master, NatsServer, Relay, Subscriber,
};

/// The host id every test gives its host, so that its status subject is known.
const HOST: &str = "h0";

/// A check that refuses a tree whose `app.conf` says `bad`, saying so, and appends each
/// commit it looks at to `log`.
fn refusing_bad(log: &Path) -> String {
    format!(
        r#"echo "$CONFCAST_COMMIT" >> '{}'; if grep -q bad "$CONFCAST_DIR/app.conf"; then echo "app.conf of $CONFCAST_SERVICE is bad: $(cat "$CONFCAST_DIR/app.conf")"; exit 1; fi"#,
        log.display()
    )
}

/// Lines of a file that may not exist yet.
fn lines(path: &Path) -> Vec<String> {
    fs::read_to_string(path).unwrap_or_default().lines().map(str::to_owned).collect()
}

/// Waits until the last status the host reported for `service` satisfies `want`.
fn wait_status(nats: &str, service: &str, what: &str, want: impl Fn(&HostStatus) -> bool) -> HostStatus {
    wait_for(Duration::from_secs(30), what, || host_status(nats, "dc1", HOST, service).filter(|s| want(s)))
}

/// The health state and reason of a status.
fn health(status: &HostStatus) -> (Option<HealthState>, String) {
    let health = status.health.as_ref();
    (health.map(|h| h.state), health.and_then(|h| h.reason.clone()).unwrap_or_default())
}

#[test]
fn a_commit_the_check_refuses_never_goes_live_and_the_next_one_does() {
    let shared = tempfile::tempdir().expect("tempdir");
    let checked = shared.path().join("checked");
    let check = refusing_bad(&checked);
    let dc = Datacenter::with_service0()
        .host_flags(&["--service", "service0", "--host-id", HOST, "--check-cmd", &check])
        .start();
    let (nats, master, host, first) = (dc.nats.url(), &dc.master, &dc.host, &dc.first);
    // The bootstrap went through the check too.
    assert_eq!(lines(&checked), [first.as_str()]);
    wait_status(&nats, "service0", "healthy at the first commit", |s| {
        s.commit.as_deref() == Some(first) && health(s).0 == Some(HealthState::Healthy)
    });

    let svc = master.on("services/service0/master");
    let bad = svc.write("app.conf", "mode = bad\n").commit_push("bad").commit;
    let status = wait_status(&nats, "service0", "the refusal reported", |s| !s.ok);
    assert_eq!(status.commit.as_deref(), Some(first.as_str()), "the commit in place is still the first");
    let error = status.error.clone().unwrap_or_default();
    assert!(error.contains(&bad) && error.contains("--check-cmd"), "the error names the commit and the check: {error}");
    let (state, reason) = health(&status);
    assert_eq!(state, Some(HealthState::Unhealthy));
    assert!(reason.contains("exit status: 1"), "the reason has the exit status: {reason}");
    assert!(reason.contains("app.conf of service0 is bad: mode = bad"), "and what the check said: {reason}");
    host.assert_tree(master, "service0", first);
    // Not retried: the check ran once for the refused commit, however long the host waits.
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(lines(&checked), [first.clone(), bad.clone()]);
    host.assert_tree(master, "service0", first);
    assert!(!host.execs().iter().any(|l| l.contains(&bad)), "--exec ran for the refused commit: {:?}", host.execs());

    // The next commit starts from the refused one, which is not on the host: it comes
    // from the snapshot, is checked, and goes live.
    let good = svc.write("app.conf", "mode = good\n").commit_push("good").commit;
    host.wait_exec("service0", &good);
    host.assert_tree(master, "service0", &good);
    let status = wait_status(&nats, "service0", "healthy at the good commit", |s| {
        s.commit.as_deref() == Some(good.as_str()) && health(s).0 == Some(HealthState::Healthy)
    });
    assert!(status.ok && status.error.is_none(), "{status:?}");
    assert_eq!(lines(&checked), [first.clone(), bad, good]);
}

#[test]
fn the_check_sees_the_new_tree_while_the_old_one_is_live() {
    let shared = tempfile::tempdir().expect("tempdir");
    let seen = shared.path().join("seen");
    // The host runs in its own directory, with `--dir etc`: the live tree is
    // `etc/service0` from there, as from the check it starts.
    let check = format!(
        r#"printf '%s|%s|%s|%s|%s|%s|%s\n' "$(cat "$CONFCAST_DIR/app.conf")" "$(cat etc/service0/app.conf)" "$(readlink etc/service0)" "$CONFCAST_DIR" "$CONFCAST_SERVICE $CONFCAST_KIND" "$CONFCAST_COMMIT" "$CONFCAST_REF" >> '{}'"#,
        seen.display()
    );
    let dc = Datacenter::with_service0().host_flags(&["--service", "service0", "--check-cmd", &check]).start();
    let (master, host, first) = (&dc.master, &dc.host, &dc.first);
    let next = master.on("services/service0/master").write("app.conf", "new\n").commit_push("next").commit;
    host.wait_exec("service0", &next);
    host.assert_tree(master, "service0", &next);

    let line = lines(&seen).into_iter().find(|l| l.contains(&next)).expect("the check ran for the new commit");
    let fields: Vec<&str> = line.split('|').collect();
    let [new, live, link, dir, service, commit, ref_name] = fields[..] else { panic!("{line}") };
    assert_eq!(new, "new", "the check reads the new tree");
    assert_eq!(live, "0", "while the old one is still what applications read");
    assert!(link.ends_with(first.as_str()), "the link still points at the first commit's tree: {link}");
    assert!(dir.ends_with(next.as_str()) && Path::new(dir).is_absolute(), "CONFCAST_DIR is the new tree: {dir}");
    assert_ne!(dir, host.service_dir("service0").display().to_string());
    assert_eq!((service, commit, ref_name), ("service0 service", next.as_str(), "refs/heads/services/service0/master"));
    // Now live, at the same path the check was shown.
    assert_eq!(fs::read_link(host.service_dir("service0")).expect("link").display().to_string(), dir);
}

#[test]
fn a_failing_health_command_or_exec_is_unhealthy_and_both_passing_healthy() {
    let nats = NatsServer::start();
    let (master, first) = Master::with_service0(&nats.url());
    let _relay = Relay::start(&nats.url(), "dc1", &master.bare);
    let shared = tempfile::tempdir().expect("tempdir");
    let (exec_broken, health_broken) = (shared.path().join("exec-broken"), shared.path().join("health-broken"));
    let health_cmd = format!(
        "if [ -e '{}' ]; then echo \"$CONFCAST_SERVICE backend down at $CONFCAST_COMMIT\" >&2; exit 3; fi",
        health_broken.display()
    );
    let addr = format!("127.0.0.1:{}", free_port());
    // The health command comes from its environment variable.
    let mut host =
        Subscriber::prepare(&nats.url(), "dc1", &["--service", "service0", "--host-id", HOST, "--listen", &addr])
            .with_exec_then(&format!("test ! -e '{}'", exec_broken.display()))
            .with_env("CONFCAST_HEALTH_CMD", &health_cmd);
    host.restart();
    host.wait_exec("service0", &first);
    let api_health = || {
        let mut stream = std::net::TcpStream::connect(&addr).ok()?;
        let (status, body) = http_get(&mut stream, "/v1/services/service0");
        let answer: serde_json::Value = serde_json::from_slice(&body).ok()?;
        (status == 200).then(|| answer["health"].clone())
    };
    wait_status(&nats.url(), "service0", "healthy at the first commit", |s| {
        s.commit.as_deref() == Some(first.as_str()) && health(s).0 == Some(HealthState::Healthy)
    });

    // The health command fails: the change is applied and told, but unhealthy.
    fs::write(&health_broken, "").expect("break the health command");
    let svc = master.on("services/service0/master");
    let second = svc.write("app.conf", "1\n").commit_push("second").commit;
    let status = wait_status(&nats.url(), "service0", "unhealthy at the second commit", |s| {
        s.commit.as_deref() == Some(second.as_str()) && health(s).0 == Some(HealthState::Unhealthy)
    });
    let (_, reason) = health(&status);
    assert!(reason.starts_with("--health-cmd exited with exit status: 3"), "{reason}");
    assert!(reason.contains(&format!("service0 backend down at {second}")), "with what it said: {reason}");
    assert!(status.ok && status.exec_status == Some(0), "the change itself went well: {status:?}");
    host.assert_tree(&master, "service0", &second);
    let shown = wait_for(Duration::from_secs(10), "the API to show the health", || {
        api_health().filter(|h| h["state"] == "unhealthy")
    });
    assert_eq!(shown["reason"].as_str(), Some(reason.as_str()));
    // `publisher status` counts it failed, with why, and exits 1.
    let out = run(Command::new(bin("publisher")).args(["status", &second, "--nats", &nats.url(), "--timeout", "1"]));
    assert_eq!(out.code, Some(1), "{out:?}");
    let at = &second[..7];
    let line =
        format!("dc1: 0/1 at {at} (1 failed: {HOST} unhealthy: --health-cmd exited with exit status: 3; output:)");
    assert!(out.stdout.lines().any(|l| l == line), "{line} in {out:?}");

    // `--exec` fails: unhealthy, for its exit status.
    fs::remove_file(&health_broken).expect("mend the health command");
    fs::write(&exec_broken, "").expect("break the exec");
    let third = svc.write("app.conf", "2\n").commit_push("third").commit;
    let status = wait_status(&nats.url(), "service0", "unhealthy for the exec", |s| {
        s.commit.as_deref() == Some(third.as_str()) && health(s).0 == Some(HealthState::Unhealthy)
    });
    assert_eq!(health(&status).1, "--exec exited with exit status: 1");
    assert!(!status.ok && status.exec_status == Some(1), "{status:?}");

    // Both pass (the exec, retried): healthy.
    fs::remove_file(&exec_broken).expect("mend the exec");
    let status = wait_status(&nats.url(), "service0", "healthy at the third commit", |s| {
        s.commit.as_deref() == Some(third.as_str()) && health(s).0 == Some(HealthState::Healthy)
    });
    assert!(status.ok && status.exec_status == Some(0) && health(&status).1.is_empty(), "{status:?}");
    let shown = wait_for(Duration::from_secs(10), "the API to show it healthy", || {
        api_health().filter(|h| h["state"] == "healthy")
    });
    assert!(shown["reason"].is_null() && shown["at_ms"].as_u64().is_some(), "{shown}");
}

/// The services of the batch test.
const SERVICES: [&str; 2] = ["s0", "s1"];

/// Pushes both services' branches in one push.
fn push_both(master: &Master) {
    let refspecs: Vec<String> =
        SERVICES.iter().map(|s| format!("+refs/heads/services/{s}/master:refs/heads/services/{s}/master")).collect();
    assert!(master.push_refspecs(&refspecs).ok, "push");
}

/// One commit on `service`'s branch with `app.conf` holding `conf` (not pushed).
fn commit(master: &Master, service: &str, conf: &str) -> String {
    master.on(&format!("services/{service}/master")).write("app.conf", format!("{conf}\n")).commit(conf)
}

#[test]
fn in_a_batch_a_refused_service_stays_while_the_others_switch() {
    let shared = tempfile::tempdir().expect("tempdir");
    let check = refusing_bad(&shared.path().join("checked"));
    let firsts = std::cell::RefCell::new(Vec::new());
    let flags = ["--service", "s0", "--service", "s1", "--host-id", HOST, "--check-cmd", check.as_str()];
    let mut dc = Datacenter::with_master(|master| {
        master
            .configuration("big", r#"{"services":[{"name":"s0","branch":"master"},{"name":"s1","branch":"master"}]}"#);
        master.datacenter("dc1", r#"{"conf":"datacenter-configuration/big"}"#);
        firsts.replace(SERVICES.iter().map(|s| commit(master, s, &format!("{s} first"))).collect());
        push_both(master);
        firsts.borrow()[0].clone()
    })
    .host_flags(&flags)
    .first_exec_of("s0")
    .start();
    let firsts = firsts.into_inner();
    dc.host.wait_exec("s1", &firsts[1]);

    // Both services change in one push while the host is away: back, it applies them
    // as one step, in which s1's tree is refused.
    dc.host.stop();
    let good = commit(&dc.master, "s0", "s0 good");
    let bad = commit(&dc.master, "s1", "s1 bad");
    push_both(&dc.master);
    dc.relay.wait_published(&good);
    dc.relay.wait_published(&bad);
    dc.host.restart();
    dc.host.wait_exec("s0", &good);
    dc.host.assert_tree(&dc.master, "s0", &good);
    let status = wait_status(&dc.nats.url(), "s1", "s1's refusal reported", |s| !s.ok);
    assert_eq!(status.commit.as_deref(), Some(firsts[1].as_str()));
    assert!(status.error.clone().unwrap_or_default().contains(&bad), "{status:?}");
    assert!(health(&status).1.contains("app.conf of s1 is bad: s1 bad"), "{status:?}");
    dc.host.assert_tree(&dc.master, "s1", &firsts[1]);
    assert!(!dc.host.execs().iter().any(|l| l.contains(&bad)), "--exec ran for the refused commit");
    let log = dc.host.log();
    let batch = log.lines().find(|l| l.contains("applied batch") && l.contains("messages=2"));
    assert!(batch.is_some_and(|l| l.contains("switched=1")), "not one step with one switch:\n{log}");
    wait_status(&dc.nats.url(), "s0", "s0 healthy at its new commit", |s| {
        s.commit.as_deref() == Some(good.as_str()) && health(s).0 == Some(HealthState::Healthy)
    });

    // s1's next commit goes live.
    let mended = commit(&dc.master, "s1", "s1 mended");
    push_both(&dc.master);
    dc.host.wait_exec("s1", &mended);
    dc.host.assert_tree(&dc.master, "s1", &mended);
    dc.host.assert_tree(&dc.master, "s0", &good);
    wait_status(&dc.nats.url(), "s1", "s1 healthy at its mended commit", |s| {
        s.ok && s.commit.as_deref() == Some(mended.as_str()) && health(s).0 == Some(HealthState::Healthy)
    });
}
