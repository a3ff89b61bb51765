//! With `confcast.waitRollout` set, post-receive waits, that long at most, for the hosts
//! to converge on what it announced, and prints where each datacenter stands.

use std::time::Duration;

use confcast_publisher::rollout::{self, DcProgress, Target, Verdict};
use confcast_publisher::Settings;
use confcast_schemas::process::error_chain;

use crate::update::RefUpdate;

/// What the hook waits for after announcing `updates`: every service following a
/// pushed ref reaching the pushed commit.
pub fn rollout_targets(updates: &[RefUpdate]) -> Vec<Target> {
    updates
        .iter()
        .filter_map(|u| {
            Some(Target::RefAt {
                ref_name: u.ref_name.clone(),
                commit: u.new?.to_string(),
                old: u.old.map(|o| o.to_string()),
            })
        })
        .collect()
}

/// Waits up to `wait` for the rollout of `updates` in every datacenter, reading the bus
/// through `client` (the connection the events were announced on), and returns the
/// lines to show the pusher. Never fails: what went wrong is one of the lines.
pub async fn wait_rollout(
    client: &async_nats::Client,
    settings: &Settings,
    updates: &[RefUpdate],
    wait: Duration,
) -> Vec<String> {
    let started = tokio::time::Instant::now();
    let deadline = started + wait;
    let targets = rollout_targets(updates);
    if targets.is_empty() {
        return Vec::new();
    }
    let label = match targets.as_slice() {
        [one] => one.to_string(),
        _ => format!("{} refs", targets.len()),
    };
    let watched = tokio::time::timeout_at(deadline, async {
        let contexts = rollout::datacenters_to_follow(client, &settings.rollout_domains, true).await?;
        if contexts.is_empty() {
            return Ok(None);
        }
        Ok::<_, rollout::WatchError>(Some(rollout::watch(&contexts, &targets, deadline, |_| {}).await?))
    })
    .await;
    let rollout = match watched {
        Ok(Ok(Some(rollout))) => rollout,
        Ok(Ok(None)) => {
            return vec![format!(
                "confcast: no datacenter's state is visible on {}; not waiting for a rollout",
                settings.bus.nats_url
            )]
        }
        Ok(Err(e)) => return vec![format!("confcast: cannot follow the rollout: {}", error_chain(&e))],
        Err(_) => {
            return vec![format!(
                "confcast: no rollout seen within {wait:?} (NATS did not answer in time); the push itself succeeded"
            )]
        }
    };
    let affected: Vec<&DcProgress> = rollout.dcs.iter().filter(|d| d.affected()).collect();
    let mut lines: Vec<String> = affected.iter().map(|d| format!("confcast: {}", d.line(&label))).collect();
    let elapsed = started.elapsed();
    lines.push(match rollout.verdict() {
        Verdict::Complete => format!("confcast: rollout complete in {:.1}s", elapsed.as_secs_f64()),
        Verdict::NothingAffected => {
            format!("confcast: no datacenter follows {label} directly; not waiting for a rollout")
        }
        Verdict::InProgress => {
            let (failed, pending) = rollout.counts();
            let halted: Vec<&str> = rollout.halted().map(|d| d.dc.as_str()).collect();
            let in_waves: Vec<&str> = affected
                .iter()
                .filter(|d| !d.halted() && d.services.iter().any(|s| s.staged()))
                .map(|d| d.dc.as_str())
                .collect();
            if !halted.is_empty() {
                format!(
                    "confcast: rollout halted in {}: the hosts that took it go back (see above); \
                     the push itself succeeded: see `publisher status <commit>`",
                    halted.join(", ")
                )
            } else if !in_waves.is_empty() {
                format!(
                    "confcast: rolling out in waves in {} ({:.1}s after the push); \
                     the push itself succeeded: follow it with `publisher status <commit>`",
                    in_waves.join(", "),
                    elapsed.as_secs_f64()
                )
            } else {
                format!(
                    "confcast: rollout not complete after {}s ({failed} host(s) failed, {pending} pending); \
                     the push itself succeeded: follow it with `publisher status <commit>`",
                    wait.as_secs_f64()
                )
            }
        }
    });
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::update::sample_push;

    #[test]
    fn a_deleted_ref_has_nothing_to_roll_out() {
        let (a, b) = ("a".repeat(40), "b".repeat(40));
        let targets = rollout_targets(&sample_push());
        assert_eq!(targets.len(), 2, "a deleted ref has nothing to roll out");
        assert_eq!(targets[0], Target::RefAt { ref_name: "refs/heads/x".into(), commit: b, old: Some(a) });
    }
}
