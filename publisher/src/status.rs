//! Rollout convergence: how far a change has reached the hosts of each datacenter.
//!
//! Two things on the bus say where a rollout stands. Each datacenter's relay records the
//! commit it published for every service (its *head*, in the state stream
//! `CONFCAST_DC_<dc>_STATE`), and every host reports, per service it follows, the commit
//! it has in place and whether applying it and running `--exec` went well (the status
//! stream `CONFCAST_DC_<dc>_STATUS`, latest report per host and service).
//!
//! [`progress`] is the computation, plain and without I/O: given what was seen of both
//! ([`Observed`]) and what to look for ([`Target`]), it tells per datacenter which hosts
//! are at the target with a good status, which failed and which are still pending.
//! [`watch`] follows both streams live and recomputes on every change until the rollout
//! is complete or a deadline passes; [`Rollout::lines`] renders the one-line summary per
//! datacenter that `publisher status` and the post-receive hook print.
//!
//! The hosts of a service are the hosts that report a status for it in that datacenter:
//! a host that never reported is not counted, and a host that was removed is counted
//! until its last report ages out of the status stream (7 days).

use std::collections::{BTreeMap, BTreeSet};

use async_nats::jetstream::{self, consumer};
use confcast_schemas::{decode, subject, CommitEvent, HostStatus, Kind, ServiceHead};
use futures::StreamExt;

/// At most this many hosts are named per category in a summary line.
const NAMED_HOSTS: usize = 5;

/// What a rollout is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A commit id or a prefix of one (at least 7 hex digits, lower case): every service
    /// whose relay published a commit starting with it, and the same service in the
    /// datacenters whose relays have not published it yet.
    Commit(String),
    /// A ref, as `refs/heads/...`, `refs/tags/...` or short (`services/web/master`,
    /// tried as a branch, then as a tag): every service that follows it, at the commit
    /// the datacenter's relay published for it.
    Ref(String),
    /// A ref that was just pushed to `commit` (what the post-receive hook waits for):
    /// every service that follows `ref_name` must reach `commit`, or the commit the ref
    /// moved on to when a later push overtook this one.
    RefAt {
        /// The full ref name.
        ref_name: String,
        /// The pushed commit.
        commit: String,
        /// The commit the ref pointed at before the push, if any.
        old: Option<String>,
    },
}

impl Target {
    /// Reads a `publisher status` argument: 7 to 40 hex digits are a commit (prefix),
    /// anything else a ref.
    pub fn parse(arg: &str) -> Target {
        let arg = arg.trim();
        if (7..=40).contains(&arg.len()) && arg.bytes().all(|b| b.is_ascii_hexdigit()) {
            Target::Commit(arg.to_ascii_lowercase())
        } else {
            Target::Ref(arg.to_owned())
        }
    }

    /// Whether the target is known to be final as soon as the heads are read: a ref is
    /// followed or not, while a commit may still be on its way to the relays.
    fn known_from_heads(&self) -> bool {
        !matches!(self, Target::Commit(_))
    }

    fn follows_ref(&self, ref_name: &str) -> bool {
        match self {
            Target::Commit(_) => false,
            Target::Ref(r) => {
                ref_name == r
                    || ref_name.strip_prefix("refs/heads/") == Some(r.as_str())
                    || ref_name.strip_prefix("refs/tags/") == Some(r.as_str())
            }
            Target::RefAt { ref_name: r, .. } => ref_name == r,
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Commit(c) => f.write_str(c),
            Target::Ref(r) => f.write_str(r),
            Target::RefAt { ref_name, commit, .. } => write!(f, "{ref_name} at {}", short(commit)),
        }
    }
}

/// What was seen on the bus of one datacenter.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    /// The relay's head of every service.
    pub heads: BTreeMap<(Kind, String), ServiceHead>,
    /// The latest report of every host, per service.
    pub hosts: BTreeMap<(Kind, String), BTreeMap<String, HostStatus>>,
}

impl Observed {
    /// Records a head.
    pub fn head(&mut self, head: ServiceHead) {
        self.heads.insert((head.kind, head.name.clone()), head);
    }

