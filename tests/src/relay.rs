//! A datacenter's `relay`, run as the real binary: started with a state directory of its
//! own, killed (SIGKILL) and restarted on it at will; its log is kept across restarts.

use std::fs;
use std::path::Path;
use std::process::{Child, Command};
use std::time::Duration;

use tempfile::TempDir;

use crate::poll::wait_for;
use crate::procs::{bin, reap, spawn_logged};

/// A running `relay`, killed on drop.
#[derive(Debug)]
pub struct Relay {
    child: Option<Child>,
    args: Vec<String>,
    /// Its state directory.
    pub state_dir: TempDir,
}

impl Relay {
    /// Starts the relay of `dc`, fetching from the master at `master` (a path).
    pub fn start(nats_url: &str, dc: &str, master: &Path) -> Relay {
        Relay::start_url(nats_url, dc, &master.display().to_string())
    }

    /// Starts the relay of `dc`, fetching from `master_url`.
    pub fn start_url(nats_url: &str, dc: &str, master_url: &str) -> Relay {
        Relay::start_with(nats_url, dc, master_url, &[])
    }

    /// Starts the relay of `dc` with extra flags.
    pub fn start_with(nats_url: &str, dc: &str, master_url: &str, extra: &[&str]) -> Relay {
        let state_dir = tempfile::tempdir().expect("tempdir");
        let args = vec![
            "--nats".into(),
            nats_url.into(),
            "--dc".into(),
            dc.into(),
            "--master".into(),
            master_url.to_owned(),
            "--state-dir".into(),
            state_dir.path().display().to_string(),
        ];
        let args = args.into_iter().chain(extra.iter().map(|s| s.to_string())).collect();
        let mut relay = Relay { child: None, args, state_dir };
        relay.restart();
        relay
    }

    /// Starts it again with the same state directory (after [`Relay::kill`]).
    pub fn restart(&mut self) {
        let mut relay = Command::new(bin("relay"));
        relay.args(&self.args).env("RUST_LOG", "info,confcast_relay=debug");
        self.child = Some(spawn_logged(&mut relay, &self.state_dir.path().join("relay.log")));
    }

    /// SIGKILLs it, wherever it is.
    pub fn kill(&mut self) {
        reap(&mut self.child);
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The relay's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.state_dir.path().join("relay.log")).unwrap_or_default()
    }

    /// Waits until the relay has published the update that brings a service to `commit`.
    pub fn wait_published(&self, commit: &str) {
        wait_for(Duration::from_secs(20), "relay to publish the last push", || {
            self.log().contains(&format!("to={commit}")).then_some(())
        });
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- relay log\n{}", self.log());
        }
        self.kill();
    }
}
