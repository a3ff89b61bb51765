//! The relay's operator interfaces, against the real binary: `/metrics` and `/healthz`
//! on `--listen`, and systemd readiness (`READY=1` on `NOTIFY_SOCKET`).

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use confcast_tests::{bin, free_port, get_monitoring as get, wait_for, Datacenter, Master, NatsServer, NotifySocket};

/// The value of a sample in the metrics text.
fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} missing from\n{text}"))
}

fn metrics(port: u16) -> String {
    let (code, body) = get(port, "/metrics").expect("GET /metrics");
    assert_eq!(code, 200, "{body}");
    body
}

#[test]
fn metrics_move_with_a_push() {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let dc = Datacenter::with_service0().relay_flags(&["--listen", &listen]).start();
    let (master, sub) = (&dc.master, &dc.host);
    wait_for(Duration::from_secs(30), "/healthz to say ok", || get(port, "/healthz").filter(|(code, _)| *code == 200));

    let before = metrics(port);
    assert_eq!(sample(&before, "confcast_relay_lease_held"), 1.0, "{before}");
    assert!(sample(&before, "confcast_relay_updates_published_total") >= 1.0, "the first sync published: {before}");
    assert!(sample(&before, "confcast_relay_last_sync_timestamp_seconds") > 0.0, "{before}");

    let pushed = master.on("services/service0/master").write("app.conf", "1\n").commit_push("second");
    sub.wait_exec("service0", &pushed.commit);
    let after = metrics(port);
    for (name, at_least) in [
        ("confcast_relay_commit_events_total", 1.0),
        ("confcast_relay_updates_published_total", 1.0),
        ("confcast_relay_fetch_seconds_count", 1.0),
        // The new commit's objects: a commit, a tree and a blob, packed.
        ("confcast_relay_fetched_bytes_total", 100.0),
    ] {
        let moved = sample(&after, name) - sample(&before, name);
        assert!(moved >= at_least, "{name} moved by {moved}:\n{before}\n{after}");
    }
    assert!(sample(&after, "confcast_relay_fetch_seconds_sum") > sample(&before, "confcast_relay_fetch_seconds_sum"));
    assert!(
        sample(&after, "confcast_relay_last_sync_timestamp_seconds")
            > sample(&before, "confcast_relay_last_sync_timestamp_seconds")
    );
    assert_eq!(sample(&after, "confcast_relay_error_events_total"), 0.0, "{after}");

    // A bad document reaching the relay is an error event.
    master.without_pre_receive(|| master.datacenter("dc1", "{ nope"));
    wait_for(Duration::from_secs(20), "the error event to be counted", || {
        (sample(&metrics(port), "confcast_relay_error_events_total") >= 1.0).then_some(())
    });
    drop(dc);
}

/// A relay started as systemd would with `Type=notify`, killed on drop.
struct Notified {
    child: Child,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Notified {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- relay log\n{}", std::fs::read_to_string(&self.log).unwrap_or_default());
        }
    }
}

#[test]
fn the_relay_tells_systemd_it_is_ready_after_its_first_sync() {
    let nats = NatsServer::start();
    let (master, _first) = Master::with_service0(&nats.url());
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = NotifySocket::bind();
    let log = dir.path().join("relay.log");
    let child = Command::new(bin("relay"))
        .args(["--nats", &nats.url(), "--dc", "dc1", "--master"])
        .arg(&master.bare)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .env("NOTIFY_SOCKET", socket.path())
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("relay runs");
    let relay = Notified { child, log, _dir: dir };

    let message = socket.recv();
    assert!(message.lines().any(|l| l == "READY=1"), "{message:?}");
    let log = std::fs::read_to_string(&relay.log).unwrap_or_default();
    assert!(log.contains("relay ready"), "READY=1 comes after the first sync:\n{log}");
}
