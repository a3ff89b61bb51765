//! A small client of Consul's K/V HTTP API, for the relay's copy of the configuration
//! index in Consul (see [`index`]).
//!
//! It speaks only what the index needs — `GET /v1/kv/<prefix>?recurse` and
//! `PUT /v1/txn` with `cas` and `delete-cas` — and keeps values as bytes end to end
//! (base64 in JSON, as Consul encodes them). Limits Consul enforces are checked before
//! anything is sent: values up to [`MAX_VALUE_BYTES`], transactions up to
//! [`MAX_TXN_OPS`] operations and [`MAX_TXN_BODY_BYTES`] of JSON.
//!
//! The ACL token travels in the `X-Consul-Token` header (never in a URL, so it is not in
//! any error message) and is never printed: [`Token`]'s `Debug` hides it. What can go
//! wrong, and what a retry may cure, is in `error.rs`.

mod error;
pub mod index;

pub use error::ConsulError;

use std::path::Path;
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
/// How long a request may take, connection included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// An ACL token; its `Debug` and `Display` never show it.
#[derive(Clone)]
pub struct Token(String);

impl Token {
    /// Reads a token from a file (surrounding white space ignored), as `consul` itself
    /// does with `-token-file`.
    pub fn from_file(path: &Path) -> Result<Token, ConsulError> {
        let bad = |problem| ConsulError::BadToken { path: path.to_owned(), problem };
        let text =
            std::fs::read_to_string(path).map_err(|source| ConsulError::TokenFile { path: path.to_owned(), source })?;
        let token = text.trim();
        if token.is_empty() {
            return Err(bad("the file is empty"));
        }
        if HeaderValue::from_str(token).is_err() || token.contains(char::is_whitespace) {
            return Err(bad("the token contains characters an HTTP header cannot carry"));
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
    /// Index of the last write that changed it: the `cas` a writer must present.
    pub modify_index: u64,
}

/// One operation of a `/v1/txn` transaction: the check-and-set verbs the index writes
/// with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxnOp {
    /// `cas`: write the value if the key's modify index is `index` (0: if it does not exist).
    Cas {
        /// Key.
        key: String,
        /// Value.
        value: Vec<u8>,
        /// Expected modify index.
        index: u64,
    },
    /// `delete-cas`: remove the key if its modify index is `index`.
    DeleteCas {
        /// Key.
        key: String,
        /// Expected modify index.
        index: u64,
    },
}

impl TxnOp {
    /// The key the operation acts on.
    pub fn key(&self) -> &str {
        match self {
            TxnOp::Cas { key, .. } | TxnOp::DeleteCas { key, .. } => key,
        }
    }

