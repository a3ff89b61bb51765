//! What a relay tells its operator about itself: Prometheus metrics and `/healthz` on
//! `--listen`, and readiness (for systemd's `Type=notify`).
//!
//! The relay counts as it goes: commit events taken from the commit stream
//! ([`crate::events`]), fetches from the master (time, and pack bytes as measured by
//! [`fetched_bytes`]), updates and error events published, failed syncs
//! ([`crate::sync`]); the lease loop ([`crate::server`]) sets whether it holds the
//! datacenter's lease, and the sync when it last synced. `relay --listen ADDR` serves
//! them in the OpenMetrics text format that Prometheus scrapes.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

/// The relay's counters and gauges, shared by its loop and its HTTP listener.
#[derive(Debug)]
pub struct Metrics {
    /// Commit events taken from the commit stream (relevant to the datacenter or not).
    pub commit_events: Counter,
    /// Time of each fetch from the master, in seconds.
    pub fetch_seconds: Histogram,
    /// Bytes of the packs the master sent, measured as the new pack files in the mirror
    /// (a fetch during which the mirror was repacked is not counted).
    pub fetched_bytes: Counter,
    /// `ServiceUpdate`s published (removals of a service included).
    pub updates_published: Counter,
    /// Error events published: bad documents, unresolvable pins, unpublishable trees.
    pub error_events: Counter,
    /// Syncs that failed and were retried (master or bus unreachable).
    pub sync_failures: Counter,
    /// 1 while this relay holds its datacenter's lease (handles its events), else 0.
    pub lease_held: Gauge,
    /// When the last sync with the master completed, in seconds since the Unix epoch.
    pub last_sync: Gauge<f64, AtomicU64>,
    registry: Registry,
    ready: tokio::sync::watch::Sender<bool>,
}

impl Default for Metrics {
    fn default() -> Self {
        let commit_events = Counter::default();
        let fetch_seconds = Histogram::new(exponential_buckets(0.005, 2.0, 14));
        let fetched_bytes = Counter::default();
        let updates_published = Counter::default();
        let error_events = Counter::default();
        let sync_failures = Counter::default();
        let lease_held = Gauge::default();
        let last_sync = Gauge::<f64, AtomicU64>::default();
        let mut registry = Registry::with_prefix("confcast_relay");
        registry.register("commit_events", "Commit events taken from the commit stream", commit_events.clone());
        registry.register("fetch_seconds", "Time of each fetch from the master", fetch_seconds.clone());
        registry.register(
            "fetched_bytes",
            "Bytes of the packs fetched from the master (new pack files in the mirror)",
            fetched_bytes.clone(),
        );
        registry.register("updates_published", "Service updates published", updates_published.clone());
        registry.register(
            "error_events",
            "Error events published (bad documents, unresolvable pins)",
            error_events.clone(),
        );
        registry.register("sync_failures", "Syncs that failed and were retried", sync_failures.clone());
        registry.register("lease_held", "1 while this relay handles its datacenter's events", lease_held.clone());
        registry.register(
            "last_sync_timestamp_seconds",
            "When the last sync with the master completed (Unix time)",
            last_sync.clone(),
        );
        Metrics {
            commit_events,
            fetch_seconds,
            fetched_bytes,
            updates_published,
            error_events,
            sync_failures,
            lease_held,
            last_sync,
            registry,
            ready: tokio::sync::watch::channel(false).0,
        }
    }
}

impl Metrics {
    /// The metrics in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).expect("writing to a String never fails");
        text
    }

    /// Records a completed sync.
    pub fn synced(&self) {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        self.last_sync.set(now.as_secs_f64());
    }

    /// Marks the relay ready: it has synced with the master as the datacenter's active
    /// relay, or it stands by while another holds the lease.
    pub fn set_ready(&self) {
        self.ready.send_replace(true);
    }

    /// Whether the relay is ready.
    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// Waits until the relay is ready.
    pub async fn wait_ready(&self) {
        let mut ready = self.ready.subscribe();
        let _ = ready.wait_for(|r| *r).await;
    }
}

/// Serves `GET /metrics` and `GET /healthz` on `listener` until `shutdown`.
pub async fn serve(listener: tokio::net::TcpListener, metrics: Arc<Metrics>, shutdown: CancellationToken) {
    let app = Router::new()
        .route(
            "/metrics",
            get(|axum::extract::State(metrics): axum::extract::State<Arc<Metrics>>| async move {
                (
                    [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
                    metrics.encode(),
                )
            }),
        )
        .route(
            "/healthz",
            get(|axum::extract::State(metrics): axum::extract::State<Arc<Metrics>>| async move {
                if metrics.is_ready() {
                    (StatusCode::OK, "ok\n").into_response()
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "starting\n").into_response()
                }
            }),
        )
        .with_state(metrics);
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    tracing::info!(addr = ?addr, "serving /metrics and /healthz");
    if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await {
        tracing::error!(error = %e, "the metrics listener failed");
    }
}

/// The pack files of the mirror and their sizes.
pub(crate) fn packs(dir: &std::path::Path) -> BTreeMap<OsString, u64> {
    let Ok(entries) = std::fs::read_dir(dir) else { return BTreeMap::new() };
    entries
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "pack"))
        .filter_map(|e| Some((e.file_name(), e.metadata().ok()?.len())))
        .collect()
}

/// Bytes a fetch added to the mirror: the sizes of its new packs. When a pack went away
/// the mirror was repacked during the fetch, and its own share cannot be told: 0.
pub(crate) fn fetched_bytes(before: &BTreeMap<OsString, u64>, after: &BTreeMap<OsString, u64>) -> u64 {
    if before.keys().any(|name| !after.contains_key(name)) {
        return 0;
    }
    after.iter().filter(|(name, _)| !before.contains_key(*name)).map(|(_, size)| size).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_every_metric() {
        let metrics = Metrics::default();
        metrics.commit_events.inc();
        metrics.fetch_seconds.observe(0.02);
        metrics.lease_held.set(1);
        let text = metrics.encode();
        for line in [
            "confcast_relay_commit_events_total 1",
            "confcast_relay_fetch_seconds_count 1",
            "confcast_relay_fetched_bytes_total 0",
            "confcast_relay_updates_published_total 0",
            "confcast_relay_error_events_total 0",
            "confcast_relay_sync_failures_total 0",
            "confcast_relay_lease_held 1",
            "confcast_relay_last_sync_timestamp_seconds 0",
        ] {
            assert!(text.lines().any(|l| l.starts_with(line)), "{line} missing from\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
    }
}
