//! A small client of Consul's K/V HTTP API, for the relay's copy of the configuration
//! index in Consul (see [`index`]).
//!
//! It speaks only what the index needs — `GET /v1/kv/<key>` (single key, `?recurse`,
//! `?keys`, `?raw`, blocking with `?index=&wait=`), `PUT` with `?cas=`, `DELETE` with
//! `?recurse` or `?cas=`, and `PUT /v1/txn` — and keeps values as bytes end to end
//! (base64 in JSON, as Consul encodes them). Limits Consul enforces are checked before
//! anything is sent: values up to [`MAX_VALUE_BYTES`], transactions up to
//! [`MAX_TXN_OPS`] operations and [`MAX_TXN_BODY_BYTES`] of JSON.
//!
//! The ACL token travels in the `X-Consul-Token` header (never in a URL, so it is not in
//! any error message) and is never printed: [`Token`]'s `Debug` hides it.

pub mod index;

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use reqwest::header::HeaderValue;
use reqwest::{Method, StatusCode};
use serde::{Deserialize, Serialize};

/// Consul's default `kv_max_value_size`: the largest value a key may hold.
pub const MAX_VALUE_BYTES: usize = 512 * 1024;
/// The most operations Consul accepts in one `/v1/txn` (64 up to Consul 1.x; newer
/// servers accept more, so 64 is safe everywhere).
pub const MAX_TXN_OPS: usize = 64;
/// Consul's default `txn_max_req_len`: the largest `/v1/txn` request body.
pub const MAX_TXN_BODY_BYTES: usize = 512 * 1024;
/// Consul caps a blocking query's wait at ten minutes.
pub const MAX_WAIT: Duration = Duration::from_secs(600);
/// How long a request that is not a blocking query may take, connection included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A failure talking to Consul, naming the request that failed.
#[derive(Debug, thiserror::Error)]
pub enum ConsulError {
    /// The request did not get an HTTP answer (connection refused, timeout, ...).
    #[error("consul {method} {path}: {message}")]
    Transport {
        /// HTTP method.
        method: Method,
        /// URL path (no query, no host).
        path: String,
        /// What went wrong.
        message: String,
    },
    /// Consul answered with an error status.
    #[error("consul {method} {path}: HTTP {status}: {message}")]
    Status {
        /// HTTP method.
        method: Method,
        /// URL path.
        path: String,
        /// The status Consul returned.
        status: StatusCode,
        /// Consul's message (the response body, shortened).
        message: String,
    },
    /// Consul answered 2xx with a body that is not what its API documents.
    #[error("consul {method} {path}: unexpected response: {message}")]
    Response {
        /// HTTP method.
        method: Method,
        /// URL path.
        path: String,
        /// What is wrong with it.
        message: String,
    },
    /// A value is larger than Consul accepts; nothing was sent.
    #[error("value of consul key {key} is {bytes} bytes, over Consul's limit of {MAX_VALUE_BYTES} bytes; not sent")]
    ValueTooLarge {
        /// The key.
        key: String,
        /// The value's size.
        bytes: usize,
    },
    /// A transaction has more operations than Consul accepts; nothing was sent.
    #[error("consul transaction of {ops} operations is over Consul's limit of {MAX_TXN_OPS}; not sent")]
    TooManyOps {
        /// How many operations it had.
        ops: usize,
    },
    /// A transaction's JSON body is larger than Consul accepts; nothing was sent.
    #[error("consul transaction body of {bytes} bytes is over Consul's limit of {MAX_TXN_BODY_BYTES} bytes; not sent")]
    TxnTooLarge {
        /// The body's size.
        bytes: usize,
    },
    /// Other writers kept changing the keys between reading and writing them.
    #[error("consul keys under {prefix} changed by another writer {attempts} times in a row: {what}")]
    Conflict {
        /// The prefix being written.
        prefix: String,
        /// How many times a transaction was rolled back.
        attempts: usize,
        /// Consul's reasons.
        what: String,
    },
    /// The Consul URL cannot be used.
    #[error("consul URL {url:?}: {message}")]
    Url {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        message: String,
    },
    /// The token file cannot be read or holds no usable token.
    #[error("consul token file {path}: {message}")]
    TokenFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

impl ConsulError {
    /// Whether retrying the same request later may succeed: Consul unreachable, busy or
    /// failing on its side. A refused token, a bad request or a limit is not.
    pub fn is_transient(&self) -> bool {
        match self {
            ConsulError::Transport { .. } => true,
            ConsulError::Status { status, .. } => status.is_server_error() || *status == StatusCode::TOO_MANY_REQUESTS,
            ConsulError::Response { .. } | ConsulError::Conflict { .. } => true,
            _ => false,
        }
    }
}

/// An ACL token; its `Debug` and `Display` never show it.
#[derive(Clone)]
pub struct Token(String);

impl Token {
    /// Reads a token from a file (surrounding white space ignored), as `consul` itself
    /// does with `-token-file`.
    pub fn from_file(path: &Path) -> Result<Token, ConsulError> {
        let fail = |message: String| ConsulError::TokenFile { path: path.to_owned(), message };
        let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
        let token = text.trim();
        if token.is_empty() {
            return Err(fail("the file is empty".to_owned()));
        }
        if HeaderValue::from_str(token).is_err() || token.contains(char::is_whitespace) {
            return Err(fail("the token contains characters an HTTP header cannot carry".to_owned()));
        }
        Ok(Token(token.to_owned()))
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// One key as Consul returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Full key.
    pub key: String,
    /// The value's bytes (empty when Consul has none).
    pub value: Vec<u8>,
    /// Opaque flags.
    pub flags: u64,
    /// Index of the write that created the key.
    pub create_index: u64,
    /// Index of the last write that changed it: the `cas` a writer must present.
    pub modify_index: u64,
    /// How many times a lock on it was acquired.
    pub lock_index: u64,
}

/// A read result with Consul's `X-Consul-Index`, to pass to the next blocking query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Indexed<T> {
    /// What was read.
    pub value: T,
    /// The `X-Consul-Index` header.
    pub index: u64,
}

/// Makes a read a blocking query: it returns once Consul's index for what is read
/// passes `index`, or after `wait`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Blocking {
    /// The `X-Consul-Index` of the previous answer.
    pub index: u64,
    /// The longest the query may wait (Consul caps it at [`MAX_WAIT`]).
    pub wait: Duration,
}

