//! `publisher dashboard` in a real browser: Debian's chromium, headless, driven over
//! the DevTools protocol, against a real pipeline (nats-server, git push, relay, two
//! hosts, one of whose `--exec` fails). The page lists the datacenter and its service,
//! follows a push live without a reload, says when NATS is away and catches up when it
//! is back, names the failing host and its exit status on the service's page, and shows
//! a hostile commit subject and author as text.
//!
//! The test saves a screenshot of the page to `target/dashboard.png`; with
//! `CONFCAST_UPDATE_SCREENSHOT=1` also to `docs/dashboard.png`, the one the README shows:
//! `CONFCAST_UPDATE_SCREENSHOT=1 cargo test -p confcast-tests --test dashboard`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use headless_chrome::protocol::cdp::Page::CaptureScreenshotFormatOption;
use headless_chrome::{Browser, LaunchOptions, Tab};

use confcast_tests::{bin, free_port, wait_for, Datacenter, Subscriber};

/// A subject and an author a pusher could write to attack the page (git refuses `<` and
/// `>` in an author's name, not in a subject).
const HOSTILE_SUBJECT: &str = r#"<script>window.pwned = 1</script><img src=x onerror="window.pwned = 2">"#;
const HOSTILE_AUTHOR: &str = r#"Mallory & "Sons" 'x' Jr"#;

/// The running `publisher dashboard`, killed on drop.
struct Dashboard {
    child: Child,
    url: String,
}

impl Dashboard {
    fn start(nats: &str, log: &Path) -> Dashboard {
        Dashboard::start_with(nats, log, &[])
    }

    fn start_with(nats: &str, log: &Path, extra: &[&str]) -> Dashboard {
        let port = free_port();
        let url = format!("http://127.0.0.1:{port}");
        let child = Command::new(bin("publisher"))
            .args(["dashboard", "--listen", &format!("127.0.0.1:{port}"), "--nats", nats])
            .args(extra)
            .stderr(std::fs::File::create(log).expect("dashboard log"))
            .spawn()
            .expect("publisher dashboard starts");
        wait_for(Duration::from_secs(20), "the dashboard to listen", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        });
        Dashboard { child, url }
    }
}

impl Drop for Dashboard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Headless chromium: Debian's, or `CONFCAST_CHROMIUM`. Background networking is off:
/// the machine's network is closed, and the test needs none of it.
fn browser() -> Browser {
    let path = std::env::var_os("CONFCAST_CHROMIUM").map(PathBuf::from).unwrap_or_else(|| "/usr/bin/chromium".into());
    assert!(path.exists(), "{} is missing: scripts/test installs chromium (apt-get install chromium)", path.display());
    let args = ["--disable-gpu", "--disable-quic", "--no-first-run", "--disable-component-update"];
    let options = LaunchOptions::default_builder()
        .path(Some(path))
        .headless(true)
        .sandbox(false)
        .window_size(Some((1400, 900)))
        .args(args.iter().map(std::ffi::OsStr::new).collect())
        .idle_browser_timeout(Duration::from_secs(120))
        .build()
        .expect("launch options");
    Browser::new(options).expect("chromium starts")
}

/// The value of a JavaScript expression on the page, as a string (`undefined` and
/// `null` as such).
fn js(tab: &Tab, expression: &str) -> String {
    let value = tab.evaluate(&format!("String({expression})"), false).expect("evaluates");
    value.value.and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
}

