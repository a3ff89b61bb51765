//! What a control document names is checked at the door: `pre-receive` refuses a
//! `conf` naming no configuration, an inventory entry its configuration does not pin,
//! a pin to a branch or tag that does not exist, and the deletion of a ref a datacenter
//! pins (unless pushed with `-o confcast.allow-unpin`), judging the master as the whole
//! push would leave it and naming the nearest existing name. Behind a bypassed hook, the
//! relay refuses the same mistake and the hosts keep their last good tree.

use std::process::Command;

use confcast_tests::{git, wait_error, Datacenter, Master, NatsServer, Pushed};

const DC1: &str = "refs/heads/datacenters/dc1";
const CONF: &str = "refs/heads/datacenter-configuration/web";
const WEB: &str = "refs/heads/services/web/master";
const DC1_DOC: &str =
    r#"{"conf":"datacenter-configuration/web","inventories":{"hosts":{"host-a":{"services":["web"]}}}}"#;

/// Service `web` (branch `master`, tag `v1`), configuration `web` pinning its master
/// branch, and datacenter `dc1` following it with `host-a` running web: pushed in the
/// order pre-receive asks for, what is named before what names it. Returns web's commit.
fn master_with_web(nats: &NatsServer) -> (Master, String) {
    let master = Master::new(&nats.url());
    let web = publish_web(&master);
    (master, web)
}

