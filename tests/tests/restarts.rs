//! Safe restarts with real subscribers: `--max-parallel` bounds how many hosts of a
//! datacenter run their exec for one change at once; a failing exec is retried with
//! backoff, reported, and never holds later updates back.

use std::fs;
use std::path::Path;
use std::time::Duration;

use confcast_schemas::HostStatus;
use confcast_tests::{disk_listing, host_status, wait_for, Master, NatsServer, NotifySocket, Relay, Subscriber};

/// A subscriber of service0 whose `--exec` also runs `exec`, with `extra` flags.
fn host(nats: &str, id: &str, exec: &str, extra: &[&str]) -> Subscriber {
    let mut selection = vec!["--service", "service0", "--host-id", id];
    selection.extend(extra);
    Subscriber::start_with_exec(nats, "dc1", &selection, exec)
}

/// Whether `host` has `commit` in place.
fn at(host: &Subscriber, commit: &str) -> bool {
    fs::read_link(host.service_dir("service0")).is_ok_and(|target| target.ends_with(commit))
}

fn lines(path: &Path) -> Vec<String> {
    fs::read_to_string(path).unwrap_or_default().lines().map(str::to_owned).collect()
}

#[test]
fn max_parallel_lets_only_n_hosts_run_their_exec_for_a_change_at_once() {
    let nats = NatsServer::start();
    let (master, first) = Master::with_service0(&nats.url());
    let _relay = Relay::start(&nats.url(), "dc1", &master.bare);
    let shared = tempfile::tempdir().expect("tempdir");
    let log = shared.path().join("execs.log");
    // Each run logs its start and end (nanoseconds) around a pause.
    let exec = format!(
        "echo \"start $(date +%s%N) $CONFCAST_COMMIT\" >> '{0}'; sleep 0.3; echo \"end $(date +%s%N) $CONFCAST_COMMIT\" >> '{0}'",
        log.display()
    );
    let hosts: Vec<Subscriber> =
        (0..4).map(|i| host(&nats.url(), &format!("h{i}"), &exec, &["--max-parallel", "1"])).collect();
    wait_for(Duration::from_secs(30), "every host at the first commit", || {
        hosts.iter().all(|h| at(h, &first)).then_some(())
    });
    wait_for(Duration::from_secs(30), "four runs for the first commit", || {
        (lines(&log).iter().filter(|l| l.starts_with("end") && l.ends_with(&first)).count() == 4).then_some(())
    });
    let second = master.on("services/service0/master").write("app.conf", "1\n").commit_push("second").commit;
    wait_for(Duration::from_secs(30), "four runs for the second commit", || {
        (lines(&log).iter().filter(|l| l.starts_with("end") && l.ends_with(&second)).count() == 4).then_some(())
    });
    // Never two runs for the same change at once.
    for commit in [&first, &second] {
        let mut running = 0;
        let mut events: Vec<(u128, i32)> = lines(&log)
            .iter()
            .filter(|l| l.ends_with(commit.as_str()))
            .map(|l| {
                let mut parts = l.split(' ');
                let delta = if parts.next() == Some("start") { 1 } else { -1 };
                (parts.next().and_then(|t| t.parse().ok()).expect("timestamp"), delta)
            })
            .collect();
        events.sort_by_key(|(at, delta)| (*at, *delta));
        for (_, delta) in events {
            running += delta;
            assert!(running <= 1, "two hosts ran their exec for {commit} at once:\n{}", lines(&log).join("\n"));
        }
    }
    for host in &hosts {
        assert_eq!(disk_listing(&host.service_dir("service0")), master.listing(&second));
    }
}

#[test]
fn a_failing_exec_is_retried_reported_and_never_holds_later_updates_back() {
    let nats = NatsServer::start();
    let (master, first) = Master::with_service0(&nats.url());
    let _relay = Relay::start(&nats.url(), "dc1", &master.bare);
    let shared = tempfile::tempdir().expect("tempdir");
    let (log, broken) = (shared.path().join("execs.log"), shared.path().join("broken"));
    // Logs each attempt, and fails while `broken` exists.
    let exec = format!("echo \"$CONFCAST_COMMIT\" >> '{}'; test ! -e '{}'", log.display(), broken.display());
    let host = host(&nats.url(), "h0", &exec, &[]);
    wait_for(Duration::from_secs(30), "the first exec", || lines(&log).contains(&first).then_some(()));

    fs::write(&broken, "").expect("break the exec");
    let svc = master.on("services/service0/master");
    let second = svc.write("app.conf", "1\n").commit_push("second").commit;
    wait_for(Duration::from_secs(30), "the exec for the second commit, retried", || {
        (lines(&log).iter().filter(|l| **l == second).count() >= 2).then_some(())
    });
    assert!(at(&host, &second), "the change is in place even though its exec fails");
    // The failure is reported on the status stream, with the exit status.
    let status = wait_for(Duration::from_secs(10), "a failed status report", || {
        let status = last_status(&nats.url(), "h0")?;
        (!status.ok && status.commit.as_deref() == Some(second.as_str())).then_some(status)
    });
    assert_eq!(status.exec_status, Some(1));
    assert!(status.error.unwrap_or_default().contains("exited"), "the report says why");

    // A later update is applied at once, while the exec still fails.
    let third = svc.write("app.conf", "2\n").commit_push("third").commit;
    wait_for(Duration::from_secs(10), "the third commit in place", || at(&host, &third).then_some(()));
    fs::remove_file(&broken).expect("mend the exec");
    wait_for(Duration::from_secs(30), "the exec for the third commit to succeed", || {
        let status = last_status(&nats.url(), "h0")?;
        (status.ok && status.commit.as_deref() == Some(third.as_str()) && status.exec_status == Some(0)).then_some(())
    });
    // The second commit is no longer in place: its exec is not run again.
    let runs = lines(&log);
    let after_third = runs.iter().position(|l| *l == third).expect("ran for the third");
    assert!(!runs[after_third..].contains(&second), "ran for a commit no longer in place: {runs:?}");
    assert_eq!(disk_listing(&host.service_dir("service0")), master.listing(&third));
}

/// The latest status report of `host` of dc1 for service0, from the status stream.
fn last_status(nats: &str, host: &str) -> Option<HostStatus> {
    host_status(nats, "dc1", host, "service0")
}

#[test]
fn the_subscriber_tells_systemd_it_is_ready_once_its_configuration_is_in_place() {
    let nats = NatsServer::start();
    let (master, first) = Master::with_service0(&nats.url());
    let socket = NotifySocket::bind();
    let mut host =
        Subscriber::prepare(&nats.url(), "dc1", &["--service", "service0"]).with_env("NOTIFY_SOCKET", socket.path());
    host.restart();
    // The relay starts later: the subscriber must not be ready before it has the files.
    std::thread::sleep(Duration::from_millis(500));
    assert!(socket.try_recv().is_none(), "ready before the configuration was in place");
    let _relay = Relay::start(&nats.url(), "dc1", &master.bare);
    let message = socket.recv();
    assert!(message.lines().any(|l| l == "READY=1"), "{message:?}");
    assert!(at(&host, &first), "READY=1 came before the files");
}
