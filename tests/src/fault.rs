//! Fault injection: a TCP proxy whose behaviour a test switches at will (black hole,
//! resets, latency) to break the network between a component and a server, and the
//! seeded schedule that decides when the fault tests kill a process.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A small deterministic random number generator for fault schedules; the seed is
/// printed so a failing schedule can be replayed with `CONFCAST_SEED`.
#[derive(Debug)]
pub struct Rng(u64);

impl Rng {
    /// Seeded from `CONFCAST_SEED`, or the clock.
    pub fn from_env() -> Rng {
        let seed = std::env::var("CONFCAST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
        });
        eprintln!("fault schedule seed: CONFCAST_SEED={seed}");
        Rng(seed | 1)
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

/// A count from the environment variable `name` (for the long variants of fault
/// tests), or `default`.
pub fn count_from_env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// How a [`FaultProxy`] treats traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forward everything.
    Pass,
    /// Forward nothing, and hold what was sent (a black hole: packets vanish, no RST,
    /// no FIN; TCP delivers what was sent once the path heals, if the peers still wait).
    BlackHole,
    /// Close every connection at once (connection reset).
    Reset,
    /// Forward, after this many milliseconds per chunk.
    Latency(u64),
}

/// A TCP proxy on loopback between a component and a server, whose behaviour a test
/// switches at will: the network between the relay and NATS, or the master.
#[derive(Debug)]
pub struct FaultProxy {
    port: u16,
    mode: Arc<Mutex<Fault>>,
    /// Bumped by every [`Fault::Reset`]: a connection born under an older generation closes.
    generation: Arc<AtomicU64>,
}

impl FaultProxy {
    /// Proxies to `127.0.0.1:<upstream>`.
    pub fn start(upstream: u16) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let mode = Arc::new(Mutex::new(Fault::Pass));
        let generation = Arc::new(AtomicU64::new(0));
        let (m, g) = (mode.clone(), generation.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if *m.lock().expect("mode") == Fault::Reset {
                    drop(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else { continue };
                let born = g.load(Ordering::SeqCst);
                for (from, to) in
                    [(client.try_clone().expect("clone"), server.try_clone().expect("clone")), (server, client)]
                {
                    let (m, g) = (m.clone(), g.clone());
                    std::thread::spawn(move || pump(from, to, m, g, born));
                }
            }
        });
        FaultProxy { port, mode, generation }
    }

    /// The proxy's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Switches the behaviour; `Reset` also closes every open connection.
    pub fn set(&self, fault: Fault) {
        *self.mode.lock().expect("mode") = fault;
        if fault == Fault::Reset {
            self.generation.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// Copies one direction of a proxied connection, as the proxy's mode says.
fn pump(mut from: TcpStream, mut to: TcpStream, mode: Arc<Mutex<Fault>>, generation: Arc<AtomicU64>, born: u64) {
    let _ = from.set_read_timeout(Some(Duration::from_millis(50)));
    let mut buf = [0u8; 64 * 1024];
    loop {
        if generation.load(Ordering::SeqCst) != born {
            break;
        }
        if *mode.lock().expect("mode") == Fault::BlackHole {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => continue,
            Err(_) => break,
        };
        let fault = *mode.lock().expect("mode");
        match fault {
            Fault::Pass | Fault::BlackHole => {}
            Fault::Reset => break,
            Fault::Latency(ms) => std::thread::sleep(Duration::from_millis(ms)),
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}
