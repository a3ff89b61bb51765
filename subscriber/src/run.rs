//! The subscriber loop: the host's services' updates in, trees on disk, processes told.
//!
//! Each host reads its datacenter's update stream through an ephemeral ordered
//! consumer that starts right after the host's own recorded position, so the server
//! keeps nothing per host. An update applies when it starts from the commit in place;
//! one that reaches a commit already in place is skipped; anything else is a gap and
//! is resolved from the service's snapshot, never by guessing.
//!
//! Before anything else it takes its state directory ([`crate::lock`]) and says how it
//! was started; while the datacenter is not ready it waits and says why
//! ([`crate::waiting`]); which services it follows, and when one leaves the host, is
//! decided in [`crate::selection`].

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{consumer, stream};
use confcast_schemas::connect::redact_url;
use confcast_schemas::message::now_ms;
use confcast_schemas::sign::Verifier;
use confcast_schemas::{decode, encode, subject, HostStatus, Kind, ServiceUpdate, WIRE_VERSION};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::bus::{ReadError, Reader};
use crate::exec::{notify, Change, Notify};
use crate::live::{Live, ServiceLabel};
use crate::lock::{LockError, StateDirLock};
use crate::materialize::{self, ApplyError, Layout};
use crate::schedule::{Job, Limit, NatsSlots, Policy, Ran, Runner, Scheduler};
use crate::selection::{check_distinct, list, unpublished, Plan, Removal, Selection, Service};
use crate::state::{key, parse_key, Position, ServiceState};
use crate::waiting::{self, Every, REPEAT};

/// What a subscriber needs to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// NATS URL of the datacenter's server.
    pub nats_url: String,
    /// The datacenter.
    pub dc: String,
    /// The services to follow.
    pub selection: Selection,
    /// Where `<dir>/<service>` links are kept.
    pub dir: PathBuf,
    /// Where trees and the position live.
    pub state_dir: PathBuf,
    /// What to run after a change.
    pub notify: Notify,
    /// Host id used in status reports.
    pub host_id: String,
    /// Where to serve the host's configuration as JSON (`--listen`), if anywhere.
    pub listen: Option<crate::serve::Listen>,
    /// How `--listen` is exposed (remote TCP allowed, the unix socket's mode and group).
    pub listen_options: crate::serve::ListenOptions,
    /// How often the applied trees are re-hashed and compared with what was applied
    /// (besides once at start); `None` disables the periodic check.
    pub verify_interval: Option<Duration>,
    /// NATS credentials and TLS.
    pub nats_auth: confcast_schemas::connect::NatsAuth,
    /// Public keys whose signatures are accepted; empty: signatures are not checked.
    pub trusted_keys: Vec<String>,
    /// Upper bound of the random delay before `--exec` runs for a change.
    pub splay: Duration,
    /// At most this many hosts of the datacenter run their exec for the same change at
    /// once (coordinated through NATS); `None`: no limit.
    pub max_parallel: Option<usize>,
    /// Owner, group and modes of each service's files (`--owner`, `--group`,
    /// `--file-mode`, `--dir-mode`).
    pub perms: crate::perms::PermsConfig,
}

