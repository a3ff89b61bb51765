//! Following a rollout live: the latest head, rollout state and host report of every
//! service in each datacenter, then every new one, recomputing [`progress_pushed`] on
//! each change.

use std::collections::BTreeMap;

use async_nats::jetstream::{self, consumer::pull::Ordered};
use confcast_schemas::rollout::RolloutState;
use confcast_schemas::{decode, streams, subject, HostStatus, ServiceHead};
use futures::StreamExt;

use super::progress::{progress_pushed, Observed, Rollout, Verdict};
use super::pushed::Pushed;
use super::target::Target;

/// Failures reading the bus.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// The server's streams could not be listed.
    #[error("listing streams")]
    ListStreams(#[source] jetstream::context::StreamsError),
    /// A stream could not be looked up.
    #[error("opening {stream}")]
    OpenStream {
        /// The stream.
        stream: String,
        /// Why.
        #[source]
        source: jetstream::context::GetStreamError,
    },
    /// A reader of a stream could not be created.
    #[error("reading {stream}")]
    CreateReader {
        /// The stream.
        stream: String,
        /// Why.
        #[source]
        source: jetstream::stream::ConsumerError,
    },
    /// A reader of a stream could not be started.
    #[error("reading {stream}")]
    StartReader {
        /// The stream.
        stream: String,
        /// Why.
        #[source]
        source: jetstream::consumer::StreamError,
    },
    /// Reading the streams failed part-way.
    #[error("following the datacenter's streams")]
    Follow(#[source] jetstream::consumer::pull::OrderedError),
    /// The server ended the readers.
    #[error("following the datacenter's streams: the server closed them")]
    Closed,
    /// A datacenter named on the command line has no relay state.
    #[error("datacenter {0:?} has no state stream: no relay has published for it")]
    UnknownDatacenter(String),
}

/// Every datacenter a relay published for: the state streams on the server.
pub async fn datacenters(js: &jetstream::Context) -> Result<Vec<String>, WatchError> {
    let mut names = js.stream_names();
    let mut dcs = Vec::new();
    while let Some(name) = names.next().await {
        let name = name.map_err(WatchError::ListStreams)?;
        let Some(dc) = subject::state_stream_datacenter(&name) else { continue };
        // `CONFCAST_DC_<x>_STATE` is also the update stream of a datacenter named
        // `<x>_STATE`: only a stream with a state stream's subjects counts.
        if let Ok(stream) = js.get_stream(&name).await {
            if stream.cached_info().config.subjects == subject::state_stream_subjects(&dc) {
                dcs.push(dc);
            }
        }
    }
    dcs.sort();
    dcs.dedup();
    Ok(dcs)
}

/// The datacenters to follow on `client`, each with the JetStream context its streams
/// are read through: those `named`, each in the JetStream domain named after it when
/// `in_domains` (the leaf-node topology), else every datacenter a relay published for
/// on the server itself.
pub async fn datacenters_to_follow(
    client: &async_nats::Client,
    named: &[String],
    in_domains: bool,
) -> Result<Vec<(String, jetstream::Context)>, WatchError> {
    let js = jetstream::new(client.clone());
    if named.is_empty() {
        return Ok(datacenters(&js).await?.into_iter().map(|dc| (dc, js.clone())).collect());
    }
    Ok(named
        .iter()
        .map(|dc| {
            let js = if in_domains { jetstream::with_domain(client.clone(), dc) } else { js.clone() };
            (dc.clone(), js)
        })
        .collect())
}

/// What a feed carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Carries {
    /// The relay's heads.
    Heads,
    /// The relay's rollout states.
    Rollouts,
    /// The hosts' status reports.
    Statuses,
}

/// One live feed: the latest message per subject, then every new one.
struct Feed {
    dc: usize,
    carries: Carries,
    /// Messages still to come from the initial replay; 0 once caught up.
    initial: u64,
}

