//! confcast's benchmark: one run on loopback, against the polling design it replaces.
//!
//! `cargo run --release -p confcast-tests --bin bench` (add `-- --quick` for a short
//! smoke run). It starts nats-server, serves the master with `git daemon` behind a
//! counting TCP proxy (so every request and byte the master serves is seen), runs real
//! `relay` and `subscriber` processes, and prints one table per scenario. BENCHMARKS.md
//! describes the scenarios and records a run.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use confcast_schemas::{ChangeKind, Entry, FileMode, Kind, ServiceUpdate, WIRE_VERSION};
use confcast_subscriber::materialize::{self, Layout, Materializer, Objects};
use confcast_subscriber::tree_hash;
use confcast_tests::{git, GitDaemon, Master, NatsServer, Relay, Subscriber};
use serde_bytes::ByteBuf;

/// Counts connections and bytes between clients and the master's git daemon.
struct CountingProxy {
    port: u16,
    connections: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl CountingProxy {
    fn start(upstream: u16) -> CountingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let connections = Arc::new(AtomicU64::new(0));
        let bytes = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (c, b, s) = (connections.clone(), bytes.clone(), stop.clone());
        thread::spawn(move || {
            for client in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else { continue };
                c.fetch_add(1, Ordering::SeqCst);
                for (mut from, mut to) in
                    [(client.try_clone().expect("clone"), server.try_clone().expect("clone")), (server, client)]
                {
                    let b = b.clone();
                    thread::spawn(move || {
                        let mut buf = [0u8; 64 * 1024];
                        while let Ok(n) = from.read(&mut buf) {
                            if n == 0 || to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                            b.fetch_add(n as u64, Ordering::SeqCst);
                        }
                        let _ = to.shutdown(std::net::Shutdown::Write);
                    });
                }
            }
        });
        CountingProxy { port, connections, bytes, stop }
    }

    fn url(&self) -> String {
        format!("git://127.0.0.1:{}/master.git", self.port)
    }

    fn counts(&self) -> (u64, u64) {
        (self.connections.load(Ordering::SeqCst), self.bytes.load(Ordering::SeqCst))
    }
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn daemon_port(daemon: &GitDaemon) -> u16 {
    daemon.url("x").trim_start_matches("git://127.0.0.1:").split('/').next().and_then(|p| p.parse().ok()).expect("port")
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn summary(mut v: Vec<f64>) -> (f64, f64, f64, f64) {
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    (percentile(&v, 50.0), percentile(&v, 95.0), percentile(&v, 99.0), v.last().copied().unwrap_or(f64::NAN))
}

struct Table {
    title: String,
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(title: &str, header: &[&str]) -> Table {
        Table { title: title.into(), header: header.iter().map(|s| s.to_string()).collect(), rows: Vec::new() }
    }
    fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }
    fn print(&self) {
        println!("\n### {}\n", self.title);
        println!("| {} |", self.header.join(" | "));
        println!("|{}|", self.header.iter().map(|_| " --- ").collect::<Vec<_>>().join("|"));
        for row in &self.rows {
            println!("| {} |", row.join(" | "));
        }
    }
}

fn verdict(met: bool) -> String {
    if met {
        "met".into()
    } else {
        "**not met**".into()
    }
}

fn dc_doc() -> &'static str {
    r#"{"conf":"datacenter-configuration/big"}"#
}

