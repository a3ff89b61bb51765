//! `PUT /v1/txn`: up to 64 K/V operations tried together on a copy of the store, all
//! applied at one index if every one succeeds, none otherwise, with Consul's answers and
//! error messages (its `txn_endpoint.go` and `state/txn.go`).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde_json::{json, Value};

use super::http::{entry_json, json_response, Refusal};
use super::store::Store;
use super::{Shared, MAX_TXN_OPS, MAX_VALUE_BYTES};

/// One K/V operation of a transaction, decoded.
struct Op {
    verb: String,
    key: String,
    value: Vec<u8>,
    flags: u64,
    index: u64,
    session: String,
}

/// A field of a JSON object, by case-insensitive name (Go's decoder is case-insensitive).
fn field<'a>(object: &'a Value, name: &str) -> Option<&'a Value> {
    object.as_object()?.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v)
}

/// `PUT /v1/txn`.
pub(super) fn txn(shared: &Shared, body: &[u8]) -> Response {
    let ops = match parse_ops(body) {
        Ok(ops) => ops,
        Err(refused) => return refused.into_response(),
    };
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
        shared.notify();
    }
    if errors.is_empty() {
        json_response(StatusCode::OK, &json!({ "Results": results, "Errors": null }), None)
    } else {
        json_response(StatusCode::CONFLICT, &json!({ "Results": null, "Errors": errors }), None)
    }
}

/// The operations of a transaction's body, or Consul's answer refusing it.
fn parse_ops(body: &[u8]) -> Result<Vec<Op>, Refusal> {
    if body.len() > MAX_VALUE_BYTES {
        return Err(Refusal::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("Request body too large, max size: {MAX_VALUE_BYTES} bytes"),
        ));
    }
    let raw_ops = match serde_json::from_slice(body) {
        Ok(Value::Array(ops)) => ops,
        Ok(_) => return Err(Refusal::new(StatusCode::BAD_REQUEST, "Failed to parse body: not a list of operations")),
        Err(e) => return Err(Refusal::new(StatusCode::BAD_REQUEST, format!("Failed to parse body: {e}"))),
    };
    if raw_ops.len() > MAX_TXN_OPS {
        return Err(Refusal::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("Transaction contains too many operations ({} > {MAX_TXN_OPS})", raw_ops.len()),
        ));
    }
    raw_ops.iter().map(parse_op).collect()
}

/// One operation, or Consul's answer refusing the transaction for it.
fn parse_op(raw: &Value) -> Result<Op, Refusal> {
    let Some(kv) = field(raw, "KV") else {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "Failed to parse body: the Consul double implements KV operations only",
        ));
    };
    let string = |name: &str| field(kv, name).and_then(Value::as_str).unwrap_or("").to_owned();
    let number = |name: &str| field(kv, name).and_then(Value::as_u64).unwrap_or(0);
    let value = match field(kv, "Value") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(b64)) => base64::engine::general_purpose::STANDARD.decode(b64.as_bytes()).map_err(|e| {
            Refusal::new(StatusCode::BAD_REQUEST, format!("Failed to parse body: failed to decode value: {e}"))
        })?,
        Some(other) => {
            return Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                format!("Failed to parse body: unexpected value type: {other}"),
            ))
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
        return Err(Refusal::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("Value for key {:?} is too large ({} > {MAX_VALUE_BYTES} bytes)", op.key, op.value.len()),
        ));
    }
    Ok(op)
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
