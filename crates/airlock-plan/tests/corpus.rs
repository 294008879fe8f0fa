//! The public plan corpus (test_data/corpus, see SOURCES.md there) against the example policy:
//! every plan reads, every plan has cases with a decision per change, and the cases hold.

#![allow(clippy::unwrap_used, clippy::panic, clippy::indexing_slicing, reason = "a test fails by panicking")]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use airlock_plan::{Action, Plan, Submission};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn corpus() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("test_data/corpus");
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    assert!(files.len() >= 6, "the corpus went missing: {files:?}");
    files
}

fn policy() -> airlock_policy::Policy {
    let text = std::fs::read_to_string(root().join("examples/policies/terraform.yaml")).unwrap();
    airlock_policy::compile(&text).unwrap().0
}

#[test]
fn every_corpus_plan_reads_with_its_changes() {
    for file in corpus() {
        let plan =
            Plan::parse(&std::fs::read(&file).unwrap()).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        assert!(!plan.changes.is_empty(), "{}", file.display());
        for change in &plan.changes {
            let address = airlock_plan::address::Address::parse(&change.address).unwrap();
            assert_eq!(address.resource_type, change.resource_type);
            assert_eq!(address.to_string(), change.address);
            assert_eq!(change.payload["destructive"], change.action.destructive());
        }
    }
    let replace = Plan::parse(
        &std::fs::read(corpus_file("checkov__plan_with_deleted_resources__tfplan.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(replace.changes[0].action, Action::Replace);
    assert_eq!(replace.changes[0].payload["actions"], serde_json::json!(["create", "delete"]));
    let module = Plan::parse(
        &std::fs::read(corpus_file("terraform-compliance-cli__test_issue-190__plan.out.json")).unwrap(),
    )
    .unwrap();
    let in_module = module.changes.iter().find(|c| c.address.starts_with("module.")).unwrap();
    assert_eq!(in_module.module, "module.mysg");
    assert_eq!(in_module.payload["module_address"], "module.mysg");
}

fn corpus_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("test_data/corpus").join(name)
}

#[test]
fn the_plan_cases_cover_every_corpus_plan_and_hold() {
    let cases_path = root().join("examples/policies/terraform.plan-cases.yaml");
    let cases = airlock_plan::cases::parse(&std::fs::read_to_string(&cases_path).unwrap()).unwrap();
    let policy = policy();
    let mut covered = BTreeSet::new();
    for case in &cases {
        let path = cases_path.parent().unwrap().join(&case.plan).canonicalize().unwrap();
        assert!(case.changes.is_some(), "case `{}` must list every change's decision", case.name);
        let plan = Plan::parse(&std::fs::read(&path).unwrap()).unwrap();
        let differences = airlock_plan::cases::run(&policy, case, plan);
        assert!(differences.is_empty(), "case `{}`: {differences:?}", case.name);
        covered.insert(path);
    }
    for file in corpus() {
        assert!(covered.contains(&file.canonicalize().unwrap()), "no case for {}", file.display());
    }
}

#[test]
fn a_case_that_expects_otherwise_fails_with_what_differed() {
    let text = format!(
        "cases:\n  - name: wrong\n    plan: {}\n    env: production\n    expect: allow\n    changes:\n      aws_security_group.failure: allow\n      nothing.here: deny\n",
        corpus_file("terraform-compliance-cli__test_multiple_failures__plan.out.json").display()
    );
    let cases = airlock_plan::cases::parse(&text).unwrap();
    let plan = Plan::parse(&std::fs::read(&cases[0].plan).unwrap()).unwrap();
    let differences = airlock_plan::cases::run(&policy(), &cases[0], plan);
    let all = differences.join("\n");
    assert!(all.contains("plan: expected allow, got deny"), "{all}");
    assert!(
        all.contains("`aws_security_group.failure`: expected allow, got deny [deny-prod-public-ingress]"),
        "{all}"
    );
    assert!(all.contains("`nothing.here`: expected deny, but the plan has no such change"), "{all}");
    assert!(all.contains("`aws_security_group_rule.another_failure`: not listed"), "{all}");
    let bad = airlock_plan::cases::parse("cases:\n  - plan: x.json\n    expect: maybe\n    extra: 1\n")
        .unwrap_err();
    let messages: Vec<&str> = bad.iter().map(|d| d.message.as_str()).collect();
    assert!(messages.iter().any(|m| m.contains("unknown decision `maybe`")), "{messages:?}");
    assert!(messages.iter().any(|m| m.contains("unknown key `extra`")), "{messages:?}");
    assert!(messages.iter().any(|m| m.contains("has no `env`")), "{messages:?}");
}

#[test]
fn the_topic_map_gives_seed_topics_and_the_rest_keep_tf_topics() {
    let policy = policy();
    let plan = Plan::parse(
        &std::fs::read(corpus_file("terraform-compliance-cli__test_multiple_failures__plan.out.json"))
            .unwrap(),
    )
    .unwrap();
    let job = airlock_plan::plan_job(
        plan,
        "t",
        "p",
        Submission { env: "production".into(), plan_hash: "h".into(), ..Submission::default() },
    );
    let result = airlock_plan::evaluate(&policy, &job);
    let topics: Vec<&str> = result.changes.iter().map(|c| c.topic.as_str()).collect();
    assert_eq!(
        topics,
        ["infra.security_group.create", "infra.security_group.create", "tf.aws_security_group_rule.create"]
    );
    let whole = airlock_policy::compile(
        "version: v1\nterraform:\n  topics:\n    aws_db_*.delete: infra.resource.delete\n    aws_db_*: infra.database\n",
    )
    .unwrap()
    .0;
    assert_eq!(whole.terraform_topic("aws_db_instance", "delete"), "infra.resource.delete");
    assert_eq!(whole.terraform_topic("aws_db_instance", "update"), "infra.database.update");
    assert_eq!(whole.terraform_topic("aws_instance", "update"), "tf.aws_instance.update");
    let errors = airlock_policy::compile(
        "version: v1\nterraform:\n  topics:\n    aws_x: \"not a topic\"\n  other: 1\n",
    )
    .unwrap_err();
    let messages: Vec<&str> = errors.iter().map(|d| d.message.as_str()).collect();
    assert!(messages.iter().any(|m| m.contains("is not a topic")), "{messages:?}");
    assert!(messages.iter().any(|m| m.contains("unknown key `other`")), "{messages:?}");
}

#[test]
fn a_plan_without_changes_is_allowed_with_no_changes() {
    let plan = Plan::parse(br#"{"format_version": "1.2", "planned_values": {}, "resource_changes": [
        {"address": "aws_instance.a", "type": "aws_instance", "name": "a", "change": {"actions": ["no-op"], "before": {}, "after": {}}}
    ]}"#)
    .unwrap();
    let job = airlock_plan::plan_job(
        plan,
        "t",
        "p",
        Submission { env: "production".into(), plan_hash: "h".into(), ..Submission::default() },
    );
    let strict = airlock_policy::compile("version: v1\ndefaults: {decision: deny}\n").unwrap().0;
    let result = airlock_plan::evaluate(&strict, &job);
    assert_eq!(result.evaluation.decision, airlock_policy::Decision::Allow);
    assert_eq!(result.reason(&strict), "no changes");
}

#[test]
fn a_payload_that_is_not_a_plan_is_denied_with_why() {
    let policy = policy();
    let job = airlock_policy::Job::from_json(&serde_json::json!({"topic": "tf.plan.apply", "env": "production", "payload": {"changes": [{"address": "a.b"}]}})).unwrap();
    let result = airlock_plan::evaluate(&policy, &job);
    assert_eq!(result.evaluation.decision, airlock_policy::Decision::Deny);
    assert!(
        result.reason(&policy).contains("`payload.changes[0].type` is missing"),
        "{}",
        result.reason(&policy)
    );
}

#[test]
fn the_deadline_stops_a_plan_evaluation() {
    let policy = policy();
    let plan =
        Plan::parse(&std::fs::read(corpus_file("checkov__plan_with_iam_policies__tfplan.json")).unwrap())
            .unwrap();
    let job = airlock_plan::plan_job(
        plan,
        "t",
        "p",
        Submission { env: "production".into(), plan_hash: "h".into(), ..Submission::default() },
    );
    assert!(airlock_plan::evaluate_within(&policy, &job, &mut || false).is_none());
    let within = airlock_plan::evaluate_within(&policy, &job, &mut || true).unwrap();
    assert_eq!(within, airlock_plan::evaluate(&policy, &job));
    let mut broken = job.clone();
    broken.payload["changes"][3]["type"] = serde_json::Value::Null;
    let result = airlock_plan::evaluate(&policy, &broken);
    assert_eq!(result.malformed.as_deref(), Some("`payload.changes[3].type` is missing or not a string"));
    assert!(airlock_plan::evaluate_within(&policy, &broken, &mut || true).unwrap().malformed.is_some());
}

#[test]
fn each_change_is_explained_as_it_is_decided() {
    let policy = policy();
    let plan =
        Plan::parse(&std::fs::read(corpus_file("checkov__plan_with_iam_policies__tfplan.json")).unwrap())
            .unwrap();
    let job = airlock_plan::plan_job(
        plan,
        "t",
        "p",
        Submission { env: "production".into(), plan_hash: "h".into(), ..Submission::default() },
    );
    let decided = airlock_plan::evaluate(&policy, &job);
    let explained = airlock_plan::explain(&policy, &job, 100);
    assert_eq!(explained.len(), decided.changes.len());
    for (e, d) in explained.iter().zip(&decided.changes) {
        assert_eq!((&e.address, &e.job.topic), (&d.address, &d.topic));
        assert_eq!(e.explanation.evaluation, d.evaluation, "{}", e.address);
        assert_eq!(e.explanation.verdicts.len(), policy.rules().len());
    }
    assert_eq!(airlock_plan::explain(&policy, &job, 2).len(), 2, "at most `max` changes");
    let not_a_plan = airlock_policy::Job::from_json(
        &serde_json::json!({"topic": "tf.plan.apply", "env": "production", "payload": {"changes": 1}}),
    )
    .unwrap();
    assert!(airlock_plan::explain(&policy, &not_a_plan, 100).is_empty());
}
