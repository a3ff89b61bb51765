//! `publisher status`: following how far a change has reached the hosts, until its
//! rollout is complete or a timeout passes (what it prints is [`crate::screen`]'s).

use std::time::Duration;

use async_nats::jetstream;
use confcast_schemas::connect::{redact_url, ConnectError, NatsAuth};

use crate::bus::connect;
use crate::rollout::{datacenters_to_follow, pushed, watch_pushed, Pushed, Rollout, Target, WatchError};

/// The longest `publisher status` waits for NATS to answer a single request.
const BUS_WAIT: Duration = Duration::from_secs(10);

/// What `publisher status` is asked.
#[derive(Debug, Clone)]
pub struct StatusRequest {
    /// The commit or ref whose rollout to follow.
    pub target: Target,
    /// NATS URL of the datacenters' servers.
    pub nats_url: String,
    /// NATS credentials.
    pub auth: NatsAuth,
    /// Datacenters to look at (none: every datacenter a relay published for).
    pub dcs: Vec<String>,
    /// Each datacenter's streams are in a JetStream domain named after it.
    pub domains: bool,
    /// How long to follow the rollout.
    pub timeout: Duration,
}

/// Where the rollout stood when `publisher status` stopped following it.
#[derive(Debug, Clone)]
pub struct Followed {
    /// The last state seen.
    pub rollout: Rollout,
    /// What the refs were last pushed to (read only for a commit target).
    pub pushed: Pushed,
}

/// Why the rollout could not be followed at all.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// NATS cannot be reached.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The datacenters' streams cannot be read, or a datacenter asked for is unknown.
    #[error(transparent)]
    Watch(#[from] WatchError),
    /// No relay has published on the server.
    #[error("no datacenter on {url}: no relay has published there")]
    NoDatacenter {
        /// The server, credentials redacted.
        url: String,
    },
}

/// Follows the rollout asked for, calling `on_change` with each new state, until it is
/// complete, concerns nobody for good, or the timeout passes.
pub async fn follow(request: &StatusRequest, on_change: impl FnMut(&Rollout)) -> Result<Followed, StatusError> {
    let deadline = tokio::time::Instant::now() + request.timeout;
    let wait = request.timeout.min(BUS_WAIT);
    let client = connect(&request.nats_url, &request.auth, wait).await?;
    let dcs = datacenters_to_follow(&client, &request.dcs, request.domains).await?;
    if dcs.is_empty() {
        return Err(StatusError::NoDatacenter { url: redact_url(&request.nats_url) });
    }
    // What the refs were last pushed to tells a commit on its way from one that
    // concerns nobody; only a commit needs it.
    let pushed = match &request.target {
        Target::Commit(_) => pushed(&jetstream::new(client), wait).await,
        _ => Pushed::default(),
    };
    let targets = std::slice::from_ref(&request.target);
    let rollout = watch_pushed(&dcs, targets, &pushed, deadline, on_change).await?;
    Ok(Followed { rollout, pushed })
}
