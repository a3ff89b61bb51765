// Over 500 lines with its unit tests; the mirror itself is under 500: one concern, kept whole.
//! The relay's bare mirror of the master, kept with gix.
//!
//! The mirror only ever holds the refs its datacenter depends on. A fetch names exactly
//! those refs, negotiates with the master, and receives only the objects the mirror
//! lacks; refs that vanished from the master are deleted here too. All calls block
//! (gix's network client is blocking): the relay runs them in `spawn_blocking`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::Arc;

use confcast_schemas::FileMode;
use gix::bstr::ByteSlice;
use gix::objs::tree::EntryKind;

use crate::diff::{Item, Listing};
use crate::resolve::RefSource;

mod narrow;
mod tidy;
mod transport;

use tidy::{remove_stale_locks, PACK_REFS_AT};

/// Failures of the mirror, and of the master it is fetched from.
#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    /// `--master` is not a URL or path git understands.
    #[error("--master {url}: {}", confcast_schemas::process::error_chain(source))]
    Url {
        /// The URL as given (credentials redacted).
        url: String,
        /// Why it does not parse.
        source: gix::Error,
    },
    /// `--master` names a transport the relay cannot fetch with.
    #[error(
        "--master {url}: unsupported scheme `{scheme}` (use a path, file://, git://, ssh://, http:// or https://)"
    )]
    Scheme {
        /// The URL as given (credentials redacted).
        url: String,
        /// Its scheme.
        scheme: String,
    },
    /// `--master` is a local path with no git repository there.
    #[error("--master {}: {}", path.display(), confcast_schemas::process::error_chain(source))]
    NotARepository {
        /// The path.
        path: PathBuf,
        /// What opening it said.
        source: gix::Error,
    },
    /// The token of `--git-token-file` cannot be used.
    #[error("--git-token-file {}", path.display())]
    Token {
        /// The file.
        path: PathBuf,
        /// Why it cannot be read.
        #[source]
        source: std::io::Error,
    },
    /// The file of `--git-token-file` holds no token.
    #[error("--git-token-file {}: empty", path.display())]
    EmptyToken {
        /// The file.
        path: PathBuf,
    },
    /// Talking to the master failed.
    #[error("fetching from {url}: {}", confcast_schemas::process::error_chain(source))]
    Fetch {
        /// The master's URL (credentials redacted).
        url: String,
        /// What gix said, with its causes and their classification.
        source: gix::Error,
    },
    /// A fetch did not finish in time (the worker is abandoned; `git://` sockets time
    /// out by themselves).
    #[error("fetching from {url}: did not finish within {limit:?}")]
    Timeout {
        /// The master's URL (credentials redacted).
        url: String,
        /// How long it was given.
        limit: std::time::Duration,
    },
    /// The local repository could not be read or written.
    #[error("mirror {}: {}", path.display(), confcast_schemas::process::error_chain(source))]
    Local {
        /// The mirror's path.
        path: PathBuf,
        /// What gix said.
        source: gix::Error,
    },
    /// A fetch's worker thread failed.
    #[error("mirror {}: fetch worker failed", path.display())]
    Worker {
        /// The mirror's path.
        path: PathBuf,
        /// How it ended.
        #[source]
        source: tokio::task::JoinError,
    },
}

impl MirrorError {
    /// Whether a retry may succeed. A master that is unreachable, busy, or refusing the
    /// relay's credentials may come back or be fixed on its side: yes. A `--master` that
    /// cannot name a repository, or a transport gix does not have, never works: no. A
    /// local repository that cannot be read is retried, since a disk can come back.
    pub fn is_transient(&self) -> bool {
        match self {
            MirrorError::Url { .. }
            | MirrorError::Scheme { .. }
            | MirrorError::NotARepository { .. }
            | MirrorError::Token { .. }
            | MirrorError::EmptyToken { .. } => false,
            MirrorError::Fetch { source, .. } => !(source.is_unsupported() || source.is_validation()),
            MirrorError::Timeout { .. } | MirrorError::Local { .. } | MirrorError::Worker { .. } => true,
        }
    }
}

