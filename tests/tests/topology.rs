//! confcast on the production topology (deploy/README.md), on loopback: a three-server
//! NATS cluster next to the master (JetStream domain `hub`, commit stream with 3
//! replicas) and one leaf-node server per datacenter with its own JetStream domain.
//! Each datacenter's relay and hosts connect only to their own leaf server; the relay
//! reads commit events from a mirror of the hub's commit stream in its domain
//! (`relay --commits-domain hub`).
//!
//! The servers run the example configurations of `deploy/nats/` (see
//! `confcast_tests::topology`).

use std::process::Command;
use std::time::{Duration, Instant};

use confcast_schemas::rollout::Phase;
use confcast_schemas::subject;
use confcast_tests::topology::{last_message, publish_core, Topology};
use confcast_tests::{bin, git, index_value, rollout_state, run, wait_for, wait_rollout, Master, Relay, Subscriber};

const DCS: [&str; 2] = ["dc1", "dc2"];
/// Catching up after an outage includes the mirror noticing its source is back.
const CATCH_UP: Duration = Duration::from_secs(60);

/// The topology, a master publishing to the hub, and a relay and a host per datacenter,
/// every host at service0's first commit.
struct World {
    topology: Topology,
    master: Master,
    relays: Vec<Relay>,
    hosts: Vec<Subscriber>,
    pushed: Vec<String>,
}

