//! A multi-server NATS topology on loopback, built from the example configurations in
//! `deploy/nats/`: a three-server hub cluster (JetStream domain `hub`) next to the
//! master, and one leaf-node server per datacenter with a JetStream domain of its own.
//!
//! The deploy files are the templates: their addresses (`0.0.0.0:4222`,
//! `hub-2:6222`, ...) and store directory are replaced by free loopback ports and a
//! temporary directory, and the datacenter id comes from `CONFCAST_DC` in the
//! server's environment, as in production. A substitution that finds nothing fails the
//! test, so the examples cannot drift from what is tested.
//!
//! Every leaf reaches each hub server through its own [`FaultProxy`], so a test can cut
//! a datacenter's link to the hub without touching either server. Every server can be
//! killed and restarted on the same ports with the same store.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use tempfile::TempDir;

use crate::bus::block_on;
use crate::fault::{Fault, FaultProxy};
use crate::net::{free_ports, get_monitoring};
use crate::poll::wait_for;
use crate::procs::{reap, spawn_logged};

/// How long a server may take to be ready (cluster formed, JetStream up).
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// `deploy/nats/<name>` of this repository.
pub fn deploy_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("deploy").join("nats").join(name)
}

/// Replaces every `(from, to)` in `text`; each `from` must occur.
fn substitute(file: &str, mut text: String, replacements: &[(String, String)]) -> String {
    for (from, to) in replacements {
        assert!(text.contains(from.as_str()), "{file} no longer contains {from:?}: update tests/src/topology.rs");
        text = text.replace(from.as_str(), to);
    }
    text
}

/// One `nats-server` started from a generated configuration file, killed on drop.
#[derive(Debug)]
pub struct NatsNode {
    /// Its `server_name`.
    pub name: String,
    config: PathBuf,
    env: Vec<(String, String)>,
    dir: PathBuf,
    client_port: u16,
    http_port: u16,
    child: Option<Child>,
}

impl NatsNode {
    fn new(name: &str, dir: PathBuf, config_text: String, env: Vec<(String, String)>, ports: (u16, u16)) -> NatsNode {
        fs::create_dir_all(&dir).expect("server dir");
        let config = dir.join("nats.conf");
        fs::write(&config, config_text).expect("write config");
        NatsNode { name: name.to_owned(), config, env, dir, client_port: ports.0, http_port: ports.1, child: None }
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.client_port)
    }

    /// Starts the server (again: same ports, same store), without waiting.
    pub fn spawn(&mut self) {
        self.kill();
        let mut server = Command::new("nats-server");
        server.arg("-c").arg(&self.config).envs(self.env.iter().map(|(k, v)| (k, v)));
        self.child = Some(spawn_logged(&mut server, &self.dir.join("nats.log")));
    }

    /// Whether the process has exited (a port taken between choosing it and binding it,
    /// say): the log says why.
    fn exited(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_some())
    }

    /// Waits until the server reports itself healthy (`/healthz`: JetStream enabled and,
    /// on the hub, a meta leader known).
    pub fn wait_healthy(&self) {
        wait_for(READY_TIMEOUT, &format!("{} to be healthy", self.name), || {
            let (status, body) = get_monitoring(self.http_port, "/healthz")?;
            (status == 200 && body.contains("\"ok\"")).then_some(())
        });
    }

    /// Number of leaf-node connections the server has (on a leaf: 1 while linked to the hub).
    pub fn leaf_connections(&self) -> Option<u64> {
        let (_, body) = get_monitoring(self.http_port, "/leafz").filter(|(status, _)| *status == 200)?;
        let json: serde_json::Value = serde_json::from_str(&body).ok()?;
        json["leafnodes"].as_u64()
    }

    /// SIGKILLs the server; its store stays.
    pub fn kill(&mut self) {
        reap(&mut self.child);
    }

    /// Kills and starts it again on the same ports with the same store, and waits until healthy.
    pub fn restart(&mut self) {
        self.spawn();
        self.wait_healthy();
    }

    /// The server's log.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("nats.log")).unwrap_or_default()
    }
}

impl Drop for NatsNode {
    fn drop(&mut self) {
        if std::thread::panicking() && std::env::var_os("CONFCAST_SHOW_LOGS").is_some() {
            eprintln!("--- {} log\n{}", self.name, self.log());
        }
        self.kill();
    }
}