    /// Records a host's report.
    pub fn status(&mut self, status: HostStatus) {
        self.hosts.entry((status.kind, status.name.clone())).or_default().insert(status.host.clone(), status);
    }
}

/// Where one host stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostState {
    /// At the target commit, applied and told with success.
    Done,
    /// Not there yet, with the commit it has in place.
    Pending {
        /// The host's commit, if it has one.
        at: Option<String>,
    },
    /// It reported a failure: an update it could not apply, or an `--exec` that failed.
    Failed {
        /// The host's commit, when it is not the target.
        at: Option<String>,
        /// What went wrong, short.
        reason: String,
    },
}

/// One host of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostProgress {
    /// Host id.
    pub host: String,
    /// Where it stands.
    pub state: HostState,
}

/// One affected service of a datacenter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceProgress {
    /// Service, application or device.
    pub kind: Kind,
    /// Its name.
    pub name: String,
    /// The commit its hosts must reach.
    pub commit: String,
    /// The relay's head when it has not published `commit` yet.
    pub relay_at: Option<String>,
    /// Its hosts, by id.
    pub hosts: Vec<HostProgress>,
}

/// One datacenter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DcProgress {
    /// Datacenter id.
    pub dc: String,
    /// The services the target concerns there (none: not affected).
    pub services: Vec<ServiceProgress>,
}

impl DcProgress {
    fn hosts(&self) -> impl Iterator<Item = &HostProgress> {
        self.services.iter().flat_map(|s| s.hosts.iter())
    }

    /// Hosts (per affected service) in all.
    pub fn total(&self) -> usize {
        self.hosts().count()
    }

    /// Hosts at the target with a good status.
    pub fn done(&self) -> usize {
        self.hosts().filter(|h| h.state == HostState::Done).count()
    }

    /// Whether the datacenter is affected at all.
    pub fn affected(&self) -> bool {
        !self.services.is_empty()
    }

    /// Affected, and every host there is done. A service no host reports for counts as
    /// done: there is nobody to wait for.
    pub fn complete(&self) -> bool {
        self.affected() && self.services.iter().all(|s| s.relay_at.is_none()) && self.done() == self.total()
    }

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
        let mut notes = Vec::new();
        for service in &self.services {
            if let Some(at) = &service.relay_at {
                notes.push(format!("relay has {} {} at {}", service.kind, service.name, short(at)));
            }
            if service.hosts.is_empty() {
                notes.push(format!("no host reports status for {} {}", service.kind, service.name));
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
        if !notes.is_empty() {
            line.push_str(&format!(" ({})", notes.join("; ")));
        }
        line
    }
}

fn named(hosts: &[String]) -> String {
    let mut out = hosts.iter().take(NAMED_HOSTS).cloned().collect::<Vec<_>>().join(", ");
    if hosts.len() > NAMED_HOSTS {
        out.push_str(", ...");
    }
    out
}

/// A commit id shortened as git does (7 digits).
pub fn short(commit: &str) -> String {
    commit.chars().take(7).collect()
}

/// The whole rollout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rollout {
    /// Every datacenter looked at, by id.
    pub dcs: Vec<DcProgress>,
}

/// Whether a rollout is over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Every host of every affected service in every affected datacenter is at the
    /// target with a good status.
    Complete,
    /// Some host is pending or failed.
    InProgress,
    /// No datacenter (yet) runs anything the target concerns.
    NothingAffected,
}

impl Rollout {
    /// Where the rollout stands.
    pub fn verdict(&self) -> Verdict {
        let affected: Vec<&DcProgress> = self.dcs.iter().filter(|d| d.affected()).collect();
        if affected.is_empty() {
            Verdict::NothingAffected
        } else if affected.iter().all(|d| d.complete()) {
            Verdict::Complete
        } else {
            Verdict::InProgress
        }
    }

    /// One summary line per datacenter.
    pub fn lines(&self, target: &str) -> Vec<String> {
        self.dcs.iter().map(|d| d.line(target)).collect()
    }

