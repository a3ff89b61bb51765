//! Bad input never costs a host its last good configuration, and every refusal says
//! what was wrong: documents that bypassed pre-receive, missing pins, deleted branches,
//! trees that would escape their directory, garbage and forged messages on the bus.

use confcast_schemas::{encode, subject, ChangeKind, Entry, FileMode, Kind, ServiceUpdate};
use confcast_tests::{forged_update, publish_raw, wait_error, wait_for, Datacenter, DatacenterSetup};
use serde_bytes::ByteBuf;
use std::time::Duration;

const DC: &str = r#"{ "conf": "datacenter-configuration/big" }"#;

/// Datacenter `dc1` following configuration `big` (`conf`), service0's first commit,
/// and a host of service0.
fn datacenter(conf: &'static str) -> DatacenterSetup<'static> {
    Datacenter::with_master(move |master| {
        master.configuration("big", conf);
        master.datacenter("dc1", DC);
        master.on("services/service0/master").write("app.conf", "good\n").commit_push("first").commit
    })
}

const CONF: &str = r#"{"services":[{"name":"service0","branch":"master"}]}"#;

#[test]
fn bad_documents_behind_pre_receive_keep_the_last_good_pins() {
    let dc = datacenter(CONF).start();
    let (nats, master, sub) = (&dc.nats, &dc.master, &dc.host);

    // Malformed JSON in datacenter.json, pushed with the pre-receive hook bypassed.
    master.without_pre_receive(|| master.datacenter("dc1", "{ nope"));
    wait_error(
        &nats.url(),
        "dc1",
        &["refs/heads/datacenters/dc1: datacenter.json: key must be a string", "keeping the last good configuration"],
    );
    // Service changes keep flowing on the last good pins.
    let c2 = master
        .on("services/service0/master")
        .write("app.conf", "still flowing\n")
        .commit_push("during bad dc doc")
        .commit;
    sub.wait_exec("service0", &c2);
    sub.assert_tree(master, "service0", &c2);

    // A configuration that names a missing configuration.
    master.without_pre_receive(|| master.datacenter("dc1", r#"{ "conf": "datacenter-configuration/nope" }"#));
    wait_error(
        &nats.url(),
        "dc1",
        &["field `conf`: refs/heads/datacenter-configuration/nope does not exist on the master"],
    );

    // A schema violation in the configuration document.
    master.datacenter("dc1", DC);
    master.without_pre_receive(|| master.configuration("big", r#"{"services":[{"name":"service0"}]}"#));
    wait_error(
        &nats.url(),
        "dc1",
        &["refs/heads/datacenter-configuration/big: datacenter-configuration.json: missing field `branch`"],
    );
    let c3 = master
        .on("services/service0/master")
        .write("app.conf", "flowing again\n")
        .commit_push("during bad conf")
        .commit;
    sub.wait_exec("service0", &c3);

    // Fixed: everything resumes; nothing was ever removed from the host.
    master.configuration("big", CONF);
    let c4 = master.on("services/service0/master").write("app.conf", "after the fix\n").commit_push("fixed").commit;
    let execs = sub.wait_exec("service0", &c4);
    assert!(execs.iter().all(|l| !l.starts_with("service0  ")), "never removed: {execs:?}");
    sub.assert_tree(master, "service0", &c4);
}

#[test]
fn missing_pins_and_deleted_branches_keep_what_hosts_have() {
    let dc = datacenter(
        r#"{"services":[{"name":"service0","branch":"master"},{"name":"ghost","branch":"main","tag":"v9"}]}"#,
    )
    .start();
    let (nats, master, sub, first) = (&dc.nats, &dc.master, &dc.host, &dc.first);
    wait_error(
        &nats.url(),
        "dc1",
        &["service \"ghost\" is pinned to refs/tags/services/ghost/v9, which does not exist on the master"],
    );

    master.without_pre_receive(|| master.delete("refs/heads/services/service0/master"));
    wait_error(&nats.url(), "dc1", &[&format!("service \"service0\" is pinned to refs/heads/services/service0/master, which does not exist on the master; keeping {first}")]);
    assert_eq!(sub.execs().len(), 1, "nothing ran: {:?}", sub.execs());
    sub.assert_tree(master, "service0", first);

    let back = master.on("services/service0/master").write("app.conf", "recreated\n").commit_push("recreated").commit;
    sub.wait_exec("service0", &back);
    sub.assert_tree(master, "service0", &back);
}

#[test]
fn a_tree_with_an_escaping_symlink_is_refused() {
    let dc = datacenter(CONF).start();
    let (nats, master, sub, first) = (&dc.nats, &dc.master, &dc.host, &dc.first);

    // pre-receive refuses it (tests/tests/containment.rs); bypassed, the relay does.
    let evil = master
        .without_pre_receive(|| {
            master.on("services/service0/master").symlink("conf/passwd", "../../../../etc/passwd").commit_push("escape")
        })
        .commit;
    wait_error(
        &nats.url(),
        "dc1",
        &[
            &format!("service \"service0\" at {evil}"),
            "symlink \"conf/passwd\" points outside the service tree: \"../../../../etc/passwd\" leads to \"../../../etc/passwd\"",
        ],
    );
    sub.assert_tree(master, "service0", first);

    let fixed = master
        .on("services/service0/master")
        .remove("conf/passwd")
        .write("app.conf", "fixed\n")
        .commit_push("fixed")
        .commit;
    let execs = sub.wait_exec("service0", &fixed);
    assert_eq!(execs.len(), 2, "the refused commit never ran exec: {execs:?}");
    sub.assert_tree(master, "service0", &fixed);
}

#[test]
fn garbage_and_forged_messages_are_ignored() {
    let dc = datacenter(CONF).start();
    let (nats, master, sub, first) = (&dc.nats, &dc.master, &dc.host, &dc.first);
    let update_subject = subject::update_subject("dc1", Kind::Service, "service0");

    publish_raw(&nats.url(), &update_subject, b"\xc1 not msgpack".to_vec());
    let forged = forged_update(
        Some(first.clone()),
        &"f".repeat(40),
        &"e".repeat(40),
        false,
        vec![Entry {
            path: ByteBuf::from(b"app.conf".to_vec()),
            change: ChangeKind::Modify,
            mode: Some(FileMode::Regular),
            blob: None,
            content: Some(ByteBuf::from(b"owned\n".to_vec())),
            object: None,
            from_path: None,
        }],
    );
    publish_raw(&nats.url(), &update_subject, encode(&forged));
    // Well-formed, but for another datacenter than its subject says.
    publish_raw(&nats.url(), &update_subject, encode(&ServiceUpdate { dc: "dc2".into(), ..forged.clone() }));

    wait_for(Duration::from_secs(10), "the subscriber to refuse the forged update", || {
        let log = sub.log();
        (log.contains("ignoring unreadable message on the update stream")
            && log.contains("verification failed")
            && log.contains("ignoring update whose content does not match its subject"))
        .then_some(())
    });
    assert_eq!(sub.execs().len(), 1, "nothing was applied: {:?}", sub.execs());
    sub.assert_tree(master, "service0", first);

    // The host is still healthy.
    let next = master.on("services/service0/master").write("app.conf", "real\n").commit_push("real").commit;
    sub.wait_exec("service0", &next);
    sub.assert_tree(master, "service0", &next);
}

#[test]
fn file_names_with_newlines_and_invalid_utf8_arrive_byte_for_byte() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let dc = datacenter(CONF).start();
    let (master, sub) = (&dc.master, &dc.host);

    master.on("services/service0/master");
    let odd: [&[u8]; 4] =
        [b"line\nbreak.conf", b"\xff\xfe latin1 \xe9.conf", b"tab\tand space .conf", b"dir \xc3\xa9/\x01ctl"];
    for name in odd {
        let path = master.work.join(OsStr::from_bytes(name));
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(&path, name).expect("write");
    }
    let c = master.commit_push("odd names").commit;
    sub.wait_exec("service0", &c);
    for name in odd {
        let on_disk =
            std::fs::read(sub.service_dir("service0").join(OsStr::from_bytes(name))).expect("file with odd name");
        assert_eq!(on_disk, name);
    }
    sub.assert_tree(master, "service0", &c);
}
