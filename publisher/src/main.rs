//! `publisher`: installs the hooks of a master repository, drains its spool, and
//! re-announces its refs.
//!
//! Exit status, as every confcast command (`confcast_schemas::process`): 0 done (for
//! `status`, the rollout is complete); 1 the answer is no or the work failed part-way (a
//! rollout not complete, events or refs left unpublished); 2 nothing was done: a usage
//! or configuration error, or NATS unreachable.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::Subcommand;
use confcast_publisher::{
    auth_from_config, backfill, config_keys, connect, default_spool_dir, drain, ensure_commit_stream, install,
    publish_event, status, NatsAuth, Spool,
};
use confcast_schemas::process::{self, LogFormat, EXIT_FAILED, EXIT_OK, EXIT_UNABLE};

mod progress;

/// Publishes the master repository's ref updates as commit events on NATS JetStream.
#[derive(Debug, clap::Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    log: process::LogArgs,
}

/// How long `publisher status` follows a rollout unless told otherwise, in seconds.
const STATUS_TIMEOUT_SECS: u64 = 60;

#[derive(Debug, Subcommand)]
enum Command {
    /// Install the post-receive and pre-receive hooks into a bare repository and record
    /// the settings (`confcast.nats`, `confcast.repo`) in its git config.
    InstallHooks {
        /// The bare master repository.
        repo: PathBuf,
        /// NATS URL the hooks publish to.
        #[arg(long, env = "CONFCAST_NATS", default_value = "nats://127.0.0.1:4222")]
        nats: String,
        /// Name of the repository in commit events (default: its directory name).
        #[arg(long, env = "CONFCAST_REPO_NAME")]
        repo_name: Option<String>,
        /// Directory holding the `post-receive` and `pre-receive` binaries (default:
        /// the directory of this binary).
        #[arg(long, env = "CONFCAST_BIN_DIR")]
        bin_dir: Option<PathBuf>,
        /// Replace existing hooks that confcast did not install.
        #[arg(long, env = "CONFCAST_FORCE")]
        force: bool,
        /// Replicas of the commit stream when the hooks create it (3 on the master's
        /// NATS cluster); recorded as `confcast.replicas`.
        #[arg(long, env = "CONFCAST_REPLICAS", default_value_t = 1)]
        replicas: usize,
        /// Seconds the post-receive hook waits for the rollout of each push and prints
        /// its convergence per datacenter into the `git push` output; recorded as
        /// `confcast.waitRollout` (0 removes it; without the flag it is left as it is).
        #[arg(
            long = "wait-rollout-secs",
            alias = "wait-rollout",
            env = "CONFCAST_WAIT_ROLLOUT_SECS",
            value_name = "SECS"
        )]
        wait_rollout_secs: Option<u64>,
        /// The hooks' NATS credentials: the paths are recorded in the repository's git
        /// config (`confcast.natsCreds`, ...), the secrets stay in their files.
        #[command(flatten)]
        nats_auth: NatsAuth,
    },
    /// Show how far a change has reached the hosts: per datacenter, how many hosts of
    /// the services it concerns are at its commit with a good status, and which failed
    /// or are pending. Follows the rollout live until it is complete or the timeout
    /// passes; a ref nobody follows, or a commit no datacenter has or is on its way to,
    /// is told at once. Exit status: 0 complete, 1 not complete at the timeout or
    /// concerning nobody, 2 on usage errors, an unknown datacenter or NATS unreachable.
    Status {
        /// A commit id (7 to 40 hex digits: every service whose relay published a commit
        /// starting with it, or that follows a ref last pushed to it), or a ref
        /// (`services/web/master`, `refs/heads/...`, `refs/tags/...`: every service
        /// following it, at the commit its relay published).
        target: String,
        /// NATS URL of the datacenters' servers.
        #[arg(long, env = "CONFCAST_NATS", default_value = "nats://127.0.0.1:4222")]
        nats: String,
        /// Datacenter to look at (repeatable, or comma-separated in CONFCAST_STATUS_DC;
        /// default: every datacenter a relay published for).
        #[arg(long = "dc", env = "CONFCAST_STATUS_DC", value_delimiter = ',')]
        dcs: Vec<String>,
        /// How long to follow the rollout, in seconds [default: 60].
        #[arg(long = "timeout-secs", alias = "timeout", env = "CONFCAST_TIMEOUT_SECS", value_name = "SECS")]
        timeout_secs: Option<u64>,
        /// Each datacenter's streams are in a JetStream domain named after it (the
        /// leaf-node topology, deploy/README.md): read them there, through --nats (the
        /// master's NATS). Needs --dc.
        #[arg(long, env = "CONFCAST_DOMAINS", requires = "dcs")]
        domains: bool,
        /// NATS credentials.
        #[command(flatten)]
        nats_auth: NatsAuth,
    },
    /// Publish the events spooled while NATS was unreachable, oldest first.
    Drain {
        /// The bare master repository.
        repo: PathBuf,
        /// NATS URL (default: `confcast.nats` of the repository).
        #[arg(long, env = "CONFCAST_NATS")]
        nats: Option<String>,
        /// How long to wait for NATS, in seconds.
        #[arg(long, env = "CONFCAST_TIMEOUT_SECS", default_value_t = 10)]
        timeout_secs: u64,
        /// NATS credentials (default: the hooks', from the repository's git config).
        #[command(flatten)]
        nats_auth: NatsAuth,
    },
    /// Create a relay signing key: writes a new nkey seed to FILE (readable only by its
    /// owner; never overwrites) and prints the public key hosts are given with
    /// `subscriber --trusted-key`.
    Keygen {
        /// Where to write the seed.
        file: PathBuf,
    },
    /// Re-announce every current ref head (after the commit stream was lost).
    Backfill {
        /// The bare master repository.
        repo: PathBuf,
        /// NATS URL (default: `confcast.nats` of the repository).
        #[arg(long, env = "CONFCAST_NATS")]
        nats: Option<String>,
        /// How long to wait for NATS, in seconds.
        #[arg(long, env = "CONFCAST_TIMEOUT_SECS", default_value_t = 10)]
        timeout_secs: u64,
        /// NATS credentials (default: the hooks', from the repository's git config).
        #[command(flatten)]
        nats_auth: NatsAuth,
    },
}

