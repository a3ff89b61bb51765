//! A datacenter's bus as a relay that rolls a commit out in waves leaves it, written by
//! the test itself: the streams, the git objects of a service's commits on the state
//! stream, snapshots by objects, staged updates and rollout states. No relay runs, so
//! what the hosts do depends on nothing but these messages.

use std::collections::BTreeMap;
use std::path::Path;

use confcast_schemas::rollout::{Phase, Policy, RolloutState, Wave};
use confcast_schemas::{encode, streams, subject, ChangeKind, Entry, FileMode, Kind, ServiceHead, ServiceUpdate};
use serde_bytes::ByteBuf;

use crate::bus::block_on;
use crate::git::git;
use crate::nats::NatsServer;

/// The datacenter every staged test uses.
pub const DC: &str = "dc1";
/// The service every staged test uses.
pub const SERVICE: &str = "service0";
/// The ref its commits are announced on.
pub const REF: &str = "refs/heads/services/service0/master";

/// A commit of the service: its id, its tree and every git object of the tree (id and
/// raw content, as the relay stores them).
#[derive(Debug, Clone)]
pub struct Commit {
    /// The commit id.
    pub id: String,
    /// Its tree id.
    pub tree: String,
    /// The content of `app.conf`, its only file.
    pub app_conf: String,
    /// The blob id of `app.conf`.
    pub blob: String,
    objects: Vec<(String, Vec<u8>)>,
}

/// A nats-server with the streams of [`DC`], and a scratch repository whose commits
/// the test publishes as the relay would.
#[derive(Debug)]
pub struct StagedBus {
    /// The server.
    pub nats: NatsServer,
    repo: tempfile::TempDir,
}

impl StagedBus {
    /// Starts the server and creates the datacenter's streams.
    pub fn start() -> StagedBus {
        let nats = NatsServer::start();
        let url = nats.url();
        block_on(async {
            let js = async_nats::jetstream::new(async_nats::connect(&url).await.expect("connect"));
            for config in [streams::updates(DC), streams::state(DC), streams::status(DC)] {
                js.get_or_create_stream(config).await.expect("stream");
            }
            js.create_object_store(streams::blobs(DC)).await.expect("blob store");
        });
        let repo = tempfile::tempdir().expect("tempdir");
        git(repo.path(), &["init", "-q"]);
        StagedBus { nats, repo }
    }

    /// The server's URL.
    pub fn url(&self) -> String {
        self.nats.url()
    }

    /// Commits `app.conf` with `content` in the scratch repository, and publishes the
    /// objects of its tree on the state stream.
    pub fn commit(&self, content: &str) -> Commit {
        let dir = self.repo.path();
        std::fs::write(dir.join("app.conf"), content).expect("write app.conf");
        git(dir, &["add", "-A"]);
        git(dir, &["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", content]);
        let id = git(dir, &["rev-parse", "HEAD"]);
        let tree = git(dir, &["rev-parse", "HEAD^{tree}"]);
        let blob = git(dir, &["rev-parse", "HEAD:app.conf"]);
        let objects = [(tree.clone(), "tree"), (blob.clone(), "blob")]
            .into_iter()
            .map(|(object, kind)| (object.clone(), raw_object(dir, kind, &object)))
            .collect();
        let commit = Commit { id, tree, app_conf: content.to_owned(), blob, objects };
        for (object, content) in &commit.objects {
            self.publish(&subject::object_subject(DC, Kind::Service, SERVICE, object), content.clone());
        }
        commit
    }

    /// Publishes the snapshot by objects of `commit` (staged or not) and its head on the
    /// state stream.
    pub fn snapshot(&self, commit: &Commit, staged: bool) {
        let snapshot = ServiceUpdate {
            v: confcast_schemas::SNAPSHOT_BY_OBJECTS,
            snapshot: true,
            entries: Vec::new(),
            staged,
            ..update(None, commit)
        };
        self.publish(&subject::snapshot_subject(DC, Kind::Service, SERVICE), encode(&snapshot));
        let head = ServiceHead {
            v: confcast_schemas::WIRE_VERSION,
            kind: Kind::Service,
            name: SERVICE.into(),
            ref_name: REF.into(),
            branch: "master".into(),
            version: "latest".into(),
            commit: Some(commit.id.clone()),
            tree: Some(commit.tree.clone()),
            about: None,
        };
        self.publish(&subject::head_subject(DC, Kind::Service, SERVICE), encode(&head));
    }

