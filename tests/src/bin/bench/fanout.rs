//! Scenario 7: D datacenters, H hosts (in-process subscribers, the same library code as
//! the binary): push → every host applied, seen through inotify; and the CPU each push
//! costs the hosts' process, nats-server and the relays until the last host applied.
//!
//! Each push starts from a quiet fleet: the bench waits until the hosts' process,
//! nats-server and the relays have stopped working before it pushes (see [`settle`]).
//! The hosts, nats-server and the bench share this machine's cores, so work left over
//! from set-up or from the push before would be charged to the push measured: the first
//! push used to start as soon as every link pointed at the bootstrap commit, while the
//! 1,000 hosts were still saving their positions and reporting their status (which
//! nats-server stores): it took 0.6–1.8 s more CPU in the hosts' process and 0.6–1.2 s
//! more in nats-server than the pushes after it, and with ten pushes the last host's
//! p99 (the slowest of the ten) was most often that first push's figure.

use std::thread;
use std::time::{Duration, Instant};

use confcast_subscriber::materialize;
use confcast_tests::{NatsServer, Relay};

use crate::latency::master;
use crate::report::{cpu_ms, summary, verdict, Table};

/// The table the fan-out sizes fill, one row each.
pub(crate) fn table() -> Table {
    Table::new(
        "7. Fan-out: D datacenters, H hosts (in-process subscribers: the same library code as the binary), push → host applied",
        &[
            "D",
            "H",
            "pushes",
            "per host p50 / p99 ms",
            "last host p50 / p99 / max ms",
            "CPU per push until the last host applied, hosts / nats-server / relays ms",
            "relay CPU per update ms",
            "target D = 10, H = 1,000: last host p99 ≤ 1000 ms",
        ],
    )
}

/// D datacenters, H hosts spread over them, in-process subscribers (the library's `run`,
/// as the binary uses it); P pushes; time until each host's link points at the commit.
pub(crate) fn fanout(datacenters: usize, hosts: usize, pushes: usize, t: &mut Table) {
    let nats = NatsServer::start();
    let (master, first) = master(&nats, datacenters);
    let relays: Vec<Relay> =
        (0..datacenters).map(|d| Relay::start(&nats.url(), &format!("dc{d}"), &master.bare)).collect();
    let root = tempfile::tempdir().expect("tempdir");
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let shutdown = tokio_util::sync::CancellationToken::new();
    // One process, as the hosts share it: trees built at once wait for one flush.
    let flushes = materialize::Flushes::default();
    let links: Vec<std::path::PathBuf> = (0..hosts)
        .map(|h| {
            let dir = root.path().join(format!("h{h}"));
            let config = confcast_subscriber::Config {
                nats_url: nats.url(),
                dc: format!("dc{}", h % datacenters),
                selection: confcast_subscriber::Selection::Services(vec![confcast_schemas::ServiceId::service(
                    "service0",
                )]),
                dir: dir.join("etc"),
                state_dir: dir.join("state"),
                notify: Default::default(),
                host_id: format!("h{h}"),
                verify_interval: None,
                listen: None,
                listen_options: Default::default(),
                perms: Default::default(),
                nats_auth: Default::default(),
                trusted_keys: Vec::new(),
                splay: Duration::ZERO,
                max_parallel: None,
                flushes: flushes.clone(),
            };
            runtime.spawn(confcast_subscriber::run(config, shutdown.clone()));
            dir.join("etc/service0")
        })
        .collect();
    let at = |commit: &str| links.iter().filter(|l| std::fs::read_link(l).is_ok_and(|p| p.ends_with(commit))).count();
    let deadline = Instant::now() + Duration::from_secs(300);
    while at(&first) < hosts {
        assert!(Instant::now() < deadline, "fan-out bootstrap: {} of {hosts}", at(&first));
        thread::sleep(Duration::from_millis(20));
    }
    let meter = Meter {
        nats: child_named("nats-server").expect("nats-server is a child of the bench"),
        relays: relays.iter().filter_map(Relay::pid).collect(),
    };
    settle(&meter);
    let relay_cpu0 = meter.now().relays;
    // Hosts are seen applying through inotify (the link is swapped by a rename into its
    // directory), not by polling 1,000 links: the bench then takes no CPU from the
    // hosts it measures, and sees each swap within a millisecond.
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
    let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).expect("inotify");
    let mut host_of = std::collections::HashMap::new();
    for (h, link) in links.iter().enumerate() {
        let dir = link.parent().expect("the link's directory");
        host_of.insert(inotify.add_watch(dir, AddWatchFlags::IN_MOVED_TO).expect("watch"), h);
    }
    let svc = master.on("services/service0/master");
    let (mut per_host, mut last_host, mut cpu) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..pushes {
        svc.write("app.conf", format!("fan-out {i}\n"));
        let commit = svc.commit("fan-out");
        let before = meter.now();
        let started = Instant::now();
        assert!(svc.push().ok);
        let mut done = vec![None; hosts];
        let mut left = hosts;
        while left > 0 {
            assert!(started.elapsed() < Duration::from_secs(120), "fan-out push {i}");
            let events = match inotify.read_events() {
                Ok(events) => events,
                Err(nix::errno::Errno::EAGAIN) => {
                    thread::sleep(Duration::from_millis(1));
                    continue;
                }
                Err(e) => panic!("inotify: {e}"),
            };
            let now = started.elapsed().as_secs_f64() * 1000.0;
            for event in events {
                let Some(&h) = host_of.get(&event.wd) else { continue };
                if done[h].is_none() && std::fs::read_link(&links[h]).is_ok_and(|p| p.ends_with(&commit)) {
                    done[h] = Some(now);
                    left -= 1;
                }
            }
        }
        let used = meter.now().since(before);
        let times: Vec<f64> = done.into_iter().flatten().collect();
        let first = times.iter().cloned().fold(f64::MAX, f64::min);
        let last = times.iter().cloned().fold(0.0, f64::max);
        eprintln!(
            "fan-out {datacenters}x{hosts} push {i}: first host {first:.0} ms, last {last:.0} ms; CPU until then: hosts {} nats-server {} relays {} ms",
            used.hosts, used.nats, used.relays
        );
        last_host.push(last);
        per_host.extend(times);
        cpu.push(used);
        settle(&meter);
    }
    let relay_cpu = meter.now().relays - relay_cpu0;
    shutdown.cancel();
    runtime.shutdown_timeout(Duration::from_secs(5));
    let (h50, _, h99, _) = summary(per_host);
    let (l50, _, l99, lmax) = summary(last_host);
    let mean = |f: fn(&Cpu) -> u64| cpu.iter().map(f).sum::<u64>() / cpu.len().max(1) as u64;
    t.row(vec![
        datacenters.to_string(),
        hosts.to_string(),
        pushes.to_string(),
        format!("{h50:.0} / {h99:.0}"),
        format!("{l50:.0} / {l99:.0} / {lmax:.0}"),
        format!("{} / {} / {}", mean(|c| c.hosts), mean(|c| c.nats), mean(|c| c.relays)),
        format!("{:.1}", relay_cpu as f64 / (pushes * datacenters) as f64),
        if datacenters == 10 && hosts == 1000 { verdict(l99 <= 1000.0) } else { "—".into() },
    ]);
}