/// Why the subscriber stopped.
#[derive(Debug, thiserror::Error)]
pub enum SubscriberError {
    /// Another subscriber holds the state directory, or it cannot be locked.
    #[error(transparent)]
    StateDir(#[from] LockError),
    /// The NATS connection could not be set up.
    #[error("connecting to NATS: {0}")]
    Connect(String),
    /// A NATS credential or certificate cannot be used.
    #[error(transparent)]
    Auth(#[from] confcast_schemas::connect::AuthError),
    /// A trusted key is not a public nkey.
    #[error(transparent)]
    TrustedKey(#[from] confcast_schemas::sign::SignatureError),
    /// The position file cannot be read or written.
    #[error("position: {0}")]
    Position(#[from] std::io::Error),
    /// Two selected services would share `<dir>/<name>`.
    #[error("{0}")]
    Config(String),
}

/// Runs until `shutdown` is cancelled.
pub async fn run(mut config: Config, shutdown: CancellationToken) -> Result<(), SubscriberError> {
    // `<dir>/<service>` links point into the state dir: they must not depend on the
    // working directory the subscriber was started from.
    config.dir = std::path::absolute(&config.dir)?;
    config.state_dir = std::path::absolute(&config.state_dir)?;
    // Before anything is touched: a second subscriber on this state dir stops here.
    let _lock = StateDirLock::take(&config.state_dir)?;
    let nats_shown = redact_url(&config.nats_url);
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        dc = %config.dc,
        host = %config.host_id,
        dir = %config.dir.display(),
        state_dir = %config.state_dir.display(),
        nats = %nats_shown,
        selection = %config.selection,
        "subscriber starting"
    );
    let verifier = Arc::new(Verifier::new(&config.trusted_keys)?);
    let position_path = config.state_dir.join("position.json");
    let position = Position::load(&position_path, &config.dc)?;
    // The local API serves the last good configuration whether or not the bus is up.
    let live = Live::default();
    if let Some(listen) = config.listen.clone() {
        listen.check(config.listen_options.remote).map_err(SubscriberError::Config)?;
        let (dir, state_dir, live, shutdown, options) =
            (config.dir.clone(), config.state_dir.clone(), live.clone(), shutdown.clone(), config.listen_options);
        tokio::spawn(async move {
            if let Err(e) = crate::serve::serve(listen.clone(), options, dir, state_dir, live, shutdown).await {
                tracing::error!(?listen, error = %e, "cannot serve --listen");
            }
        });
    }
    let name = format!("confcast-subscriber {}/{}", config.dc, config.host_id);
    let Some(client) = waiting::connect(&config.nats_url, &config.nats_auth, name, &shutdown).await? else {
        return Ok(());
    };
    let js = async_nats::jetstream::new(client.clone());
    let reader = Reader::new(js, &config.dc).with_verifier(verifier);
    if !waiting::wait_for_streams(reader.jetstream(), &config.dc, &config.nats_url, &shutdown).await {
        return Ok(());
    }
    let limit = match config.max_parallel {
        None => Limit::None,
        Some(slots) => {
            let mut hint = Every::new(REPEAT);
            loop {
                match NatsSlots::open(reader.jetstream(), &config.dc, slots, &config.host_id).await {
                    Ok(slots) => break Limit::Nats(Box::new(slots)),
                    Err(e) => {
                        if hint.due() {
                            tracing::warn!(error = %e, "waiting for the datacenter's exec slots (--max-parallel)");
                        }
                        tokio::select! { () = tokio::time::sleep(Duration::from_secs(1)) => {}, () = shutdown.cancelled() => return Ok(()) }
                    }
                }
            }
        }
    };
    let notify_config = Arc::new(config.notify.clone());
    let runner: Runner = Arc::new(move |job: Job| {
        let notify_config = notify_config.clone();
        Box::pin(async move {
            let change = Change {
                kind: job.kind,
                name: &job.name,
                commit: job.commit.as_deref(),
                ref_name: &job.ref_name,
                dir: &job.dir,
            };
            notify(&notify_config, &change).await
        })
    });
    let policy = Policy { splay: config.splay, ..Policy::default() };
    let (scheduler, exec_reports) = Scheduler::new(policy, limit, runner, shutdown.clone());
    let mut host = Host {
        config: config.clone(),
        client,
        reader,
        position,
        position_path,
        services: BTreeSet::new(),
        unknown: BTreeSet::new(),
        unpublished: BTreeSet::new(),
        conf_ref: None,
        failed: BTreeSet::new(),
        live,
        scheduler,
        exec_reports,
        submitted: BTreeSet::new(),
        unsaved: 0,
        changed: Vec::new(),
    };

    let mut lost = Every::new(REPEAT);
    loop {
        if !waiting::wait_for_streams(host.reader.jetstream(), &config.dc, &config.nats_url, &shutdown).await {
            return Ok(());
        }
        let (services, leaving) = match &config.selection {
            Selection::Services(list) => {
                let services: BTreeSet<Service> = list.iter().cloned().collect();
                let leaving = host.present().difference(&services).map(|s| (s.clone(), Removal::CommandLine)).collect();
                (services, leaving)
            }
            Selection::Host(id) => match host.wait_for_plan(id, &shutdown).await {
                Some(plan) => host.adopt(id, &plan),
                None => return Ok(()),
            },
        };
        check_distinct(&services).map_err(SubscriberError::Config)?;
        host.services = services;
        match host.follow(&shutdown, &leaving).await {
            Ok(Followed::Shutdown) => return Ok(()),
            Ok(Followed::InventoryChanged) => {
                tracing::info!(host = %config.host_id, "inventory changed, following the new service set")
            }
            // The bus went away while setting up or following: the last good
            // configuration stays in place and the subscriber tries again.
            Err(SubscriberError::Connect(e)) => {
                if lost.due() {
                    tracing::warn!(nats = %nats_shown, error = %e, "lost the update stream; retrying");
                } else {
                    tracing::debug!(nats = %nats_shown, error = %e, "lost the update stream; retrying");
                }
                tokio::select! { () = tokio::time::sleep(Duration::from_secs(1)) => {}, () = shutdown.cancelled() => return Ok(()) }
            }
            Err(e) => return Err(e),
        }
    }
}

enum Followed {
    Shutdown,
    InventoryChanged,
}

/// What became of one message.
enum Outcome {
    /// This commit is now in place (the update's, or a newer snapshot's).
    Applied(Applied),
    Removed,
    Skipped,
}

/// The identity of what was applied.
struct Applied {
    commit: Option<String>,
    tree: Option<String>,
    ref_name: String,
    version: String,
}

impl Applied {
    /// The host's state once this is in place, its exec still to run.
    fn into_state(self, seq: u64) -> ServiceState {
        ServiceState {
            commit: self.commit,
            tree: self.tree,
            ref_name: self.ref_name,
            version: self.version,
            seq,
            exec_pending: true,
            applied_at_ms: Some(now_ms()),
        }
    }

    fn of(update: &ServiceUpdate) -> Applied {
        Applied {
            commit: update.to.clone(),
            tree: update.tree.clone(),
            ref_name: update.ref_name.clone(),
            version: update.version.clone(),
        }
    }
}

struct Host {
    config: Config,
    client: async_nats::Client,
    reader: Reader,
    position: Position,
    position_path: PathBuf,
    services: BTreeSet<Service>,
    /// With `--host`: followed services that the inventory entry names but the
    /// datacenter does not publish; once one is, the inventory is looked at again.
    unknown: BTreeSet<Service>,
    /// With `--service`: followed services with nothing in place, not yet found
    /// published nor said to be missing.
    unpublished: BTreeSet<Service>,
    /// The configuration the datacenter follows, from its last inventory read.
    conf_ref: Option<String>,
    /// Services whose last update could not be applied (full disk, I/O error): retried
    /// from the snapshot every [`RETRY_FAILED`].
    failed: BTreeSet<(Kind, String)>,
    /// The last outcome per service and the metrics, for `--listen`.
    live: Live,
    /// Runs `--exec` off the update path.
    scheduler: Scheduler,
    /// What the scheduler's runs gave.
    exec_reports: tokio::sync::mpsc::UnboundedReceiver<Ran>,
    /// Services whose pending exec is with the scheduler (until it succeeds, or the
    /// service changes again).
    submitted: BTreeSet<String>,
    /// Updates handled from the stream since the position was last saved, and the
    /// services they changed (see [`Host::persist`]).
    unsaved: usize,
    changed: Vec<String>,
}

/// During a catch-up, the position is saved at least every this many applied updates.
const SAVE_EVERY: usize = 64;

/// How often services whose update failed are retried.
const RETRY_FAILED: Duration = Duration::from_secs(2);

/// How often a `--service` with nothing published is looked for.
const CHECK_UNPUBLISHED: Duration = Duration::from_secs(2);

impl Host {
    fn layout(&self, kind: Kind, name: &str) -> Layout {
        Layout::for_service(&self.config.dir, &self.config.state_dir, kind, name)
            .with_perms(self.config.perms.for_service(name))
    }

    fn state(&self, kind: Kind, name: &str) -> ServiceState {
        self.position.services.get(&key(kind, name)).cloned().unwrap_or_default()
    }

    /// Saves the position, off the runtime's threads (it waits for the disk).
    async fn save(&self) -> Result<(), SubscriberError> {
        let (position, path) = (self.position.clone(), self.position_path.clone());
        tokio::task::spawn_blocking(move || position.save(&path))
            .await
            .map_err(|e| SubscriberError::Position(std::io::Error::other(format!("saving panicked: {e}"))))??;
        Ok(())
    }

    /// Saves the position after updates applied from the stream, then wakes the local
    /// API for them. Deferred so that `--exec` is handed to the scheduler before the
    /// position's flush, and so that a burst costs one save rather than one per
    /// update. A crash before the save loses nothing: the stream replays those updates,
    /// their trees are rebuilt or found in place, and the processes are told again
    /// (exec is at least once).
    async fn persist(&mut self) -> Result<(), SubscriberError> {
        if self.unsaved == 0 {
            return Ok(());
        }
        self.save().await?;
        self.unsaved = 0;
        for k in std::mem::take(&mut self.changed) {
            self.live.applied(&k);
        }
        Ok(())
    }

    /// The services whose trees are on this host.
    fn present(&self) -> BTreeSet<Service> {
        self.position
            .services
            .iter()
            .filter(|(_, state)| state.commit.is_some())
            .filter_map(|(k, _)| parse_key(k))
            .collect()
    }

    /// What the datacenter's inventory, as published now, means for host `id`; `None`
    /// while the relay has published no inventory.
    async fn plan(&mut self, id: &str) -> Result<Option<Plan>, ReadError> {
        let Some(inventory) = self.reader.inventory().await? else { return Ok(None) };
        self.conf_ref = Some(inventory.conf_ref.clone());
        let entry = inventory.hosts.get(id);
        let present = self.present();
        let mut published = BTreeSet::new();
        for (kind, name) in entry.map(crate::selection::named).unwrap_or_default() {
            // A tree on this host came from the datacenter (its head may still be on its
            // way: the relay writes it after the update).
            if present.contains(&(kind, name.clone()))
                || self.reader.head(kind, &name).await?.is_some_and(|head| head.commit.is_some())
            {
                published.insert((kind, name));
            }
        }
        Ok(Some(crate::selection::plan(entry, &present, &published)))
    }

    /// Waits until the relay has published the datacenter's inventory, and plans from it.
    async fn wait_for_plan(&mut self, id: &str, shutdown: &CancellationToken) -> Option<Plan> {
        let dc = self.config.dc.clone();
        let started = tokio::time::Instant::now();
        let (mut waiting, mut failing) = (Every::new(REPEAT), Every::new(REPEAT));
        loop {
            match self.plan(id).await {
                Ok(Some(plan)) => return Some(plan),
                Ok(None) if waiting.due() => {
                    if started.elapsed() < REPEAT {
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
    fn adopt(&mut self, id: &str, plan: &Plan) -> (BTreeSet<Service>, BTreeMap<Service, Removal>) {
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
            for (kind, name) in &plan.unknown {
                let problem = format!(
                    "{}; host {id}'s inventory entry lists it{kept}",
                    unpublished(*kind, name, &dc, Some(&conf_ref))
                );
                self.live.update(&key(*kind, name), |live| live.error = Some(problem));
            }
        }
        self.unknown = plan.unknown.clone();
        let why = Removal::Inventory { dc, host: id.to_owned(), conf_ref };
        (plan.follow.clone(), plan.remove.iter().map(|s| (s.clone(), why.clone())).collect())
    }

    /// With `--service`: says once, naming the datacenter, that a followed service has
    /// nothing published there, once the relay has published the datacenter's state.
    async fn check_unpublished(&mut self) {
        let Ok(Some(inventory)) = self.reader.inventory().await else { return };
        for (kind, name) in std::mem::take(&mut self.unpublished) {
            if self.state(kind, &name).commit.is_some() {
                continue;
            }
            match self.reader.head(kind, &name).await {
                // Published: its update is on the stream.
                Ok(Some(head)) if head.commit.is_some() => {}
                Ok(_) => {
                    let problem = unpublished(kind, &name, &self.config.dc, Some(&inventory.conf_ref));
                    tracing::warn!(%kind, %name, dc = %self.config.dc, "{problem}; waiting for it");
                    self.report(kind, &name, None, Some(problem), None).await;
                }
                Err(_) => {
                    self.unpublished.insert((kind, name));
                }
            }
        }
    }

    /// Removes the services in `leaving`, bootstraps services without a position, then
    /// follows the update stream.
    async fn follow(
        &mut self,
        shutdown: &CancellationToken,
        leaving: &BTreeMap<Service, Removal>,
    ) -> Result<Followed, SubscriberError> {
        let stream = match self.reader.jetstream().get_stream(subject::updates_stream(&self.config.dc)).await {
            Ok(stream) => stream,
            Err(e) => return Err(SubscriberError::Connect(format!("the datacenter's update stream: {e}"))),
        };
        let services: Vec<Service> = self.services.iter().cloned().collect();
        self.leave(leaving).await?;
        let mut failing = Every::new(REPEAT);
        for (kind, name) in &services {
            loop {
                match self.bootstrap(&stream, *kind, name).await {
                    Ok(()) => break,
                    Err(e) => {
                        if failing.due() {
                            tracing::warn!(%kind, %name, error = %e, "bootstrap failed, retrying");
                        }
                        tokio::select! { () = tokio::time::sleep(Duration::from_secs(1)) => {}, () = shutdown.cancelled() => return Ok(Followed::Shutdown) }
                    }
                }
            }
        }
        self.save().await?;
        if services.is_empty() && !matches!(self.config.selection, Selection::Host(_)) {
            return Err(SubscriberError::Config("no service selected".into()));
        }
        if matches!(self.config.selection, Selection::Services(_)) {
            self.unpublished = services.iter().filter(|(k, n)| self.state(*k, n).commit.is_none()).cloned().collect();
        }

        let start = services.iter().map(|(k, n)| self.state(*k, n).seq).min().unwrap_or(0) + 1;
        let filters: Vec<String> =
            services.iter().map(|(k, n)| subject::update_subject(&self.config.dc, *k, n)).collect();
        let mut inventory_updates = match &self.config.selection {
            Selection::Host(_) => Some(self.watch_inventory().await),
            Selection::Services(_) => None,
        };

        self.check_integrity().await?;
        self.flush_execs().await?;
        let mut verify_tick = self
            .config
            .verify_interval
            .map(|every| tokio::time::interval_at(tokio::time::Instant::now() + every, every));
        let mut retry_tick = tokio::time::interval_at(tokio::time::Instant::now() + RETRY_FAILED, RETRY_FAILED);
        let mut unpublished_tick = tokio::time::interval(CHECK_UNPUBLISHED);
        // Reports every service at start and then now and again, so the datacenter's
        // status stream knows this host even when nothing changes.
        let mut status_tick = tokio::time::interval(confcast_schemas::message::STATUS_REFRESH);
        let mut messages = if filters.is_empty() {
            None
        } else {
            let consumer = stream
                .create_consumer(consumer::pull::OrderedConfig {
                    filter_subjects: filters,
                    deliver_policy: consumer::DeliverPolicy::ByStartSequence { start_sequence: start },
                    ..Default::default()
                })
                .await;
            match consumer {
                Ok(consumer) => Some(consumer.messages().await.map_err(|e| SubscriberError::Connect(e.to_string()))?),
                Err(e) => return Err(SubscriberError::Connect(format!("creating the update consumer: {e}"))),
            }
        };
        tracing::info!(dc = %self.config.dc, services = services.len(), start, "following updates");
        // Under systemd's `Type=notify`, the unit is started once every service has its
        // configuration in place (or is known to have none yet).
        confcast_schemas::process::sd_notify("READY=1\nSTATUS=following updates");
        loop {
            let next = async {
                match messages.as_mut() {
                    Some(m) => m.next().await,
                    None => std::future::pending().await,
                }
            };
            let inventory_changed = async {
                match inventory_updates.as_mut() {
                    Some(Some(watch)) => watch.next().await,
                    _ => std::future::pending().await,
                }
            };
            let verify_due = async {
                match verify_tick.as_mut() {
                    Some(tick) => tick.tick().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => {
                    self.persist().await?;
                    return Ok(Followed::Shutdown);
                }
                _ = verify_due => {
                    self.check_integrity().await?;
                    self.flush_execs().await?;
                }
                _ = status_tick.tick() => self.report_all().await,
                Some(ran) = self.exec_reports.recv() => self.exec_done(ran).await?,
                _ = retry_tick.tick(), if !self.failed.is_empty() => {
                    self.retry_failed().await?;
                    self.flush_execs().await?;
                }
                _ = unpublished_tick.tick(), if !self.unpublished.is_empty() => self.check_unpublished().await,
                Some(_) = inventory_changed => {
                    if let Selection::Host(id) = &self.config.selection {
                        let id = id.clone();
                        match self.plan(&id).await {
                            Ok(Some(plan)) if plan.follow != self.services || !plan.remove.is_empty() => {
                                self.persist().await?;
                                return Ok(Followed::InventoryChanged);
                            }
                            Ok(_) => {}
                            Err(e) => tracing::warn!(error = %e, "cannot read the datacenter's inventory; following the same services"),
                        }
                    }
                }
                message = next => match message {
                    Some(Ok(message)) => {
                        let (seq, pending) = message.info().map(|i| (i.stream_sequence, i.pending)).unwrap_or((0, 0));
                        self.live.metrics.stream_pending.set(i64::try_from(pending).unwrap_or(i64::MAX));
                        self.handle(&message.message, seq).await?;
                        if pending == 0 {
                            self.flush_execs().await?;
                        }
                        if pending == 0 || self.unsaved >= SAVE_EVERY {
                            self.persist().await?;
                        }
                        // A service the inventory named before the datacenter published
                        // it is here now: the inventory may be trusted again.
                        if self.unknown.iter().any(|(k, n)| self.state(*k, n).commit.is_some()) {
                            self.persist().await?;
                            return Ok(Followed::InventoryChanged);
                        }
                    }
                    Some(Err(e)) => tracing::warn!(error = %e, "update stream error; the consumer recovers by itself"),
                    None => return Err(SubscriberError::Connect("update stream ended".into())),
                }
            }
        }
    }

    /// The datacenter's inventory messages from the last one on; `None` (said at WARN)
    /// when they cannot be watched, e.g. NATS permissions without a consumer on the
    /// state stream: the host then sees inventory changes only when it restarts.
    async fn watch_inventory(&self) -> Option<consumer::pull::Ordered> {
        let stream = self.reader.jetstream().get_stream(subject::state_stream(&self.config.dc)).await;
        let watch = match stream {
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

    /// Takes off this host the services in `leaving`, each for the reason given, and
    /// forgets followed services that never had anything in place. A service with a tree
    /// on the host that nothing explicit took away stays as it is.
    async fn leave(&mut self, leaving: &BTreeMap<Service, Removal>) -> Result<(), SubscriberError> {
        let gone: Vec<String> = self
            .position
            .services
            .keys()
            .filter(|k| !self.services.iter().any(|(kind, name)| key(*kind, name) == **k))
            .cloned()
            .collect();
        for k in gone {
            let Some((kind, name)) = parse_key(&k) else { continue };
            if self.state(kind, &name).commit.is_none() {
                self.position.services.remove(&k);
                // Its last report said it was missing: it is simply not followed any more.
                if self.live.service(&k).is_some_and(|live| live.error.is_some()) {
                    self.report(kind, &name, None, None, None).await;
                }
                continue;
            }
            let Some(why) = leaving.get(&(kind, name.clone())) else {
                tracing::warn!(%kind, %name, "{kind} {name} is no longer followed but nothing said it leaves this host; keeping it");
                continue;
            };
            if let Err(e) = self.remove(kind, &name, why).await {
                tracing::error!(%kind, %name, error = %e, "cannot remove service that left this host");
                continue;
            }
            self.position.services.remove(&k);
            self.save().await?;
            self.scheduler.submit(Job {
                kind,
                dir: self.config.dir.join(&name),
                name,
                commit: None,
                ref_name: String::new(),
            });
        }
        Ok(())
    }

    async fn bootstrap(&mut self, stream: &stream::Stream, kind: Kind, name: &str) -> Result<(), ReadError> {
        let state = self.state(kind, name);
        let layout = self.layout(kind, name);
        let intact = match &state.commit {
            Some(commit) => layout.current().is_some_and(|p| p.ends_with(commit)),
            None => true,
        };
        if self.position.services.contains_key(&key(kind, name)) && intact {
            return Ok(());
        }
        // Read the stream's position before the snapshot: anything published after it
        // is replayed, and replaying what the snapshot already holds is a no-op.
        let mut info = stream.clone();
        let last = info.info().await.map_err(|e| ReadError::new("update stream", e))?.state.last_sequence;
        let mut fresh = ServiceState { seq: last, ..ServiceState::default() };
        if let Some(snapshot) = self.reader.snapshot(kind, name).await? {
            if snapshot.to.is_some() {
                match self.apply(&snapshot, None).await {
                    Ok(()) => {
                        fresh = state_after(&snapshot, last);
                        tracing::info!(%kind, %name, commit = snapshot.to.as_deref().unwrap_or(""), "bootstrapped from snapshot");
                    }
                    Err(e) => {
                        self.report(kind, name, state.commit.clone(), Some(e.to_string()), None).await;
                        return Err(ReadError::new("applying snapshot", e));
                    }
                }
            }
        }
        self.position.services.insert(key(kind, name), fresh);
        Ok(())
    }

    #[tracing::instrument(skip_all, fields(seq = seq))]
    async fn handle(&mut self, message: &async_nats::Message, seq: u64) -> Result<(), SubscriberError> {
        let payload = match self.reader.payload(&message.subject, message.headers.as_ref(), &message.payload).await {
            Ok(p) => p,
            Err(e) if e.is_forged() => {
                tracing::error!(subject = %message.subject, error = %e, "refusing update; keeping the current configuration");
                self.live.metrics.error("signature");
                if let Some((kind, name)) = subject::parse_update_subject(&self.config.dc, &message.subject) {
                    if self.services.contains(&(kind, name.clone())) {
                        let commit = self.state(kind, &name).commit;
                        self.report(kind, &name, commit, Some(e.to_string()), None).await;
                    }
                }
                return Ok(());
            }
            Err(e) => {
                tracing::error!(subject = %message.subject, error = %e, "cannot read update; it will be recovered from the snapshot");
                return Ok(());
            }
        };
        let update: ServiceUpdate = match decode(&payload) {
            Ok(u) => u,
            Err(e) => {
                tracing::error!(subject = %message.subject, error = %e, "ignoring unreadable message on the update stream");
                return Ok(());
            }
        };
        let (kind, name) = (update.kind, update.name.clone());
        if update.dc != self.config.dc
            || message.subject.as_str() != subject::update_subject(&self.config.dc, kind, &name)
            || !self.services.contains(&(kind, name.clone()))
        {
            tracing::error!(subject = %message.subject, dc = %update.dc, %kind, %name, "ignoring update whose content does not match its subject");
            return Ok(());
        }
        let mut state = self.state(kind, &name);
        if seq <= state.seq {
            return Ok(());
        }
        let started = Instant::now();
        let result = if update.is_removal() {
            if state.commit.is_none() {
                Ok(Outcome::Skipped)
            } else {
                // Carried out only if the service's latest snapshot says removed too
                // (see `crate::selection`); one that holds a commit is applied instead.
                self.resync(kind, &name, &state).await
            }
        } else if update.to == state.commit {
            Ok(Outcome::Skipped)
        } else if update.snapshot || (update.from.is_some() && update.from == state.commit) {
            match self.apply(&update, state.commit.as_deref()).await {
                Ok(()) => Ok(Outcome::Applied(Applied::of(&update))),
                Err(e) => {
                    let commit = update.to.as_deref().unwrap_or("-");
                    tracing::warn!(%kind, %name, %commit, ref_name = %update.ref_name, error = %e, "update did not apply; resyncing from the snapshot");
                    self.resync(kind, &name, &state).await
                }
            }
        } else {
            tracing::info!(%kind, %name, have = state.commit.as_deref().unwrap_or("-"), from = update.from.as_deref().unwrap_or("-"), "gap before update; resyncing from the snapshot");
            self.resync(kind, &name, &state).await
        };
        match result {
            Ok(outcome) => {
                let moved = matches!(outcome, Outcome::Applied(_) | Outcome::Removed);
                match outcome {
                    Outcome::Applied(applied) => {
                        state = applied.into_state(seq);
                        let lag = now_ms().saturating_sub(update.pushed_at_ms);
                        self.live.metrics.push_to_apply_seconds.observe(lag as f64 / 1000.0);
                        tracing::info!(%kind, %name, commit = state.commit.as_deref().unwrap_or(""), apply_ms = started.elapsed().as_millis() as u64, push_to_apply_ms = lag, "applied");
                    }
                    Outcome::Removed => {
                        state = ServiceState {
                            commit: None,
                            tree: None,
                            seq,
                            exec_pending: true,
                            applied_at_ms: Some(now_ms()),
                            ..state
                        };
                    }
                    Outcome::Skipped => state.seq = seq,
                }
                self.position.services.insert(key(kind, &name), state);
                // Saved by `persist`, after the exec is submitted; the API is woken then.
                self.unsaved += 1;
                if moved {
                    self.submitted.remove(&key(kind, &name));
                    self.changed.push(key(kind, &name));
                }
            }
            Err(e) => {
                let commit = update.to.as_deref().unwrap_or("-");
                tracing::error!(%kind, %name, %commit, ref_name = %update.ref_name, error = %e, "update refused; keeping the current configuration");
                self.live.metrics.error("apply");
                let problem = format!("{} at {commit}: {e}", update.ref_name);
                self.report(kind, &name, state.commit.clone(), Some(problem), None).await;
                self.failed.insert((kind, name));
            }
        }
        Ok(())
    }

    /// Retries services whose update failed, from their snapshot.
    async fn retry_failed(&mut self) -> Result<(), SubscriberError> {
        for (kind, name) in std::mem::take(&mut self.failed) {
            let state = self.state(kind, &name);
            match self.resync(kind, &name, &state).await {
                Ok(Outcome::Applied(applied)) => {
                    tracing::info!(%kind, %name, commit = applied.commit.as_deref().unwrap_or(""), "applied on retry");
                    self.record(kind, &name, applied).await?;
                }
                Ok(Outcome::Removed) => {
                    let entry = self.position.services.entry(key(kind, &name)).or_default();
                    entry.commit = None;
                    entry.tree = None;
                    entry.exec_pending = true;
                    self.save().await?;
                }
                Ok(Outcome::Skipped) => {}
                Err(e) => {
                    tracing::debug!(%kind, %name, error = %e, "retry failed");
                    self.failed.insert((kind, name));
                }
            }
        }
        Ok(())
    }

    /// Records a state reached outside the update stream (resync, restore) and marks
    /// its exec as due; the stream position is left where it is.
    async fn record(&mut self, kind: Kind, name: &str, applied: Applied) -> Result<(), SubscriberError> {
        let seq = self.state(kind, name).seq;
        self.position.services.insert(key(kind, name), applied.into_state(seq));
        self.save().await?;
        self.submitted.remove(&key(kind, name));
        self.live.applied(&key(kind, name));
        Ok(())
    }

    async fn resync(&mut self, kind: Kind, name: &str, state: &ServiceState) -> Result<Outcome, ApplyError> {
        let snapshot = self.reader.snapshot(kind, name).await.map_err(|e| ApplyError::Malformed(e.to_string()))?;
        let Some(snapshot) = snapshot else {
            return Err(ApplyError::Malformed("no snapshot to resync from".into()));
        };
        if snapshot.is_removal() {
            let why = Removal::Datacenter { dc: self.config.dc.clone() };
            return if state.commit.is_some() { self.remove(kind, name, &why).await } else { Ok(Outcome::Skipped) };
        }
        if snapshot.to == state.commit {
            return Ok(Outcome::Skipped);
        }
        self.apply(&snapshot, None).await?;
        Ok(Outcome::Applied(Applied::of(&snapshot)))
    }

    async fn apply(&self, update: &ServiceUpdate, current: Option<&str>) -> Result<(), ApplyError> {
        let started = Instant::now();
        self.build_and_switch(update, current).await?;
        let metrics = &self.live.metrics;
        metrics.applied.get_or_create(&ServiceLabel { service: key(update.kind, &update.name) }).inc();
        metrics.apply_seconds.observe(started.elapsed().as_secs_f64());
        Ok(())
    }

    async fn build_and_switch(&self, update: &ServiceUpdate, current: Option<&str>) -> Result<(), ApplyError> {
        let objects = self.reader.objects(update).await.map_err(|e| ApplyError::Malformed(e.to_string()))?;
        let layout = self.layout(update.kind, &update.name);
        let base = current.filter(|c| layout.tree_dir(c).is_dir()).map(str::to_owned);
        if !update.snapshot && base.is_none() {
            return Err(ApplyError::Malformed("the tree this update starts from is not on disk".into()));
        }
        let (layout2, update2) = (layout.clone(), update.clone());
        tokio::task::spawn_blocking(move || {
            let tree = materialize::build(&layout2, base.as_deref(), &update2, &objects)?;
            materialize::switch(&layout2, &tree)
        })
        .await
        .map_err(|e| ApplyError::Malformed(format!("worker panicked: {e}")))??;
        // Deleting an old tree costs as much as building one: off the path to `--exec`.
        // It never touches the current tree, which the next update builds from.
        tokio::task::spawn_blocking(move || materialize::prune(&layout));
        Ok(())
    }

    /// Takes `<dir>/<name>` off this host, saying why at WARN.
    async fn remove(&self, kind: Kind, name: &str, why: &Removal) -> Result<Outcome, ApplyError> {
        let link = self.config.dir.join(name);
        tracing::warn!(%kind, %name, "removing {kind} {name} ({}) from this host: {why}", link.display());
        materialize::unlink(&self.layout(kind, name))?;
        self.live.metrics.applied.get_or_create(&ServiceLabel { service: key(kind, name) }).inc();
        Ok(Outcome::Removed)
    }

    /// Re-hashes every applied tree; one that was altered on disk is reported and
    /// rebuilt from the service's snapshot, and its processes are told again.
    async fn check_integrity(&mut self) -> Result<(), SubscriberError> {
        let services: Vec<(Kind, String)> = self.services.iter().cloned().collect();
        for (kind, name) in services {
            let state = self.state(kind, &name);
            let (Some(commit), Some(tree)) = (state.commit.clone(), state.tree.clone()) else { continue };
            let layout = self.layout(kind, &name);
            let check = tokio::task::spawn_blocking(move || materialize::verify(&layout, &tree)).await;
            let problem = match check {
                Ok(Ok(materialize::Integrity::Intact)) => continue,
                Ok(Ok(materialize::Integrity::Missing)) => {
                    format!("{} is missing", self.config.dir.join(&name).display())
                }
                Ok(Ok(materialize::Integrity::Permissions { problem })) => {
                    // The content is intact: set owners and modes again in place.
                    let layout = self.layout(kind, &name);
                    let restored = tokio::task::spawn_blocking(move || materialize::restore_perms(&layout)).await;
                    let outcome = match restored {
                        Ok(Ok(())) => "set again".to_owned(),
                        Ok(Err(e)) => format!("cannot set them again: {e}"),
                        Err(e) => format!("cannot set them again: {e}"),
                    };
                    let problem = format!("owner or mode changed on this host: {problem}; {outcome}");
                    tracing::warn!(%kind, %name, "integrity check: {problem}");
                    self.live.metrics.error("integrity");
                    self.report(kind, &name, Some(commit.clone()), Some(format!("integrity: {problem}")), None).await;
                    continue;
                }
                Ok(Ok(materialize::Integrity::Altered { found })) => format!(
                    "{} was changed on this host: it hashes to tree {found}, not {} of commit {commit}",
                    self.config.dir.join(&name).display(),
                    state.tree.as_deref().unwrap_or("")
                ),
                Ok(Err(e)) => format!("cannot verify: {e}"),
                Err(e) => format!("cannot verify: {e}"),
            };
            tracing::error!(%kind, %name, "integrity check failed: {problem}; restoring from the snapshot");
            self.live.metrics.error("integrity");
            self.report(kind, &name, Some(commit.clone()), Some(format!("integrity: {problem}")), None).await;
            // The altered tree is no base for anything: rebuild it from scratch.
            let _ = std::fs::remove_dir_all(self.layout(kind, &name).tree_dir(&commit));
            let forced = ServiceState { commit: None, ..state.clone() };
            match self.resync(kind, &name, &forced).await {
                Ok(Outcome::Applied(applied)) => {
                    tracing::info!(%kind, %name, commit = applied.commit.as_deref().unwrap_or(""), "restored");
                    self.record(kind, &name, applied).await?;
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::error!(%kind, %name, error = %e, "restoring failed; retrying");
                    self.failed.insert((kind, name));
                }
            }
        }
        Ok(())
    }

    /// Hands every change whose processes have not been told yet to the scheduler,
    /// which runs `--exec` off this path (see [`crate::schedule`]).
    async fn flush_execs(&mut self) -> Result<(), SubscriberError> {
        for (k, state) in &self.position.services {
            if !state.exec_pending || !self.submitted.insert(k.clone()) {
                continue;
            }
            let Some((kind, name)) = parse_key(k) else { continue };
            self.scheduler.submit(Job {
                kind,
                dir: self.config.dir.join(&name),
                name,
                commit: state.commit.clone(),
                ref_name: state.ref_name.clone(),
            });
        }
        Ok(())
    }

    /// Records a run of `--exec`: reported either way; done for good when it
    /// succeeded for the change still in place (a failed one is retried by the
    /// scheduler, and again after a restart).
    async fn exec_done(&mut self, ran: Ran) -> Result<(), SubscriberError> {
        let (kind, name) = (ran.job.kind, ran.job.name.clone());
        let commit = ran.job.commit.as_deref().unwrap_or("removed");
        let took_ms = u64::try_from(ran.took.as_millis()).unwrap_or(u64::MAX);
        let (error, status) = match &ran.result {
            Ok(status) => {
                let notify = &self.config.notify;
                if notify.exec.is_some() {
                    let exit_status = status.unwrap_or(0);
                    tracing::info!(%kind, %name, %commit, exit_status, took_ms, attempt = ran.attempt, "--exec succeeded");
                } else if notify.signal.is_some() {
                    tracing::info!(%kind, %name, %commit, took_ms, attempt = ran.attempt, "--signal sent");
                }
                (None, *status)
            }
            Err(failure) => {
                self.live.metrics.error("exec");
                tracing::error!(%kind, %name, %commit, exit_status = ?failure.status, took_ms, attempt = ran.attempt, error = %failure.message, "telling the host's processes failed; retrying with backoff");
                (Some(failure.message.clone()), failure.status)
            }
        };
        if self.config.notify.exec.is_some() {
            let label = ServiceLabel { service: key(kind, &name) };
            self.live.metrics.exec_last_status.get_or_create(&label).set(i64::from(status.unwrap_or(-1)));
        }
        self.report(kind, &name, ran.job.commit.clone(), error, status).await;
        if ran.result.is_ok() {
            if let Some(state) = self.position.services.get_mut(&key(kind, &name)) {
                if state.exec_pending && state.commit == ran.job.commit {
                    state.exec_pending = false;
                    self.submitted.remove(&key(kind, &name));
                    self.save().await?;
                }
            }
        }
        Ok(())
    }

    /// Reports every followed service as it stands.
    async fn report_all(&self) {
        for (kind, name) in &self.services {
            let last = self.live.service(&key(*kind, name)).unwrap_or_default();
            self.report(*kind, name, self.state(*kind, name).commit, last.error, last.exec_status).await;
        }
    }

    async fn report(
        &self,
        kind: Kind,
        name: &str,
        commit: Option<String>,
        error: Option<String>,
        exec_status: Option<i32>,
    ) {
        self.live.update(&key(kind, name), |live| {
            live.error = error.clone();
            if exec_status.is_some() {
                live.exec_status = exec_status;
            }
        });
        let status = HostStatus {
            v: WIRE_VERSION,
            dc: self.config.dc.clone(),
            host: self.config.host_id.clone(),
            kind,
            name: name.to_owned(),
            commit,
            ok: error.is_none(),
            error,
            exec_status,
            at_ms: now_ms(),
        };
        let subject = subject::status_subject(&self.config.dc, &self.config.host_id, kind, name);
        if let Err(e) = self.client.publish(subject, encode(&status).into()).await {
            tracing::debug!(error = %e, "status not published");
        }
    }
}

/// One line of `subscriber verify` per service, and whether all are intact.
pub fn verify(
    dir: &std::path::Path,
    state_dir: &std::path::Path,
    perms: &crate::perms::PermsConfig,
) -> Result<(Vec<String>, bool), SubscriberError> {
    let position = Position::load_any(&state_dir.join("position.json"))?;
    let mut lines = Vec::new();
    let mut all_intact = true;
    for (k, state) in &position.services {
        let Some((kind, name)) = parse_key(k) else { continue };
        let name = name.as_str();
        let (Some(commit), Some(tree)) = (&state.commit, &state.tree) else {
            lines.push(format!("{kind} {name}: not present on this host"));
            continue;
        };
        let layout = Layout::for_service(dir, state_dir, kind, name).with_perms(perms.for_service(name));
        let line = match materialize::verify(&layout, tree) {
            Ok(materialize::Integrity::Intact) => format!("{kind} {name}: ok, commit {commit}, tree {tree}"),
            Ok(materialize::Integrity::Missing) => {
                all_intact = false;
                format!("{kind} {name}: MISSING: {} should hold commit {commit}", layout.link.display())
            }
            Ok(materialize::Integrity::Permissions { problem }) => {
                all_intact = false;
                format!("{kind} {name}: PERMISSIONS: {problem} (a running subscriber sets them again)")
            }
            Ok(materialize::Integrity::Altered { found }) => {
                all_intact = false;
                format!(
                    "{kind} {name}: ALTERED: {} hashes to tree {found}, commit {commit} has tree {tree}",
                    layout.link.display()
                )
            }
            Err(e) => {
                all_intact = false;
                format!("{kind} {name}: cannot verify: {e}")
            }
        };
        lines.push(line);
    }
    Ok((lines, all_intact))
}

fn state_after(update: &ServiceUpdate, seq: u64) -> ServiceState {
    Applied::of(update).into_state(seq)
}