/// One operation of a `/v1/txn` transaction (the K/V verbs the relay uses).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxnOp {
    /// `set`: write the value.
    Set {
        /// Key.
        key: String,
        /// Value.
        value: Vec<u8>,
    },
    /// `cas`: write the value if the key's modify index is `index` (0: if it does not exist).
    Cas {
        /// Key.
        key: String,
        /// Value.
        value: Vec<u8>,
        /// Expected modify index.
        index: u64,
    },
    /// `get`: read the key; the transaction fails if it does not exist.
    Get {
        /// Key.
        key: String,
    },
    /// `check-index`: fail the transaction unless the key's modify index is `index`.
    CheckIndex {
        /// Key.
        key: String,
        /// Expected modify index.
        index: u64,
    },
    /// `delete`: remove the key (nothing if absent).
    Delete {
        /// Key.
        key: String,
    },
    /// `delete-cas`: remove the key if its modify index is `index`.
    DeleteCas {
        /// Key.
        key: String,
        /// Expected modify index.
        index: u64,
    },
    /// `delete-tree`: remove every key under a prefix.
    DeleteTree {
        /// Prefix.
        prefix: String,
    },
}

impl TxnOp {
    /// The key (or prefix) the operation acts on.
    pub fn key(&self) -> &str {
        match self {
            TxnOp::Set { key, .. }
            | TxnOp::Cas { key, .. }
            | TxnOp::Get { key }
            | TxnOp::CheckIndex { key, .. }
            | TxnOp::Delete { key }
            | TxnOp::DeleteCas { key, .. } => key,
            TxnOp::DeleteTree { prefix } => prefix,
        }
    }

