//! The master served over HTTP by C git's own `git http-backend` (the smart HTTP
//! protocol, v0 and v2), run as CGI behind a small server that requires an
//! `Authorization` header, as a git hosting service does.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;

/// `git http-backend` on an ephemeral loopback port, stopped on drop.
#[derive(Debug)]
pub struct GitHttp {
    port: u16,
    /// Requests refused for want of the right `Authorization`.
    pub refused: Arc<AtomicUsize>,
    /// Requests served.
    pub served: Arc<AtomicUsize>,
    runtime: Option<tokio::runtime::Runtime>,
}

#[derive(Clone)]
struct Backend {
    root: PathBuf,
    authorization: String,
    refused: Arc<AtomicUsize>,
    served: Arc<AtomicUsize>,
}

impl GitHttp {
    /// Serves the repositories in the directory of `bare`, requiring
    /// `Authorization: <authorization>` on every request.
    pub fn start(bare: &Path, authorization: &str) -> GitHttp {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("rt");
        let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let (refused, served) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let backend = Backend {
            root: bare.parent().expect("parent").to_owned(),
            authorization: authorization.to_owned(),
            refused: refused.clone(),
            served: served.clone(),
        };
        let app = axum::Router::new().fallback(cgi).with_state(backend);
        runtime.spawn(async move { axum::serve(listener, app).await });
        GitHttp { port, refused, served, runtime: Some(runtime) }
    }

    /// The URL of the repository `name` (e.g. `master.git`).
    pub fn url(&self, name: &str) -> String {
        format!("http://127.0.0.1:{}/{name}", self.port)
    }
}

impl Drop for GitHttp {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

fn header(headers: &HeaderMap, name: &str) -> String {
    headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned()
}

/// Runs `git http-backend` for one request (RFC 3875 CGI).
async fn cgi(State(backend): State<Backend>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    if header(&parts.headers, "authorization") != backend.authorization {
        backend.refused.fetch_add(1, Ordering::SeqCst);
        let mut response = Response::new(Body::from("authentication required\n"));
        *response.status_mut() = StatusCode::UNAUTHORIZED;
        response.headers_mut().insert("WWW-Authenticate", HeaderValue::from_static("Bearer realm=\"confcast\""));
        return response;
    }
    backend.served.fetch_add(1, Ordering::SeqCst);
    let body: Bytes = axum::body::to_bytes(body, usize::MAX).await.unwrap_or_default();
    let mut command = tokio::process::Command::new("git");
    command
        .arg("http-backend")
        .env("GIT_PROJECT_ROOT", &backend.root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("REQUEST_METHOD", parts.method.as_str())
        .env("PATH_INFO", parts.uri.path())
        .env("QUERY_STRING", parts.uri.query().unwrap_or(""))
        .env("CONTENT_TYPE", header(&parts.headers, "content-type"))
        .env("CONTENT_LENGTH", body.len().to_string())
        .env("HTTP_CONTENT_ENCODING", header(&parts.headers, "content-encoding"))
        .env("GIT_PROTOCOL", header(&parts.headers, "git-protocol"))
        .env("REMOTE_USER", "confcast")
        .env("REMOTE_ADDR", "127.0.0.1")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    let Ok(mut child) = command.spawn() else {
        return Response::builder().status(500).body(Body::from("cannot run git http-backend")).expect("response");
    };
    if let Some(mut stdin) = child.stdin.take() {
        use tokio::io::AsyncWriteExt as _;
        let _ = stdin.write_all(&body).await;
    }
    let output = match child.wait_with_output().await {
        Ok(output) => output.stdout,
        Err(_) => return Response::builder().status(500).body(Body::empty()).expect("response"),
    };
    // CGI output: header lines, a blank line, the body.
    let split = output
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, i + 4))
        .or_else(|| output.windows(2).position(|w| w == b"\n\n").map(|i| (i, i + 2)))
        .unwrap_or((output.len(), output.len()));
    let mut response = Response::new(Body::from(output[split.1..].to_vec()));
    for line in String::from_utf8_lossy(&output[..split.0]).lines() {
        let Some((name, value)) = line.split_once(':') else { continue };
        let value = value.trim();
        if name.eq_ignore_ascii_case("status") {
            let code = value.split(' ').next().and_then(|c| c.parse().ok()).unwrap_or(500);
            *response.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        } else if let (Ok(name), Ok(value)) =
            (axum::http::HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_str(value))
        {
            response.headers_mut().append(name, value);
        }
    }
    response
}
