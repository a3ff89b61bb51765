//! `subscriber`: one per host. See the crate docs of `confcast_subscriber`.
//!
//! Exit status, as every confcast command (`confcast_schemas::process`): 2 for a usage
//! or configuration error found at start, said in one line; 1 when it stopped on an
//! error while running, and from `verify` when a tree was altered; 0 otherwise.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Subcommand;
use confcast_schemas::process::{self, LogFormat, EXIT_FAILED, EXIT_OK, EXIT_UNABLE};
use confcast_schemas::{Kind, ServiceId};
use confcast_subscriber::checks::Checks;
use confcast_subscriber::exec::{parse_signal, Notify};
use confcast_subscriber::{Config, Selection, SubscriberError};
use tokio_util::sync::CancellationToken;

/// Applies this host's configuration from the datacenter's stream and tells its processes.
#[derive(Debug, clap::Parser)]
#[command(version, about, subcommand_negates_reqs = true, args_conflicts_with_subcommands = true)]
#[command(group(clap::ArgGroup::new("what").required(true).multiple(true).args(["service", "application", "device", "host"])))]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// NATS URL of the datacenter's server.
    #[arg(long, env = "CONFCAST_NATS", default_value = "nats://127.0.0.1:4222")]
    nats: String,
    /// Datacenter id.
    #[arg(long, env = "CONFCAST_DC", required = true)]
    dc: Option<String>,
    /// A service to follow (repeatable; the environment variable takes a comma-separated list).
    #[arg(long, env = "CONFCAST_SERVICE", value_delimiter = ',')]
    service: Vec<String>,
    /// An application to follow (repeatable).
    #[arg(long, env = "CONFCAST_APPLICATION", value_delimiter = ',')]
    application: Vec<String>,
    /// A device to follow (repeatable).
    #[arg(long, env = "CONFCAST_DEVICE", value_delimiter = ',')]
    device: Vec<String>,
    /// Follow whatever the datacenter's inventory lists for this host id.
    #[arg(long, env = "CONFCAST_HOST", conflicts_with_all = ["service", "application", "device"])]
    host: Option<String>,
    /// Directory where `<dir>/<service>` appears (a symlink to the current tree).
    #[arg(long, env = "CONFCAST_DIR", required = true)]
    dir: Option<PathBuf>,
    /// Directory for trees and the host's position (default: `<dir>/.confcast`).
    #[arg(long, env = "CONFCAST_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Command run with `sh -c` after each applied change, with CONFCAST_SERVICE,
    /// CONFCAST_COMMIT, CONFCAST_REF, CONFCAST_DIR and CONFCAST_KIND set.
    #[arg(long, env = "CONFCAST_EXEC")]
    exec: Option<String>,
    /// How long `--exec` may run before it is killed, in seconds.
    #[arg(long, env = "CONFCAST_EXEC_TIMEOUT_SECS", default_value_t = 60)]
    exec_timeout_secs: u64,
    /// Command run with `sh -c` before each change goes live, with CONFCAST_DIR set to
    /// the new tree (verified, not yet live) and the other variables as for --exec. If it
    /// exits non-zero, or is still running after --health-timeout-secs (it is killed),
    /// the change is not applied: the service keeps its current tree, --exec does not
    /// run, and the host reports the service unhealthy with the command's first lines.
    #[arg(long, env = "CONFCAST_CHECK_CMD", value_name = "CMD")]
    check_cmd: Option<String>,
    /// Command run with `sh -c` after --exec/--signal for each change, with the same
    /// variables. If it exits non-zero, or is still running after --health-timeout-secs
    /// (it is killed), the host reports the service unhealthy with the command's first
    /// lines; a failing --exec is unhealthy too.
    #[arg(long, env = "CONFCAST_HEALTH_CMD", value_name = "CMD")]
    health_cmd: Option<String>,
    /// How long --check-cmd and --health-cmd may run before they are killed, in seconds.
    #[arg(long, env = "CONFCAST_HEALTH_TIMEOUT_SECS", value_name = "SECS", default_value_t = 30)]
    health_timeout_secs: u64,
    /// Signal (e.g. HUP) sent after each applied change to the process in `--pidfile`.
    #[arg(long, env = "CONFCAST_SIGNAL", requires = "pidfile")]
    signal: Option<String>,
    /// File holding the pid that `--signal` goes to.
    #[arg(long, env = "CONFCAST_PIDFILE", requires = "signal")]
    pidfile: Option<PathBuf>,
    /// Host id in status reports and in the `--max-parallel` slots. Default: the `--host`
    /// ID; else `<system host name>:<absolute --state-dir>` (`web-1:/etc/app/.confcast`),
    /// which tells apart several subscribers of one machine and stays the same across
    /// restarts. Set it when NATS permissions name the host (`status.<id>.>`).
    #[arg(long, env = "CONFCAST_HOST_ID")]
    host_id: Option<String>,
    /// Serve the host's configuration as JSON on this address (e.g. 127.0.0.1:7070) or
    /// unix socket path: /healthz, /v1/services, /v1/services/<name>,
    /// /v1/services/<name>/files/<path>.
    #[arg(long, env = "CONFCAST_LISTEN")]
    listen: Option<confcast_subscriber::api::Listen>,
    /// Allow `--listen` on a TCP address other hosts can reach (the API has no
    /// authentication and serves every file, secrets included).
    #[arg(long, env = "CONFCAST_LISTEN_REMOTE")]
    listen_remote: bool,
    /// Mode of the `--listen` unix socket, in octal (e.g. 0660); default: the umask's.
    #[arg(long, env = "CONFCAST_LISTEN_MODE", value_name = "MODE")]
    listen_mode: Option<String>,
    /// Group of the `--listen` unix socket (name or id).
    #[arg(long, env = "CONFCAST_LISTEN_GROUP", value_name = "GROUP")]
    listen_group: Option<String>,
    #[command(flatten)]
    perms: PermsArgs,
    /// Re-hash the applied trees this often, in seconds, and restore any that was
    /// altered on the host (0: only at start).
    #[arg(long, env = "CONFCAST_VERIFY_INTERVAL_SECS", default_value_t = 300)]
    verify_interval_secs: u64,
    /// Wait a random time up to this many seconds before `--exec`/`--signal` (fractions
    /// allowed), so that a datacenter's hosts do not all restart at once [default: 0].
    #[arg(long = "splay-secs", alias = "splay", env = "CONFCAST_SPLAY_SECS", value_name = "SECS")]
    splay_secs: Option<f64>,
    /// At most this many hosts of the datacenter run their `--exec`/`--signal` for the
    /// same change at once, coordinated through NATS (0: no limit).
    #[arg(long, env = "CONFCAST_MAX_PARALLEL", value_name = "N", default_value_t = 0)]
    max_parallel: usize,
    /// Public key (nkey) of a relay whose signed updates this host accepts; repeat it
    /// (or comma-separate the variable) to trust two keys during a rotation. When set,
    /// unsigned and wrongly signed updates are refused.
    #[arg(long, env = "CONFCAST_TRUSTED_KEY", value_delimiter = ',', value_name = "KEY")]
    trusted_key: Vec<String>,
    /// File of trusted public keys, one per line (`#` comments), added to --trusted-key.
    #[arg(long, env = "CONFCAST_TRUSTED_KEYS_FILE", value_name = "FILE")]
    trusted_keys_file: Option<PathBuf>,
    #[command(flatten)]
    nats_auth: confcast_schemas::connect::NatsAuth,
    #[command(flatten)]
    log: process::LogArgs,
}

