//! Data-driven evaluation: every policy `X.yaml` next to an `X.tests.yaml`, in `test_data/`
//! and in `examples/policies/`, must pass its cases; and the behaviours YAML cannot express
//! (fail-closed errors, explanations) are checked here directly.

#![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic, reason = "a test fails by panicking")]

use std::path::{Path, PathBuf};

use airlock_policy::{Decision, Job, Verdict, cases, compile};
use serde_json::json;

fn pairs(dir: &Path) -> Vec<(PathBuf, PathBuf)> {
    let mut out: Vec<(PathBuf, PathBuf)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter_map(|p| {
            let name = p.file_name()?.to_str()?.strip_suffix(".tests.yaml")?.to_owned();
            Some((p.with_file_name(format!("{name}.yaml")), p))
        })
        .collect();
    out.sort();
    out
}

fn run_pairs(dir: &Path, at_least: usize) {
    let found = pairs(dir);
    assert!(found.len() >= at_least, "expected {at_least}+ policy/cases pairs in {}", dir.display());
    for (policy_file, cases_file) in found {
        let (policy, _) = compile(&std::fs::read_to_string(&policy_file).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e:?}", policy_file.display()));
        let parsed = cases::parse(&std::fs::read_to_string(&cases_file).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e:?}", cases_file.display()));
        assert!(!parsed.is_empty(), "{} has no cases", cases_file.display());
        let failures = cases::run(&policy, &parsed);
        assert!(failures.is_empty(), "{}: {failures:#?}", cases_file.display());
    }
}

#[test]
fn test_data_cases_pass() {
    run_pairs(&Path::new(env!("CARGO_MANIFEST_DIR")).join("test_data"), 3);
}

#[test]
fn example_policies_pass_their_cases() {
    run_pairs(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/policies"), 2);
}

#[test]
fn seed_policy_decides_as_its_names_say() {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/policies/seed.yaml"),
    )
    .unwrap();
    let (policy, warnings) = compile(&text).unwrap();
    // The seed loads unchanged; `policy check` warns that its text comparison of a network can
    // be slipped past (the hardened form is `seed-hardened.yaml`).
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].message.contains("`0.0.0.0/0`, which is a network"), "{warnings:?}");
    assert_eq!((warnings[0].span.line, warnings[0].span.col), (14, 13));
    let check = |job: serde_json::Value, decision: Decision, rule: Option<&str>| {
        let evaluation = policy.evaluate(&Job::from_json(&job).unwrap());
        assert_eq!(evaluation.decision, decision, "{job}");
        assert_eq!(policy.ids(&evaluation.deciding).first().copied(), rule, "{job}");
    };
    let sg = "infra.security_group.update";
    check(
        json!({"topic": sg, "env": "production", "payload": {"cidr": "0.0.0.0/0"}}),
        Decision::Deny,
        Some("deny-prod-public-ingress"),
    );
    check(
        json!({"topic": "infra.resource.delete", "env": "production"}),
        Decision::RequireHuman,
        Some("require-approval-prod-delete"),
    );
    check(
        json!({"topic": "infra.cluster.recreate", "env": "production"}),
        Decision::Throttle,
        Some("throttle-bulk-recreate"),
    );
    check(json!({"topic": sg, "env": "staging", "payload": {"cidr": "0.0.0.0/0"}}), Decision::Allow, None);
    // Case and padding of topic and env are normalised away; a list is tested by its elements.
    for variant in [
        json!({"topic": "INFRA.security_group.update", "env": "production", "payload": {"cidr": "0.0.0.0/0"}}),
        json!({"topic": sg, "env": " Production", "payload": {"cidr": "0.0.0.0/0"}}),
        json!({"topic": sg, "env": "production", "payload": {"cidr": ["0.0.0.0/0"]}}),
    ] {
        check(variant, Decision::Deny, Some("deny-prod-public-ingress"));
    }
    let throttle = &policy.rules()[2];
    let limit = throttle.limit.as_ref().unwrap();
    assert_eq!((limit.rate, limit.per_secs), (1, 600));
}

fn fanout_policy(decision: &str) -> airlock_policy::Policy {
    let text = format!(
        "version: v1\nrules:\n  - id: scan\n    when: {{ topic: t.scan, payload: {{ \"items[*].open\": true }} }}\n    decision: {decision}\n"
    );
    compile(&text).unwrap().0
}

