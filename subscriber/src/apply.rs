//! Bringing services up to date: updates from the stream, applied together as one step
//! ([`batch`]), a service's snapshot (at start, after a gap, on retry), or its removal
//! from this host.
//!
//! Building the tree is [`crate::materialize`]'s; this decides what to build from, what
//! the position records after it, and what is said and reported when it fails. Every
//! new tree is shown to `--check-cmd` before it goes live ([`check`]). The current tree
//! stays in place whatever fails, and whatever the check refuses. A staged commit (one
//! rolled out in waves) is applied only once its wave releases this host
//! ([`crate::rollout`]); until then the service is held ([`Outcome::Held`]).

mod batch;
mod check;

pub(crate) use batch::{gather, Gathered};
pub(crate) use check::{Refusal, Refused};

use std::collections::BTreeMap;
use std::time::Instant;

use async_nats::jetstream::stream;
use confcast_schemas::message::now_ms;
use confcast_schemas::{decode, subject, ServiceId, ServiceUpdate};

use crate::bus::ReadError;
use crate::host::{Host, SubscriberError};
use crate::live::ServiceLabel;
use crate::materialize::{self, ApplyError, Staged, Start};
use crate::position::ServiceState;
use crate::rollout::Admitted;
use crate::schedule::Job;
use crate::selection::Removal;