    fn to_wire(&self) -> WireOp<'_> {
        let b64 = |v: &[u8]| Some(base64::engine::general_purpose::STANDARD.encode(v));
        let (verb, value, index) = match self {
            TxnOp::Set { value, .. } => ("set", b64(value), None),
            TxnOp::Cas { value, index, .. } => ("cas", b64(value), Some(*index)),
            TxnOp::Get { .. } => ("get", None, None),
            TxnOp::CheckIndex { index, .. } => ("check-index", None, Some(*index)),
            TxnOp::Delete { .. } => ("delete", None, None),
            TxnOp::DeleteCas { index, .. } => ("delete-cas", None, Some(*index)),
            TxnOp::DeleteTree { .. } => ("delete-tree", None, None),
        };
        WireOp { kv: WireKv { verb, key: self.key(), value, index } }
    }
}

#[derive(Serialize)]
struct WireOp<'a> {
    #[serde(rename = "KV")]
    kv: WireKv<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct WireKv<'a> {
    verb: &'static str,
    key: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    index: Option<u64>,
}

/// The JSON shape of a K/V entry.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct WireEntry {
    key: String,
    #[serde(default)]
    value: Option<String>,
    #[serde(default)]
    flags: u64,
    #[serde(default)]
    create_index: u64,
    #[serde(default)]
    modify_index: u64,
    #[serde(default)]
    lock_index: u64,
}

impl WireEntry {
    fn decode(self) -> Result<Entry, String> {
        let value = match self.value {
            Some(text) => base64::engine::general_purpose::STANDARD
                .decode(text.as_bytes())
                .map_err(|e| format!("value of {} is not base64: {e}", self.key))?,
            None => Vec::new(),
        };
        Ok(Entry {
            key: self.key,
            value,
            flags: self.flags,
            create_index: self.create_index,
            modify_index: self.modify_index,
            lock_index: self.lock_index,
        })
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct WireTxnResponse {
    #[serde(default)]
    results: Option<Vec<WireTxnResult>>,
    #[serde(default)]
    errors: Option<Vec<TxnFailure>>,
}

#[derive(Deserialize)]
struct WireTxnResult {
    #[serde(rename = "KV")]
    kv: Option<WireEntry>,
}

/// Why Consul rolled a transaction back: one per failed operation.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct TxnFailure {
    /// Position of the failed operation in the transaction.
    pub op_index: usize,
    /// Consul's reason (e.g. `failed to set key "k", index is stale`).
    pub what: String,
}

/// What a transaction did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxnOutcome {
    /// Applied as a whole. One entry per operation that returns one (every verb but the
    /// deletes), in order; values are empty except for `get`.
    Committed(Vec<Entry>),
    /// Nothing applied (HTTP 409): the operations that failed.
    RolledBack(Vec<TxnFailure>),
}

/// A client of one Consul agent or server.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<Token>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("base", &self.base).field("token", &self.token).finish()
    }
}

