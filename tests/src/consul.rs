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

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde_json::{json, Value};

/// Consul's default `kv_max_value_size`, and `txn_max_req_len`.
pub const MAX_VALUE_BYTES: usize = 512 * 1024;
/// The most operations one transaction may hold.
pub const MAX_TXN_OPS: usize = 64;
/// Consul's cap on a blocking query's wait.
const MAX_WAIT: Duration = Duration::from_secs(600);
/// Consul's default wait.
const DEFAULT_WAIT: Duration = Duration::from_secs(300);

/// One key.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Kv {
    value: Vec<u8>,
    flags: u64,
    create: u64,
    modify: u64,
}

#[derive(Debug, Clone, Default)]
struct Store {
    /// The raft index: the last write request.
    raft: u64,
    /// The K/V table's index: the last change to any key.
    table: u64,
    entries: BTreeMap<String, Kv>,
    /// Deleted keys and the index of their deletion (Consul's graveyard).
    tombstones: BTreeMap<String, u64>,
}

impl Store {
    fn set(&mut self, index: u64, key: &str, value: Vec<u8>, flags: u64) {
        match self.entries.get_mut(key) {
            Some(kv) if kv.value == value && kv.flags == flags => {}
            Some(kv) => {
                kv.value = value;
                kv.flags = flags;
                kv.modify = index;
                self.table = index;
            }
            None => {
                self.entries.insert(key.to_owned(), Kv { value, flags, create: index, modify: index });
                self.tombstones.remove(key);
                self.table = index;
            }
        }
    }

    /// Check-and-set: `cas` 0 creates only, otherwise the modify index must match.
    fn set_cas(&mut self, index: u64, key: &str, value: Vec<u8>, flags: u64, cas: u64) -> bool {
        let ok = match self.entries.get(key) {
            None => cas == 0,
            Some(kv) => cas != 0 && kv.modify == cas,
        };
        if ok {
            self.set(index, key, value, flags);
        }
        ok
    }

    fn delete(&mut self, index: u64, key: &str) {
        if self.entries.remove(key).is_some() {
            self.tombstones.insert(key.to_owned(), index);
            self.table = index;
        }
    }

    /// A missing key counts as deleted.
    fn delete_cas(&mut self, index: u64, key: &str, cas: u64) -> bool {
        match self.entries.get(key) {
            None => true,
            Some(kv) if kv.modify == cas => {
                self.delete(index, key);
                true
            }
            Some(_) => false,
        }
    }

    fn delete_tree(&mut self, index: u64, prefix: &str) {
        let keys: Vec<String> = self.entries.keys().filter(|k| k.starts_with(prefix)).cloned().collect();
        for key in keys {
            self.delete(index, &key);
        }
    }

    fn under<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = (&'a String, &'a Kv)> + 'a {
        self.entries.range(prefix.to_owned()..).take_while(move |(k, _)| k.starts_with(prefix))
    }

    /// The last change to `key`, or under `prefix` (tombstones included).
    fn touched(&self, scope: &Scope) -> u64 {
        match scope {
            Scope::Key(key) => self
                .entries
                .get(key)
                .map(|kv| kv.modify)
                .unwrap_or(0)
                .max(self.tombstones.get(key).copied().unwrap_or(0)),
            Scope::Prefix(prefix) => {
                let live = self.under(prefix).map(|(_, kv)| kv.modify).max().unwrap_or(0);
                let dead =
                    self.tombstones.iter().filter(|(k, _)| k.starts_with(prefix.as_str())).map(|(_, i)| *i).max();
                live.max(dead.unwrap_or(0))
            }
        }
    }

    /// `X-Consul-Index` for a read of `scope`.
    fn index_of(&self, scope: &Scope) -> u64 {
        let index = match scope {
            Scope::Key(_) => self.table,
            Scope::Prefix(prefix) if prefix.is_empty() => self.table,
            Scope::Prefix(_) => match self.touched(scope) {
                0 => self.table,
                index => index,
            },
        };
        index.max(1)
    }
}

/// What a read covers.
#[derive(Debug, Clone)]
enum Scope {
    Key(String),
    Prefix(String),
}

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
                let app = axum::Router::new().fallback(handle).with_state(shared);
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

