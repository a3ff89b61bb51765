//! `--listen`: the host's configuration as JSON for local consumers, on a TCP address
//! (bind it to localhost) or a unix socket.
//!
//! * `GET /healthz` — `ok` once the position can be read;
//! * `GET /v1/services` — every service: kind, commit, tree, ref, version, when it was
//!   applied, status, last exec status, health as the host's checks last judged it;
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
//! The answers are the types of [`types`], shared with [`crate::client`]; the routes
//! and blocking queries are [`routes`], reading a tree for an answer is [`tree`].
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

use tokio_util::sync::CancellationToken;

use crate::live::Live;

mod routes;
mod tree;
pub mod types;

pub use types::{ErrorAnswer, Service, Services, Status, TreeFile};

/// Header carrying the change index of a `/v1/services` answer.
pub const INDEX_HEADER: &str = "X-Confcast-Index";

/// Where `--listen` serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A TCP address such as `127.0.0.1:7070`.
    Tcp(std::net::SocketAddr),
    /// A unix socket path (anything containing a `/`).
    Unix(PathBuf),
}

/// Why `--listen` does not name a place to serve.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ListenError {
    /// Neither form.
    #[error("{0:?} is neither an address like 127.0.0.1:7070 nor a unix socket path")]
    Unparsable(String),
    /// A TCP address other hosts can reach, without `--listen-remote`.
    #[error(
        "--listen {0}: not a loopback address; the API serves every file of the host's configuration \
         (secrets included) without authentication: add --listen-remote to serve it to other hosts anyway"
    )]
    NotLoopback(std::net::SocketAddr),
}

impl Listen {
    /// Refuses a TCP address other hosts can reach, unless `remote` allows it.
    pub fn check(&self, remote: bool) -> Result<(), ListenError> {
        match self {
            Listen::Tcp(addr) if !addr.ip().is_loopback() && !remote => Err(ListenError::NotLoopback(*addr)),
            _ => Ok(()),
        }
    }
}

impl FromStr for Listen {
    type Err = ListenError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.contains('/') {
            return Ok(Listen::Unix(PathBuf::from(s)));
        }
        s.parse().map(Listen::Tcp).map_err(|_| ListenError::Unparsable(s.to_owned()))
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

/// Serves until `shutdown`.
pub async fn serve(
    listen: Listen,
    options: ListenOptions,
    dir: PathBuf,
    state_dir: PathBuf,
    live: Live,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = routes::router(dir, state_dir, live);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses() {
        assert_eq!("127.0.0.1:7070".parse(), Ok(Listen::Tcp("127.0.0.1:7070".parse().expect("addr"))));
        assert_eq!("/run/confcast.sock".parse(), Ok(Listen::Unix("/run/confcast.sock".into())));
        assert!("localhost".parse::<Listen>().is_err());
        let anywhere: Listen = "0.0.0.0:7070".parse().expect("addr");
        assert!(matches!(anywhere.check(false), Err(ListenError::NotLoopback(_))));
        assert_eq!(anywhere.check(true), Ok(()));
    }
}
