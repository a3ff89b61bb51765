//! Reclaiming the objects no current snapshot needs.
//!
//! A push stores the objects its change made and leaves in place those it replaced: a
//! host may still be reading the snapshot before it. The relay counts, per service, the
//! objects its pushes replaced; once they reach a quarter of the objects the service's
//! tree had at its last sweep (and at least [`MIN_GARBAGE`]), it sweeps: every object
//! the state stream holds for the service that the current tree does not reach is
//! purged. A sweep reads the whole tree, so it runs about once per quarter-tree of
//! change, and what is stored stays within a quarter of what is needed, plus
//! [`MIN_GARBAGE`]. A host reading the snapshot a sweep made obsolete finds an object
//! missing, refuses it whole and reads the next one. A removed service's objects go
//! at once ([`crate::publish::Publisher::removal`]).
//!
//! The counts live in the relay's memory: a relay that restarts counts from zero, and
//! its first sweep of a service also removes what was left before.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use confcast_schemas::ServiceId;
use gix::ObjectId;

use crate::bus::Bus;
use crate::error::SyncError;
use crate::mirror::{Mirror, MirrorError};

/// The least replaced objects a sweep waits for, so small trees are not swept on
/// every push.
pub(crate) const MIN_GARBAGE: usize = 16;

/// What a datacenter's relay knows about its services' objects on the bus.
#[derive(Debug, Default)]
pub(crate) struct Ledger {
    services: Mutex<HashMap<ServiceId, Account>>,
}

/// One service's objects.
#[derive(Debug, Default, Clone, Copy)]
struct Account {
    /// The objects of the published head are all on the bus.
    complete: bool,
    /// Objects replaced since the last sweep.
    replaced: usize,
    /// Objects the tree reached at the last sweep (0 before the first).
    live: usize,
}

impl Ledger {
    fn with<T>(&self, service: &ServiceId, f: impl FnOnce(&mut Account) -> T) -> T {
        let mut services = self.services.lock().unwrap_or_else(|e| e.into_inner());
        f(services.entry(service.clone()).or_default())
    }

    /// Whether every object of the tree `service` was last published with is known
    /// to be on the bus: known from a publish of this relay, or from the tree's root
    /// on the state stream (objects are stored children first, so the root comes
    /// last). A head published without objects (by an older relay) is not complete,
    /// and the service's next publish stores its whole tree.
    pub(crate) async fn complete(&self, bus: &Bus, service: &ServiceId, tree: &str) -> Result<bool, SyncError> {
        if self.with(service, |a| a.complete) {
            return Ok(true);
        }
        let complete = bus.has_object(service, tree).await?;
        self.with(service, |a| a.complete = complete);
        Ok(complete)
    }

    /// Records a publish of `service` that replaced `replaced` objects; true when a
    /// sweep is due.
    pub(crate) fn published(&self, service: &ServiceId, replaced: usize) -> bool {
        self.with(service, |a| {
            a.complete = true;
            a.replaced += replaced;
            a.replaced >= MIN_GARBAGE.max(a.live / 4)
        })
    }

    /// Forgets a removed service.
    pub(crate) fn removed(&self, service: &ServiceId) {
        self.services.lock().unwrap_or_else(|e| e.into_inner()).remove(service);
    }

    fn swept(&self, service: &ServiceId, live: usize) {
        self.with(service, |a| {
            a.replaced = 0;
            a.live = live;
        });
    }
}

/// Purges every object of `service` on the bus that `tree`, its published tree, does
/// not reach, nor `kept` (the tree a rollout under way still needs), and stores again
/// any they reach that the bus lacks. Returns how many were purged.
pub(crate) async fn sweep(
    ledger: &Ledger,
    bus: &Bus,
    mirror: &Mirror,
    service: &ServiceId,
    tree: ObjectId,
    kept: Option<ObjectId>,
) -> Result<usize, SyncError> {
    let reader = mirror.clone();
    let reachable: HashSet<ObjectId> = tokio::task::spawn_blocking(move || {
        let mut reachable = crate::objects::reachable(&reader, tree)?;
        if let Some(kept) = kept {
            reachable.extend(crate::objects::reachable(&reader, kept)?);
        }
        Ok::<_, MirrorError>(reachable)
    })
    .await??;
    let stored = bus.stored_objects(service).await?;
    let stored_ids: HashSet<ObjectId> = stored.iter().filter_map(|id| ObjectId::from_hex(id.as_bytes()).ok()).collect();
    let garbage: Vec<String> = stored
        .into_iter()
        .filter(|id| ObjectId::from_hex(id.as_bytes()).map_or(true, |id| !reachable.contains(&id)))
        .collect();
    if !garbage.is_empty() {
        bus.purge_objects(service, Some(&garbage)).await?;
    }
    // A sweep also repairs: an object the tree needs that the bus lost (an operator's
    // purge, a damaged stream) is stored again.
    let missing: Vec<ObjectId> = reachable.iter().filter(|id| !stored_ids.contains(*id)).copied().collect();
    if !missing.is_empty() {
        let reader = mirror.clone();
        let count = missing.len();
        let contents = tokio::task::spawn_blocking(move || {
            missing.into_iter().map(|id| Ok((id, reader.object(&id)?))).collect::<Result<Vec<_>, MirrorError>>()
        });
        bus.publish_objects(service, &contents.await??).await?;
        let (kind, name) = (service.kind, &service.name);
        tracing::warn!(%kind, %name, count, "stored again objects the bus had lost");
    }
    ledger.swept(service, reachable.len());
    let (kind, name) = (service.kind, &service.name);
    tracing::info!(%kind, %name, purged = garbage.len(), live = reachable.len(), "reclaimed objects no snapshot needs");
    Ok(garbage.len())
}
