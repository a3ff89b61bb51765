//! What the post-receive hook does with the events of a push: publish them after any
//! spooled ones, or spool them, within one short deadline.

use std::path::Path;
use std::time::Duration;

use async_nats::jetstream;
use confcast_schemas::process::error_chain;
use confcast_schemas::CommitEvent;

use crate::bus::{connect, publish_event};
use crate::settings::BusTarget;
use crate::spool::{drain, Spool};

/// What became of the events handed to [`announce`].
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Events (spooled earlier or new) acknowledged by JetStream now.
    pub published: usize,
    /// Of those, how many JetStream had already stored (dedup).
    pub duplicates: usize,
    /// New events written to the spool because the bus was unreachable.
    pub spooled: usize,
    /// Why the bus was not used, when it was not.
    pub error: Option<String>,
}

/// Publishes `events` after any spooled ones, or spools them; never takes longer than
/// `deadline` (plus local disk writes) and never fails: the spool is the fallback.
///
/// Returns, with the outcome, the connection it made, if it made one: the caller goes on
/// with it (the post-receive hook follows the rollout on it) rather than connecting again.
pub async fn announce(
    bus: &BusTarget,
    spool_dir: &Path,
    events: Vec<CommitEvent>,
    deadline: Duration,
) -> (Outcome, Option<async_nats::Client>) {
    let nats_url = &bus.nats_url;
    let spool = Spool::new(spool_dir);
    let attempt = tokio::time::timeout(deadline, async {
        let client = connect(nats_url, &bus.auth, deadline).await.map_err(|e| error_chain(&e))?;
        let js = jetstream::new(client.clone());
        let drained = drain(&js, &spool, bus.replicas).await.map_err(|e| error_chain(&e))?;
        let outcome = Outcome { published: drained.published, duplicates: drained.duplicates, ..Outcome::default() };
        Ok::<_, String>((client, js, outcome))
    })
    .await;

    let (client, js, outcome) = match attempt {
        Ok(Ok(ok)) => ok,
        Ok(Err(why)) => return (spool_all(&spool, &events, why), None),
        Err(_) => {
            let why = format!("NATS at {nats_url} did not answer within {deadline:?}");
            return (spool_all(&spool, &events, why), None);
        }
    };
    (publish_in_order(&js, &spool, &events, bus.replicas, deadline, outcome).await, Some(client))
}

/// Publishes the new events in order; whatever is left when one fails is spooled, so
/// the spool keeps them in order behind nothing that was published after them.
async fn publish_in_order(
    js: &jetstream::Context,
    spool: &Spool,
    events: &[CommitEvent],
    replicas: usize,
    deadline: Duration,
    mut outcome: Outcome,
) -> Outcome {
    for (i, event) in events.iter().enumerate() {
        match tokio::time::timeout(deadline, publish_event(js, event, replicas)).await {
            Ok(Ok(duplicate)) => {
                outcome.published += 1;
                outcome.duplicates += usize::from(duplicate);
            }
            Ok(Err(e)) => return merge(outcome, spool_all(spool, &events[i..], error_chain(&e))),
            Err(_) => {
                let why = format!("no ack from JetStream within {deadline:?}");
                return merge(outcome, spool_all(spool, &events[i..], why));
            }
        }
    }
    outcome
}

fn merge(mut a: Outcome, b: Outcome) -> Outcome {
    a.spooled += b.spooled;
    a.error = b.error;
    a
}

fn spool_all(spool: &Spool, events: &[CommitEvent], why: String) -> Outcome {
    let mut outcome = Outcome { error: Some(why), ..Outcome::default() };
    for event in events {
        match spool.push(event) {
            Ok(()) => outcome.spooled += 1,
            Err(e) => {
                // Nothing else can be done from inside a hook: say so loudly.
                outcome.error = Some(format!("{}; and spooling failed: {e}", outcome.error.unwrap_or_default()));
            }
        }
    }
    outcome
}
