//! Where a rollout stands, computed from what was seen on the bus: plain data in, plain
//! data out, no I/O.

use std::collections::BTreeMap;

use confcast_schemas::message::HealthState;
use confcast_schemas::rollout::{Phase, RolloutState};
use confcast_schemas::{HostStatus, ServiceHead, ServiceId};

use super::pushed::Pushed;
use super::target::Target;

/// What was seen on the bus of one datacenter.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    /// The relay's head of every service.
    pub heads: BTreeMap<ServiceId, ServiceHead>,
    /// The latest report of every host, per service.
    pub hosts: BTreeMap<ServiceId, BTreeMap<String, HostStatus>>,
    /// The relay's rollout state of every service rolled out in waves.
    pub rollouts: BTreeMap<ServiceId, RolloutState>,
}

impl Observed {
    /// Records a head.
    pub fn head(&mut self, head: ServiceHead) {
        self.heads.insert(head.service(), head);
    }

    /// Records a host's report.
    pub fn status(&mut self, status: HostStatus) {
        let id = status.service();
        self.hosts.entry(id).or_default().insert(status.host.clone(), status);
    }

    /// Records a rollout state.
    pub fn rollout(&mut self, state: RolloutState) {
        self.rollouts.insert(state.service(), state);
    }
}

/// Where one host stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostState {
    /// At the target commit, applied and told with success.
    Done,
    /// Not there yet, with the commit it has in place.
    Pending {
        /// The host's commit, if it has one.
        at: Option<String>,
    },
    /// Not there, and not to go there yet: the commit rolls out in waves and the
    /// host's wave is not released (or the rollout waits or halted). Counted as pending,
    /// never as failed, whatever the host last reported of the commit it holds.
    Held {
        /// The host's commit, if it has one.
        at: Option<String>,
    },
    /// It took the commit, the rollout halted, and it went back by itself to the
    /// previous commit (`at`), as it reported.
    Reverted {
        /// The commit it went back to.
        at: Option<String>,
    },
    /// It reported a failure: an update it could not apply or its `--check-cmd`
    /// refused, an `--exec` that failed, or a `--health-cmd` that judged it unhealthy.
    Failed {
        /// The host's commit, when it is not the target.
        at: Option<String>,
        /// What went wrong, short.
        reason: String,
    },
}

/// One host of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostProgress {
    /// Host id.
    pub host: String,
    /// Where it stands.
    pub state: HostState,
}

/// One affected service of a datacenter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceProgress {
    /// The service, application or device.
    pub service: ServiceId,
    /// The commit its hosts must reach.
    pub commit: String,
    /// The relay's head when it has not published `commit` yet.
    pub relay_at: Option<String>,
    /// Its hosts, by id.
    pub hosts: Vec<HostProgress>,
    /// The relay's rollout state of `commit`, when it rolls out in waves.
    pub rollout: Option<RolloutState>,
}

impl ServiceProgress {
    /// Whether its rollout of the commit is halted.
    pub fn halted(&self) -> bool {
        self.rollout.as_ref().is_some_and(|r| r.phase == Phase::Halted)
    }

    /// Whether it rolls out in waves and is not over yet (waiting, rolling, paused).
    pub fn staged(&self) -> bool {
        self.rollout.as_ref().is_some_and(|r| !r.phase.is_final())
    }

    /// Whether nothing is left to wait for now: every host is done, or the rollout
    /// halted, or it is staged and no host of a released wave is still on its way
    /// (the others wait for their wave, a bake, or an operator).
    pub fn settled(&self) -> bool {
        let pending = self.hosts.iter().any(|h| matches!(h.state, HostState::Pending { .. }));
        let all_done = self.hosts.iter().all(|h| h.state == HostState::Done);
        self.relay_at.is_none() && (all_done || self.halted() || self.staged() && !pending)
    }
}

/// One datacenter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DcProgress {
    /// Datacenter id.
    pub dc: String,
    /// The services the target concerns there (none: not affected).
    pub services: Vec<ServiceProgress>,
}

impl DcProgress {
    pub(crate) fn hosts(&self) -> impl Iterator<Item = &HostProgress> {
        self.services.iter().flat_map(|s| s.hosts.iter())
    }

    /// Hosts (per affected service) in all.
    pub fn total(&self) -> usize {
        self.hosts().count()
    }

    /// Hosts at the target with a good status.
    pub fn done(&self) -> usize {
        self.hosts().filter(|h| h.state == HostState::Done).count()
    }

