//! The relay loop: commit events in, service updates out.
//!
//! Events are triggers, not instructions: for a relevant event the relay fetches the
//! ref, re-resolves the whole datacenter from its mirror and publishes the difference
//! to what it last published. That makes every step idempotent: a redelivered event, a
//! restart, or an event replayed out of order converges on the master's state. An
//! event is acked only after everything it caused is acknowledged by JetStream.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use async_nats::jetstream::{consumer, AckKind};
use confcast_schemas::message::now_ms;
use confcast_schemas::sign::Signer;
use confcast_schemas::{
    decode, encode, path, subject, ChangeKind, CommitEvent, Entry, ErrorEvent, FileMode, Inventory, Kind, ServiceHead,
    ServiceUpdate, WIRE_VERSION,
};
use futures::{FutureExt, StreamExt};
use serde_bytes::ByteBuf;
use tokio_util::sync::CancellationToken;

use crate::diff::{diff, Listing};
use crate::lease::Lease;
use crate::metrics::Metrics;
use crate::mirror::{Mirror, MirrorError};
use crate::publish::{Bus, BusError, StreamLayout, INLINE_LIMIT};
use crate::resolve::{datacenter_ref, resolve, RefSource, Resolution, Target};
use crate::retry::{retry, Backoff, Warnings};

/// What a relay needs to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// NATS URL of the datacenter's server.
    pub nats_url: String,
    /// The datacenter this relay serves.
    pub dc: String,
    /// Where the master is served (path, `file://`, `git://`, `ssh://`, `http(s)://`).
    pub master_url: String,
    /// Directory for the mirror.
    pub state_dir: PathBuf,
    /// How long a fetch may wait on the network (per read or write on `git://`, and
    /// twice that for a whole fetch on any transport) before it fails and is retried.
    pub fetch_timeout: Duration,
    /// How long the datacenter's lease outlives its holder (see [`crate::lease`]).
    pub lease_ttl: Duration,
    /// Consul to keep a copy of the index in, besides the NATS K/V bucket (see
    /// [`crate::consul::index`]).
    pub consul: Option<crate::consul::Client>,
    /// Where the commit stream is, and how the relay's streams are replicated.
    pub streams: StreamLayout,
    /// NATS credentials and TLS.
    pub nats_auth: confcast_schemas::connect::NatsAuth,
    /// How to authenticate to the master.
    pub git: crate::mirror::GitCredentials,
    /// nkey seed file to sign every published message with (see [`confcast_schemas::sign`]).
    pub signing_key: Option<PathBuf>,
    /// Where to serve `/metrics` and `/healthz`, if anywhere.
    pub listen: Option<std::net::SocketAddr>,
    /// The relay's metrics and readiness (see [`crate::metrics`]).
    pub metrics: std::sync::Arc<Metrics>,
}

/// Locks `<state_dir>/relay.lock` for the life of the relay.
fn lock_state_dir(state_dir: &std::path::Path) -> Result<std::fs::File, RelayError> {
    let path = state_dir.join("relay.lock");
    let fail = |message: String| RelayError::StateDir { path: path.clone(), message };
    std::fs::create_dir_all(state_dir).map_err(|e| fail(e.to_string()))?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| fail(e.to_string()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(fail("another relay is using this state directory".into())),
        Err(std::fs::TryLockError::Error(e)) => Err(fail(e.to_string())),
    }
}

/// Why the relay stopped.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The state directory cannot be used.
    #[error("{path}: {message}")]
    StateDir {
        /// The lock file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The mirror could not be opened.
    #[error(transparent)]
    Mirror(#[from] MirrorError),
    /// The bus failed in a way the relay cannot wait out.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// A NATS credential or certificate cannot be used.
    #[error(transparent)]
    Auth(confcast_schemas::connect::AuthError),
    /// The signing key cannot be used.
    #[error(transparent)]
    Signing(confcast_schemas::sign::SignatureError),
    /// The `--listen` address cannot be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

impl RelayError {
    /// Whether the relay's configuration or environment is at fault (a master that can
    /// never be fetched, a state directory in use, a key that cannot be read, an
    /// address taken): found at start, fixed by the operator, never by waiting.
    pub fn is_configuration(&self) -> bool {
        match self {
            RelayError::Mirror(e) => !e.is_transient(),
            RelayError::Bus(_) => false,
            RelayError::StateDir { .. } | RelayError::Auth(_) | RelayError::Signing(_) | RelayError::Listen { .. } => {
                true
            }
        }
    }
}

/// A failure while handling one event: retried with backoff, never acked.
#[derive(Debug, thiserror::Error)]
enum SyncError {
    #[error(transparent)]
    Mirror(#[from] MirrorError),
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("{0}")]
    Resolve(String),
}

impl SyncError {
    /// The URL of what failed, for the log line: the master's or the bus's.
    fn url(&self, nats_url: &str, mirror: &Mirror) -> String {
        match self {
            SyncError::Mirror(MirrorError::Fetch { .. } | MirrorError::Timeout { .. }) => mirror.shown_url().to_owned(),
            SyncError::Bus(_) => confcast_schemas::connect::redact_url(nats_url),
            SyncError::Mirror(_) | SyncError::Resolve(_) => String::new(),
        }
    }
}

/// What caused a sync: a commit event (by stream sequence) or the relay's start.
#[derive(Debug, Clone)]
struct Cause {
    /// Part of the dedup ids of what the sync publishes: `boot<ms>`, `e<seq>` or
    /// `e<first>-<last>`.
    tag: String,
    event_seq: u64,
    pushed_at_ms: u64,
    ref_name: Option<String>,
    commit: Option<String>,
    /// Sequences of the commit events handled, first and last; none at start.
    events: Option<(u64, u64)>,
}

impl std::fmt::Display for Cause {
    /// As logs show it: `start`, `event:17`, or `events:12-15`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.events {
            None => f.write_str("start"),
            Some((first, last)) if first == last => write!(f, "event:{last}"),
            Some((first, last)) => write!(f, "events:{first}-{last}"),
        }
    }
}

