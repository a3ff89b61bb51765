//! The host's own judgement of a change: `--check-cmd` before a new tree goes live,
//! `--health-cmd` after the host's processes were told of it, each killed when it runs
//! longer than `--health-timeout-secs` ([`Checks`]). Both run as `--exec` does
//! ([`crate::command`]), with the same environment.
//!
//! A check that fails keeps the change from going live ([`crate::apply`] decides what
//! that means for the service); a failing `--exec` or health command leaves the service
//! unhealthy ([`Checks::after`]). Either is reported with what the command said
//! ([`Failed::reason`]): how it ended, and the first lines it wrote.

use std::time::Duration;

use confcast_schemas::message::{now_ms, Health};

use crate::command::{self, Change, Ended, FirstLines, RunError};
use crate::schedule::Failure;

/// `--check-cmd`, `--health-cmd` and `--health-timeout-secs`.
#[derive(Debug, Clone, Default)]
pub struct Checks {
    /// Run with `sh -c` before a new tree goes live, `CONFCAST_DIR` naming it; the tree
    /// is switched to only if it exits 0.
    pub check: Option<String>,
    /// Run with `sh -c` after `--exec` and `--signal`; the service is healthy only if it
    /// exits 0.
    pub health: Option<String>,
    /// How long either may run before it is killed (and counts as failed).
    pub timeout: Duration,
}

/// The flag of the check run before a change goes live.
pub const CHECK: &str = "--check-cmd";

/// The flag of the check run after the processes were told of a change.
pub const HEALTH: &str = "--health-cmd";

/// A check that did not pass: the command, how it ended and what it said.
#[derive(Debug, thiserror::Error)]
pub enum Failed {
    /// It exited non-zero, or a signal ended it.
    #[error("{flag} exited with {status}")]
    Exited {
        /// The check's flag.
        flag: &'static str,
        /// How it exited.
        status: std::process::ExitStatus,
        /// Its first lines.
        output: FirstLines,
    },
    /// It was still running when its time was up, and was killed.
    #[error("{flag} did not finish within {after:?} and was killed")]
    Killed {
        /// The check's flag.
        flag: &'static str,
        /// Its time limit.
        after: Duration,
        /// Its first lines.
        output: FirstLines,
    },
    /// It could not be run.
    #[error(transparent)]
    Run(#[from] RunError),
}

impl Failed {
    /// Why, for a report: how the command ended, then the first lines it wrote, if any.
    pub fn reason(&self) -> String {
        let said = match self {
            Failed::Exited { output, .. } | Failed::Killed { output, .. } => Some(output),
            Failed::Run(_) => None,
        };
        match said.filter(|output| !output.is_empty()) {
            Some(output) => format!("{self}; output:\n{}", output.text()),
            None => self.to_string(),
        }
    }
}

impl Checks {
    /// Runs `--check-cmd`, if there is one, on the new tree of `change` (`change.dir`,
    /// verified and not yet live).
    pub async fn check(&self, change: &Change<'_>) -> Result<(), Failed> {
        match &self.check {
            Some(cmd) => judge(CHECK, cmd, change, self.timeout).await,
            None => Ok(()),
        }
    }

