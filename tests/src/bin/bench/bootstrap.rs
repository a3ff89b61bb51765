//! Scenario 9: a new host joining a datacenter whose service has 100,000 files (the
//! nested layout of [`crate::synthetic`]), next to git writing the same tree.
//!
//! The datacenter's relay has published the whole tree and ten one-line changes pushed
//! after it (its log says so; no host runs, so that each run's work is only its own).
//! A new `subscriber` process is started in an empty directory and
//! timed from its start to its `--exec` (which runs once the tree is in place and
//! verified). Beside each new host, on the same disk, git writes the same commit's tree
//! into an empty directory from the master's own object store: `git --git-dir=<master>
//! --work-tree=<empty> checkout <commit> -- .` with a scratch index (`GIT_INDEX_FILE`),
//! which reads the packed objects, inflates every blob and writes every file — what a
//! host would do with a local clone in hand, without the network. Git does not flush
//! what it wrote; the subscriber does (one `syncfs`), so the table also shows git's
//! time with `sync -f` of the directory after it. The ratio is against git's checkout
//! alone, as the target states it.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::observe::{exec_seen, settle};
use crate::report::{ratio, summary, verdict, Table};
use crate::stage::{Stage, BOOTSTRAP_TIMEOUT};
use crate::synthetic;

/// One-line changes pushed before the new hosts join: the stream holds updates after
/// the tree, as a running datacenter's does.
const CHANGES_BEFORE: usize = 10;

/// Runs `runs` bootstraps of a new host at `files` files (each next to a checkout by
/// git) and returns the table.
pub(crate) fn bootstrap(files: usize, runs: usize) -> Table {
    let stage = Stage::new(files, CHANGES_BEFORE, 0);
    for commit in &stage.changes {
        synthetic::push(&stage.master, "service0", commit);
    }
    let last = stage.changes.last().unwrap_or(&stage.first).clone();
    stage.wait_published(&last);
    settle(&[stage.relay_pid()], Duration::from_secs(120));

    let (mut host_ms, mut git_ms, mut git_sync_ms) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        let (checkout, sync) = git_checkout(&stage.master.bare, &last);
        git_ms.push(checkout.as_secs_f64() * 1000.0);
        git_sync_ms.push((checkout + sync).as_secs_f64() * 1000.0);
        let started = Instant::now();
        let host = stage.host();
        let seen = exec_seen(&host, "service0", &last, BOOTSTRAP_TIMEOUT).expect("the new host bootstraps");
        host_ms.push((seen - started).as_secs_f64() * 1000.0);
        drop(host);
    }
    let (host50, _, _, _) = summary(host_ms);
    let (git50, _, _, _) = summary(git_ms);
    let (git_sync50, _, _, _) = summary(git_sync_ms);
    let mut t = Table::new(
        "9. Bootstrap: a new host joins a datacenter (real processes), next to `git checkout` of the same tree on the same disk",
        &[
            "files",
            "runs",
            "new host: start → tree in place (`--exec`) p50 ms",
            "`git checkout` into an empty directory p50 ms",
            "`git checkout` + `sync -f` p50 ms",
            "host / `git checkout`",
            "target ≤ 2× at 100,000",
        ],
    );
    t.row(vec![
        files.to_string(),
        runs.to_string(),
        format!("{host50:.0}"),
        format!("{git50:.0}"),
        format!("{git_sync50:.0}"),
        ratio(host50 / git50),
        if files >= 100_000 { verdict(host50 <= 2.0 * git50) } else { "—".into() },
    ]);
    t
}

/// Checks `commit`'s tree out of `bare` into a fresh empty directory; returns how long
/// git took, and how long `sync -f` of that directory took after it.
fn git_checkout(bare: &Path, commit: &str) -> (Duration, Duration) {
    let scratch = tempfile::tempdir().expect("tempdir");
    let tree = scratch.path().join("tree");
    std::fs::create_dir(&tree).expect("mkdir");
    let started = Instant::now();
    let out = Command::new("git")
        .arg("--git-dir")
        .arg(bare)
        .arg("--work-tree")
        .arg(&tree)
        .args(["checkout", "-q", commit, "--", "."])
        .env("GIT_INDEX_FILE", scratch.path().join("index"))
        .output()
        .expect("git runs");
    let checkout = started.elapsed();
    assert!(out.status.success(), "git checkout: {}", String::from_utf8_lossy(&out.stderr));
    let started = Instant::now();
    let synced = Command::new("sync").arg("-f").arg(&tree).status().expect("sync runs");
    assert!(synced.success(), "sync -f");
    (checkout, started.elapsed())
}