    /// Whether the datacenter is affected at all.
    pub fn affected(&self) -> bool {
        !self.services.is_empty()
    }

    /// Affected, and every host there is done. A service no host reports for counts as
    /// done: there is nobody to wait for. A halted rollout is never complete.
    pub fn complete(&self) -> bool {
        self.affected()
            && self.services.iter().all(|s| s.relay_at.is_none() && !s.halted())
            && self.done() == self.total()
    }

    /// Whether the rollout of some affected service halted here: it will not complete
    /// without an operator.
    pub fn halted(&self) -> bool {
        self.services.iter().any(ServiceProgress::halted)
    }

    /// Whether there is nothing to wait for here now: complete, halted, or each
    /// unfinished service rolls out in waves and waits for a wave, a bake or an
    /// operator, not for hosts of a released wave ([`ServiceProgress::settled`]).
    pub fn settled(&self) -> bool {
        !self.affected() || self.halted() || self.services.iter().all(ServiceProgress::settled)
    }
}

/// The whole rollout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rollout {
    /// Every datacenter looked at, by id.
    pub dcs: Vec<DcProgress>,
}

/// Whether a rollout is over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Every host of every affected service in every affected datacenter is at the
    /// target with a good status.
    Complete,
    /// Some host is pending or failed.
    InProgress,
    /// No datacenter (yet) runs anything the target concerns.
    NothingAffected,
}

impl Rollout {
    /// Where the rollout stands.
    pub fn verdict(&self) -> Verdict {
        let affected: Vec<&DcProgress> = self.dcs.iter().filter(|d| d.affected()).collect();
        if affected.is_empty() {
            Verdict::NothingAffected
        } else if affected.iter().all(|d| d.complete()) {
            Verdict::Complete
        } else {
            Verdict::InProgress
        }
    }

    /// Hosts (per service) failed and pending (held ones included), over every
    /// datacenter.
    pub fn counts(&self) -> (usize, usize) {
        let hosts = || self.dcs.iter().flat_map(|d| d.hosts());
        let failed = hosts().filter(|h| matches!(h.state, HostState::Failed { .. })).count();
        let pending = hosts().filter(|h| matches!(h.state, HostState::Pending { .. } | HostState::Held { .. })).count();
        (failed, pending)
    }

    /// The datacenters where the rollout of some affected service halted.
    pub fn halted(&self) -> impl Iterator<Item = &DcProgress> {
        self.dcs.iter().filter(|d| d.halted())
    }

    /// Whether following it longer changes nothing by itself: every affected
    /// datacenter is complete or halted, and one halted.
    pub fn stopped(&self) -> bool {
        let affected = || self.dcs.iter().filter(|d| d.affected());
        self.halted().next().is_some() && affected().all(|d| d.complete() || d.halted())
    }
}

/// The commit every affected service must reach, per datacenter: service → target
/// commit.
fn affected(
    targets: &[Target],
    observed: &Observed,
    commit_refs: &BTreeMap<String, String>,
) -> BTreeMap<ServiceId, String> {
    let mut out = BTreeMap::new();
    for (key, head) in &observed.heads {
        for target in targets {
            let want = match target {
                Target::Commit(prefix) => match &head.commit {
                    Some(c) if c.starts_with(prefix.as_str()) => Some(c.clone()),
                    // Not published here yet, but the same ref was published elsewhere
                    // at the target: this datacenter's relay is on its way.
                    _ => commit_refs.get(&head.ref_name).cloned(),
                },
                Target::Ref(_) if target.follows_ref(&head.ref_name) => head.commit.clone(),
                Target::RefAt { commit, old, .. } if target.follows_ref(&head.ref_name) => {
                    match &head.commit {
                        // A later push moved the ref on: its hosts go there instead.
                        Some(c) if c != commit && Some(c) != old.as_ref() => Some(c.clone()),
                        _ => Some(commit.clone()),
                    }
                }
                _ => None,
            };
            if let Some(want) = want {
                out.insert(key.clone(), want);
                break;
            }
        }
    }
    out
}

/// Why a host failed, short: `exec exited 1`, or the error it reported.
fn failure(status: &HostStatus) -> String {
    if let Some(code) = status.exec_status.filter(|c| *c != 0) {
        return format!("exec exited {code}");
    }
    let error = status.error.as_deref().unwrap_or("reported a failure").trim();
    // The subscriber words a failed command as `--exec exited with exit status: N`.
    if let Some(code) = error.strip_prefix("--exec exited with exit status: ") {
        return format!("exec exited {code}");
    }
    error.trim_start_matches("--").to_owned()
}