/// Pushes what [`master_with_web`] describes; returns web's commit.
fn publish_web(master: &Master) -> String {
    let web = master.on("services/web/master").write("web.conf", "v1\n").commit_push("web v1").commit;
    master.tag_push("services/web/v1");
    master.configuration("web", r#"{"services":[{"name":"web","branch":"master"}]}"#);
    master.datacenter("dc1", DC1_DOC);
    web
}

/// Commits `json` as `file` on the local branch `branch` and pushes it, refused or not.
fn push_document(master: &Master, branch: &str, file: &str, json: &str) -> Pushed {
    master.on(branch).write(file, json).commit(&format!("{file} on {branch}"));
    master.push()
}

fn assert_refused(pushed: &Pushed, parts: &[&str]) {
    assert!(!pushed.ok, "the push went through: {}", pushed.stderr);
    for part in parts.iter().chain(&["confcast: push refused; nothing was changed"]) {
        assert!(pushed.stderr.contains(part), "{part:?} missing from the push's output:\n{}", pushed.stderr);
    }
}

/// `git push -o <option> origin <refspec>...`: (success, stderr).
fn push_with_option(master: &Master, option: &str, refspecs: &[&str]) -> (bool, String) {
    let out = Command::new("git")
        .arg("-C")
        .arg(&master.work)
        .args(["push", "-q", "-o", option, "origin"])
        .args(refspecs)
        .output()
        .expect("git push runs");
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn datacenter_mistakes_are_refused_with_the_nearest_name() {
    let nats = NatsServer::start();
    let (master, _) = master_with_web(&nats);
    let before = master.rev(DC1);

    let typo = DC1_DOC.replace(r#"["web"]"#, r#"["wbe"]"#);
    assert_refused(
        &push_document(&master, "datacenters/dc1", "datacenter.json", &typo),
        &["confcast: rejected refs/heads/datacenters/dc1: datacenter.json: field \
           `inventories.hosts.host-a.services[0]`: service \"wbe\" is not in datacenter-configuration/web, the \
           configuration this datacenter follows; did you mean `web`?"],
    );
    assert_eq!(master.rev(DC1), before, "the ref did not move");

    let missing = DC1_DOC.replace("datacenter-configuration/web", "datacenter-configuration/wbe");
    assert_refused(
        &push_document(&master, "datacenters/dc1", "datacenter.json", &missing),
        &["confcast: rejected refs/heads/datacenters/dc1: datacenter.json: field `conf`: \
           \"datacenter-configuration/wbe\" names refs/heads/datacenter-configuration/wbe, which does not exist on \
           the master; did you mean `datacenter-configuration/web`?"],
    );
    assert_eq!(master.rev(DC1), before, "the ref did not move");
}

#[test]
fn pins_to_missing_branches_and_tags_are_refused() {
    let nats = NatsServer::start();
    let (master, _) = master_with_web(&nats);
    let before = master.rev(CONF);

    let branch = r#"{"services":[{"name":"web","branch":"mastr"}]}"#;
    assert_refused(
        &push_document(&master, "datacenter-configuration/web", "datacenter-configuration.json", branch),
        &["confcast: rejected refs/heads/datacenter-configuration/web: datacenter-configuration.json: field \
           `services[0].branch`: \"mastr\" names refs/heads/services/web/mastr, which does not exist on the \
           master; did you mean `master`?"],
    );
    let tag = r#"{"services":[{"name":"web","branch":"master","tag":"v2"}]}"#;
    assert_refused(
        &push_document(&master, "datacenter-configuration/web", "datacenter-configuration.json", tag),
        &["confcast: rejected refs/heads/datacenter-configuration/web: datacenter-configuration.json: field \
           `services[0].tag`: \"v2\" names refs/tags/services/web/v2, which does not exist on the master; did you \
           mean `v1`?"],
    );
    assert_eq!(master.rev(CONF), before, "the ref did not move");
}

#[test]
fn a_wrong_rollout_policy_is_refused_naming_the_field() {
    let nats = NatsServer::start();
    let (master, _) = master_with_web(&nats);
    let before = master.rev(CONF);
    let shrinking = r#"{"services":[{"name":"web","branch":"master","rollout":{"waves":["50%","10%","100%"]}}]}"#;
    assert_refused(
        &push_document(&master, "datacenter-configuration/web", "datacenter-configuration.json", shrinking),
        &["confcast: rejected refs/heads/datacenter-configuration/web: datacenter-configuration.json: field \
           `services[0].rollout.waves[1]`: waves are cumulative"],
    );
    let unfinished = r#"{"services":[{"name":"web","branch":"master"}],"rollout":{"waves":[1,"50%"]}}"#;
    assert_refused(
        &push_document(&master, "datacenter-configuration/web", "datacenter-configuration.json", unfinished),
        &["field `rollout.waves`: the last wave must be \"100%\""],
    );
    let unknown = r#"{"services":[{"name":"web","branch":"master"}],"rollout":{"waves":["100%"],"bake":30}}"#;
    assert_refused(
        &push_document(&master, "datacenter-configuration/web", "datacenter-configuration.json", unknown),
        &["datacenter-configuration.json", "bake"],
    );
    assert_eq!(master.rev(CONF), before, "the ref did not move");
}

#[test]
fn deleting_a_pinned_branch_needs_the_override() {
    let nats = NatsServer::start();
    let (master, web) = master_with_web(&nats);

    let refused = master.push_refspec(&format!(":{WEB}"));
    assert_refused(
        &refused,
        &["confcast: rejected refs/heads/services/web/master: datacenter-configuration.json in \
           refs/heads/datacenter-configuration/web: field `services[0].branch`: \"master\" still names this ref; \
           deleting it would leave the pin unresolvable in datacenter dc1 (to delete it anyway, push with \
           `-o confcast.allow-unpin`"],
    );
    assert_eq!(master.rev(WEB).as_deref(), Some(web.as_str()), "the branch is still there");

    let (ok, stderr) = push_with_option(&master, "confcast.allow-unpinn", &[&format!(":{WEB}")]);
    assert!(!ok, "a mistyped override went through: {stderr}");
    assert!(
        stderr.contains("ignoring push option \"confcast.allow-unpinn\"; did you mean `confcast.allow-unpin`?"),
        "{stderr}"
    );

    let (ok, stderr) = push_with_option(&master, "confcast.allow-unpin", &[&format!(":{WEB}")]);
    assert!(ok, "the override was refused: {stderr}");
    assert!(
        stderr.contains("confcast: note: deleting refs/heads/services/web/master as asked (confcast.allow-unpin)"),
        "the pusher is told what the override let through: {stderr}"
    );
    assert_eq!(master.rev(WEB), None, "the branch is gone");
}

#[test]
fn a_push_that_brings_what_it_names_is_accepted() {
    let nats = NatsServer::start();
    let (master, _) = master_with_web(&nats);

    // Release v2 of web: the tag, the configuration pinning it, and the master branch
    // it no longer needs deleted, in one push.
    master.on("services/web/master").write("web.conf", "v2\n").commit("web v2");
    git(&master.work, &["tag", "services/web/v2"]);
    let v2 = r#"{"services":[{"name":"web","branch":"master","tag":"v2"}]}"#;
    assert_refused(
        &push_document(&master, "datacenter-configuration/web", "datacenter-configuration.json", v2),
        &["field `services[0].tag`: \"v2\" names refs/tags/services/web/v2, which does not exist on the master"],
    );
    let release = master.push_refspecs(&[
        "refs/tags/services/web/v2:refs/tags/services/web/v2",
        &format!("refs/heads/datacenter-configuration/web:{CONF}"),
        &format!(":{WEB}"),
    ]);
    assert!(release.ok, "the release was refused: {}", release.stderr);
    assert!(!release.stderr.contains("confcast: note"), "nothing to note: {}", release.stderr);
    assert!(master.rev("refs/tags/services/web/v2").is_some() && master.rev(WEB).is_none());
}

#[test]
fn behind_a_bypassed_pre_receive_the_relay_keeps_the_last_good_state() {
    let dc = Datacenter::with_master(publish_web).host_flags(&["--host", "host-a"]).first_exec_of("web").start();
    let (nats, master, sub, web) = (&dc.nats, &dc.master, &dc.host, &dc.first);

    let typo = r#"{"services":[{"name":"web","branch":"mastr"}]}"#;
    master.without_pre_receive(|| master.configuration("web", typo));
    wait_error(
        &nats.url(),
        "dc1",
        &[&format!(
            "service \"web\" is pinned to refs/heads/services/web/mastr, which does not exist on the master; \
             keeping {web}"
        )],
    );
    assert_eq!(sub.execs().len(), 1, "nothing ran: {:?}", sub.execs());
    sub.assert_tree(master, "web", web);

    // Fixed through the door: the host follows master again.
    master.configuration("web", r#"{"services":[{"name":"web","branch":"master"}]}"#);
    let next = master.on("services/web/master").write("web.conf", "fixed\n").commit_push("after the fix").commit;
    let execs = sub.wait_exec("web", &next);
    assert_eq!(execs.len(), 2, "the host never lost web: {execs:?}");
    sub.assert_tree(master, "web", &next);
}
