//! Staged rollouts, the host's half: a commit the relay rolls out in waves
//! (`ServiceUpdate::staged`) is taken only once the service's rollout state
//! ([`RolloutState`], on the state stream) releases this host.
//!
//! * An update or snapshot of a staged commit is checked against the rollout state
//!   ([`Host::admit`]; read from the bus only when the one this host holds is for
//!   another commit). Released: applied as any other. Not released: held — the tree in
//!   place stays, and the service's stream position does not move past the update, so
//!   a restart replays it and decides again. A host with no tree of the service takes
//!   the commit before it (`previous`) meanwhile. Updates without `staged` never look
//!   for a rollout state: the hot path is as it was.
//! * The rollout subjects of the followed services are watched ([`Host::watch_rollouts`],
//!   the last state of each first, so a restarted host does what its wave requires), and
//!   each state is acted on ([`Host::follow_rollout`]): a host its wave now releases
//!   moves to the commit; a halted rollout sends a host that took the commit back to
//!   the previous one (`--exec` runs, and the host reports health `reverted`); a host
//!   with nothing in place takes the previous commit.
//! * While a host's commit bakes in its wave, `--health-cmd` runs every
//!   [`BAKE_HEALTH`] and a change of verdict is reported at once
//!   ([`Host::judge_bakes`]), so the relay sees a host turn unhealthy during the bake.
//!
//! Every move goes the usual way — built from the commit's objects, flushed,
//! `--check-cmd`, switched, `--exec`, `--health-cmd`, reported.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use confcast_schemas::message::{now_ms, Health, HealthState};
use confcast_schemas::rollout::{Phase, RolloutState};
use confcast_schemas::{subject, ServiceId, ServiceUpdate};
use tokio::sync::mpsc;

use crate::apply::{Applied, UpdateError};
use crate::command::Change;
use crate::host::{Host, SubscriberError};

/// How often `--health-cmd` runs while a host's commit bakes in its wave.
pub(crate) const BAKE_HEALTH: Duration = Duration::from_secs(2);

/// A staged commit this host does not take yet.
#[derive(Debug, Clone)]
pub(crate) struct Held {
    /// The update (or snapshot) that announced it, without its entries: the ref,
    /// branch and version the commit is applied as once released.
    pub(crate) update: ServiceUpdate,
    /// Its stream sequence, for an update of the stream: where the service's position
    /// moves once the commit is taken.
    pub(crate) seq: Option<u64>,
}

/// What the host knows and does about the rollouts of the services it follows.
pub(crate) struct Rollouts {
    /// The last rollout state seen per service.
    pub(crate) states: BTreeMap<ServiceId, RolloutState>,
    /// Per service, the staged commit held.
    pub(crate) held: BTreeMap<ServiceId, Held>,
    /// Per service, the commit it went back to when a rollout halted, and the health
    /// reported for it (`reverted`) until another commit is applied.
    pub(crate) reverted: BTreeMap<ServiceId, (String, Health)>,
    /// Services whose move a rollout state asked for failed: tried again with the
    /// failed updates.
    pub(crate) retry: BTreeSet<ServiceId>,
    /// Services whose `--health-cmd` runs for the bake now.
    judging: BTreeSet<ServiceId>,
    /// Where those runs report.
    judged_tx: mpsc::UnboundedSender<Judged>,
    pub(crate) judged: mpsc::UnboundedReceiver<Judged>,
}

/// A verdict of `--health-cmd` during a bake.
pub(crate) struct Judged {
    id: ServiceId,
    commit: String,
    health: Health,
}

impl Default for Rollouts {
    fn default() -> Rollouts {
        let (judged_tx, judged) = mpsc::unbounded_channel();
        Rollouts {
            states: BTreeMap::new(),
            held: BTreeMap::new(),
            reverted: BTreeMap::new(),
            retry: BTreeSet::new(),
            judging: BTreeSet::new(),
            judged_tx,
            judged,
        }
    }
}

