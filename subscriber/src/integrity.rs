//! Whether the applied trees are still what was applied: the running subscriber's check
//! (at start, then every `--verify-interval-secs`), which restores what was altered, and
//! the `subscriber verify` command, which only says. Both describe what they find in
//! the same words ([`Finding`]).

use std::path::Path;

use confcast_schemas::ServiceId;

use crate::host::{Host, SubscriberError};
use crate::materialize::{self, ApplyError, Integrity, Layout};
use crate::perms::PermsConfig;
use crate::position::{Position, PositionError, ServiceState};

/// Why a tree could not be checked.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// Reading the tree failed.
    #[error(transparent)]
    Disk(#[from] ApplyError),
    /// The check panicked.
    #[error("the check panicked: {0}")]
    Panicked(#[from] tokio::task::JoinError),
}

/// What a check found wrong with one applied tree.
enum Finding<'a> {
    /// `<dir>/<service>` is missing or points nowhere.
    Missing,
    /// The tree hashes to `found`, not to the applied tree.
    Altered { found: &'a str },
    /// Content intact, an owner or mode is not the service's.
    Permissions { problem: &'a str },
    /// The tree could not be checked.
    Unverifiable(&'a CheckError),
}

/// One applied tree and where it is exposed.
struct Applied<'a> {
    link: &'a Path,
    commit: &'a str,
    tree: &'a str,
}

impl Finding<'_> {
    /// What was found, in the words of the log, the status report and the command.
    fn describe(&self, applied: &Applied<'_>) -> String {
        let Applied { link, commit, tree } = applied;
        match self {
            Finding::Missing => format!("{} is missing: it should hold commit {commit}", link.display()),
            Finding::Altered { found } => format!(
                "{} was changed on this host: it hashes to tree {found}, commit {commit} has tree {tree}",
                link.display()
            ),
            Finding::Permissions { problem } => format!("owner or mode changed on this host: {problem}"),
            Finding::Unverifiable(e) => format!("cannot verify: {e}"),
        }
    }

    /// How `subscriber verify` heads the line.
    fn label(&self) -> Option<&'static str> {
        match self {
            Finding::Missing => Some("MISSING"),
            Finding::Altered { .. } => Some("ALTERED"),
            Finding::Permissions { .. } => Some("PERMISSIONS"),
            Finding::Unverifiable(_) => None,
        }
    }
}

/// What the check of a tree gave, as a [`Finding`]; `None` when it is intact.
fn finding(check: &Result<Integrity, CheckError>) -> Option<Finding<'_>> {
    match check {
        Ok(Integrity::Intact) => None,
        Ok(Integrity::Missing) => Some(Finding::Missing),
        Ok(Integrity::Altered { found }) => Some(Finding::Altered { found }),
        Ok(Integrity::Permissions { problem }) => Some(Finding::Permissions { problem }),
        Err(e) => Some(Finding::Unverifiable(e)),
    }
}

impl Host {
    /// Re-hashes every applied tree; one that was altered on disk is reported and
    /// rebuilt from the service's snapshot, and its processes are told again.
    pub(crate) async fn check_integrity(&mut self) -> Result<(), SubscriberError> {
        let services: Vec<ServiceId> = self.services.iter().cloned().collect();
        for id in services {
            let state = self.state(&id);
            let (Some(commit), Some(tree)) = (state.commit.clone(), state.tree.clone()) else { continue };
            let layout = self.config.layout(&id);
            let check = {
                let (layout, tree) = (layout.clone(), tree.clone());
                tokio::task::spawn_blocking(move || materialize::verify(&layout, &tree)).await
            };
            let check = check.map_err(CheckError::from).and_then(|c| c.map_err(CheckError::from));
            let Some(found) = finding(&check) else { continue };
            let link = layout.link.clone();
            let problem = found.describe(&Applied { link: &link, commit: &commit, tree: &tree });
            if let Finding::Permissions { .. } = found {
                self.restore_perms(&id, layout, &commit, problem).await;
                continue;
            }
            self.restore(&id, &layout, &state, &commit, problem).await?;
        }
        Ok(())
    }

