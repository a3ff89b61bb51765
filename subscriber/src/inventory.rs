//! What the datacenter publishes about this host's services: with `--host`, its
//! inventory entry, planned from ([`crate::selection`]) and watched for changes; with
//! `--service`, whether each followed service is published at all.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use async_nats::jetstream::consumer;
use confcast_schemas::document::HostInventory;
use confcast_schemas::retry::Warnings;
use confcast_schemas::{subject, ServiceId};
use tokio_util::sync::CancellationToken;

use crate::bus::ReadError;
use crate::host::{Followed, Host};
use crate::selection::{list, unpublished, Plan, Removal, Selection};

/// How long the relay may take to publish the inventory before waiting for it is said
/// at WARN rather than INFO.
const INVENTORY_PATIENCE: Duration = Duration::from_secs(60);

impl Host {
    /// The services whose trees are on this host.
    pub(crate) fn present(&self) -> BTreeSet<ServiceId> {
        self.position.services.iter().filter(|(_, state)| state.commit.is_some()).map(|(id, _)| id.clone()).collect()
    }

    /// What the datacenter's inventory, as published now, means for host `id`; `None`
    /// while the relay has published no inventory.
    async fn plan(&mut self, id: &str) -> Result<Option<Plan>, ReadError> {
        let Some(inventory) = self.reader.inventory().await? else { return Ok(None) };
        self.conf_ref = Some(inventory.conf_ref.clone());
        let entry = inventory.hosts.get(id);
        let present = self.present();
        let mut published = BTreeSet::new();
        for service in entry.map(HostInventory::services).unwrap_or_default() {
            // A tree on this host came from the datacenter (its head may still be on its
            // way: the relay writes it after the update).
            if present.contains(&service) || self.reader.head(&service).await?.is_some_and(|head| head.commit.is_some())
            {
                published.insert(service);
            }
        }
        Ok(Some(crate::selection::plan(entry, &present, &published)))
    }

    /// Waits until the relay has published the datacenter's inventory, and plans from it.
    pub(crate) async fn wait_for_plan(&mut self, id: &str, shutdown: &CancellationToken) -> Option<Plan> {
        let dc = self.config.dc.clone();
        let started = tokio::time::Instant::now();
        let (mut waiting, mut failing) = (Warnings::default(), Warnings::default());
        loop {
            match self.plan(id).await {
                Ok(Some(plan)) => return Some(plan),
                Ok(None) if waiting.due() => {
                    if started.elapsed() < INVENTORY_PATIENCE {
                        tracing::info!(%dc, "waiting for the relay to publish the datacenter's inventory");
                    } else {
                        tracing::warn!(%dc, "the relay of datacenter {dc} has not published its inventory yet (its log and error events say why); waiting");
                    }
                }
                Ok(None) => {}
                Err(e) if failing.due() => {
                    tracing::warn!(%dc, error = %e, "cannot read the datacenter's inventory; retrying")
                }
                Err(_) => {}
            }
            tokio::select! { () = tokio::time::sleep(Duration::from_millis(500)) => {}, () = shutdown.cancelled() => return None }
        }
    }

    /// Takes `plan` as this host's selection: says what it keeps and why, and returns
    /// the services to follow and those that leave the host (see [`crate::selection`]).
    pub(crate) fn adopt(&mut self, id: &str, plan: &Plan) -> (BTreeSet<ServiceId>, BTreeMap<ServiceId, Removal>) {
        let dc = self.config.dc.clone();
        let conf_ref = self.conf_ref.clone().unwrap_or_default();
        let kept = if plan.held.is_empty() {
            String::new()
        } else {
            format!(
                "; keeping {} on this host: nothing leaves a host on an entry that cannot be trusted",
                list(&plan.held)
            )
        };
        if !plan.listed {
            if plan.held.is_empty() {
                tracing::warn!(host = id, %dc, "host {id} is not in the inventory of datacenter {dc}; following nothing until it is");
            } else {
                tracing::warn!(
                    host = id,
                    %dc,
                    "host {id} is not in the inventory of datacenter {dc}{kept} (a host leaves a service when its entry no longer lists it; an empty entry for all)"
                );
            }
        }
        if !plan.unknown.is_empty() {
            let unknown = list(&plan.unknown);
            tracing::warn!(
                host = id,
                %dc,
                "host {id}'s entry in the inventory of datacenter {dc} lists {unknown}, which the datacenter does not publish (not in its configuration {conf_ref}, or its pin does not resolve: the relay's error events say which){kept}; waiting for it"
            );
            for service in &plan.unknown {
                let problem = format!(
                    "{}; host {id}'s inventory entry lists it{kept}",
                    unpublished(service, &dc, Some(&conf_ref))
                );
                self.live.update(service, |live| live.error = Some(problem));
            }
        }
        self.unknown = plan.unknown.clone();
        let why = Removal::Inventory { dc, host: id.to_owned(), conf_ref };
        (plan.follow.clone(), plan.remove.iter().map(|s| (s.clone(), why.clone())).collect())
    }

    /// With `--host`, after the inventory changed: whether this host's services change.
    pub(crate) async fn inventory_changed(&mut self) -> Option<Followed> {
        let Selection::Host(id) = &self.config.selection else { return None };
        let id = id.clone();
        match self.plan(&id).await {
            Ok(Some(plan)) if plan.follow != self.services || !plan.remove.is_empty() => {
                Some(Followed::InventoryChanged)
            }
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the datacenter's inventory; following the same services");
                None
            }
        }
    }

    /// With `--service`: says once, naming the datacenter, that a followed service has
    /// nothing published there, once the relay has published the datacenter's state.
    pub(crate) async fn check_unpublished(&mut self) {
        let Ok(Some(inventory)) = self.reader.inventory().await else { return };
        for service in std::mem::take(&mut self.unpublished) {
            if self.state(&service).commit.is_some() {
                continue;
            }
            match self.reader.head(&service).await {
                // Published: its update is on the stream.
                Ok(Some(head)) if head.commit.is_some() => {}
                Ok(_) => {
                    let problem = unpublished(&service, &self.config.dc, Some(&inventory.conf_ref));
                    let ServiceId { kind, name } = &service;
                    tracing::warn!(%kind, %name, dc = %self.config.dc, "{problem}; waiting for it");
                    self.report(&service, None, Some(problem), None).await;
                }
                Err(_) => {
                    self.unpublished.insert(service);
                }
            }
        }
    }

    /// The datacenter's inventory messages from the last one on; `None` (said at WARN)
    /// when they cannot be watched, e.g. NATS permissions without a consumer on the
    /// state stream: the host then sees inventory changes only when it restarts.
    pub(crate) async fn watch_inventory(&self) -> Option<consumer::pull::Ordered> {
        let watch = match self.reader.jetstream().get_stream(subject::state_stream(&self.config.dc)).await {
            Ok(stream) => {
                let consumer = stream
                    .create_consumer(consumer::pull::OrderedConfig {
                        filter_subject: subject::inventory_subject(&self.config.dc),
                        // The last one too: one published while this host planned is not
                        // missed (one it planned from already changes nothing).
                        deliver_policy: consumer::DeliverPolicy::Last,
                        ..Default::default()
                    })
                    .await;
                match consumer {
                    Ok(consumer) => consumer.messages().await.map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                }
            }
            Err(e) => Err(e.to_string()),
        };
        watch
            .inspect_err(|e| {
                tracing::warn!(dc = %self.config.dc, error = %e, "cannot watch the datacenter's inventory; its changes reach this host when it restarts")
            })
            .ok()
    }
}
