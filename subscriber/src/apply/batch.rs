//! Applying what the update stream has delivered as one step.
//!
//! The follow loop ([`crate::host`]) takes every message the consumer already holds
//! ([`gather`]: at most [`MAX_BATCH`], waiting only for what the stream says is
//! pending), and they are applied together: each update is built
//! and verified beside its service's current tree, in stream order
//! ([`crate::materialize::Materializer::stage`]); then one `syncfs(2)` per file system
//! makes every one of them durable; then `--check-cmd`, if given, looks at every new
//! tree, all at once; then each service's link is switched. The loop then hands
//! `--exec` over once per service, for the state it ends in, and saves the position
//! once. A single update is a batch of one, at the same cost as ever.
//!
//! Several updates of one service in a batch are applied one after the other, each to
//! the tree the one before built (never switched to), each verified against its own
//! tree id, and only the last tree is switched to. Composing their diffs into one,
//! from the first `from` to the last `to`, would save building the trees in between,
//! but a composed diff is a new thing to get right (a path modified then renamed,
//! deleted then added back) that no tree id checks on the way. Building each costs
//! what its diff changes (each recycles the tree built before the one before it,
//! which nothing reads), and such chains only happen when a host catches up.
//!
//! Per service the step is atomic, as for a lone update. A service whose update cannot
//! be built, flushed or switched falls back to its snapshot on its own, as a lone
//! update does, and the others go on. A service whose last tree the check refuses is
//! not switched: it stays where it stands, its updates handled, and the others switch
//! (only the tree a service ends at is checked: the ones before it never go live).
//! Nothing of the batch enters the position before its tree is switched to, and the
//! position is saved only after the switches, so a crash at any point replays what is
//! not in place: it is never skipped.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer};
use confcast_schemas::{ServiceId, ServiceUpdate};
use futures::{FutureExt, StreamExt};

use super::{Applied, Origin, Outcome, UpdateError};
use crate::host::Host;
use crate::live::ServiceLabel;
use crate::materialize::{self, ApplyError, Staged};
use crate::rollout::Admitted;

/// At most this many messages of the update stream are applied in one step.
pub(crate) const MAX_BATCH: usize = 256;

/// While the stream says more messages are pending, how long to wait for the next one
/// before applying what came (they are on the server already: they come at once unless
/// the consumer is being recreated).
const PENDING_IDLE: Duration = Duration::from_millis(50);

/// The longest a batch is gathered for, from its first message.
const GATHER_AT_MOST: Duration = Duration::from_millis(250);

/// Messages of the update stream to apply as one step.
pub(crate) struct Gathered {
    /// Each with its stream sequence.
    pub(crate) messages: Vec<(async_nats::Message, u64)>,
    /// Messages the stream had after the last one.
    pub(crate) pending: u64,
    /// The consumer's messages ended after these.
    pub(crate) ended: bool,
}

impl Gathered {
    fn add(&mut self, message: jetstream::Message) {
        let (seq, pending) = message.info().map(|i| (i.stream_sequence, i.pending)).unwrap_or((0, 0));
        self.pending = pending;
        self.messages.push((message.message, seq));
    }
}

/// `first` and the messages the consumer it came from holds after it, at most
/// [`MAX_BATCH`]. Never waits when the stream has nothing more pending, so a lone
/// update is applied at once; while it has, waits for them up to [`PENDING_IDLE`]
/// each and [`GATHER_AT_MOST`] in all.
pub(crate) async fn gather(first: jetstream::Message, consumer: Option<&mut consumer::pull::Ordered>) -> Gathered {
    let deadline = tokio::time::Instant::now() + GATHER_AT_MOST;
    let mut gathered = Gathered { messages: Vec::new(), pending: 0, ended: false };
    gathered.add(first);
    let Some(messages) = consumer else { return gathered };
    while gathered.messages.len() < MAX_BATCH {
        let next = if gathered.pending > 0 {
            let until = deadline.min(tokio::time::Instant::now() + PENDING_IDLE);
            tokio::time::timeout_at(until, messages.next()).await.ok()
        } else {
            messages.next().now_or_never()
        };
        match next {
            // Nothing more delivered yet.
            None => break,
            Some(Some(Ok(message))) => gathered.add(message),
            Some(Some(Err(e))) => {
                tracing::warn!(error = %e, "update stream error; the consumer recovers by itself");
                break;
            }
            Some(None) => {
                gathered.ended = true;
                break;
            }
        }
    }
    gathered
}

