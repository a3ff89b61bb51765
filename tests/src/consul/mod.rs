//! A Consul double: Consul's K/V and transaction HTTP API, in-process, on an ephemeral
//! loopback port, for testing the relay's Consul index (Consul itself cannot be
//! installed here).
//!
//! It follows Consul's documented behaviour (HTTP API docs for `/v1/kv` and `/v1/txn`,
//! and the agent's `kvs_endpoint.go`, `txn_endpoint.go`, `state/kvs.go`, `state/txn.go`):
//!
//! * One raft-like index, incremented by every write request (a `PUT` or `DELETE` on
//!   `/v1/kv`, a `/v1/txn` with a write in it), whether or not it changed anything. A
//!   key's `CreateIndex` and `ModifyIndex` are the index of the write that created and
//!   last changed it; all operations of one transaction share one index. A `set` that
//!   changes nothing (same value and flags) leaves `ModifyIndex` alone.
//! * Reads answer JSON lists of `{LockIndex, Key, Flags, Value (base64, null when
//!   empty), CreateIndex, ModifyIndex}`, with `X-Consul-Index`, `X-Consul-KnownLeader`
//!   and `X-Consul-LastContact`. For a single key `X-Consul-Index` is the K/V table's
//!   index (the last change to any key, deletions included); for `?recurse` and `?keys`
//!   it is the last change under the prefix (deletions included, through tombstones),
//!   or the table's index if there was none. It is never 0 (Consul answers 1 then).
//! * A missing key, or an empty prefix with `?recurse` or `?keys` (except the root),
//!   is 404 with `X-Consul-Index` still set. `?raw` returns the value's bytes as stored.
//!   `?keys&separator=S` rolls keys up after the prefix at the first `S`.
//! * Blocking queries (`?index=N&wait=D`, `D` a Go duration, 5 minutes by default, at
//!   most 10): the answer comes at once if the index is already above `N` (so always
//!   for `N` = 0); otherwise when the key (or something under the prefix) is written or
//!   deleted, or when `D` has passed, with the index as it is then. No jitter.
//! * `PUT` returns `true`; with `?cas=0` it writes only if the key does not exist, with
//!   `?cas=N` only if its `ModifyIndex` is `N`, and returns `false` otherwise; `?flags=`
//!   sets the flags. A value over 512 KiB is refused with 413. `DELETE` removes a key
//!   (`true` even if it was absent), `?recurse` a whole prefix, `?cas=N` only at that
//!   `ModifyIndex` (a missing key counts as deleted: `true`); `?recurse` with `?cas` is
//!   400 "Conflicting flags".
//! * `PUT /v1/txn`: at most 64 operations (more: 413 "Transaction contains too many
//!   operations"), a body of at most 512 KiB and values of at most 512 KiB (413).
//!   K/V verbs `set`, `cas`, `get`, `get-or-empty`, `get-tree`, `check-index`,
//!   `check-not-exists`, `delete`, `delete-tree`, `delete-cas` (and `lock`, `unlock`,
//!   `check-session`, which fail as in a Consul with no sessions). Every operation is
//!   tried; if any fails nothing is applied and the answer is 409
//!   `{"Results":null,"Errors":[{"OpIndex":i,"What":"..."}]}` with Consul's messages;
//!   otherwise 200 with one result per operation except deletes (values null except for
//!   the gets). Catalog operations (`Node`, `Service`, `Check`) are not implemented: 400.
//! * With a token configured, a request must carry it (`X-Consul-Token`, `Authorization:
//!   Bearer`, or `?token=`): none is 403 "Permission denied", another is 403 "ACL not
//!   found".
//!
//! Not implemented: sessions and locks, `?dc=`, consistency modes, namespaces, Consul's
//! key character checks. [`ConsulDouble::stop`] takes it down (connections dropped, the
//! port refuses), [`ConsulDouble::restart`] brings it back on the same port with the same
//! data, like a Consul server restarted on its raft store.
//!
//! Its parts: `store` (keys, indexes and tombstones), `http` (routing, ACL tokens and
//! the shape of answers), `query` (query parameters as Consul parses them), `kv` (the
//! `/v1/kv` verbs), `blocking` (blocking queries) and `txn` (`/v1/txn`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

mod blocking;
mod http;
mod kv;
mod query;
mod store;
mod txn;

