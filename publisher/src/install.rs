//! `publisher install-hooks`: wiring a bare repository up as a confcast master.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::config_keys;

/// Marks hook scripts written by confcast, so re-installing may overwrite them while a
/// foreign hook is never clobbered silently.
const MARKER: &str = "# Installed by `publisher install-hooks` (confcast).";

/// What `install-hooks` needs.
#[derive(Debug, Clone)]
pub struct InstallOptions {
    /// The bare repository.
    pub repo: PathBuf,
    /// NATS URL recorded as `confcast.nats`.
    pub nats_url: String,
    /// Name recorded as `confcast.repo`; defaults to the directory name without `.git`.
    pub repo_name: Option<String>,
    /// Directory holding the `post-receive` and `pre-receive` binaries.
    pub bin_dir: PathBuf,
    /// Replace hooks that confcast did not write.
    pub force: bool,
    /// Replicas of the commit stream, recorded as `confcast.replicas`.
    pub replicas: usize,
    /// NATS credentials of the hooks; their paths are recorded (`confcast.nats*`).
    pub nats_auth: crate::NatsAuth,
    /// Seconds the post-receive hook waits for the rollout (`confcast.waitRollout`):
    /// `Some(0)` removes the setting, `None` leaves it as it is.
    pub wait_rollout_secs: Option<u64>,
}

/// Why installation failed.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// `git` failed or the path is not a repository.
    #[error("{0}")]
    Git(String),
    /// A hook binary is missing.
    #[error("hook binary {0} not found (build the confcast-hooks crate, or pass --bin-dir)")]
    MissingBinary(PathBuf),
    /// A foreign hook is in the way.
    #[error("{0} exists and was not installed by confcast; pass --force to replace it")]
    ForeignHook(PathBuf),
    /// Writing a hook failed.
    #[error("writing {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

pub(crate) fn git(repo: &Path, args: &[&str]) -> Result<String, InstallError> {
    let out = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(args)
        .output()
        .map_err(|e| InstallError::Git(format!("running git: {e}")))?;
    if !out.status.success() {
        return Err(InstallError::Git(format!(
            "git {} in {}: {}",
            args.join(" "),
            repo.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Installs both hooks and records the settings; returns the hook paths written.
pub fn install_hooks(options: &InstallOptions) -> Result<Vec<PathBuf>, InstallError> {
    let repo = &options.repo;
    if git(repo, &["rev-parse", "--is-bare-repository"])? != "true" {
        return Err(InstallError::Git(format!("{} is not a bare repository", repo.display())));
    }
    let hooks_dir = PathBuf::from(git(repo, &["rev-parse", "--path-format=absolute", "--git-path", "hooks"])?);
    fs::create_dir_all(&hooks_dir).map_err(|source| InstallError::Io { path: hooks_dir.clone(), source })?;

    let mut written = Vec::new();
    for name in ["post-receive", "pre-receive"] {
        let binary = options.bin_dir.join(name);
        if !binary.is_file() {
            return Err(InstallError::MissingBinary(binary));
        }
        let binary = binary.canonicalize().map_err(|source| InstallError::Io { path: binary.clone(), source })?;
        let hook = hooks_dir.join(name);
        if let Ok(existing) = fs::read_to_string(&hook) {
            if !existing.contains(MARKER) && !options.force {
                return Err(InstallError::ForeignHook(hook));
            }
        }
        let quoted = binary.display().to_string().replace('\'', r"'\''");
        let script = format!("#!/bin/sh\n{MARKER}\nexec '{quoted}' \"$@\"\n");
        let io = |source| InstallError::Io { path: hook.clone(), source };
        fs::write(&hook, script).map_err(io)?;
        fs::set_permissions(&hook, fs::Permissions::from_mode(0o755)).map_err(io)?;
        written.push(hook);
    }

    let name = match &options.repo_name {
        Some(name) => name.clone(),
        None => crate::default_repo_name(repo),
    };
    git(repo, &["config", config_keys::NATS, &options.nats_url])?;
    git(repo, &["config", config_keys::REPO, &name])?;
    git(repo, &["config", config_keys::REPLICAS, &options.replicas.max(1).to_string()])?;
    // Re-installing replaces the credentials: none recorded earlier survives.
    for key in config_keys::NATS_AUTH {
        if config_value(repo, key).is_some() {
            git(repo, &["config", "--unset-all", key])?;
        }
    }
    for (key, value) in crate::auth_config(&options.nats_auth) {
        git(repo, &["config", key, &value])?;
    }
    match options.wait_rollout_secs {
        Some(0) if config_value(repo, config_keys::WAIT_ROLLOUT).is_some() => {
            git(repo, &["config", "--unset-all", config_keys::WAIT_ROLLOUT])?;
        }
        Some(0) | None => {}
        Some(secs) => {
            git(repo, &["config", config_keys::WAIT_ROLLOUT, &secs.to_string()])?;
        }
    }
    Ok(written)
}

/// Reads a `confcast.*` setting of the repository, if set.
pub fn config_value(repo: &Path, key: &str) -> Option<String> {
    git(repo, &["config", "--get", key]).ok().filter(|v| !v.is_empty())
}

/// The repository's git directory, absolute.
pub fn git_dir(repo: &Path) -> Result<PathBuf, InstallError> {
    Ok(PathBuf::from(git(repo, &["rev-parse", "--path-format=absolute", "--git-dir"])?))
}

/// The repository's recorded name, or its directory name.
pub fn repo_name(repo: &Path) -> Result<String, InstallError> {
    match config_value(repo, config_keys::REPO) {
        Some(name) => Ok(name),
        None => Ok(crate::default_repo_name(repo)),
    }
}
