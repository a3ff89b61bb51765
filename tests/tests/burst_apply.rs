//! A push that updates many services reaches a host that follows them all, and what the
//! host finds pending on its stream is applied as one step: one flush for every tree,
//! one position save, `--exec` once per service for the state it ends in — never for an
//! update a later one in the same step replaced. Every tree is exactly its commit's,
//! and the tree that was current before a step is left as it was.

use std::collections::BTreeMap;
use std::path::PathBuf;

use confcast_tests::{disk_listing, Datacenter, Master, Subscriber};

/// How many services the push updates.
const SERVICES: usize = 20;

fn names() -> Vec<String> {
    (0..SERVICES).map(|s| format!("s{s:02}")).collect()
}

fn refspecs() -> Vec<String> {
    names().iter().map(|s| format!("+refs/heads/services/{s}/master:refs/heads/services/{s}/master")).collect()
}

/// Publishes configuration `big` pinning every service to its master branch and
/// datacenter `dc1` following it, then every service's first commit in one push;
/// returns the first service's.
fn publish_services(master: &Master) -> String {
    let pins: Vec<String> = names().iter().map(|s| format!(r#"{{"name":"{s}","branch":"master"}}"#)).collect();
    master.configuration("big", &format!(r#"{{"services":[{}]}}"#, pins.join(",")));
    master.datacenter("dc1", r#"{"conf":"datacenter-configuration/big"}"#);
    let firsts = commit_all(master, "first");
    assert!(master.push_refspecs(&refspecs()).ok, "first push");
    firsts[&names()[0]].clone()
}

/// One commit on every service's branch (not pushed); their commits by service.
fn commit_all(master: &Master, round: &str) -> BTreeMap<String, String> {
    names()
        .into_iter()
        .map(|s| {
            let commit = master
                .on(&format!("services/{s}/master"))
                .write("app.conf", format!("{s} {round}\n"))
                .write(&format!("{round}/notes"), format!("{round}\n"))
                .commit(round);
            (s, commit)
        })
        .collect()
}

/// Waits until every service's last exec is its commit in `want`, then checks its tree
/// and that the exec ran exactly once for that commit.
fn assert_reached(host: &Subscriber, master: &Master, want: &BTreeMap<String, String>) {
    for (service, commit) in want {
        host.wait_exec(service, commit);
    }
    let execs = host.execs();
    for (service, commit) in want {
        host.assert_tree(master, service, commit);
        let runs = execs.iter().filter(|l| l.starts_with(&format!("{service} {commit} "))).count();
        assert_eq!(runs, 1, "--exec of {service} at {commit} ran {runs} times:\n{}", execs.join("\n"));
    }
}

/// The fields of the host's `applied batch` log lines, one map per line.
fn batches(host: &Subscriber) -> Vec<BTreeMap<String, String>> {
    host.log()
        .lines()
        .filter(|l| l.contains("applied batch"))
        .map(|l| {
            l.split_whitespace()
                .filter_map(|field| field.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect()
        })
        .collect()
}

/// Whether some `applied batch` line has every field of `want`.
fn has_batch(host: &Subscriber, want: &[(&str, &str)]) -> bool {
    batches(host).iter().any(|b| want.iter().all(|(k, v)| b.get(*k).map(String::as_str) == Some(*v)))
}

#[test]
fn a_push_of_many_services_is_applied_in_one_step_with_one_exec_per_service() {
    let mut args: Vec<String> = Vec::new();
    for s in names() {
        args.extend(["--service".to_owned(), s]);
    }
    let flags: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut dc = Datacenter::with_master(publish_services).host_flags(&flags).first_exec_of("s00").start();

    // Live: one push of every service reaches the running host.
    let live = commit_all(&dc.master, "live");
    assert!(dc.master.push_refspecs(&refspecs()).ok, "live push");
    assert_reached(&dc.host, &dc.master, &live);

    // What is pending when the host comes back is applied as one step.
    dc.host.stop();
    let pending = commit_all(&dc.master, "pending");
    assert!(dc.master.push_refspecs(&refspecs()).ok, "push while the host is down");
    for commit in pending.values() {
        dc.relay.wait_published(commit);
    }
    dc.host.restart();
    assert_reached(&dc.host, &dc.master, &pending);
    let one_step = [("updates", "20"), ("switched", "20"), ("flushes", "1")];
    assert!(has_batch(&dc.host, &one_step), "not applied as one step: {:?}", batches(&dc.host));

    // Two updates of every service pending: each service ends at its last commit, its
    // exec runs for that one only, and the tree current before is left as it was.
    let before: BTreeMap<String, PathBuf> = names()
        .into_iter()
        .map(|s| {
            let link = std::fs::read_link(dc.host.service_dir(&s)).expect("link");
            (s, link)
        })
        .collect();
    dc.host.stop();
    let between = commit_all(&dc.master, "between");
    assert!(dc.master.push_refspecs(&refspecs()).ok, "first push of two");
    let last = commit_all(&dc.master, "last");
    assert!(dc.master.push_refspecs(&refspecs()).ok, "second push of two");
    for commit in last.values() {
        dc.relay.wait_published(commit);
    }
    dc.host.restart();
    assert_reached(&dc.host, &dc.master, &last);
    let chained = [("updates", "40"), ("switched", "20"), ("flushes", "1")];
    assert!(has_batch(&dc.host, &chained), "not applied as one step: {:?}", batches(&dc.host));
    let execs = dc.host.execs();
    for (service, commit) in &between {
        let replaced = format!("{service} {commit} ");
        assert!(!execs.iter().any(|l| l.starts_with(&replaced)), "--exec ran for a replaced update: {replaced}");
    }

    // One more update of one service: the tree current before the two-update step,
    // which applications may still have been reading, is still its commit's.
    let s = names()[0].clone();
    let next = dc.master.on(&format!("services/{s}/master")).write("app.conf", "next\n").commit_push("next").commit;
    dc.host.wait_exec(&s, &next);
    dc.host.assert_tree(&dc.master, &s, &next);
    for (service, dir) in &before {
        assert_eq!(
            disk_listing(dir),
            dc.master.listing(&pending[service]),
            "{service}: the tree current before changed"
        );
    }
}
