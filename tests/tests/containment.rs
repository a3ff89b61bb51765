//! A pushed tree never reaches outside its service directory: a tree whose links lead
//! out of it (alone or through one another), loop, or whose entries have names no
//! directory can hold is refused at the door by `pre-receive`, naming the ref, the path
//! and the target; and if the door was bypassed, by the relay, with an error event. The
//! host keeps its last good tree and runs no `--exec`.

use std::io::Write;
use std::process::{Command, Stdio};

use confcast_tests::{git, wait_error, Datacenter, Master, NatsServer};

const REF: &str = "refs/heads/services/service0/master";

/// Two links of service0, each harmless alone: `a/b/deep` is the tree's root, and `x`
/// goes up from it, to `/etc/passwd` of the host.
fn links_that_leave_through_one_another(master: &Master) -> &Master {
    master.on("services/service0/master").symlink("a/b/deep", "../..").symlink("x", "a/b/deep/../etc/passwd")
}

fn assert_refused(stderr: &str, parts: &[&str]) {
    for part in parts.iter().chain(&["confcast: push refused; nothing was changed"]) {
        assert!(stderr.contains(part), "{part:?} missing from the push's output:\n{stderr}");
    }
}

#[test]
fn pre_receive_refuses_links_that_leave_through_one_another() {
    let dc = Datacenter::with_service0().start();
    let (master, sub, first) = (&dc.master, &dc.host, &dc.first);

    links_that_leave_through_one_another(master).commit("escape");
    let pushed = master.push();
    assert!(!pushed.ok, "the push went through: {}", pushed.stderr);
    assert_refused(
        &pushed.stderr,
        &[
            &format!("confcast: rejected {REF}: symlink \"x\" points outside the service tree"),
            "\"a/b/deep/../etc/passwd\" leads to \"../etc/passwd\" through symlink \"a/b/deep\"",
        ],
    );
    assert_eq!(master.rev(REF).as_deref(), Some(first.as_str()), "the ref did not move");
    sub.assert_tree(master, "service0", first);

    // The pusher drops the commit; the next good push is the only one the host applies.
    git(&master.work, &["reset", "-q", "--hard", first]);
    let good = master.on("services/service0/master").write("app.conf", "good\n").commit_push("good").commit;
    let execs = sub.wait_exec("service0", &good);
    assert_eq!(execs.len(), 2, "nothing ran for the refused push: {execs:?}");
    sub.assert_tree(master, "service0", &good);
}

#[test]
fn the_relay_refuses_links_that_leave_through_one_another_behind_pre_receive() {
    let dc = Datacenter::with_service0().start();
    let (nats, master, sub, first) = (&dc.nats, &dc.master, &dc.host, &dc.first);

    let evil = master.without_pre_receive(|| links_that_leave_through_one_another(master).commit_push("escape")).commit;
    wait_error(
        &nats.url(),
        "dc1",
        &[
            &format!("service \"service0\" at {evil} ({REF})"),
            "symlink \"x\" points outside the service tree: \"a/b/deep/../etc/passwd\" leads to \"../etc/passwd\" \
             through symlink \"a/b/deep\"; not published",
        ],
    );
    sub.assert_tree(master, "service0", first);

    // Removing the links passes pre-receive again, and reaches the host.
    let fixed = master
        .on("services/service0/master")
        .remove("x")
        .remove("a/b/deep")
        .write("app.conf", "fixed\n")
        .commit_push("fixed")
        .commit;
    let execs = sub.wait_exec("service0", &fixed);
    assert_eq!(execs.len(), 2, "the refused commit never ran exec: {execs:?}");
    sub.assert_tree(master, "service0", &fixed);
}

