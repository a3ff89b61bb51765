//! What every confcast binary does the same way: its exit codes, how it reads its
//! command line and says what is wrong with it, how it logs, and, for the long-running
//! ones (`relay`, `subscriber`), readiness for systemd and shutdown on signals.
//!
//! # Exit codes
//!
//! Shared by every command, so that scripts and service managers can act on them:
//!
//! | code | meaning |
//! |---|---|
//! | [`EXIT_OK`] (0) | done; for a question (`publisher status`, `subscriber verify`), the answer is yes |
//! | [`EXIT_FAILED`] (1) | the command ran and the answer is no, or its work failed part-way: a rollout not complete, an altered tree, a push refused, events left unpublished, a daemon stopped by an error |
//! | [`EXIT_UNABLE`] (2) | the command could not start its work: a usage error, a configuration that cannot work (a missing repository, an unknown scheme, an unknown datacenter, an unreadable key), or the bus it needs unreachable; nothing was changed and the one line on stderr says which |
//!
//! A daemon never exits for a bus or a master that is down: it retries, and says so.
//! The hooks are the exception git imposes: `post-receive` always exits 0 (a push must
//! never fail because of it) and `pre-receive` exits 1 to refuse a push.

use std::ffi::OsString;
use std::process::ExitCode;

use tokio_util::sync::CancellationToken;

/// Exit status: done, and for a question the answer is yes.
pub const EXIT_OK: u8 = 0;
/// Exit status: the command ran and its answer is no, or its work failed part-way.
pub const EXIT_FAILED: u8 = 1;
/// Exit status: the command could not start its work (usage or configuration error,
/// or the bus it needs unreachable); nothing was changed.
pub const EXIT_UNABLE: u8 = 2;

/// The [`ExitCode`] of one of the `EXIT_*` codes.
pub fn exit(code: u8) -> ExitCode {
    ExitCode::from(code)
}

/// Parses the command line of `program` into `C`. `--help` and `--version` print and
/// exit 0; any other mistake prints one line naming it (with clap's suggestion, if it
/// has one) and exits [`EXIT_UNABLE`].
pub fn parse_args<C: clap::Parser>(program: &str) -> C {
    match C::try_parse() {
        Ok(cli) => cli,
        Err(e) => match e.kind() {
            // Help asked for, or shown for a command given nothing (which exits 2).
            clap::error::ErrorKind::DisplayHelp
            | clap::error::ErrorKind::DisplayVersion
            | clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => e.exit(),
            _ => {
                eprintln!("{}", usage_line(program, &e.render().to_string()));
                std::process::exit(i32::from(EXIT_UNABLE));
            }
        },
    }
}

/// clap's rendering of a usage error (`error: ...`, indented details, `tip: ...`, then
/// the usage) folded into one line: `relay: unexpected argument '--dcc' found; tip: a
/// similar argument exists: '--dc' (see relay --help)`.
fn usage_line(program: &str, rendered: &str) -> String {
    let mut line = format!("{program}: ");
    let message = rendered.split("\nUsage:").next().unwrap_or(rendered);
    let mut first = true;
    for part in message.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if part.starts_with("For more information") {
            continue;
        }
        let part = part.strip_prefix("error: ").unwrap_or(part);
        if !first {
            line.push_str(if part.starts_with("tip:") { "; " } else { " " });
        }
        line.push_str(part);
        first = false;
    }
    line.push_str(&format!(" (see {program} --help)"));
    line
}

/// The answer of a git hook to a human: git runs `pre-receive` and `post-receive`
/// without arguments (their input is on stdin), so any argument means someone is asking
/// about the hook. Prints its version for `--version`/`-V`, else `help`, and returns the
/// exit code (0) the hook should end with at once, without reading stdin; `None` when
/// run by git.
pub fn hook_arguments(program: &str, version: &str, help: &str) -> Option<ExitCode> {
    let answer = hook_answer(std::env::args_os().skip(1).collect(), program, version, help)?;
    println!("{answer}");
    Some(exit(EXIT_OK))
}

fn hook_answer(args: Vec<OsString>, program: &str, version: &str, help: &str) -> Option<String> {
    let first = args.first()?;
    if first == "--version" || first == "-V" {
        return Some(format!("{program} {version}"));
    }
    Some(format!(
        "{}\n\nUsage: {program} (run by git, with the pushed refs on stdin)\n\nInstalled and configured by \
         `publisher install-hooks`; settings are read from the repository's git config.",
        help.trim_end()
    ))
}

/// How log lines are written (`--log-format`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per line (`timestamp`, `level`, `target`, `message` and the
    /// event's fields), for log collectors.
    Json,
}

/// The logging flag, the same on every long-running binary and on `publisher`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct LogArgs {
    /// How log lines are written on stderr: `text`, or `json` (one object per line).
    /// What is logged is chosen with RUST_LOG (e.g. `info,confcast_relay=debug`).
    #[arg(long, env = "CONFCAST_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
}

/// Installs the process's tracing subscriber: events at or above `default` (a RUST_LOG
/// directive such as `info`) unless RUST_LOG says otherwise, on stderr, as text or JSON.
/// The NATS client's own connection events are kept to warnings by default: confcast
/// reports connection trouble itself, naming the server.
pub fn init_logging(format: LogFormat, default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("{default},async_nats=warn")));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).with_ansi(false).init(),
    }
}

