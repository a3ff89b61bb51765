//! The dashboard's cache: what was last read from the bus for every datacenter, and
//! the views computed from it on demand. Host states come from the rollout code of
//! `publisher status` ([`service_progress`]), so both always agree.

use std::collections::{BTreeMap, VecDeque};

use confcast_schemas::message::now_ms;
use confcast_schemas::{ErrorEvent, HostStatus, Kind, ServiceId};

use super::api::{DatacenterView, ErrorView, HostCounts, HostView, RolloutView, ServiceDetail, ServiceView};
use super::timeline::Timeline;
use crate::rollout::progress::service_progress;
use crate::rollout::{HostState, Observed, ServiceProgress};

/// How many error events are kept per datacenter.
pub(crate) const ERRORS_KEPT: usize = 50;

/// Everything the page and the API show.
#[derive(Debug, Default)]
pub(crate) struct Fleet {
    /// Grows with every change, so that a page can tell it is behind.
    pub generation: u64,
    /// Whether the connection to NATS is up.
    pub bus_ok: bool,
    /// Each datacenter followed, by id.
    pub dcs: BTreeMap<String, DcCache>,
}

/// What was read of one datacenter.
#[derive(Debug, Default)]
pub(crate) struct DcCache {
    /// Heads, host statuses and rollout states: the last of each subject.
    pub seen: Observed,
    /// The last error events, oldest first, with their stream sequence.
    pub errors: VecDeque<(u64, ErrorEvent)>,
    /// When each wave of each service's current rollout began, as seen live:
    /// service → (commit, wave → ms since the Unix epoch).
    pub wave_starts: BTreeMap<ServiceId, (String, BTreeMap<usize, u64>)>,
}

impl DcCache {
    /// Records an error event unless it was seen already; whether it was new.
    pub(crate) fn error(&mut self, sequence: u64, event: ErrorEvent) -> bool {
        if self.errors.back().is_some_and(|(last, _)| *last >= sequence) {
            return false;
        }
        self.errors.push_back((sequence, event));
        while self.errors.len() > ERRORS_KEPT {
            self.errors.pop_front();
        }
        true
    }

    /// The stream sequence of the last error read, to go on from there.
    pub(crate) fn last_error(&self) -> Option<u64> {
        self.errors.back().map(|(sequence, _)| *sequence)
    }

    /// Notes the start of the current wave of each rollout, so that the timeline can
    /// mark every wave seen, not only the current one.
    pub(crate) fn note_wave_starts(&mut self) {
        for (id, state) in &self.seen.rollouts {
            let entry = self.wave_starts.entry(id.clone()).or_insert_with(|| (state.commit.clone(), BTreeMap::new()));
            if entry.0 != state.commit {
                *entry = (state.commit.clone(), BTreeMap::new());
            }
            // Before it started (waiting for other datacenters) no wave has begun.
            if state.started {
                entry.1.insert(state.wave, state.wave_started_ms);
            }
        }
    }
}

impl Fleet {
    /// Every datacenter (or only `only`) with its services.
    pub(crate) fn datacenters(&self, only: Option<&str>) -> Vec<DatacenterView> {
        let now = now_ms();
        self.dcs
            .iter()
            .filter(|(dc, _)| only.is_none_or(|o| o == dc.as_str()))
            .map(|(dc, cache)| DatacenterView {
                dc: dc.clone(),
                services: cache.seen.heads.keys().filter_map(|id| service_view(cache, id, now)).collect(),
            })
            .collect()
    }

    /// One service with its hosts; `None` when the datacenter has no such service.
    pub(crate) fn service(&self, dc: &str, kind: &str, name: &str) -> Option<ServiceDetail> {
        let cache = self.dcs.get(dc)?;
        let id = ServiceId::new(kind.parse::<Kind>().ok()?, name);
        let view = service_view(cache, &id, now_ms())?;
        let progress = progress_of(cache, &id)?;
        let statuses = cache.seen.hosts.get(&id);
        let hosts = progress.hosts.iter().map(|h| host_view(&h.host, &h.state, statuses.and_then(|s| s.get(&h.host))));
        Some(ServiceDetail { service: view, hosts: hosts.collect() })
    }

