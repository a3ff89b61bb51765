//! The master over the network: `git daemon` serving the master read-only on loopback,
//! which a test can take down and bring back to make the master unreachable for a relay.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::net::free_port;
use crate::poll::wait_for;
use crate::procs::reap;

/// `git daemon` serving a directory of bare repositories read-only on loopback (the
/// master's network transport), killed on drop.
#[derive(Debug)]
pub struct GitDaemon {
    child: Option<Child>,
    base: PathBuf,
    port: u16,
}

impl GitDaemon {
    /// Serves the directory holding `bare` (exported as its file name).
    pub fn start(bare: &Path) -> GitDaemon {
        let mut daemon = GitDaemon { child: None, base: bare.parent().expect("parent").to_owned(), port: free_port() };
        daemon.restart();
        daemon
    }

    /// `git://127.0.0.1:<port>/<name>`.
    pub fn url(&self, name: &str) -> String {
        format!("git://127.0.0.1:{}/{name}", self.port)
    }

    /// The daemon's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the daemon: the master is unreachable.
    pub fn stop(&mut self) {
        reap(&mut self.child);
    }

    /// Serves again on the same port.
    pub fn restart(&mut self) {
        self.stop();
        // `git daemon` would run `git-daemon` as a child of its own; start it directly so
        // that killing it takes the master's git service down for real.
        let exec_path = Command::new("git").arg("--exec-path").output().expect("git runs");
        let daemon = PathBuf::from(String::from_utf8_lossy(&exec_path.stdout).trim()).join("git-daemon");
        let child = Command::new(daemon)
            .args(["--reuseaddr", "--export-all", "--listen=127.0.0.1"])
            .arg(format!("--port={}", self.port))
            .arg(format!("--base-path={}", self.base.display()))
            .arg(&self.base)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("git daemon runs");
        self.child = Some(child);
        wait_for(Duration::from_secs(10), "git daemon to listen", || {
            std::net::TcpStream::connect(("127.0.0.1", self.port)).ok()
        });
    }
}

impl Drop for GitDaemon {
    fn drop(&mut self) {
        self.stop();
    }
}
