//! The master behind a counting TCP proxy: every request and byte `git daemon` serves
//! to relays (or to polling hosts) goes through it and is counted.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;

use confcast_tests::GitDaemon;

/// Counts connections and bytes between clients and the master's git daemon.
pub(crate) struct CountingProxy {
    port: u16,
    connections: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl CountingProxy {
    pub(crate) fn start(upstream: u16) -> CountingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let connections = Arc::new(AtomicU64::new(0));
        let bytes = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (c, b, s) = (connections.clone(), bytes.clone(), stop.clone());
        thread::spawn(move || {
            for client in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else { continue };
                c.fetch_add(1, Ordering::SeqCst);
                for (mut from, mut to) in
                    [(client.try_clone().expect("clone"), server.try_clone().expect("clone")), (server, client)]
                {
                    let b = b.clone();
                    thread::spawn(move || {
                        let mut buf = [0u8; 64 * 1024];
                        while let Ok(n) = from.read(&mut buf) {
                            if n == 0 || to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                            b.fetch_add(n as u64, Ordering::SeqCst);
                        }
                        let _ = to.shutdown(std::net::Shutdown::Write);
                    });
                }
            }
        });
        CountingProxy { port, connections, bytes, stop }
    }

    pub(crate) fn url(&self) -> String {
        format!("git://127.0.0.1:{}/master.git", self.port)
    }

    pub(crate) fn counts(&self) -> (u64, u64) {
        (self.connections.load(Ordering::SeqCst), self.bytes.load(Ordering::SeqCst))
    }
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

pub(crate) fn daemon_port(daemon: &GitDaemon) -> u16 {
    daemon.url("x").trim_start_matches("git://127.0.0.1:").split('/').next().and_then(|p| p.parse().ok()).expect("port")
}
