//! What a relay is given to run: [`Config`], built by `main.rs` from its flags (or by a
//! test), and [`StreamLayout`], where the commit stream is and how the relay's own
//! streams are replicated.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::consul;
use crate::metrics::Metrics;
use crate::mirror::GitCredentials;

/// What a relay needs to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// NATS URL of the datacenter's server.
    pub nats_url: String,
    /// The datacenter this relay serves.
    pub dc: String,
    /// Where the master is served (path, `file://`, `git://`, `ssh://`, `http(s)://`).
    pub master_url: String,
    /// Directory for the mirror.
    pub state_dir: PathBuf,
    /// How long a fetch may wait on the network (per read or write on `git://`, and
    /// twice that for a whole fetch on any transport) before it fails and is retried.
    pub fetch_timeout: Duration,
    /// How long the datacenter's lease outlives its holder (see [`crate::lease`]).
    pub lease_ttl: Duration,
    /// Consul to keep a copy of the index in, besides the NATS K/V bucket (see
    /// [`crate::consul::index`]).
    pub consul: Option<consul::Client>,
    /// Where the commit stream is, and how the relay's streams are replicated.
    pub streams: StreamLayout,
    /// NATS credentials and TLS.
    pub nats_auth: confcast_schemas::connect::NatsAuth,
    /// How to authenticate to the master.
    pub git: GitCredentials,
    /// nkey seed file to sign every published message with (see [`confcast_schemas::sign`]).
    pub signing_key: Option<PathBuf>,
    /// Operators' public keys whose rollout controls the relay accepts; with none,
    /// controls are accepted unsigned and NATS permissions decide who may send them.
    pub controls: Controls,
    /// How the datacenters a rollout waits for are reached.
    pub peers: crate::rollout::Peers,
    /// Where to serve `/metrics` and `/healthz`, if anywhere.
    pub listen: Option<SocketAddr>,
    /// The relay's metrics and readiness (see [`crate::metrics`]).
    pub metrics: Arc<Metrics>,
}

/// Who may control the datacenter's rollouts: the operators' keys (`--trusted-key`).
#[derive(Clone, Default)]
pub struct Controls(pub Arc<confcast_schemas::sign::Verifier>);

impl std::fmt::Debug for Controls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Controls").field(&if self.0.is_enabled() { "signed" } else { "unsigned" }).finish()
    }
}

impl Config {
    /// The NATS URL as messages show it: credentials redacted.
    pub(crate) fn nats_shown(&self) -> String {
        confcast_schemas::connect::redact_url(&self.nats_url)
    }

    /// The mirror's directory in the state directory.
    pub(crate) fn mirror_dir(&self) -> PathBuf {
        self.state_dir.join("mirror.git")
    }
}

/// Where the relay finds the commit stream and how its own streams are replicated.
#[derive(Debug, Clone, Default)]
pub struct StreamLayout {
    /// JetStream domain of the master's commit stream, if not the datacenter's own.
    pub commits_domain: Option<String>,
    /// Replicas of every stream and bucket the relay creates (3 on a NATS cluster).
    pub replicas: usize,
}
