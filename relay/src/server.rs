//! The relay's lifecycle: lock the state directory, serve the metrics, open the mirror,
//! connect to NATS, open the datacenter's streams and its commit consumer, fetch from
//! the master once, then take the datacenter's lease and, while holding it, catch up
//! with the master and handle commit events ([`crate::events`]) until shutdown or the
//! lease is lost, and stand by again.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use confcast_schemas::connect::{redact_url, Identity};
use confcast_schemas::process::error_chain;
use confcast_schemas::retry::{retry, Backoff, Warnings};
use confcast_schemas::sign::Signer;
use tokio_util::sync::CancellationToken;

use crate::bus::Bus;
use crate::cause::Cause;
use crate::config::Config;
use crate::error::RelayError;
use crate::lease::Lease;
use crate::mirror::Mirror;
use crate::publish::Publisher;
use crate::resolve::datacenter_ref;
use crate::rollout::Rollouts;
use crate::sync::Datacenter;
use std::sync::Arc;

/// How long a relay waits for the lease before it reports itself ready as a standby.
const STANDBY_READY_AFTER: Duration = Duration::from_secs(2);
/// How often the relay pings its NATS server: two missed pings (a black-holed network)
/// and it reconnects.
const PING_INTERVAL: Duration = Duration::from_secs(5);

/// Runs the relay until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), RelayError> {
    log_start(&config);
    crate::mirror::check_master(&config.master_url)?;
    let _lock = lock_state_dir(&config.state_dir)?;
    if let Some(addr) = config.listen {
        let listener =
            tokio::net::TcpListener::bind(addr).await.map_err(|source| RelayError::Listen { addr, source })?;
        tokio::spawn(crate::metrics::serve(listener, config.metrics.clone(), shutdown.clone()));
    }
    let mirror = Mirror::open_or_init(&config.mirror_dir(), &config.master_url, &config.git)?
        .with_io_timeout(config.fetch_timeout);
    let signer = config.signing_key.as_deref().map(Signer::from_file).transpose().map_err(RelayError::Signing)?;
    if let Some(signer) = &signer {
        tracing::info!(public_key = signer.public_key(), "signing every message for the datacenter's hosts");
    }
    let identity = Identity { name: format!("confcast-relay {}", config.dc), ping_interval: Some(PING_INTERVAL) };
    let connected = confcast_schemas::connect::connect(&config.nats_url, &config.nats_auth, &identity, &shutdown);
    let Some(client) = connected.await.map_err(RelayError::Auth)? else { return Ok(()) };
    let nats_shown = config.nats_shown();
    let opened =
        retry("opening streams", &nats_shown, &shutdown, || Bus::open(client.clone(), &config.dc, &config.streams));
    let Some(bus) = opened.await else { return Ok(()) };
    let bus = bus.with_signer(signer);

    // The durable consumer exists before the first sync, so no push made during the
    // sync is missed; created fresh, it starts at new events since the sync covers the past.
    let consumer =
        retry("creating the relay's consumer", &nats_shown, &shutdown, || crate::events::consumer(&bus, &config.dc));
    let Some(consumer) = consumer.await else { return Ok(()) };

    // A relay takes the datacenter's lease only once it has fetched from the master: a
    // relay that cannot (a master it cannot reach, credentials it lacks) must not hold
    // off a standby that can.
    if !first_fetch(&config, &mirror, &shutdown).await? {
        return Ok(());
    }
    let relay = Relay { config: &config, bus: &bus, mirror: &mirror, consumer: &consumer };
    relay.lead_while_leased(&shutdown).await;
    Ok(())
}

/// Says what the relay starts with.
fn log_start(config: &Config) {
    tracing::info!(
        version = %env!("CARGO_PKG_VERSION"),
        dc = %config.dc,
        master = %redact_url(&config.master_url),
        nats = %config.nats_shown(),
        state_dir = %config.state_dir.display(),
        index = %match &config.consul {
            Some(consul) => format!("nats-kv+consul {}", redact_url(consul.url())),
            None => "nats-kv".to_owned(),
        },
        "relay starting"
    );
}

/// Locks `<state_dir>/relay.lock` for the life of the relay.
fn lock_state_dir(state_dir: &Path) -> Result<std::fs::File, RelayError> {
    let path = state_dir.join("relay.lock");
    let fail = |source| RelayError::StateDir { path: path.clone(), source };
    std::fs::create_dir_all(state_dir).map_err(fail)?;
    let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(fail)?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(RelayError::StateDirInUse { path }),
        Err(std::fs::TryLockError::Error(e)) => Err(fail(e)),
    }
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
                warnings.warn(WHAT, mirror.shown_url(), &error_chain(&e), delay);
                tokio::select! { () = tokio::time::sleep(delay) => {}, () = shutdown.cancelled() => return Ok(false) }
            }
        }
    }
}

/// Who holds a datacenter's lease: the host and the state directory, since one relay
/// runs per state directory (it holds the mirror).
fn holder(config: &Config) -> String {
    format!(
        "{}:{}",
        std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_owned()).unwrap_or_default(),
        config.state_dir.canonicalize().unwrap_or_else(|_| config.state_dir.clone()).display()
    )
}

/// Why a relay stopped handling events.
enum Led {
    Shutdown,
    Lost,
}

