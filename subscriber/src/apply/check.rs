//! `--check-cmd` on the way to a new tree: once a tree is built, verified and flushed,
//! and before its link is switched, the check looks at it ([`Host::check`]) while the
//! tree in place is still what applications read. A tree it refuses is never switched
//! to: the link keeps the last good tree, `--exec` does not run, and the service is
//! reported unhealthy with what the check said ([`Host::refuse`]). Every path that moves
//! a link to a new commit goes through it: an update of the stream, a batch of them (a
//! refused service is left out, the others switch), a resync from the snapshot and a
//! bootstrap. A removal is not checked; nor is a tree rebuilt for the commit already in
//! place (a restore), which passed when it went live.
//!
//! The refused commit is remembered, per service, in memory: it is not checked again
//! (a resync or a retry meeting it stops there), and it stays the service's reported
//! state until another commit is applied, which forgets it. The next update, to any
//! other commit, is applied as usual; one that starts from the refused commit is not on
//! this host's disk and goes to the snapshot, as any gap does. After a restart the
//! memory is gone: a refused commit met again (from the snapshot, at a bootstrap or a
//! resync) is checked once more.

use std::path::Path;

use confcast_schemas::message::{now_ms, Health};
use confcast_schemas::ServiceId;

use super::Applied;
use crate::checks::Failed;
use crate::command::Change;
use crate::host::Host;

/// Why a new tree was not switched to.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Refusal {
    /// `--check-cmd` failed on it.
    #[error("{commit} refused: {failed}")]
    Now {
        /// The commit of the tree.
        commit: String,
        /// What the check did.
        #[source]
        failed: Failed,
    },
    /// Its commit is the one `--check-cmd` refused last for the service.
    #[error("{commit} was refused by --check-cmd before; waiting for another commit")]
    Before {
        /// The commit.
        commit: String,
    },
}

/// A commit `--check-cmd` refused, and what was reported of it.
#[derive(Debug, Clone)]
pub(crate) struct Refused {
    /// The commit.
    commit: String,
    /// The report's error.
    pub(crate) error: String,
    /// The report's health.
    pub(crate) health: Health,
}

impl Host {
    /// The commit `--check-cmd` refused last for `id`, if any, and what was reported.
    pub(crate) fn refused(&self, id: &ServiceId) -> Option<&Refused> {
        self.refused.get(id)
    }

    /// Whether `commit` is the one `--check-cmd` refused last for `id`: it is not built
    /// nor checked again.
    pub(crate) fn refused_before(&self, id: &ServiceId, commit: Option<&str>) -> bool {
        commit.is_some_and(|commit| self.refused(id).is_some_and(|r| r.commit == commit))
    }

    /// Another commit of `id` is in place (or none): the refusal is forgotten.
    pub(crate) fn forget_refusal(&mut self, id: &ServiceId) {
        self.refused.remove(id);
    }

    /// Shows the new tree `dir`, built for `applied`, to `--check-cmd`, if there is one
    /// and the commit is not the one in place already.
    pub(crate) async fn check(&self, id: &ServiceId, applied: &Applied, dir: &Path) -> Result<(), Refusal> {
        let checks = &self.config.notify.checks;
        let Some(commit) = applied.commit.as_deref() else { return Ok(()) };
        if checks.check.is_none() || self.state(id).commit.as_deref() == Some(commit) {
            return Ok(());
        }
        if self.refused_before(id, Some(commit)) {
            return Err(Refusal::Before { commit: commit.to_owned() });
        }
        let change = Change { service: id, commit: Some(commit), ref_name: &applied.ref_name, dir };
        checks.check(&change).await.map_err(|failed| Refusal::Now { commit: commit.to_owned(), failed })?;
        let ServiceId { kind, name } = id;
        tracing::debug!(%kind, %name, %commit, "--check-cmd passed");
        Ok(())
    }

    /// Says and reports that `refusal` kept `id` where it stands, and remembers the
    /// commit; a commit refused before was said already.
    pub(crate) async fn refuse(&mut self, id: &ServiceId, refusal: &Refusal) {
        let ServiceId { kind, name } = id;
        let (commit, failed) = match refusal {
            Refusal::Now { commit, failed } => (commit, failed),
            Refusal::Before { commit } => {
                tracing::debug!(%kind, %name, %commit, "refused by --check-cmd before; not checked again");
                return;
            }
        };
        let error = refusal.to_string();
        let reason = format!("{commit} refused: {}", failed.reason());
        // What the command wrote was logged line by line as it came: this is one line.
        tracing::warn!(%kind, %name, %commit, error = %error, "--check-cmd refused the change; keeping the current configuration");
        self.live.metrics.error("check");
        let health = Health::unhealthy(now_ms(), reason);
        let refused = Refused { commit: commit.clone(), error: error.clone(), health: health.clone() };
        self.refused.insert(id.clone(), refused);
        let state = self.state(id);
        self.report_judged(id, state.commit, Some(error), None, Some(health)).await;
    }
}
