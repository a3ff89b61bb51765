//! The settings of a master repository: the `confcast.*` keys of its git config, which
//! `publisher install-hooks` writes and both hooks and `publisher drain`/`backfill`
//! read, typed and with their defaults.
//!
//! The hooks read the config in-process (libgit2) and hand [`Settings::from_config`] a
//! lookup; the commands read it with one `git config` run ([`GitConfig::read`]). Either
//! way the same keys mean the same thing, with the same defaults.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use confcast_schemas::connect::NatsAuth;

use crate::git::{self, GitError};

/// The NATS the hooks publish to when `confcast.nats` is not set.
pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";
/// The default wait of the post-receive hook: well under the 2 s a push may take.
pub const DEFAULT_HOOK_TIMEOUT: Duration = Duration::from_millis(1500);

/// Git config keys shared by `publisher` and the hooks.
pub mod config_keys {
    /// NATS URL the hooks publish to.
    pub const NATS: &str = "confcast.nats";
    /// Name of the master repository in commit events.
    pub const REPO: &str = "confcast.repo";
    /// Spool directory (default `<git-dir>/confcast/spool`).
    pub const SPOOL_DIR: &str = "confcast.spoolDir";
    /// How long the post-receive hook may wait for NATS, in milliseconds (default 1500).
    pub const TIMEOUT_MS: &str = "confcast.timeoutMs";
    /// Replicas of the commit stream when the hooks create it (default 1; 3 on a cluster).
    pub const REPLICAS: &str = "confcast.replicas";
    /// How long, in seconds, the post-receive hook waits for the rollout of what it
    /// announced, printing its convergence per datacenter into the `git push` output
    /// (unset or 0: it does not wait).
    pub const WAIT_ROLLOUT: &str = "confcast.waitRollout";
    /// Datacenters (comma-separated) whose streams are in a JetStream domain named after
    /// them (the leaf-node topology): where the hook looks for the rollout. Unset: the
    /// datacenters whose streams are on the master's own NATS.
    pub const ROLLOUT_DOMAINS: &str = "confcast.rolloutDomains";
    /// NATS credentials of the hooks: paths of files, never the secrets themselves.
    pub const NATS_CREDS: &str = "confcast.natsCreds";
    /// File holding the hooks' nkey seed.
    pub const NATS_NKEY: &str = "confcast.natsNkey";
    /// NATS user of the hooks.
    pub const NATS_USER: &str = "confcast.natsUser";
    /// File holding the password of `confcast.natsUser`.
    pub const NATS_PASSWORD_FILE: &str = "confcast.natsPasswordFile";
    /// File holding the hooks' NATS token.
    pub const NATS_TOKEN_FILE: &str = "confcast.natsTokenFile";
    /// CA certificates of the NATS server.
    pub const NATS_TLS_CA: &str = "confcast.natsTlsCa";
    /// Client certificate of the hooks.
    pub const NATS_TLS_CERT: &str = "confcast.natsTlsCert";
    /// Private key of `confcast.natsTlsCert`.
    pub const NATS_TLS_KEY: &str = "confcast.natsTlsKey";
    /// Reply inbox prefix of the hooks.
    pub const NATS_INBOX_PREFIX: &str = "confcast.natsInboxPrefix";
    /// Directory of the hook binaries the repository's hooks link to (written by
    /// `install-hooks`, so that a later install recognises its own links).
    pub const HOOKS_DIR: &str = "confcast.hooksDir";
    /// Every key of the hooks' NATS credentials.
    pub const NATS_AUTH: [&str; 9] = [
        NATS_CREDS,
        NATS_NKEY,
        NATS_USER,
        NATS_PASSWORD_FILE,
        NATS_TOKEN_FILE,
        NATS_TLS_CA,
        NATS_TLS_CERT,
        NATS_TLS_KEY,
        NATS_INBOX_PREFIX,
    ];
}

/// Where commit events go: the master's NATS (a comma-separated list of a cluster's
/// URLs), how to authenticate, and how many replicas the commit stream gets when the
/// publisher creates it.
#[derive(Debug, Clone)]
pub struct BusTarget {
    /// NATS URL(s).
    pub nats_url: String,
    /// Credentials and TLS.
    pub auth: NatsAuth,
    /// Replicas of the commit stream (3 on a cluster).
    pub replicas: usize,
}

