//! The one-line summary of a datacenter's rollout, as `publisher status` and the
//! post-receive hook print it:
//! `dc1: 98/100 at 1a2b3c4 (2 failed: host-7 exec exited 1, host-9 ...)`, and for a
//! commit rolled out in waves where it stands:
//! `dc1: 1/3 at 1a2b3c4 (rolling out in waves, wave 1/2 (host-3), bake 20 s left; 2 held: host-1, host-2)`.

use std::collections::BTreeSet;

use confcast_schemas::message::now_ms;
use confcast_schemas::rollout::{Phase, RolloutState};

use super::progress::{DcProgress, HostState, Rollout};
use super::target::short;

/// At most this many hosts are named per category in a summary line.
const NAMED_HOSTS: usize = 5;

impl DcProgress {
    /// The summary line: `dc1: 98/100 at 1a2b3c4 (2 failed: host-7 exec exited 1, host-9 ...)`.
    pub fn line(&self, target: &str) -> String {
        self.line_at(target, now_ms())
    }

    /// [`DcProgress::line`] at `now_ms` (ms since the Unix epoch), which tells how much
    /// of a bake is left.
    pub fn line_at(&self, target: &str, now_ms: u64) -> String {
        if !self.affected() {
            return format!("{}: nothing follows {target}", self.dc);
        }
        let commits: BTreeSet<String> = self.services.iter().map(|s| short(&s.commit)).collect();
        let mut line = format!(
            "{}: {}/{} at {}",
            self.dc,
            self.done(),
            self.total(),
            commits.into_iter().collect::<Vec<_>>().join(", ")
        );
        let notes = self.notes(now_ms);
        if !notes.is_empty() {
            line.push_str(&format!(" ({})", notes.join("; ")));
        }
        line
    }

    /// What the summary line says after the count: relays behind, services no host
    /// reports for, rollouts in waves, failed hosts, pending hosts, held hosts.
    fn notes(&self, now_ms: u64) -> Vec<String> {
        let mut notes = Vec::new();
        for service in &self.services {
            let (kind, name) = (service.service.kind, &service.service.name);
            if let Some(at) = &service.relay_at {
                notes.push(format!("relay has {kind} {name} at {}", short(at)));
            }
            if service.hosts.is_empty() {
                notes.push(format!("no host reports status for {kind} {name}"));
            }
            if let Some(note) = service.rollout.as_ref().and_then(|r| rollout_note(r, now_ms)) {
                // With several services, say which one rolls out.
                notes.push(match self.services.len() {
                    1 => note,
                    _ => format!("{kind} {name} {note}"),
                });
            }
        }
        let failed: Vec<String> = self
            .hosts()
            .filter_map(|h| match &h.state {
                HostState::Failed { at, reason } => Some(match at {
                    Some(at) => format!("{} {reason} at {}", h.host, short(at)),
                    None => format!("{} {reason}", h.host),
                }),
                _ => None,
            })
            .collect();
        let pending: Vec<String> = self
            .hosts()
            .filter_map(|h| match &h.state {
                HostState::Pending { at: Some(at) } => Some(format!("{} at {}", h.host, short(at))),
                HostState::Pending { at: None } => Some(h.host.clone()),
                _ => None,
            })
            .collect();
        if !failed.is_empty() {
            notes.push(format!("{} failed: {}", failed.len(), named(&failed)));
        }
        if !pending.is_empty() {
            notes.push(format!("{} pending: {}", pending.len(), named(&pending)));
        }
        let held: Vec<String> =
            self.hosts().filter(|h| matches!(h.state, HostState::Held { .. })).map(|h| h.host.clone()).collect();
        if !held.is_empty() {
            notes.push(format!("{} held: {}", held.len(), named(&held)));
        }
        let reverted: Vec<String> = self
            .hosts()
            .filter_map(|h| match &h.state {
                HostState::Reverted { at: Some(at) } => Some(format!("{} to {}", h.host, short(at))),
                HostState::Reverted { at: None } => Some(h.host.clone()),
                _ => None,
            })
            .collect();
        if !reverted.is_empty() {
            notes.push(format!("{} reverted: {}", reverted.len(), named(&reverted)));
        }
        notes
    }
}

/// Where a rollout in waves stands, for the summary line; nothing once it completed
/// or was promoted (the host counts say the rest).
fn rollout_note(state: &RolloutState, now_ms: u64) -> Option<String> {
    let wave = format!("wave {}/{}", state.wave + 1, state.waves.len());
    let hosts = state.waves.get(state.wave).map(|hosts| named(hosts)).unwrap_or_default();
    let because = |prefix: &str| state.reason.as_deref().map(|r| format!("{prefix}{r}")).unwrap_or_default();
    Some(match state.phase {
        Phase::Complete | Phase::Promoted => return None,
        Phase::Waiting => format!("waiting to roll out in waves{}", because(": ")),
        Phase::Rolling => format!("rolling out in waves, {wave} ({hosts}), {}", bake(state, now_ms)),
        Phase::Paused => format!("rollout paused at {wave} ({hosts}){}", because(": ")),
        Phase::Halted => {
            let mut note = format!("rollout halted at {wave}{}", because(": "));
            if !state.unhealthy.is_empty() {
                let hosts: Vec<String> = state.unhealthy.iter().map(|(host, why)| format!("{host} {why}")).collect();
                note.push_str(&format!("; unhealthy: {}", hosts.join(", ")));
            }
            note
        }
    })
}

/// How much of the current wave's bake is left at `now_ms`.
fn bake(state: &RolloutState, now_ms: u64) -> String {
    match state.bake_ends_ms() {
        None => format!("bake {} s once the wave is healthy", state.policy.bake_secs),
        Some(end) if end > now_ms => format!("bake {} s left", (end - now_ms).div_ceil(1000)),
        Some(_) if state.wave + 1 < state.waves.len() => "bake over, next wave due".to_owned(),
        Some(_) => "bake over, completing".to_owned(),
    }
}

impl Rollout {
    /// One summary line per datacenter.
    pub fn lines(&self, target: &str) -> Vec<String> {
        let now = now_ms();
        self.dcs.iter().map(|d| d.line_at(target, now)).collect()
    }
}

fn named(hosts: &[String]) -> String {
    let mut out = hosts.iter().take(NAMED_HOSTS).cloned().collect::<Vec<_>>().join(", ");
    if hosts.len() > NAMED_HOSTS {
        out.push_str(", ...");
    }
    out
}