    /// Hosts (per service) failed and pending, over every datacenter.
    pub fn counts(&self) -> (usize, usize) {
        let hosts = || self.dcs.iter().flat_map(|d| d.hosts());
        let failed = hosts().filter(|h| matches!(h.state, HostState::Failed { .. })).count();
        let pending = hosts().filter(|h| matches!(h.state, HostState::Pending { .. })).count();
        (failed, pending)
    }
}

/// The commit every affected service must reach, per datacenter: `(kind, name) →
/// (target commit, relay head when it differs)`.
fn affected(
    targets: &[Target],
    observed: &Observed,
    commit_refs: &BTreeMap<String, String>,
) -> BTreeMap<(Kind, String), String> {
    let mut out = BTreeMap::new();
    for (key, head) in &observed.heads {
        for target in targets {
            let want = match target {
                Target::Commit(prefix) => match &head.commit {
                    Some(c) if c.starts_with(prefix.as_str()) => Some(c.clone()),
                    // Not published here yet, but the same ref was published elsewhere
                    // at the target: this datacenter's relay is on its way.
                    _ => commit_refs.get(&head.ref_name).cloned(),
                },
                Target::Ref(_) if target.follows_ref(&head.ref_name) => head.commit.clone(),
                Target::RefAt { commit, old, .. } if target.follows_ref(&head.ref_name) => {
                    match &head.commit {
                        // A later push moved the ref on: its hosts go there instead.
                        Some(c) if c != commit && Some(c) != old.as_ref() => Some(c.clone()),
                        _ => Some(commit.clone()),
                    }
                }
                _ => None,
            };
            if let Some(want) = want {
                out.insert(key.clone(), want);
                break;
            }
        }
    }
    out
}

/// Why a host failed, short: `exec exited 1`, or the error it reported.
fn failure(status: &HostStatus) -> String {
    if let Some(code) = status.exec_status.filter(|c| *c != 0) {
        return format!("exec exited {code}");
    }
    let error = status.error.as_deref().unwrap_or("reported a failure").trim();
    // The subscriber words a failed command as `--exec exited with exit status: N`.
    if let Some(code) = error.strip_prefix("--exec exited with exit status: ") {
        return format!("exec exited {code}");
    }
    error.trim_start_matches("--").to_owned()
}

fn host_state(status: &HostStatus, commit: &str) -> HostState {
    let at_target = status.commit.as_deref() == Some(commit);
    match (at_target, status.ok) {
        (true, true) => HostState::Done,
        (true, false) => HostState::Failed { at: None, reason: failure(status) },
        (false, false) => HostState::Failed { at: status.commit.clone(), reason: failure(status) },
        (false, true) => HostState::Pending { at: status.commit.clone() },
    }
}

/// Computes the rollout of `targets` over every datacenter in `observed`.
pub fn progress(targets: &[Target], observed: &BTreeMap<String, Observed>) -> Rollout {
    progress_pushed(targets, observed, &Pushed::default())
}

/// [`progress`], knowing what the refs were last pushed to: a datacenter that follows a
/// ref last pushed to a target commit is on its way there, even before its relay got it.
pub fn progress_pushed(targets: &[Target], observed: &BTreeMap<String, Observed>, pushed: &Pushed) -> Rollout {
    // Refs whose relay somewhere published a commit the target names, or that were last
    // pushed to it: the same ref in every datacenter is affected, even before its relay
    // gets there.
    let mut commit_refs = BTreeMap::new();
    for target in targets {
        if let Target::Commit(prefix) = target {
            commit_refs.extend(pushed.refs_at(prefix).map(|(r, c)| (r.to_owned(), c.to_owned())));
            for head in observed.values().flat_map(|o| o.heads.values()) {
                if let Some(c) = head.commit.as_ref().filter(|c| c.starts_with(prefix.as_str())) {
                    commit_refs.insert(head.ref_name.clone(), c.clone());
                }
            }
        }
    }
    let dcs = observed
        .iter()
        .map(|(dc, seen)| {
            let services = affected(targets, seen, &commit_refs)
                .into_iter()
                .map(|((kind, name), commit)| {
                    let relay_at =
                        seen.heads.get(&(kind, name.clone())).and_then(|h| h.commit.clone()).filter(|c| *c != commit);
                    let hosts = seen
                        .hosts
                        .get(&(kind, name.clone()))
                        .map(|hosts| {
                            hosts
                                .values()
                                .map(|s| HostProgress { host: s.host.clone(), state: host_state(s, &commit) })
                                .collect()
                        })
                        .unwrap_or_default();
                    ServiceProgress { kind, name, commit, relay_at, hosts }
                })
                .collect();
            DcProgress { dc: dc.clone(), services }
        })
        .collect();
    Rollout { dcs }
}

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
    let read = async {
        let stream = js.get_stream(subject::COMMITS_STREAM).await.ok()?;
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: subject::commits_wildcard(),
                deliver_policy: consumer::DeliverPolicy::LastPerSubject,
                ..Default::default()
            })
            .await
            .ok()?;
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
    };
    match tokio::time::timeout(wait, read).await {
        Ok(Some(heads)) => Pushed { heads, known: true },
        _ => Pushed::default(),
    }
}

