//! `--listen`: the host's configuration as JSON for local consumers, on a TCP address
//! (bind it to localhost) or a unix socket.
//!
//! * `GET /healthz` — `ok` once the position can be read;
//! * `GET /v1/services` — every service: kind, commit, tree, ref, version, when it was
//!   applied, status, last exec status;
//! * `GET /v1/services/<name>` — the same for one service, plus every file of its tree
//!   (UTF-8 files as `text`, others as `base64`, symlinks as their `symlink` target;
//!   `.json`, `.yaml`/`.yml` and `.toml` files also as a parsed `document`, or a
//!   `document_error` saying why not), all read from one tree so the answer is one
//!   commit, never a mix;
//! * `GET /v1/services/<name>/files/<path>` — one file, raw;
//! * `GET /metrics` — Prometheus (OpenMetrics) text: updates applied, apply and
//!   push-to-apply latency histograms, updates pending on the stream, errors, last
//!   exec status.
//!
//! The two `/v1/services` reads are blocking queries like Consul's: every answer carries
//! `X-Confcast-Index`; a request with `?index=N` waits until the index moves past `N`
//! (or `?wait=`, default 5m, at most 10m, passes) and answers with the state then. An
//! application watches its configuration with a loop of such requests, or with the
//! [`crate::client`] library.
//!
//! Everything is read from disk (the position file and the applied trees), so the API
//! shows exactly what the host's processes see. Files are opened beneath the tree's
//! root ([`crate::beneath`]): a link that leads out of the tree is answered 404, never
//! followed, whatever the checks before the tree went live decided.
//!
//! A TCP listener must be a loopback address unless the operator allows others
//! (`--listen-remote`); a unix socket gets the mode and group the operator chooses
//! (`--listen-mode`, `--listen-group`) before it accepts its first connection.

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use base64::Engine as _;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::live::{Live, ServiceLive};
use crate::state::{parse_key, Position};

/// Where `--listen` serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A TCP address such as `127.0.0.1:7070`.
    Tcp(std::net::SocketAddr),
    /// A unix socket path (anything containing a `/`).
    Unix(PathBuf),
}

impl Listen {
    /// Refuses a TCP address other hosts can reach, unless `remote` allows it.
    pub fn check(&self, remote: bool) -> Result<(), String> {
        match self {
            Listen::Tcp(addr) if !addr.ip().is_loopback() && !remote => Err(format!(
                "--listen {addr}: not a loopback address; the API serves every file of the host's configuration \
                 (secrets included) without authentication: add --listen-remote to serve it to other hosts anyway"
            )),
            _ => Ok(()),
        }
    }
}

/// How the listener is exposed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ListenOptions {
    /// Serve on a TCP address other hosts can reach (`--listen-remote`).
    pub remote: bool,
    /// Mode of the unix socket (`--listen-mode`); `None`: the umask decides.
    pub socket_mode: Option<u32>,
    /// Group of the unix socket (`--listen-group`).
    pub socket_group: Option<nix::unistd::Gid>,
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

/// Header carrying the change index of a `/v1/services` answer.
pub const INDEX_HEADER: &str = "X-Confcast-Index";
/// How long a blocking query waits without `?wait=`.
const DEFAULT_WAIT: Duration = Duration::from_secs(300);
/// The longest a blocking query waits.
const MAX_WAIT: Duration = Duration::from_secs(600);

#[derive(Clone)]
struct Api {
    dir: PathBuf,
    state_dir: PathBuf,
    live: Live,
}

/// `?index=&wait=` of a blocking query.
#[derive(Debug, Default, serde::Deserialize)]
struct Blocking {
    index: Option<u64>,
    wait: Option<String>,
}

/// Parses a wait like Consul's: `10s`, `5m`, `250ms`, or plain seconds.
fn parse_wait(wait: &str) -> Option<Duration> {
    let wait = wait.trim();
    let (number, unit) = match wait.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => wait.split_at(i),
        None => (wait, "s"),
    };
    let number: f64 = number.parse().ok()?;
    let seconds = match unit {
        "ms" => number / 1000.0,
        "s" => number,
        "m" => number * 60.0,
        "h" => number * 3600.0,
        _ => return None,
    };
    Duration::try_from_secs_f64(seconds).ok()
}

/// Serves until `shutdown`.
pub async fn serve(
    listen: Listen,
    options: ListenOptions,
    dir: PathBuf,
    state_dir: PathBuf,
    live: Live,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/v1/services", get(services))
        .route("/v1/services/{name}", get(service))
        .route("/v1/services/{name}/files/{*path}", get(file))
        .with_state(Api { dir, state_dir, live });
    match listen {
        Listen::Tcp(addr) => {
            listen.check(options.remote).map_err(std::io::Error::other)?;
            let listener = tokio::net::TcpListener::bind(addr).await?;
            tracing::info!(%addr, "serving the host's configuration");
            axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await
        }
        Listen::Unix(path) => {
            let listener = bind_unix(&path, &options)?;
            tracing::info!(path = %path.display(), "serving the host's configuration");
            axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await
        }
    }
}