/// Checks, without touching the network, that `url` can name a master: it parses, its
/// transport is one the relay has, and a local path holds a git repository. What this
/// refuses can never work, so the relay refuses to start with it.
pub fn check_master(url: &str) -> Result<(), MirrorError> {
    let shown = confcast_schemas::connect::redact_url(url);
    let parsed =
        gix::url::parse(url.as_bytes().as_bstr()).map_err(|source| MirrorError::Url { url: shown.clone(), source })?;
    match parsed.scheme {
        gix::url::Scheme::Git | gix::url::Scheme::Ssh | gix::url::Scheme::Http | gix::url::Scheme::Https => Ok(()),
        gix::url::Scheme::File => {
            let path = PathBuf::from(parsed.path.to_str_lossy().into_owned());
            match gix::open_opts(&path, gix::open::Options::isolated()) {
                Ok(_) => Ok(()),
                Err(source) => Err(MirrorError::NotARepository { path, source }),
            }
        }
        other => Err(MirrorError::Scheme { url: shown, scheme: other.as_str().to_owned() }),
    }
}

/// Index slots of the mirror's object store (each pack index takes one).
const OBJECT_STORE_SLOTS: u16 = 1024;

/// What a fetch found on the master.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Fetched {
    /// Refs that exist on the master and are now current in the mirror.
    pub present: BTreeSet<String>,
    /// Refs asked for that the master does not have (deleted from the mirror).
    pub missing: BTreeSet<String>,
}

/// How the relay authenticates to the master, when its transport needs it. Secrets
/// are read from files and live only in memory (as configuration overrides of the
/// mirror's repository handle): never written to the mirror's config, never printed.
#[derive(Clone, Default)]
pub struct GitCredentials {
    /// Private key for `ssh://` masters (`ssh -i KEY -o IdentitiesOnly=yes`).
    pub ssh_key: Option<PathBuf>,
    /// Token for `http(s)://` masters: sent as `Authorization: Bearer TOKEN`, or as
    /// basic authentication with [`GitCredentials::http_user`].
    pub token: Option<String>,
    /// User name for basic authentication with the token as password.
    pub http_user: Option<String>,
}

impl std::fmt::Debug for GitCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GitCredentials")
            .field("ssh_key", &self.ssh_key.is_some())
            .field("token", &self.token.is_some())
            .field("http_user", &self.http_user)
            .finish()
    }
}

impl GitCredentials {
    /// Reads the token from `path` (its first line, trimmed).
    pub fn read_token(path: &Path) -> Result<String, MirrorError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| MirrorError::Token { path: path.to_owned(), source })?;
        let token = text.lines().next().unwrap_or_default().trim().to_owned();
        if token.is_empty() {
            return Err(MirrorError::EmptyToken { path: path.to_owned() });
        }
        Ok(token)
    }

    /// The configuration that makes gix use these credentials.
    fn overrides(&self) -> Vec<String> {
        use base64::Engine as _;
        // A relay runs unattended: never ask a terminal for a user name or password.
        let mut overrides = vec!["gitoxide.credentials.terminalPrompt=false".to_owned()];
        if let Some(key) = &self.ssh_key {
            let quoted = key.display().to_string().replace('\'', r"'\''");
            overrides.push(format!("core.sshCommand=ssh -i '{quoted}' -o IdentitiesOnly=yes -o BatchMode=yes"));
        }
        if let Some(token) = &self.token {
            let header = match &self.http_user {
                Some(user) => {
                    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{token}")))
                }
                None => format!("Bearer {token}"),
            };
            overrides.push(format!("http.extraHeader=Authorization: {header}"));
        }
        overrides
    }
}

/// A bare mirror of the master at `path`, fetching from `url`.
#[derive(Debug, Clone)]
pub struct Mirror {
    repo: gix::ThreadSafeRepository,
    path: PathBuf,
    url: String,
    /// The URL as messages show it: credentials redacted.
    shown: String,
    io_timeout: std::time::Duration,
    /// The HTTP client of `http(s)://` fetches, kept between them.
    http: transport::HttpClient,
    /// Refs written by fetches since the refs were last packed ([`tidy`]).
    loose_refs: Arc<AtomicUsize>,
    /// The repository a fetch of refs the mirror has runs in ([`narrow`]).
    narrow: gix::ThreadSafeRepository,
}

