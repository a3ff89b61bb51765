//! When `--exec` runs: after a change is in place, off the path of the next change.
//!
//! Each service has a worker of its own. The subscriber hands it the latest change of
//! the service and goes on applying updates; the worker
//!
//! 1. waits a random delay below `--splay` (spreading a datacenter's restarts in time),
//! 2. takes one of the datacenter's `--max-parallel` slots for this update, so that no
//!    more than that many hosts run their exec for the same change at once,
//! 3. runs the command (then `--health-cmd`, still holding the slot: a host counts as
//!    restarting until it is judged), reports the outcome, and on failure of the command
//!    retries with exponential backoff — always with the latest change: a newer change
//!    replaces the one being retried, so a failing exec never holds later updates back
//!    and never runs for a configuration that is no longer in place. A failing health
//!    command is reported, not retried: running the exec again would not mend it.
//!
//! Restart storms after a configuration push are what splay and the slots prevent.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use confcast_schemas::message::Health;
use confcast_schemas::{subject, ServiceId};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// A change whose processes are to be told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    /// The service.
    pub service: ServiceId,
    /// The commit now in place (`None`: removed).
    pub commit: Option<String>,
    /// The ref it came from.
    pub ref_name: String,
    /// `<dir>/<service>`.
    pub dir: PathBuf,
}

/// What one run of the exec gave.
#[derive(Debug, Clone)]
pub struct Ran {
    /// The change it ran for.
    pub job: Job,
    /// Exit status (`None` without a command), or what went wrong.
    pub result: Result<Option<i32>, Failure>,
    /// The service's health after the run (`None`: not judged, as for a removal).
    pub health: Option<Health>,
    /// 1 for the first run of this change, 2 for its first retry, ...
    pub attempt: u32,
    /// How long the run took (the command and the signal, not the wait for a slot).
    pub took: Duration,
}

/// A failed run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// What failed, for logs and status reports.
    pub message: String,
    /// The command's exit status, if it exited.
    pub status: Option<i32>,
}

/// How long to wait between runs, and before the first.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// Upper bound of the random delay before each change's first run.
    pub splay: Duration,
    /// Delay before the first retry; doubled after each failure.
    pub retry_initial: Duration,
    /// Longest delay between retries.
    pub retry_max: Duration,
}

impl Default for Policy {
    fn default() -> Policy {
        Policy { splay: Duration::ZERO, retry_initial: Duration::from_secs(1), retry_max: Duration::from_secs(60) }
    }
}

/// What one run of a job gave.
#[derive(Debug, Clone)]
pub struct Told {
    /// Exit status of the command (`None` without one), or what went wrong: retried.
    pub result: Result<Option<i32>, Failure>,
    /// The service's health after it (`None`: not judged).
    pub health: Option<Health>,
}

/// Runs one job: the `--exec` command and signal, then `--health-cmd`, in production.
pub type Runner = Arc<dyn Fn(Job) -> Pin<Box<dyn Future<Output = Told> + Send>> + Send + Sync>;

/// How many hosts of the datacenter may run their exec for the same change at once.
#[derive(Clone)]
pub enum Limit {
    /// No limit.
    None,
    /// At most `slots` at once, counted in the datacenter's K/V bucket.
    Nats(Box<NatsSlots>),
    /// At most the semaphore's permits at once, within this process (for tests and
    /// several subscribers in one process).
    Local(Arc<tokio::sync::Semaphore>),
}

impl std::fmt::Debug for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Limit::None => f.write_str("Limit::None"),
            Limit::Nats(slots) => write!(f, "Limit::Nats({})", slots.slots),
            Limit::Local(s) => write!(f, "Limit::Local({})", s.available_permits()),
        }
    }
}

