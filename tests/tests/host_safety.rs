//! A host stays safe whatever reaches it: a forged tree whose links leave it is never
//! applied, the local API never serves bytes from outside a tree (even one altered on
//! disk), applied files get the owner and modes the operator chose and keep them, and
//! the API listens only where the operator allows.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use confcast_schemas::{encode, subject, ChangeKind, Entry, FileMode, Kind};
use confcast_tests::{bin, forged_update, free_port, git, http_get, publish_raw, wait_for, Datacenter, Subscriber};
use serde_bytes::ByteBuf;

/// GET over TCP: (status, body as text).
fn get(addr: &str, path: &str) -> (u16, String) {
    let (status, body) = http_get(&mut std::net::TcpStream::connect(addr).expect("connect"), path);
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// The entries of a snapshot of the tree in `work` (every file and link, as git sees
/// them) and its git tree id.
fn snapshot_of(work: &Path) -> (Vec<Entry>, String) {
    git(work, &["init", "-q"]);
    git(work, &["add", "-A"]);
    let tree = git(work, &["write-tree"]).trim().to_owned();
    let mut entries = Vec::new();
    for line in git(work, &["ls-tree", "-r", "-z", &tree]).split('\0').filter(|l| !l.is_empty()) {
        let (meta, path) = line.split_once('\t').expect("ls-tree line");
        let fields: Vec<&str> = meta.split(' ').collect();
        let (mode, blob) = (fields[0], fields[2]);
        let full = work.join(path);
        let (mode, content) = match mode {
            "120000" => {
                (FileMode::Symlink, std::fs::read_link(&full).expect("link").into_os_string().into_encoded_bytes())
            }
            "100755" => (FileMode::Executable, std::fs::read(&full).expect("file")),
            _ => (FileMode::Regular, std::fs::read(&full).expect("file")),
        };
        entries.push(Entry {
            path: ByteBuf::from(path.as_bytes().to_vec()),
            change: ChangeKind::Add,
            mode: Some(mode),
            blob: Some(blob.to_owned()),
            content: Some(ByteBuf::from(content)),
            object: None,
            from_path: None,
        });
    }
    (entries, tree)
}

#[test]
fn a_forged_tree_whose_links_leave_through_one_another_is_never_applied() {
    let dc = Datacenter::with_service0().start();
    let (nats, master, sub, first) = (&dc.nats, &dc.master, &dc.host, &dc.first);

    // Each link looks harmless alone; `x` leaves through `deep`. The announced tree id
    // is right, so only the containment check can refuse it.
    let work = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(work.path().join("a/b")).expect("mkdir");
    std::fs::write(work.path().join("app.conf"), "forged\n").expect("write");
    std::os::unix::fs::symlink("../..", work.path().join("a/b/deep")).expect("link");
    std::os::unix::fs::symlink("a/b/deep/../etc/passwd", work.path().join("x")).expect("link");
    let (entries, tree) = snapshot_of(work.path());
    let forged_commit = "f".repeat(40);
    let forged = forged_update(None, &forged_commit, &tree, true, entries);
    publish_raw(&nats.url(), &subject::update_subject("dc1", Kind::Service, "service0"), encode(&forged));

    let line = wait_for(Duration::from_secs(10), "the subscriber to refuse the forged tree", || {
        sub.log().lines().find(|l| l.contains("points outside the service tree")).map(str::to_owned)
    });
    for part in [
        "refs/heads/services/service0/master",
        &forged_commit,
        "symlink \"x\" points outside the service tree",
        "leads to \"../etc/passwd\" through symlink \"a/b/deep\"",
    ] {
        assert!(line.contains(part), "{part} in {line}");
    }
    assert_eq!(sub.execs().len(), 1, "nothing ran: {:?}", sub.execs());
    sub.assert_tree(master, "service0", first);
    let trees = std::fs::read_dir(sub.state_dir().join("trees/service-service0")).expect("trees");
    assert!(
        trees.filter_map(Result::ok).all(|e| !e.file_name().to_string_lossy().contains(&forged_commit)),
        "the refused tree was removed"
    );

    // The host goes on.
    let next = master.on("services/service0/master").write("app.conf", "real\n").commit_push("real").commit;
    sub.wait_exec("service0", &next);
    sub.assert_tree(master, "service0", &next);
}

#[test]
fn the_local_api_never_serves_a_file_from_outside_the_tree() {
    let addr = format!("127.0.0.1:{}", free_port());
    let dc = Datacenter::with_service0().host_flags(&["--service", "service0", "--listen", &addr]).start();
    let sub = &dc.host;
    wait_for(Duration::from_secs(10), "the API", || std::net::TcpStream::connect(&addr).ok());

    // Someone with write access to the host alters the live tree: links out of it,
    // absolute and relative, directly and through each other.
    let outside = tempfile::tempdir().expect("tempdir");
    let secret = outside.path().join("secret");
    std::fs::write(&secret, "only root may read this\n").expect("secret");
    let tree = std::fs::canonicalize(sub.service_dir("service0")).expect("tree");
    std::os::unix::fs::symlink(&secret, tree.join("absolute")).expect("link");
    let depth = tree.components().count();
    let up = "../".repeat(depth);
    let relative = format!("{up}{}", secret.strip_prefix("/").expect("absolute").display());
    std::os::unix::fs::symlink(&relative, tree.join("relative")).expect("link");
    std::fs::create_dir(tree.join("sub")).expect("mkdir");
    std::os::unix::fs::symlink("../..", tree.join("sub/up")).expect("link");
    std::os::unix::fs::symlink("inside", tree.join("loop")).expect("link");
    std::os::unix::fs::symlink("loop", tree.join("inside")).expect("link");
    std::os::unix::fs::symlink("app.conf", tree.join("alias")).expect("link");

    let (status, body) = get(&addr, "/v1/services/service0/files/app.conf");
    assert_eq!(status, 200, "{body}");
    let (status, alias) = get(&addr, "/v1/services/service0/files/alias");
    assert_eq!((status, &alias), (200, &body), "a link inside the tree is followed");
    for path in ["absolute", "relative", "sub/up/etc/hostname", "loop"] {
        let (status, answer) = get(&addr, &format!("/v1/services/service0/files/{path}"));
        assert_eq!(status, 404, "{path}: {answer}");
        assert!(!answer.contains("only root"), "{path}: {answer}");
    }
    let (status, _) = get(&addr, "/v1/services/service0/files/../../../etc/hostname");
    assert!(status == 400 || status == 404, "{status}");
    let (status, _) = get(&addr, "/v1/services/../files/etc/hostname");
    assert!(status == 400 || status == 404, "{status}");
    // The whole-service answer lists links as links, never reads through them.
    let (status, listing) = get(&addr, "/v1/services/service0");
    assert_eq!(status, 200, "{listing}");
    assert!(!listing.contains("only root"), "{listing}");
    assert!(listing.contains(&format!("\"symlink\":\"{}\"", secret.display())), "{listing}");
}

/// The uid and gid files are given: nobody's as root (as CI runs), else our own (a
/// user can only give files to itself).
fn owner_ids() -> (u32, u32) {
    let probe = tempfile::tempfile().expect("tempfile");
    let meta = probe.metadata().expect("meta");
    if meta.uid() == 0 {
        (65534, 65534)
    } else {
        (meta.uid(), meta.gid())
    }
}

/// Every entry under `root` (itself included) as (path, uid, gid, mode), links not
/// followed.
fn stats(root: &Path) -> Vec<(String, u32, u32, u32, bool)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(p) = stack.pop() {
        let meta = std::fs::symlink_metadata(&p).expect("meta");
        let rel = p.strip_prefix(root).expect("under root").display().to_string();
        out.push((rel, meta.uid(), meta.gid(), meta.permissions().mode() & 0o7777, meta.file_type().is_symlink()));
        if meta.is_dir() {
            stack.extend(std::fs::read_dir(&p).expect("dir").map(|e| e.expect("entry").path()));
        }
    }
    out
}

