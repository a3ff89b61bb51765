//! The API's routes: what each answers, read from the position file and the live
//! state, and the blocking queries of the two `/v1/services` reads.

use std::path::PathBuf;
use std::time::Duration;

use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use confcast_schemas::kind::ServiceId;

use super::types::{ErrorAnswer, Service, Services, Status};
use super::INDEX_HEADER;
use crate::live::{Live, ServiceLive};
use crate::position::{Position, ServiceState, FILE};

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

/// The API's routes over the trees in `dir`, the position in `state_dir` and `live`.
pub(super) fn router(dir: PathBuf, state_dir: PathBuf, live: Live) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/v1/services", get(services))
        .route("/v1/services/{name}", get(service))
        .route("/v1/services/{name}/files/{*path}", get(file))
        .with_state(Api { dir, state_dir, live })
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

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(ErrorAnswer { error: message.into() })).into_response()
}

impl Api {
    /// The position on disk (empty before the first apply); the error is the response.
    fn position(&self) -> Result<Position, Box<Response>> {
        match Position::load_any(&self.state_dir.join(FILE)) {
            Ok(p) => Ok(p),
            Err(e) if e.is_missing() => Ok(Position::default()),
            Err(e) => Err(Box::new(error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))),
        }
    }

    /// What the API says about the service `id`, whose position is `state`.
    fn describe(&self, id: &ServiceId, state: &ServiceState) -> Service {
        let live = self.live(id);
        Service {
            applied_at_ms: state.applied_at_ms,
            commit: state.commit.clone(),
            dir: self.dir.join(&id.name),
            error: live.error.clone(),
            exec_pending: state.exec_pending,
            exec_status: live.exec_status,
            files: None,
            health: live.health.clone(),
            index: service_index(&live, state),
            kind: id.kind,
            name: id.name.clone(),
            pending: live.pending.clone(),
            ref_name: state.ref_name.clone(),
            status: if live.error.is_some() { Status::Error } else { Status::Ok },
            tree: state.tree.clone(),
            version: state.version.clone(),
        }
    }

    /// The last outcome of `id` seen by this process.
    fn live(&self, id: &ServiceId) -> ServiceLive {
        self.live.service(&id.to_string()).unwrap_or_default()
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
fn service_index(live: &ServiceLive, state: &ServiceState) -> u64 {
    live.index.max(state.applied_at_ms.unwrap_or(0)).max(1)
}

fn host_index(api: &Api, position: &Position) -> u64 {
    position
        .services
        .iter()
        .map(|(id, s)| service_index(&api.live(id), s))
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
        let services = position.services.iter().map(|(id, s)| api.describe(id, s)).collect();
        Json(Services { dc: position.dc, services }).into_response()
    })
    .await
}

/// The service called `name` in `position`.
fn find<'a>(position: &'a Position, name: &str) -> Option<(&'a ServiceId, &'a ServiceState)> {
    position.services.iter().find(|(id, _)| id.name == name)
}

async fn service(State(api): State<Api>, UrlPath(name): UrlPath<String>, Query(query): Query<Blocking>) -> Response {
    let index_of = |api: &Api, position: &Position| match find(position, &name) {
        Some((id, s)) => service_index(&api.live(id), s),
        None => api.live.index().max(1),
    };
    let name2 = name.clone();
    api.blocking(query, index_of, async move |api, position| {
        let Some((id, state)) = find(&position, &name2) else {
            return error(StatusCode::NOT_FOUND, format!("no service {name2:?} on this host"));
        };
        let mut body = api.describe(id, state);
        // Read from the tree the link points at now, so every file is of one commit.
        let tree = match std::fs::read_link(api.dir.join(&name2)) {
            Ok(tree) => tree,
            Err(_) => return error(StatusCode::NOT_FOUND, format!("{name2:?} is not present on this host")),
        };
        let dir = api.dir.clone();
        let files = tokio::task::spawn_blocking(move || super::tree::read_tree(&dir.join(tree))).await;
        match files {
            Ok(Ok(files)) => {
                body.files = Some(files);
                Json(body).into_response()
            }
            Ok(Err(e)) => error(StatusCode::SERVICE_UNAVAILABLE, format!("reading the tree: {e}; retry")),
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        }
    })
    .await
}

async fn file(State(api): State<Api>, UrlPath((name, path)): UrlPath<(String, String)>) -> Response {
    use confcast_schemas::path::{check_name, check_relative};
    if check_relative(path.as_bytes()).is_err() || check_name(name.as_bytes()).is_err() {
        return error(StatusCode::BAD_REQUEST, format!("{path:?} is not a path inside the service"));
    }
    let root = api.dir.join(&name);
    let rel = path.clone();
    let read = tokio::task::spawn_blocking(move || super::tree::read_file(&root, rel.as_bytes())).await;
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
}
