//! What caused a sync: the relay's start, or a batch of commit events. It travels with
//! everything the sync publishes: in the dedup ids ([`Cause::tag`]), the updates'
//! `event_seq` and `pushed_at_ms`, the error events' ref and commit, and the log.

use confcast_schemas::message::now_ms;
use confcast_schemas::CommitEvent;

/// What caused a sync: a commit event (by stream sequence) or the relay's start.
#[derive(Debug, Clone)]
pub(crate) struct Cause {
    /// Part of the dedup ids of what the sync publishes: `boot<ms>`, `e<seq>` or
    /// `e<first>-<last>`.
    pub(crate) tag: String,
    /// Stream sequence of the last commit event handled; 0 at start.
    pub(crate) event_seq: u64,
    /// When the oldest event handled was pushed (when the relay started, at start).
    pub(crate) pushed_at_ms: u64,
    /// The ref of the newest event handled.
    pub(crate) ref_name: Option<String>,
    /// The commit it pointed at.
    pub(crate) commit: Option<String>,
    /// Sequences of the commit events handled, first and last; none at start.
    events: Option<(u64, u64)>,
}

impl Cause {
    /// The relay's start.
    pub(crate) fn boot() -> Cause {
        let now = now_ms();
        Cause { tag: format!("boot{now}"), event_seq: 0, pushed_at_ms: now, ref_name: None, commit: None, events: None }
    }

    /// A rollout that moved by itself (halted): its commit and ref.
    pub(crate) fn rollout(state: &confcast_schemas::rollout::RolloutState) -> Cause {
        let now = now_ms();
        Cause {
            tag: format!("rollout{now}"),
            event_seq: 0,
            pushed_at_ms: now,
            ref_name: Some(state.ref_name.clone()),
            commit: Some(state.commit.clone()),
            events: None,
        }
    }

    /// A batch of commit events, from the oldest (at stream sequence `first`) to the
    /// newest (at `last`).
    pub(crate) fn events(first: u64, oldest: &CommitEvent, last: u64, newest: &CommitEvent) -> Cause {
        Cause {
            tag: if first == last { format!("e{last}") } else { format!("e{first}-{last}") },
            event_seq: last,
            pushed_at_ms: oldest.pushed_at_ms,
            ref_name: Some(newest.ref_name.clone()),
            commit: newest.new.clone(),
            events: Some((first, last)),
        }
    }
}

impl std::fmt::Display for Cause {
    /// As logs show it: `start`, `event:17`, or `events:12-15`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.events {
            None => f.write_str("start"),
            Some((first, last)) if first == last => write!(f, "event:{last}"),
            Some((first, last)) => write!(f, "events:{first}-{last}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cause(events: Option<(u64, u64)>) -> Cause {
        Cause { tag: String::new(), event_seq: 0, pushed_at_ms: 0, ref_name: None, commit: None, events }
    }

    #[test]
    fn causes_read_as_what_they_are() {
        assert_eq!(cause(None).to_string(), "start");
        assert_eq!(cause(Some((17, 17))).to_string(), "event:17");
        assert_eq!(cause(Some((12, 15))).to_string(), "events:12-15");
    }
}