fn nats_url(repo: &std::path::Path, flag: Option<String>) -> String {
    flag.or_else(|| install::config_value(repo, config_keys::NATS))
        .unwrap_or_else(|| "nats://127.0.0.1:4222".to_owned())
}

/// The credentials given on the command line, else the hooks' own.
fn auth_of(repo: &std::path::Path, flags: NatsAuth) -> NatsAuth {
    if flags.is_empty() {
        auth_from_config(|key| install::config_value(repo, key))
    } else {
        flags
    }
}

fn spool_of(repo: &std::path::Path) -> anyhow::Result<Spool> {
    let dir = match install::config_value(repo, config_keys::SPOOL_DIR) {
        Some(dir) => PathBuf::from(dir),
        None => default_spool_dir(&install::git_dir(repo)?),
    };
    Ok(Spool::new(dir))
}

/// Copies of the commit stream when it is created (`confcast.replicas`, default 1).
fn replicas_of(repo: &std::path::Path) -> usize {
    install::config_value(repo, config_keys::REPLICAS).and_then(|r| r.parse().ok()).unwrap_or(1)
}

async fn jetstream(
    url: &str,
    auth: &NatsAuth,
    timeout: Duration,
    replicas: usize,
) -> anyhow::Result<async_nats::jetstream::Context> {
    let js = async_nats::jetstream::new(connect(url, auth, timeout).await?);
    tokio::time::timeout(timeout, ensure_commit_stream(&js, replicas))
        .await
        .context("creating the commit stream timed out")??;
    Ok(js)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli: Cli = process::parse_args("publisher");
    let format = cli.log.log_format;
    process::init_logging(format, "warn");
    if let Command::Status { target, nats, dcs, timeout_secs, domains, nats_auth } = cli.command {
        let timeout = match timeout_secs.map(Ok).or_else(|| renamed_secs("CONFCAST_TIMEOUT", "CONFCAST_TIMEOUT_SECS")) {
            None => STATUS_TIMEOUT_SECS,
            Some(Ok(secs)) => secs,
            Some(Err(e)) => return fail(format, Failure::Unable(e)),
        };
        return status(&target, &nats, dcs, domains, Duration::from_secs(timeout), &nats_auth, format).await;
    }
    match run(cli.command).await {
        Ok(()) => process::exit(EXIT_OK),
        Err(failure) => fail(format, failure),
    }
}