/// Owner, group and modes of the applied files.
#[derive(Debug, Clone, clap::Args)]
struct PermsArgs {
    /// Owner (name or uid) of every applied file and directory; `SERVICE=USER` for one
    /// service (repeatable; the variable takes a comma-separated list).
    #[arg(long, env = "CONFCAST_OWNER", value_delimiter = ',', value_name = "[SERVICE=]USER")]
    owner: Vec<String>,
    /// Group (name or gid) of every applied file and directory; `SERVICE=GROUP` for one
    /// service (repeatable).
    #[arg(long, env = "CONFCAST_GROUP", value_delimiter = ',', value_name = "[SERVICE=]GROUP")]
    group: Vec<String>,
    /// Mode of applied files, in octal, without execute bits (e.g. 0640; files git marks
    /// executable get x where this has r: 0750); `SERVICE=MODE` for one service. Default:
    /// 0644 and 0755, as git.
    #[arg(long, env = "CONFCAST_FILE_MODE", value_delimiter = ',', value_name = "[SERVICE=]MODE")]
    file_mode: Vec<String>,
    /// Mode of applied directories, in octal (e.g. 0750); `SERVICE=MODE` for one
    /// service. Default: the umask's.
    #[arg(long, env = "CONFCAST_DIR_MODE", value_delimiter = ',', value_name = "[SERVICE=]MODE")]
    dir_mode: Vec<String>,
}