    /// The content of `id` is intact: sets owners and modes again in place.
    async fn restore_perms(&mut self, id: &ServiceId, layout: Layout, commit: &str, problem: String) {
        let restored = tokio::task::spawn_blocking(move || materialize::restore_perms(&layout)).await;
        let outcome = match restored {
            Ok(Ok(())) => "set again".to_owned(),
            Ok(Err(e)) => format!("cannot set them again: {e}"),
            Err(e) => format!("cannot set them again: {e}"),
        };
        let problem = format!("{problem}; {outcome}");
        let ServiceId { kind, name } = id;
        tracing::warn!(%kind, %name, "integrity check: {problem}");
        self.live.metrics.error("integrity");
        self.report(id, Some(commit.to_owned()), Some(format!("integrity: {problem}")), None).await;
    }

    /// Reports the tree of `id` altered or missing, and rebuilds it from the snapshot.
    async fn restore(
        &mut self,
        id: &ServiceId,
        layout: &Layout,
        state: &ServiceState,
        commit: &str,
        problem: String,
    ) -> Result<(), SubscriberError> {
        let ServiceId { kind, name } = id;
        tracing::error!(%kind, %name, "integrity check failed: {problem}; restoring from the snapshot");
        self.live.metrics.error("integrity");
        self.report(id, Some(commit.to_owned()), Some(format!("integrity: {problem}")), None).await;
        // The altered tree is no base for anything: rebuild it from scratch.
        let _ = std::fs::remove_dir_all(layout.tree_dir(commit));
        let forced = ServiceState { commit: None, ..state.clone() };
        match self.resync(id, &forced).await {
            Ok(crate::apply::Outcome::Applied(applied) | crate::apply::Outcome::Held(Some(applied))) => {
                tracing::info!(%kind, %name, commit = applied.commit.as_deref().unwrap_or(""), "restored");
                self.record(id, applied).await?;
            }
            Ok(_) => {}
            // The snapshot moved on to a commit --check-cmd refuses: not retried.
            Err(crate::apply::UpdateError::Refused(refusal)) => self.refuse(id, &refusal).await,
            Err(e) => {
                tracing::error!(%kind, %name, error = %e, "restoring failed; retrying");
                self.failed.insert(id.clone());
            }
        }
        Ok(())
    }
}

/// One line of `subscriber verify` per service, and whether all are intact.
pub fn verify(dir: &Path, state_dir: &Path, perms: &PermsConfig) -> Result<(Vec<String>, bool), PositionError> {
    let position = Position::load_any(&state_dir.join(crate::position::FILE))?;
    let mut lines = Vec::new();
    let mut all_intact = true;
    for (id, state) in &position.services {
        let ServiceId { kind, name } = id;
        let (Some(commit), Some(tree)) = (&state.commit, &state.tree) else {
            lines.push(format!("{kind} {name}: not present on this host"));
            continue;
        };
        let layout = crate::config::layout(dir, state_dir, perms, id);
        let check = materialize::verify(&layout, tree).map_err(CheckError::from);
        let Some(found) = finding(&check) else {
            lines.push(format!("{kind} {name}: ok, commit {commit}, tree {tree}"));
            continue;
        };
        all_intact = false;
        let problem = found.describe(&Applied { link: &layout.link, commit, tree });
        lines.push(match (found.label(), found) {
            (Some(label), Finding::Permissions { .. }) => {
                format!("{kind} {name}: {label}: {problem} (a running subscriber sets them again)")
            }
            (Some(label), _) => format!("{kind} {name}: {label}: {problem}"),
            (None, _) => format!("{kind} {name}: {problem}"),
        });
    }
    Ok((lines, all_intact))
}
