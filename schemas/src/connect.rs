//! How every confcast binary authenticates to NATS: one set of flags, one way to read them.
//!
//! Secrets are read from files or from the environment, never taken as command-line
//! values (which any user of the host can read in `ps`), and never printed: the
//! [`Debug`] of [`NatsAuth`] names only which mechanisms are configured.
//!
//! | flag | variable | what |
//! |---|---|---|
//! | `--nats-creds FILE` | `CONFCAST_NATS_CREDS` | a `.creds` file (JWT and nkey seed) |
//! | `--nats-nkey FILE` | `CONFCAST_NATS_NKEY` | a file holding an nkey seed (`SU...`) |
//! | `--nats-user NAME` | `CONFCAST_NATS_USER` | user name; the password comes from |
//! | `--nats-password-file FILE` | `CONFCAST_NATS_PASSWORD_FILE` | ... this file, or `CONFCAST_NATS_PASSWORD` |
//! | `--nats-token-file FILE` | `CONFCAST_NATS_TOKEN_FILE` | a token, or `CONFCAST_NATS_TOKEN` |
//! | `--nats-tls-ca FILE` | `CONFCAST_NATS_TLS_CA` | CA certificates (PEM) that sign the server's |
//! | `--nats-tls-cert FILE` | `CONFCAST_NATS_TLS_CERT` | client certificate (PEM), with |
//! | `--nats-tls-key FILE` | `CONFCAST_NATS_TLS_KEY` | ... its private key (PEM) |
//! | `--nats-inbox-prefix P` | `CONFCAST_NATS_INBOX_PREFIX` | where replies come back (default `_INBOX`) |
//!
//! A per-identity inbox prefix lets NATS permissions give each identity its own
//! replies only (`subscribe: "_INBOX_relay_dc1.>"`): with the shared `_INBOX.>`, any
//! client allowed to subscribe there could read every other client's replies,
//! another datacenter's configuration included.
//! Any TLS option makes TLS required. A `tls://` URL also requires it.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::retry::{Backoff, Warnings};

/// Environment variable holding the password of `--nats-user` when no file is given.
pub const PASSWORD_ENV: &str = "CONFCAST_NATS_PASSWORD";
/// Environment variable holding the token when no `--nats-token-file` is given.
pub const TOKEN_ENV: &str = "CONFCAST_NATS_TOKEN";

/// NATS credentials and TLS settings, as flags (flatten into a binary's `clap` parser).
#[derive(Clone, Default, PartialEq, Eq, clap::Args)]
pub struct NatsAuth {
    /// NATS credentials file (`.creds`: user JWT and nkey seed).
    #[arg(long = "nats-creds", env = "CONFCAST_NATS_CREDS", value_name = "FILE")]
    pub creds: Option<PathBuf>,
    /// File holding an nkey seed to authenticate to NATS with.
    #[arg(long = "nats-nkey", env = "CONFCAST_NATS_NKEY", value_name = "FILE")]
    pub nkey: Option<PathBuf>,
    /// NATS user name; the password is read from --nats-password-file or CONFCAST_NATS_PASSWORD.
    #[arg(long = "nats-user", env = "CONFCAST_NATS_USER", value_name = "NAME")]
    pub user: Option<String>,
    /// File holding the password of --nats-user.
    #[arg(long = "nats-password-file", env = "CONFCAST_NATS_PASSWORD_FILE", value_name = "FILE")]
    pub password_file: Option<PathBuf>,
    /// File holding a NATS token (or set CONFCAST_NATS_TOKEN).
    #[arg(long = "nats-token-file", env = "CONFCAST_NATS_TOKEN_FILE", value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// CA certificates (PEM) to verify the NATS server with; makes TLS required.
    #[arg(long = "nats-tls-ca", env = "CONFCAST_NATS_TLS_CA", value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for NATS TLS; needs --nats-tls-key.
    #[arg(long = "nats-tls-cert", env = "CONFCAST_NATS_TLS_CERT", value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --nats-tls-cert.
    #[arg(long = "nats-tls-key", env = "CONFCAST_NATS_TLS_KEY", value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Subject prefix of this client's reply inboxes (default `_INBOX`), so that NATS
    /// permissions can keep every identity's replies to itself.
    #[arg(long = "nats-inbox-prefix", env = "CONFCAST_NATS_INBOX_PREFIX", value_name = "PREFIX")]
    pub inbox_prefix: Option<String>,
}

impl fmt::Debug for NatsAuth {
    /// Names the mechanisms in use, never a secret nor where it is kept.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsAuth")
            .field("creds", &self.creds.is_some())
            .field("nkey", &self.nkey.is_some())
            .field("user", &self.user)
            .field("token", &self.token_file.is_some())
            .field("tls", &self.tls_ca.is_some())
            .field("client_cert", &self.tls_cert.is_some())
            .field("inbox_prefix", &self.inbox_prefix)
            .finish()
    }
}