/// What to do with an update, given the commit its service stands at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plan {
    /// Already there (or nothing to remove).
    Skip,
    /// A diff from the commit in place, or a whole tree: build it.
    Build,
    /// Bring the service to its snapshot: a removal (carried out only if the snapshot
    /// says removed too, see `crate::selection`), or an update that does not start
    /// where the service stands (`gap`).
    Resync { gap: bool },
}

fn plan(update: &ServiceUpdate, have: Option<&str>) -> Plan {
    if update.is_removal() {
        return if have.is_none() { Plan::Skip } else { Plan::Resync { gap: false } };
    }
    if update.to.as_deref() == have {
        return Plan::Skip;
    }
    if update.snapshot || (update.from.is_some() && update.from.as_deref() == have) {
        return Plan::Build;
    }
    Plan::Resync { gap: true }
}

/// A service's tree built in this batch, not flushed nor switched to yet.
struct Pending {
    tree: Staged,
    /// What the tree is of.
    applied: Applied,
    /// The last update it holds.
    origin: Origin,
    /// The commit built before it in this batch, if any: a tree never switched to,
    /// which the next update of the service recycles.
    before: Option<String>,
    /// How many of the batch's updates it holds.
    updates: usize,
}

/// A service whose tree the batch built and flushed, on its way to being checked and
/// switched to.
struct Built {
    /// The service.
    id: ServiceId,
    /// What the tree is of.
    applied: Applied,
    /// The last update it holds.
    origin: Origin,
    /// How many of the batch's updates it holds.
    updates: usize,
}

/// What a batch did, for its log line.
#[derive(Debug, Default)]
struct Tally {
    /// Messages handed over.
    messages: usize,
    /// Updates now in place, in the services switched together.
    updates: usize,
    /// Services switched together.
    switched: usize,
    /// Services brought to their snapshot instead.
    resynced: usize,
    /// File systems flushed for the services switched together.
    flushes: usize,
    /// How long that took.
    flush_ms: u64,
}

impl Host {
    /// Applies `messages` of the update stream, each with its stream sequence, as one
    /// step (see the module docs). The position is left for the caller to save.
    pub(crate) async fn apply_batch(&mut self, messages: Vec<(async_nats::Message, u64)>) {
        let started = Instant::now();
        let mut tally = Tally { messages: messages.len(), ..Tally::default() };
        let mut pending: BTreeMap<ServiceId, Pending> = BTreeMap::new();
        for (message, seq) in messages {
            if let Some(update) = self.read_update(&message).await {
                self.take(&mut pending, &update, seq, &mut tally).await;
            }
        }
        self.switch_all(pending, &mut tally).await;
        let Tally { messages, updates, switched, resynced, flushes, flush_ms } = tally;
        let took_ms = started.elapsed().as_millis() as u64;
        if switched > 1 {
            tracing::info!(messages, updates, switched, resynced, flushes, flush_ms, took_ms, "applied batch");
        } else {
            tracing::debug!(messages, updates, switched, resynced, flushes, flush_ms, took_ms, "applied batch");
        }
    }

    /// Takes one update into the batch: builds its tree on what the service stands at
    /// (in place, or built earlier in this batch), or resyncs the service on its own.
    #[tracing::instrument(skip_all, fields(seq = seq))]
    async fn take(
        &mut self,
        pending: &mut BTreeMap<ServiceId, Pending>,
        update: &ServiceUpdate,
        seq: u64,
        tally: &mut Tally,
    ) {
        let id = update.service();
        let (have, have_seq, spare, started, updates) = match pending.get(&id) {
            Some(p) => (p.applied.commit.clone(), p.origin.seq, p.before.clone(), p.origin.started, p.updates),
            None => {
                let state = self.state(&id);
                (state.commit, state.seq, None, Instant::now(), 0)
            }
        };
        if seq <= have_seq {
            return;
        }
        let origin = Origin::of(update, seq, started);
        let ServiceId { kind, name } = &id;
        match plan(update, have.as_deref()) {
            Plan::Skip => match pending.get_mut(&id) {
                Some(p) => p.origin.seq = seq,
                None => self.handled(&id, self.state(&id), Outcome::Skipped, &origin),
            },
            Plan::Build if update.staged && !self.admitted(pending, &id, have.as_deref(), update, &origin).await => {}
            Plan::Build => match self.stage(update, have.as_deref(), spare.as_deref()).await {
                Ok(tree) => {
                    // The tree built before is one nothing reads, unless it is in place.
                    let before = have.filter(|_| pending.contains_key(&id));
                    let applied = Applied::of(update);
                    pending.insert(id, Pending { tree, applied, origin, before, updates: updates + 1 });
                }
                Err(e) => {
                    let commit = update.to.as_deref().unwrap_or("-");
                    tracing::warn!(%kind, %name, %commit, ref_name = %update.ref_name, error = %e, "update did not apply; resyncing from the snapshot");
                    self.resync_instead(pending, &id, &origin, tally).await;
                }
            },
            Plan::Resync { gap } => {
                if gap {
                    tracing::info!(%kind, %name, have = have.as_deref().unwrap_or("-"), from = update.from.as_deref().unwrap_or("-"), "gap before update; resyncing from the snapshot");
                }
                self.resync_instead(pending, &id, &origin, tally).await;
            }
        }
    }

