//! What a subscriber needs to run ([`Config`]): what `main.rs` reads from its flags, and
//! what a process running several subscribers shares between them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use confcast_schemas::connect::NatsAuth;
use confcast_schemas::ServiceId;

use crate::api::{Listen, ListenOptions};
use crate::exec::Notify;
use crate::materialize::{Flushes, Layout};
use crate::perms::PermsConfig;
use crate::selection::Selection;

/// What a subscriber needs to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// NATS URL of the datacenter's server.
    pub nats_url: String,
    /// The datacenter.
    pub dc: String,
    /// The services to follow.
    pub selection: Selection,
    /// Where `<dir>/<service>` links are kept.
    pub dir: PathBuf,
    /// Where trees and the position live.
    pub state_dir: PathBuf,
    /// What to run after a change.
    pub notify: Notify,
    /// Host id used in status reports.
    pub host_id: String,
    /// Where to serve the host's configuration as JSON (`--listen`), if anywhere.
    pub listen: Option<Listen>,
    /// How `--listen` is exposed (remote TCP allowed, the unix socket's mode and group).
    pub listen_options: ListenOptions,
    /// How often the applied trees are re-hashed and compared with what was applied
    /// (besides once at start); `None` disables the periodic check.
    pub verify_interval: Option<Duration>,
    /// NATS credentials and TLS.
    pub nats_auth: NatsAuth,
    /// Public keys whose signatures are accepted; empty: signatures are not checked.
    pub trusted_keys: Vec<String>,
    /// Upper bound of the random delay before `--exec` runs for a change.
    pub splay: Duration,
    /// At most this many hosts of the datacenter run their exec for the same change at
    /// once (coordinated through NATS); `None`: no limit.
    pub max_parallel: Option<usize>,
    /// Owner, group and modes of each service's files (`--owner`, `--group`,
    /// `--file-mode`, `--dir-mode`).
    pub perms: PermsConfig,
    /// The flushes of the file systems trees are built on: `Flushes::default()` for a
    /// subscriber alone in its process; subscribers of one process given clones of the
    /// same wait for one `syncfs` together when they build at once.
    pub flushes: Flushes,
}

impl Config {
    /// `<state-dir>/position.json`.
    pub fn position_path(&self) -> PathBuf {
        self.state_dir.join(crate::position::FILE)
    }

    /// Where the trees of `id` live and where it is exposed, with its owners and modes.
    pub fn layout(&self, id: &ServiceId) -> Layout {
        layout(&self.dir, &self.state_dir, &self.perms, id)
    }
}

/// The layout of `id` for a subscriber with these `--dir`, `--state-dir` and perms.
pub fn layout(dir: &Path, state_dir: &Path, perms: &PermsConfig, id: &ServiceId) -> Layout {
    Layout::for_service(dir, state_dir, id).with_perms(perms.for_service(&id.name))
}
