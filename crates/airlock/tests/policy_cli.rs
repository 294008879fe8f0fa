//! `airlock policy ...` through the real binary: exit codes, output formats, and the errors a
//! user sees for bad files and bad jobs.

#![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic, reason = "a test fails by panicking")]

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").join(path)
}

fn seed() -> String {
    repo("examples/policies/seed.yaml").display().to_string()
}

fn airlock(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_airlock")).args(args).output().unwrap()
}

fn airlock_stdin(args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn json(output: &Output) -> Value {
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("{e}: {}", stdout(output)))
}

fn temp_file(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("airlock-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

const PROD_PUBLIC_INGRESS: &str =
    r#"{"topic":"infra.security_group.update","env":"production","payload":{"cidr":"0.0.0.0/0"}}"#;

#[test]
fn check_prints_the_snapshot_hash() {
    let output = airlock(&["policy", "check", &seed()]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stdout(&output).contains("snapshot sha256:"), "{}", stdout(&output));
    let output = airlock(&["policy", "check", &seed(), "--format", "json"]);
    let report = json(&output);
    assert_eq!(report["ok"], true);
    assert_eq!(report["rules"], 3);
    assert!(report["snapshot"].as_str().unwrap().starts_with("sha256:"));
}

#[test]
fn check_reports_every_error_with_position_and_exits_1() {
    let file = repo("crates/airlock-policy/test_data/check/unknown-decision.yaml");
    let output = airlock(&["policy", "check", file.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1));
    let err = stderr(&output);
    let name = file.display().to_string();
    assert!(err.contains(&format!("{name}:6:15: error: unknown decision `block`")), "{err}");
    assert!(err.contains(&format!("{name}:9:15: error: unknown decision `requires_human`")), "{err}");
    assert!(err.contains("help: did you mean `require_human`?"), "{err}");
    let output = airlock(&["policy", "check", file.to_str().unwrap(), "--format", "json"]);
    assert_eq!(output.status.code(), Some(1));
    let report = json(&output);
    assert_eq!(report["ok"], false);
    assert_eq!(report["errors"][0]["line"], 2);
    assert_eq!(report["errors"].as_array().unwrap().len(), 4);
}

#[test]
fn check_refuses_missing_and_binary_files() {
    let output = airlock(&["policy", "check", "/nonexistent/policy.yaml"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("cannot read policy `/nonexistent/policy.yaml`"), "{}", stderr(&output));
    let binary = temp_file("binary.yaml", "\u{0}");
    std::fs::write(&binary, [0xff, 0xfe, 0x00]).unwrap();
    let output = airlock(&["policy", "check", binary.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("not valid UTF-8"), "{}", stderr(&output));
}

#[test]
fn simulate_gives_the_seed_decisions_and_exit_codes() {
    let cases = [
        (PROD_PUBLIC_INGRESS, "deny", Some("deny-prod-public-ingress"), 2),
        (
            r#"{"topic":"infra.resource.delete","env":"production"}"#,
            "require_human",
            Some("require-approval-prod-delete"),
            3,
        ),
        (
            r#"{"topic":"infra.cluster.recreate","env":"production"}"#,
            "throttle",
            Some("throttle-bulk-recreate"),
            0,
        ),
        (r#"{"topic":"infra.resource.delete","env":"staging"}"#, "allow", None, 0),
    ];
    for (job, decision, rule, code) in cases {
        let output = airlock(&[
            "policy",
            "simulate",
            "--policy",
            &seed(),
            "--job",
            job,
            "--exit-code",
            "--format",
            "json",
        ]);
        assert_eq!(output.status.code(), Some(code), "{job}: {}", stderr(&output));
        let result = json(&output);
        assert_eq!(result["decision"], decision, "{job}");
        assert_eq!(result["rule_ids"].get(0).and_then(Value::as_str), rule, "{job}");
        assert!(result["snapshot"].as_str().unwrap().starts_with("sha256:"));
        assert!(result["job_hash"].as_str().unwrap().starts_with("sha256:"));
        // Without --exit-code, every decision exits 0.
        let output = airlock(&["policy", "simulate", "--policy", &seed(), "--job", job]);
        assert_eq!(output.status.code(), Some(0));
        assert!(stdout(&output).starts_with(&format!("decision  {decision}\n")), "{}", stdout(&output));
    }
    let throttle = airlock(&[
        "policy",
        "simulate",
        "--policy",
        &seed(),
        "--format",
        "json",
        "--job",
        r#"{"topic":"infra.cluster.recreate","env":"production"}"#,
    ]);
    let limit = &json(&throttle)["limit"];
    assert_eq!((limit["rate"].as_u64(), limit["per_secs"].as_u64()), (Some(1), Some(600)));
}

#[test]
fn simulate_reads_jobs_from_files_and_stdin() {
    let file = temp_file("job.json", PROD_PUBLIC_INGRESS);
    let at_file = format!("@{}", file.display());
    let output = airlock(&["policy", "simulate", "--policy", &seed(), "--job", &at_file, "--format", "json"]);
    assert_eq!(json(&output)["decision"], "deny");
    let output = airlock_stdin(
        &["policy", "simulate", "--policy", &seed(), "--job", "@-", "--format", "json"],
        PROD_PUBLIC_INGRESS,
    );
    assert_eq!(json(&output)["decision"], "deny");
}

#[test]
fn malformed_jobs_name_the_field() {
    let cases = [
        (r#"{"topic":"infra.a"}"#, "`env`: is required"),
        (
            r#"{"topic":"infra.a","env":"prod","labels":{"team":7}}"#,
            "`labels.team`: expected a string, found a number",
        ),
        (r#"{"topic":"infra.a","env":"prod","colour":"red"}"#, "`colour`: unknown field"),
        (r#"{"topic":"#, "`job`: invalid JSON"),
    ];
    for (job, message) in cases {
        let output = airlock(&["policy", "simulate", "--policy", &seed(), "--job", job]);
        assert_eq!(output.status.code(), Some(1), "{job}");
        assert!(stderr(&output).contains(message), "{job}: {}", stderr(&output));
    }
}

#[test]
fn explain_gives_every_rule_a_verdict() {
    let output = airlock(&["policy", "explain", "--policy", &seed(), "--job", PROD_PUBLIC_INGRESS]);
    assert!(output.status.success());
    let text = stdout(&output);
    assert!(text.contains("match  deny-prod-public-ingress"), "{text}");
    assert!(
        text.contains("`topic` is `infra.security_group.update`, expected `infra.resource.delete`"),
        "{text}"
    );
    let output = airlock(&[
        "policy",
        "explain",
        "--policy",
        &seed(),
        "--job",
        PROD_PUBLIC_INGRESS,
        "--format",
        "json",
    ]);
    let result = json(&output);
    let verdicts: Vec<&str> =
        result["rules"].as_array().unwrap().iter().map(|r| r["verdict"].as_str().unwrap()).collect();
    assert_eq!(verdicts, ["matched", "not_matched", "not_matched"]);
    assert_eq!(result["decision"], "deny");
}

#[test]
fn test_passes_the_examples_and_reports_failures() {
    for (policy, cases) in [("seed", "seed.tests"), ("infra-rollout", "infra-rollout.tests")] {
        let policy = repo(&format!("examples/policies/{policy}.yaml"));
        let cases = repo(&format!("examples/policies/{cases}.yaml"));
        let output = airlock(&["policy", "test", policy.to_str().unwrap(), cases.to_str().unwrap()]);
        assert!(output.status.success(), "{}{}", stdout(&output), stderr(&output));
        assert!(stdout(&output).contains("0 failed"), "{}", stdout(&output));
    }
    let wrong = temp_file(
        "wrong.tests.yaml",
        "cases:\n  - name: wrong on purpose\n    job: { topic: infra.resource.delete, env: production }\n    expect: allow\n    rules: []\n",
    );
    let output = airlock(&["policy", "test", &seed(), wrong.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1));
    let text = stdout(&output);
    assert!(text.contains(":2:5: FAIL wrong on purpose"), "{text}");
    assert!(text.contains("expected: allow []"), "{text}");
    assert!(text.contains("actual:   require_human [require-approval-prod-delete]"), "{text}");
    let broken = temp_file("broken.tests.yaml", "cases:\n  - job: { topic: t }\n    expect: maybe\n");
    let output = airlock(&["policy", "test", &seed(), broken.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("unknown decision `maybe`"), "{}", stderr(&output));
    assert!(stderr(&output).contains("`env`: is required"), "{}", stderr(&output));
}

#[test]
fn usage_errors_exit_1_so_that_2_and_3_only_mean_decisions() {
    let output = airlock(&["policy", "simulate", "--policy", &seed()]);
    assert_eq!(output.status.code(), Some(1));
    let output = airlock(&["--help"]);
    assert_eq!(output.status.code(), Some(0));
}