    /// The service's health once its processes were told of `change`: unhealthy when
    /// telling them failed (`told`, the outcome of `--exec` and `--signal`), else what
    /// `--health-cmd` says, if there is one; healthy otherwise.
    pub async fn after(&self, change: &Change<'_>, told: &Result<Option<i32>, Failure>) -> Health {
        if let Err(failure) = told {
            return Health::unhealthy(now_ms(), failure.message.clone());
        }
        let judged = match &self.health {
            Some(cmd) => judge(HEALTH, cmd, change, self.timeout).await,
            None => Ok(()),
        };
        match judged {
            Ok(()) => Health::healthy(now_ms()),
            Err(failed) => Health::unhealthy(now_ms(), failed.reason()),
        }
    }
}

impl Checks {
    /// What `--health-cmd` says of `change` now, if there is one: how a host watches a
    /// commit while its rollout wave bakes, between the processes being told of it.
    pub async fn health(&self, change: &Change<'_>) -> Option<Health> {
        let cmd = self.health.as_deref()?;
        Some(match judge(HEALTH, cmd, change, self.timeout).await {
            Ok(()) => Health::healthy(now_ms()),
            Err(failed) => Health::unhealthy(now_ms(), failed.reason()),
        })
    }
}

/// Runs `cmd`, given by `flag`, for `change`: it passes when it exits 0 within `timeout`.
async fn judge(flag: &'static str, cmd: &str, change: &Change<'_>, timeout: Duration) -> Result<(), Failed> {
    let finished = command::run(flag, cmd, change, timeout).await?;
    match finished.ended {
        Ended::Exited(status) if status.success() => Ok(()),
        Ended::Exited(status) => Err(Failed::Exited { flag, status, output: finished.output }),
        Ended::Killed { after } => Err(Failed::Killed { flag, after, output: finished.output }),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use confcast_schemas::message::HealthState;
    use confcast_schemas::ServiceId;

    use super::*;

    fn checks(check: Option<&str>, health: Option<&str>) -> Checks {
        Checks { check: check.map(Into::into), health: health.map(Into::into), timeout: Duration::from_secs(5) }
    }

    #[tokio::test]
    async fn a_check_passes_on_exit_zero_and_says_why_it_failed() {
        let tree = tempfile::tempdir().expect("tempdir");
        std::fs::write(tree.path().join("app.conf"), "mode = bad\n").expect("write");
        let s0 = ServiceId::service("s0");
        let change = Change { service: &s0, commit: Some("abc"), ref_name: "refs/heads/x", dir: tree.path() };
        assert!(checks(None, None).check(&change).await.is_ok(), "no check: nothing to refuse");
        let grep = r#"echo "checking $CONFCAST_SERVICE at $CONFCAST_COMMIT"; ! grep bad "$CONFCAST_DIR/app.conf""#;
        let failed = checks(Some(grep), None).check(&change).await.expect_err("refused");
        assert_eq!(failed.reason(), "--check-cmd exited with exit status: 1; output:\nchecking s0 at abc\nmode = bad");
        std::fs::write(tree.path().join("app.conf"), "mode = good\n").expect("write");
        assert!(checks(Some(grep), None).check(&change).await.is_ok());
        let slow = Checks { timeout: Duration::from_millis(200), ..checks(Some("exec sleep 5"), None) };
        let failed = slow.check(&change).await.expect_err("killed");
        assert_eq!(failed.reason(), "--check-cmd did not finish within 200ms and was killed");
    }

    #[tokio::test]
    async fn health_follows_the_exec_then_the_health_command() {
        let s0 = ServiceId::service("s0");
        let change = Change { service: &s0, commit: Some("abc"), ref_name: "r", dir: Path::new("/d/s0") };
        let ok = Ok(Some(0));
        let health = checks(None, None).after(&change, &ok).await;
        assert_eq!((health.state, health.reason), (HealthState::Healthy, None));
        let health = checks(None, Some("test \"$CONFCAST_DIR\" = /d/s0")).after(&change, &ok).await;
        assert_eq!(health.state, HealthState::Healthy);
        let exec_failed = Err(Failure { message: "--exec exited with exit status: 3".into(), status: Some(3) });
        let health = checks(None, Some("true")).after(&change, &exec_failed).await;
        assert_eq!(health.state, HealthState::Unhealthy);
        assert_eq!(health.reason.as_deref(), Some("--exec exited with exit status: 3"));
        let health = checks(None, Some("echo 'port 80 closed' >&2; exit 2")).after(&change, &ok).await;
        assert_eq!(health.state, HealthState::Unhealthy);
        assert_eq!(health.reason.as_deref(), Some("--health-cmd exited with exit status: 2; output:\nport 80 closed"));
    }
}