/// A service's new state, prepared off the async runtime.
struct Prepared {
    update: ServiceUpdate,
    snapshot: ServiceUpdate,
    /// Contents too large to travel inline: (blob id, bytes).
    large: Vec<(String, Vec<u8>)>,
}

/// How many services the relay publishes at once.
const CONCURRENT_PUBLISHES: usize = 16;

/// Runs the relay until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), RelayError> {
    let nats_shown = confcast_schemas::connect::redact_url(&config.nats_url);
    tracing::info!(
        version = %env!("CARGO_PKG_VERSION"),
        dc = %config.dc,
        master = %confcast_schemas::connect::redact_url(&config.master_url),
        nats = %nats_shown,
        state_dir = %config.state_dir.display(),
        index = %match &config.consul {
            Some(consul) => format!("nats-kv+consul {}", confcast_schemas::connect::redact_url(consul.url())),
            None => "nats-kv".to_owned(),
        },
        "relay starting"
    );
    crate::mirror::check_master(&config.master_url)?;
    let _lock = lock_state_dir(&config.state_dir)?;
    if let Some(addr) = config.listen {
        let listener =
            tokio::net::TcpListener::bind(addr).await.map_err(|source| RelayError::Listen { addr, source })?;
        tokio::spawn(crate::metrics::serve(listener, config.metrics.clone(), shutdown.clone()));
    }
    let mirror = Mirror::open_or_init(&config.state_dir.join("mirror.git"), &config.master_url, &config.git)?
        .with_io_timeout(config.fetch_timeout);
    let signer = config.signing_key.as_deref().map(Signer::from_file).transpose().map_err(RelayError::Signing)?;
    if let Some(signer) = &signer {
        tracing::info!(public_key = signer.public_key(), "signing every message for the datacenter's hosts");
    }
    let name = format!("confcast-relay {}", config.dc);
    let Some(client) = crate::publish::connect(&config.nats_url, &config.nats_auth, name, &shutdown)
        .await
        .map_err(RelayError::Auth)?
    else {
        return Ok(());
    };
    let opened =
        retry("opening streams", &nats_shown, &shutdown, || Bus::open(client.clone(), &config.dc, &config.streams));
    let Some(bus) = opened.await else { return Ok(()) };
    let bus = bus.with_signer(signer);

    // The durable consumer exists before the first sync, so no push made during the
    // sync is missed; created fresh, it starts at new events since the sync covers the past.
    let consumer = retry("creating the relay's consumer", &nats_shown, &shutdown, || relay_consumer(&bus, &config.dc));
    let Some(consumer) = consumer.await else { return Ok(()) };

    // A relay takes the datacenter's lease only once it has fetched from the master: a
    // relay that cannot (a master it cannot reach, credentials it lacks) must not hold
    // off a standby that can.
    if !first_fetch(&config, &mirror, &shutdown).await? {
        return Ok(());
    }

    // One relay per state dir (it holds the mirror), and the state dir names the relay.
    let holder = format!(
        "{}:{}",
        std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_owned()).unwrap_or_default(),
        config.state_dir.canonicalize().unwrap_or_else(|_| config.state_dir.clone()).display()
    );
    let lease = retry("opening the lease", &nats_shown, &shutdown, || {
        Lease::open(bus.jetstream(), &config.dc, holder.clone(), config.lease_ttl, config.streams.replicas)
    });
    let Some(lease) = lease.await else { return Ok(()) };
    loop {
        // A relay that stands by is ready too: it has done all it can until the lease
        // comes its way (acquiring an uncontested lease takes milliseconds).
        let acquire = lease.acquire(&shutdown);
        tokio::pin!(acquire);
        let revision = tokio::select! {
            revision = &mut acquire => revision,
            () = tokio::time::sleep(STANDBY_READY_AFTER) => {
                config.metrics.set_ready();
                acquire.await
            }
        };
        let Some(revision) = revision else { return Ok(()) };
        config.metrics.lease_held.set(1);
        tracing::info!(dc = %config.dc, %holder, "holding the datacenter's lease; handling its events");
        let lost = CancellationToken::new();
        let stop_keeping = CancellationToken::new();
        let keeper = tokio::spawn(lease.clone().keep(revision, lost.clone(), stop_keeping.clone()));
        let led = lead(&config, &bus, &mirror, &consumer, &shutdown, &lost).await;
        config.metrics.lease_held.set(0);
        stop_keeping.cancel();
        let _ = keeper.await;
        match led {
            Led::Shutdown => break,
            Led::Lost => continue,
        }
    }
    tracing::info!(dc = %config.dc, "relay stopped");
    Ok(())
}