#[test]
fn pre_receive_refuses_a_loop_of_links_on_branches_and_tags() {
    let nats = NatsServer::start();
    let (master, first) = Master::with_service0(&nats.url());

    master.on("services/service0/master").symlink("a", "b").symlink("b", "a").commit("loop");
    let pushed = master.push();
    assert!(!pushed.ok, "the push went through: {}", pushed.stderr);
    assert_refused(&pushed.stderr, &[&format!("confcast: rejected {REF}: symlink \"a\" -> \"b\" never resolves")]);
    assert_eq!(master.rev(REF).as_deref(), Some(first.as_str()), "the ref did not move");

    let tag = "refs/tags/services/service0/v1";
    let pushed = master.push_refspec(&format!("HEAD:{tag}"));
    assert!(!pushed.ok, "the tag was pushed: {}", pushed.stderr);
    assert_refused(&pushed.stderr, &[&format!("confcast: rejected {tag}: symlink \"a\" -> \"b\" never resolves")]);
    assert_eq!(master.rev(tag), None);
}

/// Writes a tree object holding exactly `entries` (mode, name, id) into the work clone,
/// in git's order, names unchecked: `git mktree` refuses some of the names tested here.
fn raw_tree(master: &Master, entries: &[(&str, &[u8], &str)]) -> String {
    let mut sorted = entries.to_vec();
    sorted.sort_by_key(|(mode, name, _)| [*name, if *mode == "40000" { b"/" } else { b"" }].concat());
    let mut bytes = Vec::new();
    for (mode, name, id) in sorted {
        bytes.extend_from_slice(format!("{mode} ").as_bytes());
        bytes.extend_from_slice(name);
        bytes.push(0);
        bytes.extend((0..id.len()).step_by(2).map(|i| u8::from_str_radix(&id[i..i + 2], 16).expect("hex id")));
    }
    let mut child = Command::new("git")
        .arg("-C")
        .arg(&master.work)
        .args(["hash-object", "-t", "tree", "--literally", "-w", "--stdin"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("git runs");
    child.stdin.take().expect("stdin").write_all(&bytes).expect("write tree");
    let out = child.wait_with_output().expect("git hash-object");
    assert!(out.status.success(), "git hash-object failed");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn pre_receive_refuses_entries_no_directory_can_hold() {
    // Only names git itself sends are tried here: `git push` refuses to send a tree with
    // an empty name ("empty filename in tree entry"), and a NUL ends a name in git's
    // tree format, so no tree can hold one. The hooks' own tests cover the empty name.
    let nats = NatsServer::start();
    let (master, first) = Master::with_service0(&nats.url());
    master.on("services/service0/master");
    let blob = git(&master.work, &["rev-parse", "HEAD:app.conf"]);

    // On top of the ref's commit: only what changed is read, a new directory included.
    let conf = raw_tree(&master, &[("100644", b"a.conf", &blob), ("100644", b"..", &blob)]);
    let root = raw_tree(&master, &[("100644", b"app.conf", &blob), ("40000", b"conf", &conf)]);
    let commit = git(&master.work, &["commit-tree", &root, "-p", &first, "-m", "dot-dot"]);
    let pushed = master.push_refspec(&format!("{commit}:{REF}"));
    assert!(!pushed.ok, "the push went through: {}", pushed.stderr);
    assert_refused(&pushed.stderr, &[&format!("confcast: rejected {REF}: tree entry \"conf/..\" is refused")]);
    assert_eq!(master.rev(REF).as_deref(), Some(first.as_str()), "the ref did not move");

    // A new ref: the whole tree is read.
    let new_ref = "refs/heads/services/service1/master";
    let root = raw_tree(&master, &[("100644", b"app.conf", &blob), ("100644", b"etc/passwd", &blob)]);
    let commit = git(&master.work, &["commit-tree", &root, "-m", "slash"]);
    let pushed = master.push_refspec(&format!("{commit}:{new_ref}"));
    assert!(!pushed.ok, "the push went through: {}", pushed.stderr);
    assert_refused(&pushed.stderr, &[&format!("confcast: rejected {new_ref}: tree entry \"etc/passwd\" is refused")]);
    assert_eq!(master.rev(new_ref), None);
}