/// Why a service could not be brought up to date.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UpdateError {
    /// The tree could not be built or switched to.
    #[error(transparent)]
    Apply(#[from] ApplyError),
    /// What to build could not be read from the bus.
    #[error(transparent)]
    Read(#[from] ReadError),
    /// The relay published no snapshot of the service.
    #[error("no snapshot to resync from")]
    NoSnapshot,
    /// A diff whose base tree is not on this host.
    #[error("the tree this update starts from is not on disk")]
    NoBase,
    /// The update stream's position cannot be read.
    #[error("update stream: {0}")]
    StreamInfo(#[source] async_nats::jetstream::context::RequestError),
    /// The build panicked.
    #[error("the build panicked: {0}")]
    Panicked(#[source] tokio::task::JoinError),
    /// `--check-cmd` refused the new tree: the service stays where it is, and is not
    /// retried.
    #[error(transparent)]
    Refused(#[from] Refusal),
}

/// What became of one message.
pub(crate) enum Outcome {
    /// This commit is now in place (the update's, or a newer snapshot's).
    Applied(Applied),
    Removed,
    Skipped,
    /// A staged commit this host's wave does not release yet: the service stays where it
    /// stands (its position does not move past the update), or, with nothing in place,
    /// takes the commit before it (`Some`).
    Held(Option<Applied>),
}

/// The identity of what was applied.
#[derive(Debug, Clone)]
pub(crate) struct Applied {
    pub(crate) commit: Option<String>,
    tree: Option<String>,
    ref_name: String,
    version: String,
}

impl Applied {
    /// The host's state once this is in place, its exec still to run.
    fn into_state(self, seq: u64) -> ServiceState {
        ServiceState {
            commit: self.commit,
            tree: self.tree,
            ref_name: self.ref_name,
            version: self.version,
            seq,
            exec_pending: true,
            applied_at_ms: Some(now_ms()),
        }
    }

    pub(crate) fn of(update: &ServiceUpdate) -> Applied {
        Applied {
            commit: update.to.clone(),
            tree: update.tree.clone(),
            ref_name: update.ref_name.clone(),
            version: update.version.clone(),
        }
    }
}

/// Where a step of the update stream comes from: for the position, logs and reports.
pub(crate) struct Origin {
    /// The stream sequence of the update.
    seq: u64,
    /// When its push reached the master.
    pushed_at_ms: u64,
    /// When the host started on it.
    started: Instant,
    /// The ref and commit it announces, for what is said when it fails.
    ref_name: String,
    commit: Option<String>,
}

impl Origin {
    fn of(update: &ServiceUpdate, seq: u64, started: Instant) -> Origin {
        Origin {
            seq,
            pushed_at_ms: update.pushed_at_ms,
            started,
            ref_name: update.ref_name.clone(),
            commit: update.to.clone(),
        }
    }
}

impl Host {
    /// The update a message of the stream holds, if it is one for this host: a forged
    /// one is refused and reported, an unreadable one or one that does not match its
    /// subject is said and skipped.
    async fn read_update(&mut self, message: &async_nats::Message) -> Option<ServiceUpdate> {
        let payload = match self.reader.payload(&message.subject, message.headers.as_ref(), &message.payload).await {
            Ok(p) => p,
            Err(e) if e.is_forged() => {
                tracing::error!(subject = %message.subject, error = %e, "refusing update; keeping the current configuration");
                self.live.metrics.error("signature");
                if let Some((kind, name)) = subject::parse_update_subject(&self.config.dc, &message.subject) {
                    let id = ServiceId::new(kind, name);
                    if self.services.contains(&id) {
                        let commit = self.state(&id).commit;
                        self.report(&id, commit, Some(e.to_string()), None).await;
                    }
                }
                return None;
            }
            Err(e) => {
                tracing::error!(subject = %message.subject, error = %e, "cannot read update; it will be recovered from the snapshot");
                return None;
            }
        };
        let update: ServiceUpdate = match decode(&payload) {
            Ok(u) => u,
            Err(e) => {
                tracing::error!(subject = %message.subject, error = %e, "ignoring unreadable message on the update stream");
                return None;
            }
        };
        let (kind, name) = (update.kind, &update.name);
        if update.dc != self.config.dc
            || message.subject.as_str() != subject::update_subject(&self.config.dc, kind, name)
            || !self.services.contains(&ServiceId::new(kind, name.clone()))
        {
            tracing::error!(subject = %message.subject, dc = %update.dc, %kind, %name, "ignoring update whose content does not match its subject");
            return None;
        }
        Some(update)
    }

    /// Records what became of an update from the stream; saved by
    /// [`Host::persist`], after the exec is submitted (the API is woken then).
    fn handled(&mut self, id: &ServiceId, mut state: ServiceState, outcome: Outcome, origin: &Origin) {
        let moved = matches!(outcome, Outcome::Applied(_) | Outcome::Removed | Outcome::Held(Some(_)));
        let seq = origin.seq;
        match outcome {
            // The position stays before the held update: a restart replays it.
            Outcome::Held(None) => return,
            Outcome::Held(Some(previous)) => state = previous.into_state(state.seq),
            Outcome::Applied(applied) => {
                state = applied.into_state(seq);
                let lag = now_ms().saturating_sub(origin.pushed_at_ms);
                self.live.metrics.push_to_apply_seconds.observe(lag as f64 / 1000.0);
                let ServiceId { kind, name } = id;
                tracing::info!(%kind, %name, commit = state.commit.as_deref().unwrap_or(""), apply_ms = origin.started.elapsed().as_millis() as u64, push_to_apply_ms = lag, "applied");
            }
            Outcome::Removed => {
                state = ServiceState {
                    commit: None,
                    tree: None,
                    seq,
                    exec_pending: true,
                    applied_at_ms: Some(now_ms()),
                    ..state
                };
            }
            Outcome::Skipped => state.seq = seq,
        }
        self.position.services.insert(id.clone(), state);
        self.unsaved += 1;
        if moved {
            let commit = self.state(id).commit;
            self.rollout_moved(id, commit.as_deref());
            self.forget_refusal(id);
            self.submitted.remove(id);
            self.changed.push(id.clone());
        }
    }

    /// Brings `id` to its snapshot for an update of the stream that cannot be applied
    /// as it is (a gap, a removal, a failed build), and records the outcome; when that
    /// fails too, says so, reports it and leaves the service to [`Host::retry_failed`]
    /// (unless `--check-cmd` refused the snapshot: the update is then handled, the
    /// service left where it stands). Whether the service's tree changed.
    async fn resync_for(&mut self, id: &ServiceId, origin: &Origin) -> bool {
        let state = self.state(id);
        match self.resync(id, &state).await {
            Ok(outcome) => {
                let moved = matches!(outcome, Outcome::Applied(_) | Outcome::Removed | Outcome::Held(Some(_)));
                self.handled(id, state, outcome, origin);
                moved
            }
            Err(UpdateError::Refused(refusal)) => {
                self.refuse(id, &refusal).await;
                self.handled(id, state, Outcome::Skipped, origin);
                false
            }
            Err(e) => {
                let commit = origin.commit.as_deref().unwrap_or("-");
                let ServiceId { kind, name } = id;
                tracing::error!(%kind, %name, %commit, ref_name = %origin.ref_name, error = %e, "update refused; keeping the current configuration");
                self.live.metrics.error("apply");
                let problem = format!("{} at {commit}: {e}", origin.ref_name);
                self.report(id, state.commit, Some(problem), None).await;
                self.failed.insert(id.clone());
                false
            }
        }
    }

    /// Retries services whose update failed, from their snapshot.
    pub(crate) async fn retry_failed(&mut self) -> Result<(), SubscriberError> {
        for id in std::mem::take(&mut self.failed) {
            let state = self.state(&id);
            let ServiceId { kind, name } = &id;
            match self.resync(&id, &state).await {
                Ok(Outcome::Applied(applied) | Outcome::Held(Some(applied))) => {
                    tracing::info!(%kind, %name, commit = applied.commit.as_deref().unwrap_or(""), "applied on retry");
                    self.record(&id, applied).await?;
                }
                Ok(Outcome::Removed) => {
                    let entry = self.position.services.entry(id.clone()).or_default();
                    entry.commit = None;
                    entry.tree = None;
                    entry.exec_pending = true;
                    self.forget_refusal(&id);
                    self.save().await?;
                }
                Ok(Outcome::Skipped | Outcome::Held(None)) => {}
                // Refused: not retried (a commit refused before is not even checked).
                Err(UpdateError::Refused(refusal)) => self.refuse(&id, &refusal).await,
                Err(e) => {
                    tracing::debug!(%kind, %name, error = %e, "retry failed");
                    self.failed.insert(id);
                }
            }
        }
        Ok(())
    }

    /// Records a state reached outside the update stream (resync, restore) and marks
    /// its exec as due; the stream position is left where it is.
    pub(crate) async fn record(&mut self, id: &ServiceId, applied: Applied) -> Result<(), SubscriberError> {
        let seq = self.state(id).seq;
        self.record_at(id, applied, seq).await
    }

    /// [`Host::record`], the stream position moved to `seq` (a held update now handled).
    pub(crate) async fn record_at(
        &mut self,
        id: &ServiceId,
        applied: Applied,
        seq: u64,
    ) -> Result<(), SubscriberError> {
        self.rollout_moved(id, applied.commit.as_deref());
        self.position.services.insert(id.clone(), applied.into_state(seq));
        self.save().await?;
        self.forget_refusal(id);
        self.submitted.remove(id);
        self.live.applied(id);
        Ok(())
    }

    /// Brings `id` to its latest snapshot, or removes it if that says removed.
    pub(crate) async fn resync(&mut self, id: &ServiceId, state: &ServiceState) -> Result<Outcome, UpdateError> {
        let snapshot = self.reader.snapshot(id).await?.ok_or(UpdateError::NoSnapshot)?;
        if snapshot.is_removal() {
            let why = Removal::Datacenter { dc: self.config.dc.clone() };
            return if state.commit.is_some() { Ok(self.remove(id, &why)?) } else { Ok(Outcome::Skipped) };
        }
        if snapshot.to == state.commit {
            return Ok(Outcome::Skipped);
        }
        if let Some(commit) = snapshot.to.as_ref().filter(|c| self.refused_before(id, Some(c))) {
            return Err(Refusal::Before { commit: commit.clone() }.into());
        }
        match self.admit(id, state.commit.as_deref(), &snapshot, None).await? {
            Admitted::Take => {
                self.apply(&snapshot, None).await?;
                Ok(Outcome::Applied(Applied::of(&snapshot)))
            }
            Admitted::Held => Ok(Outcome::Held(None)),
            Admitted::Instead(previous) => {
                self.apply(&previous, None).await?;
                Ok(Outcome::Held(Some(Applied::of(&previous))))
            }
        }
    }

    pub(crate) async fn apply(&self, update: &ServiceUpdate, current: Option<&str>) -> Result<(), UpdateError> {
        let started = Instant::now();
        self.build_and_switch(update, current).await?;
        let metrics = &self.live.metrics;
        metrics.applied.get_or_create(&ServiceLabel::of(&update.service())).inc();
        metrics.apply_seconds.observe(started.elapsed().as_secs_f64());
        Ok(())
    }

    /// Builds, flushes, checks and switches to `update`'s tree on its own (a snapshot,
    /// or a diff from `current`).
    async fn build_and_switch(&self, update: &ServiceUpdate, current: Option<&str>) -> Result<(), UpdateError> {
        let id = update.service();
        let staged = self.stage(update, current, None).await?;
        let (layout, materializer) = (self.config.layout(&id), self.materializer.clone());
        let (dirs, _) = tokio::task::spawn_blocking(move || materializer.flush(vec![staged]))
            .await
            .map_err(UpdateError::Panicked)??;
        let applied = Applied::of(update);
        for dir in &dirs {
            self.check(&id, &applied, dir).await?;
        }
        let switched = layout.clone();
        tokio::task::spawn_blocking(move || dirs.iter().try_for_each(|dir| materialize::switch(&switched, dir)))
            .await
            .map_err(UpdateError::Panicked)??;
        self.prune(layout);
        Ok(())
    }

    /// Builds and verifies `update`'s tree beside the current one, from the tree of
    /// `base` for a diff, recycling `spare` if given (see [`Start`]); not flushed.
    async fn stage(
        &self,
        update: &ServiceUpdate,
        base: Option<&str>,
        spare: Option<&str>,
    ) -> Result<Staged, UpdateError> {
        let objects = self.reader.objects(update).await?;
        let layout = self.config.layout(&update.service());
        let base = base.filter(|c| layout.tree_dir(c).is_dir()).map(str::to_owned);
        if !update.snapshot && base.is_none() {
            return Err(UpdateError::NoBase);
        }
        let (update, spare, materializer) = (update.clone(), spare.map(str::to_owned), self.materializer.clone());
        let staged = tokio::task::spawn_blocking(move || {
            let start = Start { base: base.as_deref(), spare: spare.as_deref() };
            materializer.stage(&layout, start, &update, &objects)
        })
        .await
        .map_err(UpdateError::Panicked)??;
        Ok(staged)
    }

    /// Deletes the service's trees beyond those kept, in the background: deleting an
    /// old tree costs as much as building one, so it stays off the path to `--exec`.
    /// It never touches the current tree, which the next update builds from.
    fn prune(&self, layout: materialize::Layout) {
        let materializer = self.materializer.clone();
        tokio::task::spawn_blocking(move || materializer.prune(&layout));
    }

    /// Takes `<dir>/<name>` off this host, saying why at WARN.
    fn remove(&self, id: &ServiceId, why: &Removal) -> Result<Outcome, ApplyError> {
        let ServiceId { kind, name } = id;
        let link = self.config.dir.join(name);
        tracing::warn!(%kind, %name, "removing {kind} {name} ({}) from this host: {why}", link.display());
        materialize::unlink(&self.config.layout(id))?;
        self.live.metrics.applied.get_or_create(&ServiceLabel::of(id)).inc();
        Ok(Outcome::Removed)
    }

    /// Takes off this host the services in `leaving`, each for the reason given, and
    /// forgets followed services that never had anything in place. A service with a tree
    /// on the host that nothing explicit took away stays as it is.
    pub(crate) async fn leave(&mut self, leaving: &BTreeMap<ServiceId, Removal>) -> Result<(), SubscriberError> {
        let gone: Vec<ServiceId> =
            self.position.services.keys().filter(|id| !self.services.contains(id)).cloned().collect();
        for id in gone {
            let ServiceId { kind, name } = &id;
            if self.state(&id).commit.is_none() {
                self.position.services.remove(&id);
                // Its last report said it was missing: it is simply not followed any more.
                if self.live.service(&id.to_string()).is_some_and(|live| live.error.is_some()) {
                    self.report(&id, None, None, None).await;
                }
                continue;
            }
            let Some(why) = leaving.get(&id) else {
                tracing::warn!(%kind, %name, "{kind} {name} is no longer followed but nothing said it leaves this host; keeping it");
                continue;
            };
            if let Err(e) = self.remove(&id, why) {
                tracing::error!(%kind, %name, error = %e, "cannot remove service that left this host");
                continue;
            }
            self.position.services.remove(&id);
            self.forget_refusal(&id);
            self.save().await?;
            let dir = self.config.dir.join(name);
            self.scheduler.submit(Job { service: id, dir, commit: None, ref_name: String::new() });
        }
        Ok(())
    }

    /// Brings every service in `services` without a position (or whose link and position
    /// disagree) to its snapshot, retrying each until it succeeds; `false` on shutdown.
    pub(crate) async fn bootstrap_all(
        &mut self,
        stream: &stream::Stream,
        services: &[ServiceId],
        shutdown: &tokio_util::sync::CancellationToken,
    ) -> bool {
        let mut failing = confcast_schemas::retry::Warnings::default();
        for id in services {
            while let Err(e) = self.bootstrap(stream, id).await {
                if failing.due() {
                    tracing::warn!(kind = %id.kind, name = %id.name, error = %e, "bootstrap failed, retrying");
                }
                tokio::select! { () = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}, () = shutdown.cancelled() => return false }
            }
        }
        true
    }

    async fn bootstrap(&mut self, stream: &stream::Stream, id: &ServiceId) -> Result<(), UpdateError> {
        let state = self.state(id);
        let layout = self.config.layout(id);
        let intact = match &state.commit {
            Some(commit) => layout.current().is_some_and(|p| p.ends_with(commit)),
            None => true,
        };
        if self.position.services.contains_key(id) && intact {
            return Ok(());
        }
        // Read the stream's position before the snapshot: anything published after it
        // is replayed, and replaying what the snapshot already holds is a no-op.
        let mut info = stream.clone();
        let last = info.info().await.map_err(UpdateError::StreamInfo)?.state.last_sequence;
        let mut fresh = ServiceState { seq: last, ..ServiceState::default() };
        if let Some(mut snapshot) = self.reader.snapshot(id).await? {
            // A staged commit not released here: the service keeps its position (its
            // held update is replayed after a restart), or starts from the stream's
            // end if it had none, and takes the commit before it if nothing is in place.
            let held_seq = if self.position.services.contains_key(id) { state.seq } else { last };
            let mut seq = last;
            match self.admit(id, state.commit.as_deref(), &snapshot, None).await? {
                Admitted::Take => {}
                Admitted::Held => {
                    self.position.services.insert(id.clone(), ServiceState { seq: held_seq, ..state });
                    return Ok(());
                }
                Admitted::Instead(previous) => {
                    snapshot = *previous;
                    seq = held_seq;
                }
            }
            if snapshot.to.is_some() {
                match self.apply(&snapshot, None).await {
                    Ok(()) => {
                        fresh = Applied::of(&snapshot).into_state(seq);
                        self.forget_refusal(id);
                        let ServiceId { kind, name } = id;
                        tracing::info!(%kind, %name, commit = snapshot.to.as_deref().unwrap_or(""), "bootstrapped from snapshot");
                    }
                    // What is in place, if anything, stays; the service waits on the
                    // stream for its next commit.
                    Err(UpdateError::Refused(refusal)) => {
                        self.refuse(id, &refusal).await;
                        fresh = ServiceState { seq: last, ..state };
                    }
                    Err(e) => {
                        self.report(id, state.commit.clone(), Some(e.to_string()), None).await;
                        return Err(e);
                    }
                }
            }
        }
        self.position.services.insert(id.clone(), fresh);
        Ok(())
    }
}
