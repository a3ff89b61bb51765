//! Turning ref updates of the master into `CommitEvent`s on JetStream.
//!
//! The post-receive hook (crate `confcast-hooks`) builds the events and calls
//! [`announce`]: it publishes each event with a content-derived dedup id and awaits the
//! ack, all under one short deadline. When the bus cannot be reached in time the events
//! go to an on-disk [`spool`] instead, so a push never hangs or fails because NATS is
//! down; the next hook run, or `publisher drain`, publishes the spool in order.

pub mod backfill;
pub mod bus;
pub mod install;
pub mod spool;
pub mod status;

use std::path::Path;
use std::time::Duration;

pub use confcast_schemas::connect::NatsAuth;
use confcast_schemas::CommitEvent;

pub use bus::{connect, ensure_commit_stream, publish_event, BusError};
pub use spool::{drain, Spool, SpoolError};

/// Where commit events go: the master's NATS (a comma-separated list of a cluster's
/// URLs), how to authenticate, and how many replicas the commit stream gets when the
/// publisher creates it.
#[derive(Debug, Clone)]
pub struct BusTarget {
    /// NATS URL(s).
    pub nats_url: String,
    /// Credentials and TLS.
    pub auth: NatsAuth,
    /// Replicas of the commit stream (3 on a cluster).
    pub replicas: usize,
}

/// What became of the events handed to [`announce`].
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Events (spooled earlier or new) acknowledged by JetStream now.
    pub published: usize,
    /// Of those, how many JetStream had already stored (dedup).
    pub duplicates: usize,
    /// New events written to the spool because the bus was unreachable.
    pub spooled: usize,
    /// Why the bus was not used, when it was not.
    pub error: Option<String>,
}

/// Publishes `events` after any spooled ones, or spools them; never takes longer than
/// `deadline` (plus local disk writes) and never fails: the spool is the fallback.
pub async fn announce(bus: &BusTarget, spool_dir: &Path, events: Vec<CommitEvent>, deadline: Duration) -> Outcome {
    let nats_url = &bus.nats_url;
    let spool = Spool::new(spool_dir);
    let attempt = tokio::time::timeout(deadline, async {
        let client = connect(nats_url, &bus.auth, deadline).await?;
        let js = async_nats::jetstream::new(client);
        let mut outcome = Outcome::default();
        let drained = drain(&js, &spool, bus.replicas).await.map_err(|e| BusError::Publish(e.to_string()))?;
        outcome.published += drained.published;
        outcome.duplicates += drained.duplicates;
        Ok::<_, BusError>((js, outcome))
    })
    .await;

    let (js, mut outcome) = match attempt {
        Ok(Ok(ok)) => ok,
        Ok(Err(e)) => return spool_all(&spool, &events, e.to_string()),
        Err(_) => return spool_all(&spool, &events, format!("NATS at {nats_url} did not answer within {deadline:?}")),
    };

    // Publish the new events in order; whatever is left when one fails is spooled, so
    // the spool keeps them in order behind nothing that was published after them.
    for (i, event) in events.iter().enumerate() {
        match tokio::time::timeout(deadline, publish_event(&js, event, bus.replicas)).await {
            Ok(Ok(duplicate)) => {
                outcome.published += 1;
                outcome.duplicates += usize::from(duplicate);
            }
            Ok(Err(e)) => return merge(outcome, spool_all(&spool, &events[i..], e.to_string())),
            Err(_) => {
                return merge(
                    outcome,
                    spool_all(&spool, &events[i..], format!("no ack from JetStream within {deadline:?}")),
                )
            }
        }
    }
    outcome
}

fn merge(mut a: Outcome, b: Outcome) -> Outcome {
    a.spooled += b.spooled;
    a.error = b.error;
    a
}

fn spool_all(spool: &Spool, events: &[CommitEvent], why: String) -> Outcome {
    let mut outcome = Outcome { error: Some(why), ..Outcome::default() };
    for event in events {
        match spool.push(event) {
            Ok(()) => outcome.spooled += 1,
            Err(e) => {
                // Nothing else can be done from inside a hook: say so loudly.
                outcome.error = Some(format!("{}; and spooling failed: {e}", outcome.error.unwrap_or_default()));
            }
        }
    }
    outcome
}

/// The name a master repository gets in commit events when `confcast.repo` is not set:
/// its directory name without `.git`.
pub fn default_repo_name(git_dir: &Path) -> String {
    let abs = git_dir.canonicalize().unwrap_or_else(|_| git_dir.to_owned());
    let base = abs.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "master".into());
    base.strip_suffix(".git").unwrap_or(&base).to_owned()
}

/// Where a master repository's spool lives unless `confcast.spoolDir` says otherwise.
pub fn default_spool_dir(git_dir: &Path) -> std::path::PathBuf {
    git_dir.join("confcast").join("spool")
}

