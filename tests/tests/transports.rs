//! The relay fetching from a master served over HTTP by `git http-backend`, with the
//! token from `--git-token-file` (bearer, or basic with `--git-http-user`): pushes reach
//! the hosts, a wrong token fetches nothing and never shows up in the relay's log.

use std::time::Duration;

use base64::Engine as _;
use confcast_tests::git_http::GitHttp;
use confcast_tests::{wait_for, Master, NatsServer, Relay, Subscriber};

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