/// The `confcast.*` settings of a master repository, with defaults.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The master's NATS (`confcast.nats`, the credentials, `confcast.replicas`).
    pub bus: BusTarget,
    /// Repository name in events (`confcast.repo`, default the directory name).
    pub repo_name: String,
    /// Spool directory (`confcast.spoolDir`, default `<git-dir>/confcast/spool`).
    pub spool_dir: PathBuf,
    /// How long the hook may wait for the bus (`confcast.timeoutMs`).
    pub timeout: Duration,
    /// How long to wait for the rollout of what was announced (`confcast.waitRollout`),
    /// if at all.
    pub wait_rollout: Option<Duration>,
    /// Datacenters read in their own JetStream domains (`confcast.rolloutDomains`).
    pub rollout_domains: Vec<String>,
}

impl Settings {
    /// The settings `get` finds (it looks a key up, `None` when unset or empty) for the
    /// repository whose git directory is `git_dir`.
    pub fn from_config(get: impl Fn(&str) -> Option<String>, git_dir: &Path) -> Settings {
        Settings {
            bus: BusTarget {
                nats_url: get(config_keys::NATS).unwrap_or_else(|| DEFAULT_NATS_URL.into()),
                auth: auth_from_config(&get),
                replicas: get(config_keys::REPLICAS).and_then(|r| r.parse().ok()).unwrap_or(1),
            },
            repo_name: get(config_keys::REPO).unwrap_or_else(|| default_repo_name(git_dir)),
            spool_dir: get(config_keys::SPOOL_DIR).map(Into::into).unwrap_or_else(|| default_spool_dir(git_dir)),
            timeout: get(config_keys::TIMEOUT_MS)
                .and_then(|ms| ms.parse().ok())
                .map(Duration::from_millis)
                .unwrap_or(DEFAULT_HOOK_TIMEOUT),
            wait_rollout: get(config_keys::WAIT_ROLLOUT)
                .and_then(|secs| secs.trim().parse::<f64>().ok())
                .filter(|secs| secs.is_finite() && *secs > 0.0)
                .map(Duration::from_secs_f64),
            rollout_domains: get(config_keys::ROLLOUT_DOMAINS)
                .map(|dcs| dcs.split(',').map(str::trim).filter(|d| !d.is_empty()).map(str::to_owned).collect())
                .unwrap_or_default(),
        }
    }

    /// Reads the settings of the repository at `repo` (two runs of git: its git
    /// directory, which also tells it is a repository, and its config).
    pub fn read(repo: &Path) -> Result<Settings, GitError> {
        let git_dir = git::git_dir(repo)?;
        let config = GitConfig::read(repo)?;
        Ok(Settings::from_config(|key| config.get(key).map(str::to_owned), &git_dir))
    }

    /// Where a command sends events: `nats` and `auth` from its command line when
    /// given, else the hooks' own.
    pub fn bus_with(&self, nats: Option<String>, auth: NatsAuth) -> BusTarget {
        BusTarget {
            nats_url: nats.unwrap_or_else(|| self.bus.nats_url.clone()),
            auth: if auth.is_empty() { self.bus.auth.clone() } else { auth },
            replicas: self.bus.replicas,
        }
    }
}

/// The `confcast.*` keys of a repository's config (every level git reads: system,
/// global, the repository's, and their includes), read at once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GitConfig {
    /// Key, lower case as git normalises it → its last value (the one that applies).
    values: BTreeMap<String, String>,
}

impl GitConfig {
    /// Runs `git config --get-regexp` once for every `confcast.*` key.
    pub fn read(repo: &Path) -> Result<GitConfig, GitError> {
        let args = ["config", "--null", "--get-regexp", r"^confcast\."];
        let output = git::run(repo, &args)?;
        match output.status.code() {
            Some(0) => Ok(GitConfig::parse(&output.stdout)),
            // No key matched.
            Some(1) => Ok(GitConfig::default()),
            _ => Err(git::failed(repo, &args, &output)),
        }
    }

    /// Reads `git config --null` output: `key\nvalue\0` per entry (`key\0` for a key
    /// without a value). Later entries win, as they do for git.
    fn parse(output: &[u8]) -> GitConfig {
        let mut values = BTreeMap::new();
        for entry in output.split(|b| *b == 0).filter(|e| !e.is_empty()) {
            let entry = String::from_utf8_lossy(entry);
            let (key, value) = entry.split_once('\n').unwrap_or((&entry, ""));
            values.insert(key.to_ascii_lowercase(), value.to_owned());
        }
        GitConfig { values }
    }

    /// The value of `key` (any case), unless unset or empty.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.values.get(&key.to_ascii_lowercase()).map(String::as_str).filter(|v| !v.is_empty())
    }
}

/// The name a master repository gets in commit events when `confcast.repo` is not set:
/// its directory name without `.git`.
pub fn default_repo_name(git_dir: &Path) -> String {
    let abs = git_dir.canonicalize().unwrap_or_else(|_| git_dir.to_owned());
    let base = abs.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "master".into());
    base.strip_suffix(".git").unwrap_or(&base).to_owned()
}