/// Waits until `expression` is `want` on the page.
fn wait_js(tab: &Tab, expression: &str, want: &str, within: Duration) {
    let started = Instant::now();
    loop {
        let got = js(tab, expression);
        if got == want {
            return;
        }
        assert!(started.elapsed() < within, "{expression} is {got:?}, not {want:?}, after {within:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The text of the first element `selector` matches, or `missing`.
fn text(selector: &str) -> String {
    format!("(document.querySelector({selector:?}) || {{textContent: 'missing'}}).textContent.trim()")
}

#[test]
fn the_page_follows_a_push_live_names_a_failed_host_and_escapes_what_pushers_wrote() {
    let mut dc = Datacenter::with_service0().host_flags(&["--service", "service0", "--host-id", "h0"]).start();
    let nats = dc.nats.url();
    let failing = Subscriber::start_with_exec(&nats, "dc1", &["--service", "service0", "--host-id", "h1"], "exit 3");
    failing.wait_exec("service0", &dc.first);
    let logs = tempfile::tempdir().expect("tempdir");
    let dashboard = Dashboard::start(&nats, &logs.path().join("dashboard.log"));
    let browser = browser();
    let tab = browser.new_tab().expect("tab");
    tab.set_default_timeout(Duration::from_secs(20));

    // The page lists the datacenter and its service at the first commit.
    tab.navigate_to(&format!("{}/", dashboard.url)).expect("navigates").wait_until_navigated().expect("loads");
    tab.wait_for_element(r#"section.dc[data-dc="dc1"]"#).expect("dc1 is listed");
    let row = r#"tr.service[data-dc="dc1"][data-kind="service"][data-name="service0"]"#;
    tab.wait_for_element(row).expect("service0 is listed");
    wait_js(&tab, &text(&format!("{row} td.commit")), &dc.first[..7], Duration::from_secs(10));
    js(&tab, "window.confcastTestMark = 'loaded once'");

    // A push: the counts change on the open page, without a reload.
    let pushed = dc.master.on("services/service0/master").write("app.conf", "1\n").commit_as(
        HOSTILE_SUBJECT,
        HOSTILE_AUTHOR,
        "mallory@example.invalid",
    );
    dc.host.wait_exec("service0", &pushed);
    let seen = Instant::now();
    wait_js(&tab, &text(&format!("{row} td.commit")), &pushed[..7], Duration::from_secs(5));
    wait_js(&tab, &text(&format!("{row} td.at")), "1", Duration::from_secs(5));
    wait_js(&tab, &text(&format!("{row} td.failed")), "1", Duration::from_secs(5));
    eprintln!("the page showed the push {:?} after the host's exec", seen.elapsed());
    assert_eq!(js(&tab, "window.confcastTestMark"), "loaded once", "the page was not reloaded");

    // What the pusher wrote is text, never markup.
    assert_eq!(js(&tab, &text(&format!("{row} td.subject"))), HOSTILE_SUBJECT);
    let author = js(&tab, &text(&format!("{row} td.author")));
    assert!(author.contains(HOSTILE_AUTHOR), "the author cell says {author:?}");
    assert_eq!(js(&tab, "typeof window.pwned"), "undefined", "a pushed subject ran as script");
    assert_eq!(
        js(&tab, &format!("document.querySelectorAll('{} td.subject *').length", row.replace('\'', "\\'"))),
        "0"
    );

    // NATS restarts: the page says so, then catches up with a push made after it.
    dc.nats.stop();
    wait_js(&tab, "document.querySelector('#bus').className", "lost", Duration::from_secs(20));
    dc.nats.restart();
    wait_js(&tab, "document.querySelector('#bus').className", "ok", Duration::from_secs(30));
    let after = dc.master.on("services/service0/master").write("app.conf", "2\n").commit_push("after").commit;
    dc.host.wait_exec_within("service0", &after, Duration::from_secs(60));
    wait_js(&tab, &text(&format!("{row} td.commit")), &after[..7], Duration::from_secs(20));
    assert_eq!(js(&tab, "window.confcastTestMark"), "loaded once", "the page was not reloaded");

    // The service's page names the failing host and its exit status.
    let service_page = format!("{}/services/dc1/service/service0", dashboard.url);
    tab.navigate_to(&service_page).expect("navigates").wait_until_navigated().expect("loads");
    let h1 = r#"tr.host[data-host="h1"]"#;
    tab.wait_for_element(h1).expect("h1 is listed");
    wait_js(&tab, &text(&format!("{h1} td.state")), "failed", Duration::from_secs(5));
    assert_eq!(js(&tab, &text(&format!("{h1} td.exec-status"))), "3");
    assert_eq!(js(&tab, &text(r#"tr.host[data-host="h0"] td.state"#)), "done");
    drop(failing);
}

#[test]
fn a_rollout_in_waves_shows_its_wave_and_timeline_and_a_relay_error_is_listed() {
    let staged = r#"{"services":[{"name":"service0","branch":"master"},{"name":"billing","branch":"master"}],
      "rollout":{"waves":[1,"100%"],"bake_secs":600}}"#;
    let dc = Datacenter::with_master(|master| {
        master.configuration("big", staged);
        master.datacenter("dc1", r#"{"conf":"datacenter-configuration/big"}"#);
        master.on("services/billing/master").write("rates.conf", "1\n").commit_push("billing rates");
        master.on("services/service0/master").write("app.conf", "0\n").commit_push("first").commit
    })
    .host_flags(&["--service", "service0", "--service", "billing", "--host-id", "web-1"])
    .start();
    let nats = dc.nats.url();
    let others: Vec<Subscriber> = ["web-2", "web-3"]
        .iter()
        .map(|id| Subscriber::start(&nats, "dc1", &["--service", "service0", "--service", "billing", "--host-id", id]))
        .collect();
    for host in &others {
        host.wait_exec("service0", &dc.first);
    }
    wait_for(Duration::from_secs(20), "every host to report", || {
        ["web-1", "web-2", "web-3"]
            .iter()
            .all(|h| confcast_tests::host_status(&nats, "dc1", h, "service0").is_some())
            .then_some(())
    });
    let logs = tempfile::tempdir().expect("tempdir");
    let dashboard = Dashboard::start(&nats, &logs.path().join("dashboard.log"));
    let pushed = dc.master.on("services/service0/master").write("app.conf", "1\n").commit_as(
        "Raise the connection limit to 512",
        "Ada Operator",
        "ada@example.invalid",
    );
    // A pin to a branch that does not exist, pushed past pre-receive: the relay's error event.
    let typo = staged.replace(r#"{"name":"billing","branch":"master"}"#, r#"{"name":"billing","branch":"typo"}"#);
    dc.master.without_pre_receive(|| dc.master.configuration("big", &typo));
    confcast_tests::wait_error(&nats, "dc1", &["billing", "typo"]);

    let browser = browser();
    let tab = browser.new_tab().expect("tab");
    tab.set_default_timeout(Duration::from_secs(20));
    tab.navigate_to(&format!("{}/", dashboard.url)).expect("navigates").wait_until_navigated().expect("loads");
    let row = r#"tr.service[data-dc="dc1"][data-kind="service"][data-name="service0"]"#;
    tab.wait_for_element(row).expect("service0 is listed");
    wait_js(&tab, &text(&format!("{row} td.commit")), &pushed[..7], Duration::from_secs(10));
    wait_js(&tab, &text(&format!("{row} td.at")), "1", Duration::from_secs(10));
    let rollout = js(&tab, &text(&format!("{row} td.rollout")));
    assert!(rollout.contains("rolling") && rollout.contains("1/2"), "the rollout cell says {rollout:?}");
    assert_eq!(
        js(&tab, &format!("document.querySelectorAll('{} svg.timeline').length", row.replace('\'', "\\'"))),
        "1"
    );
    let errors = js(&tab, &text("#errors li.error"));
    assert!(errors.contains("typo"), "the error list says {errors:?}");
    screenshot(&tab);
}

/// POSTs a rollout control to the dashboard; its status and body.
fn post_control(url: &str, header: bool) -> (u16, String) {
    confcast_tests::block_on(async {
        let mut request = reqwest::Client::new().post(url);
        if header {
            request = request.header("X-Confcast-Control", "1");
        }
        let response = request.send().await.expect("the dashboard answers");
        (response.status().as_u16(), response.text().await.unwrap_or_default())
    })
}

#[test]
fn with_allow_control_the_dashboard_pauses_a_rollout_through_the_relay() {
    let staged =
        r#"{"services":[{"name":"service0","branch":"master"}],"rollout":{"waves":[1,"100%"],"bake_secs":600}}"#;
    let dc = Datacenter::with_master(|master| {
        master.configuration("big", staged);
        master.datacenter("dc1", r#"{"conf":"datacenter-configuration/big"}"#);
        master.on("services/service0/master").write("app.conf", "0\n").commit_push("first").commit
    })
    .host_flags(&["--service", "service0", "--host-id", "h0"])
    .start();
    let nats = dc.nats.url();
    let other = Subscriber::start(&nats, "dc1", &["--service", "service0", "--host-id", "h1"]);
    other.wait_exec("service0", &dc.first);
    let pushed = dc.master.on("services/service0/master").write("app.conf", "1\n").commit_push("next").commit;
    confcast_tests::wait_rollout(&nats, "dc1", "service0", "the rollout", |s| s.commit == pushed);
    let logs = tempfile::tempdir().expect("tempdir");
    let read_only = Dashboard::start(&nats, &logs.path().join("read-only.log"));
    let pause = "/api/v1/control/dc1/service/service0/pause";
    assert_eq!(post_control(&format!("{}{pause}", read_only.url), true).0, 403, "read-only by default");
    let dashboard = Dashboard::start_with(&nats, &logs.path().join("control.log"), &["--allow-control"]);
    let url = format!("{}{pause}", dashboard.url);
    assert_eq!(post_control(&url, false).0, 403, "a control needs the header a cross-site form cannot send");
    let (status, body) = wait_for(Duration::from_secs(20), "the dashboard to know the rollout", || {
        let answer = post_control(&url, true);
        (answer.0 != 404).then_some(answer)
    });
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("rolling -> paused"), "{body}");
    let state = confcast_tests::rollout_state(&nats, "dc1", "service0").expect("state");
    assert_eq!(state.phase, confcast_schemas::rollout::Phase::Paused);
}

/// Saves the page as `target/dashboard.png`, and as `docs/dashboard.png` when asked.
fn screenshot(tab: &Tab) {
    let png = tab.capture_screenshot(CaptureScreenshotFormatOption::Png, None, None, true).expect("screenshot");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    std::fs::write(root.join("target").join("dashboard.png"), &png).expect("target/dashboard.png");
    if std::env::var_os("CONFCAST_UPDATE_SCREENSHOT").is_some() {
        std::fs::write(root.join("docs").join("dashboard.png"), &png).expect("docs/dashboard.png");
    }
}