impl World {
    fn start() -> World {
        let started = Instant::now();
        let topology = Topology::start(&DCS);
        eprintln!("topology up in {:?}", started.elapsed());

        // The hooks know every hub server, and create the commit stream with 3 replicas.
        let master = Master::new(&topology.hub_urls());
        master.install_hooks(&topology.hub_urls(), &["--replicas", "3"]);
        // Pushes must be announced, not spooled, even on a machine busy compiling: give
        // the hook more than its default 1.5 s to hear the cluster's ack.
        git(&master.bare, &["config", "confcast.timeoutMs", "10000"]);

        let configured = master.configuration("big", r#"{"services":[{"name":"service0","branch":"master"}]}"#);
        if !configured.stderr.contains("announced 1 ref update") {
            // A cluster that has just formed may not place the commit stream's three
            // replicas at once ("no suitable peers for placement"): the hook spooled the
            // event, as it should. Drain it once the cluster accepts it.
            assert!(configured.stderr.contains("spooled"), "hook output: {}", configured.stderr);
            wait_for(Duration::from_secs(60), "the hub to accept the spooled event", || {
                let drained = Command::new(bin("publisher"))
                    .args(["drain", &master.bare.display().to_string(), "--nats", &topology.hub_urls()])
                    .output()
                    .expect("publisher drain runs");
                (drained.status.success() && master.spooled_events() == 0).then_some(())
            });
        }
        for dc in DCS {
            master.datacenter(dc, r#"{"conf":"datacenter-configuration/big"}"#);
        }
        let first = master.on("services/service0/master").write("app.conf", "0\n").commit_push("first").commit;
        let (replicas, leader) = topology.commit_stream_cluster().expect("the hub has the commit stream");
        assert_eq!(replicas, 3, "the hooks created the commit stream with confcast.replicas");
        assert!(leader.is_some(), "the commit stream has a leader");

        let master_path = master.bare.display().to_string();
        let relays: Vec<Relay> = DCS
            .iter()
            .map(|dc| {
                let flags = ["--commits-domain", "hub", "--rollout-domains"];
                Relay::start_with(&topology.leaf(dc).url(), dc, &master_path, &flags)
            })
            .collect();
        let hosts: Vec<Subscriber> =
            DCS.iter().map(|dc| Subscriber::start(&topology.leaf(dc).url(), dc, &["--service", "service0"])).collect();
        for host in &hosts {
            host.wait_exec_within("service0", &first, CATCH_UP);
        }
        eprintln!("every host at the first commit after {:?}", started.elapsed());
        World { topology, master, relays, hosts, pushed: vec![first] }
    }

    /// Pushes a change of service0 and checks the hook announced it (not spooled).
    fn push(&mut self, content: &str) -> String {
        let pushed = self.master.on("services/service0/master").write("app.conf", content).commit_push(content);
        assert!(pushed.stderr.contains("announced 1 ref update"), "hook output: {}", pushed.stderr);
        self.pushed.push(pushed.commit.clone());
        pushed.commit
    }

    fn host(&self, dc: &str) -> &Subscriber {
        &self.hosts[DCS.iter().position(|d| *d == dc).expect("datacenter")]
    }

    /// `dc`'s host ends exactly at `commit`, its last exec was for it, and every exec
    /// was for a pushed commit.
    fn assert_converged(&self, dc: &str, commit: &str) {
        let host = self.host(dc);
        host.wait_exec_within("service0", commit, CATCH_UP);
        host.assert_converged(&self.master, "service0", commit, &self.pushed);
    }
}

/// Each test runs five servers (a three-node cluster electing leaders, two leaves):
/// one at a time, so that elections are not starved of CPU on a small machine.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn topology_a_push_reaches_hosts_in_both_datacenters() {
    let _serial = one_at_a_time();
    let mut world = World::start();
    // A client of dc1's server publishes on the hub's and dc2's subjects: the leaf links
    // carry none of it (deploy/nats/dc-leaf.conf), so nothing is stored.
    publish_core(&world.topology.leaf("dc1").url(), "confcast.commits.forged", b"forged");
    publish_core(&world.topology.leaf("dc1").url(), &subject::error_subject("dc2"), b"forged");

    let started = Instant::now();
    let commit = world.push("1\n");
    for dc in DCS {
        world.assert_converged(dc, &commit);
    }
    eprintln!("push to both datacenters' hosts in {:?}", started.elapsed());

    // From the master's NATS, `publisher status --domains` reads each datacenter's
    // streams in its own domain and sees the rollout complete.
    let out = Command::new(bin("publisher"))
        .args(["status", &commit, "--nats", &world.topology.hub_urls(), "--dc", "dc1", "--dc", "dc2"])
        .args(["--domains", "--timeout", "30"])
        .output()
        .expect("publisher runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "publisher status: {stdout}{}", String::from_utf8_lossy(&out.stderr));
    for dc in DCS {
        assert!(stdout.contains(&format!("{dc}: 1/1")), "{stdout}");
    }

    // Each datacenter's relay read the events from the mirror in its own domain.
    for dc in DCS {
        let events = world.topology.mirrored_commit_events(dc).expect("a mirror in the datacenter's domain");
        assert!(events >= 5, "{dc}'s mirror holds every commit event, has {events}");
    }
    // Each datacenter's index is its own: the K/V buckets of one domain do not receive
    // the other's writes across the leaf links.
    for dc in DCS {
        let key = format!("confcast/{dc}/configurations/services/service0/latest");
        let url = world.topology.leaf(dc).url();
        wait_for(Duration::from_secs(10), &format!("{key} in {dc}'s index"), || {
            index_value(&url, &key).filter(|v| v.ends_with(&commit))
        });
        for other in DCS.iter().filter(|o| **o != dc) {
            let other_url = world.topology.leaf(other).url();
            assert_eq!(index_value(&other_url, &key), None, "{dc}'s index key leaked into {other}'s bucket");
        }
    }
    // The real push went all the way after the forged messages, so they had their chance.
    let hub = world.topology.hub[0].url();
    assert_eq!(last_message(&hub, subject::COMMITS_STREAM, "confcast.commits.forged"), None, "dc1 wrote into the hub");
    let dc2 = world.topology.leaf("dc2").url();
    assert_eq!(
        last_message(&dc2, &subject::updates_stream("dc2"), &subject::error_subject("dc2")),
        None,
        "dc1 wrote into dc2's stream"
    );
    // The hook, told where the datacenters' domains are, prints the rollout into the push.
    git(&world.master.bare, &["config", "confcast.waitRollout", "30"]);
    git(&world.master.bare, &["config", "confcast.rolloutDomains", "dc1,dc2"]);
    let pushed = world.master.on("services/service0/master").write("app.conf", "waited\n").commit_push("waited");
    world.pushed.push(pushed.commit.clone());
    for dc in DCS {
        assert!(pushed.stderr.contains(&format!("{dc}: 1/1")), "push output: {}", pushed.stderr);
    }
    assert!(pushed.stderr.contains("rollout complete"), "push output: {}", pushed.stderr);
    git(&world.master.bare, &["config", "--unset", "confcast.waitRollout"]);
    assert!(world.relays.iter().all(|r| !r.log().contains("opening streams failed")), "relays opened their streams");
}

#[test]
fn topology_a_push_reaches_both_datacenters_with_a_hub_server_killed() {
    let _serial = one_at_a_time();
    let mut world = World::start();
    // The hardest one to lose: the server leading the commit stream.
    let (_, leader) = world.topology.commit_stream_cluster().expect("commit stream");
    let leader = leader.expect("a leader");
    world.topology.hub_node(&leader).kill();
    let killed_at = Instant::now();
    let new_leader = wait_for(Duration::from_secs(60), "the commit stream to elect a new leader", || {
        world.topology.commit_stream_cluster().and_then(|(_, l)| l).filter(|l| *l != leader)
    });
    eprintln!("{leader} killed; {new_leader} leads the commit stream after {:?}", killed_at.elapsed());

    let started = Instant::now();
    let commit = world.push("with a hub server down\n");
    for dc in DCS {
        world.assert_converged(dc, &commit);
    }
    eprintln!("push to both datacenters with {leader} down in {:?}", started.elapsed());

    // The server comes back with its store and catches up; pushes keep flowing.
    world.topology.hub_node(&leader).restart();
    let commit = world.push("hub whole again\n");
    for dc in DCS {
        world.assert_converged(dc, &commit);
    }
}

#[test]
fn topology_a_datacenter_cut_off_from_the_hub_catches_up_and_the_other_is_unaffected() {
    let _serial = one_at_a_time();
    let mut world = World::start();
    let before = world.pushed[0].clone();
    world.topology.leaf("dc1").cut();

    // While dc1 is cut off, dc2 gets every push.
    let mut last = String::new();
    for i in 0..3 {
        last = world.push(&format!("while dc1 is cut off {i}\n"));
    }
    world.assert_converged("dc2", &last);
    // dc1 has heard of none of them (its relay and host only talk to its own server).
    let dc1 = world.host("dc1");
    assert!(
        dc1.execs().iter().all(|line| line.split(' ').nth(1) == Some(before.as_str())),
        "dc1 applied something while cut off: {:?}",
        dc1.execs()
    );
    dc1.assert_tree(&world.master, "service0", &before);

    // The link returns: dc1's mirror catches up by itself, and its host ends at the
    // latest push.
    let healed = Instant::now();
    world.topology.leaf("dc1").heal();
    world.topology.leaf("dc1").wait_linked();
    world.assert_converged("dc1", &last);
    eprintln!("dc1 caught up {:?} after the link returned", healed.elapsed());

    // And both keep receiving pushes.
    let next = world.push("after the outage\n");
    for dc in DCS {
        world.assert_converged(dc, &next);
    }
}

/// `dc2` follows `dc1` (`rollout.after`) across the leaf links: its relay reads dc1's
/// rollout in dc1's domain, and an operator on the hub steers both datacenters'
/// rollouts with `publisher rollout --domains`, the controls crossing the leaf links.
#[test]
fn topology_a_datacenter_follows_another_and_operators_control_both_from_the_hub() {
    let _serial = one_at_a_time();
    let mut world = World::start();
    let hub = world.topology.hub_urls();
    let (dc1, dc2) = (world.topology.leaf("dc1").url(), world.topology.leaf("dc2").url());
    // A second host in dc1, so that its canary wave leaves one host waiting.
    let second = Subscriber::start(&dc1, "dc1", &["--service", "service0", "--host-id", "dc1-second"]);
    second.wait_exec_within("service0", &world.pushed[0], CATCH_UP);
    world.master.configuration(
        "big",
        r#"{"services":[{"name":"service0","branch":"master"}],"rollout":{"waves":[1,"100%"],"bake_secs":600}}"#,
    );
    world.master.datacenter("dc2", r#"{"conf":"datacenter-configuration/big","rollout":{"after":["dc1"]}}"#);
    wait_for(CATCH_UP, "dc1's hosts to report", || {
        ["dc1-second"].iter().all(|h| confcast_tests::host_status(&dc1, "dc1", h, "service0").is_some()).then_some(())
    });
    let commit = world.push("2\n");
    wait_rollout(&dc1, "dc1", "service0", "dc1 to bake its canary", |s| {
        s.commit == commit && s.healthy_since_ms.is_some()
    });
    let waiting = wait_rollout(&dc2, "dc2", "service0", "dc2 to wait for dc1", |s| s.commit == commit);
    assert_eq!(waiting.phase, Phase::Waiting, "{waiting:?}");

    let control = |args: &[&str]| {
        let ran = run(Command::new(bin("publisher")).arg("rollout").args(args).args(["--nats", &hub, "--domains"]));
        assert_eq!(ran.code, Some(0), "publisher rollout {args:?}: {ran:?}");
        ran.stdout
    };
    // From the hub: dc2 paused, dc1 promoted; dc2 stays paused and its host holds.
    assert!(control(&["pause", &commit, "--dc", "dc2"]).contains("waiting -> paused"));
    assert!(control(&["promote", &commit, "--dc", "dc1"]).contains("-> promoted"));
    world.assert_converged("dc1", &commit);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(rollout_state(&dc2, "dc2", "service0").expect("dc2's state").phase, Phase::Paused);
    assert!(!world.host("dc2").execs().iter().any(|l| l.contains(&commit)), "dc2 holds while paused");
    // Resumed, dc2 finds dc1 done (promoted) and rolls the commit out.
    control(&["resume", &commit, "--dc", "dc2"]);
    world.assert_converged("dc2", &commit);
    wait_rollout(&dc2, "dc2", "service0", "dc2 to complete", |s| s.phase == Phase::Complete);
}