/// How long a fetch may wait on the network before it fails, unless configured.
pub const DEFAULT_IO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

impl Mirror {
    /// Opens the mirror, creating an empty bare repository on first use.
    pub fn open_or_init(path: &Path, url: &str, credentials: &GitCredentials) -> Result<Mirror, MirrorError> {
        let local = |source| MirrorError::Local { path: path.to_owned(), source };
        if !path.join("HEAD").exists() {
            std::fs::create_dir_all(path).map_err(|e| local(gix::Error::from_error(e)))?;
            gix::init_bare(path).map_err(|e| local(gix::Error::from_error(e)))?;
        }
        remove_stale_locks(path);
        // Every fetch adds a pack. A handle computes its index slots when it opens, so a
        // long-running relay would run out of them: give it room, and repack (see
        // `consolidate`) long before it is used up.
        let options = gix::open::Options::default()
            .object_store_slots(gix::odb::store::init::Slots::Given(OBJECT_STORE_SLOTS))
            .config_overrides(credentials.overrides());
        let narrow = narrow::open(path, options.clone()).map_err(local)?;
        let repo = gix::open_opts(path, options).map_err(|e| local(gix::Error::from_error(e)))?;
        Ok(Mirror {
            narrow,
            repo: repo.into_sync(),
            path: path.to_owned(),
            url: url.to_owned(),
            shown: confcast_schemas::connect::redact_url(url),
            io_timeout: DEFAULT_IO_TIMEOUT,
            http: transport::HttpClient::default(),
            // A mirror opened may hold loose refs from an earlier life: tidy after the first fetch.
            loose_refs: Arc::new(AtomicUsize::new(PACK_REFS_AT)),
        })
    }

    /// The master's URL as messages show it (credentials redacted).
    pub fn shown_url(&self) -> &str {
        &self.shown
    }

    /// [`Mirror::fetch`] off the async runtime, failing after `limit` even if the
    /// transport hangs.
    pub async fn fetch_within(
        &self,
        refs: BTreeSet<String>,
        limit: std::time::Duration,
    ) -> Result<Fetched, MirrorError> {
        let mirror = self.clone();
        match tokio::time::timeout(limit, tokio::task::spawn_blocking(move || mirror.fetch(&refs))).await {
            Ok(Ok(result)) => result,
            Ok(Err(e)) => Err(MirrorError::Worker { path: self.path.clone(), source: e }),
            Err(_) => Err(MirrorError::Timeout { url: self.shown.clone(), limit }),
        }
    }

    /// Sets how long a fetch may wait on the network for one read or write.
    pub fn with_io_timeout(mut self, timeout: std::time::Duration) -> Mirror {
        self.io_timeout = timeout;
        self
    }

    /// The mirror as a repository of this thread, for reading objects.
    pub(crate) fn repo(&self) -> gix::Repository {
        self.repo.to_thread_local()
    }

