//! The operator's side of rollouts in waves, against a real nats-server and the real
//! `publisher` binary: `publisher rollout pause|resume|abort|promote` sends a signed
//! control to each datacenter's relay (played here by a responder that verifies the
//! signature as the relay does) and reports its answer; `publisher status` shows the
//! rollout state a relay wrote: the wave and its hosts, the bake left, the halt and why.

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

use confcast_schemas::message::now_ms;
use confcast_schemas::rollout::{Action, Control, ControlReply, Phase, Policy, RolloutState, Wave};
use confcast_schemas::sign::{Verifier, SIGNATURE_HEADER};
use confcast_schemas::{decode, encode, streams, subject, HostStatus, Kind, ServiceHead, WIRE_VERSION};
use confcast_tests::{bin, block_on, run, NatsServer, Ran, TempDir};
use futures::StreamExt;

const REF: &str = "refs/heads/services/service0/master";
const SHORT_REF: &str = "services/service0/master";
const OLD: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const NEW: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

/// A relay's answer to controls in a test: what it replies to a control it accepted.
#[derive(Clone, Copy)]
enum Relay {
    /// Verifies the signature, then reports the rollout paused (or why not).
    Answers,
    /// Receives the control and never answers.
    Silent,
}

/// Plays the relay of `dc` on the control subject: each control received is sent on
/// the returned channel (with its signature check); accepted ones get a reply naming a
/// change, refused ones the reason. Returns once it listens.
fn relay(
    nats: &NatsServer,
    dc: &str,
    trusted: Vec<String>,
    mode: Relay,
) -> mpsc::Receiver<(Control, Result<(), String>)> {
    let (seen_tx, seen_rx) = mpsc::channel();
    let (ready_tx, ready_rx) = mpsc::channel();
    let (url, dc) = (nats.url(), dc.to_owned());
    std::thread::spawn(move || {
        block_on(async move {
            let client = async_nats::connect(&url).await.expect("connect");
            let subject = subject::control_subject(&dc);
            let mut requests = client.subscribe(subject.clone()).await.expect("subscribe");
            client.flush().await.expect("flush");
            ready_tx.send(()).expect("ready");
            let verifier = Verifier::new(&trusted).expect("trusted keys");
            while let Some(message) = requests.next().await {
                let signature =
                    message.headers.as_ref().and_then(|h| h.get(SIGNATURE_HEADER)).map(|v| v.as_str().to_owned());
                let checked =
                    verifier.verify(&subject, None, &message.payload, signature.as_deref()).map_err(|e| e.to_string());
                let control: Control = decode(&message.payload).expect("a control");
                let reply = ControlReply {
                    v: WIRE_VERSION,
                    dc: dc.clone(),
                    changed: match &checked {
                        Ok(()) => vec![format!("service service0 {}: rolling -> paused", &NEW[..7])],
                        Err(_) => vec![],
                    },
                    refused: checked.clone().err().map(|why| format!("control refused: {why}")),
                };
                let _ = seen_tx.send((control, checked));
                if let (Relay::Answers, Some(to)) = (mode, message.reply) {
                    client.publish(to, encode(&reply).into()).await.expect("reply");
                    client.flush().await.expect("flush");
                }
            }
        })
    });
    ready_rx.recv_timeout(Duration::from_secs(5)).expect("the relay listens");
    seen_rx
}

/// `publisher rollout <args>` against `nats`.
fn rollout(nats: &NatsServer, args: &[&str]) -> Ran {
    run(Command::new(bin("publisher")).arg("rollout").args(args).args(["--nats", &nats.url()]))
}

/// A new operator key made by `publisher keygen`: its file and public key.
fn operator_key(dir: &TempDir) -> (String, String) {
    let path = dir.path().join("operator.nk");
    let out = run(Command::new(bin("publisher")).arg("keygen").arg(&path));
    assert_eq!(out.code, Some(0), "{out:?}");
    (path.display().to_string(), out.stdout.trim().to_owned())
}

/// The state and status streams of `dc`, as its relay creates them.
fn datacenter_streams(nats: &NatsServer, dc: &str) {
    block_on(async {
        let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.expect("connect"));
        js.get_or_create_stream(streams::state(dc)).await.expect("state stream");
        js.get_or_create_stream(streams::status(dc)).await.expect("status stream");
    })
}

/// Publishes `payload` on `subject` through JetStream, acknowledged.
fn publish(nats: &NatsServer, subject: String, payload: Vec<u8>) {
    block_on(async {
        let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.expect("connect"));
        js.publish(subject, payload.into()).await.expect("publish").await.expect("ack");
    })
}

