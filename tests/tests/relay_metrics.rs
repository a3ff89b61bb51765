//! The relay's operator interfaces, against the real binary: `/metrics` and `/healthz`
//! on `--listen`, and systemd readiness (`READY=1` on `NOTIFY_SOCKET`).

use std::io::{Read as _, Write as _};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use confcast_tests::{bin, wait_for, Master, NatsServer, Relay, Subscriber};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// `GET path` over plain HTTP/1.0: (status code, body).
fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let code = response.split(' ').nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n")?.1.to_owned();
    Some((code, body))
}

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
    let nats = NatsServer::start();
    let (master, first) = Master::with_service0(&nats.url());
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let relay = Relay::start_with(&nats.url(), "dc1", &master.bare.display().to_string(), &["--listen", &listen]);
    let sub = Subscriber::start(&nats.url(), "dc1", &["--service", "service0"]);
    sub.wait_exec("service0", &first);
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
    drop(relay);
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
    let socket_path = dir.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).expect("bind the notify socket");
    socket.set_read_timeout(Some(Duration::from_secs(60))).expect("timeout");
    let log = dir.path().join("relay.log");
    let child = Command::new(bin("relay"))
        .args(["--nats", &nats.url(), "--dc", "dc1", "--master"])
        .arg(&master.bare)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .env("NOTIFY_SOCKET", &socket_path)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("relay runs");
    let relay = Notified { child, log, _dir: dir };

    let mut buf = [0u8; 512];
    let n = socket.recv(&mut buf).expect("a notification within 60 s");
    let message = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(message.lines().any(|l| l == "READY=1"), "{message:?}");
    let log = std::fs::read_to_string(&relay.log).unwrap_or_default();
    assert!(log.contains("relay ready"), "READY=1 comes after the first sync:\n{log}");
}
