//! What every ref was last pushed to, read from the master's commit stream: what tells
//! a commit on its way from a commit that concerns nobody.

use std::collections::BTreeMap;

use async_nats::jetstream;
use confcast_schemas::{decode, streams, subject, CommitEvent};
use futures::StreamExt;

/// What every ref was last pushed to, as the master's commit stream tells it (its
/// latest event per ref). Read once by [`pushed`]; a commit that is neither the latest
/// push of a ref nor published by any relay is on nobody's way.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pushed {
    /// Ref name → the commit it was last pushed to (deleted refs left out).
    pub heads: BTreeMap<String, String>,
    /// Whether the commit stream could be read: without it nothing is known of pushes,
    /// and a commit target may still be on its way.
    pub known: bool,
}

impl Pushed {
    /// The refs last pushed to a commit starting with `prefix`, with that commit.
    pub fn refs_at<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = (&'a str, &'a str)> + 'a {
        self.heads.iter().filter(move |(_, c)| c.starts_with(prefix)).map(|(r, c)| (r.as_str(), c.as_str()))
    }
}

/// Reads the latest commit event of every ref from the commit stream on `js` (the
/// master's NATS, or a datacenter's mirror of its stream). When the stream is not there
/// or cannot be read (no permission, no answer within `wait`), nothing is known:
/// [`Pushed::known`] is false, and callers wait as they would have.
pub async fn pushed(js: &jetstream::Context, wait: std::time::Duration) -> Pushed {
    match tokio::time::timeout(wait, last_pushes(js)).await {
        Ok(Some(heads)) => Pushed { heads, known: true },
        _ => Pushed::default(),
    }
}

/// The latest commit of every ref in the commit stream; `None` when it cannot be read.
async fn last_pushes(js: &jetstream::Context) -> Option<BTreeMap<String, String>> {
    let stream = js.get_stream(subject::COMMITS_STREAM).await.ok()?;
    let consumer = stream.create_consumer(streams::last_per_subject(subject::commits_wildcard())).await.ok()?;
    let mut pending = consumer.cached_info().num_pending;
    let mut heads = BTreeMap::new();
    if pending == 0 {
        return Some(heads);
    }
    let mut messages = consumer.messages().await.ok()?;
    while let Some(message) = messages.next().await {
        let message = message.ok()?;
        if let Ok(event) = decode::<CommitEvent>(&message.payload) {
            match event.new {
                Some(commit) => heads.insert(event.ref_name, commit),
                None => heads.remove(&event.ref_name),
            };
        }
        pending = message.info().map(|i| i.pending).unwrap_or(0).min(pending.saturating_sub(1));
        if pending == 0 {
            break;
        }
    }
    Some(heads)
}