/// Whether a staged commit may be applied here.
pub(crate) enum Admitted {
    /// Released (or not staged at all): apply it.
    Take,
    /// Not released: keep what is in place.
    Held,
    /// Not released, and nothing in place: build this instead (the commit before it).
    Instead(Box<ServiceUpdate>),
}

/// Why a rollout state moves a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Move {
    /// Its wave released this host.
    Released,
    /// The rollout halted: back to the commit before it.
    Reverted,
    /// Nothing in place and not released: the commit before it.
    Previous,
}

impl Host {
    /// Whether `update`, which would bring `id` from `have` to its commit, may be applied
    /// now: always without `staged`; else only once the service's rollout state for that
    /// commit releases this host. A held update is remembered (with `seq`, its stream
    /// sequence) and said.
    pub(crate) async fn admit(
        &mut self,
        id: &ServiceId,
        have: Option<&str>,
        update: &ServiceUpdate,
        seq: Option<u64>,
    ) -> Result<Admitted, UpdateError> {
        let Some(commit) = update.to.as_deref().filter(|to| update.staged && Some(*to) != have) else {
            return Ok(Admitted::Take);
        };
        let state = self.rollout_for(id, commit).await?;
        if state.as_ref().is_some_and(|s| s.releases(&self.config.host_id)) {
            return Ok(Admitted::Take);
        }
        let ServiceId { kind, name } = id;
        let phase = state.as_ref().map_or("unknown", |s| s.phase.as_str());
        tracing::info!(%kind, %name, %commit, %phase, "holding the staged commit: this host's wave is not released");
        let header = ServiceUpdate { entries: Vec::new(), ..update.clone() };
        self.rollouts.held.insert(id.clone(), Held { update: header, seq });
        self.live.update(id, |live| live.pending = Some(commit.to_owned()));
        let previous = state.as_ref().and_then(|s| Some((s.previous.as_deref()?, s.previous_tree.as_deref()?)));
        match (have, previous) {
            (None, Some((previous, tree))) => {
                let instead = self.reader.commit_snapshot(update, previous, tree).await?;
                Ok(Admitted::Instead(Box::new(instead)))
            }
            _ => Ok(Admitted::Held),
        }
    }

    /// The rollout state of `id` if the one known is for `commit`, else the one on the bus.
    async fn rollout_for(&mut self, id: &ServiceId, commit: &str) -> Result<Option<RolloutState>, UpdateError> {
        if let Some(state) = self.rollouts.states.get(id).filter(|s| s.commit == commit) {
            return Ok(Some(state.clone()));
        }
        let state = self.reader.rollout(id).await?.filter(|s| s.service() == *id && s.dc == self.config.dc);
        if let Some(state) = &state {
            self.rollouts.states.insert(id.clone(), state.clone());
        }
        Ok(state.filter(|s| s.commit == commit))
    }

    /// Another commit of `id` is in place: what was held or reverted for it is over —
    /// unless it is the commit before the held one, which a host with nothing in place
    /// takes while it waits.
    pub(crate) fn rollout_moved(&mut self, id: &ServiceId, commit: Option<&str>) {
        let waiting = |held: &Held| {
            self.rollouts.states.get(id).is_some_and(|s| {
                held.update.to.as_deref() == Some(s.commit.as_str()) && s.previous.as_deref() == commit
            })
        };
        if self.rollouts.held.get(id).is_some_and(|held| !waiting(held)) {
            self.rollouts.held.remove(id);
            self.live.update(id, |live| live.pending = None);
        }
        if self.rollouts.reverted.get(id).is_some_and(|(c, _)| Some(c.as_str()) != commit) {
            self.rollouts.reverted.remove(id);
        }
    }

    /// The health to report for `commit` of `id` after its `--exec` instead of what the
    /// checks said: `reverted`, when a halted rollout sent it back there.
    pub(crate) fn reverted_health(&self, id: &ServiceId, commit: Option<&str>) -> Option<Health> {
        self.rollouts.reverted.get(id).filter(|(c, _)| Some(c.as_str()) == commit).map(|(_, h)| h.clone())
    }