/// Why a command did not do all it was asked.
#[derive(Debug)]
enum Failure {
    /// Nothing was done: a usage or configuration error, or NATS unreachable (exit 2).
    Unable(anyhow::Error),
    /// The work failed part-way (exit 1).
    Failed(anyhow::Error),
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Failed(e)
    }
}

/// Marks an error as one that kept the command from doing anything.
trait Unable<T> {
    fn unable(self) -> Result<T, Failure>;
}

impl<T, E: Into<anyhow::Error>> Unable<T> for Result<T, E> {
    fn unable(self) -> Result<T, Failure> {
        self.map_err(|e| Failure::Unable(e.into()))
    }
}

/// Says why in one line (`publisher: ...`, or one JSON event) and returns the exit code.
fn fail(format: LogFormat, failure: Failure) -> ExitCode {
    let (code, error) = match failure {
        Failure::Unable(e) => (EXIT_UNABLE, e),
        Failure::Failed(e) => (EXIT_FAILED, e),
    };
    match format {
        LogFormat::Text => eprintln!("publisher: {error:#}"),
        LogFormat::Json => tracing::error!(error = format!("{error:#}"), "publisher failed"),
    }
    process::exit(code)
}

/// Seconds from an environment variable that was renamed (see
/// `confcast_schemas::process::renamed_env`).
fn renamed_secs(old: &str, new: &str) -> Option<anyhow::Result<u64>> {
    let value = process::renamed_env(old, new)?;
    Some(value.trim().parse().with_context(|| format!("{old}={value:?}: not a number of seconds")))
}

/// `publisher status`: 0 complete, 1 not complete in time or concerning nobody, 2 when
/// the bus cannot be read or a datacenter asked for is unknown.
async fn status(
    target: &str,
    url: &str,
    dcs: Vec<String>,
    domains: bool,
    timeout: Duration,
    auth: &NatsAuth,
    format: LogFormat,
) -> ExitCode {
    let deadline = tokio::time::Instant::now() + timeout;
    let target = status::Target::parse(target);
    let label = target.to_string();
    let tty = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let mut screen = progress::Screen::new(tty);
    let rollout = async {
        let client = connect(url, auth, timeout.min(Duration::from_secs(10))).await?;
        let js = async_nats::jetstream::new(client.clone());
        let dcs = if dcs.is_empty() { status::datacenters(&js).await? } else { dcs };
        if dcs.is_empty() {
            anyhow::bail!(
                "no datacenter on {}: no relay has published there",
                confcast_schemas::connect::redact_url(url)
            );
        }
        // What the refs were last pushed to tells a commit on its way from one that
        // concerns nobody; only a commit needs it.
        let pushed = match &target {
            status::Target::Commit(_) => status::pushed(&js, timeout.min(Duration::from_secs(10))).await,
            _ => status::Pushed::default(),
        };
        let contexts: Vec<(String, async_nats::jetstream::Context)> = dcs
            .into_iter()
            .map(|dc| {
                let js = if domains { async_nats::jetstream::with_domain(client.clone(), &dc) } else { js.clone() };
                (dc, js)
            })
            .collect();
        let rollout = status::watch_pushed(&contexts, std::slice::from_ref(&target), &pushed, deadline, |r| {
            screen.show(r, &label)
        })
        .await?;
        Ok((rollout, pushed))
    }
    .await;
    screen.finish();
    let (rollout, pushed) = match rollout {
        Ok(rollout) => rollout,
        Err(e) => return fail(format, Failure::Unable(e)),
    };
    let (failed, pending) = rollout.counts();
    match rollout.verdict() {
        status::Verdict::Complete => {
            println!("rollout of {label} complete");
            process::exit(EXIT_OK)
        }
        status::Verdict::NothingAffected => {
            match &target {
                status::Target::Commit(prefix) if pushed.known => {
                    let refs: Vec<&str> = pushed.refs_at(prefix).map(|(r, _)| r).collect();
                    if refs.is_empty() {
                        println!(
                            "commit {label} is unknown: no datacenter has published it, and no ref was last pushed to it"
                        );
                    } else {
                        println!("no datacenter follows {}, where {label} was pushed", refs.join(", "));
                    }
                }
                _ => println!("no datacenter follows {label}"),
            }
            process::exit(EXIT_FAILED)
        }
        status::Verdict::InProgress => {
            println!(
                "rollout of {label} not complete after {}s: {failed} host(s) failed, {pending} pending",
                timeout.as_secs()
            );
            process::exit(EXIT_FAILED)
        }
    }
}