    /// How a failure to read the mirror is reported.
    pub(crate) fn local(&self) -> impl Fn(gix::Error) -> MirrorError + '_ {
        move |source| MirrorError::Local { path: self.path.clone(), source }
    }

    /// Brings `refs` up to date with the master in one negotiated fetch.
    pub fn fetch(&self, refs: &BTreeSet<String>) -> Result<Fetched, MirrorError> {
        let repo = self.repo.to_thread_local();
        let valid: Vec<&String> = refs.iter().filter(|r| gix::refs::FullName::try_from(r.as_str()).is_ok()).collect();
        let mut fetched = Fetched::default();
        fetched.missing.extend(refs.iter().filter(|r| !valid.contains(r)).cloned());
        if valid.is_empty() {
            return Ok(fetched);
        }
        // Refs the mirror has are fetched in the narrow repository, whose negotiation
        // reads only them; any other fetch runs in the mirror itself.
        let known = narrow::targets(&repo, valid.iter().copied()).map_err(self.local())?;
        fetched.present = if known.len() == valid.len() {
            let narrow = self.narrow.to_thread_local();
            narrow::see_packs(&narrow, &known);
            narrow::set_refs(&narrow, &known).map_err(self.local())?;
            let present = self.fetch_in(&narrow, &valid, refs)?;
            let moved: Vec<_> = narrow::targets(&narrow, &present)
                .map_err(self.local())?
                .into_iter()
                .filter(|target| !known.contains(target))
                .map(|(name, id)| narrow::update(name, id))
                .collect();
            repo.edit_references(moved).map_err(self.local())?;
            narrow::set_refs(&narrow, &[]).map_err(self.local())?;
            present
        } else {
            self.fetch_in(&repo, &valid, refs)?
        };
        for name in valid {
            if !fetched.present.contains(name) {
                fetched.missing.insert(name.clone());
                self.delete_ref(&repo, name)?;
            }
        }
        self.consolidate(fetched.present.len());
        Ok(fetched)
    }

    /// Fetches `valid` (the valid names of `refs`) into `repo`, the mirror or its narrow
    /// repository, and says which `refs` exist on the master.
    fn fetch_in(
        &self,
        repo: &gix::Repository,
        valid: &[&String],
        refs: &BTreeSet<String>,
    ) -> Result<BTreeSet<String>, MirrorError> {
        let remote_err = |source: gix::Error| MirrorError::Fetch { url: self.shown.clone(), source };
        let specs: Vec<String> = valid.iter().map(|r| format!("+{r}:{r}")).collect();
        let remote = repo
            .remote_at(self.url.as_str())
            .map_err(remote_err)?
            .with_refspecs(specs.iter().map(String::as_str), gix::remote::Direction::Fetch)
            .map_err(remote_err)?;
        let mut client = self.http.lend();
        let received = match transport::open(&remote, self.io_timeout, &mut client).map_err(remote_err)? {
            Some(transport) => self.receive(remote.to_connection_with_transport(transport), refs),
            None => self.receive(remote.connect(gix::remote::Direction::Fetch).map_err(remote_err)?, refs),
        };
        received.inspect_err(|_| client.discard())
    }

    /// Negotiates over `connection`, receives the pack, and says which `refs` exist.
    fn receive<T>(
        &self,
        connection: gix::remote::Connection<'_, '_, '_, T>,
        refs: &BTreeSet<String>,
    ) -> Result<BTreeSet<String>, MirrorError>
    where
        T: gix::protocol::transport::client::blocking_io::Transport,
    {
        let remote_err = |source: gix::Error| MirrorError::Fetch { url: self.shown.clone(), source };
        let prepare = connection.prepare_fetch(gix::progress::Discard, Default::default()).map_err(remote_err)?;
        let present: BTreeSet<String> = prepare
            .ref_map()
            .mappings
            .iter()
            .filter_map(|m| m.remote.as_name())
            .map(|name| name.to_str_lossy().into_owned())
            .filter(|name| refs.contains(name))
            .collect();
        if !present.is_empty() {
            prepare.receive(gix::progress::Discard, &AtomicBool::new(false)).map_err(remote_err)?;
        }
        Ok(present)
    }

    fn delete_ref(&self, repo: &gix::Repository, name: &str) -> Result<(), MirrorError> {
        if repo.try_find_reference(name).map_err(self.local())?.is_none() {
            return Ok(());
        }
        let name = name.try_into().map_err(|e: gix::validate::reference::name::Error| MirrorError::Local {
            path: self.path.clone(),
            source: gix::Error::from_error(e),
        })?;
        repo.edit_reference(narrow::delete(name)).map_err(self.local())?;
        Ok(())
    }

    /// The tree id of a commit.
    pub fn tree_of(&self, commit: &gix::oid) -> Result<gix::ObjectId, MirrorError> {
        let repo = self.repo.to_thread_local();
        let tree = repo.find_object(commit).map_err(self.local())?.peel_to_tree().map_err(self.local())?;
        Ok(tree.id)
    }

    /// A commit's subject line, author (`Name <email>`) and author time (seconds since
    /// the Unix epoch), as people know it.
    pub fn about(&self, commit: &gix::oid) -> Result<(String, String, i64), MirrorError> {
        let repo = self.repo.to_thread_local();
        let object = repo.find_object(commit).map_err(self.local())?;
        let decoded = gix::objs::CommitRef::from_bytes(&object.data, commit.kind()).map_err(self.local())?;
        let author = decoded.author().map_err(self.local())?;
        let subject = decoded.message().summary().to_string();
        Ok((subject, format!("{} <{}>", author.name.to_string().trim(), author.email), author.seconds()))
    }

    /// Every blob and symlink of a commit's tree. Submodule entries (gitlinks) carry no
    /// content and are skipped.
    pub fn listing(&self, commit: &gix::oid) -> Result<Listing, MirrorError> {
        let repo = self.repo.to_thread_local();
        let tree = repo.find_object(commit).map_err(self.local())?.peel_to_tree().map_err(self.local())?;
        let mut recorder = gix::traverse::tree::Recorder::default();
        tree.traverse().breadthfirst(&mut recorder).map_err(self.local())?;
        let mut listing = Listing::new();
        for record in recorder.records {
            let mode = match record.mode.kind() {
                EntryKind::Blob => FileMode::Regular,
                EntryKind::BlobExecutable => FileMode::Executable,
                EntryKind::Link => FileMode::Symlink,
                EntryKind::Tree | EntryKind::Commit => continue,
            };
            listing.insert(record.filepath.into(), Item { mode, blob: record.oid });
        }
        Ok(listing)
    }

    /// The content of any object (a blob or a tree), as git stores it.
    pub(crate) fn object(&self, id: &gix::oid) -> Result<Vec<u8>, MirrorError> {
        let repo = self.repo.to_thread_local();
        let data = repo.find_object(id).map_err(self.local())?.detach().data;
        Ok(data)
    }

    /// A blob's content.
    pub fn blob(&self, blob: &gix::oid) -> Result<Vec<u8>, MirrorError> {
        let repo = self.repo.to_thread_local();
        let data = repo.find_blob(blob).map_err(self.local())?.detach().data;
        Ok(data)
    }
}

