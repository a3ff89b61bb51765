//! The whole pipeline against a real nats-server and real `git push`: hook → relay →
//! subscriber → exec.

use std::time::Duration;

use confcast_tests::{wait_for, Datacenter, DatacenterSetup, Master, NatsServer, Relay, Subscriber};

const CONF: &str = r#"{ "services": [
    { "name": "service0", "branch": "master", "tag": "latest" },
    { "name": "pinned", "branch": "master", "tag": "v1.0" } ] }"#;

/// A master with datacenter `dc1` following `datacenter-configuration/big`, with
/// `service0` on its master branch and `pinned` at tag v1.0; and service0's first commit.
fn master_with_dc1(nats: &NatsServer) -> (Master, String) {
    let master = Master::new(&nats.url());
    let first = publish_dc1(&master);
    (master, first)
}

/// [`master_with_dc1`], with dc1's relay and a host.
fn datacenter() -> DatacenterSetup<'static> {
    Datacenter::with_master(publish_dc1)
}

/// Pushes what [`master_with_dc1`] describes; returns service0's first commit.
fn publish_dc1(master: &Master) -> String {
    master.configuration("big", CONF);
    master.datacenter(
        "dc1",
        r#"{ "conf": "datacenter-configuration/big",
        "inventories": { "hosts": { "host-a": { "services": ["service0", "pinned"] } } } }"#,
    );
    let first = master.on("services/service0/master").write("app.conf", "port = 80\n").commit_push("first").commit;
    master.on("services/pinned/master").write("p.conf", "v1\n").commit_push("pinned v1");
    master.tag_push("services/pinned/v1.0");
    first
}

#[test]
fn a_push_reaches_the_subscriber_exactly_and_runs_exec_once() {
    // Bootstrap: a fresh host gets the current state and runs exec for it.
    let dc = datacenter().start();
    let (master, relay, sub, first) = (&dc.master, &dc.relay, &dc.host, &dc.first);
    sub.assert_tree(master, "service0", first);

    let pushed = master
        .on("services/service0/master")
        .write("app.conf", "port = 8080\n")
        .write("new/nested/file", "x")
        .commit_push("second");
    assert!(pushed.stderr.contains("confcast: announced 1 ref update(s)"), "hook output: {}", pushed.stderr);
    let execs = sub.wait_exec("service0", &pushed.commit);
    sub.assert_tree(master, "service0", &pushed.commit);
    let dir = sub.service_dir("service0");
    assert_eq!(
        execs,
        vec![
            format!("service0 {first} refs/heads/services/service0/master {}", dir.display()),
            format!("service0 {} refs/heads/services/service0/master {}", pushed.commit, dir.display()),
        ],
        "exec ran once per change with the contract's environment"
    );
    assert!(!relay.log().contains("spilling"), "small updates travel in one message");
    if std::env::var_os("CONFCAST_SHOW_LOGS").is_some() {
        eprintln!("--- relay\n{}\n--- subscriber\n{}", relay.log(), sub.log());
    }
}

