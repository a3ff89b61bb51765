//! What the status stream says of the hosts of a rollout's released waves: pure logic,
//! so that every rule is tested on its own.
//!
//! A host is healthy once it reports the commit applied, with `--exec` and
//! `--health-cmd` passing (a host without `--health-cmd` reports no health: a commit
//! applied with a good `--exec` counts as healthy). It is unhealthy when it reports the
//! commit with a failure, when it reports since its wave began that it could not take
//! the commit (`--check-cmd` refused it, the tree could not be built), or when it has
//! not reported the commit within the policy's `report_timeout_secs`.

use std::collections::BTreeMap;

use confcast_schemas::message::HealthState;
use confcast_schemas::rollout::RolloutState;
use confcast_schemas::HostStatus;

/// One host of the released waves, as its last report shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// At the commit, every check passing.
    Healthy,
    /// Not yet reported, and still within the report timeout.
    Pending,
    /// Unhealthy, for this reason.
    Unhealthy(String),
}

/// The verdicts of a rollout's released hosts, by host.
#[derive(Debug, Default)]
pub(crate) struct Verdicts {
    pub(crate) pending: usize,
    pub(crate) unhealthy: BTreeMap<String, String>,
}

/// Judges every released host of `state` at `now_ms` from `statuses` (the last report
/// of each host of the service). `wave_started` tells when each host's wave began.
pub(crate) fn judge(state: &RolloutState, statuses: &BTreeMap<String, HostStatus>, now_ms: u64) -> Verdicts {
    let mut verdicts = Verdicts::default();
    let timeout_ms = state.policy.report_timeout_secs * 1000;
    for host in state.released() {
        match verdict(&state.commit, statuses.get(host), state.wave_started_ms, now_ms, timeout_ms) {
            Verdict::Healthy => {}
            Verdict::Pending => verdicts.pending += 1,
            Verdict::Unhealthy(reason) => {
                verdicts.unhealthy.insert(host.clone(), reason);
            }
        }
    }
    verdicts
}

/// The verdict on one host: `status` is its last report, `since_ms` when it was
/// released (its wave, or a later one that restarted the clock), `timeout_ms` how long
/// it has to report.
pub(crate) fn verdict(
    commit: &str,
    status: Option<&HostStatus>,
    since_ms: u64,
    now_ms: u64,
    timeout_ms: u64,
) -> Verdict {
    if let Some(status) = status {
        let at_commit = status.commit.as_deref() == Some(commit);
        let recent = status.at_ms >= since_ms;
        if at_commit || recent {
            if let Some(reason) = failure(status) {
                return Verdict::Unhealthy(reason);
            }
        }
        // A report at the commit before anything judged it (a host that restarted
        // reports what it has at once, before `--exec` and `--health-cmd` ran again)
        // says nothing of its health yet.
        if at_commit && (status.health.is_some() || status.exec_status.is_some()) {
            return Verdict::Healthy;
        }
    }
    if now_ms.saturating_sub(since_ms) >= timeout_ms {
        let secs = timeout_ms / 1000;
        let short = &commit[..commit.len().min(12)];
        return Verdict::Unhealthy(match status {
            Some(_) => format!("has not reported {short} within {secs} s"),
            None => format!("has never reported; not within {secs} s"),
        });
    }
    Verdict::Pending
}

/// Why a report is a failure, if it is one.
fn failure(status: &HostStatus) -> Option<String> {
    if let Some(health) = &status.health {
        if health.state == HealthState::Unhealthy {
            return Some(health.reason.clone().unwrap_or_else(|| "unhealthy".to_owned()));
        }
    }
    if !status.ok {
        return Some(status.error.clone().unwrap_or_else(|| "the update was not applied".to_owned()));
    }
    match status.exec_status {
        Some(code) if code != 0 && status.health.is_none() => Some(format!("--exec exited with status {code}")),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use confcast_schemas::message::Health;
    use confcast_schemas::{Kind, WIRE_VERSION};

    use super::*;

    fn status(commit: &str, ok: bool, health: Option<Health>, at_ms: u64) -> HostStatus {
        HostStatus {
            v: WIRE_VERSION,
            dc: "dc1".into(),
            host: "h".into(),
            kind: Kind::Service,
            name: "s".into(),
            commit: Some(commit.into()),
            ok,
            error: (!ok).then(|| "--check-cmd refused c1: exit status: 1".into()),
            exec_status: Some(0),
            at_ms,
            health,
        }
    }

    #[test]
    fn a_host_is_healthy_at_the_commit_with_its_checks_passing() {
        let good = status("c1", true, Some(Health::healthy(5)), 5);
        assert_eq!(verdict("c1", Some(&good), 1, 10, 60_000), Verdict::Healthy);
        let no_checks = status("c1", true, None, 5);
        assert_eq!(verdict("c1", Some(&no_checks), 1, 10, 60_000), Verdict::Healthy, "a good --exec");
        let unjudged = HostStatus { exec_status: None, ..no_checks };
        assert_eq!(verdict("c1", Some(&unjudged), 1, 10, 60_000), Verdict::Pending, "a report before any check");
    }

    #[test]
    fn failures_at_the_commit_or_since_the_wave_are_unhealthy_with_their_reason() {
        let sick = status("c1", true, Some(Health::unhealthy(5, "--health-cmd exited with exit status: 3")), 5);
        assert_eq!(
            verdict("c1", Some(&sick), 1, 10, 60_000),
            Verdict::Unhealthy("--health-cmd exited with exit status: 3".into())
        );
        // --check-cmd refused it: the host stays at c0 and says so after its wave began.
        let refused = status("c0", false, Some(Health::unhealthy(5, "--check-cmd refused c1")), 5);
        assert_eq!(verdict("c1", Some(&refused), 1, 10, 60_000), Verdict::Unhealthy("--check-cmd refused c1".into()));
        // The same report from before the wave is about something else.
        assert_eq!(verdict("c1", Some(&refused), 6, 10, 60_000), Verdict::Pending);
        let exec_failed = HostStatus { exec_status: Some(2), ..status("c1", true, None, 5) };
        assert_eq!(
            verdict("c1", Some(&exec_failed), 1, 10, 60_000),
            Verdict::Unhealthy("--exec exited with status 2".into())
        );
    }

    #[test]
    fn a_host_that_does_not_report_in_time_is_unhealthy() {
        let old = status("c0", true, Some(Health::healthy(0)), 0);
        assert_eq!(verdict("c1", Some(&old), 1_000, 30_000, 60_000), Verdict::Pending);
        assert!(
            matches!(verdict("c1", Some(&old), 1_000, 61_000, 60_000), Verdict::Unhealthy(r) if r.contains("within 60 s"))
        );
        assert!(
            matches!(verdict("c1", None, 1_000, 61_000, 60_000), Verdict::Unhealthy(r) if r.contains("never reported"))
        );
    }
}