impl RefSource for Mirror {
    fn commit_of(&self, ref_name: &str) -> Result<Option<gix::ObjectId>, MirrorError> {
        if gix::refs::FullName::try_from(ref_name).is_err() {
            return Ok(None); // git cannot hold such a ref, so it does not exist
        }
        let repo = self.repo.to_thread_local();
        let Some(mut reference) = repo.try_find_reference(ref_name).map_err(self.local())? else {
            return Ok(None);
        };
        let id = reference.peel_to_id().map_err(self.local())?;
        let object = repo.find_object(id).map_err(self.local())?;
        let commit = match object.peel_to_kind(gix::object::Kind::Commit) {
            Ok(commit) => Some(commit.id),
            // A tag of a tree or blob is not a configuration version.
            Err(_) => None,
        };
        Ok(commit)
    }

    fn root_file(&self, commit: &gix::ObjectId, file: &str) -> Result<Option<Vec<u8>>, MirrorError> {
        let repo = self.repo.to_thread_local();
        let tree = repo.find_object(*commit).and_then(|o| o.peel_to_tree()).map_err(self.local())?;
        let Some(entry) = tree.find_entry(file) else {
            return Ok(None);
        };
        if !entry.mode().is_blob() {
            return Ok(None);
        }
        let blob = repo.find_blob(entry.object_id()).map_err(self.local())?;
        Ok(Some(blob.detach().data))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn locks_left_by_a_killed_fetch_are_removed_when_the_mirror_opens() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("mirror.git");
        Mirror::open_or_init(&path, "/nonexistent", &GitCredentials::default()).expect("mirror");
        std::fs::create_dir_all(path.join("refs/heads/services/s0")).expect("dirs");
        let stale = [path.join("refs/heads/services/s0/master.lock"), path.join("packed-refs.lock")];
        for lock in &stale {
            std::fs::write(lock, "").expect("lock");
        }
        Mirror::open_or_init(&path, "/nonexistent", &GitCredentials::default()).expect("mirror");
        for lock in &stale {
            assert!(!lock.exists(), "{} is still there", lock.display());
        }
        assert!(path.join("HEAD").exists() && path.join("refs/heads").is_dir());
    }

