//! One sync: fetch what changed, resolve the datacenter from the mirror, publish the
//! difference to what was last published.
//!
//! Events are triggers, not instructions: for a relevant event the relay fetches the
//! ref, re-resolves the whole datacenter from its mirror and publishes the difference
//! to what it last published. That makes every step idempotent: a redelivered event, a
//! restart, or an event replayed out of order converges on the master's state. A
//! datacenter that cannot be resolved (a bad document) keeps its last good pins.

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
use crate::mirror::{Fetched, Mirror, MirrorError};
use crate::prepare::{prepare, PrepareError};
use crate::publish::Publisher;
use crate::resolve::{resolve, RefSource, Resolution, Resolved, Target};

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
    fetch_timeout: Duration,
    pub(crate) metrics: Arc<Metrics>,
    /// The mirror's pack directory, whose growth is what a fetch transferred.
    pack_dir: PathBuf,
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
    ) -> Datacenter {
        Datacenter {
            dc: config.dc.clone(),
            mirror,
            publisher,
            heads,
            watched: BTreeSet::new(),
            inventory: None,
            consul: config.consul.clone().map(|client| Feed::start(client, &config.dc)),
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

    /// Fetches `first`, then every newly depended-on ref, resolves, and publishes.
    #[tracing::instrument(skip_all, fields(dc = %self.dc, %cause))]
    pub(crate) async fn sync(&mut self, cause: &Cause, first: BTreeSet<String>) -> Result<(), SyncError> {
        let started = Instant::now();
        let (resolved, fetched) = self.fetch_and_resolve(first).await?;
        let resolution = match resolved.outcome {
            Err(e) if e.is_transient() => return Err(e.into()),
            Err(e) => {
                tracing::error!(error = %e, "datacenter cannot be resolved; keeping the last good pins");
                self.publisher.error(cause, format!("{e}; keeping the last good configuration")).await?;
                let resolution = self.last_good(resolved.watched, &fetched).await?;
                let published = self.apply(cause, resolution, false).await?;
                self.metrics.synced();
                let elapsed_ms = started.elapsed().as_millis() as u64;
                tracing::info!(published, elapsed_ms, "synced on the last good pins");
                return Ok(());
            }
            Ok(resolution) => resolution,
        };
        self.watched = resolved.watched;
        let published = self.apply(cause, resolution, true).await?;
        self.metrics.synced();
        tracing::info!(published, elapsed_ms = started.elapsed().as_millis() as u64, "synced");
        Ok(())
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

    /// The last good pins, when the datacenter cannot be resolved: the published
    /// heads. Their refs stay watched (with those of the failed resolution) and keep
    /// flowing, so one bad document does not freeze the datacenter.
    async fn last_good(
        &mut self,
        watched: BTreeSet<String>,
        fetched: &BTreeSet<String>,
    ) -> Result<Resolution, SyncError> {
        let heads: Vec<ServiceHead> = self.heads.values().filter(|h| h.commit.is_some()).cloned().collect();
        let fallback_refs: BTreeSet<String> = heads.iter().map(|h| h.ref_name.clone()).collect();
        let missing: BTreeSet<String> =
            fallback_refs.iter().filter(|r| !self.watched.contains(*r) && !fetched.contains(*r)).cloned().collect();
        if !missing.is_empty() {
            self.fetch(missing).await?;
        }
        self.watched = watched.into_iter().chain(fallback_refs).collect();
        self.blocking(move |m| Ok(last_good(&m, &heads)?)).await
    }

    /// Publishes what changed. `authoritative` is false for the last-good fallback:
    /// then nothing is removed and the inventory is left as it was.
    async fn apply(&mut self, cause: &Cause, resolution: Resolution, authoritative: bool) -> Result<usize, SyncError> {
        self.report_unresolved(cause, &resolution).await?;
        let mut published = self.publish_changed(cause, &resolution).await?;
        if authoritative {
            published += self.remove_dropped(cause, &resolution).await?;
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
        self.index_to_consul(cause).await?;
        Ok(published)
    }

    /// Reports every pin whose ref does not exist; the service keeps what was published.
    async fn report_unresolved(&self, cause: &Cause, resolution: &Resolution) -> Result<(), SyncError> {
        for (service, ref_name) in &resolution.unresolved {
            let (kind, name) = (service.kind, &service.name);
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

    /// Publishes every service whose commit changed, and moves the head of those
    /// whose files stayed but whose ref or version changed. Returns how many updates
    /// were published.
    async fn publish_changed(&mut self, cause: &Cause, resolution: &Resolution) -> Result<usize, SyncError> {
        let mut changed = Vec::new();
        for (service, target) in &resolution.targets {
            let head = self.heads.get(service);
            match head {
                Some(head) if head.commit.as_deref() == Some(target.commit.to_string().as_str()) => {
                    if head.ref_name != target.ref_name || head.version != target.version {
                        // Same files under another name: only the index and head move.
                        let (commit, tree) = (head.commit.clone(), head.tree.clone());
                        let moved = self.publisher.head(cause, service, Some(head), Some(target), commit, tree);
                        let moved = moved.await?;
                        self.heads.insert(service.clone(), moved);
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
                    self.heads.insert(service.clone(), head);
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
        let prepared = self
            .blocking(move |m| Ok(prepare(&m, &dc, &job_cause, &job_service, &job_target, base.as_ref())))
            .await?
            .map_err(|e| match e {
                PrepareError::Mirror(e) => PublishError::Sync(e.into()),
                PrepareError::BadTree(bad) => PublishError::BadTree(bad),
            })?;
        let published = self.publisher.service(cause, target, &prepared, head.as_ref()).await?;
        if ledger.published(service, prepared.replaced) {
            let tree = self.blocking({
                let commit = target.commit;
                move |m| Ok(m.tree_of(&commit)?)
            });
            let swept = match tree.await {
                Ok(tree) => crate::reclaim::sweep(ledger, self.publisher.bus(), &self.mirror, service, tree).await,
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
            let head = self.publisher.removal(cause, service, self.heads.get(service)).await?;
            self.heads.insert(service.clone(), head);
        }
        Ok(dropped.len())
    }

    /// Hands the whole index, as now published, to the Consul writer: once per handled
    /// batch, so that all its changes reach Consul together.
    async fn index_to_consul(&mut self, cause: &Cause) -> Result<(), SyncError> {
        let index = self
            .heads
            .values()
            .filter_map(|h| {
                let value = h.index_value()?;
                let key = confcast_schemas::subject::index_key(&self.dc, h.kind, &h.name, &h.version);
                Some((key, value.into_bytes()))
            })
            .collect();
        let Some(consul) = &mut self.consul else { return Ok(()) };
        for refused in consul.update(index) {
            tracing::error!("{refused}");
            self.publisher.error(cause, refused).await?;
        }
        Ok(())
    }
}

/// The last good resolution, rebuilt from the published heads: each service stays on
/// the ref it was published from, at that ref's current commit.
fn last_good(mirror: &Mirror, heads: &[ServiceHead]) -> Result<Resolution, MirrorError> {
    let mut resolution = Resolution {
        conf_ref: String::new(),
        targets: BTreeMap::new(),
        unresolved: BTreeMap::new(),
        hosts: BTreeMap::new(),
    };
    for head in heads {
        let service = head.service();
        match mirror.commit_of(&head.ref_name)? {
            Some(commit) => {
                let target = Target {
                    ref_name: head.ref_name.clone(),
                    branch: head.branch.clone(),
                    version: head.version.clone(),
                    commit,
                };
                resolution.targets.insert(service, target);
            }
            None => {
                resolution.unresolved.insert(service, head.ref_name.clone());
            }
        }
    }
    Ok(resolution)
}
