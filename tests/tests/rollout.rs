//! Rollout visibility against real components: hosts report their status, `publisher
//! status` follows the convergence per datacenter and host, and the post-receive hook
//! prints it into the `git push` output when `confcast.waitRollout` is set.

use std::process::Command;
use std::time::Duration;

use confcast_tests::{bin, git, run, Master, NatsServer, Ran, Relay, Subscriber};

const REF: &str = "services/service0/master";

/// Two datacenters following the same configuration (service0 on its master branch),
/// with their relays.
fn two_datacenters(nats: &NatsServer) -> (Master, String, Relay, Relay) {
    let (master, first) = Master::with_service0(&nats.url());
    master.datacenter("dc2", r#"{"conf":"datacenter-configuration/big"}"#);
    let dc1 = Relay::start(&nats.url(), "dc1", &master.bare);
    let dc2 = Relay::start(&nats.url(), "dc2", &master.bare);
    (master, first, dc1, dc2)
}

fn host(nats: &NatsServer, dc: &str, id: &str, then: Option<&str>) -> Subscriber {
    let selection = ["--service", "service0", "--host-id", id];
    match then {
        Some(then) => Subscriber::start_with_exec(&nats.url(), dc, &selection, then),
        None => Subscriber::start(&nats.url(), dc, &selection),
    }
}

/// What `publisher status` did: exit code, stdout, stderr, time taken.
fn status(nats: &NatsServer, args: &[&str]) -> Ran {
    run(Command::new(bin("publisher")).arg("status").args(["--nats", &nats.url()]).args(args))
}

/// The last line `publisher status` printed for datacenter `dc`.
fn last_line<'a>(out: &'a Ran, dc: &str) -> &'a str {
    let prefix = format!("{dc}: ");
    out.stdout.lines().rev().find(|l| l.starts_with(&prefix)).unwrap_or_else(|| panic!("no line for {dc}: {out:?}"))
}

fn short(commit: &str) -> &str {
    &commit[..7]
}

#[test]
fn status_names_the_failing_host_and_exits_1_at_its_timeout() {
    let nats = NatsServer::start();
    let (master, first, _r1, _r2) = two_datacenters(&nats);
    let a = host(&nats, "dc1", "host-a", None);
    let b = host(&nats, "dc1", "host-b", Some("exit 1"));
    let c = host(&nats, "dc2", "host-c", None);
    for sub in [&a, &b, &c] {
        sub.wait_exec("service0", &first);
    }

    let pushed = master.on(REF).write("app.conf", "1\n").commit_push("second");
    for sub in [&a, &b, &c] {
        sub.wait_exec("service0", &pushed.commit);
    }
    let out = status(&nats, &[REF, "--timeout", "3"]);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.took >= Duration::from_secs(3), "it follows the rollout until its timeout: {out:?}");
    let at = short(&pushed.commit);
    assert_eq!(last_line(&out, "dc1"), format!("dc1: 1/2 at {at} (1 failed: host-b exec exited 1)"), "{out:?}");
    assert_eq!(last_line(&out, "dc2"), format!("dc2: 1/1 at {at}"), "{out:?}");
    assert!(out.stdout.contains("not complete after 3s: 1 host(s) failed, 0 pending"), "the summary says why: {out:?}");

    // Only the datacenter asked for.
    let out = status(&nats, &[&pushed.commit, "--dc", "dc2", "--timeout", "10"]);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(!out.stdout.contains("dc1"), "{out:?}");

    // Usage and bus errors are told apart from an incomplete rollout.
    let out = status(&nats, &[REF, "--dc", "nowhere", "--timeout", "1"]);
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(out.stderr.contains("\"nowhere\" has no state stream"), "{out:?}");
    let out = Command::new(bin("publisher"))
        .args(["status", REF, "--nats", "nats://127.0.0.1:1", "--timeout", "1"])
        .output()
        .expect("publisher runs");
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn status_follows_a_push_live_and_exits_0_when_every_host_is_there() {
    let nats = NatsServer::start();
    let (master, first, _r1, _r2) = two_datacenters(&nats);
    let subs =
        [host(&nats, "dc1", "host-a", None), host(&nats, "dc1", "host-b", None), host(&nats, "dc2", "host-c", None)];
    for sub in &subs {
        sub.wait_exec("service0", &first);
    }

    // Started right after the push, by commit id: the relays and hosts are still on
    // their way, and it follows them.
    let pushed = master.on(REF).write("app.conf", "1\n").commit_push("second");
    let out = status(&nats, &[short(&pushed.commit), "--timeout", "60"]);
    assert_eq!(out.code, Some(0), "{out:?}");
    let at = short(&pushed.commit);
    assert_eq!(last_line(&out, "dc1"), format!("dc1: 2/2 at {at}"), "{out:?}");
    assert_eq!(last_line(&out, "dc2"), format!("dc2: 1/1 at {at}"), "{out:?}");
    assert!(out.stdout.contains(&format!("rollout of {at} complete")), "{out:?}");
    assert!(out.took < Duration::from_secs(30), "it returns as soon as the rollout is complete: {out:?}");
    for sub in &subs {
        sub.assert_tree(&master, "service0", &pushed.commit);
    }

    // The ref: where the relays took it.
    let out = status(&nats, &[REF, "--timeout", "10"]);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(last_line(&out, "dc1"), format!("dc1: 2/2 at {at}"), "{out:?}");

    // A ref nobody follows is not a complete rollout.
    let out = status(&nats, &["services/nobody/master", "--timeout", "10"]);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stdout.contains("no datacenter follows services/nobody/master"), "{out:?}");
    assert!(out.took < Duration::from_secs(5), "known at once: {out:?}");
}