    /// An ordered consumer of the rollout states of the followed services, the last of
    /// each first; `None` when nothing is followed or it cannot be created (said: the
    /// states are then read with each staged update only).
    pub(crate) async fn watch_rollouts(&self) -> Option<consumer::pull::Ordered> {
        if self.services.is_empty() {
            return None;
        }
        let dc = &self.config.dc;
        let filters = self.services.iter().map(|id| subject::rollout_subject(dc, id.kind, &id.name)).collect();
        let watch = async {
            let stream =
                self.reader.jetstream().get_stream(subject::state_stream(dc)).await.map_err(|e| e.to_string())?;
            let consumer = stream
                .create_consumer(consumer::pull::OrderedConfig {
                    filter_subjects: filters,
                    deliver_policy: consumer::DeliverPolicy::LastPerSubject,
                    ..Default::default()
                })
                .await
                .map_err(|e| e.to_string())?;
            consumer.messages().await.map_err(|e| e.to_string())
        };
        watch
            .await
            .inspect_err(|e| tracing::warn!(%dc, error = %e, "cannot watch the rollout states; a held commit waits for a restart"))
            .ok()
    }

    /// A message of the rollout watch: the state is kept and acted on. A forged or
    /// unreadable one, or one that does not match its subject, is said and ignored.
    pub(crate) async fn rollout_changed(&mut self, message: jetstream::Message) -> Result<(), SubscriberError> {
        let payload = match self.reader.payload(&message.subject, message.headers.as_ref(), &message.payload).await {
            Ok(payload) => payload,
            Err(e) => {
                if e.is_forged() {
                    self.live.metrics.error("signature");
                }
                tracing::error!(subject = %message.subject, error = %e, "ignoring rollout state");
                return Ok(());
            }
        };
        let state = match crate::bus::decode_rollout(&payload) {
            Ok(state) => state,
            Err(e) => {
                tracing::error!(subject = %message.subject, error = %e, "ignoring unreadable rollout state");
                return Ok(());
            }
        };
        let id = state.service();
        if state.dc != self.config.dc
            || message.subject.as_str() != subject::rollout_subject(&self.config.dc, id.kind, &id.name)
            || !self.services.contains(&id)
        {
            tracing::error!(subject = %message.subject, dc = %state.dc, "ignoring rollout state whose content does not match its subject");
            return Ok(());
        }
        tracing::debug!(kind = %id.kind, name = %id.name, commit = %state.commit, phase = %state.phase, wave = state.wave, "rollout state");
        self.rollouts.states.insert(id.clone(), state.clone());
        self.follow_rollout(&id, &state).await
    }

