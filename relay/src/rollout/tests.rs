//! Unit tests of `rollout`.

use confcast_schemas::message::Health;
use confcast_schemas::rollout::Policy;
use confcast_schemas::Kind;

use super::*;

fn state(waves: &[&[&str]], json: &str) -> RolloutState {
    let policy: Policy = serde_json::from_str(json).expect("policy");
    RolloutState {
        v: WIRE_VERSION,
        dc: "dc1".into(),
        kind: Kind::Service,
        name: "s0".into(),
        ref_name: "refs/heads/services/s0/master".into(),
        commit: "c1".into(),
        tree: None,
        previous: Some("c0".into()),
        previous_tree: None,
        policy,
        waves: waves.iter().map(|w| w.iter().map(|h| (*h).to_owned()).collect()).collect(),
        wave: 0,
        wave_started_ms: 1_000,
        healthy_since_ms: None,
        phase: Phase::Rolling,
        started: true,
        reason: None,
        unhealthy: BTreeMap::new(),
        started_ms: 1_000,
        updated_ms: 1_000,
    }
}

fn reports(hosts: &[(&str, &str, bool)]) -> BTreeMap<String, HostStatus> {
    hosts
        .iter()
        .map(|(host, commit, healthy)| {
            let health = match healthy {
                true => Health::healthy(2_000),
                false => Health::unhealthy(2_000, "--health-cmd exited with exit status: 1"),
            };
            let status = HostStatus {
                v: WIRE_VERSION,
                dc: "dc1".into(),
                host: (*host).into(),
                kind: Kind::Service,
                name: "s0".into(),
                commit: Some((*commit).into()),
                ok: true,
                error: None,
                exec_status: Some(0),
                at_ms: 2_000,
                health: Some(health),
            };
            ((*host).to_owned(), status)
        })
        .collect()
}

#[test]
fn a_healthy_wave_bakes_then_the_next_begins_and_the_last_completes() {
    let s = state(&[&["a"], &["b", "c"]], r#"{"waves": [1, "100%"], "bake_secs": 10}"#);
    let healthy = reports(&[("a", "c1", true), ("b", "c0", true), ("c", "c0", true)]);
    let baking = advance(&s, &healthy, 3_000).expect("the bake starts");
    assert_eq!(baking.healthy_since_ms, Some(3_000));
    assert_eq!(advance(&baking, &healthy, 12_000), None, "still baking");
    let next = advance(&baking, &healthy, 13_000).expect("next wave");
    assert_eq!((next.wave, next.wave_started_ms, next.healthy_since_ms), (1, 13_000, None));
    assert_eq!(advance(&next, &healthy, 14_000), None, "b and c have not reported c1 yet");
    let all = reports(&[("a", "c1", true), ("b", "c1", true), ("c", "c1", true)]);
    assert_eq!(advance(&next, &all, 14_000).expect("done").phase, Phase::Complete, "the last wave has no bake");
}

#[test]
fn a_host_on_its_way_again_restarts_the_bake() {
    let s = state(&[&["a"], &["b"]], r#"{"waves": [1, "100%"], "bake_secs": 10}"#);
    let baking = advance(&s, &reports(&[("a", "c1", true)]), 3_000).expect("the bake starts");
    let restarted = reports(&[("a", "c0", true)]);
    let reset = advance(&baking, &restarted, 4_000).expect("the bake is reset");
    assert_eq!(reset.healthy_since_ms, None);
    assert_eq!(advance(&reset, &restarted, 5_000), None, "then nothing until it is back");
}

#[test]
fn an_unhealthy_canary_halts_with_its_reason() {
    let s = state(&[&["a"], &["b", "c"]], r#"{"waves": [1, "100%"], "bake_secs": 10}"#);
    let sick = reports(&[("a", "c1", false)]);
    let halted = advance(&s, &sick, 3_000).expect("halts");
    assert_eq!(halted.phase, Phase::Halted);
    assert_eq!(halted.unhealthy.get("a").map(String::as_str), Some("--health-cmd exited with exit status: 1"));
    let message = halt_message(&halted);
    assert!(message.contains("a: --health-cmd exited") && message.contains("go back to c0"), "{message}");
    let tolerant = state(&[&["a"], &["b"]], r#"{"waves": [1, "100%"], "max_unhealthy": 1}"#);
    assert_eq!(advance(&tolerant, &sick, 3_000).expect("bakes").phase, Phase::Rolling);
}

#[test]
fn a_wave_followed_only_by_empty_ones_is_the_last() {
    // One host and waves [1, "100%"]: the canary is every host.
    let s = state(&[&["a"], &[]], r#"{"waves": [1, "100%"], "bake_secs": 600}"#);
    let healthy = reports(&[("a", "c1", true)]);
    assert_eq!(advance(&s, &healthy, 3_000).expect("done").phase, Phase::Complete, "no bake before nothing");
}

#[test]
fn empty_waves_are_passed_over() {
    let s = state(&[&["a"], &[], &["b"]], r#"{"waves": [1, 1, "100%"]}"#);
    let healthy = reports(&[("a", "c1", true)]);
    let baking = advance(&s, &healthy, 3_000).expect("bake");
    assert_eq!(advance(&baking, &healthy, 3_000).expect("next").wave, 2);
}
