//! Staged rollouts: the datacenter's relay, while it holds the lease, is the only
//! coordinator of every rollout of the datacenter (docs/ROLLOUT-DESIGN.md).
//!
//! A change of a service whose pin has a rollout policy begins a rollout ([`Rollouts::begin`]):
//! the waves are planned once ([`plan`]: the hosts that reported a status for the
//! service, in an order fixed by the commit), written as the service's
//! [`RolloutState`] on the state stream, and only then is the update published, marked
//! `staged`, so that no host takes it before the state says whether it may. From then on
//! the engine ([`Rollouts::run`]) judges the released hosts by their status reports
//! ([`verdict`]) about once a second, and moves the state on: the next wave once the
//! current one has been healthy for `bake_secs`, `complete` after the last, `halted`
//! with every reason when more than `max_unhealthy` hosts are unhealthy. Operators'
//! controls change it too ([`control`]).
//!
//! Everything the engine needs is on the bus — the state (with absolute times) and the
//! hosts' reports — so a relay that takes the lease over continues every rollout where
//! it stood, and nothing is kept per host on the server beyond the status stream.
//! Every state change is written under one lock, so the sync, the engine and the
//! controls never write a service's state over each other.

pub(crate) mod control;
mod peers;
mod verdict;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use confcast_schemas::message::now_ms;
use confcast_schemas::rollout::{plan, Phase, Policy, RolloutState};
use confcast_schemas::{decode, encode, subject, HostStatus, ServiceHead, ServiceId, WIRE_VERSION};
use futures::{FutureExt, StreamExt};
use tokio_util::sync::CancellationToken;

use crate::bus::Bus;
use crate::cause::Cause;
use crate::error::BusError;
use crate::publish::Publisher;
use crate::resolve::Target;

/// How often the engine looks at the rollouts under way.
const TICK: Duration = Duration::from_secs(1);
/// How recent a host's last report must be for the host to be in a rollout's waves:
/// hosts report every service at least daily ([`confcast_schemas::message::STATUS_REFRESH`]),
/// plus an hour of slack.
const LIVE_REPORT_MS: u64 = (24 + 1) * 3600 * 1000;
/// How long the engine lets a burst of reports gather before it looks.
const REPORTS_SETTLE: Duration = Duration::from_millis(50);

/// How the relay reaches the state of the datacenters a rollout waits for.
#[derive(Debug, Clone, Default)]
pub struct Peers {
    /// Each datacenter's streams are in a JetStream domain named after it (the
    /// leaf-node topology); otherwise they share the relay's JetStream.
    pub domains: bool,
}

/// The rollouts of one datacenter, as written on its state stream.
pub(crate) struct Rollouts {
    dc: String,
    bus: Bus,
    peers: Peers,
    states: tokio::sync::Mutex<BTreeMap<ServiceId, RolloutState>>,
    /// The datacenters a commit completes in first (`datacenter.json`), as last resolved.
    after: std::sync::Mutex<Vec<String>>,
    /// Wakes the engine when a rollout begins or an operator changes one.
    wake: tokio::sync::Notify,
}

/// What [`Rollouts::begin`] decided for a service's new commit.
#[derive(Debug, Clone, Default)]
pub(crate) struct Begun {
    /// The update rolls out in waves: hosts wait for the state to release them.
    pub(crate) staged: bool,
}

impl Rollouts {
    /// The rollouts of datacenter `dc` as its state stream holds them.
    pub(crate) async fn load(dc: &str, bus: &Bus, peers: Peers) -> Result<Rollouts, BusError> {
        let mut states = BTreeMap::new();
        for payload in bus.last_per_subject(&subject::rollouts_wildcard(dc)).await? {
            match decode::<RolloutState>(&payload) {
                Ok(state) => {
                    states.insert(state.service(), state);
                }
                Err(e) => tracing::warn!(%dc, error = %e, "ignoring an unreadable rollout state"),
            }
        }
        let active = states.values().filter(|s| !s.phase.is_final()).count();
        if active > 0 {
            tracing::info!(%dc, active, "continuing the rollouts under way");
        }
        Ok(Rollouts {
            dc: dc.to_owned(),
            bus: bus.clone(),
            peers,
            states: tokio::sync::Mutex::new(states),
            after: std::sync::Mutex::default(),
            wake: tokio::sync::Notify::new(),
        })
    }