    #[test]
    fn credentials_become_configuration_and_are_never_shown() {
        let credentials = GitCredentials {
            ssh_key: Some("/keys/it's.key".into()),
            token: Some("t0ken".into()),
            http_user: Some("relay".into()),
        };
        let overrides = credentials.overrides();
        assert!(overrides.contains(&"gitoxide.credentials.terminalPrompt=false".to_owned()));
        assert!(
            overrides.iter().any(|o| o.starts_with("core.sshCommand=ssh -i '/keys/it'\\''s.key'")),
            "{overrides:?}"
        );
        // base64("relay:t0ken")
        assert!(overrides.contains(&"http.extraHeader=Authorization: Basic cmVsYXk6dDBrZW4=".to_owned()));
        let bearer = GitCredentials { token: Some("t0ken".into()), ..Default::default() }.overrides();
        assert!(bearer.contains(&"http.extraHeader=Authorization: Bearer t0ken".to_owned()));
        assert!(!format!("{credentials:?}").contains("t0ken"));
    }

    #[test]
    fn a_master_that_can_never_work_is_refused_before_any_fetch() {
        let dir = tempfile::tempdir().expect("tempdir");
        let master = dir.path().join("master.git");
        git(dir.path(), &["init", "-q", "--bare", master.to_str().expect("utf-8")]);
        check_master(master.to_str().expect("utf-8")).expect("a bare repository");
        check_master(&format!("file://{}", master.display())).expect("as a file:// URL");
        // The network is not touched: whether these answer is for the fetch to find out.
        for url in ["git://127.0.0.1:1/master.git", "ssh://git@git.example/master.git", "https://git.example/m.git"] {
            check_master(url).unwrap_or_else(|e| panic!("{url}: {e}"));
        }

        let missing = check_master("/no/such/path").expect_err("nothing there");
        assert!(!missing.is_transient());
        let message = missing.to_string();
        assert!(message.starts_with("--master /no/such/path: ") && !message.contains('\n'), "{message}");
        assert!(!message.contains("Message {") && !message.contains("Os {"), "no Debug dumps: {message}");
        let not_a_repository = check_master(dir.path().to_str().expect("utf-8")).expect_err("no repository");
        assert!(!not_a_repository.is_transient());

        let scheme = check_master("htp://relay:s3cret@git.example/master.git").expect_err("a typo");
        assert!(!scheme.is_transient());
        let message = scheme.to_string();
        assert!(message.contains("unsupported scheme `htp`") && !message.contains("s3cret"), "{message}");
    }

