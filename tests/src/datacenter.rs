//! The set-up most tests start from, in one call: a `nats-server`, a master with hooks
//! that publishes datacenter `dc1` (by default: following configuration `big`, which
//! pins `service0` to its master branch), the relay of `dc1`, and one host, already at
//! its first commit.
//!
//! ```no_run
//! # use confcast_tests::Datacenter;
//! let dc = Datacenter::with_service0().host_flags(&["--service", "service0", "--listen", "127.0.0.1:8080"]).start();
//! let next = dc.master.on("services/service0/master").write("app.conf", "1\n").commit_push("next").commit;
//! dc.host.wait_exec("service0", &next);
//! dc.host.assert_tree(&dc.master, "service0", &next);
//! ```

use crate::master::Master;
use crate::nats::NatsServer;
use crate::relay::Relay;
use crate::subscriber::Subscriber;

/// The datacenter every [`Datacenter`] publishes and runs.
const DC: &str = "dc1";

/// A running datacenter `dc1` with its relay and one host, and the master and the bus it
/// is fed by. Fields drop (and their processes are killed) host first, bus last.
#[derive(Debug)]
pub struct Datacenter {
    /// The host: a `subscriber` of `dc1`.
    pub host: Subscriber,
    /// The relay of `dc1`, fetching from the master's path.
    pub relay: Relay,
    /// The master, its hooks publishing to `nats`.
    pub master: Master,
    /// The bus.
    pub nats: NatsServer,
    /// The commit the host ran its first exec for (service0's first commit by default).
    pub first: String,
}

impl Datacenter {
    /// A datacenter whose master holds service0 ([`Master::publish_service0`]).
    pub fn with_service0() -> DatacenterSetup<'static> {
        Datacenter::with_master(Master::publish_service0)
    }

    /// A datacenter whose master `prepare` fills (it must publish datacenter `dc1`), and
    /// returns the commit of the host's first exec.
    pub fn with_master<'a>(prepare: impl FnOnce(&Master) -> String + 'a) -> DatacenterSetup<'a> {
        DatacenterSetup {
            prepare: Box::new(prepare),
            host_flags: vec!["--service".into(), "service0".into()],
            exec_then: None,
            relay_flags: Vec::new(),
            first_exec_of: "service0".into(),
        }
    }
}

/// How [`DatacenterSetup::start`] builds a [`Datacenter`]; each option has a default.
#[must_use = "nothing runs until `start`"]
pub struct DatacenterSetup<'a> {
    prepare: Box<dyn FnOnce(&Master) -> String + 'a>,
    host_flags: Vec<String>,
    exec_then: Option<String>,
    relay_flags: Vec<String>,
    first_exec_of: String,
}

impl std::fmt::Debug for DatacenterSetup<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatacenterSetup")
            .field("host_flags", &self.host_flags)
            .field("exec_then", &self.exec_then)
            .field("relay_flags", &self.relay_flags)
            .field("first_exec_of", &self.first_exec_of)
            .finish_non_exhaustive()
    }
}

impl DatacenterSetup<'_> {
    /// The host's flags after `--dc dc1`: its selection and any other
    /// (`--service service0` unless given).
    pub fn host_flags(mut self, flags: &[&str]) -> Self {
        self.host_flags = flags.iter().map(|f| f.to_string()).collect();
        self
    }

    /// A shell command the host's `--exec` runs after logging the run; its exit status
    /// is the command's (see [`Subscriber::start_with_exec`]).
    pub fn exec_then(mut self, then: &str) -> Self {
        self.exec_then = Some(then.to_owned());
        self
    }

    /// Extra flags of the relay.
    pub fn relay_flags(mut self, flags: &[&str]) -> Self {
        self.relay_flags = flags.iter().map(|f| f.to_string()).collect();
        self
    }

    /// The service whose first exec [`DatacenterSetup::start`] waits for (`service0`
    /// unless given).
    pub fn first_exec_of(mut self, service: &str) -> Self {
        self.first_exec_of = service.to_owned();
        self
    }

    /// Starts everything, and returns once the host has run its first exec.
    pub fn start(self) -> Datacenter {
        let nats = NatsServer::start();
        let master = Master::new(&nats.url());
        let first = (self.prepare)(&master);
        let relay_flags: Vec<&str> = self.relay_flags.iter().map(String::as_str).collect();
        let relay = Relay::start_with(&nats.url(), DC, &master.bare.display().to_string(), &relay_flags);
        let host_flags: Vec<&str> = self.host_flags.iter().map(String::as_str).collect();
        let mut host = Subscriber::prepare(&nats.url(), DC, &host_flags);
        if let Some(then) = &self.exec_then {
            host = host.with_exec_then(then);
        }
        host.restart();
        host.wait_exec(&self.first_exec_of, &first);
        Datacenter { host, relay, master, nats, first }
    }
}
