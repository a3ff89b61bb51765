//! The `/v1/kv` verbs: reads of a key, a prefix (`?recurse`) or key names (`?keys`),
//! blocking or not; writes with `?cas` and `?flags`; deletes of a key or a prefix.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use super::http::{add_read_headers, entry_json, json_response, not_found, text};
use super::query::{parse_u64, Query};
use super::store::{Kv, Scope, Store};
use super::{blocking, Shared, MAX_VALUE_BYTES};

/// `GET /v1/kv/<key>`.
pub(super) async fn get(shared: &Shared, key: String, query: &Query) -> Response {
    let keys = query.contains_key("keys");
    let recurse = query.contains_key("recurse");
    if !keys && !recurse && key.is_empty() {
        return text(StatusCode::BAD_REQUEST, "Missing key name");
    }
    let scope = if keys || recurse { Scope::Prefix(key.clone()) } else { Scope::Key(key.clone()) };
    match blocking::parse(query) {
        Err(refused) => return refused.into_response(),
        Ok(Some((min_index, wait))) => blocking::wait(shared, &scope, min_index, wait).await,
        Ok(None) => {}
    }
    let store = shared.store();
    let index = store.index_of(&scope);
    if keys {
        let separator =
            query.get("separator").or_else(|| query.get("seperator")).cloned().flatten().unwrap_or_default();
        let list = key_names(&store, &key, &separator);
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

/// The names under `prefix`, rolled up after it at the first `separator` (if not empty).
fn key_names(store: &Store, prefix: &str, separator: &str) -> Vec<String> {
    let mut list: Vec<String> = Vec::new();
    for (k, _) in store.under(prefix) {
        let rolled = match separator.is_empty() {
            true => k.clone(),
            false => match k[prefix.len()..].find(separator) {
                Some(at) => k[..prefix.len() + at + separator.len()].to_owned(),
                None => k.clone(),
            },
        };
        if list.last() != Some(&rolled) {
            list.push(rolled);
        }
    }
    list
}

/// `PUT /v1/kv/<key>`.
pub(super) fn put(shared: &Shared, key: String, query: &Query, body: &[u8]) -> Response {
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
    shared.notify();
    json_response(StatusCode::OK, &json!(written), None)
}

/// `DELETE /v1/kv/<key>`.
pub(super) fn delete(shared: &Shared, key: String, query: &Query) -> Response {
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
    shared.notify();
    json_response(StatusCode::OK, &json!(deleted), None)
}