impl Client {
    /// A client of the Consul at `url` (`http(s)://host:port`; a bare `host:port` means
    /// `http://`), sending `token` with every request.
    pub fn new(url: &str, token: Option<Token>) -> Result<Client, ConsulError> {
        let fail = |message: String| ConsulError::Url { url: url.to_owned(), message };
        let with_scheme = if url.contains("://") { url.to_owned() } else { format!("http://{url}") };
        let parsed = reqwest::Url::parse(&with_scheme).map_err(|e| fail(e.to_string()))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(fail("only http and https are supported".to_owned()));
        }
        if parsed.query().is_some() || parsed.fragment().is_some() {
            return Err(fail("a query or fragment has no meaning here".to_owned()));
        }
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err(fail("credentials go in --consul-token-file, not in the URL".to_owned()));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(REQUEST_TIMEOUT)
            .user_agent(concat!("confcast-relay/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| fail(e.to_string()))?;
        Ok(Client { http, base: parsed.as_str().trim_end_matches('/').to_owned(), token })
    }

    /// The agent's URL.
    pub fn url(&self) -> &str {
        &self.base
    }

    /// `GET /v1/kv/<key>`: the entry, or `None` (404).
    pub async fn get(&self, key: &str, blocking: Option<Blocking>) -> Result<Indexed<Option<Entry>>, ConsulError> {
        let path = kv_path(key);
        let read = self.read(&path, &[], blocking).await?;
        let value = match read.body {
            Some(body) => decode_entries(&path, &body)?.pop(),
            None => None,
        };
        Ok(Indexed { value, index: read.index })
    }

    /// `GET /v1/kv/<key>?raw`: the value's bytes as stored, or `None` (404).
    pub async fn get_raw(
        &self,
        key: &str,
        blocking: Option<Blocking>,
    ) -> Result<Indexed<Option<Vec<u8>>>, ConsulError> {
        let read = self.read(&kv_path(key), &[("raw", None)], blocking).await?;
        Ok(Indexed { value: read.body, index: read.index })
    }

    /// `GET /v1/kv/<prefix>?recurse`: every entry under `prefix` (none: empty).
    pub async fn list(&self, prefix: &str, blocking: Option<Blocking>) -> Result<Indexed<Vec<Entry>>, ConsulError> {
        let path = kv_path(prefix);
        let read = self.read(&path, &[("recurse", None)], blocking).await?;
        let value = match read.body {
            Some(body) => decode_entries(&path, &body)?,
            None => Vec::new(),
        };
        Ok(Indexed { value, index: read.index })
    }

    /// `GET /v1/kv/<prefix>?keys[&separator=]`: the keys under `prefix`, rolled up at
    /// `separator` if given (none: empty).
    pub async fn keys(
        &self,
        prefix: &str,
        separator: Option<&str>,
        blocking: Option<Blocking>,
    ) -> Result<Indexed<Vec<String>>, ConsulError> {
        let path = kv_path(prefix);
        let mut query = vec![("keys", None)];
        if let Some(separator) = separator {
            query.push(("separator", Some(separator.to_owned())));
        }
        let read = self.read(&path, &query, blocking).await?;
        let value = match read.body {
            Some(body) => serde_json::from_slice(&body).map_err(|e| ConsulError::Response {
                method: Method::GET,
                path: path.clone(),
                message: format!("not a list of keys: {e}"),
            })?,
            None => Vec::new(),
        };
        Ok(Indexed { value, index: read.index })
    }

    /// `PUT /v1/kv/<key>[?cas=]`: writes `value`. With `cas`, only if the key's modify
    /// index is `cas` (0: only if the key does not exist); returns whether it was written.
    pub async fn put(&self, key: &str, value: &[u8], cas: Option<u64>) -> Result<bool, ConsulError> {
        if value.len() > MAX_VALUE_BYTES {
            return Err(ConsulError::ValueTooLarge { key: key.to_owned(), bytes: value.len() });
        }
        let path = kv_path(key);
        let query: Vec<(&str, Option<String>)> = cas.map(|c| ("cas", Some(c.to_string()))).into_iter().collect();
        let body = self.write(Method::PUT, &path, &query, value.to_vec()).await?;
        parse_bool(Method::PUT, &path, &body)
    }

    /// `DELETE /v1/kv/<key>[?cas=]`: removes the key. With `cas`, only if its modify index
    /// is `cas`; returns whether it was removed (true without `cas`, even if it was absent).
    pub async fn delete(&self, key: &str, cas: Option<u64>) -> Result<bool, ConsulError> {
        let path = kv_path(key);
        let query: Vec<(&str, Option<String>)> = cas.map(|c| ("cas", Some(c.to_string()))).into_iter().collect();
        let body = self.write(Method::DELETE, &path, &query, Vec::new()).await?;
        parse_bool(Method::DELETE, &path, &body)
    }

    /// `DELETE /v1/kv/<prefix>?recurse`: removes every key under `prefix`.
    pub async fn delete_tree(&self, prefix: &str) -> Result<(), ConsulError> {
        let path = kv_path(prefix);
        let body = self.write(Method::DELETE, &path, &[("recurse", None)], Vec::new()).await?;
        parse_bool(Method::DELETE, &path, &body).map(|_| ())
    }

    /// `PUT /v1/txn`: applies `ops` all together or not at all. Refuses, without sending,
    /// more than [`MAX_TXN_OPS`] operations, a value over [`MAX_VALUE_BYTES`] or a body
    /// over [`MAX_TXN_BODY_BYTES`].
    pub async fn txn(&self, ops: &[TxnOp]) -> Result<TxnOutcome, ConsulError> {
        let path = "/v1/txn".to_owned();
        let body = txn_body(ops)?;
        let (status, response) = self.send(Method::PUT, &path, &[], Some(body), REQUEST_TIMEOUT).await?;
        let bad = |message: String| ConsulError::Response { method: Method::PUT, path: path.clone(), message };
        match status {
            StatusCode::OK | StatusCode::CONFLICT => {
                let parsed: WireTxnResponse = serde_json::from_slice(&response.body)
                    .map_err(|e| bad(format!("not a transaction result: {e}")))?;
                if status == StatusCode::CONFLICT {
                    let errors = parsed.errors.unwrap_or_default();
                    if errors.is_empty() {
                        return Err(bad("409 without errors".to_owned()));
                    }
                    return Ok(TxnOutcome::RolledBack(errors));
                }
                let mut entries = Vec::new();
                for result in parsed.results.unwrap_or_default() {
                    if let Some(kv) = result.kv {
                        entries.push(kv.decode().map_err(bad)?);
                    }
                }
                Ok(TxnOutcome::Committed(entries))
            }
            status => Err(status_error(Method::PUT, &path, status, &response.body)),
        }
    }

    /// A GET; `None` body for 404 (Consul still sends its index then).
    async fn read(
        &self,
        path: &str,
        query: &[(&str, Option<String>)],
        blocking: Option<Blocking>,
    ) -> Result<Read, ConsulError> {
        let mut query = query.to_vec();
        let mut timeout = REQUEST_TIMEOUT;
        if let Some(blocking) = blocking {
            let wait = blocking.wait.min(MAX_WAIT);
            query.push(("index", Some(blocking.index.to_string())));
            query.push(("wait", Some(format!("{}ms", wait.as_millis().max(1)))));
            // Consul adds up to wait/16 of jitter before it answers.
            timeout += wait + wait / 16;
        }
        let (status, response) = self.send(Method::GET, path, &query, None, timeout).await?;
        let index = match response.index {
            Some(index) => index,
            None if status.is_success() || status == StatusCode::NOT_FOUND => {
                return Err(ConsulError::Response {
                    method: Method::GET,
                    path: path.to_owned(),
                    message: "no X-Consul-Index header".to_owned(),
                })
            }
            None => 0,
        };
        match status {
            StatusCode::OK => Ok(Read { body: Some(response.body), index }),
            StatusCode::NOT_FOUND => Ok(Read { body: None, index }),
            status => Err(status_error(Method::GET, path, status, &response.body)),
        }
    }

    /// A PUT or DELETE on `/v1/kv/`: the body of a 200 answer.
    async fn write(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, Option<String>)],
        body: Vec<u8>,
    ) -> Result<Vec<u8>, ConsulError> {
        let (status, response) = self.send(method.clone(), path, query, Some(body), REQUEST_TIMEOUT).await?;
        if status != StatusCode::OK {
            return Err(status_error(method, path, status, &response.body));
        }
        Ok(response.body)
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, Option<String>)],
        body: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<(StatusCode, Response), ConsulError> {
        let transport = |e: reqwest::Error| ConsulError::Transport {
            method: method.clone(),
            path: path.to_owned(),
            message: error_chain(&e.without_url()),
        };
        let mut url = format!("{}{path}", self.base);
        for (i, (name, value)) in query.iter().enumerate() {
            url.push(if i == 0 { '?' } else { '&' });
            url.push_str(name);
            if let Some(value) = value {
                url.push('=');
                url.push_str(&percent_encode(value, false));
            }
        }
        let mut request = self.http.request(method.clone(), url).timeout(timeout);
        if let Some(token) = &self.token {
            let mut value = HeaderValue::from_str(&token.0).expect("checked when the token was read");
            value.set_sensitive(true);
            request = request.header("X-Consul-Token", value);
        }
        if let Some(body) = body {
            request = request.body(body);
        }
        let response = request.send().await.map_err(transport)?;
        let status = response.status();
        let index =
            response.headers().get("X-Consul-Index").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
        let body = response.bytes().await.map_err(transport)?.to_vec();
        Ok((status, Response { index, body }))
    }
}

