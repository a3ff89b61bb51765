//! `publisher install-hooks`: wiring a bare repository up as a confcast master.

use std::fs;
use std::path::{Path, PathBuf};

use confcast_schemas::connect::NatsAuth;

use crate::git::{git, GitError};
use crate::settings::{auth_config, config_keys, default_repo_name, GitConfig};

/// Marks the hook scripts older versions of confcast wrote, so re-installing may
/// overwrite them while a foreign hook is never clobbered silently.
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
    pub nats_auth: NatsAuth,
    /// Seconds the post-receive hook waits for the rollout (`confcast.waitRollout`):
    /// `Some(0)` removes the setting, `None` leaves it as it is.
    pub wait_rollout_secs: Option<u64>,
}

/// Why installation failed.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// `git` failed.
    #[error(transparent)]
    Git(#[from] GitError),
    /// The path is a repository with a work tree.
    #[error("{} is not a bare repository", .0.display())]
    NotBare(PathBuf),
    /// A hook binary is missing.
    #[error("hook binary {0} not found (build the confcast-hooks crate, or pass --bin-dir)")]
    MissingBinary(PathBuf),
    /// A foreign hook is in the way.
    #[error("{0} exists and was not installed by confcast; pass --force to replace it")]
    ForeignHook(PathBuf),
    /// Writing a hook failed.
    #[error("writing {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A credentials file given on the command line cannot be found.
    #[error("{flag} {}", path.display())]
    CredentialFile {
        /// The flag that named it.
        flag: &'static str,
        /// The path given.
        path: PathBuf,
        /// Why it cannot be used.
        #[source]
        source: std::io::Error,
    },
}

/// Installs both hooks and records the settings; returns the hook paths written.
pub fn install_hooks(options: &InstallOptions) -> Result<Vec<PathBuf>, InstallError> {
    let repo = &options.repo;
    if git(repo, &["rev-parse", "--is-bare-repository"])? != "true" {
        return Err(InstallError::NotBare(repo.clone()));
    }
    let config = GitConfig::read(repo)?;
    let hooks_dir = PathBuf::from(git(repo, &["rev-parse", "--path-format=absolute", "--git-path", "hooks"])?);
    fs::create_dir_all(&hooks_dir).map_err(|source| InstallError::Io { path: hooks_dir.clone(), source })?;

    // The hooks are symbolic links to the binaries: git then runs them directly, with no
    // shell started in between, and every push is that much faster.
    let bin_dir = options
        .bin_dir
        .canonicalize()
        .map_err(|_| InstallError::MissingBinary(options.bin_dir.join("post-receive")))?;
    let mut ours_in = vec![bin_dir.clone()];
    ours_in.extend(config.get(config_keys::HOOKS_DIR).map(PathBuf::from));
    let mut written = Vec::new();
    for name in ["post-receive", "pre-receive"] {
        let binary = bin_dir.join(name);
        if !binary.is_file() {
            return Err(InstallError::MissingBinary(binary));
        }
        let hook = hooks_dir.join(name);
        let io = |source| InstallError::Io { path: hook.clone(), source };
        if fs::symlink_metadata(&hook).is_ok() {
            if !is_ours(&hook, name, &ours_in) && !options.force {
                return Err(InstallError::ForeignHook(hook));
            }
            fs::remove_file(&hook).map_err(io)?;
        }
        std::os::unix::fs::symlink(&binary, &hook).map_err(io)?;
        written.push(hook);
    }
    git(repo, &["config", config_keys::HOOKS_DIR, &bin_dir.display().to_string()])?;
    // pre-receive lets a push delete a ref a datacenter still pins only when the pusher
    // says so with `git push -o confcast.allow-unpin`; git hands push options to the
    // hooks only when the repository advertises them.
    git(repo, &["config", "receive.advertisePushOptions", "true"])?;

    let name = match &options.repo_name {
        Some(name) => name.clone(),
        None => default_repo_name(repo),
    };
    git(repo, &["config", config_keys::NATS, &options.nats_url])?;
    git(repo, &["config", config_keys::REPO, &name])?;
    git(repo, &["config", config_keys::REPLICAS, &options.replicas.max(1).to_string()])?;
    // Re-installing replaces the credentials: none recorded earlier survives.
    for key in config_keys::NATS_AUTH {
        if config.get(key).is_some() {
            git(repo, &["config", "--unset-all", key])?;
        }
    }
    for (key, value) in auth_config(&options.nats_auth) {
        git(repo, &["config", key, &value])?;
    }
    match options.wait_rollout_secs {
        Some(0) if config.get(config_keys::WAIT_ROLLOUT).is_some() => {
            git(repo, &["config", "--unset-all", config_keys::WAIT_ROLLOUT])?;
        }
        Some(0) | None => {}
        Some(secs) => {
            git(repo, &["config", config_keys::WAIT_ROLLOUT, &secs.to_string()])?;
        }
    }
    Ok(written)
}

