//! Unit tests of `rollout`.

use super::*;

fn policy(json: &str) -> Policy {
    serde_json::from_str(json).expect("parses")
}

#[test]
fn waves_resolve_to_cumulative_host_counts() {
    let p = policy(r#"{"waves": [1, "25%", "100%"], "bake_secs": 30}"#);
    assert_eq!(p.validate("rollout"), Ok(()));
    assert_eq!(p.targets(4), vec![1, 1, 4]);
    assert_eq!(p.targets(10), vec![1, 3, 10]);
    assert_eq!(p.targets(0), vec![0, 0, 0]);
    assert_eq!(p.report_timeout_secs, DEFAULT_REPORT_TIMEOUT_SECS);
    assert_eq!(policy(r#"{"waves": ["12.5%", "100%"]}"#).targets(8), vec![1, 8]);
}

#[test]
fn mistakes_are_named_by_field() {
    let cases = [
        (r#"{"waves": []}"#, "rollout.waves"),
        (r#"{"waves": [0, "100%"]}"#, "rollout.waves[0]"),
        (r#"{"waves": [5, 2, "100%"]}"#, "rollout.waves[1]"),
        (r#"{"waves": ["50%", "10%", "100%"]}"#, "rollout.waves[1]"),
        (r#"{"waves": ["lots", "100%"]}"#, "rollout.waves[0]"),
        (r#"{"waves": ["150%"]}"#, "rollout.waves[0]"),
        (r#"{"waves": [1, "50%"]}"#, "rollout.waves"),
        (r#"{"waves": ["100%"], "bake_secs": 172800}"#, "rollout.bake_secs"),
        (r#"{"waves": ["100%"], "report_timeout_secs": 0}"#, "rollout.report_timeout_secs"),
    ];
    for (json, field) in cases {
        let (at, why) = policy(json).validate("rollout").expect_err(json);
        assert_eq!(at, field, "{json}: {why}");
    }
}

fn hosts(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("host-{i:03}")).collect()
}

#[test]
fn a_plan_puts_each_host_in_one_wave_in_an_order_stable_for_the_commit() {
    let p = policy(r#"{"waves": [1, "25%", "100%"]}"#);
    let s0 = ServiceId::service("s0");
    let all = hosts(20);
    let waves = plan(&p, "dc1", &s0, "c1", &all);
    assert_eq!(waves.iter().map(Vec::len).collect::<Vec<_>>(), vec![1, 4, 15]);
    let mut seen: Vec<&String> = waves.iter().flatten().collect();
    seen.sort();
    assert_eq!(seen, all.iter().collect::<Vec<_>>(), "every host once");

    let mut shuffled = all.clone();
    shuffled.reverse();
    assert_eq!(plan(&p, "dc1", &s0, "c1", &shuffled), waves, "the input order does not matter");
    let canaries: std::collections::BTreeSet<String> =
        (0..10).map(|i| plan(&p, "dc1", &s0, &format!("c{i}"), &all)[0][0].clone()).collect();
    assert!(canaries.len() > 1, "not always the same canary: {canaries:?}");
    assert_eq!(plan(&p, "dc1", &s0, "c1", &[]), vec![Vec::<String>::new(); 3]);
}

#[test]
fn a_state_releases_the_hosts_of_its_waves_until_it_halts() {
    let mut state = RolloutState {
        v: crate::WIRE_VERSION,
        dc: "dc1".into(),
        kind: Kind::Service,
        name: "s0".into(),
        ref_name: "refs/heads/services/s0/main".into(),
        commit: "c1ab2c3d4".into(),
        tree: None,
        previous: Some("c0".into()),
        previous_tree: None,
        policy: policy(r#"{"waves": [1, "100%"]}"#),
        waves: vec![vec!["a".into()], vec!["b".into(), "c".into()]],
        wave: 0,
        wave_started_ms: 1,
        healthy_since_ms: None,
        phase: Phase::Rolling,
        started: true,
        reason: None,
        unhealthy: Default::default(),
        started_ms: 1,
        updated_ms: 1,
    };
    assert!(state.is_named("services/s0/main") && state.is_named("c1ab2c3") && !state.is_named("c1ab"));
    state.phase = Phase::Waiting;
    assert!(!state.releases("a"), "nobody before the datacenters it follows completed it");
    state.phase = Phase::Rolling;
    assert!(state.releases("a") && !state.releases("b") && !state.releases("new"));
    state.wave = 1;
    assert!(state.releases("b") && state.releases("c") && !state.releases("new"));
    state.phase = Phase::Halted;
    assert!(!state.releases("a"), "a halted commit is taken by nobody");
    state.phase = Phase::Complete;
    assert!(state.releases("new"), "once complete, every host");
}
