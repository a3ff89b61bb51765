//! The one-line summary of a datacenter's rollout, as `publisher status` and the
//! post-receive hook print it:
//! `dc1: 98/100 at 1a2b3c4 (2 failed: host-7 exec exited 1, host-9 ...)`.

use std::collections::BTreeSet;

use super::progress::{DcProgress, HostState, Rollout};
use super::target::short;

/// At most this many hosts are named per category in a summary line.
const NAMED_HOSTS: usize = 5;

impl DcProgress {
    /// The summary line: `dc1: 98/100 at 1a2b3c4 (2 failed: host-7 exec exited 1, host-9 ...)`.
    pub fn line(&self, target: &str) -> String {
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
        let notes = self.notes();
        if !notes.is_empty() {
            line.push_str(&format!(" ({})", notes.join("; ")));
        }
        line
    }

    /// What the summary line says after the count: relays behind, services no host
    /// reports for, failed hosts, pending hosts.
    fn notes(&self) -> Vec<String> {
        let mut notes = Vec::new();
        for service in &self.services {
            let (kind, name) = (service.service.kind, &service.service.name);
            if let Some(at) = &service.relay_at {
                notes.push(format!("relay has {kind} {name} at {}", short(at)));
            }
            if service.hosts.is_empty() {
                notes.push(format!("no host reports status for {kind} {name}"));
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
        notes
    }
}

impl Rollout {
    /// One summary line per datacenter.
    pub fn lines(&self, target: &str) -> Vec<String> {
        self.dcs.iter().map(|d| d.line(target)).collect()
    }
}

fn named(hosts: &[String]) -> String {
    let mut out = hosts.iter().take(NAMED_HOSTS).cloned().collect::<Vec<_>>().join(", ");
    if hosts.len() > NAMED_HOSTS {
        out.push_str(", ...");
    }
    out
}