/// Whether the hook at `hook` is confcast's: a link to the hook binary of the same name
/// in one of `dirs` (where this or an earlier install put them), or a script an older
/// confcast wrote.
fn is_ours(hook: &Path, name: &str, dirs: &[PathBuf]) -> bool {
    match fs::read_link(hook) {
        Ok(target) => dirs.iter().any(|dir| target == dir.join(name)),
        Err(_) => fs::read_to_string(hook).is_ok_and(|script| script.contains(MARKER)),
    }
}

/// `auth` with every file made absolute (and checked to exist): the hooks run in the
/// master's directory.
pub fn absolute_paths(mut auth: NatsAuth) -> Result<NatsAuth, InstallError> {
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
            *p = p.canonicalize().map_err(|source| InstallError::CredentialFile { flag, path: p.clone(), source })?;
        }
    }
    Ok(auth)
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;

    fn setup() -> (tempfile::TempDir, InstallOptions) {
        let dir = tempfile::tempdir().expect("tempdir");
        let repo = dir.path().join("master.git");
        let out = Command::new("git").args(["init", "-q", "--bare"]).arg(&repo).output().expect("git");
        assert!(out.status.success());
        let bin_dir = dir.path().join("bin");
        fs::create_dir(&bin_dir).expect("bin dir");
        for name in ["post-receive", "pre-receive"] {
            fs::write(bin_dir.join(name), "binary").expect("binary");
        }
        let options = InstallOptions {
            repo,
            nats_url: "nats://127.0.0.1:4222".into(),
            repo_name: None,
            bin_dir,
            force: false,
            replicas: 1,
            nats_auth: NatsAuth::default(),
            wait_rollout_secs: None,
        };
        (dir, options)
    }

    #[test]
    fn hooks_are_links_to_the_binaries_and_reinstalling_replaces_them() {
        let (dir, mut options) = setup();
        let written = install_hooks(&options).expect("install");
        assert_eq!(written.len(), 2);
        for hook in &written {
            let name = hook.file_name().expect("name");
            let target = fs::read_link(hook).expect("a link");
            assert_eq!(target, options.bin_dir.canonicalize().expect("bin").join(name));
        }
        // Installed again from another directory (an upgrade): the old links are ours.
        let newer = dir.path().join("bin2");
        fs::create_dir(&newer).expect("bin2");
        for name in ["post-receive", "pre-receive"] {
            fs::write(newer.join(name), "newer binary").expect("binary");
        }
        options.bin_dir = newer.clone();
        install_hooks(&options).expect("reinstall");
        let hook = options.repo.join("hooks/post-receive");
        assert_eq!(fs::read_link(&hook).expect("link"), newer.canonicalize().expect("bin2").join("post-receive"));
        assert_eq!(
            git(&options.repo, &["config", "--get", "receive.advertisePushOptions"]).expect("set"),
            "true",
            "pushes can carry confcast's push options"
        );
    }

    #[test]
    fn a_hook_confcast_did_not_write_is_kept_unless_forced() {
        let (dir, mut options) = setup();
        let hook = options.repo.join("hooks/post-receive");
        fs::create_dir_all(hook.parent().expect("hooks")).expect("hooks dir");
        fs::write(&hook, "#!/bin/sh\necho mine\n").expect("foreign hook");
        assert!(matches!(install_hooks(&options), Err(InstallError::ForeignHook(h)) if h == hook));
        assert_eq!(fs::read_to_string(&hook).expect("kept"), "#!/bin/sh\necho mine\n");
        // A link to someone else's hook is no more ours than a script.
        fs::remove_file(&hook).expect("rm");
        let elsewhere = dir.path().join("other-post-receive");
        fs::write(&elsewhere, "theirs").expect("theirs");
        std::os::unix::fs::symlink(&elsewhere, &hook).expect("link");
        assert!(matches!(install_hooks(&options), Err(InstallError::ForeignHook(_))));
        assert_eq!(fs::read_link(&hook).expect("kept"), elsewhere);
        options.force = true;
        install_hooks(&options).expect("forced");
        assert_ne!(fs::read_link(&hook).expect("link"), elsewhere);
    }

    #[test]
    fn a_script_an_older_confcast_wrote_is_replaced() {
        let (_dir, options) = setup();
        let hook = options.repo.join("hooks/pre-receive");
        fs::create_dir_all(hook.parent().expect("hooks")).expect("hooks dir");
        fs::write(&hook, format!("#!/bin/sh\n{MARKER}\nexec '/old/pre-receive' \"$@\"\n")).expect("old hook");
        install_hooks(&options).expect("install");
        assert!(fs::read_link(&hook).is_ok(), "the old script became a link");
    }
}