/// Query parameters, percent-decoded; a parameter without `=` has no value.
fn parse_query(query: Option<&str>) -> BTreeMap<String, Option<String>> {
    query
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (decode(k, true), Some(decode(v, true))),
            None => (decode(p, true), None),
        })
        .collect()
}

/// Percent-decoding; in a query (not in a path) `+` is a space, as Go decodes them.
fn decode(text: &str, in_query: bool) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match (escaped, bytes[i]) {
            (Some(b), _) => {
                out.push(b);
                i += 3;
                continue;
            }
            (None, b'+') if in_query => out.push(b' '),
            (None, b) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A Go duration (`300ms`, `10s`, `1m30s`).
fn parse_go_duration(text: &str) -> Option<Duration> {
    let mut total = 0f64;
    let mut rest = text;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let number_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        let number: f64 = rest[..number_len].parse().ok()?;
        rest = &rest[number_len..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += number * scale;
    }
    Some(Duration::from_secs_f64(total))
}

fn text(status: StatusCode, message: impl Into<String>) -> Response {
    (status, [("Content-Type", "text/plain; charset=utf-8")], message.into()).into_response()
}

fn json_response(status: StatusCode, body: &Value, index: Option<u64>) -> Response {
    let mut response = (status, [("Content-Type", "application/json")], body.to_string()).into_response();
    if let Some(index) = index {
        add_read_headers(response.headers_mut(), index);
    }
    response
}

fn add_read_headers(headers: &mut HeaderMap, index: u64) {
    headers.insert("X-Consul-Index", HeaderValue::from(index));
    headers.insert("X-Consul-KnownLeader", HeaderValue::from_static("true"));
    headers.insert("X-Consul-LastContact", HeaderValue::from_static("0"));
}

fn entry_json(key: &str, kv: &Kv, with_value: bool) -> Value {
    let value = if with_value && !kv.value.is_empty() {
        Value::String(base64::engine::general_purpose::STANDARD.encode(&kv.value))
    } else {
        Value::Null
    };
    json!({
        "LockIndex": 0,
        "Key": key,
        "Flags": kv.flags,
        "Value": value,
        "CreateIndex": kv.create,
        "ModifyIndex": kv.modify,
    })
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    shared.log.lock().expect("log lock").push(format!(
        "{method} {}{}",
        uri.path(),
        uri.query().map(|q| format!("?{q}")).unwrap_or_default()
    ));
    let query = parse_query(uri.query());
    if let Some(expected) = &shared.token {
        let given = headers
            .get("X-Consul-Token")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .or_else(|| {
                headers
                    .get("Authorization")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "))
                    .map(str::to_owned)
            })
            .or_else(|| query.get("token").cloned().flatten());
        match given {
            None => return text(StatusCode::FORBIDDEN, "Permission denied"),
            Some(token) if token != *expected => return text(StatusCode::FORBIDDEN, "ACL not found"),
            Some(_) => {}
        }
    }
    let path = uri.path();
    if path == "/v1/txn" {
        return match method {
            Method::PUT => txn(&shared, &body),
            _ => text(StatusCode::METHOD_NOT_ALLOWED, format!("method {method} not allowed")),
        };
    }
    let Some(key) = path.strip_prefix("/v1/kv/").map(|k| decode(k, false)) else {
        return text(StatusCode::NOT_FOUND, format!("no handler for {path}"));
    };
    match method {
        Method::GET => kv_get(&shared, key, &query).await,
        Method::PUT => kv_put(&shared, key, &query, &body),
        Method::DELETE => kv_delete(&shared, key, &query),
        _ => text(StatusCode::METHOD_NOT_ALLOWED, format!("method {method} not allowed")),
    }
}

async fn kv_get(shared: &Shared, key: String, query: &BTreeMap<String, Option<String>>) -> Response {
    let keys = query.contains_key("keys");
    let recurse = query.contains_key("recurse");
    if !keys && !recurse && key.is_empty() {
        return text(StatusCode::BAD_REQUEST, "Missing key name");
    }
    let scope = if keys || recurse { Scope::Prefix(key.clone()) } else { Scope::Key(key.clone()) };
    let mut blocking = None;
    if let Some(index) = query.get("index") {
        let Some(index) = index.as_deref().and_then(|i| i.parse::<u64>().ok()) else {
            return text(StatusCode::BAD_REQUEST, "Invalid index");
        };
        let wait = match query.get("wait") {
            Some(Some(wait)) => match parse_go_duration(wait) {
                Some(wait) => wait.min(MAX_WAIT),
                None => return text(StatusCode::BAD_REQUEST, "Invalid wait time"),
            },
            _ => DEFAULT_WAIT,
        };
        blocking = Some((index, wait));
    }
    if let Some((min_index, wait)) = blocking {
        // Subscribe first, so no write between the check and the wait is missed.
        let mut changed = shared.changed.subscribe();
        let (index, baseline) = {
            let store = shared.store();
            (store.index_of(&scope), store.touched(&scope))
        };
        if index <= min_index {
            let deadline = tokio::time::Instant::now() + wait;
            loop {
                tokio::select! {
                    result = changed.changed() => {
                        if result.is_err() || shared.store().touched(&scope) > baseline {
                            break;
                        }
                    }
                    () = tokio::time::sleep_until(deadline) => break,
                }
            }
        }
    }
    let store = shared.store();
    let index = store.index_of(&scope);
    if keys {
        let separator =
            query.get("separator").or_else(|| query.get("seperator")).cloned().flatten().unwrap_or_default();
        let mut list: Vec<String> = Vec::new();
        for (k, _) in store.under(&key) {
            let rolled = match separator.is_empty() {
                true => k.clone(),
                false => match k[key.len()..].find(&separator) {
                    Some(at) => k[..key.len() + at + separator.len()].to_owned(),
                    None => k.clone(),
                },
            };
            if list.last() != Some(&rolled) {
                list.push(rolled);
            }
        }
        if list.is_empty() && !key.is_empty() {
            return not_found(index);
        }
        return json_response(StatusCode::OK, &json!(list), Some(index));
    }
    let entries: Vec<(&String, &Kv)> = match recurse {
        true => store.under(&key).collect(),
        false => store.entries.get_key_value(&key).into_iter().collect(),
    };
    if entries.is_empty() {
        return not_found(index);
    }
    if query.contains_key("raw") && !recurse {
        let mut response =
            (StatusCode::OK, [("Content-Type", "text/plain")], entries[0].1.value.clone()).into_response();
        add_read_headers(response.headers_mut(), index);
        return response;
    }
    let list: Vec<Value> = entries.iter().map(|(k, kv)| entry_json(k, kv, true)).collect();
    json_response(StatusCode::OK, &Value::Array(list), Some(index))
}

fn not_found(index: u64) -> Response {
    let mut response = StatusCode::NOT_FOUND.into_response();
    add_read_headers(response.headers_mut(), index);
    response
}

/// A numeric parameter, or the message of Consul's 400 for it.
fn parse_u64(query: &BTreeMap<String, Option<String>>, name: &str) -> Result<Option<u64>, String> {
    match query.get(name) {
        None => Ok(None),
        Some(value) => match value.as_deref().unwrap_or("").parse::<u64>() {
            Ok(n) => Ok(Some(n)),
            Err(e) => Err(format!("strconv.ParseUint: parsing {value:?}: {e}")),
        },
    }
}

fn kv_put(shared: &Shared, key: String, query: &BTreeMap<String, Option<String>>, body: &[u8]) -> Response {
    if key.is_empty() {
        return text(StatusCode::BAD_REQUEST, "Missing key name");
    }
    let (flags, cas) = match (parse_u64(query, "flags"), parse_u64(query, "cas")) {
        (Ok(flags), Ok(cas)) => (flags.unwrap_or(0), cas),
        (Err(message), _) | (_, Err(message)) => return text(StatusCode::BAD_REQUEST, message),
    };
    if body.len() > MAX_VALUE_BYTES {
        return text(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "Request body({} bytes) too large, max size: {MAX_VALUE_BYTES} bytes. See https://developer.hashicorp.com/docs/agent/config/config-files#kv_max_value_size.",
                body.len()
            ),
        );
    }
    let written = {
        let mut store = shared.store();
        store.raft += 1;
        let index = store.raft;
        match cas {
            Some(cas) => store.set_cas(index, &key, body.to_vec(), flags, cas),
            None => {
                store.set(index, &key, body.to_vec(), flags);
                true
            }
        }
    };
    notify(shared);
    json_response(StatusCode::OK, &json!(written), None)
}

