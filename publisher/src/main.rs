//! `publisher`: installs the hooks of a master repository, drains its spool, and
//! re-announces its refs.
//!
//! Exit status, as every confcast command (`confcast_schemas::process`): 0 done (for
//! `status`, the rollout is complete); 1 the answer is no or the work failed part-way (a
//! rollout not complete, events or refs left unpublished); 2 nothing was done: a usage
//! or configuration error, or NATS unreachable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::Subcommand;
use confcast_publisher::control::{self, ControlRequest};
use confcast_publisher::dashboard::{self, DashboardRequest};
use confcast_publisher::keygen::{keygen, KeygenError};
use confcast_publisher::rollout::{Target, Verdict};
use confcast_publisher::screen::{self, Screen};
use confcast_publisher::status::{self, StatusRequest};
use confcast_publisher::{backfill, bus, drain, install, publish_event, NatsAuth, Settings, Spool};
use confcast_schemas::process::{self, LogFormat, EXIT_FAILED, EXIT_OK, EXIT_UNABLE};
use confcast_schemas::rollout::Action;

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
/// How long `publisher rollout` waits for each relay's answer unless told otherwise,
/// in seconds.
const CONTROL_TIMEOUT_SECS: u64 = 10;

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
    /// or are pending. A commit rolled out in waves shows its phase, the current wave
    /// and its hosts, the bake left, and hosts whose wave is not released as held.
    /// Follows the rollout live until it is complete or the timeout passes; a ref
    /// nobody follows, a commit no datacenter has or is on its way to, or a halted
    /// rollout (with every unhealthy host and why) is told at once. Exit status: 0
    /// complete, 1 not complete at the timeout, halted, or concerning nobody, 2 on usage
    /// errors, an unknown datacenter or NATS unreachable.
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
    /// Pause, resume, abort or promote the rollout in waves of a ref or commit: asks
    /// the relay of each datacenter and prints its answer (what changed, or why not).
    /// Exit status: 0 every datacenter addressed did it, 1 one refused or did not
    /// answer, 2 on usage errors, an unreadable signing key or NATS unreachable.
    Rollout {
        /// pause (no further wave starts), resume (a paused rollout goes on, a halted
        /// one starts again from its first wave), abort (halt: hosts that took the
        /// commit go back), promote (every host takes the commit now).
        action: Action,
        /// The rollout's ref (`services/web/master`, `refs/heads/...`) or commit (7 to
        /// 40 hex digits).
        target: String,
        /// NATS URL of the datacenters' servers.
        #[arg(long, env = "CONFCAST_NATS", default_value = "nats://127.0.0.1:4222")]
        nats: String,
        /// Datacenter to ask (repeatable, or comma-separated in CONFCAST_ROLLOUT_DC;
        /// default: every datacenter with a rollout of the target).
        #[arg(long = "dc", env = "CONFCAST_ROLLOUT_DC", value_delimiter = ',')]
        dcs: Vec<String>,
        /// The operator's nkey seed (`publisher keygen`), to sign the request: relays
        /// given trusted keys refuse unsigned controls.
        #[arg(long, env = "CONFCAST_SIGNING_KEY", value_name = "FILE")]
        signing_key: Option<PathBuf>,
        /// How long each relay has to answer, in seconds [default: 10].
        #[arg(long = "timeout-secs", env = "CONFCAST_TIMEOUT_SECS", value_name = "SECS")]
        timeout_secs: Option<u64>,
        /// The leaf-node topology, as for `publisher status`: controls are plain NATS
        /// requests, which the leaf nodes route to each datacenter's relay, so only the
        /// datacenters given with --dc are asked. Needs --dc.
        #[arg(long, env = "CONFCAST_DOMAINS", requires = "dcs")]
        domains: bool,
        /// NATS credentials.
        #[command(flatten)]
        nats_auth: NatsAuth,
    },
    /// Serve a live web page of the fleet: per datacenter, every service with its
    /// commit, subject, author and push time, how many hosts are at it, pending, failed
    /// or reverted, its rollout in waves with a timeline, and the relays' errors; a page
    /// per service with each host. Updates as hosts report, without reloading; JSON
    /// under /api/v1. Runs until SIGINT or SIGTERM and outlives NATS restarts. Exit
    /// status: 0 stopped by a signal, 2 on usage errors, an address it cannot listen on,
    /// an unreadable signing key or NATS unreachable at start.
    Dashboard {
        /// Address to serve on, e.g. 127.0.0.1:8080 (anyone who reaches it sees the
        /// fleet: keep it local or behind an authenticating proxy).
        #[arg(long, env = "CONFCAST_DASHBOARD_LISTEN", value_name = "ADDR")]
        listen: SocketAddr,
        /// NATS URL of the datacenters' servers.
        #[arg(long, env = "CONFCAST_NATS", default_value = "nats://127.0.0.1:4222")]
        nats: String,
        /// Datacenter to show (repeatable, or comma-separated in CONFCAST_DASHBOARD_DC;
        /// default: every datacenter a relay published for, looked for every 10 s).
        #[arg(long = "dc", env = "CONFCAST_DASHBOARD_DC", value_delimiter = ',')]
        dcs: Vec<String>,
        /// The leaf-node topology, as for `publisher status`. Needs --dc.
        #[arg(long, env = "CONFCAST_DOMAINS", requires = "dcs")]
        domains: bool,
        /// Let the service page pause, resume, abort and promote rollouts in waves.
        #[arg(long, env = "CONFCAST_DASHBOARD_ALLOW_CONTROL")]
        allow_control: bool,
        /// The operator's nkey seed (`publisher keygen`), to sign the page's controls
        /// (read only with --allow-control).
        #[arg(long, env = "CONFCAST_SIGNING_KEY", value_name = "FILE")]
        signing_key: Option<PathBuf>,
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
    /// Create a signing key: writes a new nkey seed to FILE (readable only by its owner;
    /// never overwrites) and prints the public key: for a relay's key, the one hosts are
    /// given with `subscriber --trusted-key`; for an operator's key (`publisher rollout
    /// --signing-key`), the one relays are given to trust controls.
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
        let request = StatusRequest {
            target: Target::parse(&target),
            nats_url: nats,
            auth: nats_auth,
            dcs,
            domains,
            timeout: Duration::from_secs(timeout),
        };
        return status(&request, format).await;
    }
    if let Command::Rollout { action, target, nats, dcs, signing_key, timeout_secs, domains: _, nats_auth } =
        cli.command
    {
        let signer = match signing_key.as_deref().map(control::signer).transpose() {
            Ok(signer) => signer,
            Err(e) => return fail(format, Failure::Unable(e.into())),
        };
        let request = ControlRequest {
            action,
            target,
            nats_url: nats,
            auth: nats_auth,
            dcs,
            timeout: Duration::from_secs(timeout_secs.unwrap_or(CONTROL_TIMEOUT_SECS)),
            signer,
        };
        return rollout_control(&request, format).await;
    }
    if let Command::Dashboard { listen, nats, dcs, domains, allow_control, signing_key, nats_auth } = cli.command {
        let request =
            DashboardRequest { listen, nats_url: nats, auth: nats_auth, dcs, domains, allow_control, signing_key };
        return match dashboard::serve(request).await {
            Ok(()) => process::exit(EXIT_OK),
            Err(e) => fail(format, Failure::Unable(e.into())),
        };
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
async fn status(request: &StatusRequest, format: LogFormat) -> ExitCode {
    let label = request.target.to_string();
    let mut screen = Screen::new(std::io::IsTerminal::is_terminal(&std::io::stdout()));
    let followed = status::follow(request, |rollout| screen.show(rollout, &label)).await;
    screen.finish();
    let followed = match followed {
        Ok(followed) => followed,
        Err(e) => return fail(format, Failure::Unable(e.into())),
    };
    println!("{}", screen::conclusion(&request.target, &followed, request.timeout));
    process::exit(match followed.rollout.verdict() {
        Verdict::Complete => EXIT_OK,
        Verdict::NothingAffected | Verdict::InProgress => EXIT_FAILED,
    })
}

/// `publisher rollout`: prints each datacenter's answer; 0 when every datacenter
/// addressed did what was asked, 1 when one refused or did not answer, 2 when nothing
/// could be sent.
async fn rollout_control(request: &ControlRequest, format: LogFormat) -> ExitCode {
    let answers = match control::send(request).await {
        Ok(answers) => answers,
        Err(e) => return fail(format, Failure::Unable(e.into())),
    };
    for line in answers.lines(request.action, &request.target, request.timeout) {
        println!("{line}");
    }
    if answers.succeeded() {
        return process::exit(EXIT_OK);
    }
    let failure = anyhow::anyhow!(
        "{} of the rollout of {} not done in every datacenter",
        request.action.as_str(),
        request.target
    );
    fail(format, Failure::Failed(failure))
}

async fn run(command: Command) -> Result<(), Failure> {
    match command {
        Command::Status { .. } | Command::Rollout { .. } | Command::Dashboard { .. } => {
            unreachable!("handled in main")
        }
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
            let bin_dir = match bin_dir {
                Some(dir) => dir,
                None => std::env::current_exe()
                    .context("locating this binary")
                    .and_then(|exe| exe.parent().map(ToOwned::to_owned).context("binary has no directory"))
                    .unable()?,
            };
            let options = install::InstallOptions {
                repo,
                nats_url: nats,
                repo_name,
                bin_dir,
                force,
                replicas,
                nats_auth: install::absolute_paths(nats_auth).unable()?,
                wait_rollout_secs,
            };
            for hook in install::install_hooks(&options).unable()? {
                println!("installed {}", hook.display());
            }
        }
        Command::Drain { repo, nats, timeout_secs, nats_auth } => {
            let settings = Settings::read(&repo).unable()?;
            let spool = Spool::new(&settings.spool_dir);
            let bus = settings.bus_with(nats, nats_auth);
            let js = bus::open(&bus, Duration::from_secs(timeout_secs)).await.unable()?;
            let drained = drain(&js, &spool, bus.replicas).await.context("draining the spool")?;
            println!(
                "published {} spooled event(s) ({} already stored), {} left, {} quarantined",
                drained.published,
                drained.duplicates,
                spool.pending().context("reading the spool")?.len(),
                drained.quarantined
            );
        }
        Command::Keygen { file } => match keygen(&file) {
            Ok(public_key) => println!("{public_key}"),
            Err(e @ KeygenError::Create { .. }) => return Err(Failure::Unable(e.into())),
            Err(e) => return Err(Failure::Failed(e.into())),
        },
        Command::Backfill { repo, nats, timeout_secs, nats_auth } => {
            let settings = Settings::read(&repo).unable()?;
            let events = backfill::current_refs(&repo, &settings.repo_name).unable()?;
            let bus = settings.bus_with(nats, nats_auth);
            let js = bus::open(&bus, Duration::from_secs(timeout_secs)).await.unable()?;
            let mut failed = 0;
            for event in &events {
                if let Err(e) = publish_event(&js, event, bus.replicas).await {
                    eprintln!("publisher: {}: {}", event.ref_name, process::error_chain(&e));
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
