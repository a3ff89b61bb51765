//! The tests' own side of the loopback network: free ports for the servers they start,
//! and a plain HTTP GET for the APIs those servers answer on.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

/// A port nothing listens on right now (connecting to it is refused at once).
pub fn free_port() -> u16 {
    free_ports(1)[0]
}

/// `n` free ports on 127.0.0.1. All are taken before any is released, so they differ.
pub fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n).map(|_| TcpListener::bind("127.0.0.1:0").expect("bind")).collect();
    listeners.iter().map(|l| l.local_addr().expect("addr").port()).collect()
}

/// A plain HTTP/1.1 GET over `stream` (TCP or a unix socket): (status, body).
pub fn http_get(stream: &mut (impl Read + Write), path: &str) -> (u16, Vec<u8>) {
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    exchange(stream, &request).expect("an HTTP answer")
}

/// `GET path` over HTTP/1.0 on a monitoring port of 127.0.0.1 (nats-server's, the
/// relay's): (status, body as text), or `None` while nothing answers.
pub fn get_monitoring(port: u16, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let (status, body) = exchange(&mut stream, &format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n"))?;
    Some((status, String::from_utf8(body).ok()?))
}

/// Sends `request` and reads the answer to its end: (status, body).
fn exchange(stream: &mut (impl Read + Write), request: &str) -> Option<(u16, Vec<u8>)> {
    stream.write_all(request.as_bytes()).ok()?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).ok()?;
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok())?;
    Some((status, raw[split + 4..].to_vec()))
}
