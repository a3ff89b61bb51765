//! One sync: fetch what changed, resolve the datacenter from the mirror, publish the
//! difference to what was last published.
//!
//! Events are triggers, not instructions: for a relevant event the relay fetches the
//! ref, resolves from its mirror and publishes the difference to what it last
//! published. That makes every step idempotent: a redelivered event, a restart, or an
//! event replayed out of order converges on the master's state. A datacenter that
//! cannot be resolved (a bad document) keeps its last good pins.
//!
//! A sync resolves the whole datacenter when it starts, when the datacenter's document
//! or configuration was pushed, and after any sync that failed; a push of pinned refs
//! alone moves only the services pinned to them ([`followed`]), so a push costs the
//! relay what it changes, whatever the number of services.

mod followed;
mod last_good;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use confcast_schemas::{Inventory, ServiceHead, ServiceId, WIRE_VERSION};
use futures::StreamExt;

use crate::cause::Cause;
use crate::consul::index::Feed;
use crate::error::SyncError;
use crate::metrics::{fetched_bytes, packs, Metrics};
use crate::mirror::{Fetched, Mirror};
use crate::prepare::{prepare, PrepareError};
use crate::publish::Publisher;
use crate::resolve::{resolve, Pin, Resolution, Resolved, Target};
use crate::rollout::Rollouts;
use confcast_schemas::rollout::Policy;
use followed::Followed;

/// How many services the relay publishes at once.
const CONCURRENT_PUBLISHES: usize = 16;

/// The datacenter as its active relay sees it: what it published, the refs it depends
/// on, and how to reach the master and the bus.
pub(crate) struct Datacenter {
    pub(crate) dc: String,
    pub(crate) mirror: Mirror,
    publisher: Publisher,
    /// The last published head of every service.
    pub(crate) heads: BTreeMap<ServiceId, ServiceHead>,
    /// The refs the last resolution depended on: events for other refs are ignored.
    pub(crate) watched: BTreeSet<String>,
    inventory: Option<Inventory>,
    /// The writer of the index's copy in Consul, with `--consul`.
    consul: Option<Feed>,
    /// The index keys moved since they were last handed to `consul`: key → new value,
    /// or `None` for a key that goes.
    index_moves: BTreeMap<String, Option<Vec<u8>>>,
    /// The last good resolution while the syncs since the last full one succeeded:
    /// a push of only its pinned refs then moves just their services.
    followed: Option<Followed>,
    /// The datacenter's rollouts.
    rollouts: Arc<Rollouts>,
    /// Each service's rollout policy as last resolved, kept for the last-good fallback.
    pub(crate) policies: BTreeMap<ServiceId, Policy>,
    /// `datacenter.json`'s `rollout.after` as last resolved.
    pub(crate) after: Vec<String>,
    fetch_timeout: Duration,
    pub(crate) metrics: Arc<Metrics>,
    /// The mirror's pack directory, whose growth is what a fetch transferred.
    pack_dir: PathBuf,
}

/// What a sync did.
struct Synced {
    /// Updates published.
    published: usize,
    /// Services whose pins were followed again.
    resolved: usize,
    /// The datacenter could not be resolved: its last good pins were followed.
    last_good: bool,
}

/// A service's publication failed.
enum PublishError {
    /// Retried with the whole sync.
    Sync(SyncError),
    /// The tree is unsafe: reported, never published.
    BadTree(Box<crate::prepare::BadTree>),
}

impl From<SyncError> for PublishError {
    fn from(e: SyncError) -> Self {
        PublishError::Sync(e)
    }
}

impl From<crate::error::BusError> for PublishError {
    fn from(e: crate::error::BusError) -> Self {
        PublishError::Sync(e.into())
    }
}

impl Datacenter {
    /// The datacenter `config` names, as published (`heads`), reached through `mirror`
    /// and `publisher`.
    pub(crate) fn new(
        config: &crate::Config,
        mirror: Mirror,
        publisher: Publisher,
        heads: BTreeMap<ServiceId, ServiceHead>,
        rollouts: Arc<Rollouts>,
    ) -> Datacenter {
        Datacenter {
            dc: config.dc.clone(),
            mirror,
            publisher,
            heads,
            watched: BTreeSet::new(),
            inventory: None,
            consul: config.consul.clone().map(|client| Feed::start(client, &config.dc)),
            index_moves: BTreeMap::new(),
            followed: None,
            rollouts,
            policies: BTreeMap::new(),
            after: Vec::new(),
            fetch_timeout: config.fetch_timeout,
            metrics: config.metrics.clone(),
            pack_dir: config.mirror_dir().join("objects").join("pack"),
        }
    }