struct Read {
    body: Option<Vec<u8>>,
    index: u64,
}

struct Response {
    index: Option<u64>,
    body: Vec<u8>,
}

/// The JSON body of a transaction, within Consul's limits.
fn txn_body(ops: &[TxnOp]) -> Result<Vec<u8>, ConsulError> {
    if ops.len() > MAX_TXN_OPS {
        return Err(ConsulError::TooManyOps { ops: ops.len() });
    }
    for op in ops {
        if let TxnOp::Set { key, value } | TxnOp::Cas { key, value, .. } = op {
            if value.len() > MAX_VALUE_BYTES {
                return Err(ConsulError::ValueTooLarge { key: key.clone(), bytes: value.len() });
            }
        }
    }
    let wire: Vec<WireOp<'_>> = ops.iter().map(TxnOp::to_wire).collect();
    let body = serde_json::to_vec(&wire).expect("transaction operations serialize");
    if body.len() > MAX_TXN_BODY_BYTES {
        return Err(ConsulError::TxnTooLarge { bytes: body.len() });
    }
    Ok(body)
}

/// How many bytes `op` adds to a transaction's JSON body (exact for the keys confcast
/// writes, which need no JSON escaping; an estimate otherwise).
pub fn txn_op_bytes(op: &TxnOp) -> usize {
    serde_json::to_vec(&op.to_wire()).map(|v| v.len() + 1).unwrap_or(usize::MAX)
}