/// Binds the socket under a temporary name, gives it its mode and group, then renames
/// it into place: no client can connect before it has them.
fn bind_unix(path: &Path, options: &ListenOptions) -> std::io::Result<tokio::net::UnixListener> {
    let name = path.file_name().map(|n| n.as_bytes().to_vec()).unwrap_or_default();
    let tmp = path.with_file_name(std::ffi::OsStr::from_bytes(&[b".", &name[..], b".binding"].concat()));
    let _ = std::fs::remove_file(&tmp);
    let listener = tokio::net::UnixListener::bind(&tmp)?;
    let prepared = (|| {
        if let Some(gid) = options.socket_group {
            std::os::unix::fs::chown(&tmp, None, Some(gid.as_raw()))?;
        }
        if let Some(mode) = options.socket_mode {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
        }
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = prepared {
        let _ = std::fs::remove_file(&tmp);
        return Err(std::io::Error::new(e.kind(), format!("{}: {e}", path.display())));
    }
    Ok(listener)
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
        let live = self.live.service(key).unwrap_or_default();
        json!({
            "kind": kind,
            "name": name,
            "commit": state.commit,
            "tree": state.tree,
            "ref": state.ref_name,
            "version": state.version,
            "dir": self.dir.join(&name),
            "applied_at_ms": state.applied_at_ms,
            "status": if live.error.is_some() { "error" } else { "ok" },
            "error": live.error,
            "exec_status": live.exec_status,
            "exec_pending": state.exec_pending,
            "index": service_index(&live, state),
        })
    }

    /// Answers with `answer(position)` once the index `index_of(position)` moves past
    /// the query's `?index=` (at once without one), or when `?wait=` passes.
    async fn blocking(
        &self,
        query: Blocking,
        index_of: impl Fn(&Api, &Position) -> u64,
        answer: impl AsyncFnOnce(&Api, Position) -> Response,
    ) -> Response {
        let wait = match query.wait.as_deref().map(parse_wait) {
            None => DEFAULT_WAIT,
            Some(Some(wait)) => wait.min(MAX_WAIT),
            Some(None) => return error(StatusCode::BAD_REQUEST, "?wait= takes a duration such as 10s, 5m or 250ms"),
        };
        let deadline = tokio::time::Instant::now() + wait;
        let mut changes = self.live.watch();
        let position = loop {
            changes.borrow_and_update();
            let position = match self.position() {
                Ok(p) => p,
                Err(e) => return *e,
            };
            let current = index_of(self, &position);
            // An index below the one seen means the host's index was reset: answer too.
            if query.index.is_none_or(|seen| current != seen) {
                break position;
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) | Err(_) => break position,
            }
        };
        let index = index_of(self, &position);
        let mut response = answer(self, position).await;
        if let Ok(value) = axum::http::HeaderValue::from_str(&index.to_string()) {
            response.headers_mut().insert(INDEX_HEADER, value);
        }
        response
    }
}

/// A service's change index: its last change seen by this process, or when it was
/// applied (so the index survives restarts of the subscriber).
fn service_index(live: &ServiceLive, state: &crate::state::ServiceState) -> u64 {
    live.index.max(state.applied_at_ms.unwrap_or(0)).max(1)
}

fn host_index(api: &Api, position: &Position) -> u64 {
    position
        .services
        .iter()
        .map(|(k, s)| service_index(&api.live.service(k).unwrap_or_default(), s))
        .max()
        .unwrap_or(0)
        .max(api.live.index())
        .max(1)
}

async fn healthz(State(api): State<Api>) -> Response {
    match api.position() {
        Ok(_) => "ok\n".into_response(),
        Err(e) => *e,
    }
}

async fn metrics(State(api): State<Api>) -> Response {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], api.live.metrics.encode())
        .into_response()
}

async fn services(State(api): State<Api>, Query(query): Query<Blocking>) -> Response {
    api.blocking(query, host_index, async |api, position| {
        let list: Vec<Value> = position.services.iter().map(|(k, s)| api.describe(k, s)).collect();
        Json(json!({ "dc": position.dc, "services": list })).into_response()
    })
    .await
}

fn find<'a>(position: &'a Position, name: &str) -> Option<(&'a String, &'a crate::state::ServiceState)> {
    position.services.iter().find(|(k, _)| parse_key(k).is_some_and(|(_, n)| n == name))
}