/// When a watch stops before its deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Until {
    /// The rollout is complete, or halted where it is not complete.
    Stopped,
    /// Nothing is left to wait for now: what is not complete waits for a wave, a bake
    /// or an operator ([`super::DcProgress::settled`]), or halted.
    Settled,
}

/// Opens a feed of `stream` filtered by `filter`, with how many messages its initial
/// replay holds; `None` when the stream does not exist.
pub(crate) async fn open_feed(
    js: &jetstream::Context,
    stream: &str,
    filter: String,
) -> Result<Option<(u64, Ordered)>, WatchError> {
    let stream = match js.get_stream(stream).await {
        Ok(stream) => stream,
        Err(e) if streams::is_missing(&e) => return Ok(None),
        Err(source) => return Err(WatchError::OpenStream { stream: stream.to_owned(), source }),
    };
    let name = stream.cached_info().config.name.clone();
    let consumer = stream
        .create_consumer(streams::last_per_subject(filter))
        .await
        .map_err(|source| WatchError::CreateReader { stream: name.clone(), source })?;
    let pending = consumer.cached_info().num_pending;
    let messages = consumer.messages().await.map_err(|source| WatchError::StartReader { stream: name, source })?;
    Ok(Some((pending, messages)))
}

/// Follows the rollout of `targets` in `dcs` live: calls `on_change` with every new
/// state, once each datacenter's heads and reports have been read, and returns when it
/// is complete, when nothing is affected and cannot become so (a ref target no relay
/// follows), when nothing is left to wait for now (each datacenter complete, halted, or
/// rolling out in waves with every host of the released waves done: a bake or the next
/// wave can take far longer than a push waits), or at `deadline` with the last state. Each datacenter's streams are read
/// through the JetStream context given with it: the same one for every datacenter on
/// one NATS, or `jetstream::with_domain(client, dc)` from the master's NATS in the
/// leaf-node topology.
pub async fn watch(
    dcs: &[(String, jetstream::Context)],
    targets: &[Target],
    deadline: tokio::time::Instant,
    on_change: impl FnMut(&Rollout),
) -> Result<Rollout, WatchError> {
    watch_until(dcs, targets, &Pushed::default(), deadline, Until::Settled, on_change).await
}

/// A message of one datacenter's feed: (datacenter index, what it carries), message.
type Keyed = ((usize, Carries), Result<jetstream::Message, jetstream::consumer::pull::OrderedError>);

/// Opens the head, rollout and status feeds of every datacenter.
async fn open_feeds(
    dcs: &[(String, jetstream::Context)],
) -> Result<(Vec<Feed>, futures::stream::SelectAll<futures::stream::BoxStream<'static, Keyed>>), WatchError> {
    let mut feeds = Vec::new();
    let mut streams = Vec::new();
    for (i, (dc, js)) in dcs.iter().enumerate() {
        let Some((pending, heads)) = open_feed(js, &subject::state_stream(dc), subject::heads_wildcard(dc)).await?
        else {
            return Err(WatchError::UnknownDatacenter(dc.clone()));
        };
        streams.push(heads.map(move |m| ((i, Carries::Heads), m)).boxed());
        feeds.push(Feed { dc: i, carries: Carries::Heads, initial: pending });
        // Rollout states share the state stream; without a rollout policy there are none.
        if let Some((pending, rollouts)) =
            open_feed(js, &subject::state_stream(dc), subject::rollouts_wildcard(dc)).await?
        {
            streams.push(rollouts.map(move |m| ((i, Carries::Rollouts), m)).boxed());
            feeds.push(Feed { dc: i, carries: Carries::Rollouts, initial: pending });
        }
        // A relay from before host status reports has no status stream: no hosts.
        let status_filter = subject::status_stream_subjects(dc).remove(0);
        if let Some((pending, statuses)) = open_feed(js, &subject::status_stream(dc), status_filter).await? {
            streams.push(statuses.map(move |m| ((i, Carries::Statuses), m)).boxed());
            feeds.push(Feed { dc: i, carries: Carries::Statuses, initial: pending });
        }
    }
    Ok((feeds, futures::stream::select_all(streams)))
}