impl PermsArgs {
    fn parse(&self) -> Result<confcast_subscriber::perms::PermsConfig, String> {
        confcast_subscriber::perms::PermsConfig::parse(&self.owner, &self.group, &self.file_mode, &self.dir_mode)
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check that every applied tree on this host is exactly what was applied; exits 1
    /// if one was altered or is missing (a running subscriber restores it).
    Verify {
        /// The subscriber's `--dir`.
        #[arg(long, env = "CONFCAST_DIR")]
        dir: PathBuf,
        /// The subscriber's `--state-dir` (default: `<dir>/.confcast`).
        #[arg(long, env = "CONFCAST_STATE_DIR")]
        state_dir: Option<PathBuf>,
        #[command(flatten)]
        perms: PermsArgs,
    },
}

// One thread for the event loop: a host's agent waits on NATS almost all of the time,
// and everything that touches the disk runs on the blocking pool. A thread per core
// would only add memory (a stack and a malloc arena each) on large hosts.
#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli: Cli = process::parse_args("subscriber");
    let format = cli.log.log_format;
    process::init_logging(format, "info");
    if let Some(Command::Verify { dir, state_dir, perms }) = &cli.command {
        let state_dir = state_dir.clone().unwrap_or_else(|| dir.join(".confcast"));
        let perms = match perms.parse() {
            Ok(perms) => perms,
            Err(e) => return refuse(format, "subscriber verify", e),
        };
        return match confcast_subscriber::verify(dir, &state_dir, &perms) {
            Ok((lines, intact)) => {
                for line in lines {
                    println!("{line}");
                }
                process::exit(if intact { EXIT_OK } else { EXIT_FAILED })
            }
            Err(e) => refuse(format, "subscriber verify", e),
        };
    }
    let config = match config(cli) {
        Ok(config) => config,
        Err(problem) => return refuse(format, "subscriber", problem),
    };
    let shutdown = CancellationToken::new();
    tokio::spawn(confcast_schemas::process::shutdown_on_signals(shutdown.clone()));
    match confcast_subscriber::run(config, shutdown).await {
        Ok(()) => process::exit(EXIT_OK),
        // What is wrong with the configuration, found as the subscriber starts.
        Err(
            e @ (SubscriberError::Auth(_)
            | SubscriberError::TrustedKey(_)
            | SubscriberError::Listen(_)
            | SubscriberError::Selection(_)
            | SubscriberError::StateDir(_)),
        ) => process::cannot_start("subscriber", format, &e),
        Err(e) => {
            tracing::error!(error = %process::error_chain(&e), "subscriber failed");
            process::exit(EXIT_FAILED)
        }
    }
}

/// The subscriber's configuration from its flags, or what is wrong with them.
fn config(cli: Cli) -> Result<Config, String> {
    let (Some(dc), Some(dir)) = (cli.dc.clone(), cli.dir.clone()) else {
        return Err("--dc and --dir are required".to_owned());
    };
    let signal = match cli.signal.as_deref().map(parse_signal).transpose() {
        Ok(signal) => signal,
        Err(e) => return Err(format!("--signal: {e}")),
    };
    let selection = match &cli.host {
        Some(host) => Selection::Host(host.clone()),
        None => Selection::Services(
            [(Kind::Service, &cli.service), (Kind::Application, &cli.application), (Kind::Device, &cli.device)]
                .into_iter()
                .flat_map(|(kind, names)| names.iter().map(move |n| ServiceId::new(kind, n)))
                .collect(),
        ),
    };
    let perms = cli.perms.parse()?;
    let listen_options = confcast_subscriber::api::ListenOptions {
        remote: cli.listen_remote,
        socket_mode: match cli.listen_mode.as_deref().map(confcast_subscriber::perms::parse_mode).transpose() {
            Ok(mode) => mode,
            Err(e) => return Err(format!("--listen-mode: {e}")),
        },
        socket_group: match cli.listen_group.as_deref().map(confcast_subscriber::perms::parse_group).transpose() {
            Ok(group) => group,
            Err(e) => return Err(format!("--listen-group: {e}")),
        },
    };
    if let Some(listen) = &cli.listen {
        listen.check(cli.listen_remote).map_err(|e| e.to_string())?;
    }
    let state_dir = cli.state_dir.clone().unwrap_or_else(|| dir.join(".confcast"));
    let host_id = match (&cli.host_id, &cli.host) {
        (Some(id), _) | (None, Some(id)) => id.clone(),
        (None, None) => default_host_id(&state_dir),
    };
    let mut trusted_keys = cli.trusted_key.clone();
    if let Some(path) = &cli.trusted_keys_file {
        match std::fs::read_to_string(path) {
            Ok(text) => trusted_keys.extend(
                text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(str::to_owned),
            ),
            Err(e) => return Err(format!("--trusted-keys-file {}: {e}", path.display())),
        }
    }
    let splay_secs = match cli.splay_secs {
        Some(secs) => secs,
        None => match process::renamed_env("CONFCAST_SPLAY", "CONFCAST_SPLAY_SECS").map(|v| v.trim().parse::<f64>()) {
            None => 0.0,
            Some(Ok(secs)) => secs,
            Some(Err(e)) => return Err(format!("CONFCAST_SPLAY: {e}")),
        },
    };
    let splay = match Duration::try_from_secs_f64(splay_secs) {
        Ok(splay) => splay,
        Err(_) => return Err(format!("--splay-secs {splay_secs}: not a number of seconds")),
    };
    Ok(Config {
        nats_url: cli.nats,
        dc,
        selection,
        state_dir,
        dir,
        listen: cli.listen,
        listen_options,
        perms,
        verify_interval: (cli.verify_interval_secs > 0).then(|| Duration::from_secs(cli.verify_interval_secs)),
        notify: Notify {
            exec: cli.exec,
            signal: signal.zip(cli.pidfile),
            timeout: Duration::from_secs(cli.exec_timeout_secs),
            checks: Checks {
                check: cli.check_cmd,
                health: cli.health_cmd,
                timeout: Duration::from_secs(cli.health_timeout_secs),
            },
        },
        host_id,
        nats_auth: cli.nats_auth,
        trusted_keys,
        splay,
        max_parallel: (cli.max_parallel > 0).then_some(cli.max_parallel),
        flushes: Default::default(),
    })
}