async fn service(State(api): State<Api>, UrlPath(name): UrlPath<String>, Query(query): Query<Blocking>) -> Response {
    let index_of = |api: &Api, position: &Position| match find(position, &name) {
        Some((k, s)) => service_index(&api.live.service(k).unwrap_or_default(), s),
        None => api.live.index().max(1),
    };
    let name2 = name.clone();
    api.blocking(query, index_of, async move |api, position| {
        let Some((key, state)) = find(&position, &name2) else {
            return error(StatusCode::NOT_FOUND, format!("no service {name2:?} on this host"));
        };
        let mut body = api.describe(key, state);
        // Read from the tree the link points at now, so every file is of one commit.
        let tree = match std::fs::read_link(api.dir.join(&name2)) {
            Ok(tree) => tree,
            Err(_) => return error(StatusCode::NOT_FOUND, format!("{name2:?} is not present on this host")),
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
    })
    .await
}

/// The document in a configuration file, as JSON, for the formats the API parses.
fn parse_document(name: &str, text: &str) -> Option<Result<Value, String>> {
    let extension = name.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase())?;
    Some(match extension.as_str() {
        "json" => serde_json::from_str(text).map_err(|e| e.to_string()),
        "yaml" | "yml" => serde_norway::from_str::<Value>(text).map_err(|e| e.to_string()),
        "toml" => toml::from_str::<toml::Table>(text)
            .map_err(|e| e.to_string())
            .and_then(|table| serde_json::to_value(table).map_err(|e| e.to_string())),
        _ => return None,
    })
}

fn read_tree(root: &Path) -> std::io::Result<serde_json::Map<String, Value>> {
    use std::io::Read;
    let root_fd = crate::beneath::open_root(root)?;
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
                // Read beneath the root, as `/files/` does: what the listing found as a
                // file is read as that file, never through a link swapped in meanwhile.
                let mut bytes = Vec::new();
                crate::beneath::open_file(std::os::fd::AsFd::as_fd(&root_fd), rel.as_os_str().as_bytes())?
                    .read_to_end(&mut bytes)?;
                let value = match String::from_utf8(bytes) {
                    Ok(text) => match parse_document(&name, &text) {
                        Some(Ok(document)) => json!({ "text": text, "document": document }),
                        Some(Err(problem)) => json!({ "text": text, "document_error": problem }),
                        None => json!({ "text": text }),
                    },
                    Err(e) => json!({ "base64": base64::engine::general_purpose::STANDARD.encode(e.into_bytes()) }),
                };
                files.insert(name, value);
            }
        }
    }
    Ok(files)
}

async fn file(State(api): State<Api>, UrlPath((name, path)): UrlPath<(String, String)>) -> Response {
    use confcast_schemas::path::{check_name, check_relative};
    if check_relative(path.as_bytes()).is_err() || check_name(name.as_bytes()).is_err() {
        return error(StatusCode::BAD_REQUEST, format!("{path:?} is not a path inside the service"));
    }
    let root = api.dir.join(&name);
    let rel = path.clone();
    let read = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<u8>> {
        use std::io::Read;
        // Opened beneath the tree's root: the kernel refuses any resolution that
        // leaves it, so no link, however the tree came to hold it, serves bytes from
        // outside.
        let root = crate::beneath::open_root(&root)?;
        let mut file = crate::beneath::open_file(std::os::fd::AsFd::as_fd(&root), rel.as_bytes())?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        Ok(bytes)
    })
    .await;
    use nix::errno::Errno;
    match read {
        Ok(Ok(bytes)) => ([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response(),
        Ok(Err(e)) => match e.raw_os_error().map(Errno::from_raw) {
            Some(Errno::EXDEV | Errno::ELOOP) => {
                error(StatusCode::NOT_FOUND, format!("{name}/{path} leads outside the service's tree; not served"))
            }
            Some(Errno::ENOENT) => error(StatusCode::NOT_FOUND, format!("{name}/{path} does not exist")),
            Some(Errno::EINVAL | Errno::ENOTDIR | Errno::EISDIR) => {
                error(StatusCode::NOT_FOUND, format!("{name}/{path} is not a file of the service"))
            }
            _ => error(StatusCode::INTERNAL_SERVER_ERROR, format!("{name}/{path}: {e}")),
        },
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_parse_like_consuls() {
        assert_eq!(parse_wait("10s"), Some(Duration::from_secs(10)));
        assert_eq!(parse_wait("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse_wait("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_wait("3"), Some(Duration::from_secs(3)));
        assert_eq!(parse_wait("soon"), None);
        assert_eq!(parse_wait("5d"), None);
    }

    #[test]
    fn documents_are_parsed_by_extension() {
        let json = parse_document("a/app.json", r#"{"a":[1,2]}"#).and_then(Result::ok);
        assert_eq!(json, Some(json!({"a": [1, 2]})));
        let yaml = parse_document("app.YAML", "a:\n  - 1\n  - x\n").and_then(Result::ok);
        assert_eq!(yaml, Some(json!({"a": [1, "x"]})));
        let toml = parse_document("app.toml", "[server]\nport = 8080\n").and_then(Result::ok);
        assert_eq!(toml, Some(json!({"server": {"port": 8080}})));
        assert!(matches!(parse_document("bad.json", "{"), Some(Err(_))));
        assert!(parse_document("README", "text").is_none());
    }

    #[test]
    fn listen_addresses() {
        assert_eq!("127.0.0.1:7070".parse(), Ok(Listen::Tcp("127.0.0.1:7070".parse().expect("addr"))));
        assert_eq!("/run/confcast.sock".parse(), Ok(Listen::Unix("/run/confcast.sock".into())));
        assert!("localhost".parse::<Listen>().is_err());
    }
}