#[test]
fn every_kind_of_file_change_arrives_intact() {
    let dc = datacenter().start();
    let (master, relay, sub) = (&dc.master, &dc.relay, &dc.host);

    let svc = master.on("services/service0/master");
    svc.write("a/b/c/deep.conf", "deep\n")
        .write("keep.conf", "unchanged\n")
        .write("to-delete.conf", "bye\n")
        .write("to-rename.conf", "moving\n")
        .write("run.sh", "#!/bin/sh\necho hi\n")
        .write("was-exec.sh", "#!/bin/sh\n")
        .chmod("was-exec.sh", true)
        .write("binary.dat", (0..=255u8).cycle().take(70_000).collect::<Vec<u8>>())
        .symlink("link", "keep.conf");
    let c1 = svc.commit_push("many files").commit;
    sub.wait_exec("service0", &c1);
    sub.assert_tree(master, "service0", &c1);

    svc.remove("to-delete.conf")
        .rename("to-rename.conf", "moved/here.conf")
        .chmod("run.sh", true)
        .chmod("was-exec.sh", false)
        .symlink("link", "a/b/c/deep.conf")
        .symlink("dirlink", "a/b")
        .write("binary.dat", (0..=255u8).rev().cycle().take(80_000).collect::<Vec<u8>>());
    let c2 = svc.commit_push("rename, delete, chmod, retarget").commit;
    sub.wait_exec("service0", &c2);
    sub.assert_tree(master, "service0", &c2);

    // Several MiB in one push: more than NATS's max_payload, so contents travel through
    // the object store.
    for i in 0..4u8 {
        svc.write(
            &format!("big/{i}.bin"),
            (0..1_100_000u32).map(|n| (n as u8) ^ i.wrapping_mul(31)).collect::<Vec<u8>>(),
        );
    }
    let c3 = svc.commit_push("4 x 1.1 MB").commit;
    sub.wait_exec("service0", &c3);
    sub.assert_tree(master, "service0", &c3);

    // Many files small enough to travel inline, 1.5 MB together: the update itself is
    // larger than max_payload and is spilled to the object store.
    for i in 0..25u32 {
        svc.write(
            &format!("medium/{i}.conf"),
            (0..60_000u32).map(|n| b'a' + ((n * 7 + i) % 26) as u8).collect::<Vec<u8>>(),
        );
    }
    let spilled = svc.commit_push("25 x 60 kB").commit;
    sub.wait_exec("service0", &spilled);
    assert!(relay.log().contains("spilling to the object store"), "the update went through the object store");
    sub.assert_tree(master, "service0", &spilled);

    // Everything removed: the service's tree becomes empty, and is still exact.
    git_rm_all(master);
    let c4 = svc.commit_push("empty").commit;
    sub.wait_exec("service0", &c4);
    sub.assert_tree(master, "service0", &c4);
    assert_eq!(std::fs::read_dir(sub.service_dir("service0")).expect("dir").count(), 0);
}

fn git_rm_all(master: &Master) {
    confcast_tests::git(&master.work, &["rm", "-r", "-q", "."]);
}

#[test]
fn pushes_to_unpinned_or_tag_pinned_branches_change_nothing() {
    let dc = datacenter().host_flags(&["--service", "service0", "--service", "pinned"]).start();
    let (master, sub) = (&dc.master, &dc.host);
    let v1 = master.rev("refs/tags/services/pinned/v1.0").expect("tag");
    sub.wait_exec("pinned", &v1);
    let before = sub.execs();

    // Nobody pins this service, and `pinned` follows a tag, not its branch head.
    master.on("services/unpinned/master").write("x", "1").commit_push("unpinned");
    master.on("services/pinned/master").write("p.conf", "v2, not released\n").commit_push("pinned head moves");
    // Events are handled in order, so once this later push is applied the two above
    // have been handled too.
    let marker = master.on("services/service0/master").write("marker", "1").commit_push("marker").commit;
    let execs = sub.wait_exec("service0", &marker);
    assert_eq!(execs.len(), before.len() + 1, "only the marker ran exec: {execs:?}");
    sub.assert_tree(master, "pinned", &v1);

    // Releasing the tag moves it.
    let v2 = master.on("services/pinned/master").tag_push("services/pinned/v1.0");
    sub.wait_exec("pinned", &v2);
    sub.assert_tree(master, "pinned", &v2);
}