fn kv_delete(shared: &Shared, key: String, query: &BTreeMap<String, Option<String>>) -> Response {
    let recurse = query.contains_key("recurse");
    if recurse && query.contains_key("cas") {
        return text(StatusCode::BAD_REQUEST, "Conflicting flags: recurse and cas");
    }
    if !recurse && key.is_empty() {
        return text(StatusCode::BAD_REQUEST, "Missing key name");
    }
    let cas = match parse_u64(query, "cas") {
        Ok(cas) => cas,
        Err(message) => return text(StatusCode::BAD_REQUEST, message),
    };
    let deleted = {
        let mut store = shared.store();
        store.raft += 1;
        let index = store.raft;
        match (recurse, cas) {
            (true, _) => {
                store.delete_tree(index, &key);
                true
            }
            (false, Some(cas)) => store.delete_cas(index, &key, cas),
            (false, None) => {
                store.delete(index, &key);
                true
            }
        }
    };
    notify(shared);
    json_response(StatusCode::OK, &json!(deleted), None)
}

fn notify(shared: &Shared) {
    let raft = shared.store().raft;
    shared.changed.send_replace(raft);
}

/// A field of a JSON object, by case-insensitive name (Go's decoder is case-insensitive).
fn field<'a>(object: &'a Value, name: &str) -> Option<&'a Value> {
    object.as_object()?.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v)
}