    /// The errors of every datacenter, newest first.
    pub(crate) fn errors(&self) -> Vec<ErrorView> {
        let mut errors: Vec<ErrorView> = self
            .dcs
            .values()
            .flat_map(|c| c.errors.iter())
            .map(|(_, e)| ErrorView {
                dc: e.dc.clone(),
                ref_name: e.ref_name.clone(),
                commit: e.commit.clone(),
                message: e.message.clone(),
                at_ms: e.at_ms,
            })
            .collect();
        errors.sort_by(|a, b| b.at_ms.cmp(&a.at_ms).then_with(|| a.dc.cmp(&b.dc)));
        errors
    }
}

/// Where the hosts of `id` stand on their way to its head's commit; `None` for a
/// service without a head or removed (its head has no commit).
fn progress_of(cache: &DcCache, id: &ServiceId) -> Option<ServiceProgress> {
    let commit = cache.seen.heads.get(id)?.commit.clone()?;
    Some(service_progress(&cache.seen, id.clone(), commit))
}

/// The view of one service, with its timeline when its commit rolls out in waves.
fn service_view(cache: &DcCache, id: &ServiceId, now: u64) -> Option<ServiceView> {
    let head = cache.seen.heads.get(id)?;
    let progress = progress_of(cache, id)?;
    let rollout = progress.rollout.as_ref().map(|r| RolloutView {
        phase: r.phase.as_str().to_owned(),
        wave: r.wave,
        waves: r.waves.clone(),
        bake_ends_ms: r.bake_ends_ms(),
        unhealthy: r.unhealthy.clone(),
        reason: r.reason.clone(),
        started_ms: r.started_ms,
    });
    let timeline = progress.rollout.as_ref().map(|r| {
        let starts = cache.wave_starts.get(id).filter(|(c, _)| *c == r.commit).map(|(_, s)| s.values().copied());
        let arrivals = cache.seen.hosts.get(id).into_iter().flat_map(|hosts| hosts.values());
        Timeline::new(r.started_ms, now, starts.into_iter().flatten().collect(), arrivals, &r.commit)
    });
    Some(ServiceView {
        kind: id.kind.as_str().to_owned(),
        name: id.name.clone(),
        ref_name: head.ref_name.clone(),
        version: head.version.clone(),
        commit: progress.commit.clone(),
        subject: head.about.as_ref().map(|a| a.subject.clone()),
        author: head.about.as_ref().map(|a| a.author.clone()),
        pushed_ms: head.about.as_ref().map(|a| a.pushed_ms),
        hosts: counts(&progress),
        rollout,
        timeline,
    })
}

/// How many hosts stand where.
pub(crate) fn counts(progress: &ServiceProgress) -> HostCounts {
    let mut counts = HostCounts::default();
    for host in &progress.hosts {
        match host.state {
            HostState::Done => counts.at += 1,
            HostState::Pending { .. } => counts.pending += 1,
            HostState::Held { .. } => counts.held += 1,
            HostState::Reverted { .. } => counts.reverted += 1,
            HostState::Failed { .. } => counts.failed += 1,
        }
    }
    counts
}

/// One host's row: its state in words, and from its report the commit in place, the
/// exit status of `--exec` and why it is not well.
fn host_view(host: &str, state: &HostState, status: Option<&HostStatus>) -> HostView {
    let (word, reason) = match state {
        HostState::Done => ("done", None),
        HostState::Pending { .. } => ("pending", None),
        HostState::Held { .. } => ("held", None),
        HostState::Reverted { .. } => {
            ("reverted", status.and_then(|s| s.health.as_ref()).and_then(|h| h.reason.clone()))
        }
        HostState::Failed { reason, .. } => ("failed", Some(reason.clone())),
    };
    HostView {
        host: host.to_owned(),
        state: word.to_owned(),
        commit: status.and_then(|s| s.commit.clone()),
        exec_status: status.and_then(|s| s.exec_status),
        reason,
        at_ms: status.map(|s| s.at_ms).unwrap_or(0),
    }
}

#[cfg(test)]
#[path = "model_tests.rs"]
pub(crate) mod tests;
