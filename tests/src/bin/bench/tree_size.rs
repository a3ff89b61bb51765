//! Scenario 8: a one-line change against the size of the service's tree, end to end with
//! the real binaries — one datacenter, one host, the master served by `git daemon`.
//!
//! For each size (100, 10,000 and 100,000 files in the nested layout of
//! [`crate::synthetic`]: `dNNN/sNN/fNNN.yaml`, at most 100 entries a directory) a fresh
//! bus, master, relay and host; after the host's bootstrap and once every process is
//! quiet, P one-line changes are pushed one after the other, each awaited at the host's
//! `--exec`. Measured over the P pushes: push → `--exec` (from the start of `git push`)
//! p50 / p99; the bytes `nats-server` received from its clients (`/varz` `in_bytes`,
//! before and after) per push; the growth of the datacenter's JetStream streams (stream
//! info: every stream but the commit stream and the index, which datacenters share) per
//! push; and the CPU the relay (its `git repack` included) and the host used per push
//! (`/proc/<pid>/stat`, before and after, every process quiet). Then a few more
//! one-line changes are pushed with the master's hooks moved aside, so that `git push`
//! with confcast's hooks can be told from git's own cost at that size. Each size is
//! compared with the 100-file row of the same run.

use std::time::Duration;

use confcast_tests::store;

use crate::observe::{exec_seen, settle};
use crate::report::{cpu_ms, cpu_with_children_ms, ratio, summary, verdict, Table};
use crate::stage::Stage;
use crate::synthetic;

/// What P one-line changes cost at one tree size.
struct Row {
    files: usize,
    pushes: usize,
    p50: f64,
    p99: f64,
    push_p50: f64,
    plain_push_p50: f64,
    bus_bytes: f64,
    store_growth: f64,
    relay_cpu_ms: f64,
    host_cpu_ms: f64,
}

/// Runs the scenario at each of `sizes` (the first is the baseline of the ratios) with
/// `pushes` one-line changes each, and returns its table.
pub(crate) fn tree_size(sizes: &[usize], pushes: usize) -> Table {
    let rows: Vec<Row> = sizes.iter().map(|&files| one_size(files, pushes)).collect();
    let mut t = Table::new(
        "8. A one-line change against tree size: one datacenter, one host (real processes, master over `git://`)",
        &[
            "files",
            "pushes",
            "push → `--exec` p50 / p99 ms",
            "`git push` p50 ms: with / without confcast's hooks",
            "bus bytes per push (`in_bytes`)",
            "store growth per push",
            "relay CPU per push ms",
            "host CPU per push ms",
            "p50 / relay CPU × the first row",
            "target at 100,000: p50 ≤ 1.5×, bus ≤ 64 KiB, relay CPU ≤ 2×",
        ],
    );
    let base = rows.first().map(|r| (r.p50, r.relay_cpu_ms));
    for row in &rows {
        let (p50_ratio, cpu_ratio) = base.map(|(p50, cpu)| (row.p50 / p50, row.relay_cpu_ms / cpu)).unwrap_or_default();
        t.row(vec![
            row.files.to_string(),
            row.pushes.to_string(),
            format!("{:.1} / {:.1}", row.p50, row.p99),
            format!("{:.1} / {:.1}", row.push_p50, row.plain_push_p50),
            kib(row.bus_bytes),
            kib(row.store_growth),
            format!("{:.1}", row.relay_cpu_ms),
            format!("{:.1}", row.host_cpu_ms),
            format!("{} / {}", ratio(p50_ratio), ratio(cpu_ratio)),
            if row.files >= 100_000 {
                verdict(p50_ratio <= 1.5 && row.bus_bytes <= 64.0 * 1024.0 && cpu_ratio <= 2.0)
            } else {
                "—".into()
            },
        ]);
    }
    t
}

fn kib(bytes: f64) -> String {
    format!("{:.1} KiB", bytes / 1024.0)
}

fn one_size(files: usize, pushes: usize) -> Row {
    let stage = Stage::new(files, pushes, synthetic::plain_pushes(pushes));
    let host = stage.host_at(&stage.first);
    let pids = [stage.relay_pid(), host.pid().expect("the host runs")];
    settle(&pids, Duration::from_secs(120));
    let nats_url = stage.nats.url();
    let (bus0, store0) = (store::in_bytes(stage.monitor), store::datacenter_bytes(&nats_url));
    let (relay0, host0) = (cpu_with_children_ms(pids[0]), cpu_ms(pids[1]));
    let (mut to_exec, mut push_only) = (Vec::new(), Vec::new());
    for commit in &stage.changes {
        let (started, took) = synthetic::push(&stage.master, "service0", commit);
        let seen = exec_seen(&host, "service0", commit, Duration::from_secs(120)).expect("exec of a one-line change");
        to_exec.push((seen - started).as_secs_f64() * 1000.0);
        push_only.push(took.as_secs_f64() * 1000.0);
    }
    settle(&pids, Duration::from_secs(120));
    let (bus1, store1) = (store::in_bytes(stage.monitor), store::datacenter_bytes(&nats_url));
    let (relay1, host1) = (cpu_with_children_ms(pids[0]), cpu_ms(pids[1]));
    // The same kind of push with the hooks moved aside, after the measured ones: what
    // git itself costs for it at this tree size.
    let plain: Vec<f64> = stage
        .plain
        .iter()
        .map(|commit| synthetic::push_without_hooks(&stage.master, "service0", commit).as_secs_f64() * 1000.0)
        .collect();
    let (plain_push_p50, _, _, _) = summary(plain);
    let per_push = |before: u64, after: u64| (after as f64 - before as f64) / pushes as f64;
    let (p50, _, p99, _) = summary(to_exec);
    let (push_p50, _, _, _) = summary(push_only);
    let row = Row {
        files,
        pushes,
        p50,
        p99,
        push_p50,
        plain_push_p50,
        bus_bytes: per_push(bus0, bus1),
        store_growth: per_push(store0, store1),
        relay_cpu_ms: per_push(relay0, relay1),
        host_cpu_ms: per_push(host0, host1),
    };
    eprintln!("tree-size: {files} files done");
    row
}
