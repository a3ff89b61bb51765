//! What the scenarios watch their processes by: the hosts' exec logs (when each host
//! ran `--exec` for a commit), a process going quiet (so that the work of set-up is not
//! counted as the work of a push), and the relay's own account of its syncs and fetches.

use std::thread;
use std::time::{Duration, Instant};

use confcast_tests::{get_monitoring, Subscriber};

use crate::report::cpu_ms;

/// Waits (reading every exec log every millisecond) until every one of `hosts` has run
/// `--exec` for `service` at `commit`; returns when the last one was seen.
pub(crate) fn execs_seen(hosts: &[&Subscriber], service: &str, commit: &str, timeout: Duration) -> Option<Instant> {
    let deadline = Instant::now() + timeout;
    let needle = format!("{service} {commit} ");
    let mut pending: Vec<&Subscriber> = hosts.to_vec();
    while Instant::now() < deadline {
        pending.retain(|host| !std::fs::read_to_string(&host.exec_log).unwrap_or_default().contains(&needle));
        if pending.is_empty() {
            return Some(Instant::now());
        }
        thread::sleep(Duration::from_millis(1));
    }
    None
}

/// [`execs_seen`] for one host.
pub(crate) fn exec_seen(host: &Subscriber, service: &str, commit: &str, timeout: Duration) -> Option<Instant> {
    execs_seen(&[host], service, commit, timeout)
}

/// Waits until none of `pids` has used CPU for half a second (at most `timeout`): the
/// relay has published what set-up caused, the hosts have applied it.
pub(crate) fn settle(pids: &[u32], timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let total = || pids.iter().map(|pid| cpu_ms(*pid)).sum::<u64>();
    let mut last = total();
    while Instant::now() < deadline {
        thread::sleep(Duration::from_millis(500));
        let now = total();
        if now == last {
            return;
        }
        last = now;
    }
}

/// The `elapsed_ms` of every "synced" line of a relay log after byte `from`.
pub(crate) fn synced_ms(log: &str, from: usize) -> Vec<f64> {
    log.get(from..)
        .unwrap_or("")
        .lines()
        .filter(|line| line.contains(" synced"))
        .filter_map(|line| line.split("elapsed_ms=").nth(1))
        .filter_map(|rest| rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
        .collect()
}

/// The relay's fetch time so far from its metrics on `port`: (seconds, fetches).
pub(crate) fn fetch_seconds(port: u16) -> (f64, u64) {
    let (_, body) = get_monitoring(port, "/metrics").unwrap_or_default();
    let value = |name: &str| -> f64 {
        body.lines()
            .find(|line| line.starts_with(name) && line[name.len()..].starts_with(' '))
            .and_then(|line| line.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    (value("confcast_relay_fetch_seconds_sum"), value("confcast_relay_fetch_seconds_count") as u64)
}