/// The rollout of NEW of service0 in `dc`: h3 the canary, then h1 and h2, 30 s bake.
fn rollout_state(dc: &str, phase: Phase) -> RolloutState {
    RolloutState {
        v: WIRE_VERSION,
        dc: dc.into(),
        kind: Kind::Service,
        name: "service0".into(),
        ref_name: REF.into(),
        commit: NEW.into(),
        tree: None,
        previous: Some(OLD.into()),
        previous_tree: None,
        policy: Policy {
            waves: vec![Wave::Hosts(1), Wave::Percent("100%".into())],
            bake_secs: 30,
            max_unhealthy: 0,
            report_timeout_secs: 60,
        },
        waves: vec![vec!["h3".into()], vec!["h1".into(), "h2".into()]],
        wave: 0,
        wave_started_ms: now_ms(),
        healthy_since_ms: Some(now_ms()),
        phase,
        started: true,
        reason: None,
        unhealthy: BTreeMap::new(),
        started_ms: now_ms(),
        updated_ms: now_ms(),
    }
}

fn publish_state(nats: &NatsServer, state: &RolloutState) {
    publish(nats, subject::rollout_subject(&state.dc, state.kind, &state.name), encode(state));
}

/// dc1 as its relay and hosts left it: service0's head at NEW, the canary h3 there,
/// h1 and h2 still at OLD.
fn dc1_rolling_out(nats: &NatsServer) {
    datacenter_streams(nats, "dc1");
    let head = ServiceHead {
        v: WIRE_VERSION,
        kind: Kind::Service,
        name: "service0".into(),
        ref_name: REF.into(),
        branch: "master".into(),
        version: "latest".into(),
        commit: Some(NEW.into()),
        tree: None,
        about: None,
    };
    publish(nats, subject::head_subject("dc1", Kind::Service, "service0"), encode(&head));
    for (host, commit) in [("h1", OLD), ("h2", OLD), ("h3", NEW)] {
        let status = HostStatus {
            v: WIRE_VERSION,
            dc: "dc1".into(),
            host: host.into(),
            kind: Kind::Service,
            name: "service0".into(),
            commit: Some(commit.into()),
            ok: true,
            error: None,
            exec_status: Some(0),
            at_ms: now_ms(),
            health: None,
        };
        publish(nats, subject::status_subject("dc1", host, Kind::Service, "service0"), encode(&status));
    }
}

#[test]
fn a_signed_control_reaches_the_relay_and_its_answer_is_reported() {
    let nats = NatsServer::start();
    let dir = TempDir::new().expect("tempdir");
    let (key, public) = operator_key(&dir);
    let seen = relay(&nats, "dc1", vec![public.clone()], Relay::Answers);

    let out = rollout(&nats, &["pause", SHORT_REF, "--dc", "dc1", "--signing-key", &key, "--timeout-secs", "3"]);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(out.stdout, format!("dc1: service service0 {}: rolling -> paused\n", &NEW[..7]), "{out:?}");
    let (control, checked) = seen.recv_timeout(Duration::from_secs(5)).expect("the relay got the control");
    assert_eq!(checked, Ok(()), "signed with the operator's key");
    assert_eq!((control.action, control.target.as_str(), control.dc.as_str()), (Action::Pause, SHORT_REF, "dc1"));
    assert!(control.by.contains('@'), "who asks: {control:?}");
    assert!(control.at_ms.abs_diff(now_ms()) < 10_000, "when: {control:?}");

    let out = rollout(&nats, &["promote", &NEW[..10], "--dc", "dc1", "--signing-key", &key, "--timeout-secs", "3"]);
    assert_eq!(out.code, Some(0), "{out:?}");
    let (again, _) = seen.recv_timeout(Duration::from_secs(5)).expect("the relay got the second control");
    assert_eq!((again.action, again.target.as_str()), (Action::Promote, &NEW[..10]));
    assert_ne!(again.nonce, control.nonce, "each control is new");

    // Unsigned, or signed by a key the relay does not trust: refused, exit 1.
    let out = rollout(&nats, &["abort", SHORT_REF, "--dc", "dc1", "--timeout-secs", "3"]);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stdout.starts_with("dc1: abort services/service0/master refused: control refused: unsigned"),
        "{out:?}"
    );
    assert!(out.stderr.contains("abort of the rollout of services/service0/master"), "{out:?}");
    assert_eq!(
        seen.recv_timeout(Duration::from_secs(5)).expect("seen").1,
        Err("unsigned message (this host accepts only messages signed by its relays' keys)".to_owned())
    );
    let other = TempDir::new().expect("tempdir");
    let (stranger, _) = operator_key(&other);
    let out = rollout(&nats, &["resume", SHORT_REF, "--dc", "dc1", "--signing-key", &stranger, "--timeout-secs", "3"]);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stdout.contains("does not trust"), "{out:?}");
    assert!(seen.recv_timeout(Duration::from_secs(5)).expect("seen").1.is_err());

    // A key file that is not one is a usage error: nothing is sent.
    let bad = dir.path().join("bad.nk");
    std::fs::write(&bad, "not a seed\n").expect("write");
    let out = rollout(&nats, &["pause", SHORT_REF, "--dc", "dc1", "--signing-key", &bad.display().to_string()]);
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(out.stderr.contains("bad.nk"), "{out:?}");
    let out = rollout(&nats, &["stop", SHORT_REF, "--dc", "dc1"]);
    assert_eq!(out.code, Some(2), "{out:?}");
}