/// Failures reading the bus.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// A JetStream call failed.
    #[error("{what}: {message}")]
    Bus {
        /// What was being done.
        what: String,
        /// The server's or client's error.
        message: String,
    },
    /// A datacenter named on the command line has no relay state.
    #[error("datacenter {0:?} has no state stream: no relay has published for it")]
    UnknownDatacenter(String),
}

fn bus(what: impl Into<String>) -> impl FnOnce(String) -> StatusError {
    let what = what.into();
    move |message| StatusError::Bus { what, message }
}

/// Every datacenter a relay published for: the state streams on the server.
pub async fn datacenters(js: &jetstream::Context) -> Result<Vec<String>, StatusError> {
    let mut names = js.stream_names();
    let mut dcs = Vec::new();
    while let Some(name) = names.next().await {
        let name = name.map_err(|e| bus("listing streams")(e.to_string()))?;
        let Some(token) = name.strip_prefix("CONFCAST_DC_").and_then(|n| n.strip_suffix("_STATE")) else { continue };
        let Ok(dc) = subject::decode_token(token) else { continue };
        // `CONFCAST_DC_<x>_STATE` is also the update stream of a datacenter named
        // `<x>_STATE`: only a stream with a state stream's subjects counts.
        if subject::state_stream(&dc) == name {
            if let Ok(stream) = js.get_stream(&name).await {
                if stream.cached_info().config.subjects == subject::state_stream_subjects(&dc) {
                    dcs.push(dc);
                }
            }
        }
    }
    dcs.sort();
    dcs.dedup();
    Ok(dcs)
}

/// One live feed: the latest message per subject, then every new one.
struct Feed {
    dc: usize,
    heads: bool,
    /// Messages still to come from the initial replay; 0 once caught up.
    initial: u64,
}

async fn open_feed(
    js: &jetstream::Context,
    stream: &str,
    filter: String,
) -> Result<Option<(u64, async_nats::jetstream::consumer::pull::Ordered)>, StatusError> {
    let stream = match js.get_stream(stream).await {
        Ok(stream) => stream,
        Err(e)
            if matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(j)
                if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(bus(format!("opening {stream}"))(e.to_string())),
    };
    let name = stream.cached_info().config.name.clone();
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: filter,
            deliver_policy: consumer::DeliverPolicy::LastPerSubject,
            ..Default::default()
        })
        .await
        .map_err(|e| bus(format!("reading {name}"))(e.to_string()))?;
    let pending = consumer.cached_info().num_pending;
    let messages = consumer.messages().await.map_err(|e| bus(format!("reading {name}"))(e.to_string()))?;
    Ok(Some((pending, messages)))
}

/// Follows the rollout of `targets` in `dcs` live: calls `on_change` with every new
/// state, once each datacenter's heads and reports have been read, and returns when it
/// is complete, when nothing is affected and cannot become so (a ref target no relay
/// follows), or at `deadline` with the last state. Each datacenter's streams are read
/// through the JetStream context given with it: the same one for every datacenter on
/// one NATS, or `jetstream::with_domain(client, dc)` from the master's NATS in the
/// leaf-node topology.
pub async fn watch(
    dcs: &[(String, jetstream::Context)],
    targets: &[Target],
    deadline: tokio::time::Instant,
    on_change: impl FnMut(&Rollout),
) -> Result<Rollout, StatusError> {
    watch_pushed(dcs, targets, &Pushed::default(), deadline, on_change).await
}

