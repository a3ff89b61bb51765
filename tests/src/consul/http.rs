//! The double's HTTP face: every request is logged, checked against the ACL token and
//! routed to `/v1/kv` or `/v1/txn`; and the shapes Consul answers in (text errors, JSON
//! with the read headers, K/V entries with base64 values).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde_json::{json, Value};

use super::query::{decode, parse_query, Query};
use super::store::Kv;
use super::{kv, txn, Shared};

/// Every request: logged, authorized, routed.
pub(super) async fn handle(
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
    if let Some(refused) = refuse_without_token(&shared, &headers, &query) {
        return refused;
    }
    let path = uri.path();
    if path == "/v1/txn" {
        return match method {
            Method::PUT => txn::txn(&shared, &body),
            _ => text(StatusCode::METHOD_NOT_ALLOWED, format!("method {method} not allowed")),
        };
    }
    let Some(key) = path.strip_prefix("/v1/kv/").map(|k| decode(k, false)) else {
        return text(StatusCode::NOT_FOUND, format!("no handler for {path}"));
    };
    match method {
        Method::GET => kv::get(&shared, key, &query).await,
        Method::PUT => kv::put(&shared, key, &query, &body),
        Method::DELETE => kv::delete(&shared, key, &query),
        _ => text(StatusCode::METHOD_NOT_ALLOWED, format!("method {method} not allowed")),
    }
}

/// With a token configured, the 403 of a request that does not carry it.
fn refuse_without_token(shared: &Shared, headers: &HeaderMap, query: &Query) -> Option<Response> {
    let expected = shared.token.as_ref()?;
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let given = header("X-Consul-Token")
        .or_else(|| header("Authorization").and_then(|v| v.strip_prefix("Bearer ")))
        .map(str::to_owned)
        .or_else(|| query.get("token").cloned().flatten());
    match given {
        None => Some(text(StatusCode::FORBIDDEN, "Permission denied")),
        Some(token) if token != *expected => Some(text(StatusCode::FORBIDDEN, "ACL not found")),
        Some(_) => None,
    }
}

/// A request Consul refuses: its status and message, answered as [`text`].
#[derive(Debug)]
pub(super) struct Refusal(pub(super) StatusCode, pub(super) String);

impl Refusal {
    pub(super) fn new(status: StatusCode, message: impl Into<String>) -> Refusal {
        Refusal(status, message.into())
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        text(self.0, self.1)
    }
}

/// A plain-text answer (Consul's errors).
pub(super) fn text(status: StatusCode, message: impl Into<String>) -> Response {
    (status, [("Content-Type", "text/plain; charset=utf-8")], message.into()).into_response()
}

/// A JSON answer; with `index`, a read's answer with its headers.
pub(super) fn json_response(status: StatusCode, body: &Value, index: Option<u64>) -> Response {
    let mut response = (status, [("Content-Type", "application/json")], body.to_string()).into_response();
    if let Some(index) = index {
        add_read_headers(response.headers_mut(), index);
    }
    response
}

/// The 404 of a read that found nothing, with its index.
pub(super) fn not_found(index: u64) -> Response {
    let mut response = StatusCode::NOT_FOUND.into_response();
    add_read_headers(response.headers_mut(), index);
    response
}

/// `X-Consul-Index`, `X-Consul-KnownLeader` and `X-Consul-LastContact`.
pub(super) fn add_read_headers(headers: &mut HeaderMap, index: u64) {
    headers.insert("X-Consul-Index", HeaderValue::from(index));
    headers.insert("X-Consul-KnownLeader", HeaderValue::from_static("true"));
    headers.insert("X-Consul-LastContact", HeaderValue::from_static("0"));
}

/// A key as Consul lists it; its value (base64) only if asked for and not empty.
pub(super) fn entry_json(key: &str, kv: &Kv, with_value: bool) -> Value {
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
