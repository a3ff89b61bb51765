//! Snapshots by objects: a service's snapshot names its git tree, and the tree's blobs
//! and subtrees are stored once each on the datacenter's state stream. A push stores
//! only the objects its change made; a new host rebuilds the whole tree from them,
//! verified; objects no snapshot needs are reclaimed; a snapshot whose objects are
//! partly missing is refused whole and tried again.

use std::collections::BTreeSet;
use std::time::Duration;

use confcast_schemas::{decode, subject, Kind, ServiceUpdate, SNAPSHOT_BY_OBJECTS};
use confcast_tests::{block_on, git, wait_for, Datacenter, Master, Subscriber};
use futures::StreamExt;

/// The ids of service0's objects the state stream of dc1 holds.
fn stored_objects(nats_url: &str) -> BTreeSet<String> {
    block_on(async {
        let js = async_nats::jetstream::new(async_nats::connect(nats_url).await.expect("connect"));
        let stream = js.get_stream(subject::state_stream("dc1")).await.expect("state stream");
        let filter = subject::objects_wildcard("dc1", Kind::Service, "service0");
        let prefix = filter.trim_end_matches('>').to_owned();
        let mut subjects = stream.info_with_subjects(&filter).await.expect("subjects");
        let mut ids = BTreeSet::new();
        while let Some(entry) = subjects.next().await {
            let (subject, _) = entry.expect("subject");
            ids.insert(subject.strip_prefix(&prefix).expect("an object subject").to_owned());
        }
        ids
    })
}

/// Every object id the tree of `commit` reaches (the tree itself, subtrees, blobs).
fn reachable(master: &Master, commit: &str) -> BTreeSet<String> {
    let tree = git(&master.bare, &["rev-parse", &format!("{commit}^{{tree}}")]);
    let listed = git(&master.bare, &["ls-tree", "-r", "-t", "--object-only", &tree]);
    listed.lines().map(str::to_owned).chain([tree]).collect()
}

/// service0's latest snapshot message, as stored.
fn snapshot_message(nats_url: &str) -> ServiceUpdate {
    block_on(async {
        let js = async_nats::jetstream::new(async_nats::connect(nats_url).await.expect("connect"));
        let stream = js.get_stream(subject::state_stream("dc1")).await.expect("state stream");
        let subject = subject::snapshot_subject("dc1", Kind::Service, "service0");
        let message = stream.get_last_raw_message_by_subject(&subject).await.expect("a snapshot");
        decode(&message.payload).expect("decodes")
    })
}

/// Removes objects of service0 from the state stream, as a damaged stream would.
fn lose_objects(nats_url: &str, ids: &[String]) {
    block_on(async {
        let js = async_nats::jetstream::new(async_nats::connect(nats_url).await.expect("connect"));
        let stream = js.get_stream(subject::state_stream("dc1")).await.expect("state stream");
        for id in ids {
            let subject = subject::object_subject("dc1", Kind::Service, "service0", id);
            stream.purge().filter(subject).await.expect("purged");
        }
    })
}

#[test]
fn a_push_stores_only_what_it_changed_and_a_new_host_rebuilds_the_whole_tree() {
    let dc = Datacenter::with_service0().start();
    let svc = dc.master.on("services/service0/master");
    for d in 0..5 {
        for f in 0..20 {
            svc.write(&format!("d{d}/f{f}.conf"), format!("{d} {f}\n"));
        }
    }
    svc.symlink("current", "d0/f0.conf");
    let big = svc.commit_push("a hundred files").commit;
    dc.host.wait_exec("service0", &big);
    let before = stored_objects(&dc.nats.url());
    let needed = reachable(&dc.master, &big);
    assert!(needed.is_subset(&before), "every object of the tree is stored");
    let first = reachable(&dc.master, &dc.first);
    assert!(before.difference(&needed).all(|id| first.contains(id)), "and only the replaced ones of the tree before");

    let next = svc.write("d3/f7.conf", "changed\n").commit_push("one line").commit;
    dc.host.wait_exec("service0", &next);
    let added: Vec<String> = stored_objects(&dc.nats.url()).difference(&before).cloned().collect();
    // The new blob, the new d3, the new root: nothing of d0..d2, d4 or the other files.
    assert_eq!(added.len(), 3, "{added:?}");
    let snapshot = snapshot_message(&dc.nats.url());
    assert_eq!(snapshot.v, SNAPSHOT_BY_OBJECTS);
    assert!(snapshot.entries.is_empty(), "the snapshot names its tree instead of carrying it");

    // A host that joins now has no update to start from: it rebuilds the tree from the
    // objects, and its tree id is checked as for any snapshot.
    let newcomer = Subscriber::start(&dc.nats.url(), "dc1", &["--service", "service0"]);
    newcomer.wait_exec("service0", &next);
    newcomer.assert_tree(&dc.master, "service0", &next);
    assert!(newcomer.log().contains("bootstrapped from snapshot"), "{}", newcomer.log());
}

