//! Properties over generated plans: the order of `resource_changes` never changes a plan's
//! decision, its deciding rules or its reason; a value marked sensitive never reaches a payload
//! or a decision; addresses with any `for_each` key print and parse back.

#![allow(clippy::unwrap_used, clippy::panic, clippy::indexing_slicing, reason = "a test fails by panicking")]

use airlock_plan::address::{Address, Key, Mode};
use airlock_plan::{Plan, Submission};
use proptest::prelude::*;
use serde_json::{Value, json};

const SECRET: &str = "PLANTED-s3cr3t-9f1c";

fn policy() -> airlock_policy::Policy {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/policies/terraform.yaml");
    airlock_policy::compile(&std::fs::read_to_string(path).unwrap()).unwrap().0
}

const TYPES: [&str; 7] = [
    "aws_security_group",
    "aws_security_group_rule",
    "aws_db_instance",
    "aws_iam_policy",
    "aws_instance",
    "aws_s3_bucket",
    "aws_iam_role_policy",
];
const ACTIONS: [&[&str]; 6] =
    [&["create"], &["update"], &["delete"], &["delete", "create"], &["create", "delete"], &["no-op"]];
const CIDRS: [&str; 4] = ["0.0.0.0/0", "10.0.0.0/8", "::/0", "192.168.1.0/24"];

/// One generated resource change: type, actions, a cidr, an IAM grant.
fn change() -> impl Strategy<Value = (usize, usize, usize, bool, u8)> {
    (0..TYPES.len(), 0..ACTIONS.len(), 0..CIDRS.len(), any::<bool>(), 0u8..3)
}