/// CPU used so far, in milliseconds: by this process (the hosts; the bench's own
/// watching sleeps), by nats-server and by the relays.
#[derive(Debug, Clone, Copy)]
struct Cpu {
    hosts: u64,
    nats: u64,
    relays: u64,
}

impl Cpu {
    fn since(self, before: Cpu) -> Cpu {
        Cpu { hosts: self.hosts - before.hosts, nats: self.nats - before.nats, relays: self.relays - before.relays }
    }

    fn total(self) -> u64 {
        self.hosts + self.nats + self.relays
    }
}

/// The processes a push keeps busy.
struct Meter {
    nats: u32,
    relays: Vec<u32>,
}

impl Meter {
    fn now(&self) -> Cpu {
        Cpu {
            hosts: cpu_ms(std::process::id()),
            nats: cpu_ms(self.nats),
            relays: self.relays.iter().map(|&pid| cpu_ms(pid)).sum(),
        }
    }
}

/// Waits (at most a minute) until the hosts, nats-server and the relays together use
/// at most one clock tick (10 ms) of CPU in a quarter of a second: what set-up or the
/// push before left to do (positions saved after the switch, old trees pruned, status
/// reports stored, consumers of the bootstrap deleted) is then done, and is not charged
/// to the next push. Idle, 1,000 hosts use less than that.
fn settle(meter: &Meter) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = meter.now().total();
    while Instant::now() < deadline {
        thread::sleep(Duration::from_millis(250));
        let now = meter.now().total();
        if now - last <= 10 {
            return;
        }
        last = now;
    }
}

/// The pid of this process's child running `name` (nats-server: the harness keeps its
/// `Child` to itself).
fn child_named(name: &str) -> Option<u32> {
    let me = std::process::id().to_string();
    std::fs::read_dir("/proc").ok()?.filter_map(Result::ok).find_map(|entry| {
        let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
        // `pid (comm) state ppid ...`: comm may hold spaces and parentheses.
        let (head, tail) = stat.rsplit_once(')')?;
        let comm = head.split_once('(')?.1;
        (comm == name && tail.split_whitespace().nth(1)? == me).then_some(pid)
    })
}