/// A credential or certificate that cannot be used. Names the flag and file, never the secret.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// A file named by a flag cannot be read.
    #[error("{flag} {}: {source}", path.display())]
    Read {
        flag: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file was read but its content is not what the flag takes.
    #[error("{flag} {}: {problem}", path.display())]
    Invalid { flag: &'static str, path: PathBuf, problem: String },
    /// Flags that cannot be used together, or one missing its partner.
    #[error("{0}")]
    Conflict(String),
}

/// The servers of a `--nats` value: one URL, or several of one cluster separated by
/// commas (any of them will do; the client also learns the others from the server).
pub fn servers(urls: &str) -> Result<Vec<async_nats::ServerAddr>, AuthError> {
    let servers: Vec<async_nats::ServerAddr> = urls
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|url| url.parse().map_err(|e| AuthError::Conflict(format!("--nats {url:?}: {e}"))))
        .collect::<Result<_, _>>()?;
    if servers.is_empty() {
        return Err(AuthError::Conflict("--nats names no server".into()));
    }
    Ok(servers)
}

/// `urls` (one URL or a comma-separated list) as logs and messages may show it: a
/// password in the user part becomes `***`, and so does a user part that is a token
/// alone (`nats://TOKEN@host`, `https://TOKEN@host`); an ssh user name (`ssh://git@host`)
/// is kept, as it is no secret. Paths and anything that is not a URL are left as they are.
pub fn redact_url(urls: &str) -> String {
    urls.split(',').map(redact_one).collect::<Vec<_>>().join(",")
}

fn redact_one(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    let Some((user_info, host)) = authority.rsplit_once('@') else { return url.to_owned() };
    let user_info = match user_info.split_once(':') {
        Some((user, _password)) => format!("{user}:***"),
        None if scheme.to_ascii_lowercase().contains("ssh") => user_info.to_owned(),
        None => "***".to_owned(),
    };
    format!("{scheme}://{user_info}@{host}{path}")
}

impl NatsAuth {
    /// True when nothing is configured (plain connection, no TLS).
    pub fn is_empty(&self) -> bool {
        *self == NatsAuth::default()
    }

    /// Applies these settings to `options`, reading every file now so that a missing or
    /// unreadable credential fails at start with the flag's name.
    pub async fn apply(
        &self,
        mut options: async_nats::ConnectOptions,
    ) -> Result<async_nats::ConnectOptions, AuthError> {
        let secrets = [self.creds.is_some(), self.nkey.is_some(), self.user.is_some(), self.token_file.is_some()];
        if secrets.iter().filter(|&&s| s).count() > 1 {
            return Err(AuthError::Conflict(
                "use one of --nats-creds, --nats-nkey, --nats-user or a NATS token, not several".into(),
            ));
        }
        if let Some(path) = &self.creds {
            let contents = read_secret("--nats-creds", path)?;
            options = options.credentials(&contents).map_err(|e| AuthError::Invalid {
                flag: "--nats-creds",
                path: path.clone(),
                problem: e.to_string(),
            })?;
        }
        if let Some(path) = &self.nkey {
            let text = read_secret("--nats-nkey", path)?;
            let (seed, _) = crate::sign::seed_in(&text).map_err(|problem| AuthError::Invalid {
                flag: "--nats-nkey",
                path: path.clone(),
                problem,
            })?;
            options = options.nkey(seed);
        }
        if let Some(user) = &self.user {
            let password = match &self.password_file {
                Some(path) => read_secret("--nats-password-file", path)?.trim_end_matches(['\r', '\n']).to_owned(),
                None => std::env::var(PASSWORD_ENV).map_err(|_| {
                    AuthError::Conflict(format!("--nats-user needs --nats-password-file or {PASSWORD_ENV}"))
                })?,
            };
            options = options.user_and_password(user.clone(), password);
        } else if self.password_file.is_some() {
            return Err(AuthError::Conflict("--nats-password-file needs --nats-user".into()));
        }
        if let Some(path) = &self.token_file {
            let token = read_secret("--nats-token-file", path)?.trim().to_owned();
            if token.is_empty() {
                return Err(AuthError::Invalid {
                    flag: "--nats-token-file",
                    path: path.clone(),
                    problem: "empty".into(),
                });
            }
            options = options.token(token);
        } else if let Ok(token) = std::env::var(TOKEN_ENV) {
            if !token.is_empty() && self.user.is_none() && self.creds.is_none() && self.nkey.is_none() {
                options = options.token(token);
            }
        }
        if let Some(path) = &self.tls_ca {
            check_readable("--nats-tls-ca", path)?;
            options = options.add_root_certificates(path.clone()).require_tls(true);
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            check_readable("--nats-tls-cert", cert)?;
            check_readable("--nats-tls-key", key)?;
            options = options.add_client_certificate(cert.clone(), key.clone()).require_tls(true);
        } else if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err(AuthError::Conflict("--nats-tls-cert and --nats-tls-key go together".into()));
        }
        if let Some(prefix) = &self.inbox_prefix {
            let valid = !prefix.is_empty()
                && prefix.split('.').all(|t| !t.is_empty() && !t.contains(['*', '>']))
                && !prefix.contains(char::is_whitespace);
            if !valid {
                return Err(AuthError::Conflict(format!(
                    "--nats-inbox-prefix {prefix:?}: not a subject prefix (dot-separated tokens without wildcards)"
                )));
            }
            options = options.custom_inbox_prefix(prefix.clone());
        }
        Ok(options)
    }
}

