//! git `post-receive` hook of a confcast master: announces every ref update on NATS,
//! or spools it when NATS is unreachable, and tells the pusher what it published. Never
//! fails the push and never waits longer than `confcast.timeoutMs` (1.5 s by default)
//! for the bus; with `confcast.waitRollout` set it then waits, that long at most, for
//! the hosts to converge and prints where each datacenter stands.
//!
//! git runs it without arguments; given any (`--help`, `--version`), it answers the
//! human asking and exits 0 without reading stdin.

use std::io::Read;
use std::process::ExitCode;

use confcast_hooks::{announcement_lines, commit_events, parse_updates, settings, wait_rollout};

/// What `post-receive --help` says.
const HELP: &str = "git post-receive hook of a confcast master: announces every pushed ref update on NATS \
(or spools it when NATS is unreachable, for the next push or `publisher drain`) and tells the pusher what it \
published. Never fails a push; waits for the bus at most confcast.timeoutMs (1500 ms), and for the hosts at most \
confcast.waitRollout seconds when that is set.";

fn main() -> ExitCode {
    if let Some(code) = confcast_schemas::process::hook_arguments("post-receive", env!("CARGO_PKG_VERSION"), HELP) {
        return code;
    }
    let mut input = String::new();
    if let Err(e) = std::io::stdin().read_to_string(&mut input) {
        eprintln!("confcast: cannot read hook input: {e}");
        return ExitCode::SUCCESS;
    }
    let (updates, bad) = parse_updates(&input);
    for line in bad {
        eprintln!("confcast: ignoring malformed hook input line {line:?}");
    }
    let repo = match git2::Repository::open_from_env() {
        Ok(repo) => repo,
        Err(e) => {
            eprintln!("confcast: cannot open the repository, nothing announced: {e}");
            return ExitCode::SUCCESS;
        }
    };
    let settings = settings(&repo);
    let events = commit_events(&repo, &settings.repo_name, &updates);
    let count = events.len();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("confcast: cannot start the runtime, nothing announced: {e}");
            return ExitCode::SUCCESS;
        }
    };
    let (outcome, client) =
        runtime.block_on(confcast_publisher::announce(&settings.bus, &settings.spool_dir, events, settings.timeout));
    match &outcome.error {
        None => eprintln!("confcast: announced {count} ref update(s)"),
        Some(why) => eprintln!(
            "confcast: {why}; spooled {} event(s) in {}, published on the next push or by `publisher drain`",
            outcome.spooled,
            settings.spool_dir.display()
        ),
    }
    for line in announcement_lines(&updates, outcome.spooled) {
        eprintln!("{line}");
    }
    // Waiting for hosts is opt-in: the push returns only when this hook does. Nothing
    // to wait for when the events did not reach the bus. The rollout is read on the
    // connection the events went through: one connection per push.
    if let (Some(wait), None, Some(client)) = (settings.wait_rollout, &outcome.error, &client) {
        for line in runtime.block_on(wait_rollout(client, &settings, &updates, wait)) {
            eprintln!("{line}");
        }
    }
    // Do not wait for the client's background tasks: the push must return now.
    runtime.shutdown_background();
    ExitCode::SUCCESS
}
