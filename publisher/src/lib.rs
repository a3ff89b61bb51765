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

use std::path::Path;
use std::time::Duration;

use confcast_schemas::CommitEvent;

pub use bus::{connect, ensure_commit_stream, publish_event, BusError};
pub use spool::{drain, Spool, SpoolError};

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
pub async fn announce(nats_url: &str, spool_dir: &Path, events: Vec<CommitEvent>, deadline: Duration) -> Outcome {
    let spool = Spool::new(spool_dir);
    let attempt = tokio::time::timeout(deadline, async {
        let client = connect(nats_url, deadline).await?;
        let js = async_nats::jetstream::new(client);
        ensure_commit_stream(&js).await?;
        let mut outcome = Outcome::default();
        let drained = drain(&js, &spool).await.map_err(|e| BusError::Publish(e.to_string()))?;
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
        match tokio::time::timeout(deadline, publish_event(&js, event)).await {
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
}

/// The default wait of the post-receive hook: well under the 2 s a push may take.
pub const DEFAULT_HOOK_TIMEOUT: Duration = Duration::from_millis(1500);
