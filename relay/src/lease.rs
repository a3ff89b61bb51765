//! One active relay per datacenter, any number on standby.
//!
//! Two relays of one datacenter share the commit consumer, but only the holder of the
//! datacenter's lease handles events: a key in the `confcast-leases` K/V bucket, whose
//! entries expire [`Lease::ttl`] after their last write. The holder renews it by
//! revision every third of the TTL; a standby tries to create it every second and wins
//! once the holder is gone (killed, partitioned, stopped). A relay that fails to renew
//! stops handling events at once. Since only the holder publishes, its view of what was
//! published (the heads, reloaded when it takes over) is never stale.
//!
//! A relay is identified by its host and state directory, which it locks, so a relay
//! restarted after a crash takes its own lease back at once.

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use confcast_schemas::retry::Warnings;
use confcast_schemas::{streams, subject};
use tokio_util::sync::CancellationToken;

use crate::error::BusError;

/// A datacenter's lease, held or wanted by this relay.
#[derive(Debug, Clone)]
pub struct Lease {
    store: kv::Store,
    key: String,
    holder: String,
    ttl: Duration,
}

impl Lease {
    /// The lease of `dc`, for a relay identified as `holder`.
    /// The bucket is created with `replicas` copies if it is missing.
    pub async fn open(
        js: &jetstream::Context,
        dc: &str,
        holder: String,
        ttl: Duration,
        replicas: usize,
    ) -> Result<Lease, BusError> {
        let config = kv::Config { num_replicas: replicas.max(1), ..streams::leases(ttl) };
        let store = crate::bus::key_value(js, "lease bucket", config).await?;
        Ok(Lease { store, key: format!("relay.{}", subject::encode_token(dc)), holder, ttl })
    }

    /// The lease's time to live.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Waits until this relay holds the lease; returns its revision, or `None` on shutdown.
    pub async fn acquire(&self, shutdown: &CancellationToken) -> Option<u64> {
        let mut announced = false;
        let mut warnings = Warnings::default();
        loop {
            match self.store.create(&self.key, Bytes::from(self.holder.clone())).await {
                Ok(revision) => return Some(revision),
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                    // Our own lease from before a restart (same host, same state dir):
                    // take it back at once instead of waiting for it to expire.
                    if let Ok(Some(entry)) = self.store.entry(&self.key).await {
                        if entry.value == self.holder.as_bytes() {
                            if let Ok(revision) =
                                self.store.update(&self.key, Bytes::from(self.holder.clone()), entry.revision).await
                            {
                                return Some(revision);
                            }
                        }
                    }
                    if !announced {
                        let holder = self.store.get(&self.key).await.ok().flatten();
                        tracing::info!(
                            holder = %holder.map(|h| String::from_utf8_lossy(&h).into_owned()).unwrap_or_default(),
                            "another relay handles this datacenter; standing by"
                        );
                        announced = true;
                    }
                }
                Err(e) => warnings.warn(
                    "taking the datacenter's lease",
                    "",
                    &confcast_schemas::process::error_chain(&e),
                    Duration::from_secs(1),
                ),
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                () = shutdown.cancelled() => return None,
            }
        }
    }

    /// Renews the lease from `revision` until renewal fails or `stop`; cancels `lost`
    /// when the lease can no longer be trusted to be ours.
    pub async fn keep(self, mut revision: u64, lost: CancellationToken, stop: CancellationToken) {
        let every = self.ttl / 3;
        loop {
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                () = stop.cancelled() => {
                    // Hand over at once rather than after the TTL.
                    let _ = self.store.delete_expect_revision(&self.key, Some(revision)).await;
                    return;
                }
            }
            match tokio::time::timeout(every, self.store.update(&self.key, Bytes::from(self.holder.clone()), revision))
                .await
            {
                Ok(Ok(next)) => revision = next,
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "lost the datacenter's lease; standing by");
                    lost.cancel();
                    return;
                }
                Err(_) => {
                    tracing::error!("could not renew the datacenter's lease in time; standing by");
                    lost.cancel();
                    return;
                }
            }
        }
    }
}