#[test]
fn a_relay_that_does_not_answer_fails_the_control_after_the_timeout() {
    let nats = NatsServer::start();
    let _seen = relay(&nats, "dc1", vec![], Relay::Silent);
    let out = rollout(&nats, &["pause", SHORT_REF, "--dc", "dc1", "--timeout-secs", "1"]);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert_eq!(out.stdout, "dc1: pause services/service0/master: no relay answered within 1s\n", "{out:?}");
    assert!(out.took < Duration::from_secs(5), "{out:?}");

    let out = rollout(&nats, &["pause", SHORT_REF, "--dc", "dc2", "--timeout-secs", "1"]);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stdout.contains("dc2: pause services/service0/master: no relay answered"), "{out:?}");
}

#[test]
fn without_dc_the_control_goes_to_the_datacenters_rolling_the_target_out() {
    let nats = NatsServer::start();
    dc1_rolling_out(&nats);
    publish_state(&nats, &rollout_state("dc1", Phase::Rolling));
    // dc2 rolls out another commit: not asked.
    datacenter_streams(&nats, "dc2");
    let mut elsewhere = rollout_state("dc2", Phase::Rolling);
    elsewhere.commit = "c".repeat(40);
    elsewhere.ref_name = "refs/heads/services/service0/other".into();
    publish_state(&nats, &elsewhere);
    let seen = relay(&nats, "dc1", vec![], Relay::Answers);
    let unasked = relay(&nats, "dc2", vec![], Relay::Answers);

    let out = rollout(&nats, &["pause", SHORT_REF, "--timeout-secs", "3"]);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.starts_with("dc1: service service0"), "{out:?}");
    assert_eq!(seen.recv_timeout(Duration::from_secs(5)).expect("dc1 asked").0.dc, "dc1");
    assert!(unasked.try_recv().is_err(), "dc2 has no rollout of the target: {out:?}");
}

#[test]
fn status_shows_the_wave_its_hosts_the_bake_and_a_halt_with_every_reason() {
    let nats = NatsServer::start();
    dc1_rolling_out(&nats);
    publish_state(&nats, &rollout_state("dc1", Phase::Rolling));
    let status = |timeout: &str| {
        run(Command::new(bin("publisher")).args([
            "status",
            SHORT_REF,
            "--nats",
            &nats.url(),
            "--timeout-secs",
            timeout,
        ]))
    };

    let out = status("1");
    assert_eq!(out.code, Some(1), "not complete: {out:?}");
    let line = out.stdout.lines().find(|l| l.starts_with("dc1: ")).unwrap_or_else(|| panic!("{out:?}"));
    assert!(line.starts_with("dc1: 1/3 at bbbbbbb (rolling out in waves, wave 1/2 (h3), bake "), "{out:?}");
    assert!(line.contains(" s left; 2 held: h1, h2)"), "held, not failed: {out:?}");
    assert!(out.stdout.contains("0 host(s) failed, 2 pending"), "{out:?}");

    let mut halted = rollout_state("dc1", Phase::Halted);
    halted.reason = Some("wave 1 failed".into());
    halted.unhealthy = BTreeMap::from([
        ("h3".to_owned(), "unhealthy: connection refused".to_owned()),
        ("h4".to_owned(), "no report within 60 s".to_owned()),
    ]);
    publish_state(&nats, &halted);
    let out = status("20");
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.took < Duration::from_secs(10), "a halt is not waited out: {out:?}");
    assert!(
        out.stdout.contains(
            "rollout halted at wave 1/2: wave 1 failed; unhealthy: h3 unhealthy: connection refused, \
             h4 no report within 60 s"
        ),
        "{out:?}"
    );
    assert!(out.stdout.contains("rollout of services/service0/master halted in dc1"), "{out:?}");

    // Once complete, every host is expected at the commit again.
    publish_state(&nats, &rollout_state("dc1", Phase::Complete));
    let out = status("1");
    assert!(out.stdout.contains("2 pending: h1 at aaaaaaa, h2 at aaaaaaa"), "{out:?}");
    assert!(!out.stdout.contains("waves"), "{out:?}");
}