fn decode_entries(path: &str, body: &[u8]) -> Result<Vec<Entry>, ConsulError> {
    let bad = |message: String| ConsulError::Response { method: Method::GET, path: path.to_owned(), message };
    let wire: Vec<WireEntry> = serde_json::from_slice(body).map_err(|e| bad(format!("not a list of entries: {e}")))?;
    wire.into_iter().map(|w| w.decode().map_err(bad)).collect()
}

fn parse_bool(method: Method, path: &str, body: &[u8]) -> Result<bool, ConsulError> {
    match std::str::from_utf8(body).map(str::trim) {
        Ok("true") => Ok(true),
        Ok("false") => Ok(false),
        _ => Err(ConsulError::Response {
            method,
            path: path.to_owned(),
            message: format!("expected true or false, got {:?}", shorten(body)),
        }),
    }
}

fn status_error(method: Method, path: &str, status: StatusCode, body: &[u8]) -> ConsulError {
    let message = shorten(body);
    ConsulError::Status {
        method,
        path: path.to_owned(),
        status,
        message: if message.is_empty() { status.canonical_reason().unwrap_or("").to_owned() } else { message },
    }
}

/// Consul's error text, on one line and bounded.
fn shorten(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match line.char_indices().nth(300) {
        Some((cut, _)) => format!("{}...", &line[..cut]),
        None => line,
    }
}

/// An error and its causes on one line (reqwest's own message is only the outermost).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// `/v1/kv/<key>` with the key percent-encoded (its `/` kept).
fn kv_path(key: &str) -> String {
    format!("/v1/kv/{}", percent_encode(key, true))
}