/// Records a head, a rollout state or a host report read from a datacenter's feed.
fn observe(seen: &mut Observed, dc: &str, carries: Carries, payload: &[u8]) {
    match carries {
        Carries::Heads => match decode::<ServiceHead>(payload) {
            Ok(head) => seen.head(head),
            Err(e) => tracing::debug!(dc = %dc, error = %e, "ignoring an unreadable head"),
        },
        Carries::Rollouts => match decode::<RolloutState>(payload) {
            Ok(state) => seen.rollout(state),
            Err(e) => tracing::debug!(dc = %dc, error = %e, "ignoring an unreadable rollout state"),
        },
        Carries::Statuses => match decode::<HostStatus>(payload) {
            Ok(status) => seen.status(status),
            Err(e) => tracing::debug!(dc = %dc, error = %e, "ignoring an unreadable host status"),
        },
    }
}

/// What `publisher status` follows: [`watch`], knowing what the refs were last pushed
/// to ([`super::pushed()`]), so that a commit is known to concern nobody as soon as the
/// heads are read — no datacenter published it and none follows a ref last pushed to
/// it — and the watch returns at once. A rollout in waves is followed through its
/// waves until the deadline; one halted where it is not complete ends the watch.
pub async fn watch_pushed(
    dcs: &[(String, jetstream::Context)],
    targets: &[Target],
    pushed: &Pushed,
    deadline: tokio::time::Instant,
    on_change: impl FnMut(&Rollout),
) -> Result<Rollout, WatchError> {
    watch_until(dcs, targets, pushed, deadline, Until::Stopped, on_change).await
}

/// Follows the rollout until it is complete, concerns nobody for good, `until` says
/// there is no need to go on, or `deadline`.
async fn watch_until(
    dcs: &[(String, jetstream::Context)],
    targets: &[Target],
    pushed: &Pushed,
    deadline: tokio::time::Instant,
    until: Until,
    mut on_change: impl FnMut(&Rollout),
) -> Result<Rollout, WatchError> {
    let mut observed: BTreeMap<String, Observed> =
        dcs.iter().map(|(dc, _)| (dc.clone(), Observed::default())).collect();
    let (mut feeds, mut merged) = open_feeds(dcs).await?;
    let final_when_unaffected = pushed.known || targets.iter().all(Target::known_from_heads);
    let mut last: Option<Rollout> = None;
    loop {
        if feeds.iter().all(|f| f.initial == 0) {
            let rollout = progress_pushed(targets, &observed, pushed);
            if last.as_ref() != Some(&rollout) {
                on_change(&rollout);
                last = Some(rollout.clone());
            }
            match rollout.verdict() {
                Verdict::Complete => return Ok(rollout),
                Verdict::NothingAffected if final_when_unaffected => return Ok(rollout),
                Verdict::InProgress if rollout.stopped() => return Ok(rollout),
                Verdict::InProgress if until == Until::Settled && rollout.dcs.iter().all(|d| d.settled()) => {
                    return Ok(rollout)
                }
                _ => {}
            }
        }
        let next = match tokio::time::timeout_at(deadline, merged.next()).await {
            Ok(next) => next,
            Err(_) => return Ok(last.unwrap_or_else(|| progress_pushed(targets, &observed, pushed))),
        };
        let ((dc, carries), message) = match next {
            Some((key, Ok(message))) => (key, message),
            Some((_, Err(e))) => return Err(WatchError::Follow(e)),
            None => return Err(WatchError::Closed),
        };
        let seen = observed.get_mut(&dcs[dc].0).expect("every datacenter is observed");
        observe(seen, &dcs[dc].0, carries, &message.payload);
        if let Some(feed) = feeds.iter_mut().find(|f| f.dc == dc && f.carries == carries) {
            if feed.initial > 0 {
                feed.initial = message.info().map(|i| i.pending).unwrap_or(0).min(feed.initial - 1);
            }
        }
    }
}