    #[test]
    fn an_unreachable_master_is_worth_retrying_and_said_in_one_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
        let url = format!("git://127.0.0.1:{port}/master.git");
        let mirror = Mirror::open_or_init(&dir.path().join("mirror.git"), &url, &Default::default()).expect("mirror");
        let error = mirror.fetch(&BTreeSet::from(["refs/heads/datacenters/dc1".to_owned()])).expect_err("refused");
        assert!(error.is_transient(), "{error}");
        let message = error.to_string();
        assert!(message.starts_with(&format!("fetching from {url}: ")) && !message.contains('\n'), "{message}");
    }

    fn git(dir: &Path, args: &[&str]) -> String {
        let out = Command::new("git").arg("-C").arg(dir).args(args).output().expect("git runs");
        assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    #[test]
    fn a_long_lived_mirror_survives_many_fetches_and_sees_deletions() {
        let dir = tempfile::tempdir().expect("tempdir");
        let master = dir.path().join("master.git");
        let work = dir.path().join("work");
        git(dir.path(), &["init", "-q", "--bare", master.to_str().expect("utf-8")]);
        git(dir.path(), &["init", "-q", work.to_str().expect("utf-8")]);
        let mirror =
            Mirror::open_or_init(&dir.path().join("mirror.git"), master.to_str().expect("utf-8"), &Default::default())
                .expect("mirror");
        let name = "refs/heads/services/s/main".to_owned();
        let refs = BTreeSet::from([name.clone()]);
        assert_eq!(mirror.fetch(&refs).expect("fetch").missing, refs, "absent on the master");

        for i in 0..(tidy::REPACK_AT * 2 + 5) {
            std::fs::write(work.join("f"), format!("{i}")).expect("write");
            git(&work, &["add", "-A"]);
            git(&work, &["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", &i.to_string()]);
            git(&work, &["push", "-q", master.to_str().expect("utf-8"), &format!("HEAD:{name}")]);
            let fetched = mirror.fetch(&refs).expect("fetch");
            assert_eq!(fetched.present, refs);
            let head = gix::ObjectId::from_hex(git(&work, &["rev-parse", "HEAD"]).as_bytes()).expect("an id");
            assert_eq!(mirror.commit_of(&name).expect("read"), Some(head), "fetch {i}");
            assert_eq!(mirror.root_file(&head, "f").expect("read"), Some(i.to_string().into_bytes()));
        }
        assert!(mirror.pack_count() < tidy::REPACK_AT, "the mirror was repacked");

        git(&work, &["push", "-q", master.to_str().expect("utf-8"), &format!(":{name}")]);
        assert_eq!(mirror.fetch(&refs).expect("fetch").missing, refs);
        assert_eq!(mirror.commit_of(&name).expect("read"), None, "deleted on the master, deleted here");
    }

    #[test]
    fn a_fetch_of_refs_the_mirror_has_reads_only_those_refs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let master = dir.path().join("master.git");
        let work = dir.path().join("work");
        let url = master.to_str().expect("utf-8");
        git(dir.path(), &["init", "-q", "--bare", url]);
        git(dir.path(), &["init", "-q", work.to_str().expect("utf-8")]);
        let commit = |i: usize| {
            std::fs::write(work.join("f"), format!("{i}")).expect("write");
            git(&work, &["add", "-A"]);
            git(&work, &["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", &i.to_string()]);
            gix::ObjectId::from_hex(git(&work, &["rev-parse", "HEAD"]).as_bytes()).expect("an id")
        };
        let names: Vec<String> = (0..3).map(|i| format!("refs/heads/services/s{i}/main")).collect();
        let first = commit(0);
        for name in &names {
            git(&work, &["push", "-q", url, &format!("HEAD:{name}")]);
        }
        let mirror = Mirror::open_or_init(&dir.path().join("mirror.git"), url, &Default::default()).expect("mirror");
        let all: BTreeSet<String> = names.iter().cloned().collect();
        assert_eq!(mirror.fetch(&all).expect("fetch").present, all, "the first fetch, in the mirror itself");

        // Refs the mirror has: fetched in the narrow repository, which keeps no ref after.
        let second = commit(1);
        git(&work, &["push", "-q", url, &format!("HEAD:{}", names[1])]);
        let one = BTreeSet::from([names[1].clone()]);
        assert_eq!(mirror.fetch(&one).expect("fetch").present, one);
        assert_eq!(mirror.commit_of(&names[1]).expect("read"), Some(second));
        assert_eq!(mirror.commit_of(&names[0]).expect("read"), Some(first), "the other refs stay");
        assert_eq!(mirror.root_file(&second, "f").expect("read"), Some(b"1".to_vec()), "the objects are the mirror's");
        let narrow = mirror.narrow.to_thread_local();
        assert_eq!(
            narrow.references().expect("refs").all().expect("refs").count(),
            0,
            "the narrow repository is empty"
        );

        // A ref the mirror lacks, beside one it has: fetched in the mirror itself.
        let third = commit(2);
        let new = "refs/heads/services/s3/main".to_owned();
        git(&work, &["push", "-q", url, &format!("HEAD:{new}"), &format!("HEAD:{}", names[2])]);
        let both = BTreeSet::from([new.clone(), names[2].clone()]);
        assert_eq!(mirror.fetch(&both).expect("fetch").present, both);
        assert_eq!(mirror.commit_of(&new).expect("read"), Some(third));
        assert_eq!(mirror.commit_of(&names[2]).expect("read"), Some(third));

        // The narrow repository sees the pack that fetch brought (its ref now points
        // into it), and refs a relay killed mid-fetch left there are cleared.
        narrow::set_refs(&narrow, &[(gix::refs::FullName::try_from(names[0].as_str()).expect("name"), first)])
            .expect("set");
        let fourth = commit(3);
        git(&work, &["push", "-q", url, &format!("HEAD:{new}")]);
        let just_new = BTreeSet::from([new.clone()]);
        assert_eq!(mirror.fetch(&just_new).expect("fetch").present, just_new);
        assert_eq!(mirror.commit_of(&new).expect("read"), Some(fourth));
        assert_eq!(narrow.references().expect("refs").all().expect("refs").count(), 0);
    }
}