/// A datacenter's leaf-node server and the proxies of its link to each hub server.
#[derive(Debug)]
pub struct Leaf {
    /// The datacenter id (also the server's name and JetStream domain).
    pub dc: String,
    /// The server.
    pub node: NatsNode,
    links: Vec<FaultProxy>,
}

impl Leaf {
    /// `nats://127.0.0.1:<port>` of the datacenter's server.
    pub fn url(&self) -> String {
        self.node.url()
    }

    /// Cuts the link to the hub: open connections are reset and new ones refused.
    pub fn cut(&self) {
        for link in &self.links {
            link.set(Fault::Reset);
        }
        wait_for(Duration::from_secs(10), &format!("{} to lose its link to the hub", self.dc), || {
            (self.node.leaf_connections() == Some(0)).then_some(())
        });
    }

    /// Restores the link.
    pub fn heal(&self) {
        for link in &self.links {
            link.set(Fault::Pass);
        }
    }

    /// Waits until the server is linked to the hub.
    pub fn wait_linked(&self) {
        wait_for(READY_TIMEOUT, &format!("{} to link to the hub", self.dc), || {
            (self.node.leaf_connections() >= Some(1)).then_some(())
        });
    }
}

/// The hub cluster and the datacenters' leaf servers.
#[derive(Debug)]
pub struct Topology {
    /// The three hub servers, `hub-1`..`hub-3`.
    pub hub: Vec<NatsNode>,
    /// One leaf server per datacenter.
    pub leaves: Vec<Leaf>,
    _dir: TempDir,
}

impl Topology {
    /// Starts the hub cluster and a leaf server for each of `dcs`, and waits until every
    /// server is healthy and every leaf is linked.
    pub fn start(dcs: &[&str]) -> Topology {
        // Ports are chosen free, then bound by the servers a moment later; another
        // process may take one in between. A server that exits at start is retried on
        // fresh ports.
        for attempt in 1.. {
            let mut topology = Topology::start_once(dcs);
            std::thread::sleep(Duration::from_millis(300));
            let exited: Vec<String> = topology
                .hub
                .iter_mut()
                .chain(topology.leaves.iter_mut().map(|l| &mut l.node))
                .filter_map(|n| n.exited().then(|| format!("{}: {}", n.name, n.log())))
                .collect();
            if exited.is_empty() {
                topology.wait_ready();
                return topology;
            }
            assert!(attempt < 3, "servers exited at start:\n{}", exited.join("\n"));
            eprintln!("retrying the topology on other ports; exited at start:\n{}", exited.join("\n"));
        }
        unreachable!()
    }

    fn wait_ready(&self) {
        for node in self.hub.iter().chain(self.leaves.iter().map(|l| &l.node)) {
            node.wait_healthy();
        }
        for leaf in &self.leaves {
            leaf.wait_linked();
        }
    }

    fn start_once(dcs: &[&str]) -> Topology {
        let dir = tempfile::tempdir().expect("tempdir");
        // client, route, leafnode, monitoring port of each hub server
        let hub_ports: Vec<Vec<u16>> = (0..3).map(|_| free_ports(4)).collect();
        let mut hub = Vec::new();
        for (i, ports) in hub_ports.iter().enumerate() {
            let file = format!("hub-{}.conf", i + 1);
            let template = fs::read_to_string(deploy_file(&file)).expect("deploy/nats/hub-N.conf");
            let server_dir = dir.path().join(format!("hub-{}", i + 1));
            let mut replacements = vec![
                ("0.0.0.0:4222".to_owned(), format!("127.0.0.1:{}", ports[0])),
                ("0.0.0.0:6222".to_owned(), format!("127.0.0.1:{}", ports[1])),
                ("0.0.0.0:7422".to_owned(), format!("127.0.0.1:{}", ports[2])),
                ("0.0.0.0:8222".to_owned(), format!("127.0.0.1:{}", ports[3])),
                ("/data/nats".to_owned(), server_dir.join("store").display().to_string()),
            ];
            for (j, other) in hub_ports.iter().enumerate() {
                replacements.push((format!("hub-{}:6222", j + 1), format!("127.0.0.1:{}", other[1])));
            }
            let text = substitute(&file, template, &replacements);
            hub.push(NatsNode::new(&format!("hub-{}", i + 1), server_dir, text, Vec::new(), (ports[0], ports[3])));
        }
        for node in &mut hub {
            node.spawn();
        }
        let template = fs::read_to_string(deploy_file("dc-leaf.conf")).expect("deploy/nats/dc-leaf.conf");
        let mut leaves = Vec::new();
        for dc in dcs {
            let ports = free_ports(2);
            let server_dir = dir.path().join(format!("leaf-{dc}"));
            let links: Vec<FaultProxy> = hub_ports.iter().map(|p| FaultProxy::start(p[2])).collect();
            let mut replacements = vec![
                ("0.0.0.0:4222".to_owned(), format!("127.0.0.1:{}", ports[0])),
                ("0.0.0.0:8222".to_owned(), format!("127.0.0.1:{}", ports[1])),
                ("/data/nats".to_owned(), server_dir.join("store").display().to_string()),
            ];
            for (j, link) in links.iter().enumerate() {
                replacements.push((format!("hub-{}:7422", j + 1), format!("127.0.0.1:{}", link.port())));
            }
            let text = substitute("dc-leaf.conf", template.clone(), &replacements);
            let env = vec![("CONFCAST_DC".to_owned(), (*dc).to_owned())];
            let mut node = NatsNode::new(dc, server_dir, text, env, (ports[0], ports[1]));
            node.spawn();
            leaves.push(Leaf { dc: (*dc).to_owned(), node, links });
        }
        Topology { hub, leaves, _dir: dir }
    }