fn read_secret(flag: &'static str, path: &Path) -> Result<String, AuthError> {
    std::fs::read_to_string(path).map_err(|source| AuthError::Read { flag, path: path.to_owned(), source })
}

fn check_readable(flag: &'static str, path: &Path) -> Result<(), AuthError> {
    std::fs::File::open(path).map(drop).map_err(|source| AuthError::Read { flag, path: path.to_owned(), source })
}

/// One attempt to connect failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The credentials or TLS files cannot be used; waiting will not help.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// The server did not answer, or refused the connection.
    #[error("cannot connect to NATS at {url}")]
    Unreachable {
        /// The URLs tried, credentials redacted.
        url: String,
        /// What the client said.
        #[source]
        source: async_nats::ConnectError,
    },
}

/// Who connects, as the NATS server's monitoring shows it, and how soon a dead
/// connection is noticed.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The client name (`confcast-relay dc1`, `confcast-subscriber host-a`).
    pub name: String,
    /// How often the client pings the server; two missed pings and it reconnects.
    /// `None` keeps the client's default (two minutes).
    pub ping_interval: Option<Duration>,
}

impl Identity {
    /// A client named `name` with the client's default ping interval.
    pub fn named(name: impl Into<String>) -> Identity {
        Identity { name: name.into(), ping_interval: None }
    }
}

async fn options(
    shown: &str,
    auth: &NatsAuth,
    who: &Identity,
    events: Arc<Mutex<Warnings>>,
) -> Result<async_nats::ConnectOptions, AuthError> {
    let shown = shown.to_owned();
    let mut options =
        auth.apply(async_nats::ConnectOptions::new()).await?.name(&who.name).event_callback(move |event| {
            let (shown, events) = (shown.clone(), events.clone());
            async move { connection_event(&shown, &events, event) }
        });
    if let Some(interval) = who.ping_interval {
        options = options.ping_interval(interval);
    }
    Ok(options)
}

/// Connects once, waiting at most `timeout`, for a command that reports and exits (the
/// hooks, `publisher status`). `url` may list several servers of one cluster,
/// separated by commas; any of them will do.
pub async fn connect_once(
    url: &str,
    auth: &NatsAuth,
    who: &Identity,
    timeout: Duration,
) -> Result<async_nats::Client, ConnectError> {
    let shown = redact_url(url);
    let addresses = servers(url)?;
    let options = options(&shown, auth, who, Arc::default()).await?.connection_timeout(timeout);
    options.connect(addresses).await.map_err(|source| ConnectError::Unreachable { url: shown, source })
}

/// Connects for a long-running process, retrying with backoff until a server answers:
/// the process starts whether or not the bus is up. Each failure is said at WARN as
/// `cannot connect to NATS at <URL>: <cause>` with `retry_in`, the same cause at most
/// once a minute; later disconnections and server errors too, and reconnections at
/// INFO. `None` at shutdown; an error only for credentials that can never work.
pub async fn connect(
    url: &str,
    auth: &NatsAuth,
    who: &Identity,
    shutdown: &CancellationToken,
) -> Result<Option<async_nats::Client>, AuthError> {
    let addresses = servers(url)?;
    let shown = redact_url(url);
    let events = Arc::new(Mutex::new(Warnings::default()));
    let mut backoff = Backoff::default();
    let mut failures = Warnings::default();
    loop {
        let options = options(&shown, auth, who, events.clone()).await?;
        let attempt = tokio::select! {
            attempt = options.connect(addresses.clone()) => attempt,
            () = shutdown.cancelled() => return Ok(None),
        };
        let e = match attempt {
            // Said by the client's `Connected` event.
            Ok(client) => return Ok(Some(client)),
            Err(e) => e,
        };
        let delay = backoff.next_delay();
        match failures.admit(tokio::time::Instant::now(), &e.to_string()) {
            Some(held_back) => {
                let not_logged = (held_back > 0).then_some(held_back);
                tracing::warn!(nats = %shown, retry_in = ?delay, not_logged, "cannot connect to NATS at {shown}: {e}");
            }
            None => tracing::debug!(nats = %shown, retry_in = ?delay, "cannot connect to NATS at {shown}: {e}"),
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shutdown.cancelled() => return Ok(None),
        }
    }
}

