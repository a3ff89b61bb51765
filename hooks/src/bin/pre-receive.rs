//! git `pre-receive` hook of a confcast master: refuses a push whose `datacenter.json`
//! or `datacenter-configuration.json` does not validate, naming the ref, the file, the
//! field and the problem; or whose service, application or device tree holds an entry
//! no directory can hold or symbolic links that lead out of the tree, naming the ref,
//! the path and the target. Exit status 1 makes git refuse every ref of the push.

use std::io::Read;
use std::process::ExitCode;

use confcast_hooks::{parse_updates, validate};

fn main() -> ExitCode {
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
    let mut rejected = 0;
    for update in &updates {
        if let Err(e) = validate(&repo, update) {
            eprintln!("confcast: rejected {e}");
            rejected += 1;
        }
    }
    if rejected > 0 {
        eprintln!("confcast: push refused; nothing was changed");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