fn huge_job() -> Job {
    let items: Vec<_> = (0..20_000).map(|_| json!({"open": false})).collect();
    Job::from_json(&json!({"topic": "t.scan", "env": "dev", "payload": {"items": items}})).unwrap()
}

#[test]
fn an_erroring_deny_rule_denies() {
    let policy = fanout_policy("deny");
    let evaluation = policy.evaluate(&huge_job());
    assert_eq!(evaluation.decision, Decision::Deny);
    assert_eq!(policy.ids(&evaluation.deciding), ["scan"]);
    assert_eq!(evaluation.errors.len(), 1);
    let explanation = policy.explain(&huge_job());
    assert_eq!(explanation.evaluation, evaluation);
    assert!(matches!(&explanation.verdicts[0], Verdict::Error(e) if e.contains("more than")));
}

#[test]
fn an_erroring_allow_rule_does_not_allow() {
    let text = "version: v1\ndefaults: { decision: deny }\nrules:\n  - id: scan\n    when: { topic: t.scan, payload: { \"items[*].open\": true } }\n    decision: allow\n";
    let (policy, _) = compile(text).unwrap();
    let evaluation = policy.evaluate(&huge_job());
    assert_eq!(evaluation.decision, Decision::Deny);
    assert!(evaluation.deciding.is_empty());
    assert_eq!(evaluation.errors.len(), 1);
}

#[test]
fn an_erroring_require_human_rule_still_requires_a_human() {
    let evaluation = fanout_policy("require_human").evaluate(&huge_job());
    assert_eq!(evaluation.decision, Decision::RequireHuman);
}

#[test]
fn explain_names_the_failing_condition() {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/policies/seed.yaml"),
    )
    .unwrap();
    let (policy, _) = compile(&text).unwrap();
    let job = Job::from_json(&json!({"topic": "infra.security_group.update", "env": "production", "payload": {"cidr": "10.0.0.0/8"}})).unwrap();
    let explanation = policy.explain(&job);
    assert_eq!(
        explanation.verdicts[0],
        Verdict::NotMatched("`payload.cidr` is `\"10.0.0.0/8\"`, expected `\"0.0.0.0/0\"`".into())
    );
    assert_eq!(
        explanation.verdicts[1],
        Verdict::NotMatched(
            "`topic` is `infra.security_group.update`, expected `infra.resource.delete`".into()
        )
    );
    let missing =
        Job::from_json(&json!({"topic": "infra.security_group.update", "env": "production"})).unwrap();
    assert_eq!(
        policy.explain(&missing).verdicts[0],
        Verdict::NotMatched("`payload.cidr` is missing, expected `\"0.0.0.0/0\"`".into())
    );
}

#[test]
fn rule_hashes_follow_rule_content_only() {
    let a = compile("version: v1\nrules:\n  - id: r\n    when: { topic: a }\n    decision: deny\n  - id: s\n    when: { topic: b }\n    decision: deny\n").unwrap().0;
    let b = compile("version: v1\nrules:\n  - id: r\n    when: { topic: a }\n    decision: deny\n  - id: s\n    when: { topic: c }\n    decision: deny\n").unwrap().0;
    assert_eq!(a.rules()[0].hash, b.rules()[0].hash);
    assert_ne!(a.rules()[1].hash, b.rules()[1].hash);
    assert_ne!(a.hash(), b.hash());
}

#[test]
fn check_warns_on_values_a_variant_slips_past() {
    let text = "version: v1\nrules:\n  - id: a\n    when: { env: Production, replicas: \"3\", src: \"::/0\" }\n    decision: deny\n";
    let (_, warnings) = compile(text).unwrap();
    let messages: Vec<&str> = warnings.iter().map(|w| w.message.as_str()).collect();
    assert_eq!(messages.len(), 3, "{messages:?}");
    assert!(messages[0].contains("`Production` can never match"), "{messages:?}");
    assert!(messages[1].contains("which is a number"), "{messages:?}");
    assert!(messages[2].contains("`::/0`, which is a network"), "{messages:?}");
    let (_, none) = compile("version: v1\nrules:\n  - id: a\n    when: { src: { cidr_overlaps: \"::/0\" }, replicas: 3 }\n    decision: deny\n").unwrap();
    assert!(none.is_empty(), "{none:?}");
}