/// Why a host that applied is not done: `--health-cmd` (or `--exec`) judged it
/// unhealthy, or it went back to the previous commit; the first line of the reason.
fn unwell(status: &HostStatus) -> Option<String> {
    let health = status.health.as_ref()?;
    let first_line = || health.reason.as_deref().and_then(|r| r.lines().next()).map(str::trim);
    match health.state {
        HealthState::Healthy => None,
        HealthState::Unhealthy => Some(format!("unhealthy: {}", first_line().unwrap_or("no reason given"))),
        HealthState::Reverted => Some(format!("reverted: {}", first_line().unwrap_or("the rollout halted"))),
    }
}

pub(crate) fn host_state(status: &HostStatus, commit: &str) -> HostState {
    let at_target = status.commit.as_deref() == Some(commit);
    match (at_target, status.ok) {
        (true, true) => match unwell(status) {
            Some(reason) => HostState::Failed { at: None, reason },
            None => HostState::Done,
        },
        (true, false) => HostState::Failed { at: None, reason: failure(status) },
        (false, false) => HostState::Failed { at: status.commit.clone(), reason: failure(status) },
        (false, true) => HostState::Pending { at: status.commit.clone() },
    }
}

/// Computes the rollout of `targets` over every datacenter in `observed`.
pub fn progress(targets: &[Target], observed: &BTreeMap<String, Observed>) -> Rollout {
    progress_pushed(targets, observed, &Pushed::default())
}

/// [`progress`], knowing what the refs were last pushed to: a datacenter that follows a
/// ref last pushed to a target commit is on its way there, even before its relay got it.
pub fn progress_pushed(targets: &[Target], observed: &BTreeMap<String, Observed>, pushed: &Pushed) -> Rollout {
    let commit_refs = commit_refs(targets, observed, pushed);
    let dcs = observed
        .iter()
        .map(|(dc, seen)| {
            let services = affected(targets, seen, &commit_refs)
                .into_iter()
                .map(|(service, commit)| service_progress(seen, service, commit))
                .collect();
            DcProgress { dc: dc.clone(), services }
        })
        .collect();
    Rollout { dcs }
}

/// Refs whose relay somewhere published a commit the targets name, or that were last
/// pushed to it, with that commit: the same ref in every datacenter is affected, even
/// before its relay gets there.
fn commit_refs(targets: &[Target], observed: &BTreeMap<String, Observed>, pushed: &Pushed) -> BTreeMap<String, String> {
    let mut commit_refs = BTreeMap::new();
    for target in targets {
        if let Target::Commit(prefix) = target {
            commit_refs.extend(pushed.refs_at(prefix).map(|(r, c)| (r.to_owned(), c.to_owned())));
            for head in observed.values().flat_map(|o| o.heads.values()) {
                if let Some(c) = head.commit.as_ref().filter(|c| c.starts_with(prefix.as_str())) {
                    commit_refs.insert(head.ref_name.clone(), c.clone());
                }
            }
        }
    }
    commit_refs
}

/// Where the hosts of `service` stand in one datacenter, on their way to `commit`.
/// When the relay rolls `commit` out in waves, a host its rollout does not release
/// (yet) and that is not at `commit` is held, not pending or failed.
pub(crate) fn service_progress(seen: &Observed, service: ServiceId, commit: String) -> ServiceProgress {
    let relay_at = seen.heads.get(&service).and_then(|h| h.commit.clone()).filter(|c| *c != commit);
    let rollout = seen.rollouts.get(&service).filter(|r| r.commit == commit).cloned();
    let reverted = |status: &HostStatus| status.health.as_ref().is_some_and(|h| h.state == HealthState::Reverted);
    let state = |status: &HostStatus| match &rollout {
        Some(_) if status.commit.as_deref() != Some(commit.as_str()) && reverted(status) => {
            HostState::Reverted { at: status.commit.clone() }
        }
        Some(r) if status.commit.as_deref() != Some(commit.as_str()) && !r.releases(&status.host) => {
            HostState::Held { at: status.commit.clone() }
        }
        _ => host_state(status, &commit),
    };
    let hosts = seen
        .hosts
        .get(&service)
        .map(|hosts| hosts.values().map(|s| HostProgress { host: s.host.clone(), state: state(s) }).collect())
        .unwrap_or_default();
    ServiceProgress { service, commit, relay_at, hosts, rollout }
}