    /// Records the datacenters a commit must complete in before this one starts it.
    pub(crate) fn set_after(&self, after: Vec<String>) {
        *self.after.lock().unwrap_or_else(|e| e.into_inner()) = after;
    }

    fn after(&self) -> Vec<String> {
        self.after.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The tree a rollout under way of `service` still needs besides the published one:
    /// what hosts outside its released waves hold, and what it goes back to.
    pub(crate) async fn kept_tree(&self, service: &ServiceId) -> Option<String> {
        let states = self.states.lock().await;
        states.get(service).filter(|s| !matches!(s.phase, Phase::Complete | Phase::Promoted))?.previous_tree.clone()
    }

    /// Decides how `target`, the new commit of `service` whose tree is `tree`, reaches
    /// the hosts, and writes the service's rollout state before its update goes out.
    /// `head` is what was published before. Without a policy nothing is staged; a state
    /// left from an earlier rollout is moved to the new commit as complete, so that no
    /// host ever reads a state older than the update it gets.
    pub(crate) async fn begin(
        &self,
        service: &ServiceId,
        target: &Target,
        tree: Option<&str>,
        head: Option<&ServiceHead>,
    ) -> Result<Begun, BusError> {
        let commit = target.commit.to_string();
        let mut states = self.states.lock().await;
        let existing = states.get(service);
        if let Some(state) = existing.filter(|s| s.commit == commit) {
            // Begun before (a sync redone after a failure): the plan stands.
            return Ok(Begun { staged: state.policy_staged() });
        }
        // The last commit whose rollout completed: what every host had before this one.
        let published_before = head.is_some_and(|h| h.commit.is_some());
        let (previous, previous_tree) = match existing {
            // Removed since (its objects are gone) or never published: a first publish.
            _ if !published_before => (None, None),
            Some(s) if matches!(s.phase, Phase::Complete | Phase::Promoted) => (Some(s.commit.clone()), s.tree.clone()),
            Some(s) => (s.previous.clone(), s.previous_tree.clone()),
            None => (head.and_then(|h| h.commit.clone()), head.and_then(|h| h.tree.clone())),
        };
        let now = now_ms();
        let after = self.after();
        // Following another datacenter stages a change even without a policy of its
        // own: one wave of every host, once the others completed it.
        let policy = target.policy.clone().or_else(|| (!after.is_empty()).then(Policy::all_at_once));
        let state = match (&policy, &previous) {
            (Some(policy), Some(_)) => {
                // Hosts that follow the service now: a report with a commit in place,
                // repeated at least daily; a host gone (or that dropped the service)
                // keeps its last report for days and must not be waited for.
                let fresh = |s: &HostStatus| s.commit.is_some() && now.saturating_sub(s.at_ms) <= LIVE_REPORT_MS;
                let statuses = self.statuses(service).await?;
                let hosts: Vec<String> = statuses.into_iter().filter(|(_, s)| fresh(s)).map(|(h, _)| h).collect();
                let waves = plan(policy, &self.dc, service, &commit, &hosts);
                let (phase, reason) = match after.is_empty() {
                    true => (Phase::Rolling, None),
                    false => (Phase::Waiting, Some(format!("waiting for {} to complete it", after.join(", ")))),
                };
                RolloutState {
                    v: WIRE_VERSION,
                    dc: self.dc.clone(),
                    kind: service.kind,
                    name: service.name.clone(),
                    ref_name: target.ref_name.clone(),
                    commit: commit.clone(),
                    tree: tree.map(str::to_owned),
                    previous,
                    previous_tree,
                    policy: policy.clone(),
                    waves,
                    wave: 0,
                    wave_started_ms: now,
                    healthy_since_ms: None,
                    phase,
                    started: after.is_empty(),
                    reason,
                    unhealthy: BTreeMap::new(),
                    started_ms: now,
                    updated_ms: now,
                }
            }
            // Nothing to stage: no policy, or nothing published before (waves apply
            // to a change). A state left from before follows the commit, complete.
            _ => {
                let Some(old) = existing else { return Ok(Begun::default()) };
                let reason = match policy {
                    None => "no rollout policy: every host at once",
                    Some(_) => "first publish: every host at once",
                };
                RolloutState {
                    ref_name: target.ref_name.clone(),
                    commit: commit.clone(),
                    tree: tree.map(str::to_owned),
                    previous: None,
                    previous_tree: None,
                    waves: Vec::new(),
                    wave: 0,
                    wave_started_ms: now,
                    healthy_since_ms: None,
                    phase: Phase::Complete,
                    started: true,
                    reason: Some(reason.to_owned()),
                    unhealthy: BTreeMap::new(),
                    started_ms: now,
                    updated_ms: now,
                    ..old.clone()
                }
            }
        };
        let staged = state.policy_staged();
        if staged {
            let waves: Vec<usize> = state.waves.iter().map(Vec::len).collect();
            let (kind, name) = (service.kind, &service.name);
            tracing::info!(%kind, %name, %commit, ?waves, canary = ?state.waves.first(), phase = %state.phase, "rolling out in waves");
        }
        self.write(&mut states, state).await?;
        Ok(Begun { staged })
    }

    /// Ends a rollout under way of a service that left the datacenter: nothing is left to
    /// roll out, and no host of it is waited for.
    pub(crate) async fn removed(&self, service: &ServiceId) -> Result<(), BusError> {
        let mut states = self.states.lock().await;
        let Some(state) = states.get(service).filter(|s| !s.phase.is_final()).cloned() else { return Ok(()) };
        let done = RolloutState {
            phase: Phase::Complete,
            reason: Some("the service left the datacenter".to_owned()),
            ..state
        };
        self.write(&mut states, done).await
    }

    /// Writes `state` (signed like every message of the relay) and records it.
    async fn write(
        &self,
        states: &mut BTreeMap<ServiceId, RolloutState>,
        mut state: RolloutState,
    ) -> Result<(), BusError> {
        state.updated_ms = now_ms();
        let service = state.service();
        let id = format!(
            "{}/{}/{}/rollout/{}/{}/{}",
            self.dc, service.kind, service.name, state.commit, state.phase, state.updated_ms
        );
        self.bus.publish_rollout(&service, &id, encode(&state)).await?;
        states.insert(service, state);
        // The engine looks again: it may have a rollout to follow now, or none.
        self.wake.notify_one();
        Ok(())
    }

    /// The last report of every host of `service`, by host.
    async fn statuses(&self, service: &ServiceId) -> Result<BTreeMap<String, HostStatus>, BusError> {
        let mut statuses = BTreeMap::new();
        for payload in self.bus.statuses(service).await? {
            match decode::<HostStatus>(&payload) {
                Ok(status) if status.service() == *service => {
                    statuses.insert(status.host.clone(), status);
                }
                Ok(_) => {}
                Err(e) => tracing::debug!(error = %e, "ignoring an unreadable host status"),
            }
        }
        Ok(statuses)
    }

    /// Moves every rollout under way on until `stop`: as soon as a host reports (the
    /// reports travel on core NATS subjects the relay listens to while a rollout is
    /// under way, so a wave moves on within a moment of its last host's report), on a
    /// bake's end, and about once a second for what time alone decides (a report's
    /// timeout) and for reports missed while the connection was down. With no rollout
    /// under way it only waits to be woken ([`Rollouts::wake`]): the default path pays
    /// nothing for it.
    pub(crate) async fn run(self: Arc<Self>, publisher: Publisher, stop: CancellationToken) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut reports: Option<async_nats::Subscriber> = None;
        let mut due: Option<tokio::time::Instant> = None;
        let mut rolling = self.any_rolling().await;
        loop {
            self.listen(rolling, &mut reports).await;
            let bake_ends = async {
                match due {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let report = async {
                match reports.as_mut() {
                    Some(reports) => reports.next().await,
                    None => std::future::pending().await,
                }
            };
            let ticked = async {
                match rolling {
                    true => drop(tick.tick().await),
                    false => std::future::pending().await,
                }
            };
            tokio::select! {
                () = ticked => {}
                () = bake_ends => {}
                () = self.wake.notified() => {}
                Some(_) = report => {
                    // Reports come in bursts (a wave's hosts at once): one step for all.
                    tokio::time::sleep(REPORTS_SETTLE).await;
                    while let Some(Some(_)) = reports.as_mut().and_then(|r| r.next().now_or_never()) {}
                }
                () = stop.cancelled() => return,
            }
            if let Err(e) = self.step(&publisher).await {
                tracing::warn!(dc = %self.dc, error = %confcast_schemas::process::error_chain(&e), "could not move the rollouts on; trying again");
            }
            due = self.next_bake_end().await;
            rolling = self.any_rolling().await;
        }
    }

    /// Listens to the hosts' reports while a rollout is `rolling`, and stops listening
    /// once none is.
    async fn listen(&self, rolling: bool, reports: &mut Option<async_nats::Subscriber>) {
        match (rolling, reports.is_some()) {
            (true, false) => {
                let wildcard = subject::status_stream_subjects(&self.dc).remove(0);
                match self.bus.client().subscribe(wildcard).await {
                    Ok(subscriber) => *reports = Some(subscriber),
                    Err(e) => {
                        tracing::warn!(dc = %self.dc, error = %e, "cannot listen to the hosts' reports; judging waves once a second")
                    }
                }
            }
            (false, true) => *reports = None,
            _ => {}
        }
    }

    /// When the first bake under way ends, so the next wave starts on time rather than
    /// at the next tick.
    async fn next_bake_end(&self) -> Option<tokio::time::Instant> {
        let states = self.states.lock().await;
        let end = states.values().filter(|s| s.phase == Phase::Rolling).filter_map(RolloutState::bake_ends_ms).min()?;
        let wait = Duration::from_millis(end.saturating_sub(now_ms()));
        Some(tokio::time::Instant::now() + wait)
    }

    /// Whether a rollout is moving (rolling or waiting).
    async fn any_rolling(&self) -> bool {
        self.states.lock().await.values().any(|s| matches!(s.phase, Phase::Waiting | Phase::Rolling))
    }

    /// One look at every rollout under way.
    async fn step(&self, publisher: &Publisher) -> Result<(), BusError> {
        let under_way: Vec<ServiceId> = {
            let states = self.states.lock().await;
            states
                .iter()
                .filter(|(_, s)| matches!(s.phase, Phase::Waiting | Phase::Rolling))
                .map(|(id, _)| id.clone())
                .collect()
        };
        for service in under_way {
            // Everything is read without the lock — the hosts' reports, the other
            // datacenters' rollouts (a peer that does not answer takes seconds) — so a
            // push or an operator's control never waits for it; the outcome is written
            // only if the state did not change meanwhile (else the next look decides).
            let statuses = self.statuses(&service).await?;
            let Some(state) = self.states.lock().await.get(&service).cloned() else { continue };
            let next = match state.phase {
                Phase::Waiting => self.after_done(&state).await?,
                Phase::Rolling => advance(&state, &statuses, now_ms()),
                _ => None,
            };
            let Some(next) = next else { continue };
            let mut states = self.states.lock().await;
            if states.get(&service) != Some(&state) {
                continue;
            }
            let (kind, name) = (service.kind, &service.name);
            let (commit, wave, waves) = (&next.commit, next.wave + 1, next.waves.len());
            match next.phase {
                Phase::Halted => {
                    let message = halt_message(&next);
                    tracing::error!(%kind, %name, %commit, "{message}");
                    self.write(&mut states, next.clone()).await?;
                    drop(states);
                    publisher.error(&Cause::rollout(&next), message).await?;
                    continue;
                }
                Phase::Complete => tracing::info!(%kind, %name, %commit, "rollout complete"),
                Phase::Rolling if next.wave != state.wave || state.phase == Phase::Waiting => {
                    tracing::info!(%kind, %name, %commit, wave, waves, hosts = ?next.waves.get(next.wave), "next wave")
                }
                _ => {}
            }
            self.write(&mut states, next).await?;
        }
        Ok(())
    }
}

/// The next state of a rolling rollout at `now`, judged from `statuses`; `None` when
/// nothing changed.
fn advance(state: &RolloutState, statuses: &BTreeMap<String, HostStatus>, now: u64) -> Option<RolloutState> {
    let judged = verdict::judge(state, statuses, now);
    if judged.unhealthy.len() > state.policy.max_unhealthy as usize {
        let (wave, waves) = (state.wave + 1, state.waves.len());
        let reason = format!(
            "wave {wave} of {waves}: {} unhealthy (at most {} tolerated)",
            judged.unhealthy.len(),
            state.policy.max_unhealthy
        );
        return Some(RolloutState {
            phase: Phase::Halted,
            reason: Some(reason),
            unhealthy: judged.unhealthy,
            ..state.clone()
        });
    }
    if judged.pending > 0 {
        // A released host that is on its way again (it restarted, say) restarts the
        // bake once it is back.
        return state.healthy_since_ms.is_some().then(|| RolloutState { healthy_since_ms: None, ..state.clone() });
    }
    // The last wave that adds hosts needs no bake: nothing comes after it.
    let last = state.waves.iter().rposition(|w| !w.is_empty()).unwrap_or(0);
    if state.wave >= last {
        return Some(RolloutState { phase: Phase::Complete, reason: None, ..state.clone() });
    }
    let Some(since) = state.healthy_since_ms else {
        return Some(RolloutState { healthy_since_ms: Some(now), ..state.clone() });
    };
    if now < since + state.policy.bake_secs * 1000 {
        return None;
    }
    // Waves that add no host (a count reached already) are passed over.
    let mut wave = state.wave + 1;
    while state.waves[wave].is_empty() {
        wave += 1;
    }
    Some(RolloutState { wave, wave_started_ms: now, healthy_since_ms: None, ..state.clone() })
}

/// The error event of a halted rollout: the service, the commit, each host and reason.
fn halt_message(state: &RolloutState) -> String {
    let hosts: Vec<String> = state.unhealthy.iter().map(|(host, why)| format!("{host}: {why}")).collect();
    let back = match &state.previous {
        Some(previous) => format!("hosts that took it go back to {}", &previous[..previous.len().min(12)]),
        None => "no host had an earlier commit".to_owned(),
    };
    format!(
        "rollout of {} {:?} {} halted in {}: {}; {}; {back}",
        state.kind,
        state.name,
        &state.commit[..state.commit.len().min(12)],
        state.dc,
        state.reason.as_deref().unwrap_or("halted"),
        hosts.join("; "),
    )
}

trait Staged {
    /// Whether hosts must wait for the state to release them.
    fn policy_staged(&self) -> bool;
}

impl Staged for RolloutState {
    fn policy_staged(&self) -> bool {
        !self.waves.is_empty() || !matches!(self.phase, Phase::Complete)
    }
}

#[cfg(test)]
mod tests;
