//! The subscriber's lifecycle, and the loop that follows the update stream.
//!
//! Each host reads its datacenter's update stream through an ephemeral ordered
//! consumer that starts right after the host's own recorded position, so the server
//! keeps nothing per host. An update applies when it starts from the commit in place;
//! one that reaches a commit already in place is skipped; anything else is a gap and
//! is resolved from the service's snapshot, never by guessing ([`crate::apply`]).
//! What the consumer has already delivered is applied as one step — one flush, one
//! position save, `--exec` once per service — without waiting for more than what the
//! stream says is pending ([`crate::apply::gather`]).
//!
//! Before anything else [`run`] takes its state directory ([`crate::lock`]) and says how
//! it was started; it connects, and while the datacenter is not ready it waits and says
//! why ([`crate::waiting`]); which services it follows, and when one leaves the host, is
//! decided in [`crate::selection`] ([`crate::inventory`] with `--host`). Then it follows
//! the stream until shutdown, checking the trees ([`crate::integrity`]), telling the
//! processes ([`crate::execs`]) and reporting ([`crate::report`]) on the way.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use confcast_schemas::connect::{connect, redact_url, AuthError, Identity};
use confcast_schemas::process::error_chain;
use confcast_schemas::retry::Warnings;
use confcast_schemas::sign::{SignatureError, Verifier};
use confcast_schemas::{subject, ServiceId};
use futures::StreamExt;
use tokio::time::{interval, interval_at, Instant, Interval};
use tokio_util::sync::CancellationToken;

use crate::apply::{gather, Gathered};
use crate::bus::Reader;
use crate::config::Config;
use crate::live::Live;
use crate::lock::{LockError, StateDirLock};
use crate::materialize::Materializer;
use crate::position::{Position, PositionError};
use crate::schedule::{Ran, Scheduler};
use crate::selection::{Removal, Selection, SelectionError};
use crate::waiting::wait_for_streams;