#[test]
fn repinning_switches_exactly_the_affected_services_per_datacenter() {
    let nats = NatsServer::start();
    let master = Master::new(&nats.url());
    let s0_v1 = master.on("services/s0/master").write("s0", "v1").commit_push("s0 v1").commit;
    master.tag_push("services/s0/v1");
    let s0_v2 = master.on("services/s0/master").write("s0", "v2").commit_push("s0 v2").commit;
    master.tag_push("services/s0/v2");
    let s1 = master.on("services/s1/main").write("s1", "one").commit_push("s1").commit;
    let s2 = master.on("services/s2/main").write("s2", "two").commit_push("s2").commit;

    // Configuration "web", versions 1 and 2 as tags; dc-a on v1, dc-b on v2.
    master.configuration(
        "web",
        r#"{"services":[{"name":"s0","branch":"master","tag":"v1"},{"name":"s1","branch":"main"}]}"#,
    );
    master.tag_push("datacenter-configuration/web/1");
    master.configuration("web", r#"{"services":[{"name":"s0","branch":"master","tag":"v2"},{"name":"s1","branch":"main"},{"name":"s2","branch":"main"}]}"#);
    master.tag_push("datacenter-configuration/web/2");
    master.datacenter("dc-a", r#"{"conf":"datacenter-configuration/web/1"}"#);
    master.datacenter("dc-b", r#"{"conf":"datacenter-configuration/web/2"}"#);

    let _relay_a = Relay::start(&nats.url(), "dc-a", &master.bare);
    let _relay_b = Relay::start(&nats.url(), "dc-b", &master.bare);
    let a = Subscriber::start(&nats.url(), "dc-a", &["--service", "s0", "--service", "s1", "--service", "s2"]);
    let b = Subscriber::start(&nats.url(), "dc-b", &["--service", "s0", "--service", "s1", "--service", "s2"]);

    // Different pins, different commits.
    a.wait_exec("s0", &s0_v1);
    a.wait_exec("s1", &s1);
    b.wait_exec("s0", &s0_v2);
    b.wait_exec("s2", &s2);
    a.assert_tree(&master, "s0", &s0_v1);
    b.assert_tree(&master, "s0", &s0_v2);
    assert!(!a.service_dir("s2").exists(), "s2 is not part of dc-a");
    let a_before = a.execs();
    let b_before = b.execs();

    // dc-a moves to configuration version 2: s0 switches to v2 and s2 appears; s1 is untouched.
    master.datacenter("dc-a", r#"{"conf":"datacenter-configuration/web/2"}"#);
    a.wait_exec("s0", &s0_v2);
    a.wait_exec("s2", &s2);
    let new: Vec<String> = a.execs()[a_before.len()..].to_vec();
    assert_eq!(new.len(), 2, "exactly s0 and s2 switched: {new:?}");
    a.assert_tree(&master, "s2", &s2);

    // A service moved to another tag in a followed configuration branch; and one dropped.
    master.configuration(
        "web",
        r#"{"services":[{"name":"s0","branch":"master","tag":"v1"},{"name":"s1","branch":"main"}]}"#,
    );
    master.datacenter("dc-b", r#"{"conf":"datacenter-configuration/web"}"#);
    b.wait_exec("s0", &s0_v1);
    b.wait_exec("s2", "");
    assert!(!b.service_dir("s2").exists(), "a dropped service is removed from the host");
    let new: Vec<String> = b.execs()[b_before.len()..].to_vec();
    assert_eq!(new.len(), 2, "exactly s0 switched and s2 was removed: {new:?}");
    assert!(a.execs().len() == a_before.len() + 2, "dc-a did not move: {:?}", a.execs());
}

#[test]
fn a_stopped_subscriber_catches_up_and_runs_exec_for_the_final_state() {
    let mut dc = datacenter().start();
    dc.host.stop();
    let (master, relay, sub) = (&dc.master, &dc.relay, &mut dc.host);

    let svc = master.on("services/service0/master");
    let mut last = String::new();
    for i in 0..20 {
        last = svc
            .write("counter", format!("{i}\n"))
            .write(&format!("f{}", i % 3), format!("{i}"))
            .commit_push(&format!("push {i}"))
            .commit;
    }
    // Let the relay publish all 20 before the host comes back.
    relay.wait_published(&last);
    sub.restart();
    let execs = sub.wait_exec("service0", &last);
    assert_eq!(execs.len(), 2, "one exec at bootstrap, one for the final state after catching up: {execs:?}");
    sub.assert_tree(master, "service0", &last);
}

#[test]
fn a_push_while_nats_is_down_returns_fast_and_is_delivered_later() {
    let mut dc = datacenter().start();
    let (nats, master, sub) = (&mut dc.nats, &dc.master, &dc.host);

    nats.stop();
    let pushed = master.on("services/service0/master").write("app.conf", "during outage\n").commit_push("outage");
    assert!(pushed.took < Duration::from_secs(2), "push took {:?}", pushed.took);
    assert!(pushed.stderr.contains("spooled 1 event(s)"), "hook output: {}", pushed.stderr);
    assert_eq!(master.spooled_events(), 1);

    nats.restart();
    let out = std::process::Command::new(confcast_tests::bin("publisher"))
        .arg("drain")
        .arg(&master.bare)
        .output()
        .expect("drain");
    assert!(out.status.success(), "drain: {}", String::from_utf8_lossy(&out.stderr));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("published 1 spooled event(s)"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    sub.wait_exec("service0", &pushed.commit);
    sub.assert_tree(master, "service0", &pushed.commit);
}

#[test]
fn pre_receive_rejects_a_malformed_datacenter_document() {
    let nats = NatsServer::start();
    let (master, _) = master_with_dc1(&nats);
    let before = master.rev("refs/heads/datacenters/dc1").expect("dc1");
    master.on("datacenters/dc1").write("datacenter.json", r#"{ "conf": "bigdatacenter/v1.1" }"#);
    master.commit("bad conf");
    let pushed = master.push();
    assert!(!pushed.ok, "push must be refused");
    assert!(
        pushed.stderr.contains(r#"confcast: rejected refs/heads/datacenters/dc1: datacenter.json: field `conf`: "bigdatacenter/v1.1" must start with "datacenter-configuration/""#),
        "{}",
        pushed.stderr
    );
    assert_eq!(master.rev("refs/heads/datacenters/dc1"), Some(before), "the master ref did not move");

    master.write("datacenter.json", "{ \"conf\": ");
    master.commit("truncated");
    let pushed = master.push();
    assert!(!pushed.ok);
    assert!(pushed.stderr.contains("datacenter.json: EOF while parsing"), "{}", pushed.stderr);

    master
        .on("datacenter-configuration/big")
        .write("datacenter-configuration.json", r#"{"services":[{"name":"a","branch":"m","tagg":"v1"}]}"#);
    master.commit("typo");
    let pushed = master.push();
    assert!(!pushed.ok);
    assert!(
        pushed
            .stderr
            .contains("refs/heads/datacenter-configuration/big: datacenter-configuration.json: unknown field `tagg`"),
        "{}",
        pushed.stderr
    );
}

#[test]
fn a_host_follows_its_inventory() {
    let dc = datacenter().host_flags(&["--host", "host-a"]).start();
    let (master, sub) = (&dc.master, &dc.host);
    let v1 = master.rev("refs/tags/services/pinned/v1.0").expect("tag");
    sub.wait_exec("pinned", &v1);

    // The host stops running `pinned`: it leaves the host.
    master.datacenter(
        "dc1",
        r#"{ "conf": "datacenter-configuration/big",
        "inventories": { "hosts": { "host-a": { "services": ["service0"] } } } }"#,
    );
    sub.wait_exec("pinned", "");
    assert!(!sub.service_dir("pinned").exists());
    let pushed = master.on("services/service0/master").write("more", "1").commit_push("more");
    sub.wait_exec("service0", &pushed.commit);
}

#[test]
fn applications_and_devices_are_distributed_like_services() {
    let nats = NatsServer::start();
    let master = Master::new(&nats.url());
    let app = master.on("applications/billing/main").write("billing.yaml", "workers: 4\n").commit_push("app").commit;
    let dev = master.on("devices/switch-1/prod").write("vlan.cfg", "vlan 10\n").commit_push("device").commit;
    master.tag_push("devices/switch-1/r1");
    master.configuration(
        "edge",
        r#"{"applications":[{"name":"billing","branch":"main"}],"devices":[{"name":"switch-1","branch":"prod","tag":"r1"}]}"#,
    );
    master.datacenter("edge-1", r#"{"conf":"datacenter-configuration/edge"}"#);
    let _relay = Relay::start(&nats.url(), "edge-1", &master.bare);
    let sub = Subscriber::start(&nats.url(), "edge-1", &["--application", "billing", "--device", "switch-1"]);
    sub.wait_exec("billing", &app);
    sub.wait_exec("switch-1", &dev);
    sub.assert_tree(&master, "billing", &app);
    sub.assert_tree(&master, "switch-1", &dev);
    let app2 =
        master.on("applications/billing/main").write("billing.yaml", "workers: 8\n").commit_push("more workers").commit;
    sub.wait_exec("billing", &app2);
    sub.assert_tree(&master, "billing", &app2);
}

#[test]
fn the_index_follows_each_datacenter() {
    let nats = NatsServer::start();
    let (master, first) = master_with_dc1(&nats);
    let _relay = Relay::start(&nats.url(), "dc1", &master.bare);
    let v1 = master.rev("refs/tags/services/pinned/v1.0").expect("tag");
    let key = "confcast/dc1/configurations/services/service0/latest";
    wait_for(Duration::from_secs(20), "the index of service0", || {
        (confcast_tests::index_value(&nats.url(), key) == Some(format!("master/{first}"))).then_some(())
    });
    let pinned = "confcast/dc1/configurations/services/pinned/v1.0";
    assert_eq!(confcast_tests::index_value(&nats.url(), pinned), Some(format!("master/{v1}")));

    let next = master.on("services/service0/master").write("app.conf", "next\n").commit_push("next").commit;
    wait_for(Duration::from_secs(20), "the index to move", || {
        (confcast_tests::index_value(&nats.url(), key) == Some(format!("master/{next}"))).then_some(())
    });
    // A service dropped from the datacenter leaves the index.
    master.configuration("big", r#"{ "services": [ { "name": "service0", "branch": "master" } ] }"#);
    wait_for(Duration::from_secs(20), "the dropped service's key to go", || {
        confcast_tests::index_value(&nats.url(), pinned).is_none().then_some(())
    });
}

#[test]
fn backfill_announces_every_ref() {
    let nats = NatsServer::start();
    let (master, _) = master_with_dc1(&nats);
    let before = confcast_tests::commit_events(&nats.url());
    let refs = confcast_tests::git(&master.bare, &["for-each-ref", "--format=%(refname)"]).lines().count();
    let out = std::process::Command::new(confcast_tests::bin("publisher"))
        .arg("backfill")
        .arg(&master.bare)
        .output()
        .expect("backfill");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("announced {refs} ref(s)"));
    assert_eq!(confcast_tests::commit_events(&nats.url()), before + refs as u64);
    // A relay started afterwards serves the datacenter as usual.
    let _relay = Relay::start(&nats.url(), "dc1", &master.bare);
    let sub = Subscriber::start(&nats.url(), "dc1", &["--service", "service0"]);
    sub.wait_exec("service0", &master.rev("refs/heads/services/service0/master").expect("head"));
}

#[test]
fn signal_and_pidfile_tell_a_process() {
    let dir = tempfile::tempdir().expect("tempdir");
    let hups = dir.path().join("hups");
    let pidfile = dir.path().join("app.pid");
    let mut app = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!(
            "trap 'echo hup >> {}' HUP; echo $$ > {}; while :; do sleep 0.05 & wait $!; done",
            hups.display(),
            pidfile.display()
        ))
        .spawn()
        .expect("app");
    wait_for(Duration::from_secs(5), "the app's pidfile", || std::fs::metadata(&pidfile).ok().filter(|m| m.len() > 0));
    let pid = pidfile.display().to_string();
    let dc = datacenter().host_flags(&["--service", "service0", "--signal", "HUP", "--pidfile", &pid]).start();
    let (master, sub) = (&dc.master, &dc.host);
    let next = master.on("services/service0/master").write("app.conf", "reload me\n").commit_push("reload").commit;
    sub.wait_exec("service0", &next);
    let count = wait_for(Duration::from_secs(5), "two HUPs", || {
        let n = std::fs::read_to_string(&hups).unwrap_or_default().lines().count();
        (n >= 2).then_some(n)
    });
    assert_eq!(count, 2, "one HUP at bootstrap, one for the push");
    let _ = app.kill();
    let _ = app.wait();
}
