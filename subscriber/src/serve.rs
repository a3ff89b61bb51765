//! `--listen`: the host's configuration as JSON for local consumers, on a TCP address
//! (bind it to localhost) or a unix socket.
//!
//! * `GET /healthz` — `ok` once the position can be read;
//! * `GET /v1/services` — every service: kind, commit, tree, ref, version, status;
//! * `GET /v1/services/<name>` — the same for one service, plus every file of its tree
//!   (UTF-8 files as text, others as base64, symlinks as their target), all read from
//!   one tree so the answer is one commit, never a mix;
//! * `GET /v1/services/<name>/files/<path>` — one file, raw.
//!
//! Everything is read from disk (the position file and the applied trees), so the API
//! shows exactly what the host's processes see.

use std::collections::BTreeMap;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use axum::extract::{Path as UrlPath, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use base64::Engine as _;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::state::{parse_key, Position};

/// Where `--listen` serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A TCP address such as `127.0.0.1:7070`.
    Tcp(std::net::SocketAddr),
    /// A unix socket path (anything containing a `/`).
    Unix(PathBuf),
}

impl FromStr for Listen {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.contains('/') {
            return Ok(Listen::Unix(PathBuf::from(s)));
        }
        s.parse()
            .map(Listen::Tcp)
            .map_err(|_| format!("{s:?} is neither an address like 127.0.0.1:7070 nor a unix socket path"))
    }
}

/// Last error per service (`<kind>/<name>`), `None` when the last update went well.
pub type Statuses = Arc<Mutex<BTreeMap<String, Option<String>>>>;

#[derive(Clone)]
struct Api {
    dir: PathBuf,
    state_dir: PathBuf,
    statuses: Statuses,
}

/// Serves until `shutdown`.
pub async fn serve(
    listen: Listen,
    dir: PathBuf,
    state_dir: PathBuf,
    statuses: Statuses,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/v1/services", get(services))
        .route("/v1/services/{name}", get(service))
        .route("/v1/services/{name}/files/{*path}", get(file))
        .with_state(Api { dir, state_dir, statuses });
    match listen {
        Listen::Tcp(addr) => {
            let listener = tokio::net::TcpListener::bind(addr).await?;
            tracing::info!(%addr, "serving the host's configuration");
            axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await
        }
        Listen::Unix(path) => {
            let _ = std::fs::remove_file(&path);
            let listener = tokio::net::UnixListener::bind(&path)?;
            tracing::info!(path = %path.display(), "serving the host's configuration");
            axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await
        }
    }
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

impl Api {
    /// The position on disk (empty before the first apply); the error is the response.
    fn position(&self) -> Result<Position, Box<Response>> {
        match Position::load_any(&self.state_dir.join("position.json")) {
            Ok(p) => Ok(p),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Position::default()),
            Err(e) => Err(Box::new(error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))),
        }
    }

    fn describe(&self, key: &str, state: &crate::state::ServiceState) -> Value {
        let (kind, name) = parse_key(key).map(|(k, n)| (k.as_str().to_owned(), n)).unwrap_or_default();
        let status = self.statuses.lock().map(|s| s.get(key).cloned().flatten()).unwrap_or_default();
        json!({
            "kind": kind,
            "name": name,
            "commit": state.commit,
            "tree": state.tree,
            "ref": state.ref_name,
            "version": state.version,
            "dir": self.dir.join(&name),
            "status": if status.is_some() { "error" } else { "ok" },
            "error": status,
        })
    }
}

async fn healthz(State(api): State<Api>) -> Response {
    match api.position() {
        Ok(_) => "ok\n".into_response(),
        Err(e) => *e,
    }
}

async fn services(State(api): State<Api>) -> Response {
    let position = match api.position() {
        Ok(p) => p,
        Err(e) => return *e,
    };
    let list: Vec<Value> = position.services.iter().map(|(k, s)| api.describe(k, s)).collect();
    Json(json!({ "dc": position.dc, "services": list })).into_response()
}

async fn service(State(api): State<Api>, UrlPath(name): UrlPath<String>) -> Response {
    let position = match api.position() {
        Ok(p) => p,
        Err(e) => return *e,
    };
    let Some((key, state)) = position.services.iter().find(|(k, _)| parse_key(k).is_some_and(|(_, n)| n == name))
    else {
        return error(StatusCode::NOT_FOUND, format!("no service {name:?} on this host"));
    };
    let mut body = api.describe(key, state);
    // Read from the tree the link points at now, so every file is of one commit.
    let tree = match std::fs::read_link(api.dir.join(&name)) {
        Ok(tree) => tree,
        Err(_) => return error(StatusCode::NOT_FOUND, format!("{name:?} is not present on this host")),
    };
    let dir = api.dir.clone();
    let files = tokio::task::spawn_blocking(move || read_tree(&dir.join(tree))).await;
    match files {
        Ok(Ok(files)) => {
            body["files"] = Value::Object(files);
            Json(body).into_response()
        }
        Ok(Err(e)) => error(StatusCode::SERVICE_UNAVAILABLE, format!("reading the tree: {e}; retry")),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

fn read_tree(root: &Path) -> std::io::Result<serde_json::Map<String, Value>> {
    let mut files = serde_json::Map::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let path = entry.path();
            let rel = path.strip_prefix(root).unwrap_or(&path);
            let name = String::from_utf8_lossy(rel.as_os_str().as_bytes()).into_owned();
            let kind = entry.file_type()?;
            if kind.is_dir() {
                stack.push(path);
            } else if kind.is_symlink() {
                let target = std::fs::read_link(&path)?;
                files.insert(name, json!({ "symlink": String::from_utf8_lossy(target.as_os_str().as_bytes()) }));
            } else {
                let bytes = std::fs::read(&path)?;
                let value = match String::from_utf8(bytes) {
                    Ok(text) => json!({ "text": text }),
                    Err(e) => json!({ "base64": base64::engine::general_purpose::STANDARD.encode(e.into_bytes()) }),
                };
                files.insert(name, value);
            }
        }
    }
    Ok(files)
}

async fn file(State(api): State<Api>, UrlPath((name, path)): UrlPath<(String, String)>) -> Response {
    if confcast_schemas::path::check_relative(path.as_bytes()).is_err() || name.contains('/') {
        return error(StatusCode::BAD_REQUEST, format!("{path:?} is not a path inside the service"));
    }
    // Symlinks inside a tree were checked to stay inside it.
    match tokio::fs::read(api.dir.join(&name).join(&path)).await {
        Ok(bytes) => ([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            error(StatusCode::NOT_FOUND, format!("{name}/{path} does not exist"))
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses() {
        assert_eq!("127.0.0.1:7070".parse(), Ok(Listen::Tcp("127.0.0.1:7070".parse().expect("addr"))));
        assert_eq!("/run/confcast.sock".parse(), Ok(Listen::Unix("/run/confcast.sock".into())));
        assert!("localhost".parse::<Listen>().is_err());
    }
}
