//! What the relay publishes for its datacenter, and in which order: a service's large
//! contents and git objects, then its snapshot and update, then its head and index key;
//! a removal; the inventory; error events. Each message's dedup id comes from the message itself (its `dedup_id`), so
//! a sync redone after a failure or a restart publishes nothing twice.

use std::sync::Arc;

use confcast_schemas::message::now_ms;
use confcast_schemas::{encode, subject, ErrorEvent, Inventory, ServiceHead, ServiceId, ServiceUpdate, WIRE_VERSION};

use crate::bus::Bus;
use crate::cause::Cause;
use crate::error::BusError;
use crate::metrics::Metrics;
use crate::prepare::Prepared;
use crate::reclaim::Ledger;
use crate::resolve::Target;

/// The relay's writer of one datacenter's messages.
#[derive(Debug, Clone)]
pub(crate) struct Publisher {
    dc: String,
    bus: Bus,
    metrics: Arc<Metrics>,
    /// What is known of each service's objects on the bus.
    pub(crate) ledger: Arc<Ledger>,
}

impl Publisher {
    /// A writer of datacenter `dc`'s messages on `bus`, counting them in `metrics`.
    pub(crate) fn new(dc: &str, bus: Bus, metrics: Arc<Metrics>) -> Publisher {
        Publisher { dc: dc.to_owned(), bus, metrics, ledger: Arc::default() }
    }

    /// The bus it writes to.
    pub(crate) fn bus(&self) -> &Bus {
        &self.bus
    }

    /// Publishes a service's new state: large contents, the new tree's objects, the
    /// snapshot that names the tree, the update, then head and index, in that order.
    /// Returns its new head.
    pub(crate) async fn service(
        &self,
        cause: &Cause,
        target: &Target,
        prepared: &Prepared,
        old: Option<&ServiceHead>,
    ) -> Result<ServiceHead, BusError> {
        for (blob, content) in &prepared.large {
            self.bus.ensure_blob(blob, content).await?;
        }
        let update = &prepared.update;
        let service = update.service();
        // The objects go before the snapshot that names them, children before parents.
        self.bus.publish_objects(&service, &prepared.objects).await?;
        // The snapshot goes first: a host that resyncs never finds a snapshot older
        // than an update it has seen.
        let snapshot = encode(&prepared.snapshot);
        self.bus.publish_snapshot(&service, &update.snapshot_dedup_id(&cause.tag), snapshot).await?;
        self.bus.publish_update(&service, &update.dedup_id(&cause.tag), encode(update)).await?;
        self.metrics.updates_published.inc();
        let (kind, name) = (service.kind, &service.name);
        tracing::info!(%kind, %name, from = update.from.as_deref().unwrap_or("-"), to = %target.commit, entries = update.entries.len(), objects = prepared.objects.len(), "published update");
        let commit = Some(target.commit.to_string());
        let head = next_head(&service, old, Some(target), commit, update.tree.clone(), prepared.about.clone());
        self.write_head(cause, old, &head).await?;
        Ok(head)
    }

    /// Publishes that a service left the datacenter: an empty update and snapshot, then
    /// its head, and its index key goes. Returns its new head.
    pub(crate) async fn removal(
        &self,
        cause: &Cause,
        service: &ServiceId,
        old: Option<&ServiceHead>,
    ) -> Result<ServiceHead, BusError> {
        let removal = ServiceUpdate {
            v: WIRE_VERSION,
            dc: self.dc.clone(),
            kind: service.kind,
            name: service.name.clone(),
            ref_name: String::new(),
            branch: old.map(|h| h.branch.clone()).unwrap_or_default(),
            version: old.map(|h| h.version.clone()).unwrap_or_default(),
            from: old.and_then(|h| h.commit.clone()),
            to: None,
            tree: None,
            snapshot: false,
            entries: Vec::new(),
            event_seq: cause.event_seq,
            pushed_at_ms: cause.pushed_at_ms,
            published_at_ms: now_ms(),
            staged: false,
        };
        let snapshot = ServiceUpdate { snapshot: true, from: None, ..removal.clone() };
        let (kind, name) = (service.kind, &service.name);
        self.bus.publish_snapshot(service, &removal.snapshot_dedup_id(&cause.tag), encode(&snapshot)).await?;
        self.bus.publish_update(service, &removal.dedup_id(&cause.tag), encode(&removal)).await?;
        self.metrics.updates_published.inc();
        tracing::info!(%kind, %name, "published removal");
        let head = self.head(cause, service, old, None, None, None).await?;
        // No snapshot names the service's objects any more.
        let purged = self.bus.purge_objects(service, None).await?;
        self.ledger.removed(service);
        tracing::debug!(%kind, %name, purged, "reclaimed the objects of a removed service");
        Ok(head)
    }

