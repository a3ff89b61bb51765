//! git `pre-receive` hook of a confcast master: refuses a push whose `datacenter.json`
//! or `datacenter-configuration.json` does not validate, naming the ref, the file, the
//! field and the problem; whose documents name a configuration, a service or a branch or
//! tag that the push would leave missing, with the nearest existing name; that deletes
//! a branch, tag or configuration a datacenter still pins (unless pushed with
//! `-o confcast.allow-unpin`); or whose service, application or device tree holds an
//! entry no directory can hold or symbolic links that lead out of the tree, naming the
//! ref, the path and the target. Exit status 1 makes git refuse every ref of the push.
//!
//! git runs it without arguments; given any (`--help`, `--version`), it answers the
//! human asking and exits 0 without reading stdin.

use std::io::Read;
use std::process::ExitCode;

use confcast_hooks::{cross_refs, parse_updates, push_options::PushOptions, validate};

/// What `pre-receive --help` says.
const HELP: &str = "git pre-receive hook of a confcast master: refuses a push (exit 1, nothing changed) whose \
control documents do not validate or name what the push would leave missing, that deletes a branch, tag or \
configuration a datacenter still pins (unless pushed with `-o confcast.allow-unpin`), or whose service, \
application or device tree holds a name no directory can hold or links that lead out of the tree; says why, \
naming the ref, the file or path, the field and the value.";

fn main() -> ExitCode {
    if let Some(code) = confcast_schemas::process::hook_arguments("pre-receive", env!("CARGO_PKG_VERSION"), HELP) {
        return code;
    }
    let mut input = String::new();
    if let Err(e) = std::io::stdin().read_to_string(&mut input) {
        eprintln!("confcast: cannot read hook input: {e}");
        return ExitCode::FAILURE;
    }
    let (updates, _) = parse_updates(&input);
    let repo = match git2::Repository::open_from_env() {
        Ok(repo) => repo,
        Err(e) => {
            eprintln!("confcast: cannot open the repository to validate the push: {e}");
            return ExitCode::FAILURE;
        }
    };
    let options = PushOptions::from_env();
    for note in options.notes() {
        eprintln!("{note}");
    }
    let mut rejected = 0;
    for update in &updates {
        if let Err(e) = validate(&repo, update) {
            eprintln!("confcast: rejected {e}");
            rejected += 1;
        }
    }
    let verdict = cross_refs::check(&repo, &updates, &options);
    for e in &verdict.rejections {
        eprintln!("confcast: rejected {e}");
        rejected += 1;
    }
    if rejected > 0 {
        eprintln!("confcast: push refused; nothing was changed");
        return ExitCode::FAILURE;
    }
    for note in &verdict.notes {
        eprintln!("{note}");
    }
    ExitCode::SUCCESS
}
