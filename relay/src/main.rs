//! `relay`: one per datacenter. See the crate docs of `confcast_relay`.
//!
//! Exit status (see `confcast_schemas::process`): 2 when the configuration can never
//! work (a `--master` that names no repository or an unsupported transport, a state
//! directory in use, a key or token that cannot be read, bad flags), found at start and
//! said in one line; 1 when the relay stopped on an error while running. A master or a
//! bus that is down is waited out, never a reason to exit.

use std::path::PathBuf;
use std::process::ExitCode;

use confcast_schemas::process::{self, EXIT_FAILED};
use tokio_util::sync::CancellationToken;

/// Mirrors the master for one datacenter and publishes per-service updates to its hosts.
#[derive(Debug, clap::Parser)]
#[command(version, about)]
struct Cli {
    /// NATS URL of the datacenter's server.
    #[arg(long, env = "CONFCAST_NATS", default_value = "nats://127.0.0.1:4222")]
    nats: String,
    /// Datacenter id: follows `refs/heads/datacenters/<DC>` of the master.
    #[arg(long, env = "CONFCAST_DC")]
    dc: String,
    /// The master repository: a path, `file://`, `git://`, `ssh://` or `http(s)://` URL.
    #[arg(long, env = "CONFCAST_MASTER")]
    master: String,
    /// Directory for the relay's mirror of the master.
    #[arg(long, env = "CONFCAST_STATE_DIR")]
    state_dir: PathBuf,
    /// How long a fetch may wait on the network before it fails and is retried, in
    /// seconds (per read or write on `git://`; twice that for a whole fetch).
    #[arg(long, env = "CONFCAST_FETCH_TIMEOUT_SECS", default_value_t = 30)]
    fetch_timeout_secs: u64,
    /// Seconds a relay's hold on its datacenter outlives it: with several relays for one
    /// datacenter, a standby takes over this long after the active one dies.
    #[arg(long, env = "CONFCAST_LEASE_TTL_SECS", default_value_t = 6)]
    lease_ttl_secs: u64,
    /// Consul HTTP API (`http(s)://host:port`) to keep a copy of the configuration index
    /// in, besides the NATS K/V bucket: `confcast/<DC>/configurations/<kind>s/<name>/<version>`
    /// = `<branch>/<commit>`, written in check-and-set transactions; caught up in the
    /// background whenever Consul was unreachable.
    #[arg(long, env = "CONFCAST_CONSUL", value_name = "URL")]
    consul: Option<String>,
    /// File holding the Consul ACL token, sent as `X-Consul-Token` (never logged).
    #[arg(long, env = "CONFCAST_CONSUL_TOKEN_FILE", value_name = "FILE", requires = "consul")]
    consul_token_file: Option<PathBuf>,
    /// JetStream domain of the master's NATS, when this datacenter's NATS is a leaf node
    /// with a domain of its own: the relay keeps a local mirror of the commit stream
    /// sourced from that domain and reads the commit events from it.
    #[arg(long, env = "CONFCAST_COMMITS_DOMAIN", value_name = "DOMAIN")]
    commits_domain: Option<String>,
    /// Replicas of the streams and buckets the relay creates (3 when the datacenter's
    /// NATS is a cluster).
    #[arg(long, env = "CONFCAST_REPLICAS", default_value_t = 1)]
    replicas: usize,
    /// File holding an nkey seed (`publisher keygen`) to sign every message for the
    /// datacenter's hosts with; hosts given its public key (`subscriber --trusted-key`)
    /// refuse anything else.
    #[arg(long, env = "CONFCAST_SIGNING_KEY", value_name = "FILE")]
    signing_key: Option<PathBuf>,
    /// An operator's public nkey (`publisher keygen`) whose rollout controls
    /// (`publisher rollout pause|resume|abort|promote`) this relay accepts; repeat for
    /// several. With none, controls need not be signed.
    #[arg(long = "trusted-key", env = "CONFCAST_TRUSTED_KEYS", value_delimiter = ',', value_name = "KEY")]
    trusted_keys: Vec<String>,
    /// The datacenters named in `datacenter.json`'s `rollout.after` each keep their
    /// streams in a JetStream domain named after the datacenter (the leaf-node topology).
    #[arg(long, env = "CONFCAST_ROLLOUT_DOMAINS")]
    rollout_domains: bool,
    /// Address (`127.0.0.1:9101`) to serve `GET /metrics` (Prometheus/OpenMetrics text:
    /// commit events, fetch time and bytes, updates and error events published, lease,
    /// last sync) and `GET /healthz` (200 once ready) on.
    #[arg(long, env = "CONFCAST_LISTEN", value_name = "ADDR")]
    listen: Option<std::net::SocketAddr>,
    /// Private key for an `ssh://` master.
    #[arg(long, env = "CONFCAST_GIT_SSH_KEY", value_name = "FILE")]
    git_ssh_key: Option<PathBuf>,
    /// File holding a token for an `http(s)://` master, sent as a bearer token (or, with
    /// --git-http-user, as the password of basic authentication).
    #[arg(long, env = "CONFCAST_GIT_TOKEN_FILE", value_name = "FILE")]
    git_token_file: Option<PathBuf>,
    /// User name for basic authentication to an `http(s)://` master (needs --git-token-file).
    #[arg(long, env = "CONFCAST_GIT_HTTP_USER", value_name = "NAME", requires = "git_token_file")]
    git_http_user: Option<String>,
    #[command(flatten)]
    nats_auth: confcast_schemas::connect::NatsAuth,
    #[command(flatten)]
    log: process::LogArgs,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli: Cli = process::parse_args("relay");
    let format = cli.log.log_format;
    process::init_logging(format, "info");
    let master = match std::path::Path::new(&cli.master).canonicalize() {
        Ok(abs) if !cli.master.contains("://") => abs.display().to_string(),
        _ => cli.master.clone(),
    };
    let consul = match consul_client(cli.consul.as_deref(), cli.consul_token_file.as_deref()) {
        Ok(consul) => consul,
        Err(e) => return process::cannot_start("relay", format, &e),
    };
    let token = match cli.git_token_file.as_deref().map(confcast_relay::mirror::GitCredentials::read_token) {
        None => None,
        Some(Ok(token)) => Some(token),
        Some(Err(e)) => return process::cannot_start("relay", format, &e),
    };
    if let Err(e) = confcast_relay::mirror::check_master(&master) {
        return process::cannot_start("relay", format, &e);
    }
    let controls = match confcast_schemas::sign::Verifier::new(&cli.trusted_keys) {
        Ok(verifier) => confcast_relay::config::Controls(std::sync::Arc::new(verifier)),
        Err(e) => return process::cannot_start("relay", format, &e),
    };
    let git = confcast_relay::mirror::GitCredentials { ssh_key: cli.git_ssh_key, token, http_user: cli.git_http_user };
    let metrics = std::sync::Arc::new(confcast_relay::Metrics::default());
    let config = confcast_relay::Config {
        git,
        nats_url: cli.nats,
        dc: cli.dc,
        master_url: master,
        state_dir: cli.state_dir,
        fetch_timeout: std::time::Duration::from_secs(cli.fetch_timeout_secs),
        lease_ttl: std::time::Duration::from_secs(cli.lease_ttl_secs.max(1)),
        consul,
        streams: confcast_relay::StreamLayout { commits_domain: cli.commits_domain, replicas: cli.replicas },
        nats_auth: cli.nats_auth,
        signing_key: cli.signing_key,
        controls,
        peers: confcast_relay::Peers { domains: cli.rollout_domains },
        listen: cli.listen,
        metrics: metrics.clone(),
    };
    let shutdown = CancellationToken::new();
    tokio::spawn(confcast_schemas::process::shutdown_on_signals(shutdown.clone()));
    // Under systemd's `Type=notify`, the unit is started once the relay has synced with
    // the master (or stands by for another relay of its datacenter).
    tokio::spawn(async move {
        metrics.wait_ready().await;
        confcast_schemas::process::sd_notify("READY=1\nSTATUS=synced with the master");
    });
    match confcast_relay::run(config, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is_configuration() => process::cannot_start("relay", format, &e),
        Err(e) => {
            tracing::error!(error = %process::error_chain(&e), "relay failed");
            process::exit(EXIT_FAILED)
        }
    }
}

/// The Consul client of `--consul` and `--consul-token-file`.
fn consul_client(
    url: Option<&str>,
    token_file: Option<&std::path::Path>,
) -> Result<Option<confcast_relay::consul::Client>, confcast_relay::consul::ConsulError> {
    let Some(url) = url else { return Ok(None) };
    let token = token_file.map(confcast_relay::consul::Token::from_file).transpose()?;
    confcast_relay::consul::Client::new(url, token).map(Some)
}