    /// Runs `f` on the mirror off the async runtime.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(Mirror) -> Result<T, SyncError> + Send + 'static,
    ) -> Result<T, SyncError> {
        let mirror = self.mirror.clone();
        tokio::task::spawn_blocking(move || f(mirror)).await?
    }

    /// Fetches `refs` into the mirror, failing after twice the fetch timeout even if the
    /// transport hangs (the stuck worker is abandoned; `git://` sockets time out by
    /// themselves).
    async fn fetch(&self, refs: BTreeSet<String>) -> Result<Fetched, SyncError> {
        let started = Instant::now();
        let packs_before = packs(&self.pack_dir);
        let result = self.mirror.fetch_within(refs, self.fetch_timeout * 2).await.map_err(SyncError::from);
        self.metrics.fetch_seconds.observe(started.elapsed().as_secs_f64());
        if result.is_ok() {
            self.metrics.fetched_bytes.inc_by(fetched_bytes(&packs_before, &packs(&self.pack_dir)));
        }
        result
    }

    /// Fetches `first`, then every newly depended-on ref, resolves, and publishes: only
    /// the services pinned to `first` when nothing else can have changed.
    #[tracing::instrument(skip_all, fields(dc = %self.dc, %cause))]
    pub(crate) async fn sync(&mut self, cause: &Cause, first: BTreeSet<String>) -> Result<(), SyncError> {
        let started = Instant::now();
        // Taken for the length of the sync: one that fails leaves none, and the next
        // resolves fully.
        let synced = match self.followed.take() {
            Some(followed) if followed.covers(&first) => {
                let (followed, synced) = self.sync_pinned(cause, followed, first).await?;
                self.followed = Some(followed);
                synced
            }
            _ => self.sync_all(cause, first).await?,
        };
        self.metrics.synced();
        let Synced { published, resolved, last_good } = synced;
        let elapsed_ms = started.elapsed().as_millis() as u64;
        if last_good {
            tracing::info!(published, elapsed_ms, "synced on the last good pins");
        } else {
            tracing::info!(published, resolved, elapsed_ms, "synced");
        }
        Ok(())
    }

    /// A sync of pinned refs only: fetches them and moves the services pinned to them.
    /// Returns the resolution moved.
    async fn sync_pinned(
        &mut self,
        cause: &Cause,
        mut followed: Followed,
        refs: BTreeSet<String>,
    ) -> Result<(Followed, Synced), SyncError> {
        let outcome = self.fetch(refs.clone()).await?;
        tracing::debug!(present = outcome.present.len(), missing = outcome.missing.len(), "fetched");
        let (followed, moved) = self
            .blocking(move |m| {
                let moved = followed.advance(&refs, &m)?;
                Ok((followed, moved))
            })
            .await?;
        let resolution = followed.resolution();
        self.report_unresolved(cause, moved.iter().filter_map(|s| resolution.unresolved.get_key_value(s))).await?;
        let targets = moved.iter().filter_map(|s| resolution.targets.get_key_value(s)).collect();
        let published = self.publish_changed(cause, targets).await?;
        self.index_to_consul(cause, false).await?;
        Ok((followed, Synced { published, resolved: moved.len(), last_good: false }))
    }

    /// A sync that resolves the whole datacenter, or falls back on the last good pins.
    async fn sync_all(&mut self, cause: &Cause, first: BTreeSet<String>) -> Result<Synced, SyncError> {
        let (resolved, fetched) = self.fetch_and_resolve(first).await?;
        let resolution = match resolved.outcome {
            Err(e) if e.is_transient() => return Err(e.into()),
            Err(e) => {
                tracing::error!(error = %e, "datacenter cannot be resolved; keeping the last good pins");
                self.publisher.error(cause, format!("{e}; keeping the last good configuration")).await?;
                let resolution = self.last_good(resolved.watched, &fetched).await?;
                let published = self.apply(cause, &resolution, false).await?;
                return Ok(Synced { published, resolved: resolution.targets.len(), last_good: true });
            }
            Ok(resolution) => resolution,
        };
        self.watched = resolved.watched;
        self.learn_policies(&resolution);
        let published = self.apply(cause, &resolution, true).await?;
        let resolved = resolution.targets.len() + resolution.unresolved.len();
        self.followed = Some(Followed::new(&self.dc, resolution));
        Ok(Synced { published, resolved, last_good: false })
    }

    /// Keeps the rollout policies of a good resolution, for the last-good fallback, and
    /// hands its `after` to the rollouts.
    fn learn_policies(&mut self, resolution: &Resolution) {
        let targets = resolution.targets.iter().map(|(s, t)| (s, &t.policy));
        let unresolved = resolution.unresolved.iter().map(|(s, p)| (s, &p.policy));
        self.policies = targets
            .chain(unresolved)
            .filter_map(|(service, policy)| Some((service.clone(), policy.clone()?)))
            .collect();
        self.after = resolution.after.clone();
        self.rollouts.set_after(self.after.clone());
    }

    /// Fetches `first`, resolves, and fetches again while the resolution names refs not
    /// yet fetched. Returns the resolution and the refs fetched.
    async fn fetch_and_resolve(&self, first: BTreeSet<String>) -> Result<(Resolved, BTreeSet<String>), SyncError> {
        let mut fetched: BTreeSet<String> = BTreeSet::new();
        let mut to_fetch = first;
        loop {
            if !to_fetch.is_empty() {
                let outcome = self.fetch(to_fetch.clone()).await?;
                tracing::debug!(present = outcome.present.len(), missing = outcome.missing.len(), "fetched");
                fetched.extend(to_fetch);
            }
            let dc = self.dc.clone();
            let resolved = self.blocking(move |m| Ok(resolve(&dc, &m))).await?;
            to_fetch = resolved
                .watched
                .iter()
                .filter(|r| !self.watched.contains(*r) && !fetched.contains(*r))
                .cloned()
                .collect();
            if to_fetch.is_empty() {
                return Ok((resolved, fetched));
            }
        }
    }

    /// Publishes what changed. `authoritative` is false for the last-good fallback:
    /// then nothing is removed and the inventory is left as it was.
    async fn apply(&mut self, cause: &Cause, resolution: &Resolution, authoritative: bool) -> Result<usize, SyncError> {
        self.report_unresolved(cause, resolution.unresolved.iter()).await?;
        let mut published = self.publish_changed(cause, resolution.targets.iter().collect()).await?;
        if authoritative {
            published += self.remove_dropped(cause, resolution).await?;
            let inventory = Inventory {
                v: WIRE_VERSION,
                dc: self.dc.clone(),
                conf_ref: resolution.conf_ref.clone(),
                hosts: resolution.hosts.clone(),
            };
            if self.inventory.as_ref() != Some(&inventory) {
                self.publisher.inventory(cause, &inventory).await?;
                self.inventory = Some(inventory);
            }
        }
        self.index_to_consul(cause, true).await?;
        Ok(published)
    }

    /// Reports every pin of `unresolved`, whose ref does not exist; the service keeps
    /// what was published.
    async fn report_unresolved(
        &self,
        cause: &Cause,
        unresolved: impl Iterator<Item = (&ServiceId, &Pin)>,
    ) -> Result<(), SyncError> {
        for (service, pin) in unresolved {
            let (kind, name, ref_name) = (service.kind, &service.name, &pin.ref_name);
            let kept = self.heads.get(service).and_then(|h| h.commit.clone());
            let message = match kept {
                Some(commit) => format!(
                    "{kind} {name:?} is pinned to {ref_name}, which does not exist on the master; keeping {commit}"
                ),
                None => format!(
                    "{kind} {name:?} is pinned to {ref_name}, which does not exist on the master; it is not published"
                ),
            };
            tracing::error!(%kind, %name, %ref_name, "{message}");
            self.publisher.error(cause, message).await?;
        }
        Ok(())
    }

    /// Publishes every service of `targets` whose commit changed, and moves the head of
    /// those whose files stayed but whose ref or version changed. Returns how many
    /// updates were published.
    async fn publish_changed(
        &mut self,
        cause: &Cause,
        targets: Vec<(&ServiceId, &Target)>,
    ) -> Result<usize, SyncError> {
        let mut changed = Vec::new();
        for (service, target) in targets {
            let head = self.heads.get(service);
            match head {
                Some(head) if head.commit.as_deref() == Some(target.commit.to_string().as_str()) => {
                    if head.ref_name != target.ref_name || head.version != target.version {
                        // Same files under another name: only the index and head move.
                        let (commit, tree) = (head.commit.clone(), head.tree.clone());
                        let moved = self.publisher.head(cause, service, Some(head), Some(target), commit, tree);
                        let moved = moved.await?;
                        self.set_head(service, moved);
                    }
                }
                _ => changed.push((service, target)),
            }
        }
        // Services are independent of each other: several are published at once (each
        // in its own order), which is what a burst of pushes needs.
        let this = &*self;
        let outcomes: Vec<_> = futures::stream::iter(changed.iter().map(|(service, target)| async move {
            (*service, *target, this.publish_service(cause, service, target).await)
        }))
        .buffered(CONCURRENT_PUBLISHES)
        .collect()
        .await;
        let mut failure = None;
        let mut published = 0;
        for (service, target, outcome) in outcomes {
            match outcome {
                Ok(head) => {
                    self.set_head(service, head);
                    published += 1;
                }
                Err(PublishError::Sync(e)) => failure = failure.or(Some(e)),
                Err(PublishError::BadTree(bad)) => {
                    let (kind, name) = (service.kind, &service.name);
                    tracing::error!(%kind, %name, commit = %target.commit, "{bad}");
                    self.publisher.error(cause, bad.to_string()).await?;
                }
            }
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(published),
        }
    }

    /// Publishes a service's new state (see [`Publisher::service`]), then reclaims the
    /// objects its tree no longer needs when enough have piled up
    /// ([`crate::reclaim`]). Takes `&self` so that several services are published at
    /// once.
    async fn publish_service(
        &self,
        cause: &Cause,
        service: &ServiceId,
        target: &Target,
    ) -> Result<ServiceHead, PublishError> {
        let head = self.heads.get(service).cloned();
        // The diff starts from the last head only if the bus holds all of its objects;
        // otherwise the whole tree is stored again.
        let ledger = &self.publisher.ledger;
        let base = match head.as_ref().and_then(|h| h.tree.as_deref()) {
            Some(tree) if ledger.complete(self.publisher.bus(), service, tree).await? => head.clone(),
            _ => None,
        };
        let (dc, job_cause, job_service, job_target) =
            (self.dc.clone(), cause.clone(), service.clone(), target.clone());
        let mut prepared = self
            .blocking(move |m| Ok(prepare(&m, &dc, &job_cause, &job_service, &job_target, base.as_ref())))
            .await?
            .map_err(|e| match e {
                PrepareError::Mirror(e) => PublishError::Sync(e.into()),
                PrepareError::BadTree(bad) => PublishError::BadTree(bad),
            })?;
        // The rollout state goes first: no host reads a staged update before it.
        let begun = self.rollouts.begin(service, target, prepared.update.tree.as_deref(), head.as_ref()).await?;
        prepared.update.staged = begun.staged;
        prepared.snapshot.staged = begun.staged;
        let published = self.publisher.service(cause, target, &prepared, head.as_ref()).await?;
        if ledger.published(service, prepared.replaced) {
            let tree = self.blocking({
                let commit = target.commit;
                move |m| Ok(m.tree_of(&commit)?)
            });
            let kept = self.rollouts.kept_tree(service).await.and_then(|t| gix::ObjectId::from_hex(t.as_bytes()).ok());
            let swept = match tree.await {
                Ok(tree) => {
                    crate::reclaim::sweep(ledger, self.publisher.bus(), &self.mirror, service, tree, kept).await
                }
                Err(e) => Err(e),
            };
            if let Err(e) = swept {
                let (kind, name) = (service.kind, &service.name);
                tracing::warn!(%kind, %name, error = %e, "could not reclaim old objects; trying again after the next push");
            }
        }
        Ok(published)
    }

    /// Publishes the removal of every service that left the datacenter.
    async fn remove_dropped(&mut self, cause: &Cause, resolution: &Resolution) -> Result<usize, SyncError> {
        let dropped: Vec<ServiceId> = self
            .heads
            .iter()
            .filter(|(service, head)| {
                head.commit.is_some()
                    && !resolution.targets.contains_key(*service)
                    && !resolution.unresolved.contains_key(*service)
            })
            .map(|(service, _)| service.clone())
            .collect();
        for service in &dropped {
            self.rollouts.removed(service).await?;
            let head = self.publisher.removal(cause, service, self.heads.get(service)).await?;
            self.set_head(service, head);
        }
        Ok(dropped.len())
    }

    /// Records a service's new head, and the index keys it moves for Consul.
    fn set_head(&mut self, service: &ServiceId, head: ServiceHead) {
        if self.consul.is_some() {
            if let Some((key, _)) = self.heads.get(service).and_then(|old| index_entry(&self.dc, old)) {
                self.index_moves.insert(key, None);
            }
            if let Some((key, value)) = index_entry(&self.dc, &head) {
                self.index_moves.insert(key, Some(value));
            }
        }
        self.heads.insert(service.clone(), head);
    }

    /// Hands the index to the Consul writer, once per handled batch so that all its
    /// changes reach Consul together: the keys moved since the last hand-over, or
    /// (`whole`, after a full resolution) the whole index as now published.
    async fn index_to_consul(&mut self, cause: &Cause, whole: bool) -> Result<(), SyncError> {
        let moves = std::mem::take(&mut self.index_moves);
        let Some(consul) = &mut self.consul else { return Ok(()) };
        let refused = if whole {
            consul.update(self.heads.values().filter_map(|h| index_entry(&self.dc, h)).collect())
        } else {
            consul.change(moves)
        };
        for refused in refused {
            tracing::error!("{refused}");
            self.publisher.error(cause, refused).await?;
        }
        Ok(())
    }
}

/// The index key and value of `head` in datacenter `dc`; `None` once it was removed.
fn index_entry(dc: &str, head: &ServiceHead) -> Option<(String, Vec<u8>)> {
    let value = head.index_value()?;
    Some((confcast_schemas::subject::index_key(dc, head.kind, &head.name, &head.version), value.into_bytes()))
}