async fn run(command: Command) -> Result<(), Failure> {
    match command {
        Command::Status { .. } => unreachable!("handled in main"),
        Command::InstallHooks { repo, nats, repo_name, bin_dir, force, replicas, wait_rollout_secs, nats_auth } => {
            if nats_auth.user.is_some() && nats_auth.password_file.is_none() {
                return Err(Failure::Unable(anyhow::anyhow!(
                    "the hooks cannot read CONFCAST_NATS_PASSWORD: give --nats-password-file"
                )));
            }
            let wait_rollout_secs = match wait_rollout_secs {
                Some(secs) => Some(secs),
                None => renamed_secs("CONFCAST_WAIT_ROLLOUT", "CONFCAST_WAIT_ROLLOUT_SECS").transpose().unable()?,
            };
            // The hooks run in the master's directory: record absolute paths.
            let nats_auth = absolute_paths(nats_auth).unable()?;
            let bin_dir = match bin_dir {
                Some(dir) => dir,
                None => std::env::current_exe()
                    .context("locating this binary")
                    .and_then(|exe| exe.parent().map(ToOwned::to_owned).context("binary has no directory"))
                    .unable()?,
            };
            let written = install::install_hooks(&install::InstallOptions {
                repo,
                nats_url: nats,
                repo_name,
                bin_dir,
                force,
                replicas,
                nats_auth,
                wait_rollout_secs,
            })
            .unable()?;
            for hook in written {
                println!("installed {}", hook.display());
            }
        }
        Command::Drain { repo, nats, timeout_secs, nats_auth } => {
            let url = nats_url(&repo, nats);
            let spool = spool_of(&repo).unable()?;
            let replicas = replicas_of(&repo);
            let js = jetstream(&url, &auth_of(&repo, nats_auth), Duration::from_secs(timeout_secs), replicas)
                .await
                .unable()?;
            let drained = drain(&js, &spool, replicas).await.context("draining the spool")?;
            println!(
                "published {} spooled event(s) ({} already stored), {} left, {} quarantined",
                drained.published,
                drained.duplicates,
                spool.pending().context("reading the spool")?.len(),
                drained.quarantined
            );
        }
        Command::Keygen { file } => {
            use std::io::Write as _;
            use std::os::unix::fs::OpenOptionsExt as _;
            let signer = confcast_schemas::sign::Signer::generate();
            let seed = signer.seed().context("encoding the seed")?;
            let mut out = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&file)
                .with_context(|| format!("{}", file.display()))
                .unable()?;
            out.write_all(format!("{seed}\n").as_bytes())
                .and_then(|()| out.sync_all())
                .with_context(|| format!("{}", file.display()))?;
            println!("{}", signer.public_key());
        }
        Command::Backfill { repo, nats, timeout_secs, nats_auth } => {
            let url = nats_url(&repo, nats);
            let events = backfill::current_refs(&repo).unable()?;
            let replicas = replicas_of(&repo);
            let js = jetstream(&url, &auth_of(&repo, nats_auth), Duration::from_secs(timeout_secs), replicas)
                .await
                .unable()?;
            let mut failed = 0;
            for event in &events {
                if let Err(e) = publish_event(&js, event, replicas).await {
                    eprintln!("publisher: {}: {e}", event.ref_name);
                    failed += 1;
                }
            }
            println!("announced {} ref(s)", events.len() - failed);
            if failed > 0 {
                return Err(Failure::Failed(anyhow::anyhow!("{failed} ref(s) could not be announced")));
            }
        }
    }
    Ok(())
}

/// `auth` with every file made absolute (and checked to exist).
fn absolute_paths(mut auth: NatsAuth) -> anyhow::Result<NatsAuth> {
    for (flag, path) in [
        ("--nats-creds", &mut auth.creds),
        ("--nats-nkey", &mut auth.nkey),
        ("--nats-password-file", &mut auth.password_file),
        ("--nats-token-file", &mut auth.token_file),
        ("--nats-tls-ca", &mut auth.tls_ca),
        ("--nats-tls-cert", &mut auth.tls_cert),
        ("--nats-tls-key", &mut auth.tls_key),
    ] {
        if let Some(p) = path {
            *p = p.canonicalize().with_context(|| format!("{flag} {}", p.display()))?;
        }
    }
    Ok(auth)
}