fn percent_encode(text: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(text.len());
    for &b in text.as_bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || (keep_slash && b == b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_percent_encoded_but_keep_their_slashes() {
        assert_eq!(
            kv_path("confcast/dc1/configurations/services/a b/v1.0"),
            "/v1/kv/confcast/dc1/configurations/services/a%20b/v1.0"
        );
        assert_eq!(kv_path("x=2Fy?z"), "/v1/kv/x%3D2Fy%3Fz");
    }

    #[test]
    fn transactions_are_refused_before_sending_when_over_consul_limits() {
        let op = |i: usize| TxnOp::Set { key: format!("k{i}"), value: vec![b'x'; 10] };
        let ops: Vec<TxnOp> = (0..MAX_TXN_OPS).map(op).collect();
        assert!(txn_body(&ops).is_ok());
        let ops: Vec<TxnOp> = (0..=MAX_TXN_OPS).map(op).collect();
        assert!(matches!(txn_body(&ops), Err(ConsulError::TooManyOps { ops: 65 })));
        let big = [TxnOp::Cas { key: "big".into(), value: vec![0; MAX_VALUE_BYTES + 1], index: 0 }];
        assert!(
            matches!(txn_body(&big), Err(ConsulError::ValueTooLarge { bytes, .. }) if bytes == MAX_VALUE_BYTES + 1)
        );
        // Two values under the value limit whose base64 together exceeds the body limit.
        let two: Vec<TxnOp> =
            (0..2).map(|i| TxnOp::Set { key: format!("k{i}"), value: vec![1; MAX_VALUE_BYTES / 2] }).collect();
        assert!(matches!(txn_body(&two), Err(ConsulError::TxnTooLarge { .. })));
    }

    #[test]
    fn transaction_bodies_are_consul_json_with_base64_values() {
        let ops = [
            TxnOp::Cas { key: "a".into(), value: vec![0, 255, b'\n'], index: 7 },
            TxnOp::DeleteCas { key: "b".into(), index: 3 },
            TxnOp::Delete { key: "c".into() },
        ];
        let body: serde_json::Value = serde_json::from_slice(&txn_body(&ops).expect("body")).expect("json");
        assert_eq!(
            body,
            serde_json::json!([
                { "KV": { "Verb": "cas", "Key": "a", "Value": "AP8K", "Index": 7 } },
                { "KV": { "Verb": "delete-cas", "Key": "b", "Index": 3 } },
                { "KV": { "Verb": "delete", "Key": "c" } },
            ])
        );
        let total: usize = ops.iter().map(txn_op_bytes).sum();
        // Each counts its separator; the body adds two brackets and has one comma fewer.
        assert_eq!(total + 1, txn_body(&ops).expect("body").len(), "sizes add up to the body");
    }

    #[test]
    fn tokens_are_read_trimmed_and_never_shown() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("token");
        std::fs::write(&path, "  s3cr3t-token\n").expect("write");
        let token = Token::from_file(&path).expect("token");
        assert_eq!(token.0, "s3cr3t-token");
        assert!(!format!("{token:?}").contains("s3cr3t"));
        let client = Client::new("127.0.0.1:8500", Some(token)).expect("client");
        assert!(!format!("{client:?}").contains("s3cr3t"));
        assert!(format!("{client:?}").contains("http://127.0.0.1:8500"));
        std::fs::write(&path, "\n").expect("write");
        assert!(matches!(Token::from_file(&path), Err(ConsulError::TokenFile { .. })));
        assert!(matches!(Token::from_file(&dir.path().join("missing")), Err(ConsulError::TokenFile { .. })));
    }

    #[test]
    fn urls_are_checked() {
        assert!(Client::new("https://consul.example:8501/", None).is_ok());
        assert!(matches!(Client::new("ftp://x", None), Err(ConsulError::Url { .. })));
        assert!(matches!(Client::new("http://user:pw@x", None), Err(ConsulError::Url { .. })));
        assert!(matches!(Client::new("http://x/?dc=a", None), Err(ConsulError::Url { .. })));
    }

    #[test]
    fn only_unreachable_or_failing_servers_are_worth_retrying() {
        let status =
            |status| ConsulError::Status { method: Method::GET, path: "/".into(), status, message: String::new() };
        assert!(status(StatusCode::INTERNAL_SERVER_ERROR).is_transient());
        assert!(status(StatusCode::TOO_MANY_REQUESTS).is_transient());
        assert!(!status(StatusCode::FORBIDDEN).is_transient());
        assert!(!ConsulError::TooManyOps { ops: 65 }.is_transient());
    }
}