/// One K/V operation of a transaction, decoded.
struct Op {
    verb: String,
    key: String,
    value: Vec<u8>,
    flags: u64,
    index: u64,
    session: String,
}

fn txn(shared: &Shared, body: &[u8]) -> Response {
    if body.len() > MAX_VALUE_BYTES {
        return text(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("Request body too large, max size: {MAX_VALUE_BYTES} bytes"),
        );
    }
    let parsed: Value = match serde_json::from_slice(body) {
        Ok(Value::Array(ops)) => Value::Array(ops),
        Ok(_) => return text(StatusCode::BAD_REQUEST, "Failed to parse body: not a list of operations"),
        Err(e) => return text(StatusCode::BAD_REQUEST, format!("Failed to parse body: {e}")),
    };
    let raw_ops = parsed.as_array().expect("checked above");
    if raw_ops.len() > MAX_TXN_OPS {
        return text(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("Transaction contains too many operations ({} > {MAX_TXN_OPS})", raw_ops.len()),
        );
    }
    let mut ops = Vec::with_capacity(raw_ops.len());
    for raw in raw_ops {
        let Some(kv) = field(raw, "KV") else {
            return text(
                StatusCode::BAD_REQUEST,
                "Failed to parse body: the Consul double implements KV operations only",
            );
        };
        let string = |name: &str| field(kv, name).and_then(Value::as_str).unwrap_or("").to_owned();
        let number = |name: &str| field(kv, name).and_then(Value::as_u64).unwrap_or(0);
        let value = match field(kv, "Value") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(b64)) => match base64::engine::general_purpose::STANDARD.decode(b64.as_bytes()) {
                Ok(bytes) => bytes,
                Err(e) => {
                    return text(StatusCode::BAD_REQUEST, format!("Failed to parse body: failed to decode value: {e}"))
                }
            },
            Some(other) => {
                return text(StatusCode::BAD_REQUEST, format!("Failed to parse body: unexpected value type: {other}"))
            }
        };
        let op = Op {
            verb: string("Verb"),
            key: string("Key"),
            value,
            flags: number("Flags"),
            index: number("Index"),
            session: string("Session"),
        };
        if op.value.len() > MAX_VALUE_BYTES {
            return text(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("Value for key {:?} is too large ({} > {MAX_VALUE_BYTES} bytes)", op.key, op.value.len()),
            );
        }
        ops.push(op);
    }
    let writes = ops.iter().any(|op| {
        matches!(op.verb.as_str(), "set" | "cas" | "lock" | "unlock" | "delete" | "delete-cas" | "delete-tree")
    });
    let mut store = shared.store();
    let mut scratch = store.clone();
    let index = if writes { store.raft + 1 } else { 0 };
    let mut results = Vec::new();
    let mut errors = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        match apply(&mut scratch, index, op) {
            Ok(mut r) => results.append(&mut r),
            Err(what) => errors.push(json!({ "OpIndex": i, "What": what })),
        }
    }
    if writes {
        // The transaction went through raft whether or not it applies.
        store.raft = index;
        if errors.is_empty() {
            scratch.raft = index;
            *store = scratch;
        }
    }
    drop(store);
    if writes {
        notify(shared);
    }
    if errors.is_empty() {
        json_response(StatusCode::OK, &json!({ "Results": results, "Errors": null }), None)
    } else {
        json_response(StatusCode::CONFLICT, &json!({ "Results": null, "Errors": errors }), None)
    }
}