    /// Whether the staged `update` of `id` may be built here (see [`crate::rollout`]).
    /// Held, it is left out of the batch and its position stays before it; with nothing
    /// in place, the commit before it is applied on its own meanwhile. A rollout state
    /// that cannot be read holds it too, said: the next update, a restart or the watch
    /// of the rollout states decides again.
    async fn admitted(
        &mut self,
        pending: &BTreeMap<ServiceId, Pending>,
        id: &ServiceId,
        have: Option<&str>,
        update: &ServiceUpdate,
        origin: &Origin,
    ) -> bool {
        let ServiceId { kind, name } = id;
        let commit = update.to.as_deref().unwrap_or("-");
        match self.admit(id, have, update, Some(origin.seq)).await {
            Ok(Admitted::Take) => true,
            Ok(Admitted::Held) => false,
            // Nothing in place, so nothing of it pending in this batch either.
            Ok(Admitted::Instead(previous)) if !pending.contains_key(id) => {
                let state = self.state(id);
                match self.apply(&previous, None).await {
                    Ok(()) => self.handled(id, state, Outcome::Held(Some(Applied::of(&previous))), origin),
                    Err(UpdateError::Refused(refusal)) => self.refuse(id, &refusal).await,
                    Err(e) => {
                        tracing::warn!(%kind, %name, %commit, error = %e, "cannot take the commit before the held one; retrying");
                        self.failed.insert(id.clone());
                    }
                }
                false
            }
            Ok(Admitted::Instead(_)) => false,
            Err(e) => {
                tracing::warn!(%kind, %name, %commit, error = %e, "cannot read the rollout state of a staged commit; holding it");
                false
            }
        }
    }

    /// Drops what the batch built for `id` and brings it to its snapshot, which is at
    /// least as new as any update of it seen (the relay publishes the snapshot first).
    async fn resync_instead(
        &mut self,
        pending: &mut BTreeMap<ServiceId, Pending>,
        id: &ServiceId,
        origin: &Origin,
        tally: &mut Tally,
    ) {
        pending.remove(id);
        if self.resync_for(id, origin).await {
            tally.resynced += 1;
        }
    }