fn assert_perms(sub: &Subscriber, (uid, gid): (u32, u32)) {
    let tree = std::fs::canonicalize(sub.service_dir("service0")).expect("tree");
    for (path, u, g, mode, link) in stats(&tree) {
        assert_eq!((u, g), (uid, gid), "owner of {path:?}");
        if link {
            continue;
        }
        let expected = match path.as_str() {
            "" | "conf" | "bin" => 0o710,
            "bin/run.sh" => 0o750,
            _ => 0o640,
        };
        assert_eq!(mode, expected, "mode of {path:?}: {mode:o}");
    }
}

#[test]
fn files_get_the_owner_and_modes_the_operator_chose_and_keep_them() {
    let (uid, gid) = owner_ids();
    let (uid_s, gid_s) = (uid.to_string(), gid.to_string());
    let perms = [
        "--owner",
        &uid_s,
        "--group",
        &gid_s,
        "--file-mode",
        "0640",
        "--dir-mode",
        "0755",
        // A per-service override wins over the default.
        "--dir-mode",
        "service0=0710",
    ];
    let mut args = vec!["--service", "service0", "--verify-interval-secs", "1"];
    args.extend(perms);
    let dc = Datacenter::with_service0().host_flags(&args).start();
    let (master, sub) = (&dc.master, &dc.host);

    let c1 = master
        .on("services/service0/master")
        .write("conf/app.conf", "secret = 1\n")
        .write("bin/run.sh", "#!/bin/sh\n")
        .chmod("bin/run.sh", true)
        .symlink("current", "conf/app.conf")
        .commit_push("layout")
        .commit;
    sub.wait_exec("service0", &c1);
    sub.assert_tree(master, "service0", &c1);
    assert_perms(sub, (uid, gid));
    // Diffs carry files over by hard link, recycle old trees: still right.
    for i in 0..4 {
        let c = master
            .on("services/service0/master")
            .write("conf/app.conf", format!("secret = {i}\n"))
            .write(&format!("conf/new{i}.conf"), "x\n")
            .commit_push("more")
            .commit;
        sub.wait_exec("service0", &c);
        sub.assert_tree(master, "service0", &c);
        assert_perms(sub, (uid, gid));
    }

    // `subscriber verify` with the same settings: intact. A mode changed by hand is
    // found, and the running subscriber sets it back.
    let verify = || {
        let out = Command::new(bin("subscriber"))
            .args(["verify", "--dir"])
            .arg(&sub.dir)
            .arg("--state-dir")
            .arg(sub.state_dir())
            .args(perms)
            .output()
            .expect("subscriber verify runs");
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let (code, out) = verify();
    assert_eq!(code, Some(0), "{out}");
    let file = sub.service_dir("service0").join("conf/app.conf");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    let (code, out) = verify();
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("PERMISSIONS") && out.contains("conf/app.conf: mode 0666, not 0640"), "{out}");
    wait_for(Duration::from_secs(15), "the subscriber to set the mode again", || {
        (std::fs::metadata(&file).expect("meta").permissions().mode() & 0o7777 == 0o640).then_some(())
    });
    assert!(sub.log().contains("owner or mode changed on this host"), "{}", sub.log());
    assert_perms(sub, (uid, gid));
}

#[test]
fn the_api_listens_only_where_the_operator_allows() {
    // A TCP address other hosts can reach is refused at start, naming the flag.
    let out = Command::new(bin("subscriber"))
        .args(["--dc", "dc1", "--service", "s", "--dir", "/nonexistent", "--listen"])
        .arg(format!("0.0.0.0:{}", free_port()))
        .output()
        .expect("subscriber runs");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not a loopback address") && stderr.contains("--listen-remote"), "{stderr}");

    // A unix socket gets its mode and group before anyone can connect.
    let (_, gid) = owner_ids();
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("api.sock");
    let socket_arg = socket.display().to_string();
    let gid_s = gid.to_string();
    let _dc = Datacenter::with_service0()
        .host_flags(&[
            "--service",
            "service0",
            "--listen",
            &socket_arg,
            "--listen-mode",
            "0660",
            "--listen-group",
            &gid_s,
        ])
        .start();
    let meta = wait_for(Duration::from_secs(10), "the socket", || std::fs::metadata(&socket).ok());
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(meta.gid(), gid);
    let mut stream = std::os::unix::net::UnixStream::connect(&socket).expect("connect");
    assert_eq!(http_get(&mut stream, "/healthz"), (200, b"ok\n".to_vec()));
}