/// Says in one line on stderr why `program` cannot start — `program: error: cause` as
/// text, one event at ERROR as JSON — and returns [`EXIT_UNABLE`] to exit with.
pub fn cannot_start(program: &str, format: LogFormat, error: &(dyn std::error::Error + 'static)) -> ExitCode {
    let chain = error_chain(error);
    match format {
        LogFormat::Text => eprintln!("{program}: {chain}"),
        LogFormat::Json => tracing::error!(error = %chain, "{program} cannot start"),
    }
    exit(EXIT_UNABLE)
}

/// An error and its causes in one line, `outer: cause: root cause`, each told once:
/// what operators read instead of `{:?}` dumps.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut line = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        // Many errors repeat their source in their own message, and some chains revisit
        // an error they already went through.
        if !text.is_empty() && !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = cause.source();
    }
    line
}

/// The value of an environment variable that was renamed, with a warning to use the new
/// name; `None` when it is not set, or when the new one is (which then wins).
pub fn renamed_env(old: &str, new: &str) -> Option<String> {
    if std::env::var_os(new).is_some() {
        return None;
    }
    let value = std::env::var(old).ok()?;
    tracing::warn!("{old} is deprecated: set {new} instead");
    Some(value)
}

/// Tells systemd about the service's state (`READY=1`, ...) on the datagram socket it
/// names in `NOTIFY_SOCKET` (a path, or `@name` in the abstract namespace); nothing
/// when not run by systemd with `Type=notify`.
pub fn sd_notify(state: &str) {
    use std::os::linux::net::SocketAddrExt as _;
    use std::os::unix::ffi::OsStrExt as _;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let addr = match path.as_bytes().strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name),
        None => SocketAddr::from_pathname(&path),
    };
    let sent = UnixDatagram::unbound().and_then(|socket| socket.send_to_addr(state.as_bytes(), &addr?));
    if let Err(e) = sent {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

/// Cancels `token` on SIGTERM or ctrl-c.
pub async fn shutdown_on_signals(token: CancellationToken) {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    token.cancel();
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    #[derive(Debug, clap::Parser)]
    #[command(name = "tool")]
    struct Tool {
        #[arg(long)]
        dc: String,
        #[arg(long = "timeout-secs", alias = "timeout", default_value_t = 60)]
        timeout_secs: u64,
        #[command(flatten)]
        log: LogArgs,
    }

    fn rendered(args: &[&str]) -> String {
        let error = Tool::try_parse_from(args).expect_err("a usage error");
        error.render().to_string()
    }

    #[test]
    fn a_usage_error_is_one_line_naming_the_problem() {
        let line = usage_line("tool", &rendered(&["tool", "--dcc", "x"]));
        assert!(!line.contains('\n'), "{line}");
        assert!(line.starts_with("tool: unexpected argument '--dcc' found"), "{line}");
        assert!(line.contains("tip: a similar argument exists: '--dc'"), "{line}");
        assert!(line.ends_with("(see tool --help)"), "{line}");

        let line = usage_line("tool", &rendered(&["tool"]));
        assert!(!line.contains('\n') && line.contains("--dc <DC>"), "{line}");
        let line = usage_line("tool", &rendered(&["tool", "--dc", "a", "--log-format", "xml"]));
        assert!(!line.contains('\n') && line.contains("'xml'"), "{line}");
    }

    #[test]
    fn a_renamed_duration_flag_keeps_its_old_spelling() {
        let tool = Tool::try_parse_from(["tool", "--dc", "a", "--timeout", "5"]).expect("the old spelling");
        assert_eq!(tool.timeout_secs, 5);
        let tool = Tool::try_parse_from(["tool", "--dc", "a", "--log-format", "json"]).expect("parses");
        assert_eq!(tool.log.log_format, LogFormat::Json);
    }

    #[test]
    fn a_hook_answers_any_argument_and_runs_without_one() {
        let args = |a: &[&str]| a.iter().map(OsString::from).collect::<Vec<_>>();
        assert_eq!(hook_answer(args(&[]), "post-receive", "1.2.3", "Announces pushes."), None);
        assert_eq!(
            hook_answer(args(&["--version"]), "post-receive", "1.2.3", "x").as_deref(),
            Some("post-receive 1.2.3")
        );
        for asked in [&["--help"][..], &["-h"], &["whatever", "else"]] {
            let help = hook_answer(args(asked), "post-receive", "1.2.3", "Announces pushes.").expect("help");
            assert!(help.starts_with("Announces pushes.") && help.contains("Usage: post-receive"), "{help}");
        }
    }

    #[test]
    fn an_error_chain_is_one_line_with_each_cause_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("fetching from /srv/master.git")]
        struct Outer(#[source] std::io::Error);
        let error = Outer(std::io::Error::new(std::io::ErrorKind::NotFound, "no such repository"));
        assert_eq!(error_chain(&error), "fetching from /srv/master.git: no such repository");

        #[derive(Debug, thiserror::Error)]
        #[error("connecting: {0}")]
        struct Repeats(#[source] std::io::Error);
        let error = Repeats(std::io::Error::other("refused"));
        assert_eq!(error_chain(&error), "connecting: refused");
    }
}