    /// Flushes every tree the batch built at once, shows each to `--check-cmd` (all at
    /// once), then switches each service the check passed to its own and records it; a
    /// refused service stays where it stands, and one that fails falls back to its
    /// snapshot.
    async fn switch_all(&mut self, pending: BTreeMap<ServiceId, Pending>, tally: &mut Tally) {
        if pending.is_empty() {
            return;
        }
        let mut staged = Vec::with_capacity(pending.len());
        let mut services = Vec::with_capacity(pending.len());
        for (id, Pending { tree, applied, origin, updates, .. }) in pending {
            staged.push(tree);
            services.push(Built { id, applied, origin, updates });
        }
        let materializer = self.materializer.clone();
        let flushed = tokio::task::spawn_blocking(move || -> Result<_, ApplyError> {
            let flushing = Instant::now();
            let (dirs, flushes) = materializer.flush(staged)?;
            Ok((dirs, flushes, flushing.elapsed().as_millis() as u64))
        })
        .await
        .map_err(UpdateError::Panicked)
        .and_then(|flushed| flushed.map_err(UpdateError::from));
        let dirs = match flushed {
            Ok((dirs, flushes, flush_ms)) => {
                tally.flushes += flushes;
                tally.flush_ms += flush_ms;
                dirs
            }
            Err(e) => {
                // Nothing was switched: each service tries its snapshot, on its own.
                tracing::warn!(services = services.len(), error = %e, "flushing the batch failed; resyncing its services from their snapshots");
                self.resync_each(&services, tally).await;
                return;
            }
        };
        let checks = services.iter().zip(&dirs).map(|(built, dir)| self.check(&built.id, &built.applied, dir));
        let checked = futures::future::join_all(checks).await;
        let mut passed = Vec::with_capacity(services.len());
        let mut trees = Vec::with_capacity(services.len());
        for ((built, dir), checked) in services.into_iter().zip(dirs).zip(checked) {
            match checked {
                Ok(()) => {
                    trees.push((self.config.layout(&built.id), dir));
                    passed.push(built);
                }
                Err(refusal) => {
                    self.refuse(&built.id, &refusal).await;
                    self.handled(&built.id, self.state(&built.id), Outcome::Skipped, &built.origin);
                }
            }
        }
        if trees.is_empty() {
            return;
        }
        let switched = tokio::task::spawn_blocking(move || {
            trees.into_iter().map(|(layout, dir)| (materialize::switch(&layout, &dir), layout)).collect::<Vec<_>>()
        })
        .await;
        let results = match switched {
            Ok(results) => results,
            Err(e) => {
                tracing::warn!(services = passed.len(), error = %e, "switching the batch panicked; resyncing its services from their snapshots");
                self.resync_each(&passed, tally).await;
                return;
            }
        };
        for (Built { id, applied, origin, updates }, (result, layout)) in passed.into_iter().zip(results) {
            match result {
                Ok(()) => {
                    let metrics = &self.live.metrics;
                    metrics.applied.get_or_create(&ServiceLabel::of(&id)).inc();
                    metrics.apply_seconds.observe(origin.started.elapsed().as_secs_f64());
                    self.prune(layout);
                    tally.switched += 1;
                    tally.updates += updates;
                    self.handled(&id, self.state(&id), Outcome::Applied(applied), &origin);
                }
                Err(e) => {
                    let ServiceId { kind, name } = &id;
                    let commit = origin.commit.as_deref().unwrap_or("-");
                    tracing::warn!(%kind, %name, %commit, ref_name = %origin.ref_name, error = %e, "update did not apply; resyncing from the snapshot");
                    if self.resync_for(&id, &origin).await {
                        tally.resynced += 1;
                    }
                }
            }
        }
    }

    /// Brings each of `services` to its snapshot on its own.
    async fn resync_each(&mut self, services: &[Built], tally: &mut Tally) {
        for Built { id, origin, .. } in services {
            if self.resync_for(id, origin).await {
                tally.resynced += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use confcast_schemas::Kind;

    use super::*;

    fn update(from: Option<&str>, to: Option<&str>, snapshot: bool) -> ServiceUpdate {
        ServiceUpdate {
            v: confcast_schemas::WIRE_VERSION,
            dc: "dc1".into(),
            kind: Kind::Service,
            name: "web".into(),
            ref_name: "refs/heads/services/web/master".into(),
            branch: "master".into(),
            version: "latest".into(),
            from: from.map(str::to_owned),
            to: to.map(str::to_owned),
            tree: to.map(|_| "4b825dc642cb6eb9a060e54bf8d69288fbee4904".into()),
            snapshot,
            entries: Vec::new(),
            event_seq: 1,
            pushed_at_ms: 0,
            published_at_ms: 0,
            staged: false,
        }
    }

    #[test]
    fn an_update_builds_only_from_where_the_service_stands() {
        assert_eq!(plan(&update(Some("a"), Some("b"), false), Some("a")), Plan::Build);
        assert_eq!(plan(&update(None, Some("b"), true), Some("a")), Plan::Build);
        assert_eq!(plan(&update(None, Some("b"), true), None), Plan::Build);
        assert_eq!(plan(&update(Some("a"), Some("b"), false), Some("b")), Plan::Skip);
        assert_eq!(plan(&update(Some("x"), Some("b"), false), Some("a")), Plan::Resync { gap: true });
        assert_eq!(plan(&update(Some("a"), Some("b"), false), None), Plan::Resync { gap: true });
        assert_eq!(plan(&update(None, Some("b"), false), None), Plan::Resync { gap: true });
    }

    #[test]
    fn a_removal_is_checked_against_the_snapshot_unless_nothing_is_there() {
        assert_eq!(plan(&update(Some("a"), None, false), Some("a")), Plan::Resync { gap: false });
        assert_eq!(plan(&update(Some("a"), None, false), None), Plan::Skip);
    }
}
