//! A tree altered on the host — a file edited or deleted by hand — is detected by
//! `subscriber verify` and by the running subscriber, which restores it from the
//! snapshot and tells the host's processes again.

use std::time::Duration;

use confcast_tests::{wait_for, Datacenter};

#[test]
fn an_altered_tree_is_detected_restored_and_reported() {
    let dc = Datacenter::with_master(|master| {
        master.publish_service0();
        master
            .on("services/service0/master")
            .write("app.conf", "good\n")
            .write("keep/me.conf", "x\n")
            .commit_push("first")
            .commit
    })
    .host_flags(&["--service", "service0", "--verify-interval-secs", "1"])
    .start();
    let (master, sub, commit) = (&dc.master, &dc.host, &dc.first);
    let (ok, report) = sub.verify();
    assert!(ok, "{report}");
    assert!(report.contains(&format!("service service0: ok, commit {commit}")), "{report}");

    // Edit one file in place and delete another, as a person on the host might.
    std::fs::write(sub.service_dir("service0").join("app.conf"), "hand edited\n").expect("edit");
    std::fs::remove_file(sub.service_dir("service0").join("keep/me.conf")).expect("delete");
    let (ok, report) = sub.verify();
    // The daemon may have restored it already; if not, verify must say what is wrong.
    if !ok {
        assert!(report.contains("service service0: ALTERED:"), "{report}");
        assert!(report.contains(&format!("commit {commit} has tree")), "{report}");
    }

    wait_for(Duration::from_secs(10), "the subscriber to restore the tree", || {
        sub.log().contains("restored").then_some(())
    });
    sub.assert_tree(master, "service0", commit);
    assert!(sub.log().contains("integrity check failed"), "reported in the log");
    let (ok, report) = sub.verify();
    assert!(ok, "{report}");
    // The processes were told again: the files under them changed.
    let execs = sub.wait_exec("service0", commit);
    assert_eq!(execs.len(), 2, "{execs:?}");
}

#[test]
fn verify_reports_an_altered_tree_of_a_stopped_subscriber() {
    let mut dc = Datacenter::with_master(|master| {
        master.publish_service0();
        master.on("services/service0/master").write("app.conf", "good\n").commit_push("first").commit
    })
    .start();
    dc.host.stop();
    let (master, sub, commit) = (&dc.master, &mut dc.host, &dc.first);

    std::fs::write(sub.service_dir("service0").join("extra.conf"), "added by hand\n").expect("add");
    let (ok, report) = sub.verify();
    assert!(!ok, "an added file is an alteration: {report}");
    assert!(report.contains("ALTERED"), "{report}");

    // At start, the subscriber checks before anything else and restores.
    sub.restart();
    wait_for(Duration::from_secs(10), "the restore at start", || sub.log().contains("restored").then_some(()));
    sub.assert_tree(master, "service0", commit);
    assert!(sub.verify().0);
}

#[test]
fn a_link_ahead_of_its_saved_position_is_caught_up_without_an_alarm() {
    let mut dc = Datacenter::with_master(|master| {
        master.publish_service0();
        master.on("services/service0/master").write("app.conf", "first\n").commit_push("first").commit
    })
    .start();
    let (master, sub) = (&dc.master, &mut dc.host);
    let svc = master.on("services/service0/master");
    let position = sub.state_dir().join("position.json");
    let saved = std::fs::read(&position).expect("position");
    let second = svc.write("app.conf", "second\n").commit_push("second").commit;
    sub.wait_exec("service0", &second);
    sub.stop();
    // As if the host stopped after swapping the link and before its position reached
    // the disk: the link is at the second commit, the position at the first.
    std::fs::write(&position, saved).expect("set the position back");

    sub.restart();
    // It catches up from the snapshot, and its processes are told again (at least once).
    wait_for(Duration::from_secs(10), "the catch-up at start", || {
        let told = sub.execs().iter().filter(|l| l.starts_with(&format!("service0 {second} "))).count();
        (told >= 2).then_some(())
    });
    sub.assert_tree(master, "service0", &second);
    assert!(!sub.log().contains("integrity check failed"), "no alarm for a stop between swap and save:\n{}", sub.log());
    // The stream goes on from there.
    let third = svc.write("app.conf", "third\n").commit_push("third").commit;
    sub.wait_exec("service0", &third);
    sub.assert_tree(master, "service0", &third);
    assert!(sub.verify().0);
}