/// Where a master repository's spool lives unless `confcast.spoolDir` says otherwise.
pub fn default_spool_dir(git_dir: &Path) -> PathBuf {
    git_dir.join("confcast").join("spool")
}

/// The hooks' NATS credentials as `(git config key, value)` pairs: only paths and the
/// user name go into the repository's config.
pub fn auth_config(auth: &NatsAuth) -> Vec<(&'static str, String)> {
    let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
    [
        (config_keys::NATS_CREDS, path(&auth.creds)),
        (config_keys::NATS_NKEY, path(&auth.nkey)),
        (config_keys::NATS_USER, auth.user.clone()),
        (config_keys::NATS_PASSWORD_FILE, path(&auth.password_file)),
        (config_keys::NATS_TOKEN_FILE, path(&auth.token_file)),
        (config_keys::NATS_TLS_CA, path(&auth.tls_ca)),
        (config_keys::NATS_TLS_CERT, path(&auth.tls_cert)),
        (config_keys::NATS_TLS_KEY, path(&auth.tls_key)),
        (config_keys::NATS_INBOX_PREFIX, auth.inbox_prefix.clone()),
    ]
    .into_iter()
    .filter_map(|(key, value)| Some((key, value?)))
    .collect()
}

/// The hooks' NATS credentials read back from the repository's config (`get` looks a
/// key up).
pub fn auth_from_config(get: impl Fn(&str) -> Option<String>) -> NatsAuth {
    let path = |key: &str| get(key).map(PathBuf::from);
    NatsAuth {
        creds: path(config_keys::NATS_CREDS),
        nkey: path(config_keys::NATS_NKEY),
        user: get(config_keys::NATS_USER),
        password_file: path(config_keys::NATS_PASSWORD_FILE),
        token_file: path(config_keys::NATS_TOKEN_FILE),
        tls_ca: path(config_keys::NATS_TLS_CA),
        tls_cert: path(config_keys::NATS_TLS_CERT),
        tls_key: path(config_keys::NATS_TLS_KEY),
        inbox_prefix: get(config_keys::NATS_INBOX_PREFIX),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn git_config_output_is_read_case_blind_and_the_last_value_wins() {
        let config = GitConfig::parse(
            b"confcast.spooldir\n/a\0confcast.nats\nnats://x:1\0confcast.spooldir\n/b\0confcast.flag\0",
        );
        assert_eq!(config.get(config_keys::SPOOL_DIR), Some("/b"));
        assert_eq!(config.get(config_keys::NATS), Some("nats://x:1"));
        assert_eq!(config.get("confcast.flag"), None, "no value is no setting");
        assert_eq!(config.get(config_keys::REPO), None);
    }

    #[test]
    fn defaults_fill_what_is_not_set() {
        let settings = Settings::from_config(|_| None, Path::new("/srv/git/master.git"));
        assert_eq!(settings.bus.nats_url, DEFAULT_NATS_URL);
        assert_eq!(settings.bus.replicas, 1);
        assert_eq!(settings.repo_name, "master");
        assert_eq!(settings.spool_dir, Path::new("/srv/git/master.git/confcast/spool"));
        assert_eq!(settings.timeout, DEFAULT_HOOK_TIMEOUT);
        assert_eq!(settings.wait_rollout, None);
        assert!(settings.rollout_domains.is_empty());
    }

    #[test]
    fn settings_read_their_keys() {
        let config = GitConfig::parse(
            b"confcast.repo\nmain\0confcast.timeoutms\n200\0confcast.waitrollout\n1.5\0\
              confcast.rolloutdomains\ndc1, ,dc2\0confcast.replicas\n3\0confcast.natsuser\nhook\0",
        );
        let settings = Settings::from_config(|key| config.get(key).map(str::to_owned), Path::new("/x.git"));
        assert_eq!(settings.repo_name, "main");
        assert_eq!(settings.timeout, Duration::from_millis(200));
        assert_eq!(settings.wait_rollout, Some(Duration::from_millis(1500)));
        assert_eq!(settings.rollout_domains, ["dc1", "dc2"]);
        assert_eq!(settings.bus.replicas, 3);
        assert_eq!(settings.bus.auth.user.as_deref(), Some("hook"));
        let flags = NatsAuth { token_file: Some("/t".into()), ..NatsAuth::default() };
        let bus = settings.bus_with(Some("nats://other:4222".into()), flags);
        assert_eq!((bus.nats_url.as_str(), bus.auth.user, bus.replicas), ("nats://other:4222", None, 3));
    }
}