use store::Store;

/// Consul's default `kv_max_value_size`, and `txn_max_req_len`.
pub const MAX_VALUE_BYTES: usize = 512 * 1024;
/// The most operations one transaction may hold.
pub const MAX_TXN_OPS: usize = 64;

/// What every request handler shares: the data, the ACL token, the request log.
#[derive(Debug)]
struct Shared {
    store: Mutex<Store>,
    /// The raft index, for blocking queries to wait on.
    changed: tokio::sync::watch::Sender<u64>,
    token: Option<String>,
    /// `METHOD path?query` of every request, in order.
    log: Mutex<Vec<String>>,
}

impl Shared {
    fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().expect("store lock")
    }

    /// Wakes the blocking queries after a write.
    fn notify(&self) {
        let raft = self.store().raft;
        self.changed.send_replace(raft);
    }
}

#[derive(Debug)]
struct Server {
    stop: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

/// A running Consul double (see the module docs); stopped on drop.
#[derive(Debug)]
pub struct ConsulDouble {
    shared: Arc<Shared>,
    port: u16,
    server: Option<Server>,
}

impl ConsulDouble {
    /// Starts a double without ACLs.
    pub fn start() -> ConsulDouble {
        ConsulDouble::start_with_token(None)
    }

    /// Starts a double that requires `token` on every request, if given.
    pub fn start_with_token(token: Option<&str>) -> ConsulDouble {
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::default()),
            changed: tokio::sync::watch::channel(0).0,
            token: token.map(str::to_owned),
            log: Mutex::new(Vec::new()),
        });
        let mut double = ConsulDouble { shared, port: 0, server: None };
        double.serve();
        double
    }

    fn serve(&mut self) {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (shared, port) = (self.shared.clone(), self.port);
        let thread = std::thread::spawn(move || {
            let runtime =
                tokio::runtime::Builder::new_current_thread().enable_all().build().expect("consul double runtime");
            runtime.block_on(async move {
                let socket = tokio::net::TcpSocket::new_v4().expect("socket");
                // Rebinding the same port right after a stop.
                socket.set_reuseaddr(true).expect("SO_REUSEADDR");
                socket.bind(std::net::SocketAddr::from(([127, 0, 0, 1], port))).expect("bind the consul double");
                let listener = socket.listen(1024).expect("listen");
                ready_tx.send(listener.local_addr().expect("address").port()).expect("report the port");
                let app = axum::Router::new().fallback(http::handle).with_state(shared);
                tokio::select! {
                    served = axum::serve(listener, app) => served.expect("consul double serves"),
                    _ = stopped => {}
                }
            });
            // Drops every connection, blocking queries included.
            runtime.shutdown_background();
        });
        self.port = ready_rx.recv().expect("the consul double starts");
        self.server = Some(Server { stop, thread });
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Takes it down: open connections are dropped and the port refuses new ones.
    pub fn stop(&mut self) {
        if let Some(server) = self.server.take() {
            let _ = server.stop.send(());
            let _ = server.thread.join();
        }
    }

    /// Serves again on the same port, with the same data.
    pub fn restart(&mut self) {
        self.stop();
        self.serve();
    }

    /// The raft index (the last write request).
    pub fn index(&self) -> u64 {
        self.shared.store().raft
    }

    /// A key's value, read directly from the store.
    pub fn value(&self, key: &str) -> Option<Vec<u8>> {
        self.shared.store().entries.get(key).map(|kv| kv.value.clone())
    }

    /// A key's value as text (lossy), read directly from the store.
    pub fn text(&self, key: &str) -> Option<String> {
        self.value(key).map(|v| String::from_utf8_lossy(&v).into_owned())
    }

    /// Every key under `prefix` with its value as text, read directly from the store.
    pub fn tree(&self, prefix: &str) -> BTreeMap<String, String> {
        let store = self.shared.store();
        store.under(prefix).map(|(k, kv)| (k.clone(), String::from_utf8_lossy(&kv.value).into_owned())).collect()
    }

    /// `METHOD path?query` of every request so far.
    pub fn requests(&self) -> Vec<String> {
        self.shared.log.lock().expect("log lock").clone()
    }
}

impl Drop for ConsulDouble {
    fn drop(&mut self) {
        self.stop();
    }
}
