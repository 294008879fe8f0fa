//! Terraform plans through the real binary: `plan check` decides every plan of the public
//! corpus with exit codes 0/2/3 in table, JSON and SARIF, names what is not a plan, and a
//! planted sensitive value appears in no output, answer, audit record, log or stored byte.
//! End to end: `plan submit` → require_human → two approvals → `worker --terraform` applies with
//! a stand-in `terraform` → succeeded; a plan file swapped after approval is refused and the job
//! fails with the reason, and so is a plan file whose `show -json` is not the plan decided; Gate B re-decides every change under the snapshot active at claim.

#![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic, reason = "a test fails by panicking")]

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

mod support;

const ADMIN: &str = "terraform-plan-admin-key-0123456789";
const PATIENCE: Duration = Duration::from_secs(15);
const SECRET: &str = "PLANTED-db-password-7c41e2";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn policy_path() -> PathBuf {
    root().join("examples/policies/terraform.yaml")
}

fn corpus(name: &str) -> PathBuf {
    root().join("crates/airlock-plan/test_data/corpus").join(name)
}

fn airlock(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_airlock"));
    command.args(args);
    for (k, v) in env {
        command.env(k, v);
    }
    command.output().unwrap()
}

fn text(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

fn check(plan: &Path, env: &str, format: &str) -> Output {
    airlock(
        &[
            "plan",
            "check",
            plan.to_str().unwrap(),
            "--policy",
            policy_path().to_str().unwrap(),
            "--env",
            env,
            "--format",
            format,
        ],
        &[],
    )
}

#[test]
fn plan_check_decides_the_corpus_with_exit_codes_table_json_and_sarif() {
    let expected = [
        ("terraform-compliance-cli__test_multiple_failures__plan.out.json", 2, "deny", 3),
        ("terraform-compliance-cli__test_issue-190__plan.out.json", 2, "deny", 3),
        ("terraform-compliance-cli__test_issue-115__plan.out.json", 3, "require_human", 1),
        ("checkov__plan_with_iam_policies__tfplan.json", 2, "deny", 7),
        ("checkov__plan_with_deleted_resources__tfplan.json", 3, "require_human", 1),
        ("checkov__plan_with_pure_deleted_resources__tfplan.json", 3, "require_human", 1),
    ];
    for (file, code, decision, changes) in expected {
        let out = check(&corpus(file), "production", "json");
        assert_eq!(out.status.code(), Some(code), "{file}: {}", text(&out));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["decision"], decision, "{file}");
        assert_eq!(v["changes"].as_array().unwrap().len(), changes, "{file}");
        assert!(v["plan_hash"].as_str().unwrap().starts_with("sha256:"));

        let sarif = check(&corpus(file), "production", "sarif");
        assert_eq!(sarif.status.code(), Some(code));
        let s: Value = serde_json::from_slice(&sarif.stdout).unwrap();
        assert_eq!(s["version"], "2.1.0");
        let results = s["runs"][0]["results"].as_array().unwrap();
        let not_allowed =
            v["changes"].as_array().unwrap().iter().filter(|c| c["decision"] != "allow").count();
        assert_eq!(results.len(), not_allowed, "{file}");
        for r in results {
            let level = r["level"].as_str().unwrap();
            let rule = r["ruleId"].as_str().unwrap();
            let rules = s["runs"][0]["tool"]["driver"]["rules"].as_array().unwrap();
            assert_eq!(rules[r["ruleIndex"].as_u64().unwrap() as usize]["id"], rule);
            assert!(["error", "warning"].contains(&level), "{r}");
            assert!(r["locations"][0]["logicalLocations"][0]["fullyQualifiedName"].is_string());
        }
    }
    let table =
        check(&corpus("terraform-compliance-cli__test_issue-190__plan.out.json"), "production", "table");
    let shown = text(&table);
    assert!(
        shown.contains(
            "deny      create  aws_security_group_rule.elb-ingress-ssh  deny-prod-public-ingress-rule"
        ),
        "{shown}"
    );
    assert!(shown.contains("allow     create  module.mysg.aws_security_group.alb"), "{shown}");
    assert!(shown.contains("changes   2 allow, 1 deny"), "{shown}");
    // Outside production the open security groups pass.
    let staging =
        check(&corpus("terraform-compliance-cli__test_multiple_failures__plan.out.json"), "staging", "json");
    assert_eq!(staging.status.code(), Some(0), "{}", text(&staging));

    let cases = root().join("examples/policies/terraform.plan-cases.yaml");
    let tested = airlock(&["plan", "test", policy_path().to_str().unwrap(), cases.to_str().unwrap()], &[]);
    assert_eq!(tested.status.code(), Some(0), "{}", text(&tested));
    assert!(text(&tested).contains("8 case(s), 8 passed, 0 failed"), "{}", text(&tested));

    // `policy test` runs plan cases too, in their own files or beside job cases.
    let job_cases = root().join("examples/policies/terraform.tests.yaml");
    let both = airlock(
        &[
            "policy",
            "test",
            policy_path().to_str().unwrap(),
            cases.to_str().unwrap(),
            job_cases.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(both.status.code(), Some(0), "{}", text(&both));
    let dir = support::temp_dir("tf-policy-test");
    let mixed = dir.join("mixed.yaml");
    std::fs::write(
        &mixed,
        format!(
            "cases:\n\
             \x20 - name: a job case\n\
             \x20   job: {{ topic: tf.aws_iam_policy.update, env: staging, payload: {{ type: aws_iam_policy }} }}\n\
             \x20   expect: require_human\n\
             \x20 - name: open groups pass in production\n\
             \x20   plan: {}\n\
             \x20   env: production\n\
             \x20   expect: allow\n\
             \x20   changes: {{ aws_security_group.failure: allow }}\n",
            corpus("terraform-compliance-cli__test_multiple_failures__plan.out.json").display()
        ),
    )
    .unwrap();
    let failed = airlock(&["policy", "test", policy_path().to_str().unwrap(), mixed.to_str().unwrap()], &[]);
    let shown = text(&failed);
    assert_eq!(failed.status.code(), Some(1), "{shown}");
    assert!(shown.contains("2 case(s), 1 passed, 1 failed"), "{shown}");
    assert!(shown.contains("FAIL open groups pass in production"), "{shown}");
    assert!(
        shown.contains("`aws_security_group.failure`: expected allow, got deny [deny-prod-public-ingress]"),
        "{shown}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn what_is_not_a_plan_is_named_and_exits_1() {
    let dir = support::temp_dir("tf-bad-input");
    let write = |name: &str, bytes: &[u8]| {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    };
    let full = std::fs::read(corpus("checkov__plan_with_iam_policies__tfplan.json")).unwrap();
    let huge = dir.join("huge.json");
    std::fs::File::create(&huge).unwrap().set_len(200 * 1024 * 1024).unwrap();
    let cases = [
        (write("main.tf", b"resource \"aws_instance\" \"a\" {\n  ami = \"x\"\n}\n"), "the file is not JSON"),
        (write("truncated.json", &full[..full.len() / 2]), "the JSON is truncated"),
        (write("terraform.tfstate", br#"{"version": 4, "terraform_version": "1.5.0", "serial": 1, "lineage": "x", "outputs": {}, "resources": []}"#), "this is a state file"),
        (write("state.json", br#"{"format_version": "1.0", "terraform_version": "1.5.0", "values": {"root_module": {}}}"#), "the JSON of a state"),
        (huge.clone(), "the limit is 33554432"),
        (dir.join("missing.json"), "cannot read it"),
    ];
    for (path, message) in &cases {
        let out = check(path, "production", "table");
        assert_eq!(out.status.code(), Some(1), "{}: {}", path.display(), text(&out));
        assert!(text(&out).contains(message), "{}: {}", path.display(), text(&out));
        assert!(out.stdout.is_empty(), "no decision is printed for {}", path.display());
    }
    let empty = write(
        "empty-plan.json",
        br#"{"format_version": "1.2", "terraform_version": "1.6.0", "planned_values": {"root_module": {}}}"#,
    );
    let out = check(&empty, "production", "table");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("reason    no changes"), "{}", text(&out));
    // Nothing is submitted for a bad plan: the CLI stops before it calls the server.
    let submitted = airlock(
        &[
            "plan",
            "submit",
            cases[0].0.to_str().unwrap(),
            "--env",
            "production",
            "--url",
            "http://127.0.0.1:9",
        ],
        &[("AIRLOCK_API_KEY", "unused")],
    );
    assert_eq!(submitted.status.code(), Some(1));
    assert!(
        text(&submitted).contains("not JSON") && !text(&submitted).contains("cannot reach"),
        "{}",
        text(&submitted)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// An `airlock serve` on its own data directory with the Terraform policy; its log goes to a
/// file the tests read.
struct Server {
    _process: support::Process,
    addr: String,
    dir: PathBuf,
}

impl Server {
    fn start(name: &str) -> Self {
        Self::start_with(name, None)
    }

    /// With a config file of this text when given.
    fn start_with(name: &str, config: Option<&str>) -> Self {
        let dir = support::temp_dir(name);
        let log = std::fs::File::create(dir.join("serve.log")).unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_airlock"));
        command
            .args(["serve", "--listen", "127.0.0.1:0", "--data"])
            .arg(dir.join("data"))
            .arg("--policy")
            .arg(policy_path());
        if let Some(config) = config {
            std::fs::write(dir.join("config.yaml"), config).unwrap();
            command.arg("--config").arg(dir.join("config.yaml"));
        }
        let mut child = command
            .env("AIRLOCK_ADMIN_KEY", ADMIN)
            .env("RUST_LOG", "debug")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let process = support::Process(child);
        let addr = lines
            .by_ref()
            .map_while(Result::ok)
            .find_map(|line| Some(line.split("http://").nth(1)?.split_whitespace().next()?.to_owned()))
            .unwrap();
        std::thread::spawn(move || lines.for_each(drop));
        Self { _process: process, addr, dir }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn key(&self, name: &str, roles: &[&str]) -> String {
        support::key(&self.addr, ADMIN, "acme", name, roles)
    }

    fn job(&self, id: &str, key: &str) -> Value {
        let (status, job) = support::get(&self.addr, &format!("/api/v1/jobs/{id}"), key);
        assert_eq!(status, 200, "{job}");
        job
    }

    fn wait_for(&self, id: &str, key: &str, state: &str) -> Value {
        let started = Instant::now();
        loop {
            let job = self.job(id, key);
            if job["state"] == state {
                return job;
            }
            assert!(started.elapsed() < PATIENCE, "job {id} never became {state}: {job:#}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `airlock plan submit ...` as `key`: the exit code and the JSON answer.
    fn submit(&self, key: &str, plan: &Path, extra: &[&str]) -> (i32, Value) {
        let mut args = vec!["plan", "submit", plan.to_str().unwrap(), "--format", "json", "--url"];
        let url = self.url();
        args.push(&url);
        args.extend_from_slice(extra);
        let out = airlock(&args, &[("AIRLOCK_API_KEY", key)]);
        let body = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{}", text(&out)));
        (out.status.code().unwrap(), body)
    }

    fn approve(&self, approval: &str, key: &str) -> Value {
        let (status, reply) =
            support::post(&self.addr, &format!("/api/v1/approvals/{approval}/approve"), key, "{}");
        assert_eq!(status, 200, "{reply}");
        reply
    }
}

/// A stand-in `terraform` in `dir`, called `name`: every call is logged in `calls.log` in its
/// working directory; `show -json FILE` prints the plan JSON registered for FILE's sha256 (see
/// [`shows`]); `apply ... FILE` records FILE's sha256 in `applied.log`, runs `then`, and
/// reports success.
fn stand_in(dir: &Path, name: &str, then: &str) -> PathBuf {
    let path = dir.join(name);
    let registered = dir.join("shows");
    std::fs::create_dir_all(&registered).unwrap();
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\n\
             echo \"$*\" >> calls.log\n\
             for plan; do :; done\n\
             sum=$(sha256sum \"$plan\" | cut -d' ' -f1)\n\
             case \"$1\" in\n\
             show) [ \"$2\" = -json ] && exec cat '{}'/\"$sum\".json ;;\n\
             apply) echo \"$sum $*\" >> applied.log; {then}\n\
               echo 'Apply complete! Resources: 0 added, 0 changed, 1 destroyed.'; exit 0 ;;\n\
             esac\n\
             echo \"unexpected arguments: $*\" >&2; exit 64\n",
            registered.display()
        ),
    )
    .unwrap();
    Command::new("chmod").arg("+x").arg(&path).status().unwrap();
    path
}

/// Makes the stand-in in `dir` answer `show -json` of a plan file holding `plan_file` with the
/// plan JSON in `plan_json`.
fn shows(dir: &Path, plan_file: &[u8], plan_json: &Path) {
    std::fs::copy(plan_json, dir.join("shows").join(format!("{}.json", sha256_hex(plan_file)))).unwrap();
}

/// Every call the stand-in got in `work`, one line each.
fn calls(work: &Path) -> Vec<String> {
    std::fs::read_to_string(work.join("calls.log")).unwrap_or_default().lines().map(str::to_owned).collect()
}

fn worker(server: &Server, key: &str, dir: &Path, bin: &Path) -> support::Process {
    let child = Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args(["worker", "--pool", "default", "--wait-ms", "300", "--terraform"])
        .arg(dir)
        .arg("--terraform-bin")
        .arg(bin)
        .env("AIRLOCK_URL", server.url())
        .env("AIRLOCK_API_KEY", key)
        .env("RUST_LOG", "off")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    support::Process(child)
}

fn signal(process: &support::Process, name: &str) {
    let sent = Command::new("sh").arg("-c").arg(format!("kill -{name} {}", process.0.id())).status().unwrap();
    assert!(sent.success(), "kill -{name}");
}

fn applies(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("applied.log")).unwrap_or_default().lines().map(str::to_owned).collect()
}

fn sha256_hex(bytes: &[u8]) -> String {
    airlock_policy::job::sha256_tagged(bytes).trim_start_matches("sha256:").to_owned()
}

#[test]
fn a_submitted_plan_is_approved_applied_once_and_a_swapped_plan_file_is_refused() {
    let server = Server::start("tf-e2e");
    let (agent, alice, bob, runner) = (
        server.key("agent", &["submitter"]),
        server.key("alice", &["approver"]),
        server.key("bob", &["approver"]),
        server.key("runner", &["worker"]),
    );
    let work = server.dir.join("work");
    std::fs::create_dir_all(&work).unwrap();
    let bin = stand_in(&server.dir, "fake-terraform", "");
    let plan_bytes: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(work.join("tfplan"), &plan_bytes).unwrap();
    let plan_json = corpus("checkov__plan_with_deleted_resources__tfplan.json");
    shows(&server.dir, &plan_bytes, &plan_json);
    let plan_file = work.join("tfplan");

    let (code, first) = server.submit(
        &agent,
        &plan_json,
        &["--env", "production", "--plan-file", plan_file.to_str().unwrap()],
    );
    assert_eq!(code, 0, "{first}");
    assert_eq!(first["state"], "awaiting_approval", "{first}");
    assert_eq!(first["approval"]["quorum"], 2, "{first}");
    assert_eq!(first["changes"][0]["decision"], "require_human");
    assert_eq!(first["changes"][0]["rule_ids"], json!(["two-approvers-stateful-destroy"]));
    let id = first["job_id"].as_str().unwrap().to_owned();
    let job = server.job(&id, &agent);
    let plan_hash = format!("sha256:{}", sha256_hex(&plan_bytes));
    assert_eq!(job["plan_hash"], plan_hash, "bound to the binary plan file");
    assert_eq!(job["idempotency_key"], format!("plan:{plan_hash}"));
    assert_eq!(job["labels"]["tf_plan_file"], "tfplan");
    assert_eq!(job["plan_changes"][0]["address"], "aws_secretsmanager_secret.default");
    assert_eq!(job["gate_decisions"][0]["changes"][0]["action"], "replace");

    // The same plan again is a replay of the first answer, not a second job.
    let (code, again) = server.submit(
        &agent,
        &plan_json,
        &["--env", "production", "--plan-file", plan_file.to_str().unwrap()],
    );
    assert_eq!((code, &again["job_id"]), (0, &first["job_id"]), "{again}");

    let approval = first["approval"]["id"].as_str().unwrap();
    assert_eq!(server.approve(approval, &alice)["job_state"], "awaiting_approval");
    assert_eq!(server.approve(approval, &bob)["job_state"], "queued");

    let _worker = worker(&server, &runner, &work, &bin);
    let done = server.wait_for(&id, &agent, "succeeded");
    assert_eq!(done["result"]["applied"], true, "{done:#}");
    assert_eq!(done["result"]["plan_hash"], plan_hash);
    assert!(done["result"]["output"].as_str().unwrap().contains("Apply complete!"), "{done:#}");
    let gate_b =
        done["gate_decisions"].as_array().unwrap().iter().find(|g| g["gate"] == "b").unwrap().clone();
    assert_eq!(gate_b["decision"], "require_human", "{gate_b:#}");
    assert_eq!(
        gate_b["changes"][0]["address"], "aws_secretsmanager_secret.default",
        "Gate B decided each change"
    );
    let applied = applies(&work);
    assert_eq!(applied.len(), 1, "{applied:?}");
    assert!(applied[0].starts_with(&sha256_hex(&plan_bytes)), "the approved bytes were applied: {applied:?}");
    let called = calls(&work);
    assert_eq!(called.len(), 2, "{called:?}");
    assert!(
        called[0].starts_with("show -json .airlock-apply-"),
        "the plan file was read back first: {called:?}"
    );
    assert!(called[1].starts_with("apply -input=false -no-color .airlock-apply-"), "{called:?}");
    assert!(
        !work.read_dir().unwrap().any(|e| e.unwrap().file_name().to_string_lossy().ends_with(".tfplan")),
        "the private copy is gone"
    );

    // A second plan, approved, whose file is swapped before the worker gets it.
    let swapped_bytes = b"a different plan".to_vec();
    std::fs::write(work.join("next.tfplan"), b"the approved plan").unwrap();
    let next = work.join("next.tfplan");
    let (code, second) = server.submit(
        &agent,
        &corpus("checkov__plan_with_pure_deleted_resources__tfplan.json"),
        &["--env", "staging", "--plan-file", next.to_str().unwrap()],
    );
    assert_eq!(code, 0, "{second}");
    let second_id = second["job_id"].as_str().unwrap().to_owned();
    std::fs::write(&next, &swapped_bytes).unwrap();
    let approval = second["approval"]["id"].as_str().unwrap();
    server.approve(approval, &alice);
    server.approve(approval, &bob);
    let failed = server.wait_for(&second_id, &agent, "failed");
    let error = failed["error"].as_str().unwrap();
    assert!(error.contains("refusing to apply") && error.contains(&sha256_hex(&swapped_bytes)), "{error}");
    assert_eq!(applies(&work).len(), 1, "nothing more was applied");
    assert_eq!(calls(&work).len(), 2, "the swapped file was not even shown: {:?}", calls(&work));
    std::fs::remove_dir_all(&server.dir).unwrap();
}

#[test]
fn a_plan_file_that_does_not_hold_the_decided_changes_is_never_applied() {
    let server = Server::start("tf-mismatch");
    let (agent, runner) = (server.key("agent", &["submitter"]), server.key("runner", &["worker"]));
    let work = server.dir.join("work");
    std::fs::create_dir_all(&work).unwrap();
    let bin = stand_in(&server.dir, "fake-terraform", "");
    // A harmless plan JSON is submitted and allowed; the plan file beside it (the one its hash
    // binds) is a plan that deletes a secret.
    let harmless = corpus("terraform-compliance-cli__test_multiple_failures__plan.out.json");
    let destructive_bytes = b"a plan file that deletes a secret".to_vec();
    std::fs::write(work.join("tfplan"), &destructive_bytes).unwrap();
    shows(&server.dir, &destructive_bytes, &corpus("checkov__plan_with_pure_deleted_resources__tfplan.json"));
    let plan_file = work.join("tfplan");
    let (code, submitted) =
        server.submit(&agent, &harmless, &["--env", "staging", "--plan-file", plan_file.to_str().unwrap()]);
    assert_eq!((code, &submitted["state"]), (0, &json!("queued")), "{submitted}");
    let id = submitted["job_id"].as_str().unwrap();

    let _worker = worker(&server, &runner, &work, &bin);
    let failed = server.wait_for(id, &agent, "failed");
    let error = failed["error"].as_str().unwrap();
    for part in [
        "the plan file does not hold the changes that were decided",
        "`aws_security_group.failure` (create) was decided but is not in the plan file",
        "(delete) is in the plan file but was not decided",
        "nothing was applied",
    ] {
        assert!(error.contains(part), "`{part}` in the error: {error}");
    }
    let called = calls(&work);
    assert!(called.iter().any(|c| c.starts_with("show -json ")), "the plan file was read back: {called:?}");
    assert!(!called.iter().any(|c| c.starts_with("apply")), "apply was never called: {called:?}");
    assert!(applies(&work).is_empty());
    assert_eq!(failed["attempts"]["execution"], 1, "a refusal is final, not retried: {failed:#}");
    std::fs::remove_dir_all(&server.dir).unwrap();
}

#[test]
fn a_plan_job_of_several_mib_is_claimed_checked_and_applied() {
    // Gates in a debug build on a shared machine: room for a plan of a few thousand changes.
    let server = Server::start_with("tf-large", Some("gate_a: { timeout_ms: 30000 }\n"));
    let (agent, runner) = (server.key("agent", &["submitter"]), server.key("runner", &["worker"]));
    let work = server.dir.join("work");
    std::fs::create_dir_all(&work).unwrap();
    let bin = stand_in(&server.dir, "fake-terraform", "");
    let changes: Vec<Value> = (0..2_000)
        .map(|i| {
            json!({
                "address": format!("aws_instance.web[{i}]"), "mode": "managed", "type": "aws_instance",
                "name": "web", "index": i, "provider_name": "registry.terraform.io/hashicorp/aws",
                "change": {"actions": ["create"], "before": null,
                           "after": {"ami": "ami-123", "user_data": format!("{i:04}").repeat(640)}},
            })
        })
        .collect();
    let plan =
        json!({"format_version": "1.2", "planned_values": {}, "resource_changes": changes}).to_string();
    assert!(plan.len() > 5 * 1024 * 1024, "over the 4 MiB a claim was once limited to: {}", plan.len());
    let plan_json = server.dir.join("large.json");
    std::fs::write(&plan_json, &plan).unwrap();
    let plan_bytes = b"a large plan file".to_vec();
    std::fs::write(work.join("tfplan"), &plan_bytes).unwrap();
    shows(&server.dir, &plan_bytes, &plan_json);
    let plan_file = work.join("tfplan");
    let (code, submitted) =
        server.submit(&agent, &plan_json, &["--env", "staging", "--plan-file", plan_file.to_str().unwrap()]);
    assert_eq!((code, &submitted["state"]), (0, &json!("queued")), "{submitted}");
    let id = submitted["job_id"].as_str().unwrap();

    let _worker = worker(&server, &runner, &work, &bin);
    let started = Instant::now();
    let done = loop {
        let job = server.job(id, &agent);
        if job["state"] != "queued" && job["state"] != "leased" {
            break job;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "the plan was never applied: {}", job["state"]);
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(done["state"], "succeeded", "{}", done["error"]);
    assert_eq!(applies(&work).len(), 1);
    std::fs::remove_dir_all(&server.dir).unwrap();
}

#[test]
fn gate_b_decides_every_change_again_under_the_snapshot_active_at_claim() {
    let server = Server::start("tf-gate-b");
    let (agent, runner) = (server.key("agent", &["submitter"]), server.key("runner", &["worker"]));
    let plan = corpus("terraform-compliance-cli__test_multiple_failures__plan.out.json");
    let (code, submitted) = server.submit(&agent, &plan, &["--env", "staging"]);
    assert_eq!(code, 0, "{submitted}");
    assert_eq!(submitted["state"], "queued", "open groups pass in staging: {submitted}");
    let id = submitted["job_id"].as_str().unwrap();
    // Public ingress is now denied in staging too.
    let stricter = std::fs::read_to_string(policy_path())
        .unwrap()
        .replace("env: production", "env: [production, staging]");
    let (status, published) = support::post(&server.addr, "/api/v1/policy/publish", ADMIN, &stricter);
    assert_eq!(status, 201, "{published}");
    let (status, claimed) =
        support::post(&server.addr, "/api/v1/workers/claim", &runner, json!({"pool": "default"}));
    assert_eq!(status, 204, "the plan is not leased: {claimed}");
    let job = server.wait_for(id, &agent, "denied");
    let gate_b = job["gate_decisions"].as_array().unwrap().iter().find(|g| g["gate"] == "b").unwrap().clone();
    assert_eq!(gate_b["snapshot_version"], 2, "{gate_b:#}");
    let decided: Vec<(String, String)> = gate_b["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["address"].as_str().unwrap().to_owned(), c["decision"].as_str().unwrap().to_owned()))
        .collect();
    assert_eq!(
        decided,
        [
            ("aws_security_group.another_failure".to_owned(), "allow".to_owned()),
            ("aws_security_group.failure".to_owned(), "deny".to_owned()),
            ("aws_security_group_rule.another_failure".to_owned(), "deny".to_owned()),
        ]
    );
    assert_eq!(job["plan_changes"], gate_b["changes"], "the job shows the latest decision per change");
    std::fs::remove_dir_all(&server.dir).unwrap();
}

#[test]
fn a_planted_sensitive_value_appears_in_no_output_answer_audit_log_or_stored_byte() {
    let dir = support::temp_dir("tf-secret-plan");
    let plan = dir.join("plan.json");
    std::fs::write(
        &plan,
        json!({
            "format_version": "1.2",
            "terraform_version": "1.6.6",
            "variables": {"db_password": {"value": SECRET}},
            "planned_values": {"root_module": {"resources": [{"values": {"password": SECRET}}]}},
            "resource_changes": [{
                "address": "module.db[\"main\"].aws_db_instance.this[0]",
                "module_address": "module.db[\"main\"]",
                "mode": "managed", "type": "aws_db_instance", "name": "this", "index": 0,
                "provider_name": "registry.terraform.io/hashicorp/aws",
                "change": {
                    "actions": ["delete", "create"],
                    "before": {"password": SECRET, "engine": "postgres", "tags": {"token": SECRET, "team": "data"}},
                    "after": {"password": SECRET, "engine": "postgres", "tags": {"token": SECRET, "team": "data"}, "users": [SECRET]},
                    "after_unknown": {"id": true},
                    "before_sensitive": {"password": true, "tags": {"token": true}},
                    "after_sensitive": {"password": true, "tags": {"token": true}, "users": true},
                },
                "action_reason": "replace_because_cannot_update",
            }],
        })
        .to_string(),
    )
    .unwrap();
    let mut seen = String::new();
    for format in ["table", "json", "sarif"] {
        let out = check(&plan, "production", format);
        assert_eq!(out.status.code(), Some(3), "{}", text(&out));
        seen.push_str(&text(&out));
    }
    assert!(seen.contains("module.db[\"main\"].aws_db_instance.this[0]"), "{seen}");

    let server = Server::start("tf-secret");
    let (agent, alice) = (server.key("agent", &["submitter"]), server.key("alice", &["approver"]));
    let operator = server.key("ops", &["operator", "approver"]);
    let (code, answer) = server.submit(&agent, &plan, &["--env", "production"]);
    assert_eq!(code, 0, "{answer}");
    let id = answer["job_id"].as_str().unwrap();
    let job = server.job(id, &agent);
    assert_eq!(job["payload"]["changes"][0]["after"]["password"], "(sensitive)", "{job:#}");
    assert_eq!(
        job["payload"]["changes"][0]["after"]["tags"]["team"], "data",
        "only sensitive values are replaced"
    );
    let approval = answer["approval"]["id"].as_str().unwrap();
    server.approve(approval, &alice);
    for path in [
        "/api/v1/jobs",
        "/api/v1/approvals",
        "/api/v1/audit?limit=500",
        &format!("/api/v1/approvals/{approval}"),
    ] {
        let (status, body) = support::get(&server.addr, path, &operator);
        assert_eq!(status, 200, "{path}: {body}");
        seen.push_str(&body.to_string());
    }
    seen.push_str(&answer.to_string());
    seen.push_str(&job.to_string());
    assert!(!seen.contains(SECRET), "the secret leaked into an answer or output");
    let mut stored = Vec::new();
    for entry in walk(&server.dir) {
        stored.push(entry.display().to_string());
        let bytes = std::fs::read(&entry).unwrap();
        assert!(
            !bytes.windows(SECRET.len()).any(|w| w == SECRET.as_bytes()),
            "the secret is in {} (logs and stored data must never hold it)",
            entry.display()
        );
    }
    assert!(stored.iter().any(|p| p.ends_with("serve.log")), "{stored:?}");
    assert!(stored.iter().any(|p| p.contains("data")), "the store's files were read: {stored:?}");
    std::fs::remove_dir_all(&server.dir).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

#[test]
fn a_plan_applied_whose_report_was_lost_is_not_applied_again_on_retry() {
    // One-second leases: a worker stopped for longer loses its lease and the job is retried.
    let server = Server::start_with("tf-once", Some("leases: { lease_ms: 1000, heartbeat_ms: 300 }\n"));
    let (agent, runner) = (server.key("agent", &["submitter"]), server.key("runner", &["worker"]));
    let work = server.dir.join("work");
    std::fs::create_dir_all(&work).unwrap();
    std::fs::write(work.join("tfplan"), b"an allowed plan").unwrap();
    // A stand-in whose apply takes a while, so the worker can be stopped while it runs.
    let bin = stand_in(&server.dir, "slow-terraform", "sleep 1");
    let plan = corpus("terraform-compliance-cli__test_multiple_failures__plan.out.json");
    shows(&server.dir, b"an allowed plan", &plan);
    let plan_file = work.join("tfplan");
    let (code, submitted) =
        server.submit(&agent, &plan, &["--env", "staging", "--plan-file", plan_file.to_str().unwrap()]);
    assert_eq!((code, &submitted["state"]), (0, &json!("queued")), "{submitted}");
    let id = submitted["job_id"].as_str().unwrap();

    let worker = worker(&server, &runner, &work, &bin);
    let started = Instant::now();
    while applies(&work).is_empty() {
        assert!(started.elapsed() < PATIENCE, "the plan was never applied");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The apply runs on; the worker is frozen until its lease has lapsed and the job is queued
    // again, so its report of the finished apply is refused.
    signal(&worker, "STOP");
    server.wait_for(id, &agent, "queued");
    signal(&worker, "CONT");
    let done = server.wait_for(id, &agent, "succeeded");
    assert_eq!(done["attempts"]["execution"], 2, "the job was retried: {done:#}");
    assert_eq!(
        applies(&work).len(),
        1,
        "the retry took the result from the effect ledger, not a second apply"
    );
    assert_eq!(done["result"]["applied"], true, "{done:#}");
    let ledger = std::fs::read_to_string(work.join(".airlock-apply-ledger.jsonl")).unwrap();
    assert!(ledger.contains("plan:sha256:"), "recorded under the plan's idempotency key: {ledger}");
    std::fs::remove_dir_all(&server.dir).unwrap();
}

#[test]
fn the_api_refuses_what_is_not_a_plan_and_stores_nothing() {
    let server = Server::start("tf-api-bad");
    let agent = server.key("agent", &["submitter"]);
    let plan = std::fs::read_to_string(corpus("checkov__plan_with_iam_policies__tfplan.json")).unwrap();
    let bad = [
        ("/api/v1/plans?env=production", "terraform {\n}\n".to_owned(), 400, "invalid_plan"),
        ("/api/v1/plans?env=production", plan[..plan.len() / 3].to_owned(), 400, "invalid_plan"),
        ("/api/v1/plans", plan.clone(), 400, "invalid_request"),
        ("/api/v1/plans?env=production&plan_hash=md5:abc", plan.clone(), 400, "invalid_request"),
        ("/api/v1/plans?env=production&plan_file=../tfplan", plan.clone(), 400, "invalid_request"),
        ("/api/v1/plans?env=production&color=red", plan.clone(), 400, "invalid_request"),
    ];
    for (path, body, status, code) in bad {
        let (got, reply) = support::post(&server.addr, path, &agent, body);
        assert_eq!((got, reply["error"].as_str().unwrap()), (status, code), "{path}: {reply}");
    }
    let (_, jobs) = support::get(&server.addr, "/api/v1/jobs", &agent);
    assert_eq!(jobs["jobs"], json!([]), "nothing was stored");
    // Over the 1 MiB of a job body, under the 32 MiB of a plan; unknown keys are ignored.
    let mut padded: Value = serde_json::from_str(&plan).unwrap();
    padded["padding"] = json!("x".repeat(2 * 1024 * 1024));
    let (status, reply) = support::post(&server.addr, "/api/v1/plans?env=production", &agent, padded);
    assert_eq!((status, reply["error"].as_str()), (403, Some("policy_denied")), "{reply}");
    assert_eq!(reply["change_counts"], json!({"allow": 2, "deny": 3, "require_human": 2}), "{reply}");
    let (status, reply) = support::post(
        &server.addr,
        "/api/v1/jobs",
        &agent,
        json!({"topic": "tf.plan.apply", "env": "production"}),
    );
    assert_eq!(status, 400, "{reply}");
    assert!(reply["message"].as_str().unwrap().contains("/api/v1/plans"), "{reply}");
    std::fs::remove_dir_all(&server.dir).unwrap();
}