    /// Publishes the diff from `from` to `to`, staged, on the update stream, after the
    /// staged snapshot of `to` (the relay's order).
    pub fn staged_update(&self, from: &Commit, to: &Commit) {
        self.snapshot(to, true);
        let entry = Entry {
            path: ByteBuf::from(b"app.conf".to_vec()),
            change: ChangeKind::Modify,
            mode: Some(FileMode::Regular),
            blob: Some(to.blob.clone()),
            content: Some(ByteBuf::from(to.app_conf.as_bytes().to_vec())),
            object: None,
            from_path: None,
        };
        let diff = ServiceUpdate { entries: vec![entry], staged: true, ..update(Some(from), to) };
        self.publish(&subject::update_subject(DC, Kind::Service, SERVICE), encode(&diff));
    }

    /// Publishes the rollout state of `commit` (after `previous`) in `phase`, its waves
    /// `waves`, the current one `wave`.
    pub fn rollout(&self, commit: &Commit, previous: &Commit, waves: &[&[&str]], wave: usize, phase: Phase) {
        let state = rollout_state(commit, previous, waves, wave, phase);
        self.publish(&subject::rollout_subject(DC, Kind::Service, SERVICE), encode(&state));
    }

    /// Publishes `commit`'s whole tree, not staged and with its files inline, as the
    /// snapshot and then an update of `service`: a service without a rollout policy.
    pub fn plain(&self, service: &str, commit: &Commit) {
        let entry = Entry {
            path: ByteBuf::from(b"app.conf".to_vec()),
            change: ChangeKind::Add,
            mode: Some(FileMode::Regular),
            blob: Some(commit.blob.clone()),
            content: Some(ByteBuf::from(commit.app_conf.as_bytes().to_vec())),
            object: None,
            from_path: None,
        };
        let whole = ServiceUpdate {
            name: service.into(),
            ref_name: format!("refs/heads/services/{service}/master"),
            snapshot: true,
            entries: vec![entry],
            ..update(None, commit)
        };
        self.publish(&subject::snapshot_subject(DC, Kind::Service, service), encode(&whole));
        self.publish(&subject::update_subject(DC, Kind::Service, service), encode(&whole));
    }

    fn publish(&self, subject: &str, payload: Vec<u8>) {
        crate::bus::publish_raw(&self.url(), subject, payload);
    }
}

/// An update of the service to `to`, from `from`, with no entries yet.
fn update(from: Option<&Commit>, to: &Commit) -> ServiceUpdate {
    ServiceUpdate {
        v: confcast_schemas::WIRE_VERSION,
        dc: DC.into(),
        kind: Kind::Service,
        name: SERVICE.into(),
        ref_name: REF.into(),
        branch: "master".into(),
        version: "latest".into(),
        from: from.map(|c| c.id.clone()),
        to: Some(to.id.clone()),
        tree: Some(to.tree.clone()),
        snapshot: false,
        entries: Vec::new(),
        event_seq: 0,
        pushed_at_ms: 0,
        published_at_ms: 0,
        staged: false,
    }
}

/// The rollout state a relay writes for `commit` of the service.
fn rollout_state(commit: &Commit, previous: &Commit, waves: &[&[&str]], wave: usize, phase: Phase) -> RolloutState {
    let unhealthy: BTreeMap<String, String> = match phase {
        Phase::Halted => {
            waves.iter().flat_map(|w| w.iter()).map(|h| (h.to_string(), "probe failed".to_owned())).take(1).collect()
        }
        _ => BTreeMap::new(),
    };
    RolloutState {
        v: confcast_schemas::WIRE_VERSION,
        dc: DC.into(),
        kind: Kind::Service,
        name: SERVICE.into(),
        ref_name: REF.into(),
        commit: commit.id.clone(),
        tree: Some(commit.tree.clone()),
        previous: Some(previous.id.clone()),
        previous_tree: Some(previous.tree.clone()),
        policy: Policy {
            waves: (1..waves.len()).map(|i| Wave::Hosts(i as u32)).chain([Wave::Percent("100%".into())]).collect(),
            bake_secs: 60,
            max_unhealthy: 0,
            report_timeout_secs: 60,
        },
        waves: waves.iter().map(|w| w.iter().map(|h| h.to_string()).collect()).collect(),
        wave,
        wave_started_ms: 1,
        healthy_since_ms: None,
        phase,
        started: true,
        reason: None,
        unhealthy,
        started_ms: 1,
        updated_ms: 1,
    }
}

/// The raw content of a git object, as `git cat-file <kind>` gives it.
fn raw_object(repo: &Path, kind: &str, object: &str) -> Vec<u8> {
    let out = std::process::Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(["cat-file", kind, object])
        .output()
        .expect("git cat-file runs");
    assert!(out.status.success(), "git cat-file {kind} {object}");
    out.stdout
}
