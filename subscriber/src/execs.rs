//! The host's side of `--exec` and `--signal`: the scheduler that runs them off the
//! update path ([`crate::schedule`]), then `--health-cmd` ([`crate::checks`]), the
//! changes handed to it, and what its runs gave.

use std::sync::Arc;
use std::time::Duration;

use confcast_schemas::process::error_chain;
use confcast_schemas::retry::Warnings;
use confcast_schemas::ServiceId;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_util::sync::CancellationToken;

use crate::bus::Reader;
use crate::config::Config;
use crate::exec::{notify, Change};
use crate::host::{Host, SubscriberError};
use crate::live::ServiceLabel;
use crate::schedule::{Job, Limit, NatsSlots, Policy, Ran, Runner, Scheduler, Told};

/// The scheduler of `config`'s `--exec`, and where its runs are reported; with
/// `--max-parallel`, once the datacenter's exec slots can be opened. `None` on shutdown.
pub(crate) async fn scheduler(
    config: &Config,
    reader: &Reader,
    shutdown: &CancellationToken,
) -> Option<(Scheduler, UnboundedReceiver<Ran>)> {
    let limit = match config.max_parallel {
        None => Limit::None,
        Some(slots) => Limit::Nats(Box::new(open_slots(config, reader, slots, shutdown).await?)),
    };
    let notify_config = Arc::new(config.notify.clone());
    let runner: Runner = Arc::new(move |job: Job| {
        let notify_config = notify_config.clone();
        Box::pin(async move {
            let change =
                Change { service: &job.service, commit: job.commit.as_deref(), ref_name: &job.ref_name, dir: &job.dir };
            let result = notify(&notify_config, &change).await;
            // A removal leaves nothing to judge.
            let health = match job.commit {
                Some(_) => Some(notify_config.checks.after(&change, &result).await),
                None => None,
            };
            Told { result, health }
        })
    });
    let policy = Policy { splay: config.splay, ..Policy::default() };
    Some(Scheduler::new(policy, limit, runner, shutdown.clone()))
}

/// The datacenter's exec slots, once they can be opened; `None` on shutdown.
async fn open_slots(config: &Config, reader: &Reader, slots: usize, shutdown: &CancellationToken) -> Option<NatsSlots> {
    let mut hint = Warnings::default();
    loop {
        match NatsSlots::open(reader.jetstream(), &config.dc, slots, &config.host_id).await {
            Ok(slots) => return Some(slots),
            Err(e) => {
                if hint.due() {
                    tracing::warn!(error = %error_chain(&e), "waiting for the datacenter's exec slots (--max-parallel)");
                }
                tokio::select! { () = tokio::time::sleep(Duration::from_secs(1)) => {}, () = shutdown.cancelled() => return None }
            }
        }
    }
}

impl Host {
    /// Hands every change whose processes have not been told yet to the scheduler,
    /// which runs `--exec` off this path (see [`crate::schedule`]).
    pub(crate) fn flush_execs(&mut self) {
        for (id, state) in &self.position.services {
            if !state.exec_pending || !self.submitted.insert(id.clone()) {
                continue;
            }
            self.scheduler.submit(Job {
                service: id.clone(),
                dir: self.config.dir.join(&id.name),
                commit: state.commit.clone(),
                ref_name: state.ref_name.clone(),
            });
        }
    }

    /// Records `first` and every other run of `--exec` already reported (see
    /// [`Host::exec_done`]), then saves the position once if any of them changed it:
    /// a burst of changes ends in a burst of runs.
    pub(crate) async fn execs_done(&mut self, first: Ran) -> Result<(), SubscriberError> {
        let mut changed = self.exec_done(first).await;
        while let Ok(ran) = self.exec_reports.try_recv() {
            changed |= self.exec_done(ran).await;
        }
        if changed {
            self.save().await?;
        }
        Ok(())
    }

    /// Records a run of `--exec`: reported either way, with the service's health after
    /// it; done for good when it succeeded for the change still in place (a failed one
    /// is retried by the scheduler, and again after a restart). Whether the position
    /// changed (it is saved by the caller; lost, the run is only made again after a
    /// restart).
    async fn exec_done(&mut self, ran: Ran) -> bool {
        let id = ran.job.service.clone();
        let ServiceId { kind, name } = &id;
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
            let label = ServiceLabel::of(&id);
            self.live.metrics.exec_last_status.get_or_create(&label).set(i64::from(status.unwrap_or(-1)));
        }
        if let Some(health) = ran.health.as_ref().filter(|h| !h.is_healthy() && ran.result.is_ok()) {
            self.live.metrics.error("health");
            // Its output was logged line by line as it came: this is one line.
            let reason = health.reason.as_deref().and_then(|r| r.lines().next()).unwrap_or_default();
            tracing::warn!(%kind, %name, %commit, reason, "unhealthy after the change");
        }
        // A commit --check-cmd refused since stays the last word on the service until
        // another one is applied.
        // A commit a halted rollout sent the host back to is reported `reverted`.
        let (error, health) = match self.refused(&id) {
            Some(refused) => (Some(refused.error.clone()), Some(refused.health.clone())),
            None => match self.reverted_health(&id, ran.job.commit.as_deref()).filter(|_| ran.result.is_ok()) {
                Some(reverted) => (error, Some(reverted)),
                None => (error, ran.health.clone()),
            },
        };
        self.report_judged(&id, ran.job.commit.clone(), error, status, health).await;
        if ran.result.is_ok() {
            if let Some(state) = self.position.services.get_mut(&id) {
                if state.exec_pending && state.commit == ran.job.commit {
                    state.exec_pending = false;
                    self.submitted.remove(&id);
                    return true;
                }
            }
        }
        false
    }
}