/// [`watch`], knowing what the refs were last pushed to ([`pushed`]): then a commit is
/// known to concern nobody as soon as the heads are read — no datacenter published it
/// and none follows a ref last pushed to it — and the watch returns at once.
pub async fn watch_pushed(
    dcs: &[(String, jetstream::Context)],
    targets: &[Target],
    pushed: &Pushed,
    deadline: tokio::time::Instant,
    mut on_change: impl FnMut(&Rollout),
) -> Result<Rollout, StatusError> {
    let mut feeds = Vec::new();
    let mut streams = Vec::new();
    let mut observed: BTreeMap<String, Observed> = BTreeMap::new();
    for (i, (dc, js)) in dcs.iter().enumerate() {
        observed.insert(dc.clone(), Observed::default());
        let Some((pending, heads)) = open_feed(js, &subject::state_stream(dc), subject::heads_wildcard(dc)).await?
        else {
            return Err(StatusError::UnknownDatacenter(dc.clone()));
        };
        streams.push(heads.map(move |m| ((i, true), m)).boxed());
        feeds.push(Feed { dc: i, heads: true, initial: pending });
        // A relay from before host status reports has no status stream: no hosts.
        let status_filter = subject::status_stream_subjects(dc).remove(0);
        if let Some((pending, statuses)) = open_feed(js, &subject::status_stream(dc), status_filter).await? {
            streams.push(statuses.map(move |m| ((i, false), m)).boxed());
            feeds.push(Feed { dc: i, heads: false, initial: pending });
        }
    }
    let mut merged = futures::stream::select_all(streams);
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
                _ => {}
            }
        }
        let next = match tokio::time::timeout_at(deadline, merged.next()).await {
            Ok(next) => next,
            Err(_) => return Ok(last.unwrap_or_else(|| progress_pushed(targets, &observed, pushed))),
        };
        let ((dc, heads), message) = match next {
            Some((key, Ok(message))) => (key, message),
            Some((_, Err(e))) => return Err(bus("following the datacenter's streams")(e.to_string())),
            None => return Err(bus("following the datacenter's streams")("the server closed them".into())),
        };
        let seen = observed.get_mut(&dcs[dc].0).expect("every datacenter is observed");
        if heads {
            match decode::<ServiceHead>(&message.payload) {
                Ok(head) => seen.head(head),
                Err(e) => tracing::debug!(dc = %dcs[dc].0, error = %e, "ignoring an unreadable head"),
            }
        } else {
            match decode::<HostStatus>(&message.payload) {
                Ok(status) => seen.status(status),
                Err(e) => tracing::debug!(dc = %dcs[dc].0, error = %e, "ignoring an unreadable host status"),
            }
        }
        if let Some(feed) = feeds.iter_mut().find(|f| f.dc == dc && f.heads == heads) {
            if feed.initial > 0 {
                feed.initial = message.info().map(|i| i.pending).unwrap_or(0).min(feed.initial - 1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use confcast_schemas::WIRE_VERSION;

    const A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
    const C: &str = "cccccccccccccccccccccccccccccccccccccccc";
    const REF: &str = "refs/heads/services/service0/master";

    fn head(name: &str, ref_name: &str, commit: &str) -> ServiceHead {
        ServiceHead {
            v: WIRE_VERSION,
            kind: Kind::Service,
            name: name.into(),
            ref_name: ref_name.into(),
            branch: "master".into(),
            version: "latest".into(),
            commit: Some(commit.into()),
            tree: None,
        }
    }

    fn status(host: &str, name: &str, commit: &str, error: Option<&str>, exec: Option<i32>) -> HostStatus {
        HostStatus {
            v: WIRE_VERSION,
            dc: "dc".into(),
            host: host.into(),
            kind: Kind::Service,
            name: name.into(),
            commit: Some(commit.into()),
            ok: error.is_none(),
            error: error.map(Into::into),
            exec_status: exec,
            at_ms: 1,
        }
    }

    fn dc(heads: Vec<ServiceHead>, statuses: Vec<HostStatus>) -> Observed {
        let mut seen = Observed::default();
        heads.into_iter().for_each(|h| seen.head(h));
        statuses.into_iter().for_each(|s| seen.status(s));
        seen
    }

    #[test]
    fn parses_commits_and_refs() {
        assert_eq!(Target::parse("1A2B3C4"), Target::Commit("1a2b3c4".into()));
        assert_eq!(Target::parse(A), Target::Commit(A.into()));
        assert_eq!(Target::parse("1a2b3c"), Target::Ref("1a2b3c".into()), "too short for a commit");
        assert_eq!(Target::parse("services/web/master"), Target::Ref("services/web/master".into()));
    }

    #[test]
    fn refs_match_full_short_and_tag_names() {
        let short = Target::Ref("services/service0/master".into());
        assert!(short.follows_ref(REF));
        assert!(Target::Ref(REF.into()).follows_ref(REF));
        assert!(Target::Ref("services/s/v1".into()).follows_ref("refs/tags/services/s/v1"));
        assert!(!short.follows_ref("refs/heads/services/service0/master2"));
    }

    #[test]
    fn counts_done_failed_and_pending_hosts() {
        let observed = BTreeMap::from([(
            "dc1".to_owned(),
            dc(
                vec![head("service0", REF, B), head("other", "refs/heads/services/other/master", C)],
                vec![
                    status("host-a", "service0", B, None, Some(0)),
                    status("host-b", "service0", A, None, None),
                    status("host-c", "service0", B, Some("--exec exited with exit status: 1"), None),
                    status("host-d", "other", C, None, None),
                ],
            ),
        )]);
        let rollout = progress(&[Target::Ref("services/service0/master".into())], &observed);
        let dc1 = &rollout.dcs[0];
        assert_eq!((dc1.done(), dc1.total()), (1, 3), "host-d runs another service");
        assert_eq!(rollout.verdict(), Verdict::InProgress);
        assert_eq!(rollout.counts(), (1, 1));
        assert_eq!(
            dc1.line("services/service0/master"),
            "dc1: 1/3 at bbbbbbb (1 failed: host-c exec exited 1; 1 pending: host-b at aaaaaaa)"
        );
    }

    #[test]
    fn complete_when_every_host_is_there_and_ok() {
        let observed = BTreeMap::from([
            ("dc1".to_owned(), dc(vec![head("service0", REF, B)], vec![status("h1", "service0", B, None, Some(0))])),
            ("dc2".to_owned(), dc(vec![head("web", "refs/heads/services/web/master", C)], vec![])),
        ]);
        let rollout = progress(&[Target::Commit("bbbbbbb".into())], &observed);
        assert_eq!(rollout.verdict(), Verdict::Complete, "dc2 runs nothing at the commit");
        assert_eq!(rollout.lines("bbbbbbb"), vec!["dc1: 1/1 at bbbbbbb", "dc2: nothing follows bbbbbbb"]);
    }

    #[test]
    fn a_commit_not_yet_published_by_one_relay_is_pending_there() {
        let observed = BTreeMap::from([
            ("dc1".to_owned(), dc(vec![head("service0", REF, B)], vec![status("h1", "service0", B, None, None)])),
            ("dc2".to_owned(), dc(vec![head("service0", REF, A)], vec![status("h2", "service0", A, None, None)])),
        ]);
        let rollout = progress(&[Target::Commit(B[..10].into())], &observed);
        assert_eq!(rollout.verdict(), Verdict::InProgress);
        assert_eq!(
            rollout.dcs[1].line("x"),
            "dc2: 0/1 at bbbbbbb (relay has service service0 at aaaaaaa; 1 pending: h2 at aaaaaaa)"
        );
        assert!(!rollout.dcs[1].complete());
    }

    #[test]
    fn a_pushed_ref_waits_for_its_relay_then_follows_a_later_push() {
        let pushed = Target::RefAt { ref_name: REF.into(), commit: B.into(), old: Some(A.into()) };
        let before = BTreeMap::from([(
            "dc1".to_owned(),
            dc(vec![head("service0", REF, A)], vec![status("h1", "service0", A, None, None)]),
        )]);
        let rollout = progress(std::slice::from_ref(&pushed), &before);
        assert_eq!(rollout.dcs[0].services[0].commit, B, "the relay has not published the push yet");
        assert_eq!(rollout.verdict(), Verdict::InProgress);

        let overtaken = BTreeMap::from([(
            "dc1".to_owned(),
            dc(vec![head("service0", REF, C)], vec![status("h1", "service0", C, None, None)]),
        )]);
        assert_eq!(progress(std::slice::from_ref(&pushed), &overtaken).verdict(), Verdict::Complete);

        let elsewhere = Target::RefAt { ref_name: "refs/heads/datacenters/dc1".into(), commit: B.into(), old: None };
        assert_eq!(progress(&[elsewhere], &before).verdict(), Verdict::NothingAffected);
    }

    #[test]
    fn a_commit_last_pushed_to_a_followed_ref_is_on_its_way_and_any_other_concerns_nobody() {
        let observed = BTreeMap::from([(
            "dc1".to_owned(),
            dc(vec![head("service0", REF, A)], vec![status("h1", "service0", A, None, None)]),
        )]);
        let pushed = Pushed { heads: BTreeMap::from([(REF.to_owned(), B.to_owned())]), known: true };
        let rollout = progress_pushed(&[Target::Commit(B[..7].into())], &observed, &pushed);
        assert_eq!(rollout.verdict(), Verdict::InProgress, "the relay has not published it yet");
        assert_eq!(rollout.dcs[0].services[0].relay_at.as_deref(), Some(A));
        assert_eq!(pushed.refs_at("bbbbbbb").count(), 1);

        let unknown = progress_pushed(&[Target::Commit("deadbeef".into())], &observed, &pushed);
        assert_eq!(unknown.verdict(), Verdict::NothingAffected);
        assert_eq!(pushed.refs_at("deadbeef").count(), 0, "nobody pushed it");

        let elsewhere =
            Pushed { heads: BTreeMap::from([("refs/heads/services/x/m".to_owned(), C.to_owned())]), known: true };
        let unfollowed = progress_pushed(&[Target::Commit(C.into())], &observed, &elsewhere);
        assert_eq!(unfollowed.verdict(), Verdict::NothingAffected, "pushed to a ref no datacenter follows");
    }

    #[test]
    fn a_service_without_reporting_hosts_does_not_hold_the_rollout() {
        let observed = BTreeMap::from([("dc1".to_owned(), dc(vec![head("service0", REF, B)], vec![]))]);
        let rollout = progress(&[Target::Ref(REF.into())], &observed);
        assert_eq!(rollout.verdict(), Verdict::Complete);
        assert_eq!(rollout.lines(REF), vec!["dc1: 0/0 at bbbbbbb (no host reports status for service service0)"]);
    }

    #[test]
    fn failures_say_why_and_long_lists_are_cut() {
        let mut statuses: Vec<HostStatus> =
            (0..7).map(|i| status(&format!("h{i}"), "service0", B, Some("integrity: x changed"), None)).collect();
        statuses.push(status("h9", "service0", A, Some("tree mismatch"), Some(3)));
        let observed = BTreeMap::from([("dc1".to_owned(), dc(vec![head("service0", REF, B)], statuses))]);
        let line = progress(&[Target::Ref(REF.into())], &observed).lines(REF).remove(0);
        assert_eq!(
            line,
            "dc1: 0/8 at bbbbbbb (8 failed: h0 integrity: x changed, h1 integrity: x changed, h2 integrity: x changed, \
             h3 integrity: x changed, h4 integrity: x changed, ...)"
        );
        let h9 = status("h9", "service0", A, Some("tree mismatch"), Some(3));
        assert_eq!(host_state(&h9, B), HostState::Failed { at: Some(A.into()), reason: "exec exited 3".into() });
    }
}
