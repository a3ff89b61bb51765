//! Running `git` on the master repository: the one way the publisher reads and writes
//! it (the hooks read it in-process, through libgit2).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// `git` could not be run, or refused.
#[derive(Debug, thiserror::Error)]
pub enum GitError {
    /// The `git` program could not be started.
    #[error("running git")]
    Spawn(#[source] std::io::Error),
    /// git ran and failed: not a repository, a bad argument, an unwritable config.
    #[error("git {args} in {}: {stderr}", repo.display())]
    Failed {
        /// The arguments given.
        args: String,
        /// The repository.
        repo: PathBuf,
        /// What git said.
        stderr: String,
    },
}

/// Runs `git -C <repo> <args>`, whatever its exit status.
pub(crate) fn run(repo: &Path, args: &[&str]) -> Result<Output, GitError> {
    Command::new("git").arg("-C").arg(repo).args(args).output().map_err(GitError::Spawn)
}

/// The failure of a `git` run that exited with an error.
pub(crate) fn failed(repo: &Path, args: &[&str], output: &Output) -> GitError {
    GitError::Failed {
        args: args.join(" "),
        repo: repo.to_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
    }
}

/// Runs `git -C <repo> <args>` and returns its output, trimmed.
pub(crate) fn git(repo: &Path, args: &[&str]) -> Result<String, GitError> {
    let output = run(repo, args)?;
    if !output.status.success() {
        return Err(failed(repo, args, &output));
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// The repository's git directory, absolute.
pub fn git_dir(repo: &Path) -> Result<PathBuf, GitError> {
    Ok(PathBuf::from(git(repo, &["rev-parse", "--path-format=absolute", "--git-dir"])?))
}