/// A held slot; given back by [`Permit::release`].
enum Permit {
    None,
    Nats(Box<NatsSlots>, String),
    Local(#[allow(dead_code)] tokio::sync::OwnedSemaphorePermit),
}

impl Permit {
    async fn release(self) {
        if let Permit::Nats(slots, key) = self {
            slots.release(&key).await;
        }
    }
}

impl Limit {
    async fn acquire(&self, job: &Job, shutdown: &CancellationToken) -> Option<Permit> {
        match self {
            Limit::None => Some(Permit::None),
            Limit::Local(semaphore) => tokio::select! {
                permit = semaphore.clone().acquire_owned() => permit.ok().map(Permit::Local),
                () = shutdown.cancelled() => None,
            },
            Limit::Nats(slots) => slots.acquire(job, shutdown).await.map(|key| Permit::Nats(slots.clone(), key)),
        }
    }
}

/// Exec slots of a datacenter in a NATS K/V bucket: slot `i` of a change is the key
/// `<kind>.<name>.<commit>.<i>`, held by the host that created it. Creating a key is
/// atomic in JetStream, so at most `slots` hosts hold one at once. A host that dies
/// holding a slot frees it when the bucket's age limit (5 minutes, set by the relay
/// that creates the bucket) passes.
#[derive(Clone)]
pub struct NatsSlots {
    kv: kv::Store,
    slots: usize,
    host: String,
}

impl std::fmt::Debug for NatsSlots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsSlots").field("slots", &self.slots).field("host", &self.host).finish_non_exhaustive()
    }
}

/// The datacenter's exec slots cannot be opened.
#[derive(Debug, thiserror::Error)]
#[error("exec slots bucket {bucket} (the datacenter's relay creates it)")]
pub struct SlotsError {
    /// The bucket.
    bucket: String,
    /// Why.
    #[source]
    source: jetstream::context::KeyValueError,
}

/// How often a host waiting for a slot looks again.
const SLOT_POLL: Duration = Duration::from_millis(200);

impl NatsSlots {
    /// The slots of `dc`, `slots` per change, taken in the name of `host`.
    pub async fn open(js: &jetstream::Context, dc: &str, slots: usize, host: &str) -> Result<NatsSlots, SlotsError> {
        let bucket = subject::exec_slots_bucket(dc);
        let kv = js.get_key_value(&bucket).await.map_err(|source| SlotsError { bucket, source })?;
        Ok(NatsSlots { kv, slots: slots.max(1), host: host.to_owned() })
    }

    async fn acquire(&self, job: &Job, shutdown: &CancellationToken) -> Option<String> {
        let change = format!(
            "{}.{}.{}",
            job.service.kind.as_str(),
            subject::encode_key_segment(&job.service.name),
            job.commit.as_deref().unwrap_or("removed")
        );
        let mut waited = false;
        loop {
            for i in 0..self.slots {
                let key = format!("{change}.{i}");
                if self.kv.create(&key, self.host.clone().into_bytes().into()).await.is_ok() {
                    if waited {
                        tracing::debug!(name = %job.service.name, slot = i, "got an exec slot");
                    }
                    return Some(key);
                }
            }
            if !waited {
                tracing::info!(name = %job.service.name, slots = self.slots, "waiting for an exec slot (--max-parallel)");
                waited = true;
            }
            let jitter = Duration::from_millis(rand::random::<u64>() % 100);
            tokio::select! {
                () = tokio::time::sleep(SLOT_POLL + jitter) => {}
                () = shutdown.cancelled() => return None,
            }
        }
    }

    async fn release(&self, key: &str) {
        if let Err(e) = self.kv.delete(key).await {
            tracing::warn!(key, error = %e, "cannot give the exec slot back; it expires by itself");
        }
    }
}

/// The workers of one subscriber.
pub struct Scheduler {
    workers: HashMap<ServiceId, watch::Sender<Option<Job>>>,
    policy: Policy,
    limit: Limit,
    runner: Runner,
    ran: mpsc::UnboundedSender<Ran>,
    shutdown: CancellationToken,
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler").field("policy", &self.policy).field("limit", &self.limit).finish_non_exhaustive()
    }
}

impl Scheduler {
    /// A scheduler whose runs are reported on the returned channel.
    pub fn new(
        policy: Policy,
        limit: Limit,
        runner: Runner,
        shutdown: CancellationToken,
    ) -> (Scheduler, mpsc::UnboundedReceiver<Ran>) {
        let (ran, reports) = mpsc::unbounded_channel();
        (Scheduler { workers: HashMap::new(), policy, limit, runner, ran, shutdown }, reports)
    }