/// Says in one line why the subscriber cannot start, and exits 2.
fn refuse(format: LogFormat, program: &str, problem: impl std::fmt::Display) -> ExitCode {
    match format {
        LogFormat::Text => eprintln!("{program}: {problem}"),
        LogFormat::Json => tracing::error!(error = %problem, "{program} cannot start"),
    }
    process::exit(EXIT_UNABLE)
}

/// The host id of a subscriber not given `--host-id` nor `--host`: the system host name
/// and the absolute state directory, unique per subscriber of a machine (one subscriber
/// per state directory) and stable across restarts.
fn default_host_id(state_dir: &Path) -> String {
    let host = nix::unistd::gethostname()
        .ok()
        .map(|h| h.to_string_lossy().into_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".to_owned());
    host_id_of(&host, state_dir)
}

fn host_id_of(host: &str, state_dir: &Path) -> String {
    let dir = std::path::absolute(state_dir).unwrap_or_else(|_| state_dir.to_owned());
    format!("{host}:{}", dir.display())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_host_id_tells_subscribers_of_one_machine_apart() {
        let a = host_id_of("web-1", Path::new("/srv/a/.confcast"));
        let b = host_id_of("web-1", Path::new("/srv/b/.confcast"));
        assert_eq!(a, "web-1:/srv/a/.confcast");
        assert_ne!(a, b);
        let relative = host_id_of("web-1", Path::new("state"));
        assert!(relative.starts_with("web-1:/") && relative.ends_with("/state"), "{relative}");
    }

    #[test]
    fn checks_are_flags_and_environment_variables() {
        let args = ["subscriber", "--dc", "dc1", "--service", "s", "--dir", "/x"];
        let cli = <Cli as clap::Parser>::try_parse_from(args).expect("parses");
        let checks = config(cli).expect("a configuration").notify.checks;
        assert_eq!((checks.check, checks.health), (None, None));
        assert_eq!(checks.timeout, Duration::from_secs(30), "the default time limit");
        let given = ["--check-cmd", "nginx -t", "--health-cmd", "curl -f localhost", "--health-timeout-secs", "5"];
        let cli = <Cli as clap::Parser>::try_parse_from(args.into_iter().chain(given)).expect("parses");
        let checks = config(cli).expect("a configuration").notify.checks;
        assert_eq!(checks.check.as_deref(), Some("nginx -t"));
        assert_eq!(checks.health.as_deref(), Some("curl -f localhost"));
        assert_eq!(checks.timeout, Duration::from_secs(5));
        let command = <Cli as clap::CommandFactory>::command();
        for (flag, variable) in [
            ("check_cmd", "CONFCAST_CHECK_CMD"),
            ("health_cmd", "CONFCAST_HEALTH_CMD"),
            ("health_timeout_secs", "CONFCAST_HEALTH_TIMEOUT_SECS"),
        ] {
            let arg = command.get_arguments().find(|a| a.get_id() == flag).expect("declared");
            assert_eq!(arg.get_env().and_then(|v| v.to_str()), Some(variable));
            assert!(arg.get_help().is_some(), "{flag} is documented in --help");
        }
    }

    #[test]
    fn the_old_splay_spelling_still_works() {
        let cli = <Cli as clap::Parser>::try_parse_from([
            "subscriber",
            "--dc",
            "dc1",
            "--service",
            "s",
            "--dir",
            "/x",
            "--splay",
            "2.5",
        ])
        .expect("parses");
        assert_eq!(cli.splay_secs, Some(2.5));
    }
}
