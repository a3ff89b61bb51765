//! The set-up the tree-size and bootstrap scenarios share: a `nats-server` with its
//! monitoring port, a master whose datacenter `dc0` pins `service0`, a synthetic
//! `service0` of N files (see [`crate::synthetic`]) with a chain of one-line changes
//! ready to push, the master served by `git daemon`, and `dc0`'s relay fetching over
//! `git://`.

use std::time::Duration;

use confcast_tests::{free_port, wait_for, GitDaemon, Master, NatsServer, Relay, Subscriber};

use crate::latency::dc_doc;
use crate::observe::exec_seen;
use crate::synthetic::{self, Import};

/// How long a host may take to bootstrap a large service on a busy machine.
pub(crate) const BOOTSTRAP_TIMEOUT: Duration = Duration::from_secs(600);

/// Configuration `big`: `service0` on its master branch.
const PINS_SERVICE0: &str = r#"{"services":[{"name":"service0","branch":"master"}]}"#;

/// One datacenter serving one synthetic service; every process is stopped on drop.
pub(crate) struct Stage {
    pub(crate) nats: NatsServer,
    /// `nats-server`'s monitoring port (`/varz`).
    pub(crate) monitor: u16,
    pub(crate) master: Master,
    pub(crate) relay: Relay,
    /// The commit of the whole tree, pushed.
    pub(crate) first: String,
    /// The one-line changes after it, not pushed yet.
    pub(crate) changes: Vec<String>,
    /// More one-line changes after those, to push without the hooks.
    pub(crate) plain: Vec<String>,
    _daemon: GitDaemon,
}

impl Stage {
    /// A datacenter whose `service0` has `files` files, with `changes` one-line changes
    /// and `plain` more ready; returns once the relay runs (a host's first exec, or
    /// [`Stage::wait_published`], says it has published).
    pub(crate) fn new(files: usize, changes: usize, plain: usize) -> Stage {
        let monitor = free_port();
        let nats = NatsServer::start_with(&["-m", &monitor.to_string()], &[]);
        let master = Master::new(&nats.url());
        master.configuration("big", PINS_SERVICE0);
        master.datacenter("dc0", dc_doc());
        let mut import = Import::new();
        let root = import.tree("refs/heads/services/service0/master", files);
        let chain = import.one_line_changes("refs/bench/service0", root, files, changes + plain);
        let ids = import.run(&master.work);
        let first = ids[root - 1].clone();
        synthetic::push(&master, "service0", &first);
        let daemon = GitDaemon::start(&master.bare);
        let relay = Relay::start_url(&nats.url(), "dc0", &daemon.url("master.git"));
        let mut changes: Vec<String> = chain.iter().map(|mark| ids[mark - 1].clone()).collect();
        let plain = changes.split_off(changes.len() - plain);
        Stage { nats, monitor, master, relay, first, changes, plain, _daemon: daemon }
    }

    /// Starts a host following `service0` (trees verified only at start).
    pub(crate) fn host(&self) -> Subscriber {
        Subscriber::start(&self.nats.url(), "dc0", &["--service", "service0", "--verify-interval-secs", "0"])
    }

    /// Starts a host and waits for its first exec, of the first commit or a later one
    /// given as `commit`.
    pub(crate) fn host_at(&self, commit: &str) -> Subscriber {
        let host = self.host();
        exec_seen(&host, "service0", commit, BOOTSTRAP_TIMEOUT).expect("the host bootstraps");
        host
    }

    /// Waits until the relay says (in its log) that it published `commit`.
    pub(crate) fn wait_published(&self, commit: &str) {
        let needle = format!("to={commit}");
        wait_for(BOOTSTRAP_TIMEOUT, "the relay to publish", || self.relay.log().contains(&needle).then_some(()));
    }

    /// The relay's process id.
    pub(crate) fn relay_pid(&self) -> u32 {
        self.relay.pid().expect("the relay runs")
    }
}