    /// Asks for the service's processes to be told of `job`, replacing any change of
    /// the same service not yet told (submitting the same change again while it runs
    /// runs it once more afterwards). Returns at once.
    pub fn submit(&mut self, job: Job) {
        let id = job.service.clone();
        if let Some(worker) = self.workers.get(&id) {
            if worker.send(Some(job.clone())).is_ok() {
                return;
            }
        }
        let (tx, rx) = watch::channel(None);
        let _ = tx.send(Some(job));
        tokio::spawn(work(
            rx,
            self.policy,
            self.limit.clone(),
            self.runner.clone(),
            self.ran.clone(),
            self.shutdown.clone(),
        ));
        self.workers.insert(id, tx);
    }
}

/// One service's worker: runs until the scheduler or the subscriber goes.
async fn work(
    mut jobs: watch::Receiver<Option<Job>>,
    policy: Policy,
    limit: Limit,
    runner: Runner,
    ran: mpsc::UnboundedSender<Ran>,
    shutdown: CancellationToken,
) {
    // The first job is already in the channel, marked as changed.
    jobs.mark_changed();
    loop {
        tokio::select! {
            changed = jobs.changed() => if changed.is_err() { return },
            () = shutdown.cancelled() => return,
        }
        if !policy.splay.is_zero() {
            let delay = policy.splay.mul_f64(rand::random::<f64>());
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = shutdown.cancelled() => return,
            }
        }
        let mut backoff = policy.retry_initial;
        let mut attempt = 0;
        let mut last: Option<Job> = None;
        loop {
            let Some(job) = jobs.borrow_and_update().clone() else { break };
            if last.as_ref() == Some(&job) {
                attempt += 1;
            } else {
                attempt = 1;
                backoff = policy.retry_initial;
            }
            last = Some(job.clone());
            let Some(permit) = limit.acquire(&job, &shutdown).await else { return };
            let started = tokio::time::Instant::now();
            let Told { result, health } = runner(job.clone()).await;
            let took = started.elapsed();
            permit.release().await;
            let ok = result.is_ok();
            if ran.send(Ran { job, result, health, attempt, took }).is_err() {
                return;
            }
            if ok {
                break;
            }
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                changed = jobs.changed() => if changed.is_err() { return },
                () = shutdown.cancelled() => return,
            }
            backoff = (backoff * 2).min(policy.retry_max);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tokio::time::Instant;

    use super::*;

    fn job(name: &str, commit: &str) -> Job {
        Job {
            service: ServiceId::service(name),
            commit: Some(commit.to_owned()),
            ref_name: "refs/heads/services/x/master".to_owned(),
            dir: PathBuf::from("/etc/x"),
        }
    }

    /// A runner that records when it ran what, failing while `fail` says so.
    type Log = Arc<Mutex<Vec<(Instant, Job)>>>;

    fn recorder(fail: impl Fn(&Job, usize) -> bool + Send + Sync + 'static) -> (Runner, Log) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let seen = log.clone();
        let runner: Runner = Arc::new(move |job: Job| {
            let n = {
                let mut log = seen.lock().expect("log");
                log.push((Instant::now(), job.clone()));
                log.len()
            };
            let failed = fail(&job, n);
            Box::pin(async move {
                let result = if failed {
                    Err(Failure { message: "--exec exited with exit status: 1".into(), status: Some(1) })
                } else {
                    Ok(Some(0))
                };
                Told { result, health: None }
            })
        });
        (runner, log)
    }

    #[tokio::test(start_paused = true)]
    async fn splay_spreads_first_runs_over_the_window_and_never_beyond() {
        let splay = Duration::from_secs(30);
        let (runner, log) = recorder(|_, _| false);
        let policy = Policy { splay, ..Policy::default() };
        let (mut scheduler, mut reports) = Scheduler::new(policy, Limit::None, runner, CancellationToken::new());
        let start = Instant::now();
        for i in 0..200 {
            scheduler.submit(job(&format!("s{i}"), "c1"));
        }
        for _ in 0..200 {
            assert!(reports.recv().await.expect("report").result.is_ok());
        }
        let delays: Vec<Duration> = log.lock().expect("log").iter().map(|(at, _)| *at - start).collect();
        assert_eq!(delays.len(), 200);
        assert!(delays.iter().all(|d| *d < splay), "a run waited longer than the splay");
        let early = delays.iter().filter(|d| **d < splay / 2).count();
        assert!((60..=140).contains(&early), "{early} of 200 in the first half of the window: not spread");
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_exec_is_retried_with_backoff_and_a_newer_change_replaces_it() {
        // c1 always fails; c2 succeeds.
        let (runner, log) = recorder(|job, _| job.commit.as_deref() == Some("c1"));
        let policy =
            Policy { retry_initial: Duration::from_secs(1), retry_max: Duration::from_secs(4), ..Policy::default() };
        let (mut scheduler, mut reports) = Scheduler::new(policy, Limit::None, runner, CancellationToken::new());
        let start = Instant::now();
        scheduler.submit(job("s", "c1"));
        let mut attempts = Vec::new();
        for _ in 0..5 {
            let ran = reports.recv().await.expect("report");
            assert_eq!(ran.result.as_ref().map_err(|f| f.status), Err(Some(1)));
            attempts.push(ran.attempt);
        }
        assert_eq!(attempts, [1, 2, 3, 4, 5]);
        let gaps: Vec<u64> = log.lock().expect("log").iter().map(|(at, _)| (*at - start).as_secs()).collect();
        // 1, 2, 4, then capped at 4.
        assert_eq!(gaps, [0, 1, 3, 7, 11]);
        // A newer change: the worker drops c1 and runs c2 without waiting out the backoff.
        let before = Instant::now();
        scheduler.submit(job("s", "c2"));
        let ran = reports.recv().await.expect("report");
        assert_eq!(ran.job.commit.as_deref(), Some("c2"));
        assert!(ran.result.is_ok());
        assert_eq!(ran.attempt, 1);
        assert!(Instant::now() - before < Duration::from_secs(1));
        // ...and c1 never runs again.
        tokio::time::sleep(Duration::from_secs(120)).await;
        assert!(reports.try_recv().is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn changes_arriving_while_one_runs_are_coalesced_into_one_more_run() {
        let (runner, log) = recorder(|_, _| false);
        let (mut scheduler, mut reports) =
            Scheduler::new(Policy::default(), Limit::None, runner, CancellationToken::new());
        scheduler.submit(job("s", "c1"));
        scheduler.submit(job("s", "c2"));
        scheduler.submit(job("s", "c3"));
        let ran = reports.recv().await.expect("report");
        assert_eq!(ran.job.commit.as_deref(), Some("c3"));
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(reports.try_recv().is_err(), "one run for the latest change only");
        assert_eq!(log.lock().expect("log").len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_local_limit_bounds_concurrent_runs() {
        let running = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let peak = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (r, p) = (running.clone(), peak.clone());
        let runner: Runner = Arc::new(move |_job| {
            let (r, p) = (r.clone(), p.clone());
            Box::pin(async move {
                let now = r.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                p.fetch_max(now, std::sync::atomic::Ordering::SeqCst);
                tokio::time::sleep(Duration::from_secs(1)).await;
                r.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                Told { result: Ok(None), health: None }
            })
        });
        let limit = Limit::Local(Arc::new(tokio::sync::Semaphore::new(3)));
        let (mut scheduler, mut reports) = Scheduler::new(Policy::default(), limit, runner, CancellationToken::new());
        let start = Instant::now();
        for i in 0..10 {
            scheduler.submit(job(&format!("s{i}"), "c1"));
        }
        for _ in 0..10 {
            reports.recv().await.expect("report");
        }
        assert_eq!(peak.load(std::sync::atomic::Ordering::SeqCst), 3);
        assert_eq!((Instant::now() - start).as_secs(), 4, "10 runs of 1 s, 3 at a time");
    }
}