    /// Publishes a service's head (and moves its index key) without a new update: the
    /// same files under another ref or version, or a removal. Returns the new head.
    pub(crate) async fn head(
        &self,
        cause: &Cause,
        service: &ServiceId,
        old: Option<&ServiceHead>,
        target: Option<&Target>,
        commit: Option<String>,
        tree: Option<String>,
    ) -> Result<ServiceHead, BusError> {
        // The same commit under another name, or none: what is known of it stays.
        let about = old.filter(|o| o.commit == commit).and_then(|o| o.about.clone());
        let head = next_head(service, old, target, commit, tree, about);
        self.write_head(cause, old, &head).await?;
        Ok(head)
    }

    /// Publishes a service's head and moves its index key.
    async fn write_head(&self, cause: &Cause, old: Option<&ServiceHead>, head: &ServiceHead) -> Result<(), BusError> {
        let (kind, name) = (head.kind, &head.name);
        let id = head.dedup_id(&self.dc, &cause.tag);
        self.bus.publish_head(&head.service(), &id, encode(head)).await?;
        // The index: one key per (service, version); a version that is no longer the
        // datacenter's goes away.
        if let Some(old) = old {
            if old.commit.is_some() && (old.version != head.version || head.commit.is_none()) {
                self.bus.delete_index(subject::index_key(&self.dc, kind, name, &old.version)).await?;
            }
        }
        if let Some(value) = head.index_value() {
            self.bus.put_index(subject::index_key(&self.dc, kind, name, &head.version), value).await?;
        }
        Ok(())
    }

    /// Publishes the datacenter's inventory.
    pub(crate) async fn inventory(&self, cause: &Cause, inventory: &Inventory) -> Result<(), BusError> {
        let id = inventory.dedup_id(&cause.tag);
        self.bus.publish_inventory(&id, encode(inventory)).await?;
        Ok(())
    }

    /// Publishes an error event: something an operator must look at.
    pub(crate) async fn error(&self, cause: &Cause, message: String) -> Result<(), BusError> {
        let event = ErrorEvent {
            v: WIRE_VERSION,
            dc: self.dc.clone(),
            ref_name: cause.ref_name.clone(),
            commit: cause.commit.clone(),
            message,
            at_ms: now_ms(),
        };
        let id = event.dedup_id(&cause.tag);
        self.bus.publish_error(&id, encode(&event)).await?;
        self.metrics.error_events.inc();
        Ok(())
    }
}

/// The head a service gets: where `target` points (or, without one, the branch and
/// version it had), at `commit`.
fn next_head(
    service: &ServiceId,
    old: Option<&ServiceHead>,
    target: Option<&Target>,
    commit: Option<String>,
    tree: Option<String>,
    about: Option<confcast_schemas::message::CommitAbout>,
) -> ServiceHead {
    ServiceHead {
        v: WIRE_VERSION,
        kind: service.kind,
        name: service.name.clone(),
        ref_name: target.map(|t| t.ref_name.clone()).unwrap_or_default(),
        branch: target.map(|t| t.branch.clone()).or_else(|| old.map(|h| h.branch.clone())).unwrap_or_default(),
        version: target.map(|t| t.version.clone()).or_else(|| old.map(|h| h.version.clone())).unwrap_or_default(),
        commit,
        tree,
        about,
    }
}