/// Master with `datacenters` all following one configuration that pins service0.
fn master(nats: &NatsServer, datacenters: usize) -> (Master, String) {
    let master = Master::new(&nats.url());
    master.configuration("big", r#"{"services":[{"name":"service0","branch":"master"}]}"#);
    for d in 0..datacenters {
        master.datacenter(&format!("dc{d}"), dc_doc());
    }
    let first = master.on("services/service0/master").write("app.conf", "0\n").commit_push("first").commit;
    (master, first)
}

/// Waits (polling every millisecond) for the subscriber's exec of `commit`.
fn exec_seen(sub: &Subscriber, commit: &str, timeout: Duration) -> Option<Instant> {
    let deadline = Instant::now() + timeout;
    let needle = format!("service0 {commit} ");
    while Instant::now() < deadline {
        if std::fs::read_to_string(&sub.exec_log).unwrap_or_default().contains(&needle) {
            return Some(Instant::now());
        }
        thread::sleep(Duration::from_millis(1));
    }
    None
}

fn latency_one_host(pushes: usize, tables: &mut Vec<Table>) -> Option<u32> {
    let nats = NatsServer::start();
    let (master, first) = master(&nats, 1);
    let _relay = Relay::start(&nats.url(), "dc0", &master.bare);
    let sub = Subscriber::start(&nats.url(), "dc0", &["--service", "service0", "--verify-interval-secs", "0"]);
    exec_seen(&sub, &first, Duration::from_secs(30)).expect("bootstrap");
    let svc = master.on("services/service0/master");
    let (mut to_exec, mut push_only, mut plain, mut beyond_git) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (sub_pid, relay_pid) = (sub.pid().expect("subscriber runs"), _relay.pid().expect("relay runs"));
    let (mut sub_cpu, mut relay_cpu) = (0, 0);
    let hooks = master.bare.join("hooks");
    let hooks_off = master.bare.join("hooks.off");
    for i in 0..pushes {
        svc.write("app.conf", format!("{i}\n"));
        let commit = svc.commit(&format!("push {i}"));
        let (sub_cpu0, relay_cpu0) = (cpu_ms(sub_pid), cpu_ms(relay_pid));
        let started = Instant::now();
        let pushed = svc.push();
        assert!(pushed.ok);
        push_only.push(pushed.took.as_secs_f64() * 1000.0);
        let seen = exec_seen(&sub, &commit, Duration::from_secs(10)).expect("exec");
        let exec_ms = (seen - started).as_secs_f64() * 1000.0;
        to_exec.push(exec_ms);
        thread::sleep(Duration::from_millis(50));
        (sub_cpu, relay_cpu) = (sub_cpu + cpu_ms(sub_pid) - sub_cpu0, relay_cpu + cpu_ms(relay_pid) - relay_cpu0);
        // The same push with confcast's hooks moved aside, right after: what git itself
        // costs at this moment on this (noisy) machine. Nothing announces it; the next
        // announced push carries its change along.
        std::fs::rename(&hooks, &hooks_off).expect("disable hooks");
        svc.write("app.conf", format!("plain {i}\n"));
        svc.commit("plain");
        let pushed = svc.push();
        std::fs::rename(&hooks_off, &hooks).expect("enable hooks");
        assert!(pushed.ok);
        let plain_ms = pushed.took.as_secs_f64() * 1000.0;
        plain.push(plain_ms);
        beyond_git.push(exec_ms - plain_ms);
        thread::sleep(Duration::from_millis(20));
    }
    let sub_cpu = sub_cpu as f64 / pushes as f64;
    let relay_cpu = relay_cpu as f64 / pushes as f64;
    let (plain50, _, _, _) = summary(plain);
    let (beyond50, _, beyond99, _) = summary(beyond_git);
    let (p50, p95, p99, max) = summary(to_exec);
    let (pp50, _, pp99, _) = summary(push_only);
    let mut t = Table::new(
        "1. Push → `--exec` on one host (real processes, sequential pushes)",
        &[
            "pushes",
            "p50 ms",
            "p95 ms",
            "p99 ms",
            "max ms",
            "`git push` with the hooks p50 / p99 ms",
            "`git push` without confcast's hooks p50 ms",
            "confcast's share (push → exec minus the plain push beside it) p50 / p99 ms",
            "target p50 ≤ 30, p99 ≤ 100",
        ],
    );
    t.row(vec![
        pushes.to_string(),
        format!("{p50:.1}"),
        format!("{p95:.1}"),
        format!("{p99:.1}"),
        format!("{max:.1}"),
        format!("{pp50:.1} / {pp99:.1}"),
        format!("{plain50:.1}"),
        format!("{beyond50:.1} / {beyond99:.1}"),
        verdict(p50 <= 30.0 && p99 <= 100.0),
    ]);
    tables.push(t);

    // Idle footprint of that subscriber.
    let pid = sub.pid()?;
    let rss_kb = || -> u64 {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
            .unwrap_or(0)
    };
    thread::sleep(Duration::from_secs(2));
    let before = cpu_ms(pid);
    let idle = Duration::from_secs(10);
    thread::sleep(idle);
    let idle_cpu_ms = cpu_ms(pid) - before;
    let rss = rss_kb();
    let mut t = Table::new(
        "3. Footprint: subscriber idle; CPU per update of each process itself (not the `sh -c` it spawns for `--exec`, nor the relay's `git-upload-pack`)",
        &["subscriber RSS", "subscriber CPU over 10 s idle", "subscriber CPU per update", "relay CPU per update", "target RSS ≤ 10 MB"],
    );
    t.row(vec![
        format!("{:.1} MB", rss as f64 / 1024.0),
        format!("{idle_cpu_ms} ms"),
        format!("{sub_cpu:.1} ms"),
        format!("{relay_cpu:.1} ms"),
        verdict(rss <= 10 * 1024),
    ]);
    tables.push(t);
    Some(pid)
}

/// CPU time (user + system) of a process so far, in milliseconds.
fn cpu_ms(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks = fields.get(11).and_then(|u| u.parse::<u64>().ok()).unwrap_or(0)
        + fields.get(12).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
    ticks * 10
}

/// D datacenters, H hosts spread over them, in-process subscribers (the library's `run`,
/// as the binary uses it); P pushes; time until each host's link points at the commit.
fn fanout(datacenters: usize, hosts: usize, pushes: usize, t: &mut Table) {
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
    let relay_cpu0: u64 = relays.iter().filter_map(Relay::pid).map(cpu_ms).sum();
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
    let (mut per_host, mut last_host) = (Vec::new(), Vec::new());
    for i in 0..pushes {
        svc.write("app.conf", format!("fan-out {i}\n"));
        let commit = svc.commit("fan-out");
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
        let times: Vec<f64> = done.into_iter().flatten().collect();
        last_host.push(times.iter().cloned().fold(0.0, f64::max));
        per_host.extend(times);
        thread::sleep(Duration::from_millis(100));
    }
    let relay_cpu = relays.iter().filter_map(Relay::pid).map(cpu_ms).sum::<u64>() - relay_cpu0;
    shutdown.cancel();
    runtime.shutdown_timeout(Duration::from_secs(5));
    let (h50, _, h99, _) = summary(per_host);
    let (l50, _, l99, lmax) = summary(last_host);
    t.row(vec![
        datacenters.to_string(),
        hosts.to_string(),
        pushes.to_string(),
        format!("{h50:.0} / {h99:.0}"),
        format!("{l50:.0} / {l99:.0} / {lmax:.0}"),
        format!("{:.1}", relay_cpu as f64 / (pushes * datacenters) as f64),
        if datacenters == 10 && hosts == 1000 { verdict(l99 <= 1000.0) } else { "—".into() },
    ]);
}

fn master_load(datacenters: usize, pushes: usize, t: &mut Table) {
    let nats = NatsServer::start();
    let (master, first) = master(&nats, datacenters);
    let daemon = GitDaemon::start(&master.bare);
    let proxy = CountingProxy::start(daemon_port(&daemon));
    let relays: Vec<Relay> =
        (0..datacenters).map(|d| Relay::start_url(&nats.url(), &format!("dc{d}"), &proxy.url())).collect();
    let subs: Vec<Subscriber> = (0..datacenters)
        .map(|d| {
            Subscriber::start(&nats.url(), &format!("dc{d}"), &["--service", "service0", "--verify-interval-secs", "0"])
        })
        .collect();
    for sub in &subs {
        exec_seen(sub, &first, Duration::from_secs(60)).expect("bootstrap");
    }
    thread::sleep(Duration::from_millis(300));
    let (c0, b0) = proxy.counts();
    let svc = master.on("services/service0/master");
    let mut change_bytes = 0u64;
    for i in 0..pushes {
        let content = format!("{i}: {}\n", "x".repeat(200));
        change_bytes += content.len() as u64;
        let commit = svc.write("app.conf", content).commit_push(&format!("push {i}")).commit;
        for sub in &subs {
            exec_seen(sub, &commit, Duration::from_secs(30)).expect("exec");
        }
    }
    thread::sleep(Duration::from_millis(300));
    let (c1, b1) = proxy.counts();
    // A push nobody pins.
    let other = master.on("services/unpinned/master").write("x", "1").commit_push("unpinned").commit;
    let _ = other;
    thread::sleep(Duration::from_secs(1));
    let (c2, _) = proxy.counts();
    thread::sleep(Duration::from_secs(5));
    let (c3, _) = proxy.counts();
    let per_push = (c1 - c0) as f64 / pushes as f64;
    let bytes_per_push = (b1 - b0) as f64 / pushes as f64;
    t.row(vec![
        datacenters.to_string(),
        pushes.to_string(),
        format!("{per_push:.2}"),
        format!("{:.0} B ({:.1} KB per DC)", bytes_per_push, bytes_per_push / datacenters as f64 / 1024.0),
        format!("{} B", change_bytes / pushes as u64),
        (c2 - c1).to_string(),
        (c3 - c2).to_string(),
        verdict(per_push <= datacenters as f64 && c2 == c1 && c3 == c2),
    ]);
    drop(relays);
}

/// Per host: when it fetched, and what the service's head was then.
type Observations = Arc<std::sync::Mutex<Vec<Vec<(Instant, String)>>>>;

fn polling_baseline(hosts: usize, period: Duration, observe: Duration, t: &mut Table) {
    let nats = NatsServer::start();
    let (master, _) = master(&nats, 1);
    let daemon = GitDaemon::start(&master.bare);
    let proxy = CountingProxy::start(daemon_port(&daemon));
    let root = tempfile::tempdir().expect("tempdir");
    let clones: Vec<std::path::PathBuf> = (0..hosts)
        .map(|h| {
            let dir = root.path().join(format!("host{h}"));
            git(root.path(), &["clone", "-q", "--bare", &proxy.url(), dir.to_str().expect("utf-8")]);
            git(&dir, &["config", "remote.origin.fetch", "+refs/heads/*:refs/heads/*"]);
            dir
        })
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    // Per host: when it fetched, and what the service's head was then.
    let seen: Observations = Arc::new(std::sync::Mutex::new(vec![Vec::new(); hosts]));
    let pollers: Vec<_> = clones
        .into_iter()
        .enumerate()
        .map(|(h, dir)| {
            let (stop, seen) = (stop.clone(), seen.clone());
            thread::spawn(move || {
                // Spread the hosts over the period, as real timers would be.
                thread::sleep(period.mul_f64(h as f64 / hosts as f64));
                while !stop.load(Ordering::SeqCst) {
                    let next = Instant::now() + period;
                    let _ =
                        std::process::Command::new("git").arg("-C").arg(&dir).args(["fetch", "-q", "origin"]).status();
                    let head = git(&dir, &["rev-parse", "refs/heads/services/service0/master"]);
                    seen.lock().expect("seen")[h].push((Instant::now(), head));
                    while Instant::now() < next && !stop.load(Ordering::SeqCst) {
                        thread::sleep(Duration::from_millis(5));
                    }
                }
            })
        })
        .collect();
    thread::sleep(period);
    let (c0, b0) = proxy.counts();
    let started = Instant::now();
    let mut pushes = Vec::new();
    let svc = master.on("services/service0/master");
    let mut i = 0;
    while started.elapsed() < observe {
        let c = svc.write("app.conf", format!("poll {i}\n")).commit_push("p").commit;
        pushes.push((c, Instant::now()));
        i += 1;
        thread::sleep(period.mul_f64(1.37));
    }
    thread::sleep(period + Duration::from_millis(500));
    let elapsed = started.elapsed().as_secs_f64();
    let (c1, b1) = proxy.counts();
    stop.store(true, Ordering::SeqCst);
    for p in pollers {
        let _ = p.join();
    }
    let seen = seen.lock().expect("seen");
    let index: BTreeMap<&str, usize> = pushes.iter().enumerate().map(|(i, (c, _))| (c.as_str(), i)).collect();
    let mut delays = Vec::new();
    for (i, (_, at)) in pushes.iter().enumerate() {
        // Each host's first fetch that saw this push or a later one.
        for host in seen.iter() {
            let first = host.iter().find(|(t, head)| t >= at && index.get(head.as_str()).is_some_and(|j| *j >= i));
            if let Some((t, _)) = first {
                delays.push((*t - *at).as_secs_f64() * 1000.0);
            }
        }
    }
    let (p50, _, p99, _) = summary(delays);
    t.row(vec![
        format!("polling, T = {} s", period.as_secs_f64()),
        hosts.to_string(),
        format!("{:.1}", (c1 - c0) as f64 / elapsed),
        format!("{:.0}", (b1 - b0) as f64 / elapsed),
        format!("{p50:.0} / {p99:.0}"),
        "measured".into(),
    ]);
}

fn synthetic_path(i: usize) -> String {
    format!("d{}/e{}/f{i}.conf", i % 100, (i / 100) % 10)
}

fn synthetic(files: usize, changed: Option<usize>, round: usize) -> BTreeMap<String, Vec<u8>> {
    (0..files)
        .map(|i| {
            let path = synthetic_path(i);
            let content = if Some(i) == changed { format!("changed {round}\n") } else { format!("value = {i}\n") };
            (path, content.into_bytes())
        })
        .collect()
}

/// The git tree id of regular files given by path, computed in memory.
fn tree_of(files: &BTreeMap<String, Vec<u8>>) -> String {
    use sha1::{Digest, Sha1};
    #[derive(Default)]
    struct Dir {
        files: BTreeMap<String, [u8; 20]>,
        dirs: BTreeMap<String, Dir>,
    }
    fn hash(dir: &Dir) -> [u8; 20] {
        let mut entries: Vec<(Vec<u8>, &str, [u8; 20])> = Vec::new();
        for (name, id) in &dir.files {
            entries.push((name.as_bytes().to_vec(), "100644", *id));
        }
        for (name, sub) in &dir.dirs {
            entries.push(([name.as_bytes(), b"/"].concat(), "40000", hash(sub)));
        }
        entries.sort();
        let mut body = Vec::new();
        for (name, mode, id) in entries {
            let name = name.strip_suffix(b"/").unwrap_or(&name).to_vec();
            body.extend_from_slice(mode.as_bytes());
            body.push(b' ');
            body.extend_from_slice(&name);
            body.push(0);
            body.extend_from_slice(&id);
        }
        let mut h = Sha1::new();
        h.update(format!("tree {}\0", body.len()).as_bytes());
        h.update(&body);
        h.finalize().into()
    }
    let mut root = Dir::default();
    for (path, content) in files {
        let mut parts: Vec<&str> = path.split('/').collect();
        let file = parts.pop().expect("file name");
        let mut dir = &mut root;
        for p in parts {
            dir = dir.dirs.entry(p.to_owned()).or_default();
        }
        dir.files.insert(file.to_owned(), tree_hash::blob_id(content));
    }
    hex(&hash(&root))
}

fn entry(path: &str, change: ChangeKind, content: &[u8]) -> Entry {
    Entry {
        path: ByteBuf::from(path.as_bytes().to_vec()),
        change,
        mode: Some(FileMode::Regular),
        blob: Some(hex(&tree_hash::blob_id(content))),
        content: Some(ByteBuf::from(content.to_vec())),
        object: None,
        from_path: None,
    }
}

fn hex(b: &[u8; 20]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn update(from: Option<&str>, to: &str, tree: String, entries: Vec<Entry>) -> ServiceUpdate {
    ServiceUpdate {
        v: WIRE_VERSION,
        dc: "bench".into(),
        kind: Kind::Service,
        name: "s".into(),
        ref_name: "refs/heads/services/s/master".into(),
        branch: "master".into(),
        version: "latest".into(),
        snapshot: from.is_none(),
        from: from.map(str::to_owned),
        to: Some(to.to_owned()),
        tree: Some(tree),
        entries,
        event_seq: 0,
        pushed_at_ms: 0,
        published_at_ms: 0,
    }
}

fn apply_cost(files: usize, rounds: usize, t: &mut Table) {
    let root = tempfile::tempdir().expect("tempdir");
    let service = confcast_schemas::ServiceId::service("s");
    let layout = Layout::for_service(&root.path().join("etc"), &root.path().join("state"), &service);
    let materializer = Materializer::default();
    let base = synthetic(files, None, 0);
    let entries = base.iter().map(|(p, c)| entry(p, ChangeKind::Add, c)).collect();
    let c0 = format!("{:040x}", 0);
    let started = Instant::now();
    let tree = materializer
        .build(&layout, None, &update(None, &c0, tree_of(&base), entries), &Objects::new())
        .expect("snapshot");
    materialize::switch(&layout, &tree).expect("switch");
    let snapshot_ms = started.elapsed().as_secs_f64() * 1000.0;
    let mut current = c0;
    let mut times = Vec::new();
    for round in 1..=rounds {
        let changed = files / 2;
        let next = synthetic(files, Some(changed), round);
        let path = synthetic_path(changed);
        let commit = format!("{round:040x}");
        let diff =
            update(Some(&current), &commit, tree_of(&next), vec![entry(&path, ChangeKind::Modify, &next[&path])]);
        let started = Instant::now();
        let tree = materializer.build(&layout, Some(&current), &diff, &Objects::new()).expect("apply");
        materialize::switch(&layout, &tree).expect("switch");
        times.push(started.elapsed().as_secs_f64() * 1000.0);
        materializer.prune(&layout);
        current = commit;
    }
    let (p50, _, _, max) = summary(times);
    t.row(vec![
        files.to_string(),
        format!("{snapshot_ms:.0}"),
        format!("{p50:.1}"),
        format!("{max:.1}"),
        if files >= 100_000 { verdict(p50 <= 50.0) } else { "—".into() },
    ]);
}

fn burst(hosts: usize, services: usize, t: &mut Table) {
    let nats = NatsServer::start();
    let master = Master::new(&nats.url());
    let pins: Vec<String> = (0..services).map(|s| format!(r#"{{"name":"s{s}","branch":"master"}}"#)).collect();
    master.configuration("big", &format!(r#"{{"services":[{}]}}"#, pins.join(",")));
    let names: Vec<String> = (0..services).map(|s| format!("\"s{s}\"")).collect();
    let inventory: Vec<String> =
        (0..hosts).map(|h| format!(r#""h{h}":{{"services":[{}]}}"#, names.join(","))).collect();
    master.datacenter(
        "dc0",
        &format!(r#"{{"conf":"datacenter-configuration/big","inventories":{{"hosts":{{{}}}}}}}"#, inventory.join(",")),
    );
    for s in 0..services {
        master.on(&format!("services/s{s}/master")).write("app.conf", "0\n").commit(&format!("s{s}"));
    }
    let all: Vec<String> =
        (0..services).map(|s| format!("+refs/heads/services/s{s}/master:refs/heads/services/s{s}/master")).collect();
    assert!(master.push_refspecs(&all).ok);
    let _relay = Relay::start(&nats.url(), "dc0", &master.bare);
    let subs: Vec<Subscriber> = (0..hosts)
        .map(|h| Subscriber::start(&nats.url(), "dc0", &["--host", &format!("h{h}"), "--verify-interval-secs", "0"]))
        .collect();
    let current = |sub: &Subscriber, want: &BTreeMap<String, String>| {
        let log = std::fs::read_to_string(&sub.exec_log).unwrap_or_default();
        let mut last: BTreeMap<&str, &str> = BTreeMap::new();
        for line in log.lines() {
            let mut parts = line.split(' ');
            if let (Some(s), Some(c)) = (parts.next(), parts.next()) {
                last.insert(s, c);
            }
        }
        want.iter().all(|(s, c)| last.get(s.as_str()) == Some(&c.as_str()))
    };
    // Every service's commit as the master's work tree has it now.
    let heads = || -> BTreeMap<String, String> {
        (0..services)
            .map(|s| (format!("s{s}"), git(&master.work, &["rev-parse", &format!("services/s{s}/master")])))
            .collect()
    };
    let initial = heads();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !subs.iter().all(|s| current(s, &initial)) {
        assert!(Instant::now() < deadline, "bootstrap of the burst scenario");
        thread::sleep(Duration::from_millis(20));
    }
    // One commit on every service, pushed in one `git push`: `services` ref updates
    // within a second. Three bursts: in the first every host builds every service's
    // second tree from scratch (the cold case, right after the hosts started); from the
    // third on, hosts have old trees to recycle (the steady state of a running system).
    for round in 1..=3 {
        for s in 0..services {
            master.on(&format!("services/s{s}/master")).write("app.conf", format!("burst {round}\n")).commit("burst");
        }
        let want = heads();
        let started = Instant::now();
        assert!(master.push_refspecs(&all).ok);
        let pushed = started.elapsed();
        while !subs.iter().all(|s| current(s, &want)) {
            assert!(started.elapsed() < Duration::from_secs(120), "burst convergence");
            thread::sleep(Duration::from_millis(5));
        }
        let took = started.elapsed();
        let case = match round {
            1 => "first (every tree new)",
            2 => continue,
            _ => "third (trees recycled)",
        };
        t.row(vec![
            case.to_owned(),
            services.to_string(),
            hosts.to_string(),
            format!("{:.0}", pushed.as_secs_f64() * 1000.0),
            format!("{:.0}", took.as_secs_f64() * 1000.0),
            verdict(took <= Duration::from_secs(2)),
        ]);
        thread::sleep(Duration::from_millis(500));
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    // `--only latency,load,polling,apply,burst` runs a subset.
    let only: Option<Vec<String>> = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .map(|v| v.split(',').map(str::to_owned).collect());
    let run = |name: &str| only.as_ref().is_none_or(|o| o.iter().any(|x| x == name));
    let started = Instant::now();
    let mut tables = Vec::new();
    println!("# confcast benchmark{}", if quick { " (quick)" } else { "" });
    println!("\nmachine: {} cores, {}", thread::available_parallelism().map(|n| n.get()).unwrap_or(0), uname());

    if run("latency") {
        latency_one_host(if quick { 10 } else { 100 }, &mut tables);
    }

    let mut load = Table::new(
        "2. Master load per push (git requests and bytes through a counting proxy in front of `git daemon`)",
        &[
            "datacenters pinning the ref",
            "pushes",
            "master requests per push",
            "bytes served per push",
            "bytes changed per push",
            "requests for a push nobody pins",
            "requests in 5 s idle",
            "target ≤ D per push, 0 unpinned, 0 idle",
        ],
    );
    if run("fanout") {
        let mut fan = Table::new(
            "7. Fan-out: D datacenters, H hosts (in-process subscribers: the same library code as the binary), push → host applied",
            &["D", "H", "pushes", "per host p50 / p99 ms", "last host p50 / p99 / max ms", "relay CPU per update ms", "target D = 10, H = 1,000: last host p99 ≤ 1000 ms"],
        );
        // `--fanout 10x1000` runs one size only.
        let one: Option<(usize, usize)> = args
            .iter()
            .position(|a| a == "--fanout")
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.split_once('x'))
            .and_then(|(d, h)| Some((d.parse().ok()?, h.parse().ok()?)));
        let sizes: Vec<(usize, usize)> = match one {
            Some(size) => vec![size],
            None if quick => vec![(1, 10), (2, 50)],
            None => vec![(1, 10), (10, 10), (1, 1000), (10, 1000)],
        };
        for (d, h) in &sizes {
            fanout(*d, *h, if quick { 3 } else { 10 }, &mut fan);
        }
        tables.push(fan);
    }
    if run("load") {
        for d in if quick { vec![1, 3] } else { vec![1, 10] } {
            master_load(d, if quick { 3 } else { 20 }, &mut load);
        }
        tables.push(load);
    }

    let mut polling = Table::new(
        "6. The polling baseline against the same master (H hosts running `git fetch` every T seconds)",
        &["design", "hosts", "master requests / s", "master bytes / s", "freshness p50 / p99 ms", "how"],
    );
    let hosts = if quick { 3 } else { 10 };
    if run("polling") {
        polling_baseline(hosts, Duration::from_secs(1), Duration::from_secs(if quick { 4 } else { 15 }), &mut polling);
        for t in [10.0, 60.0] {
            polling.row(vec![
                format!("polling, T = {t} s"),
                hosts.to_string(),
                format!("{:.2}", hosts as f64 / t),
                "(as T = 1 s, scaled by 1/T)".into(),
                format!("{:.0} / {:.0}", t * 1000.0 / 2.0, t * 1000.0 * 0.99),
                "derived: a fetch every T s per host, a change waits T/2 on average".into(),
            ]);
        }
        polling.row(vec![
            "confcast".into(),
            "any".into(),
            "0 while idle; one per datacenter per relevant push".into(),
            "the change, once per datacenter".into(),
            "see table 1".into(),
            "measured (tables 1, 2)".into(),
        ]);
        tables.push(polling);
    }

    let mut apply = Table::new(
        "5. Apply cost against tree size: one file changed (in process, the subscriber's own materialize code)",
        &[
            "files in the tree",
            "first materialization ms",
            "one-file change p50 ms",
            "max ms",
            "target ≤ 50 ms at 100,000",
        ],
    );
    if run("apply") {
        apply_cost(100, 10, &mut apply);
        apply_cost(if quick { 10_000 } else { 100_000 }, if quick { 4 } else { 12 }, &mut apply);
        tables.push(apply);
    }

    let mut b = Table::new(
        "4. Burst: one `git push` updating N services at once; time until every host has applied all of them",
        &[
            "burst",
            "ref updates",
            "hosts (real processes)",
            "`git push` ms",
            "every host current ms",
            "target ≤ 2000 ms",
        ],
    );
    if run("burst") {
        burst(if quick { 3 } else { 10 }, if quick { 10 } else { 100 }, &mut b);
        tables.push(b);
    }

    tables.sort_by(|a, b| a.title.cmp(&b.title));
    for t in &tables {
        t.print();
    }
    println!("\nbench finished in {:.0} s", started.elapsed().as_secs_f64());
}

fn uname() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo").unwrap_or_default().lines().next().unwrap_or("").to_owned();
    format!("{cpu}, {}", mem.replace("MemTotal:", "memory").split_whitespace().collect::<Vec<_>>().join(" "))
}