    fn to_wire(&self) -> WireOp<'_> {
        let (verb, value, index) = match self {
            TxnOp::Cas { value, index, .. } => {
                ("cas", Some(base64::engine::general_purpose::STANDARD.encode(value)), *index)
            }
            TxnOp::DeleteCas { index, .. } => ("delete-cas", None, *index),
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
    index: u64,
}

/// The JSON shape of a K/V entry.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct WireEntry {
    key: String,
    #[serde(default)]
    value: Option<String>,
    #[serde(default)]
    modify_index: u64,
}

impl WireEntry {
    fn decode(self, method: Method, path: &str) -> Result<Entry, ConsulError> {
        let value = match self.value {
            Some(text) => base64::engine::general_purpose::STANDARD.decode(text.as_bytes()).map_err(|source| {
                ConsulError::Base64 { method, path: path.to_owned(), key: self.key.clone(), source }
            })?,
            None => Vec::new(),
        };
        Ok(Entry { key: self.key, value, modify_index: self.modify_index })
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
    /// Applied as a whole. One entry per `cas` (deletes return none), in order, with its
    /// new modify index; values are empty.
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
        let unusable = |problem| ConsulError::UnusableUrl { url: url.to_owned(), problem };
        let with_scheme = if url.contains("://") { url.to_owned() } else { format!("http://{url}") };
        let parsed =
            reqwest::Url::parse(&with_scheme).map_err(|source| ConsulError::Url { url: url.to_owned(), source })?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(unusable("only http and https are supported"));
        }
        if parsed.query().is_some() || parsed.fragment().is_some() {
            return Err(unusable("a query or fragment has no meaning here"));
        }
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err(unusable("credentials go in --consul-token-file, not in the URL"));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(REQUEST_TIMEOUT)
            .user_agent(concat!("confcast-relay/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|source| ConsulError::HttpClient { url: url.to_owned(), source })?;
        Ok(Client { http, base: parsed.as_str().trim_end_matches('/').to_owned(), token })
    }

    /// The agent's URL.
    pub fn url(&self) -> &str {
        &self.base
    }

    /// `GET /v1/kv/<prefix>?recurse`: every entry under `prefix` (none: empty).
    pub async fn list(&self, prefix: &str) -> Result<Vec<Entry>, ConsulError> {
        let path = kv_path(prefix);
        let (status, body) = self.send(Method::GET, &path, "?recurse", None).await?;
        match status {
            StatusCode::OK => {
                let json = |source| ConsulError::Json { method: Method::GET, path: path.clone(), source };
                let wire: Vec<WireEntry> = serde_json::from_slice(&body).map_err(json)?;
                wire.into_iter().map(|w| w.decode(Method::GET, &path)).collect()
            }
            StatusCode::NOT_FOUND => Ok(Vec::new()),
            status => Err(status_error(Method::GET, &path, status, &body)),
        }
    }

    /// `PUT /v1/txn`: applies `ops` all together or not at all. Refuses, without sending,
    /// more than [`MAX_TXN_OPS`] operations, a value over [`MAX_VALUE_BYTES`] or a body
    /// over [`MAX_TXN_BODY_BYTES`].
    pub async fn txn(&self, ops: &[TxnOp]) -> Result<TxnOutcome, ConsulError> {
        let path = "/v1/txn".to_owned();
        let (status, response) = self.send(Method::PUT, &path, "", Some(txn_body(ops)?)).await?;
        if status != StatusCode::OK && status != StatusCode::CONFLICT {
            return Err(status_error(Method::PUT, &path, status, &response));
        }
        let json = |source| ConsulError::Json { method: Method::PUT, path: path.clone(), source };
        let parsed: WireTxnResponse = serde_json::from_slice(&response).map_err(json)?;
        if status == StatusCode::CONFLICT {
            let errors = parsed.errors.unwrap_or_default();
            if errors.is_empty() {
                return Err(ConsulError::RolledBackWithoutErrors { path });
            }
            return Ok(TxnOutcome::RolledBack(errors));
        }
        let mut entries = Vec::new();
        for result in parsed.results.unwrap_or_default() {
            if let Some(kv) = result.kv {
                entries.push(kv.decode(Method::PUT, &path)?);
            }
        }
        Ok(TxnOutcome::Committed(entries))
    }

    /// Sends one request; its status and body.
    async fn send(
        &self,
        method: Method,
        path: &str,
        query: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Vec<u8>), ConsulError> {
        let transport = |e: reqwest::Error| ConsulError::Transport {
            method: method.clone(),
            path: path.to_owned(),
            source: e.without_url(),
        };
        let url = format!("{}{path}{query}", self.base);
        let mut request = self.http.request(method.clone(), url).timeout(REQUEST_TIMEOUT);
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
        let body = response.bytes().await.map_err(transport)?.to_vec();
        Ok((status, body))
    }
}

/// The JSON body of a transaction, within Consul's limits.
fn txn_body(ops: &[TxnOp]) -> Result<Vec<u8>, ConsulError> {
    if ops.len() > MAX_TXN_OPS {
        return Err(ConsulError::TooManyOps { ops: ops.len() });
    }
    for op in ops {
        if let TxnOp::Cas { key, value, .. } = op {
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

/// `/v1/kv/<key>` with the key percent-encoded (its `/` kept).
fn kv_path(key: &str) -> String {
    let mut out = String::from("/v1/kv/");
    for &b in key.as_bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
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
        let op = |i: usize| TxnOp::Cas { key: format!("k{i}"), value: vec![b'x'; 10], index: 0 };
        let ops: Vec<TxnOp> = (0..MAX_TXN_OPS).map(op).collect();
        assert!(txn_body(&ops).is_ok());
        let ops: Vec<TxnOp> = (0..=MAX_TXN_OPS).map(op).collect();
        assert!(matches!(txn_body(&ops), Err(ConsulError::TooManyOps { ops: 65 })));
        let big = [TxnOp::Cas { key: "big".into(), value: vec![0; MAX_VALUE_BYTES + 1], index: 0 }];
        assert!(
            matches!(txn_body(&big), Err(ConsulError::ValueTooLarge { bytes, .. }) if bytes == MAX_VALUE_BYTES + 1)
        );
        // Two values under the value limit whose base64 together exceeds the body limit.
        let two: Vec<TxnOp> = (0..2)
            .map(|i| TxnOp::Cas { key: format!("k{i}"), value: vec![1; MAX_VALUE_BYTES / 2], index: 0 })
            .collect();
        assert!(matches!(txn_body(&two), Err(ConsulError::TxnTooLarge { .. })));
    }

    #[test]
    fn transaction_bodies_are_consul_json_with_base64_values() {
        let ops = [
            TxnOp::Cas { key: "a".into(), value: vec![0, 255, b'\n'], index: 7 },
            TxnOp::DeleteCas { key: "b".into(), index: 3 },
            TxnOp::Cas { key: "c".into(), value: Vec::new(), index: 0 },
        ];
        let body: serde_json::Value = serde_json::from_slice(&txn_body(&ops).expect("body")).expect("json");
        assert_eq!(
            body,
            serde_json::json!([
                { "KV": { "Verb": "cas", "Key": "a", "Value": "AP8K", "Index": 7 } },
                { "KV": { "Verb": "delete-cas", "Key": "b", "Index": 3 } },
                { "KV": { "Verb": "cas", "Key": "c", "Value": "", "Index": 0 } },
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
        assert!(matches!(Token::from_file(&path), Err(ConsulError::BadToken { .. })));
        assert!(matches!(Token::from_file(&dir.path().join("missing")), Err(ConsulError::TokenFile { .. })));
    }

    #[test]
    fn urls_are_checked() {
        assert!(Client::new("https://consul.example:8501/", None).is_ok());
        assert!(matches!(Client::new("ftp://x", None), Err(ConsulError::UnusableUrl { .. })));
        assert!(matches!(Client::new("http://user:pw@x", None), Err(ConsulError::UnusableUrl { .. })));
        assert!(matches!(Client::new("http://x/?dc=a", None), Err(ConsulError::UnusableUrl { .. })));
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