/// What a relay has once it is connected and has fetched from the master.
struct Relay<'a> {
    config: &'a Config,
    bus: &'a Bus,
    mirror: &'a Mirror,
    consumer: &'a PullConsumer,
}

impl Relay<'_> {
    /// Takes the datacenter's lease, handles its events while holding it, and stands by
    /// again when it is lost, until shutdown.
    async fn lead_while_leased(&self, shutdown: &CancellationToken) {
        let config = self.config;
        let holder = holder(config);
        let nats_shown = config.nats_shown();
        let lease = retry("opening the lease", &nats_shown, shutdown, || {
            Lease::open(self.bus.jetstream(), &config.dc, holder.clone(), config.lease_ttl, config.streams.replicas)
        });
        let Some(lease) = lease.await else { return };
        loop {
            // A relay that stands by is ready too: it has done all it can until the lease
            // comes its way (acquiring an uncontested lease takes milliseconds).
            let acquire = lease.acquire(shutdown);
            tokio::pin!(acquire);
            let revision = tokio::select! {
                revision = &mut acquire => revision,
                () = tokio::time::sleep(STANDBY_READY_AFTER) => {
                    config.metrics.set_ready();
                    acquire.await
                }
            };
            let Some(revision) = revision else { return };
            config.metrics.lease_held.set(1);
            tracing::info!(dc = %config.dc, %holder, "holding the datacenter's lease; handling its events");
            let lost = CancellationToken::new();
            let stop_keeping = CancellationToken::new();
            let keeper = tokio::spawn(lease.clone().keep(revision, lost.clone(), stop_keeping.clone()));
            let led = self.lead(shutdown, &lost).await;
            config.metrics.lease_held.set(0);
            stop_keeping.cancel();
            let _ = keeper.await;
            match led {
                Led::Shutdown => break,
                Led::Lost => continue,
            }
        }
        tracing::info!(dc = %config.dc, "relay stopped");
    }

    /// Handles the datacenter's events while this relay holds the lease.
    async fn lead(&self, shutdown: &CancellationToken, lost: &CancellationToken) -> Led {
        // Stop at shutdown or when the lease is gone, whichever comes first.
        let stop = CancellationToken::new();
        let watch = {
            let (stop, shutdown, lost) = (stop.clone(), shutdown.clone(), lost.clone());
            tokio::spawn(async move {
                tokio::select! { () = shutdown.cancelled() => {}, () = lost.cancelled() => {} }
                stop.cancel();
            })
        };
        self.lead_until(&stop).await;
        watch.abort();
        if shutdown.is_cancelled() {
            Led::Shutdown
        } else {
            Led::Lost
        }
    }

    /// The leader's work: load what was published, catch up with the master, then
    /// handle events until `stop`.
    async fn lead_until(&self, stop: &CancellationToken) {
        let nats_shown = self.config.nats_shown();
        let heads = tokio::select! {
            heads = retry("loading what was published", &nats_shown, stop, || self.bus.load_heads()) => heads,
            () = stop.cancelled() => return,
        };
        let Some(heads) = heads else { return };
        let (dc, peers) = (&self.config.dc, self.config.peers.clone());
        let rollouts = tokio::select! {
            loaded = retry("loading the rollouts", &nats_shown, stop, || Rollouts::load(dc, self.bus, peers.clone())) => loaded,
            () = stop.cancelled() => return,
        };
        let Some(rollouts) = rollouts else { return };
        let rollouts = Arc::new(rollouts);
        let publisher = Publisher::new(&self.config.dc, self.bus.clone(), self.config.metrics.clone());
        let mut datacenter =
            Datacenter::new(self.config, self.mirror.clone(), publisher.clone(), heads, rollouts.clone());
        // Controls are answered from the start: an operator's "abort" must not wait for
        // a slow catch-up.
        let verifier = self.config.controls.0.clone();
        tokio::spawn(crate::rollout::control::serve(rollouts.clone(), verifier, stop.clone()));
        if !catch_up(&mut datacenter, &nats_shown, stop).await {
            return;
        }
        tokio::spawn(rollouts.run(publisher, stop.clone()));
        let (services, watched) = (datacenter.heads.len(), datacenter.watched.len());
        tracing::info!(dc = %datacenter.dc, services, watched, "relay ready");
        self.config.metrics.set_ready();
        crate::events::handle(&mut datacenter, self.consumer, &nats_shown, stop).await;
    }
}

/// The first sync of a leader, from the datacenter's document, retried until it
/// succeeds (true) or `stop` (false).
async fn catch_up(datacenter: &mut Datacenter, nats_shown: &str, stop: &CancellationToken) -> bool {
    let boot = Cause::boot();
    let mut backoff = Backoff::default();
    let mut warnings = Warnings::default();
    loop {
        let first = BTreeSet::from([datacenter_ref(&datacenter.dc)]);
        tokio::select! {
            result = datacenter.sync(&boot, first) => match result {
                Ok(()) => break,
                Err(e) => {
                    datacenter.metrics.sync_failures.inc();
                    let delay = backoff.next_delay();
                    let url = e.url(nats_shown, &datacenter.mirror);
                    warnings.warn("the first sync", &url, &error_chain(&e), delay);
                    tokio::select! { () = tokio::time::sleep(delay) => {}, () = stop.cancelled() => return false }
                }
            },
            () = stop.cancelled() => return false,
        }
    }
    warnings.recovered("the first sync", "");
    true
}