/// Applies one operation to `store` at `index`; its results, or Consul's reason it failed.
fn apply(store: &mut Store, index: u64, op: &Op) -> Result<Vec<Value>, String> {
    let key = op.key.as_str();
    let result = |store: &Store, with_value: bool| -> Vec<Value> {
        store.entries.get(key).map(|kv| vec![json!({ "KV": entry_json(key, kv, with_value) })]).unwrap_or_default()
    };
    match op.verb.as_str() {
        "set" => {
            store.set(index, key, op.value.clone(), op.flags);
            Ok(result(store, false))
        }
        "cas" => match store.set_cas(index, key, op.value.clone(), op.flags, op.index) {
            true => Ok(result(store, false)),
            false => Err(format!("failed to set key {key:?}, index is stale")),
        },
        "delete" => {
            store.delete(index, key);
            Ok(Vec::new())
        }
        "delete-cas" => match store.delete_cas(index, key, op.index) {
            true => Ok(Vec::new()),
            false => Err(format!("failed to delete key {key:?}, index is stale")),
        },
        "delete-tree" => {
            store.delete_tree(index, key);
            Ok(Vec::new())
        }
        "get" => match store.entries.contains_key(key) {
            true => Ok(result(store, true)),
            false => Err(format!("key {key:?} doesn't exist")),
        },
        "get-or-empty" => match store.entries.contains_key(key) {
            true => Ok(result(store, true)),
            false => Ok(vec![json!({ "KV": {
                "LockIndex": 0, "Key": key, "Flags": op.flags, "Value": null, "CreateIndex": 0, "ModifyIndex": 0
            } })]),
        },
        "get-tree" => Ok(store.under(key).map(|(k, kv)| json!({ "KV": entry_json(k, kv, true) })).collect()),
        "check-index" => match store.entries.get(key) {
            None => Err(format!("failed to check index, key {key:?} doesn't exist")),
            Some(kv) if kv.modify != op.index => {
                Err(format!("failed index check for key {key:?}, current modify index {} != {}", kv.modify, op.index))
            }
            Some(_) => Ok(result(store, false)),
        },
        "check-not-exists" => match store.entries.contains_key(key) {
            true => Err(format!("key {key:?} exists")),
            false => Ok(Vec::new()),
        },
        "lock" => match op.session.is_empty() {
            true => Err("missing session".to_owned()),
            false => Err(format!("invalid session {:?}", op.session)),
        },
        "unlock" => match op.session.is_empty() {
            true => Err("missing session".to_owned()),
            false => Err(format!("failed to unlock key {key:?}, lock isn't held, or is held by another session")),
        },
        "check-session" => match store.entries.contains_key(key) {
            false => Err(format!("failed to check session, key {key:?} doesn't exist")),
            true => Err(format!("failed session check for key {key:?}, current session \"\" != {:?}", op.session)),
        },
        verb => Err(format!("unknown KV verb {verb:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations_parse() {
        assert_eq!(parse_go_duration("10s"), Some(Duration::from_secs(10)));
        assert_eq!(parse_go_duration("1500ms"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_go_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_go_duration("10"), None);
        assert_eq!(parse_go_duration(""), None);
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(decode("a%20b%2Fc+d", false), "a b/c+d");
        assert_eq!(decode("a+b", true), "a b");
        assert_eq!(decode("100%", false), "100%");
        assert_eq!(decode("%4", false), "%4");
    }
}