/// The datacenter's durable consumer of commit events, shared by its relays.
async fn relay_consumer(bus: &Bus, dc: &str) -> Result<consumer::PullConsumer, BusError> {
    let commits =
        bus.jetstream().get_stream(subject::COMMITS_STREAM).await.map_err(|e| BusError::new("commit stream", e))?;
    commits
        .get_or_create_consumer(
            &subject::relay_consumer(dc),
            consumer::pull::Config {
                durable_name: Some(subject::relay_consumer(dc)),
                description: Some(format!("confcast relay of datacenter {dc}")),
                filter_subject: subject::commits_wildcard(),
                deliver_policy: consumer::DeliverPolicy::New,
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: Duration::from_secs(120),
                // Events are triggers (each handled by re-resolving the datacenter), so
                // their order does not matter: several may be pending, so that one held
                // by a relay that was killed does not block the others until ack_wait.
                max_ack_pending: 64,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| BusError::new("relay consumer", e))
}

/// Fetches the datacenter's document until the master answers once: true then, false
/// at shutdown. A failure that can never succeed (a transport gix does not have) ends
/// the relay; any other is retried, and logged as [`Warnings`] allow.
async fn first_fetch(config: &Config, mirror: &Mirror, shutdown: &CancellationToken) -> Result<bool, RelayError> {
    const WHAT: &str = "the first fetch from the master";
    let refs = BTreeSet::from([datacenter_ref(&config.dc)]);
    let mut backoff = Backoff::default();
    let mut warnings = Warnings::default();
    let mut told = false;
    loop {
        let fetched = tokio::select! {
            fetched = mirror.fetch_within(refs.clone(), config.fetch_timeout * 2) => fetched,
            () = shutdown.cancelled() => return Ok(false),
        };
        match fetched {
            Ok(_) => {
                warnings.recovered(WHAT, mirror.shown_url());
                return Ok(true);
            }
            Err(e) if !e.is_transient() => return Err(RelayError::Mirror(e)),
            Err(e) => {
                if !std::mem::replace(&mut told, true) {
                    tracing::info!(dc = %config.dc, "the datacenter's lease is left to other relays until the master can be fetched from");
                }
                let delay = backoff.next_delay();
                let cause = confcast_schemas::process::error_chain(&e);
                warnings.warn(WHAT, mirror.shown_url(), &cause, delay);
                tokio::select! { () = tokio::time::sleep(delay) => {}, () = shutdown.cancelled() => return Ok(false) }
            }
        }
    }
}

/// Why a relay stopped handling events.
enum Led {
    Shutdown,
    Lost,
}

/// Handles the datacenter's events while this relay holds the lease.
async fn lead(
    config: &Config,
    bus: &Bus,
    mirror: &Mirror,
    consumer: &consumer::PullConsumer,
    shutdown: &CancellationToken,
    lost: &CancellationToken,
) -> Led {
    // Stop at shutdown or when the lease is gone, whichever comes first.
    let stop = CancellationToken::new();
    let watch = {
        let (stop, shutdown, lost) = (stop.clone(), shutdown.clone(), lost.clone());
        tokio::spawn(async move {
            tokio::select! { () = shutdown.cancelled() => {}, () = lost.cancelled() => {} }
            stop.cancel();
        })
    };
    let result = lead_until(config, bus, mirror, consumer, &stop).await;
    watch.abort();
    if let Err(e) = result {
        tracing::error!(error = %e, "the relay loop failed; starting over");
    }
    if shutdown.is_cancelled() {
        Led::Shutdown
    } else {
        Led::Lost
    }
}

/// The leader's work: load what was published, catch up with the master, then handle
/// events until `shutdown`.
async fn lead_until(
    config: &Config,
    bus: &Bus,
    mirror: &Mirror,
    consumer: &consumer::PullConsumer,
    shutdown: &CancellationToken,
) -> Result<(), RelayError> {
    let bus = bus.clone();
    let mirror = mirror.clone();
    let nats_shown = confcast_schemas::connect::redact_url(&config.nats_url);
    let heads = tokio::select! {
        heads = retry("loading what was published", &nats_shown, shutdown, || bus.load_heads()) => heads,
        () = shutdown.cancelled() => return Ok(()),
    };
    let Some(heads) = heads else { return Ok(()) };
    let mut relay = Relay {
        dc: config.dc.clone(),
        bus,
        mirror,
        heads,
        watched: BTreeSet::new(),
        inventory: None,
        fetch_timeout: config.fetch_timeout,
        metrics: config.metrics.clone(),
        pack_dir: config.state_dir.join("mirror.git").join("objects").join("pack"),
        consul: config.consul.clone().map(|client| crate::consul::index::Feed::start(client, &config.dc)),
    };

    let boot = Cause {
        tag: format!("boot{}", now_ms()),
        event_seq: 0,
        pushed_at_ms: now_ms(),
        ref_name: None,
        commit: None,
        events: None,
    };
    let mut backoff = Backoff::default();
    let mut warnings = Warnings::default();
    loop {
        let first = BTreeSet::from([datacenter_ref(&relay.dc)]);
        tokio::select! {
            result = relay.sync(&boot, first) => match result {
                Ok(()) => break,
                Err(e) => {
                    relay.metrics.sync_failures.inc();
                    let delay = backoff.next_delay();
                    let url = e.url(&config.nats_url, &relay.mirror);
                    warnings.warn("the first sync", &url, &confcast_schemas::process::error_chain(&e), delay);
                    tokio::select! { () = tokio::time::sleep(delay) => {}, () = shutdown.cancelled() => return Ok(()) }
                }
            },
            () = shutdown.cancelled() => return Ok(()),
        }
    }
    warnings.recovered("the first sync", "");
    tracing::info!(dc = %relay.dc, services = relay.heads.len(), watched = relay.watched.len(), "relay ready");
    config.metrics.set_ready();

    let mut backoff = Backoff::default();
    let mut consuming = Warnings::default();
    let mut syncing = Warnings::default();
    'outer: loop {
        let mut messages = tokio::select! {
            m = consumer.messages() => match m {
                Ok(m) => {
                    consuming.recovered("consuming commit events", &nats_shown);
                    m
                }
                Err(e) => {
                    let delay = backoff.next_delay();
                    consuming.warn("consuming commit events", &nats_shown, &confcast_schemas::process::error_chain(&e), delay);
                    tokio::select! { () = tokio::time::sleep(delay) => continue, () = shutdown.cancelled() => break }
                }
            },
            () = shutdown.cancelled() => break,
        };
        loop {
            let next = tokio::select! { n = messages.next() => n, () = shutdown.cancelled() => break 'outer };
            let first = match next {
                Some(Ok(message)) => message,
                Some(Err(e)) => {
                    let cause = confcast_schemas::process::error_chain(&e);
                    consuming.warn("reading commit events", &nats_shown, &cause, None);
                    continue;
                }
                None => continue 'outer,
            };
            // Events are triggers: whatever else is already waiting is handled with this
            // one — one fetch of all their refs, one resolution — so a burst of pushes
            // costs the master and the relay about as much as one.
            let mut batch = vec![first];
            while batch.len() < BATCH_MAX {
                match messages.next().now_or_never() {
                    Some(Some(Ok(message))) => batch.push(message),
                    _ => break,
                }
            }
            relay.metrics.commit_events.inc_by(batch.len() as u64);
            let mut relevant = Vec::new();
            let mut refs = BTreeSet::new();
            for message in batch {
                let seq = message.info().map(|i| i.stream_sequence).unwrap_or(0);
                match decode::<CommitEvent>(&message.payload) {
                    Ok(event) if relay.watched.contains(&event.ref_name) => {
                        refs.insert(event.ref_name.clone());
                        relevant.push((message, seq, event));
                    }
                    Ok(_) => {
                        let _ = message.ack().await;
                    }
                    Err(e) => {
                        tracing::error!(seq, error = %e, "unreadable commit event, dropping it");
                        let _ = message.ack_with(AckKind::Term).await;
                    }
                }
            }
            let (Some((_, first_seq, oldest)), Some((_, last_seq, newest))) = (relevant.first(), relevant.last())
            else {
                continue;
            };
            let cause = Cause {
                tag: if first_seq == last_seq { format!("e{last_seq}") } else { format!("e{first_seq}-{last_seq}") },
                event_seq: *last_seq,
                pushed_at_ms: oldest.pushed_at_ms,
                ref_name: Some(newest.ref_name.clone()),
                commit: newest.new.clone(),
                events: Some((*first_seq, *last_seq)),
            };
            let events = relevant.len();
            match relay.sync(&cause, refs).await {
                Ok(()) => {
                    backoff = Backoff::default();
                    syncing.recovered("handling commit events", "");
                    for (message, seq, _) in relevant {
                        if let Err(e) = message.double_ack().await {
                            tracing::warn!(seq, error = %e, "ack of commit event failed; it will be redelivered and found done");
                        }
                    }
                }
                Err(e) => {
                    relay.metrics.sync_failures.inc();
                    let delay = backoff.next_delay();
                    let url = e.url(&config.nats_url, &relay.mirror);
                    let what = format!(
                        "handling {events} commit event(s) ({cause}, {})",
                        cause.ref_name.as_deref().unwrap_or("-")
                    );
                    syncing.warn(&what, &url, &confcast_schemas::process::error_chain(&e), delay);
                    for (message, _, _) in relevant {
                        let _ = message.ack_with(AckKind::Nak(Some(delay))).await;
                    }
                }
            }
        }
    }
    Ok(())
}

/// How long a relay waits for the lease before it reports itself ready as a standby.
const STANDBY_READY_AFTER: Duration = Duration::from_secs(2);

/// At most this many waiting events are handled together (the consumer's
/// `max_ack_pending` bounds it too).
const BATCH_MAX: usize = 64;

struct Relay {
    dc: String,
    bus: Bus,
    mirror: Mirror,
    heads: BTreeMap<(Kind, String), ServiceHead>,
    watched: BTreeSet<String>,
    inventory: Option<Inventory>,
    /// The writer of the index's copy in Consul, with `--consul`.
    consul: Option<crate::consul::index::Feed>,
    fetch_timeout: Duration,
    metrics: std::sync::Arc<Metrics>,
    /// The mirror's pack directory, whose growth is what a fetch transferred.
    pack_dir: PathBuf,
}

impl Relay {
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(Mirror) -> Result<T, SyncError> + Send + 'static,
    ) -> Result<T, SyncError> {
        let mirror = self.mirror.clone();
        tokio::task::spawn_blocking(move || f(mirror))
            .await
            .map_err(|e| SyncError::Resolve(format!("worker panicked: {e}")))?
    }

    /// Fetches `refs` into the mirror, failing after twice the fetch timeout even if the
    /// transport hangs (the stuck worker is abandoned; `git://` sockets time out by
    /// themselves).
    async fn fetch(&self, refs: BTreeSet<String>) -> Result<crate::mirror::Fetched, SyncError> {
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
    async fn sync(&mut self, cause: &Cause, first: BTreeSet<String>) -> Result<(), SyncError> {
        let started = Instant::now();
        let mut fetched: BTreeSet<String> = BTreeSet::new();
        let mut to_fetch = first;
        let dc = self.dc.clone();
        let resolved = loop {
            if !to_fetch.is_empty() {
                let outcome = self.fetch(to_fetch.clone()).await?;
                tracing::debug!(present = outcome.present.len(), missing = outcome.missing.len(), "fetched");
                fetched.extend(to_fetch);
            }
            let dc = dc.clone();
            let resolved = self.blocking(move |m| Ok(resolve(&dc, &m))).await?;
            to_fetch = resolved
                .watched
                .iter()
                .filter(|r| !self.watched.contains(*r) && !fetched.contains(*r))
                .cloned()
                .collect();
            if to_fetch.is_empty() {
                break resolved;
            }
        };
        let resolution = match resolved.outcome {
            Err(e) if e.is_transient() => return Err(SyncError::Resolve(e.to_string())),
            Err(e) => {
                tracing::error!(error = %e, "datacenter cannot be resolved; keeping the last good pins");
                self.publish_error(cause, format!("{e}; keeping the last good configuration")).await?;
                // The last good pins are the published heads: their refs stay watched
                // and keep flowing, so one bad document does not freeze the datacenter.
                let heads: Vec<ServiceHead> = self.heads.values().filter(|h| h.commit.is_some()).cloned().collect();
                let fallback_refs: BTreeSet<String> = heads.iter().map(|h| h.ref_name.clone()).collect();
                let missing: BTreeSet<String> = fallback_refs
                    .iter()
                    .filter(|r| !self.watched.contains(*r) && !fetched.contains(*r))
                    .cloned()
                    .collect();
                if !missing.is_empty() {
                    self.fetch(missing).await?;
                }
                self.watched = resolved.watched.into_iter().chain(fallback_refs).collect();
                let resolution =
                    self.blocking(move |m| Ok(last_good(&m, &heads))).await?.map_err(SyncError::Resolve)?;
                let published = self.apply(cause, resolution, false).await?;
                self.metrics.synced();
                tracing::info!(
                    published,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "synced on the last good pins"
                );
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

    /// Publishes what changed. `authoritative` is false for the last-good fallback:
    /// then nothing is removed and the inventory is left as it was.
    async fn apply(&mut self, cause: &Cause, resolution: Resolution, authoritative: bool) -> Result<usize, SyncError> {
        let mut published = 0;
        for ((kind, name), ref_name) in &resolution.unresolved {
            let kept = self.heads.get(&(*kind, name.clone())).and_then(|h| h.commit.clone());
            let message = match kept {
                Some(commit) => format!(
                    "{kind} {name:?} is pinned to {ref_name}, which does not exist on the master; keeping {commit}"
                ),
                None => format!(
                    "{kind} {name:?} is pinned to {ref_name}, which does not exist on the master; it is not published"
                ),
            };
            tracing::error!(%kind, %name, %ref_name, "{message}");
            self.publish_error(cause, message).await?;
        }
        let mut changed = Vec::new();
        for ((kind, name), target) in &resolution.targets {
            let head = self.heads.get(&(*kind, name.clone()));
            if head.is_some_and(|h| h.commit.as_deref() == Some(target.commit.as_str())) {
                let head = head.expect("checked");
                if head.ref_name != target.ref_name || head.version != target.version {
                    // Same files under another name: only the index and head move.
                    self.publish_head(cause, *kind, name, Some(target), head.commit.clone(), head.tree.clone()).await?;
                }
                continue;
            }
            changed.push((*kind, name.as_str(), target));
        }
        // Services are independent of each other: several are published at once (each
        // in its own order), which is what a burst of pushes needs.
        let this = &*self;
        let outcomes: Vec<_> = futures::stream::iter(changed.iter().map(|(kind, name, target)| async move {
            (*kind, *name, *target, this.publish_service(cause, *kind, name, target).await)
        }))
        .buffered(CONCURRENT_PUBLISHES)
        .collect()
        .await;
        let mut failure = None;
        for (kind, name, target, outcome) in outcomes {
            match outcome {
                Ok(head) => {
                    self.heads.insert((kind, name.to_owned()), head);
                    published += 1;
                }
                Err(PublishError::Sync(e)) => failure = failure.or(Some(e)),
                Err(PublishError::BadTree(message)) => {
                    tracing::error!(%kind, %name, commit = %target.commit, "{message}");
                    self.publish_error(cause, message).await?;
                }
            }
        }
        if let Some(e) = failure {
            return Err(e);
        }
        let dropped: Vec<(Kind, String)> = self
            .heads
            .iter()
            .filter(|_| authoritative)
            .filter(|(key, head)| {
                head.commit.is_some()
                    && !resolution.targets.contains_key(*key)
                    && !resolution.unresolved.contains_key(*key)
            })
            .map(|(key, _)| key.clone())
            .collect();
        for (kind, name) in dropped {
            self.publish_removal(cause, kind, &name).await?;
            published += 1;
        }
        let inventory = Inventory {
            v: WIRE_VERSION,
            dc: self.dc.clone(),
            conf_ref: resolution.conf_ref.clone(),
            hosts: resolution.hosts.clone(),
        };
        if authoritative && self.inventory.as_ref() != Some(&inventory) {
            let id = format!("{}/inventory@{}", self.dc, cause.tag);
            self.bus.publish(subject::inventory_subject(&self.dc), &id, encode(&inventory)).await?;
            self.inventory = Some(inventory);
        }
        self.index_to_consul(cause).await?;
        Ok(published)
    }

    /// Publishes a service's new state: snapshot, update, then head and index, in that
    /// order. Returns its head, for [`Relay::heads`]. Takes `&self` so that several
    /// services are published at once.
    async fn publish_service(
        &self,
        cause: &Cause,
        kind: Kind,
        name: &str,
        target: &Target,
    ) -> Result<ServiceHead, PublishError> {
        let head = self.heads.get(&(kind, name.to_owned())).cloned();
        let (dc, cause2, name2, target2) = (self.dc.clone(), cause.clone(), name.to_owned(), target.clone());
        let prepared = self
            .blocking(move |m| Ok(prepare(&m, &dc, &cause2, kind, &name2, &target2, head.as_ref())))
            .await?
            .map_err(|e| match e {
                Prepare::Mirror(e) => PublishError::Sync(SyncError::Mirror(e)),
                Prepare::BadTree(m) => PublishError::BadTree(m),
            })?;
        for (blob, content) in &prepared.large {
            self.bus.ensure_blob(blob, content).await.map_err(SyncError::from)?;
        }
        let update = &prepared.update;
        let id = format!(
            "{}/{kind}/{name}/{}..{}@{}",
            self.dc,
            update.from.as_deref().unwrap_or("none"),
            target.commit,
            cause.tag
        );
        // The snapshot goes first: a host that resyncs never finds a snapshot older
        // than an update it has seen.
        self.bus
            .publish(
                subject::snapshot_subject(&self.dc, kind, name),
                &format!("{id}/snapshot"),
                encode(&prepared.snapshot),
            )
            .await
            .map_err(SyncError::from)?;
        self.bus
            .publish(subject::update_subject(&self.dc, kind, name), &id, encode(update))
            .await
            .map_err(SyncError::from)?;
        self.metrics.updates_published.inc();
        tracing::info!(%kind, %name, from = update.from.as_deref().unwrap_or("-"), to = %target.commit, entries = update.entries.len(), "published update");
        let (old, head) = self.next_head(kind, name, Some(target), Some(target.commit.clone()), update.tree.clone());
        self.write_head(cause, kind, name, old.as_ref(), &head).await?;
        Ok(head)
    }

    async fn publish_removal(&mut self, cause: &Cause, kind: Kind, name: &str) -> Result<(), SyncError> {
        let head = self.heads.get(&(kind, name.to_owned())).cloned();
        let removal = ServiceUpdate {
            v: WIRE_VERSION,
            dc: self.dc.clone(),
            kind,
            name: name.to_owned(),
            ref_name: String::new(),
            branch: head.as_ref().map(|h| h.branch.clone()).unwrap_or_default(),
            version: head.as_ref().map(|h| h.version.clone()).unwrap_or_default(),
            from: head.as_ref().and_then(|h| h.commit.clone()),
            to: None,
            tree: None,
            snapshot: false,
            entries: Vec::new(),
            event_seq: cause.event_seq,
            pushed_at_ms: cause.pushed_at_ms,
            published_at_ms: now_ms(),
        };
        let id =
            format!("{}/{kind}/{name}/{}..removed@{}", self.dc, removal.from.as_deref().unwrap_or("none"), cause.tag);
        let snapshot = ServiceUpdate { snapshot: true, from: None, ..removal.clone() };
        self.bus
            .publish(subject::snapshot_subject(&self.dc, kind, name), &format!("{id}/snapshot"), encode(&snapshot))
            .await?;
        self.bus.publish(subject::update_subject(&self.dc, kind, name), &id, encode(&removal)).await?;
        self.metrics.updates_published.inc();
        tracing::info!(%kind, %name, "published removal");
        self.publish_head(cause, kind, name, None, None, None).await
    }

    async fn publish_head(
        &mut self,
        cause: &Cause,
        kind: Kind,
        name: &str,
        target: Option<&Target>,
        commit: Option<String>,
        tree: Option<String>,
    ) -> Result<(), SyncError> {
        let (old, head) = self.next_head(kind, name, target, commit, tree);
        self.write_head(cause, kind, name, old.as_ref(), &head).await?;
        self.heads.insert((kind, name.to_owned()), head);
        Ok(())
    }

    /// The head a service gets, and the one it had.
    fn next_head(
        &self,
        kind: Kind,
        name: &str,
        target: Option<&Target>,
        commit: Option<String>,
        tree: Option<String>,
    ) -> (Option<ServiceHead>, ServiceHead) {
        let old = self.heads.get(&(kind, name.to_owned())).cloned();
        let head = ServiceHead {
            v: WIRE_VERSION,
            kind,
            name: name.to_owned(),
            ref_name: target.map(|t| t.ref_name.clone()).unwrap_or_default(),
            branch: target
                .map(|t| t.branch.clone())
                .or_else(|| old.as_ref().map(|h| h.branch.clone()))
                .unwrap_or_default(),
            version: target
                .map(|t| t.version.clone())
                .or_else(|| old.as_ref().map(|h| h.version.clone()))
                .unwrap_or_default(),
            commit,
            tree,
        };
        (old, head)
    }

    /// Publishes a service's head and moves its index key.
    async fn write_head(
        &self,
        cause: &Cause,
        kind: Kind,
        name: &str,
        old: Option<&ServiceHead>,
        head: &ServiceHead,
    ) -> Result<(), SyncError> {
        let id =
            format!("{}/{kind}/{name}/head/{}@{}", self.dc, head.commit.as_deref().unwrap_or("removed"), cause.tag);
        self.bus.publish(subject::head_subject(&self.dc, kind, name), &id, encode(head)).await?;
        // The index: one key per (service, version); a version that is no longer the
        // datacenter's goes away.
        if let Some(old) = old {
            if old.commit.is_some() && (old.version != head.version || head.commit.is_none()) {
                self.bus.delete_index(&subject::index_key(&self.dc, kind, name, &old.version)).await?;
            }
        }
        if let Some(commit) = &head.commit {
            self.bus
                .put_index(
                    &subject::index_key(&self.dc, kind, name, &head.version),
                    &format!("{}/{commit}", head.branch),
                )
                .await?;
        }
        Ok(())
    }

    /// Hands the whole index, as now published, to the Consul writer: once per handled
    /// batch, so that all its changes reach Consul together.
    async fn index_to_consul(&mut self, cause: &Cause) -> Result<(), SyncError> {
        let index = self
            .heads
            .values()
            .filter_map(|h| {
                let commit = h.commit.as_ref()?;
                let key = subject::index_key(&self.dc, h.kind, &h.name, &h.version);
                Some((key, format!("{}/{commit}", h.branch).into_bytes()))
            })
            .collect();
        let Some(consul) = &mut self.consul else { return Ok(()) };
        for message in consul.update(index) {
            tracing::error!("{message}");
            self.publish_error(cause, message).await?;
        }
        Ok(())
    }

    async fn publish_error(&self, cause: &Cause, message: String) -> Result<(), SyncError> {
        let event = ErrorEvent {
            v: WIRE_VERSION,
            dc: self.dc.clone(),
            ref_name: cause.ref_name.clone(),
            commit: cause.commit.clone(),
            message,
            at_ms: now_ms(),
        };
        let id = format!("{}/error/{}/{}", self.dc, cause.tag, short_hash(&event.message));
        self.bus.publish(subject::error_subject(&self.dc), &id, encode(&event)).await?;
        self.metrics.error_events.inc();
        Ok(())
    }
}

enum PublishError {
    Sync(SyncError),
    BadTree(String),
}

impl From<SyncError> for PublishError {
    fn from(e: SyncError) -> Self {
        PublishError::Sync(e)
    }
}

enum Prepare {
    Mirror(MirrorError),
    BadTree(String),
}

impl From<MirrorError> for Prepare {
    fn from(e: MirrorError) -> Self {
        Prepare::Mirror(e)
    }
}

fn short_hash(s: &str) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    s.hash(&mut h);
    format!("{:016x}", h.finish())
}

/// Builds the diff from the last published commit, and the full snapshot, of one
/// service. Blocking: reads the mirror.
fn prepare(
    mirror: &Mirror,
    dc: &str,
    cause: &Cause,
    kind: Kind,
    name: &str,
    target: &Target,
    head: Option<&ServiceHead>,
) -> Result<Prepared, Prepare> {
    let new = mirror.listing(&target.commit)?;
    let tree = mirror.tree_of(&target.commit)?;
    let bad = |e: path::PathError| {
        Prepare::BadTree(format!("{kind} {name:?} at {} ({}): {e}; not published", target.commit, target.ref_name))
    };
    // Containment is a property of the whole tree (a link can leave through another
    // one), so every link is gathered first and judged once; files need only their path.
    let mut contents: BTreeMap<[u8; 20], Vec<u8>> = BTreeMap::new();
    let mut links = path::Links::new();
    for (p, item) in &new {
        path::check_relative(p).map_err(bad)?;
        if item.mode == FileMode::Symlink {
            let link = mirror.blob(&item.blob)?;
            links.insert(p.clone(), link.clone());
            contents.insert(item.blob, link);
        }
    }
    links.check().map_err(bad)?;
    // Diff against what was last published, if the mirror still has it; otherwise
    // (a new service, or a mirror rebuilt from scratch) the update is a full tree.
    let base = match head.and_then(|h| h.commit.clone()) {
        Some(commit) => mirror.listing(&commit).ok().map(|listing| (commit, listing)),
        None => None,
    };
    let (from, changes) = match &base {
        Some((commit, old)) => (Some(commit.clone()), diff(old, &new)),
        None => (None, diff(&Listing::new(), &new)),
    };
    let mut large = Vec::new();
    let mut entry_for = |path: &[u8],
                         change: ChangeKind,
                         item: Option<crate::diff::Item>,
                         from_path: Option<Vec<u8>>|
     -> Result<Entry, Prepare> {
        let (mut content, mut object) = (None, None);
        if let (Some(item), ChangeKind::Add | ChangeKind::Modify) = (item, change) {
            let bytes = match contents.get(&item.blob) {
                Some(bytes) => bytes.clone(),
                None => mirror.blob(&item.blob)?,
            };
            let blob = hex(&item.blob);
            if bytes.len() > INLINE_LIMIT {
                object = Some(format!("blob/{blob}"));
                if !large.iter().any(|(b, _): &(String, Vec<u8>)| *b == blob) {
                    large.push((blob, bytes));
                }
            } else {
                content = Some(ByteBuf::from(bytes));
            }
        }
        Ok(Entry {
            path: ByteBuf::from(path.to_vec()),
            change,
            mode: item.map(|i| i.mode),
            blob: item.map(|i| hex(&i.blob)),
            content,
            object,
            from_path: from_path.map(ByteBuf::from),
        })
    };
    let mut entries = Vec::with_capacity(changes.len());
    for c in &changes {
        entries.push(entry_for(&c.path, c.kind, c.item, c.from_path.clone())?);
    }
    let snapshot_entries = if from.is_none() {
        entries.clone()
    } else {
        let mut all = Vec::with_capacity(new.len());
        for (p, item) in &new {
            all.push(entry_for(p, ChangeKind::Add, Some(*item), None)?);
        }
        all
    };
    let update = ServiceUpdate {
        v: WIRE_VERSION,
        dc: dc.to_owned(),
        kind,
        name: name.to_owned(),
        ref_name: target.ref_name.clone(),
        branch: target.branch.clone(),
        version: target.version.clone(),
        snapshot: from.is_none(),
        from,
        to: Some(target.commit.clone()),
        tree: Some(tree),
        entries,
        event_seq: cause.event_seq,
        pushed_at_ms: cause.pushed_at_ms,
        published_at_ms: now_ms(),
    };
    let snapshot = ServiceUpdate { from: None, snapshot: true, entries: snapshot_entries, ..update.clone() };
    Ok(Prepared { update, snapshot, large })
}

/// The last good resolution, rebuilt from the published heads: each service stays on
/// the ref it was published from, at that ref's current commit.
fn last_good(mirror: &Mirror, heads: &[ServiceHead]) -> Result<Resolution, String> {
    let mut resolution = Resolution {
        conf_ref: String::new(),
        targets: BTreeMap::new(),
        unresolved: BTreeMap::new(),
        hosts: BTreeMap::new(),
    };
    for head in heads {
        let key = (head.kind, head.name.clone());
        match mirror.commit_of(&head.ref_name)? {
            Some(commit) => {
                let target = Target {
                    ref_name: head.ref_name.clone(),
                    branch: head.branch.clone(),
                    version: head.version.clone(),
                    commit,
                };
                resolution.targets.insert(key, target);
            }
            None => {
                resolution.unresolved.insert(key, head.ref_name.clone());
            }
        }
    }
    Ok(resolution)
}

/// The pack files of the mirror and their sizes.
fn packs(dir: &std::path::Path) -> BTreeMap<std::ffi::OsString, u64> {
    let Ok(entries) = std::fs::read_dir(dir) else { return BTreeMap::new() };
    entries
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "pack"))
        .filter_map(|e| Some((e.file_name(), e.metadata().ok()?.len())))
        .collect()
}

/// Bytes a fetch added to the mirror: the sizes of its new packs. When a pack went away
/// the mirror was repacked during the fetch, and its own share cannot be told: 0.
fn fetched_bytes(before: &BTreeMap<std::ffi::OsString, u64>, after: &BTreeMap<std::ffi::OsString, u64>) -> u64 {
    if before.keys().any(|name| !after.contains_key(name)) {
        return 0;
    }
    after.iter().filter(|(name, _)| !before.contains_key(*name)).map(|(_, size)| size).sum()
}

fn hex(bytes: &[u8; 20]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cause(events: Option<(u64, u64)>) -> Cause {
        Cause { tag: String::new(), event_seq: 0, pushed_at_ms: 0, ref_name: None, commit: None, events }
    }

    #[test]
    fn causes_read_as_what_they_are() {
        assert_eq!(cause(None).to_string(), "start");
        assert_eq!(cause(Some((17, 17))).to_string(), "event:17");
        assert_eq!(cause(Some((12, 15))).to_string(), "events:12-15");
    }
}