#[test]
fn objects_no_snapshot_needs_are_reclaimed() {
    let dc = Datacenter::with_service0().start();
    let svc = dc.master.on("services/service0/master");
    let first_tree = reachable(&dc.master, &dc.first);
    let mut last = dc.first.clone();
    // Each push replaces one blob and the root: a sweep is due after 8 of them.
    for i in 0..8 {
        last = svc.write("app.conf", format!("version {i}\n")).commit_push(&format!("push {i}")).commit;
    }
    dc.host.wait_exec("service0", &last);
    wait_for(Duration::from_secs(20), "the relay to reclaim", || {
        dc.relay.log().contains("reclaimed objects no snapshot needs").then_some(())
    });
    let stored = stored_objects(&dc.nats.url());
    let needed = reachable(&dc.master, &last);
    assert_eq!(stored, needed, "exactly the objects the last tree needs");
    let gone: Vec<&String> = first_tree.difference(&needed).collect();
    assert!(!gone.is_empty() && gone.iter().all(|id| !stored.contains(*id)), "the first tree's replaced objects");

    // A host that bootstraps after the sweep still gets the whole tree.
    let newcomer = Subscriber::start(&dc.nats.url(), "dc1", &["--service", "service0"]);
    newcomer.wait_exec("service0", &last);
    newcomer.assert_tree(&dc.master, "service0", &last);

    // An earlier content again, seconds after its blob was reclaimed (well within the
    // bus's dedup window): it is stored anew, and a host that bootstraps gets it.
    let back = svc.write("app.conf", "version 0\n").commit_push("back to version 0").commit;
    dc.host.wait_exec("service0", &back);
    assert!(
        reachable(&dc.master, &back).is_subset(&stored_objects(&dc.nats.url())),
        "every object of the reverted tree is stored again"
    );
    let late = Subscriber::start(&dc.nats.url(), "dc1", &["--service", "service0"]);
    late.wait_exec("service0", &back);
    late.assert_tree(&dc.master, "service0", &back);
}

#[test]
fn a_snapshot_with_missing_objects_is_refused_whole_and_tried_again() {
    let dc = Datacenter::with_service0().start();
    let svc = dc.master.on("services/service0/master");
    let full = svc.write("keep.conf", "kept\n").write("lost.conf", "lost\n").commit_push("two files").commit;
    dc.host.wait_exec("service0", &full);
    let lost = git(&dc.master.bare, &["rev-parse", &format!("{full}:lost.conf")]);
    lose_objects(&dc.nats.url(), std::slice::from_ref(&lost));

    // A new host cannot rebuild the tree: it writes nothing, says why, and tries again.
    let newcomer = Subscriber::start(&dc.nats.url(), "dc1", &["--service", "service0"]);
    wait_for(Duration::from_secs(20), "the newcomer to refuse the snapshot", || {
        newcomer.log().contains("snapshot incomplete").then_some(())
    });
    assert!(newcomer.log().contains(&lost), "the missing object is named: {}", newcomer.log());
    assert!(!newcomer.service_dir("service0").exists(), "no partial tree goes live");
    assert!(newcomer.execs().is_empty(), "nothing was told of a tree that is not there");

    // The next push changes the lost file: its snapshot is complete, and the newcomer,
    // still trying, takes it.
    let fixed = svc.write("lost.conf", "found\n").commit_push("rewrite the lost file").commit;
    newcomer.wait_exec("service0", &fixed);
    newcomer.assert_tree(&dc.master, "service0", &fixed);
}