fn resource_change(i: usize, (t, a, c, wide, module): (usize, usize, usize, bool, u8)) -> Value {
    let ty = TYPES[t];
    let prefix = match module {
        0 => String::new(),
        1 => "module.net.".to_owned(),
        _ => format!("module.env[\"k.{i}\"]."),
    };
    let after = json!({
        "type": "ingress",
        "cidr_blocks": [CIDRS[c]],
        "ingress": [{"cidr_blocks": [CIDRS[c]], "ipv6_cidr_blocks": []}],
        "policy": if wide { r#"{"Statement":[{"Action":"iam:*","Resource":"*"}]}"# } else { r#"{"Statement":[]}"# },
    });
    json!({
        "address": format!("{prefix}{ty}.r{i}"),
        "module_address": if prefix.is_empty() { Value::Null } else { json!(prefix.trim_end_matches('.')) },
        "mode": "managed",
        "type": ty,
        "name": format!("r{i}"),
        "provider_name": "registry.terraform.io/hashicorp/aws",
        "change": {"actions": ACTIONS[a], "before": {}, "after": after, "after_unknown": {}},
    })
}

fn summary(
    plan_json: &Value,
    env: &str,
    policy: &airlock_policy::Policy,
) -> (String, Vec<String>, String, String) {
    let plan = Plan::parse(plan_json.to_string().as_bytes()).unwrap();
    let job = airlock_plan::plan_job(
        plan,
        "t",
        "p",
        Submission { env: env.into(), plan_hash: "h".into(), ..Submission::default() },
    );
    let result = airlock_plan::evaluate(policy, &job);
    (
        result.evaluation.decision.to_string(),
        policy.ids(&result.evaluation.deciding).into_iter().map(str::to_owned).collect(),
        result.reason(policy),
        format!("{:?}", result.counts()),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn any_permutation_of_the_changes_gives_the_same_summary(
        changes in prop::collection::vec(change(), 0..24),
        seed in any::<u64>(),
        production in any::<bool>(),
    ) {
        let policy = policy();
        let env = if production { "production" } else { "staging" };
        let raw: Vec<Value> = changes.into_iter().enumerate().map(|(i, c)| resource_change(i, c)).collect();
        let mut shuffled = raw.clone();
        // A Fisher-Yates shuffle driven by the seed.
        let mut state = seed | 1;
        for i in (1..shuffled.len()).rev() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            shuffled.swap(i, (state % (i as u64 + 1)) as usize);
        }
        let a = summary(&json!({"format_version": "1.2", "resource_changes": raw}), env, &policy);
        let b = summary(&json!({"format_version": "1.2", "resource_changes": shuffled}), env, &policy);
        prop_assert_eq!(a, b);
    }

    #[test]
    fn sensitive_values_never_reach_a_payload_or_a_decision(
        value in sensitive_value(),
        before_too in any::<bool>(),
    ) {
        let (after, mask) = value;
        let (before, before_mask) = if before_too { (after.clone(), mask.clone()) } else { (json!({}), json!({})) };
        let plan = json!({"format_version": "1.1", "resource_changes": [{
            "address": "aws_db_instance.main", "type": "aws_db_instance", "name": "main",
            "change": {"actions": ["delete", "create"], "before": before, "after": after,
                "before_sensitive": before_mask, "after_sensitive": mask, "after_unknown": {}},
        }]});
        let parsed = Plan::parse(plan.to_string().as_bytes()).unwrap();
        let job = airlock_plan::plan_job(parsed, "t", "p", Submission { env: "production".into(), plan_hash: "h".into(), ..Submission::default() });
        prop_assert!(!job.payload.to_string().contains(SECRET), "{}", job.payload);
        let policy = policy();
        let result = airlock_plan::evaluate(&policy, &job);
        prop_assert!(!result.changes_json(&policy).to_string().contains(SECRET));
        prop_assert!(!result.reason(&policy).contains(SECRET));
        prop_assert!(job.payload.to_string().contains("visible-value"), "non-sensitive values stay: {}", job.payload);
    }

    #[test]
    fn addresses_with_any_keys_print_and_parse_back(
        modules in prop::collection::vec(("[a-z_][a-z0-9_-]{0,8}", prop::option::of(key())), 0..4),
        data in any::<bool>(),
        ty in "[a-z][a-z0-9_]{0,12}",
        name in "[a-z_][a-z0-9_-]{0,8}",
        k in prop::option::of(key()),
    ) {
        prop_assume!(ty != "module" && !(data && ty == "data"));
        let module = modules
            .iter()
            .map(|(n, k)| format!("module.{n}{}", k.as_ref().map(ToString::to_string).unwrap_or_default()))
            .collect::<Vec<_>>()
            .join(".");
        let address = Address {
            module,
            mode: if data { Mode::Data } else { Mode::Managed },
            resource_type: ty,
            name,
            key: k,
        };
        let text = address.to_string();
        prop_assert_eq!(Address::parse(&text).unwrap(), address, "{}", text);
    }
}

fn key() -> impl Strategy<Value = Key> {
    prop_oneof![
        any::<u32>().prop_map(|n| Key::Index(u64::from(n))),
        "[a-z.\\[\\]\"\\\\ -]{0,10}".prop_map(Key::Name),
    ]
}

/// An `after` value with the secret planted at sensitive places, a visible value beside it, and
/// the matching `after_sensitive` mask.
fn sensitive_value() -> impl Strategy<Value = (Value, Value)> {
    let leaf = prop_oneof![
        Just((json!(SECRET), json!(true))),
        Just((json!(format!("prefix-{SECRET}")), json!(true))),
        Just((json!({"inner": SECRET, "other": "visible-value"}), json!({"inner": true}))),
        Just((json!([SECRET, "visible-value"]), json!([true, false]))),
        Just((json!({"whole": [SECRET]}), json!(true))),
        Just((json!([SECRET, SECRET]), json!(true))),
        Just((json!([{"deep": [SECRET]}]), json!([{"deep": [true]}]))),
    ];
    prop::collection::vec(("[a-z]{1,6}", leaf), 1..5).prop_map(|fields| {
        let mut after = serde_json::Map::new();
        let mut mask = serde_json::Map::new();
        after.insert("plain".into(), json!("visible-value"));
        for (name, (value, m)) in fields {
            let name = format!("f_{name}");
            after.insert(name.clone(), value);
            mask.insert(name, m);
        }
        (Value::Object(after), Value::Object(mask))
    })
}