#[test]
fn the_hook_prints_the_rollout_into_the_push_output_only_when_asked() {
    let nats = NatsServer::start();
    let (master, first, _r1, _r2) = two_datacenters(&nats);
    // host-b's command takes 4 s: a rollout takes at least that long.
    let slow = Duration::from_secs(4);
    let subs = [
        host(&nats, "dc1", "host-a", None),
        host(&nats, "dc1", "host-b", Some("sleep 4")),
        host(&nats, "dc2", "host-c", None),
    ];
    for sub in &subs {
        sub.wait_exec("service0", &first);
    }

    // Without confcast.waitRollout: the push tells what it published and does not wait.
    let pushed = master.on(REF).write("app.conf", "1\n").commit_push("second");
    let line = format!("remote: confcast: published refs/heads/{REF} {}..{}", short(&first), short(&pushed.commit));
    assert!(pushed.stderr.contains(&line), "{line:?} in {}", pushed.stderr);
    assert!(!pushed.stderr.contains("rollout"), "{}", pushed.stderr);
    assert!(pushed.took < Duration::from_secs(3), "the hook does not wait for hosts: {:?}", pushed.took);
    for sub in &subs {
        sub.wait_exec("service0", &pushed.commit);
    }

    // With it: the push returns once every host is there, and says so.
    master.install_hooks(&nats.url(), &["--wait-rollout", "20"]);
    assert_eq!(git(&master.bare, &["config", "confcast.waitRollout"]), "20");
    let waited = master.on(REF).write("app.conf", "2\n").commit_push("third");
    let at = short(&waited.commit);
    for line in [
        format!("remote: confcast: published refs/heads/{REF} {}..{at}", short(&pushed.commit)),
        format!("remote: confcast: dc1: 2/2 at {at}"),
        format!("remote: confcast: dc2: 1/1 at {at}"),
        "remote: confcast: rollout complete in".to_owned(),
    ] {
        assert!(waited.stderr.contains(&line), "{line:?} in {}", waited.stderr);
    }
    assert!(waited.took >= slow, "the hook waited for host-b: {:?}", waited.took);
    assert!(waited.took < Duration::from_secs(20), "and no longer: {:?}", waited.took);

    // A rollout that does not converge within the bound: the push still succeeds and
    // tells what it saw.
    git(&master.bare, &["config", "confcast.waitRollout", "1"]);
    let late = master.on(REF).write("app.conf", "3\n").commit_push("fourth");
    let at = short(&late.commit);
    assert!(late.ok);
    let dc1 = late.stderr.lines().find(|l| l.starts_with("remote: confcast: dc1: ")).unwrap_or_default();
    assert!(dc1.contains(&format!("/2 at {at} (")), "{}", late.stderr);
    assert!(dc1.contains(&format!("host-b at {}", short(&waited.commit))), "host-b is still busy: {}", late.stderr);
    assert!(
        late.stderr.contains("remote: confcast: rollout not complete after 1s (")
            && late.stderr.contains("the push itself succeeded"),
        "{}",
        late.stderr
    );
    assert!(late.took < Duration::from_secs(3), "bounded by confcast.waitRollout: {:?}", late.took);
    for sub in &subs {
        sub.wait_exec("service0", &late.commit);
    }
}
