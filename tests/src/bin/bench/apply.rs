//! Scenario 5: the host's apply cost against tree size, one file changed, in process
//! (the subscriber's own materialize code). Tree ids come from the subscriber's own
//! tree hashing, as the host computes them.

use std::collections::BTreeMap;
use std::time::Instant;

use confcast_schemas::{ChangeKind, Entry, FileMode, Kind, ServiceUpdate, WIRE_VERSION};
use confcast_subscriber::materialize::{self, Layout, Materializer, Objects};
use confcast_subscriber::tree_hash;
use serde_bytes::ByteBuf;

use crate::report::{summary, verdict, Table};

/// The table of apply costs, one row per tree size.
pub(crate) fn table() -> Table {
    Table::new(
        "5. Apply cost against tree size: one file changed (in process, the subscriber's own materialize code)",
        &[
            "files in the tree",
            "first materialization ms",
            "one-file change p50 ms",
            "max ms",
            "target ≤ 50 ms at 100,000",
        ],
    )
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

/// The git tree id of regular files given by path, as the host computes it.
fn tree_of(files: &BTreeMap<String, Vec<u8>>) -> String {
    let manifest: tree_hash::Manifest = files
        .iter()
        .map(|(path, content)| (path.as_bytes().to_vec(), ("100644", tree_hash::blob_id(content))))
        .collect();
    tree_hash::tree_id_of(&manifest)
}

fn entry(path: &str, change: ChangeKind, content: &[u8]) -> Entry {
    Entry {
        path: ByteBuf::from(path.as_bytes().to_vec()),
        change,
        mode: Some(FileMode::Regular),
        blob: Some(hex::encode(tree_hash::blob_id(content))),
        content: Some(ByteBuf::from(content.to_vec())),
        object: None,
        from_path: None,
    }
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
        staged: false,
    }
}

pub(crate) fn apply_cost(files: usize, rounds: usize, t: &mut Table) {
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
