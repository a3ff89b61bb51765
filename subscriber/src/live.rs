//! What a running subscriber shares with its local API: the last outcome of each
//! service, a change index for blocking queries, and the Prometheus metrics.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use confcast_schemas::message::{now_ms, Health};
use confcast_schemas::ServiceId;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::sync::watch;

/// The last outcome of one service on this host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceLive {
    /// Why the last update, check or exec failed; `None` when all went well.
    pub error: Option<String>,
    /// Exit status of the last `--exec` run.
    pub exec_status: Option<i32>,
    /// What the host's checks last said of it (`None`: not judged since the commit in
    /// place was applied).
    pub health: Option<Health>,
    /// A staged commit held on this host, not released to it yet.
    pub pending: Option<String>,
    /// Change index: grows whenever anything about the service changes.
    pub index: u64,
}

/// Labels of per-service metrics.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabel {
    /// `<kind>/<name>`.
    pub service: String,
}

impl ServiceLabel {
    /// The label of `id`.
    pub fn of(id: &ServiceId) -> ServiceLabel {
        ServiceLabel { service: id.to_string() }
    }
}

/// Labels of the error counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabel {
    /// What failed: `apply`, `check`, `exec`, `health`, `signature`, `integrity`.
    pub what: String,
}

/// The subscriber's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Updates applied (and removals), per service.
    pub applied: Family<ServiceLabel, Counter>,
    /// Time to build, verify and switch one tree.
    pub apply_seconds: Histogram,
    /// From the `git push` to the change in place on this host.
    pub push_to_apply_seconds: Histogram,
    /// Updates the stream holds that this host has not handled yet.
    pub stream_pending: Gauge,
    /// Failures, by what failed.
    pub errors: Family<ErrorLabel, Counter>,
    /// Exit status of each service's last `--exec` (-1: did not exit).
    pub exec_last_status: Family<ServiceLabel, Gauge>,
}

impl Default for Metrics {
    fn default() -> Metrics {
        let mut registry = Registry::with_prefix("confcast_subscriber");
        let applied = Family::<ServiceLabel, Counter>::default();
        registry.register("updates_applied", "Changes applied (updates and removals), per service", applied.clone());
        let apply_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        registry.register("apply_seconds", "Time to build, verify and switch to a new tree", apply_seconds.clone());
        let push_to_apply_seconds = Histogram::new(exponential_buckets(0.005, 2.0, 14));
        registry.register(
            "push_to_apply_seconds",
            "Time from the git push to the change in place on this host",
            push_to_apply_seconds.clone(),
        );
        let stream_pending = Gauge::default();
        registry.register(
            "stream_pending",
            "Updates on the datacenter's stream not handled yet (lag behind the stream)",
            stream_pending.clone(),
        );
        let errors = Family::<ErrorLabel, Counter>::default();
        registry.register("errors", "Failures: apply, check, exec, health, signature, integrity", errors.clone());
        let exec_last_status = Family::<ServiceLabel, Gauge>::default();
        registry.register(
            "exec_last_status",
            "Exit status of the last --exec run per service (-1: killed or did not start)",
            exec_last_status.clone(),
        );
        Metrics { registry, applied, apply_seconds, push_to_apply_seconds, stream_pending, errors, exec_last_status }
    }
}

impl Metrics {
    /// Counts one failure of `what`.
    pub fn error(&self, what: &str) {
        self.errors.get_or_create(&ErrorLabel { what: what.to_owned() }).inc();
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

/// Shared between the subscriber's loop and its API. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Live {
    services: Arc<Mutex<BTreeMap<String, ServiceLive>>>,
    index: Arc<watch::Sender<u64>>,
    /// The metrics.
    pub metrics: Arc<Metrics>,
}

impl Default for Live {
    fn default() -> Live {
        Live { services: Arc::default(), index: Arc::new(watch::channel(0).0), metrics: Arc::default() }
    }
}

impl Live {
    /// Updates the service `id`; moves the change index if that changed anything, so
    /// blocking queries wake for real changes only.
    pub fn update(&self, id: &ServiceId, change: impl FnOnce(&mut ServiceLive)) {
        self.update_if(id, false, change);
    }

    /// A new commit (or a removal) of `id` is in place: its exec has not run yet, nor
    /// has it been judged.
    pub fn applied(&self, id: &ServiceId) {
        self.update_if(id, true, |live| {
            live.error = None;
            live.exec_status = None;
            live.health = None;
        });
    }

    fn update_if(&self, id: &ServiceId, always: bool, change: impl FnOnce(&mut ServiceLive)) {
        let mut services = self.services.lock().unwrap_or_else(|e| e.into_inner());
        let entry = services.entry(id.to_string()).or_default();
        let before = entry.clone();
        change(entry);
        if !always && *entry == before && before.index != 0 {
            return;
        }
        // Milliseconds since the epoch keep the index growing across restarts.
        let index = (*self.index.borrow() + 1).max(now_ms());
        entry.index = index;
        self.index.send_replace(index);
    }

    /// The last outcome of the service `key` (its id as text, `service/web`, as the
    /// local API names it), if anything happened to it since start.
    pub fn service(&self, key: &str) -> Option<ServiceLive> {
        self.services.lock().unwrap_or_else(|e| e.into_inner()).get(key).cloned()
    }

    /// The host-wide change index.
    pub fn index(&self) -> u64 {
        *self.index.borrow()
    }

    /// Waits until the change index moves past `seen` (or the channel closes).
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.index.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_index_grows_with_every_change_and_names_the_service() {
        let live = Live::default();
        let before = live.index();
        live.update(&ServiceId::service("a"), |s| s.error = Some("bad".into()));
        let a = live.service("service/a").expect("a");
        assert!(a.index > before && a.index == live.index());
        live.update(&ServiceId::service("b"), |s| s.exec_status = Some(0));
        assert!(live.index() > a.index);
        let b = live.index();
        live.update(&ServiceId::service("b"), |s| s.exec_status = Some(0));
        assert_eq!(live.index(), b, "reporting the same again is no change");
        assert_eq!(live.service("service/a").map(|s| s.index), Some(a.index), "b's change leaves a's index");
    }

    #[test]
    fn metrics_are_exposed_in_prometheus_text() {
        let metrics = Metrics::default();
        metrics.applied.get_or_create(&ServiceLabel { service: "service/a".into() }).inc();
        metrics.error("exec");
        metrics.apply_seconds.observe(0.002);
        let text = metrics.encode();
        assert!(text.contains("confcast_subscriber_updates_applied_total{service=\"service/a\"} 1"), "{text}");
        assert!(text.contains("confcast_subscriber_errors_total{what=\"exec\"} 1"), "{text}");
        assert!(text.contains("confcast_subscriber_apply_seconds_count 1"), "{text}");
    }
}
