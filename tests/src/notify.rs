//! The service manager's side of systemd's readiness protocol: a datagram socket a
//! process is given as `NOTIFY_SOCKET`, on which a test reads what it announced
//! (`READY=1`).

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tempfile::TempDir;

/// A bound `NOTIFY_SOCKET`, removed on drop.
#[derive(Debug)]
pub struct NotifySocket {
    socket: UnixDatagram,
    path: PathBuf,
    _dir: TempDir,
}

impl NotifySocket {
    /// Binds a fresh socket.
    pub fn bind() -> NotifySocket {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
        socket.set_read_timeout(Some(Duration::from_secs(60))).expect("timeout");
        NotifySocket { socket, path, _dir: dir }
    }

    /// What to set `NOTIFY_SOCKET` to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The next notification, waiting for it up to 60 s. A signal to the test process
    /// (a child exiting) interrupts the wait; it is taken up again, within the same 60 s.
    pub fn recv(&self) -> String {
        let mut buf = [0u8; 512];
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        self.socket.set_read_timeout(Some(Duration::from_secs(60))).expect("timeout");
        loop {
            match self.socket.recv(&mut buf) {
                Ok(n) => return String::from_utf8_lossy(&buf[..n]).into_owned(),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {
                    let left = deadline.saturating_duration_since(std::time::Instant::now());
                    assert!(!left.is_zero(), "no notification within 60 s");
                    self.socket.set_read_timeout(Some(left)).expect("timeout");
                }
                Err(e) => panic!("a notification within 60 s: {e:?}"),
            }
        }
    }

    /// A notification already sent, if there is one, without waiting.
    pub fn try_recv(&self) -> Option<String> {
        let mut buf = [0u8; 512];
        self.socket.set_nonblocking(true).expect("nonblocking");
        let received = self.socket.recv(&mut buf);
        self.socket.set_nonblocking(false).expect("blocking");
        received.ok().map(|n| String::from_utf8_lossy(&buf[..n]).into_owned())
    }
}
