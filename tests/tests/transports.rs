//! The relay fetching from a master served over HTTP by `git http-backend`, with the
//! token from `--git-token-file` (bearer, or basic with `--git-http-user`): pushes reach
//! the hosts, a wrong token fetches nothing and never shows up in the relay's log. And
//! over `ssh://` with `--git-ssh-key`: one `ssh` per fetch, with the key, the port and
//! protocol v2.

use std::path::Path;
use std::process::{Child, Command};
use std::time::Duration;

use base64::Engine as _;
use confcast_tests::git_http::GitHttp;
use confcast_tests::{bin, wait_for, Master, NatsServer, Relay, Subscriber};

const TOKEN: &str = "s3cret-t0ken-of-the-master";

fn token_file(dir: &std::path::Path, token: &str) -> String {
    let path = dir.join("token");
    std::fs::write(&path, format!("{token}\n")).expect("token file");
    path.display().to_string()
}

#[test]
fn a_master_over_http_with_a_bearer_token() {
    let nats = NatsServer::start();
    let (master, first) = Master::with_service0(&nats.url());
    let http = GitHttp::start(&master.bare, &format!("Bearer {TOKEN}"));
    let secrets = tempfile::tempdir().expect("tempdir");
    let token = token_file(secrets.path(), TOKEN);
    let relay = Relay::start_with(&nats.url(), "dc1", &http.url("master.git"), &["--git-token-file", &token]);
    let sub = Subscriber::start(&nats.url(), "dc1", &["--service", "service0"]);
    sub.wait_exec("service0", &first);
    let second = master.on("services/service0/master").write("app.conf", "1\n").commit_push("second").commit;
    sub.wait_exec("service0", &second);
    sub.assert_tree(&master, "service0", &second);
    assert!(http.served.load(std::sync::atomic::Ordering::SeqCst) > 0);
    assert_eq!(http.refused.load(std::sync::atomic::Ordering::SeqCst), 0, "every fetch carried the token");
    assert!(!relay.log().contains(TOKEN), "the token is in the relay's log");
}

#[test]
fn a_master_over_http_with_basic_authentication_and_a_wrong_token() {
    let nats = NatsServer::start();
    let (master, first) = Master::with_service0(&nats.url());
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("relay:{TOKEN}"));
    let http = GitHttp::start(&master.bare, &format!("Basic {basic}"));
    let secrets = tempfile::tempdir().expect("tempdir");

    // A wrong token: refused by the server, nothing applied, the error logged without it.
    let wrong = token_file(secrets.path(), "not-the-token");
    let refused_relay = Relay::start_with(
        &nats.url(),
        "dc1",
        &http.url("master.git"),
        &["--git-token-file", &wrong, "--git-http-user", "relay"],
    );
    wait_for(Duration::from_secs(20), "the master to refuse the relay", || {
        (http.refused.load(std::sync::atomic::Ordering::SeqCst) > 0).then_some(())
    });
    wait_for(Duration::from_secs(20), "the relay to log the failed fetch", || {
        refused_relay.log().contains("credentials").then_some(())
    });
    assert!(!refused_relay.log().contains("not-the-token"), "{}", refused_relay.log());
    drop(refused_relay);

    let token = token_file(secrets.path(), TOKEN);
    let _relay = Relay::start_with(
        &nats.url(),
        "dc1",
        &http.url("master.git"),
        &["--git-token-file", &token, "--git-http-user", "relay"],
    );
    let sub = Subscriber::start(&nats.url(), "dc1", &["--service", "service0"]);
    sub.wait_exec("service0", &first);
    sub.assert_tree(&master, "service0", &first);
}

/// An `ssh` that does on this machine what sshd does on the master's host: runs the
/// requested `git-upload-pack '<path>'` with the environment sent (`GIT_PROTOCOL`).
/// Each call is logged, one line: its arguments, then the protocol asked for.
fn fake_ssh(dir: &Path) -> std::path::PathBuf {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).expect("bin dir");
    let script = format!(
        r#"#!/bin/sh
echo "$* | $GIT_PROTOCOL" >> '{log}'
while [ $# -gt 0 ]; do
    case "$1" in
        -G) exit 0 ;;
        -i|-o|-p|-l|-F) shift 2 ;;
        -*) shift ;;
        *) shift; break ;;
    esac
done
exec sh -c "$*"
"#,
        log = dir.join("ssh.log").display()
    );
    let ssh = bin.join("ssh");
    std::fs::write(&ssh, script).expect("fake ssh");
    let mut permissions = std::fs::metadata(&ssh).expect("meta").permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut permissions, 0o755);
    std::fs::set_permissions(&ssh, permissions).expect("chmod");
    bin
}

/// The relay, run with `ssh` found first in `path_first`; killed on drop.
struct SshRelay(Child);

impl SshRelay {
    fn start(nats: &str, master_url: &str, key: &Path, path_first: &Path, state: &Path) -> SshRelay {
        let path = format!("{}:{}", path_first.display(), std::env::var("PATH").unwrap_or_default());
        let log = std::fs::File::create(state.join("relay.log")).expect("log");
        let child = Command::new(bin("relay"))
            .args(["--nats", nats, "--dc", "dc1", "--master", master_url, "--git-ssh-key"])
            .arg(key)
            .arg("--state-dir")
            .arg(state.join("state"))
            .env("PATH", path)
            .env("RUST_LOG", "info")
            .stderr(log)
            .spawn()
            .expect("relay starts");
        SshRelay(child)
    }
}

impl Drop for SshRelay {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_master_over_ssh_with_a_key() {
    let nats = NatsServer::start();
    let (master, first) = Master::with_service0(&nats.url());
    let dir = tempfile::tempdir().expect("tempdir");
    let fake = fake_ssh(dir.path());
    let key = dir.path().join("relay's key");
    std::fs::write(&key, "not read by the fake ssh\n").expect("key");
    let url = format!("ssh://git@master.example:2222{}", master.bare.display());
    let _relay = SshRelay::start(&nats.url(), &url, &key, &fake, dir.path());
    let sub = Subscriber::start(&nats.url(), "dc1", &["--service", "service0"]);
    sub.wait_exec("service0", &first);
    let second = master.on("services/service0/master").write("app.conf", "1\n").commit_push("second").commit;
    sub.wait_exec("service0", &second);
    sub.assert_tree(&master, "service0", &second);

    let calls = std::fs::read_to_string(dir.path().join("ssh.log")).expect("ssh ran");
    let relay_log = std::fs::read_to_string(dir.path().join("relay.log")).unwrap_or_default();
    assert!(calls.lines().count() >= 2, "one fetch at start, one per push: {calls}\n{relay_log}");
    for call in calls.lines() {
        // git reads the variant from the program's name; probing it with `ssh -G`
        // would double the processes of every fetch.
        assert!(!call.contains("-G"), "probed: {call}");
        assert!(call.contains(&format!("-i {} -o IdentitiesOnly=yes", key.display())), "{call}");
        assert!(call.contains("-p2222 git@master.example git-upload-pack"), "{call}");
        assert!(call.ends_with("| version=2"), "protocol v2 asked for: {call}");
    }
}