/// What the NATS client tells of its connection, said with the server's URL; warnings
/// at most once a minute each.
fn connection_event(shown: &str, rate: &Mutex<Warnings>, event: async_nats::Event) {
    let due = |cause: &str| rate.lock().unwrap_or_else(|e| e.into_inner()).admit(Instant::now(), cause).is_some();
    match event {
        async_nats::Event::Connected => tracing::info!(nats = %shown, "connected to NATS"),
        async_nats::Event::Disconnected if due("disconnected") => {
            tracing::warn!(nats = %shown, "lost the connection to NATS at {shown}; reconnecting (the configuration in place stays)")
        }
        async_nats::Event::ServerError(e) if due("server error") => {
            tracing::warn!(nats = %shown, error = %e, "NATS server error")
        }
        async_nats::Event::ClientError(e) if due("client error") => {
            tracing::warn!(nats = %shown, error = %e, "NATS client error")
        }
        async_nats::Event::SlowConsumer(sid) if due("slow consumer") => {
            tracing::warn!(nats = %shown, sid, "slow consumer: the NATS client dropped messages")
        }
        async_nats::Event::LameDuckMode => {
            tracing::info!(nats = %shown, "the NATS server is shutting down (lame duck mode)")
        }
        // Failed reconnect attempts: the client says no more than "IO error"; the
        // disconnection was logged, and so is the reconnection.
        other => tracing::debug!(nats = %shown, event = %other, "NATS connection event"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_secrets_nor_where_they_are() {
        let auth = NatsAuth {
            creds: Some("/secret/dc1.creds".into()),
            user: Some("relay".into()),
            password_file: Some("/secret/pw".into()),
            ..Default::default()
        };
        let shown = format!("{auth:?}");
        assert!(!shown.contains("/secret"), "{shown}");
        assert!(shown.contains("relay"), "{shown}");
    }

    #[tokio::test]
    async fn a_missing_file_names_the_flag_and_the_path() {
        let auth = NatsAuth { nkey: Some("/nonexistent/seed.nk".into()), ..Default::default() };
        let error = auth.apply(async_nats::ConnectOptions::new()).await.err().map(|e| e.to_string());
        let error = error.unwrap_or_default();
        assert!(error.starts_with("--nats-nkey /nonexistent/seed.nk:"), "{error}");
    }

    #[tokio::test]
    async fn a_bad_seed_is_refused_without_echoing_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("seed");
        std::fs::write(&path, "SUNOTASEEDATALLBUTSECRET\n").expect("write");
        let auth = NatsAuth { nkey: Some(path), ..Default::default() };
        let error = auth.apply(async_nats::ConnectOptions::new()).await.err().map(|e| e.to_string());
        let error = error.unwrap_or_default();
        assert!(error.contains("--nats-nkey") && !error.contains("NOTASEED"), "{error}");
    }

    #[test]
    fn a_cluster_is_a_comma_separated_list() {
        let cluster = servers("nats://10.0.0.1:4222, nats://10.0.0.2:4222,").expect("parses");
        assert_eq!(cluster.len(), 2);
        assert!(servers("").is_err());
        assert!(servers("nats://host:notaport").is_err());
    }

    #[test]
    fn credentials_in_urls_are_redacted_and_nothing_else_is() {
        assert_eq!(redact_url("nats://relay:s3cret@10.0.0.1:4222"), "nats://relay:***@10.0.0.1:4222");
        assert_eq!(redact_url("nats://t0ken@a:4222, nats://b:4222"), "nats://***@a:4222, nats://b:4222");
        assert_eq!(redact_url("https://user:tok@git.example/master.git"), "https://user:***@git.example/master.git");
        assert_eq!(redact_url("https://tok@git.example/a@b.git"), "https://***@git.example/a@b.git");
        assert_eq!(redact_url("ssh://git@git.example/master.git"), "ssh://git@git.example/master.git");
        assert_eq!(redact_url("/srv/git/master.git"), "/srv/git/master.git");
        assert_eq!(redact_url("git@git.example:master.git"), "git@git.example:master.git");
        assert_eq!(redact_url("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
    }

    #[tokio::test]
    async fn two_mechanisms_at_once_are_refused() {
        let auth = NatsAuth { creds: Some("a".into()), token_file: Some("b".into()), ..Default::default() };
        assert!(matches!(auth.apply(async_nats::ConnectOptions::new()).await, Err(AuthError::Conflict(_))));
    }
}