    /// The hub's client URLs, comma-separated (what the master's hooks are given).
    pub fn hub_urls(&self) -> String {
        self.hub.iter().map(NatsNode::url).collect::<Vec<_>>().join(",")
    }

    /// The leaf server of `dc`.
    pub fn leaf(&self, dc: &str) -> &Leaf {
        self.leaves.iter().find(|l| l.dc == dc).unwrap_or_else(|| panic!("no datacenter {dc}"))
    }

    /// The hub server named `name`.
    pub fn hub_node(&mut self, name: &str) -> &mut NatsNode {
        self.hub.iter_mut().find(|n| n.name == name).unwrap_or_else(|| panic!("no hub server {name}"))
    }

    /// Replicas of the hub's commit stream, and the name of its current leader.
    pub fn commit_stream_cluster(&self) -> Option<(usize, Option<String>)> {
        let urls: Vec<String> = self.hub.iter().filter(|n| n.child.is_some()).map(NatsNode::url).collect();
        block_on(async {
            let client = async_nats::ConnectOptions::new()
                .connection_timeout(Duration::from_secs(2))
                .connect(urls.as_slice())
                .await
                .ok()?;
            let js = async_nats::jetstream::new(client);
            let mut stream = js.get_stream(confcast_schemas::subject::COMMITS_STREAM).await.ok()?;
            let info = stream.info().await.ok()?;
            let leader = info.cluster.as_ref().and_then(|c| c.leader.clone());
            Some((info.config.num_replicas, leader))
        })
    }

    /// How many messages the commit stream holds in `dc`'s domain (its mirror).
    pub fn mirrored_commit_events(&self, dc: &str) -> Option<u64> {
        let url = self.leaf(dc).url();
        block_on(async {
            let client = async_nats::connect(url).await.ok()?;
            let js = async_nats::jetstream::new(client);
            let mut stream = js.get_stream(confcast_schemas::subject::COMMITS_STREAM).await.ok()?;
            Some(stream.info().await.ok()?.state.messages)
        })
    }
}

/// Publishes `payload` on `subject` with core NATS (no JetStream ack awaited) through
/// the server at `url`, as any client of that server could.
pub fn publish_core(url: &str, subject: &str, payload: &'static [u8]) {
    block_on(async {
        let client = async_nats::connect(url).await.expect("connect");
        client.publish(subject.to_owned(), payload.into()).await.expect("publish");
        client.flush().await.expect("flush");
    })
}

/// The last message on `subject` in `stream`, as seen through the server at `url`.
pub fn last_message(url: &str, stream: &str, subject: &str) -> Option<Vec<u8>> {
    block_on(async {
        let client = async_nats::connect(url).await.ok()?;
        let stream = async_nats::jetstream::new(client).get_stream(stream).await.ok()?;
        stream.get_last_raw_message_by_subject(subject).await.ok().map(|m| m.payload.to_vec())
    })
}