    /// Does what `state` asks of this host for `id`: take the commit once released, go
    /// back to the previous one when it halted with the commit in place, take the
    /// previous one with nothing in place; nothing otherwise.
    pub(crate) async fn follow_rollout(&mut self, id: &ServiceId, state: &RolloutState) -> Result<(), SubscriberError> {
        let have = self.state(id).commit;
        let at_commit = have.as_deref() == Some(state.commit.as_str());
        let target = if state.releases(&self.config.host_id) {
            (!at_commit).then_some((Move::Released, Some(state.commit.as_str()), state.tree.as_deref()))
        } else if state.phase == Phase::Halted && at_commit {
            Some((Move::Reverted, state.previous.as_deref(), state.previous_tree.as_deref()))
        } else if have.is_none() {
            Some((Move::Previous, state.previous.as_deref(), state.previous_tree.as_deref()))
        } else {
            None
        };
        self.rollouts.retry.remove(id);
        let Some((why, commit, tree)) = target else { return Ok(()) };
        let ServiceId { kind, name } = id;
        match self.is_current(id, state).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::debug!(%kind, %name, commit = %state.commit, "rollout state of a commit the service no longer announces; ignored");
                return Ok(());
            }
            Err(e) => {
                tracing::warn!(%kind, %name, commit = %state.commit, error = %e, "cannot read the service's head to act on its rollout; trying again");
                self.rollouts.retry.insert(id.clone());
                return Ok(());
            }
        }
        let (Some(commit), Some(tree)) = (commit, tree) else {
            if why == Move::Reverted {
                tracing::warn!(%kind, %name, commit = %state.commit, "rollout halted, but it names no previous commit to go back to; keeping the commit");
            }
            return Ok(());
        };
        if why == Move::Reverted {
            let reason = self.halt_reason(state);
            tracing::warn!(%kind, %name, commit = %state.commit, previous = %commit, %reason, "rollout halted: going back to the previous commit");
        }
        self.move_to(id, state, why, commit, tree).await
    }

    /// Whether `state` is the rollout of the commit the service announces now: a
    /// rollout state stays on its subject after the service moved on (its policy
    /// removed, the service removed), and must then move nothing. Known without the bus
    /// when an update of that commit is held here.
    async fn is_current(&self, id: &ServiceId, state: &RolloutState) -> Result<bool, crate::bus::ReadError> {
        if self.rollouts.held.get(id).is_some_and(|h| h.update.to.as_deref() == Some(state.commit.as_str())) {
            return Ok(true);
        }
        let head = self.reader.head(id).await?;
        Ok(head.is_some_and(|head| head.commit.as_deref() == Some(state.commit.as_str())))
    }

    /// Why a halted rollout halted, for the report of a host that went back.
    fn halt_reason(&self, state: &RolloutState) -> String {
        let base = format!("rollout of {} halted", state.commit);
        match (&state.reason, state.unhealthy.get(&self.config.host_id)) {
            (Some(reason), _) => format!("{base}: {reason}"),
            (None, Some(mine)) => format!("{base}: this host was unhealthy: {mine}"),
            (None, None) => base,
        }
    }

    /// Builds `commit` (tree `tree`) of `id` from its objects and switches to it the
    /// usual way, then hands `--exec` over; a failure is tried again later.
    async fn move_to(
        &mut self,
        id: &ServiceId,
        state: &RolloutState,
        why: Move,
        commit: &str,
        tree: &str,
    ) -> Result<(), SubscriberError> {
        let ServiceId { kind, name } = id;
        let like = self.announced_as(id, state, commit).await;
        let built = match self.reader.commit_snapshot(&like, commit, tree).await {
            Ok(update) => self.apply(&update, None).await.map(|()| update),
            Err(e) => Err(e.into()),
        };
        let update = match built {
            Ok(update) => update,
            Err(UpdateError::Refused(refusal)) => {
                self.refuse(id, &refusal).await;
                return Ok(());
            }
            Err(e) => {
                tracing::warn!(%kind, %name, %commit, error = %e, "cannot take the commit the rollout asks for; trying again");
                self.rollouts.retry.insert(id.clone());
                return Ok(());
            }
        };
        // A held update of this commit is handled now: the position moves past it.
        let held = self.rollouts.held.get(id).filter(|h| h.update.to.as_deref() == Some(commit)).and_then(|h| h.seq);
        let seq = held.unwrap_or(self.state(id).seq).max(self.state(id).seq);
        // Taking the previous commit keeps the staged one held: it is what the host waits for.
        self.record_at(id, Applied::of(&update), seq).await?;
        tracing::info!(%kind, %name, %commit, reason = ?why, "applied for the rollout");
        if why == Move::Reverted {
            let health =
                Health { at_ms: now_ms(), reason: Some(self.halt_reason(state)), state: HealthState::Reverted };
            self.rollouts.reverted.insert(id.clone(), (commit.to_owned(), health.clone()));
            self.report_judged(id, Some(commit.to_owned()), None, None, Some(health)).await;
        }
        self.flush_execs();
        Ok(())
    }

    /// The update `commit` of `id` is applied as (its ref, branch and version): the held
    /// one if it is of that commit, else the service's head, else the rollout's ref.
    async fn announced_as(&self, id: &ServiceId, state: &RolloutState, commit: &str) -> ServiceUpdate {
        if let Some(held) = self.rollouts.held.get(id).filter(|h| h.update.to.as_deref() == Some(commit)) {
            return held.update.clone();
        }
        let head = self.reader.head(id).await.ok().flatten();
        let (branch, version) = match &head {
            Some(head) => (head.branch.clone(), head.version.clone()),
            None => (String::new(), "latest".to_owned()),
        };
        ServiceUpdate {
            v: confcast_schemas::WIRE_VERSION,
            dc: self.config.dc.clone(),
            kind: id.kind,
            name: id.name.clone(),
            ref_name: state.ref_name.clone(),
            branch,
            version,
            from: None,
            to: Some(commit.to_owned()),
            tree: None,
            snapshot: true,
            entries: Vec::new(),
            event_seq: 0,
            pushed_at_ms: 0,
            published_at_ms: 0,
            staged: false,
        }
    }

    /// Acts again on the rollout states whose move failed.
    pub(crate) async fn retry_rollouts(&mut self) -> Result<(), SubscriberError> {
        for id in std::mem::take(&mut self.rollouts.retry) {
            if let Some(state) = self.rollouts.states.get(&id).cloned() {
                self.follow_rollout(&id, &state).await?;
            }
        }
        Ok(())
    }

    /// Whether some followed service's commit bakes in its wave and there is a
    /// `--health-cmd` to watch it with.
    pub(crate) fn baking(&self) -> bool {
        self.config.notify.checks.health.is_some() && self.rollouts.states.values().any(|s| s.phase == Phase::Rolling)
    }

    /// Runs `--health-cmd`, in the background, for every service whose commit bakes in
    /// its wave on this host (its `--exec` done, no run already under way).
    pub(crate) fn judge_bakes(&mut self) {
        let mut due = Vec::new();
        for (id, rollout) in &self.rollouts.states {
            let state = self.state(id);
            if rollout.phase != Phase::Rolling
                || state.commit.as_deref() != Some(rollout.commit.as_str())
                || state.exec_pending
                || self.refused(id).is_some()
                || self.rollouts.judging.contains(id)
            {
                continue;
            }
            due.push((id.clone(), rollout.commit.clone(), state.ref_name));
        }
        for (id, commit, ref_name) in due {
            self.rollouts.judging.insert(id.clone());
            let (checks, dir, sender) =
                (self.config.notify.checks.clone(), self.config.dir.join(&id.name), self.rollouts.judged_tx.clone());
            tokio::spawn(async move {
                let change = Change { service: &id, commit: Some(&commit), ref_name: &ref_name, dir: &dir };
                if let Some(health) = checks.health(&change).await {
                    let _ = sender.send(Judged { id: id.clone(), commit: commit.clone(), health });
                }
            });
        }
    }

    /// A verdict of `--health-cmd` during a bake: reported when it differs from the last
    /// one, and the commit is still in place.
    pub(crate) async fn bake_judged(&mut self, judged: Judged) {
        let Judged { id, commit, health } = judged;
        self.rollouts.judging.remove(&id);
        if self.state(&id).commit.as_deref() != Some(commit.as_str()) || self.refused(&id).is_some() {
            return;
        }
        let last = self.live.service(&id.to_string()).unwrap_or_default();
        if last.health.as_ref().map(|h| h.state) == Some(health.state) {
            return;
        }
        let ServiceId { kind, name } = &id;
        let reason = health.reason.as_deref().and_then(|r| r.lines().next()).unwrap_or_default();
        if health.is_healthy() {
            tracing::info!(%kind, %name, %commit, "healthy again while the rollout wave bakes");
        } else {
            self.live.metrics.error("health");
            tracing::warn!(%kind, %name, %commit, reason, "unhealthy while the rollout wave bakes");
        }
        self.report_judged(&id, Some(commit), last.error, None, Some(health)).await;
    }
}