/// Why the subscriber stopped.
#[derive(Debug, thiserror::Error)]
pub enum SubscriberError {
    /// Another subscriber holds the state directory, or it cannot be locked.
    #[error(transparent)]
    StateDir(#[from] LockError),
    /// `--dir` or `--state-dir` cannot be made absolute.
    #[error("{}: {source}", path.display())]
    Dir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A NATS credential or certificate cannot be used.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// A trusted key is not a public nkey.
    #[error(transparent)]
    TrustedKey(#[from] SignatureError),
    /// The position file cannot be read or written.
    #[error("position: {0}")]
    Position(#[from] PositionError),
    /// Saving the position panicked.
    #[error("position: saving panicked: {0}")]
    SavePanicked(#[source] tokio::task::JoinError),
    /// `--listen` cannot be used as given.
    #[error(transparent)]
    Listen(#[from] crate::api::ListenError),
    /// The services selected cannot be followed (two would share `<dir>/<name>`).
    #[error(transparent)]
    Selection(#[from] SelectionError),
}

/// Runs until `shutdown` is cancelled.
pub async fn run(mut config: Config, shutdown: CancellationToken) -> Result<(), SubscriberError> {
    // `<dir>/<service>` links point into the state dir: they must not depend on the
    // working directory the subscriber was started from.
    let absolute = |path: &PathBuf| {
        std::path::absolute(path).map_err(|source| SubscriberError::Dir { path: path.clone(), source })
    };
    config.dir = absolute(&config.dir)?;
    config.state_dir = absolute(&config.state_dir)?;
    // Before anything is touched: a second subscriber on this state dir stops here.
    let _lock = StateDirLock::take(&config.state_dir)?;
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        dc = %config.dc,
        host = %config.host_id,
        dir = %config.dir.display(),
        state_dir = %config.state_dir.display(),
        nats = %redact_url(&config.nats_url),
        selection = %config.selection,
        "subscriber starting"
    );
    let verifier = Arc::new(Verifier::new(&config.trusted_keys)?);
    let position = Position::load(&config.position_path(), &config.dc)?;
    // The local API serves the last good configuration whether or not the bus is up.
    let live = Live::default();
    serve(&config, &live, &shutdown)?;
    let who = Identity::named(format!("confcast-subscriber {}/{}", config.dc, config.host_id));
    let Some(client) = connect(&config.nats_url, &config.nats_auth, &who, &shutdown).await? else {
        return Ok(());
    };
    let reader = Reader::new(jetstream::new(client.clone()), &config.dc).with_verifier(verifier);
    if !wait_for_streams(reader.jetstream(), &config.dc, &config.nats_url, &shutdown).await {
        return Ok(());
    }
    let Some((scheduler, exec_reports)) = crate::execs::scheduler(&config, &reader, &shutdown).await else {
        return Ok(());
    };
    let materializer = Materializer::new(config.flushes.clone());
    let mut host = Host {
        config,
        client,
        reader,
        materializer,
        position,
        services: BTreeSet::new(),
        unknown: BTreeSet::new(),
        unpublished: BTreeSet::new(),
        conf_ref: None,
        failed: BTreeSet::new(),
        refused: BTreeMap::new(),
        live,
        scheduler,
        exec_reports,
        submitted: BTreeSet::new(),
        unsaved: 0,
        changed: Vec::new(),
        rollouts: crate::rollout::Rollouts::default(),
    };
    host.run(&shutdown).await
}

/// Serves `--listen`, if given, until shutdown.
fn serve(config: &Config, live: &Live, shutdown: &CancellationToken) -> Result<(), SubscriberError> {
    let Some(listen) = config.listen.clone() else { return Ok(()) };
    listen.check(config.listen_options.remote)?;
    let (dir, state_dir, live, shutdown, options) =
        (config.dir.clone(), config.state_dir.clone(), live.clone(), shutdown.clone(), config.listen_options);
    tokio::spawn(async move {
        if let Err(e) = crate::api::serve(listen.clone(), options, dir, state_dir, live, shutdown).await {
            tracing::error!(?listen, error = %e, "cannot serve --listen");
        }
    });
    Ok(())
}

/// How following the stream ended, short of an error that stops the subscriber.
pub(crate) enum Followed {
    Shutdown,
    InventoryChanged,
    /// The bus went away while setting up or following.
    Lost(StreamLost),
}

/// Why the update stream cannot be followed now; the subscriber tries again.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StreamLost {
    /// The stream cannot be looked up.
    #[error("the datacenter's update stream: {0}")]
    Stream(#[source] jetstream::context::GetStreamError),
    /// The consumer cannot be created.
    #[error("creating the update consumer: {0}")]
    Consumer(#[source] jetstream::stream::ConsumerError),
    /// The consumer's messages cannot be read.
    #[error("{0}")]
    Messages(#[source] consumer::StreamError),
    /// The consumer's messages ended.
    #[error("update stream ended")]
    Ended,
}

/// One subscriber at work: what it follows, where each service stands, and what is
/// under way.
pub(crate) struct Host {
    pub(crate) config: Config,
    pub(crate) client: async_nats::Client,
    pub(crate) reader: Reader,
    /// Builds the trees; owns what one build keeps for the next.
    pub(crate) materializer: Materializer,
    pub(crate) position: Position,
    pub(crate) services: BTreeSet<ServiceId>,
    /// With `--host`: followed services that the inventory entry names but the
    /// datacenter does not publish; once one is, the inventory is looked at again.
    pub(crate) unknown: BTreeSet<ServiceId>,
    /// With `--service`: followed services with nothing in place, not yet found
    /// published nor said to be missing.
    pub(crate) unpublished: BTreeSet<ServiceId>,
    /// The configuration the datacenter follows, from its last inventory read.
    pub(crate) conf_ref: Option<String>,
    /// Services whose last update could not be applied (full disk, I/O error): retried
    /// from the snapshot every [`RETRY_FAILED`].
    pub(crate) failed: BTreeSet<ServiceId>,
    /// Per service, the commit `--check-cmd` refused last, until another is applied
    /// (see `crate::apply::check`).
    pub(crate) refused: BTreeMap<ServiceId, crate::apply::Refused>,
    /// The last outcome per service and the metrics, for `--listen`.
    pub(crate) live: Live,
    /// Runs `--exec` off the update path.
    pub(crate) scheduler: Scheduler,
    /// What the scheduler's runs gave.
    pub(crate) exec_reports: tokio::sync::mpsc::UnboundedReceiver<Ran>,
    /// Services whose pending exec is with the scheduler (until it succeeds, or the
    /// service changes again).
    pub(crate) submitted: BTreeSet<ServiceId>,
    /// Updates handled from the stream since the position was last saved, and the
    /// services they changed (see [`Host::persist`]).
    pub(crate) unsaved: usize,
    pub(crate) changed: Vec<ServiceId>,
    /// Staged rollouts of the followed services: their states, what is held, what went
    /// back ([`crate::rollout`]).
    pub(crate) rollouts: crate::rollout::Rollouts,
}

/// How often services whose update failed are retried.
const RETRY_FAILED: Duration = Duration::from_secs(2);

/// How often a `--service` with nothing published is looked for.
const CHECK_UNPUBLISHED: Duration = Duration::from_secs(2);

/// What is watched on the state stream while following: the inventory (with `--host`)
/// and the rollout states of the followed services.
struct Watches {
    inventory: Option<consumer::pull::Ordered>,
    rollouts: Option<consumer::pull::Ordered>,
}

/// What comes due while following, besides messages.
struct Ticks {
    verify: Option<Interval>,
    retry: Interval,
    unpublished: Interval,
    /// Reports every service at start and then now and again, so the datacenter's
    /// status stream knows this host even when nothing changes.
    status: Interval,
    /// Runs `--health-cmd` while a commit bakes in its rollout wave.
    bake: Interval,
}

impl Ticks {
    fn new(verify_interval: Option<Duration>) -> Ticks {
        Ticks {
            verify: verify_interval.map(|every| interval_at(Instant::now() + every, every)),
            retry: interval_at(Instant::now() + RETRY_FAILED, RETRY_FAILED),
            unpublished: interval(CHECK_UNPUBLISHED),
            status: interval(confcast_schemas::message::STATUS_REFRESH),
            bake: {
                let every = crate::rollout::BAKE_HEALTH;
                let mut bake = interval_at(Instant::now() + every, every);
                // Idle while nothing bakes: no burst of runs when something starts to.
                bake.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                bake
            },
        }
    }
}

impl Host {
    /// Follows the selected services until shutdown, again whenever the inventory
    /// changes or the bus comes back.
    async fn run(&mut self, shutdown: &CancellationToken) -> Result<(), SubscriberError> {
        let (dc, nats) = (self.config.dc.clone(), redact_url(&self.config.nats_url));
        let mut lost = Warnings::default();
        loop {
            if !wait_for_streams(self.reader.jetstream(), &dc, &self.config.nats_url, shutdown).await {
                return Ok(());
            }
            let Some((services, leaving)) = self.select(shutdown).await else { return Ok(()) };
            crate::selection::check_distinct(&services)?;
            self.services = services;
            match self.follow(shutdown, &leaving).await? {
                Followed::Shutdown => return Ok(()),
                Followed::InventoryChanged => {
                    tracing::info!(host = %self.config.host_id, "inventory changed, following the new service set")
                }
                // The last good configuration stays in place and the subscriber tries again.
                Followed::Lost(e) => {
                    let error = error_chain(&e);
                    if lost.due() {
                        tracing::warn!(nats = %nats, error = %error, "lost the update stream; retrying");
                    } else {
                        tracing::debug!(nats = %nats, error = %error, "lost the update stream; retrying");
                    }
                    tokio::select! { () = tokio::time::sleep(Duration::from_secs(1)) => {}, () = shutdown.cancelled() => return Ok(()) }
                }
            }
        }
    }

    /// The services to follow now and those that leave the host, and why; `None` on
    /// shutdown.
    async fn select(
        &mut self,
        shutdown: &CancellationToken,
    ) -> Option<(BTreeSet<ServiceId>, BTreeMap<ServiceId, Removal>)> {
        match &self.config.selection {
            Selection::Services(list) => {
                let services: BTreeSet<ServiceId> = list.iter().cloned().collect();
                let leaving = self.present().difference(&services).map(|s| (s.clone(), Removal::CommandLine)).collect();
                Some((services, leaving))
            }
            Selection::Host(id) => {
                let id = id.clone();
                let plan = self.wait_for_plan(&id, shutdown).await?;
                Some(self.adopt(&id, &plan))
            }
        }
    }

    /// Where `id` stands on this host.
    pub(crate) fn state(&self, id: &ServiceId) -> crate::position::ServiceState {
        self.position.of(id)
    }

    /// Saves the position, off the runtime's threads (it waits for the disk).
    pub(crate) async fn save(&self) -> Result<(), SubscriberError> {
        let (position, path) = (self.position.clone(), self.config.position_path());
        tokio::task::spawn_blocking(move || position.save(&path)).await.map_err(SubscriberError::SavePanicked)??;
        Ok(())
    }

    /// Saves the position after updates applied from the stream, then wakes the local
    /// API for them. Deferred so that `--exec` is handed to the scheduler before the
    /// position's flush, and so that a burst costs one save rather than one per
    /// update. A crash before the save loses nothing: the stream replays those updates,
    /// their trees are rebuilt or found in place, and the processes are told again
    /// (exec is at least once).
    pub(crate) async fn persist(&mut self) -> Result<(), SubscriberError> {
        if self.unsaved == 0 {
            return Ok(());
        }
        self.save().await?;
        self.unsaved = 0;
        for id in std::mem::take(&mut self.changed) {
            self.live.applied(&id);
        }
        Ok(())
    }

    /// Removes the services in `leaving`, bootstraps services without a position, then
    /// follows the update stream.
    async fn follow(
        &mut self,
        shutdown: &CancellationToken,
        leaving: &BTreeMap<ServiceId, Removal>,
    ) -> Result<Followed, SubscriberError> {
        let stream = match self.reader.jetstream().get_stream(subject::updates_stream(&self.config.dc)).await {
            Ok(stream) => stream,
            Err(e) => return Ok(Followed::Lost(StreamLost::Stream(e))),
        };
        let services: Vec<ServiceId> = self.services.iter().cloned().collect();
        self.leave(leaving).await?;
        if !self.bootstrap_all(&stream, &services, shutdown).await {
            return Ok(Followed::Shutdown);
        }
        self.save().await?;
        if services.is_empty() && !matches!(self.config.selection, Selection::Host(_)) {
            return Err(SelectionError::Empty.into());
        }
        if matches!(self.config.selection, Selection::Services(_)) {
            self.unpublished = services.iter().filter(|id| self.state(id).commit.is_none()).cloned().collect();
        }
        let inventory = match &self.config.selection {
            Selection::Host(_) => self.watch_inventory().await,
            Selection::Services(_) => None,
        };
        // Read before the updates are replayed: what a held update meets is then the
        // state of its wave, and a host killed mid-wave does what its wave requires.
        let rollouts = self.watch_rollouts().await;
        self.check_integrity().await?;
        self.flush_execs();
        let ticks = Ticks::new(self.config.verify_interval);
        let start = services.iter().map(|id| self.state(id).seq).min().unwrap_or(0) + 1;
        let messages = match self.consume(&stream, &services, start).await {
            Ok(messages) => messages,
            Err(lost) => return Ok(Followed::Lost(lost)),
        };
        tracing::info!(dc = %self.config.dc, services = services.len(), start, "following updates");
        // Under systemd's `Type=notify`, the unit is started once every service has its
        // configuration in place (or is known to have none yet).
        confcast_schemas::process::sd_notify("READY=1\nSTATUS=following updates");
        self.follow_stream(shutdown, messages, Watches { inventory, rollouts }, ticks).await
    }

    /// An ordered consumer of the updates of `services` from the stream sequence
    /// `start`; `None` when nothing is followed.
    async fn consume(
        &self,
        stream: &stream::Stream,
        services: &[ServiceId],
        start: u64,
    ) -> Result<Option<consumer::pull::Ordered>, StreamLost> {
        if services.is_empty() {
            return Ok(None);
        }
        let filters = services.iter().map(|id| subject::update_subject(&self.config.dc, id.kind, &id.name)).collect();
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subjects: filters,
                deliver_policy: consumer::DeliverPolicy::ByStartSequence { start_sequence: start },
                ..Default::default()
            })
            .await
            .map_err(StreamLost::Consumer)?;
        Ok(Some(consumer.messages().await.map_err(StreamLost::Messages)?))
    }

    /// Handles the stream's messages, the inventory's changes, `--exec`'s outcomes and
    /// what comes due, one at a time, until one of them ends the following.
    async fn follow_stream(
        &mut self,
        shutdown: &CancellationToken,
        mut messages: Option<consumer::pull::Ordered>,
        watches: Watches,
        mut ticks: Ticks,
    ) -> Result<Followed, SubscriberError> {
        let Watches { mut inventory, mut rollouts } = watches;
        loop {
            let next = async {
                match messages.as_mut() {
                    Some(m) => m.next().await,
                    None => std::future::pending().await,
                }
            };
            let inventory_changed = async {
                match inventory.as_mut() {
                    Some(watch) => watch.next().await,
                    None => std::future::pending().await,
                }
            };
            let rollout_changed = async {
                match rollouts.as_mut() {
                    Some(watch) => watch.next().await,
                    None => std::future::pending().await,
                }
            };
            let verify_due = async {
                match ticks.verify.as_mut() {
                    Some(tick) => tick.tick().await,
                    None => std::future::pending().await,
                }
            };
            let ended = tokio::select! {
                () = shutdown.cancelled() => Some(Followed::Shutdown),
                _ = verify_due => {
                    self.check_integrity().await?;
                    self.flush_execs();
                    None
                }
                _ = ticks.status.tick() => {
                    self.report_all().await;
                    None
                }
                Some(ran) = self.exec_reports.recv() => {
                    self.execs_done(ran).await?;
                    None
                }
                _ = ticks.retry.tick(), if !self.failed.is_empty() || !self.rollouts.retry.is_empty() => {
                    self.retry_failed().await?;
                    self.retry_rollouts().await?;
                    self.flush_execs();
                    None
                }
                _ = ticks.bake.tick(), if self.baking() => {
                    self.judge_bakes();
                    None
                }
                Some(judged) = self.rollouts.judged.recv() => {
                    self.bake_judged(judged).await;
                    None
                }
                Some(state) = rollout_changed => {
                    match state {
                        Ok(message) => {
                            self.rollout_changed(message).await?;
                            self.flush_execs();
                        }
                        Err(e) => tracing::warn!(error = %e, "rollout watch error; the consumer recovers by itself"),
                    }
                    None
                }
                _ = ticks.unpublished.tick(), if !self.unpublished.is_empty() => {
                    self.check_unpublished().await;
                    None
                }
                Some(_) = inventory_changed => self.inventory_changed().await,
                message = next => match message {
                    Some(Ok(message)) => self.on_messages(message, messages.as_mut()).await?,
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "update stream error; the consumer recovers by itself");
                        None
                    }
                    None => Some(Followed::Lost(StreamLost::Ended)),
                },
            };
            if let Some(ended) = ended {
                self.persist().await?;
                return Ok(ended);
            }
        }
    }

    /// Applies `first` and what the consumer (`more`) holds after it as one step
    /// ([`gather`]), hands `--exec` over once the stream is caught up, then saves the
    /// position once.
    async fn on_messages(
        &mut self,
        first: jetstream::Message,
        more: Option<&mut consumer::pull::Ordered>,
    ) -> Result<Option<Followed>, SubscriberError> {
        let Gathered { messages, pending, ended } = gather(first, more).await;
        self.live.metrics.stream_pending.set(i64::try_from(pending).unwrap_or(i64::MAX));
        self.apply_batch(messages).await;
        if pending == 0 {
            self.flush_execs();
        }
        self.persist().await?;
        // A service the inventory named before the datacenter published it is here
        // now: the inventory may be trusted again.
        if self.unknown.iter().any(|id| self.state(id).commit.is_some()) {
            return Ok(Some(Followed::InventoryChanged));
        }
        Ok(ended.then_some(Followed::Lost(StreamLost::Ended)))
    }
}