/// Git config keys shared by `publisher` and the hooks.
pub mod config_keys {
    /// NATS URL the hooks publish to.
    pub const NATS: &str = "confcast.nats";
    /// Name of the master repository in commit events.
    pub const REPO: &str = "confcast.repo";
    /// Spool directory (default `<git-dir>/confcast/spool`).
    pub const SPOOL_DIR: &str = "confcast.spoolDir";
    /// How long the post-receive hook may wait for NATS, in milliseconds (default 1500).
    pub const TIMEOUT_MS: &str = "confcast.timeoutMs";
    /// Replicas of the commit stream when the hooks create it (default 1; 3 on a cluster).
    pub const REPLICAS: &str = "confcast.replicas";
    /// How long, in seconds, the post-receive hook waits for the rollout of what it
    /// announced, printing its convergence per datacenter into the `git push` output
    /// (unset or 0: it does not wait).
    pub const WAIT_ROLLOUT: &str = "confcast.waitRollout";
    /// Datacenters (comma-separated) whose streams are in a JetStream domain named after
    /// them (the leaf-node topology): where the hook looks for the rollout. Unset: the
    /// datacenters whose streams are on the master's own NATS.
    pub const ROLLOUT_DOMAINS: &str = "confcast.rolloutDomains";
    /// NATS credentials of the hooks: paths of files, never the secrets themselves.
    pub const NATS_CREDS: &str = "confcast.natsCreds";
    /// File holding the hooks' nkey seed.
    pub const NATS_NKEY: &str = "confcast.natsNkey";
    /// NATS user of the hooks.
    pub const NATS_USER: &str = "confcast.natsUser";
    /// File holding the password of `confcast.natsUser`.
    pub const NATS_PASSWORD_FILE: &str = "confcast.natsPasswordFile";
    /// File holding the hooks' NATS token.
    pub const NATS_TOKEN_FILE: &str = "confcast.natsTokenFile";
    /// CA certificates of the NATS server.
    pub const NATS_TLS_CA: &str = "confcast.natsTlsCa";
    /// Client certificate of the hooks.
    pub const NATS_TLS_CERT: &str = "confcast.natsTlsCert";
    /// Private key of `confcast.natsTlsCert`.
    pub const NATS_TLS_KEY: &str = "confcast.natsTlsKey";
    /// Reply inbox prefix of the hooks.
    pub const NATS_INBOX_PREFIX: &str = "confcast.natsInboxPrefix";
    /// Directory of the hook binaries the repository's hooks link to (written by
    /// `install-hooks`, so that a later install recognises its own links).
    pub const HOOKS_DIR: &str = "confcast.hooksDir";
    /// Every key of the hooks' NATS credentials.
    pub const NATS_AUTH: [&str; 9] = [
        NATS_CREDS,
        NATS_NKEY,
        NATS_USER,
        NATS_PASSWORD_FILE,
        NATS_TOKEN_FILE,
        NATS_TLS_CA,
        NATS_TLS_CERT,
        NATS_TLS_KEY,
        NATS_INBOX_PREFIX,
    ];
}

/// The hooks' NATS credentials as `(git config key, value)` pairs: only paths and the
/// user name go into the repository's config.
pub fn auth_config(auth: &NatsAuth) -> Vec<(&'static str, String)> {
    let path = |p: &Option<std::path::PathBuf>| p.as_ref().map(|p| p.display().to_string());
    [
        (config_keys::NATS_CREDS, path(&auth.creds)),
        (config_keys::NATS_NKEY, path(&auth.nkey)),
        (config_keys::NATS_USER, auth.user.clone()),
        (config_keys::NATS_PASSWORD_FILE, path(&auth.password_file)),
        (config_keys::NATS_TOKEN_FILE, path(&auth.token_file)),
        (config_keys::NATS_TLS_CA, path(&auth.tls_ca)),
        (config_keys::NATS_TLS_CERT, path(&auth.tls_cert)),
        (config_keys::NATS_TLS_KEY, path(&auth.tls_key)),
        (config_keys::NATS_INBOX_PREFIX, auth.inbox_prefix.clone()),
    ]
    .into_iter()
    .filter_map(|(key, value)| Some((key, value?)))
    .collect()
}

/// The hooks' NATS credentials read back from the repository's config (`get` looks a
/// key up).
pub fn auth_from_config(get: impl Fn(&str) -> Option<String>) -> NatsAuth {
    let path = |key: &str| get(key).map(std::path::PathBuf::from);
    NatsAuth {
        creds: path(config_keys::NATS_CREDS),
        nkey: path(config_keys::NATS_NKEY),
        user: get(config_keys::NATS_USER),
        password_file: path(config_keys::NATS_PASSWORD_FILE),
        token_file: path(config_keys::NATS_TOKEN_FILE),
        tls_ca: path(config_keys::NATS_TLS_CA),
        tls_cert: path(config_keys::NATS_TLS_CERT),
        tls_key: path(config_keys::NATS_TLS_KEY),
        inbox_prefix: get(config_keys::NATS_INBOX_PREFIX),
    }
}

/// The default wait of the post-receive hook: well under the 2 s a push may take.
pub const DEFAULT_HOOK_TIMEOUT: Duration = Duration::from_millis(1500);
