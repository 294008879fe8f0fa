//! How long reading and deciding a large plan takes: a generated plan of 10,000 resource
//! changes (security groups with ingress, IAM policies, databases, buckets, instances, in and
//! out of modules; creates, updates, deletes, replaces; some values sensitive) under
//! examples/policies/terraform.yaml. Run with `cargo bench -p airlock-plan --bench plan`;
//! `-- --write FILE` also writes the plan JSON, for `airlock plan check` (BENCHMARKS.md).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    reason = "a benchmark stops on any failure"
)]

use std::time::Instant;

use airlock_plan::{Plan, Submission};
use serde_json::{Value, json};

const CHANGES: usize = 10_000;
const RUNS: usize = 7;

fn change(i: usize) -> Value {
    let types = [
        "aws_security_group",
        "aws_iam_policy",
        "aws_db_instance",
        "aws_s3_bucket",
        "aws_instance",
        "aws_security_group_rule",
    ];
    let actions: [&[&str]; 4] = [&["create"], &["update"], &["delete"], &["delete", "create"]];
    let ty = types[i % types.len()];
    let action = actions[(i / types.len()) % actions.len()];
    let module =
        if i.is_multiple_of(3) { format!("module.env[\"region.{}\"].", i % 7) } else { String::new() };
    let cidr = if i.is_multiple_of(11) { "0.0.0.0/0" } else { "10.20.0.0/16" };
    let after = json!({
        "name": format!("resource-{i}"),
        "description": "Managed by Terraform",
        "type": "ingress",
        "cidr_blocks": [cidr],
        "ingress": [
            {"cidr_blocks": ["10.0.0.0/8"], "from_port": 443, "to_port": 443, "protocol": "tcp", "ipv6_cidr_blocks": [], "self": false},
            {"cidr_blocks": [cidr], "from_port": 22, "to_port": 22, "protocol": "tcp", "ipv6_cidr_blocks": [], "self": false},
        ],
        "policy": if i.is_multiple_of(13) { r#"{"Statement":[{"Action":"iam:*","Effect":"Allow","Resource":"*"}]}"# } else { r#"{"Statement":[{"Action":"s3:GetObject","Effect":"Allow","Resource":"*"}]}"# },
        "password": "not-for-your-eyes",
        "tags": {"team": "platform", "cost_center": format!("cc-{}", i % 17), "env": "production"},
    });
    json!({
        "address": format!("{module}{ty}.r{i}"),
        "module_address": if module.is_empty() { Value::Null } else { json!(module.trim_end_matches('.')) },
        "mode": "managed",
        "type": ty,
        "name": format!("r{i}"),
        "provider_name": "registry.terraform.io/hashicorp/aws",
        "change": {
            "actions": action,
            "before": if action == ["create"] { Value::Null } else { after.clone() },
            "after": if action == ["delete"] { Value::Null } else { after },
            "after_unknown": {"id": true, "arn": true},
            "before_sensitive": {"password": true},
            "after_sensitive": {"password": true},
        },
    })
}

fn main() {
    let changes: Vec<Value> = (0..CHANGES).map(change).collect();
    let plan = json!({
        "format_version": "1.2",
        "terraform_version": "1.6.6",
        "planned_values": {"root_module": {}},
        "resource_changes": changes,
    })
    .to_string();
    let args: Vec<String> = std::env::args().collect();
    if let Some(at) = args.iter().position(|a| a == "--write") {
        let path = args.get(at + 1).expect("--write FILE");
        std::fs::write(path, &plan).unwrap();
        println!("wrote {path}: {} bytes, {CHANGES} resource changes", plan.len());
    }
    let policy_path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/policies/terraform.yaml");
    let policy = airlock_policy::compile(&std::fs::read_to_string(policy_path).unwrap()).unwrap().0;
    let (mut parse, mut decide) = (Vec::new(), Vec::new());
    let mut summary = String::new();
    for _ in 0..RUNS {
        let started = Instant::now();
        let parsed = Plan::parse(plan.as_bytes()).unwrap();
        parse.push(started.elapsed().as_secs_f64());
        let job = airlock_plan::plan_job(
            parsed,
            "t",
            "p",
            Submission { env: "production".into(), plan_hash: "h".into(), ..Submission::default() },
        );
        // As `airlock plan check` and the gates do: each change read where it lies in the job.
        let started = Instant::now();
        let result = airlock_plan::evaluate(&policy, &job);
        decide.push(started.elapsed().as_secs_f64());
        summary = format!(
            "{} changes decided: {:?}; plan {}",
            result.changes.len(),
            result.counts(),
            result.evaluation.decision
        );
    }
    println!("plan of {} bytes; {summary}", plan.len());
    for (what, list) in [("parse + normalise + redact", &mut parse), ("evaluate every change", &mut decide)] {
        list.sort_by(f64::total_cmp);
        println!(
            "{what}: median {:.1} ms (min {:.1}, max {:.1}) over {RUNS} runs",
            list[RUNS / 2] * 1e3,
            list[0] * 1e3,
            list[RUNS - 1] * 1e3
        );
    }
}
