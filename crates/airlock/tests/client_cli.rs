//! The client commands (`submit`, `jobs`, `approvals`, `dlq`, `keys`, server-side `policy`)
//! through the real binary against a real `airlock serve` on port 0: what they print, what they
//! send, and their exit codes for allowed, denied, approval-bound and dead-lettered jobs, errors
//! and revoked keys.

#![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic, reason = "a test fails by panicking")]

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const ADMIN: &str = "client-cli-admin-key-0123456789";

const PUBLIC_INGRESS: &str = r#"{"cidr":"0.0.0.0/0"}"#;

/// A candidate that denies every production job.
const DENY_PRODUCTION: &str = "\
version: v1
defaults:
  decision: allow
rules:
  - id: deny-all-production
    when: { env: production }
    decision: deny
    reason: production is frozen
";

/// A running `airlock serve` over its own data directory; killed and cleaned up on drop.
struct Server {
    child: Child,
    url: String,
    data: PathBuf,
    // Held so the server's stdout stays open while it runs.
    _stdout: BufReader<ChildStdout>,
}

impl Server {
    fn start(name: &str) -> Self {
        Self::start_with(name, None, &[])
    }

    /// Starts with `config` as the `--config` file, when given, and `extra` flags.
    fn start_with(name: &str, config: Option<&str>, extra: &[&str]) -> Self {
        let data = std::env::temp_dir().join(format!("airlock-client-cli-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&data);
        std::fs::create_dir_all(&data).unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_airlock"));
        command.args(["serve", "--listen", "127.0.0.1:0", "--data"]).arg(&data).args(extra);
        if let Some(text) = config {
            let path = data.join("config.yaml");
            std::fs::write(&path, text).unwrap();
            command.arg("--config").arg(path);
        }
        let mut child = command
            .env("AIRLOCK_ADMIN_KEY", ADMIN)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let addr = line
            .strip_prefix("airlock listening on http://")
            .unwrap_or_else(|| panic!("unexpected first line: {line}"))
            .split_whitespace()
            .next()
            .unwrap();
        Self { url: format!("http://{addr}"), child, data, _stdout: stdout }
    }

    /// Runs `airlock ARGS` against this server with `key`.
    fn run(&self, key: &str, args: &[&str]) -> Output {
        airlock(&self.url, Some(key), args)
    }

    /// Runs a `--format json` command that must succeed, and returns its JSON.
    fn json(&self, key: &str, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.extend(["--format", "json"]);
        let output = self.run(key, &all);
        assert_eq!(output.status.code(), Some(0), "{args:?}: {}", stderr(&output));
        serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("{e}: {}", stdout(&output)))
    }

    fn create_key(&self, name: &str, roles: &[&str]) -> String {
        let mut args = vec!["keys", "create", "--tenant", "acme", "--name", name];
        for role in roles {
            args.extend(["--role", role]);
        }
        let created = self.json(ADMIN, &args);
        assert!(created["id"].as_str().unwrap().starts_with("key_"));
        created["key"].as_str().unwrap().to_owned()
    }

    /// An HTTP call straight to the API: status and JSON body (null when there is none).
    fn http(&self, method: &str, path: &str, key: &str, body: Option<&Value>) -> (u16, Value) {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .into();
        let (url, auth) = (format!("{}{path}", self.url), format!("Bearer {key}"));
        let mut response = match (method, body) {
            ("GET", _) => agent.get(&url).header("authorization", &auth).call(),
            ("POST", Some(body)) => agent
                .post(&url)
                .header("authorization", &auth)
                .header("content-type", "application/json")
                .send(body.to_string()),
            _ => panic!("unsupported call {method} {path}"),
        }
        .unwrap();
        let text = response.body_mut().read_to_string().unwrap();
        let body = if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap() };
        (response.status().as_u16(), body)
    }

    fn file(&self, name: &str, text: &str) -> String {
        let path = self.data.join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.data);
    }
}

fn airlock(url: &str, key: Option<&str>, args: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_airlock"));
    command.args(args).env("AIRLOCK_URL", url).env_remove("AIRLOCK_API_KEY");
    if let Some(key) = key {
        command.env("AIRLOCK_API_KEY", key);
    }
    command.output().unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn check(output: &Output, code: i32, stdout_has: &[&str], stderr_has: &[&str]) {
    let (out, err) = (stdout(output), stderr(output));
    assert_eq!(output.status.code(), Some(code), "stdout:\n{out}\nstderr:\n{err}");
    for want in stdout_has {
        assert!(out.contains(want), "stdout lacks `{want}`:\n{out}\nstderr:\n{err}");
    }
    for want in stderr_has {
        assert!(err.contains(want), "stderr lacks `{want}`:\n{err}\nstdout:\n{out}");
    }
}

fn ids(list: &Value, field: &str, id: &str) -> Vec<String> {
    list[field].as_array().unwrap().iter().map(|o| o[id].as_str().unwrap().to_owned()).collect()
}

#[test]
fn submit_approve_publish_and_revoke_through_the_client() {
    let server = Server::start("walk");
    let alice = server.create_key("alice", &["submitter"]);
    let bob = server.create_key("bob", &["approver", "operator"]);
    let created =
        server.run(ADMIN, &["keys", "create", "--tenant", "acme", "--name", "carol", "--role", "worker"]);
    check(&created, 0, &["id ", "key ", "ak_"], &["shown only now"]);

    // Allowed: queued, exit 0; the same idempotency key replays the same job.
    let allowed = server.run(
        &alice,
        &[
            "submit",
            "--topic",
            "infra.resource.update",
            "--env",
            "staging",
            "--label",
            "team=core",
            "--payload",
            r#"{"id":"vm-1"}"#,
        ],
    );
    check(&allowed, 0, &["is queued", "allow (default)"], &[]);
    let first = server.json(
        &alice,
        &["submit", "--topic", "infra.resource.update", "--env", "staging", "--idempotency-key", "k-1"],
    );
    assert_eq!(first["state"], "queued");
    let replay = server.run(
        &alice,
        &["submit", "--topic", "infra.resource.update", "--env", "staging", "--idempotency-key", "k-1"],
    );
    check(&replay, 0, &[first["job_id"].as_str().unwrap(), "replayed"], &[]);
    let reused = server.run(
        &alice,
        &["submit", "--topic", "infra.resource.update", "--env", "dev", "--idempotency-key", "k-1"],
    );
    check(&reused, 1, &[], &["idempotency_key_reused", "HTTP 409"]);

    // Denied: the rule id and reason, exit 2; with --format json, the server's body.
    let denied = server.run(
        &alice,
        &[
            "submit",
            "--topic",
            "infra.security_group.update",
            "--env",
            "production",
            "--payload",
            PUBLIC_INGRESS,
        ],
    );
    check(&denied, 2, &[], &["deny-prod-public-ingress", "public ingress in production is never allowed"]);
    let job_file = server.file(
        "job.json",
        &format!(
            r#"{{"topic":"infra.security_group.update","env":"production","payload":{PUBLIC_INGRESS}}}"#
        ),
    );
    let denied_json = server.run(&alice, &["submit", "--job", &format!("@{job_file}"), "--format", "json"]);
    assert_eq!(denied_json.status.code(), Some(2), "{}", stderr(&denied_json));
    let body: Value = serde_json::from_slice(&denied_json.stdout).unwrap();
    assert_eq!(body["error"], "policy_denied");
    assert_eq!(body["rule_ids"][0], "deny-prod-public-ingress");

    // Bad input: the code and every field, exit 1.
    let invalid = server.run(&alice, &["submit", "--job", r#"{"topic":"t","env":"e","tenant":"other"}"#]);
    check(&invalid, 1, &[], &["invalid_request", "HTTP 400", "tenant: is set by the API key"]);

    // Require human: the approval id, exit 0.
    let held = server.run(&alice, &["submit", "--topic", "infra.resource.delete", "--env", "production"]);
    check(&held, 0, &["awaits approval apr_", "require-approval-prod-delete"], &[]);
    let pending = server.json(&bob, &["approvals", "list"]);
    let approval_ids = ids(&pending, "approvals", "id");
    assert_eq!(approval_ids.len(), 1, "{pending}");
    let (approval, held_job) =
        (approval_ids[0].clone(), pending["approvals"][0]["job_id"].as_str().unwrap().to_owned());
    assert!(stdout(&held).contains(&approval));

    // Lists and single objects.
    let list = server.run(&alice, &["jobs", "list"]);
    check(
        &list,
        0,
        &["ID", "STATE", "TOPIC", "ENV", "DECISION", "CREATED", &held_job, "awaiting_approval"],
        &[],
    );
    let jobs = server.json(&alice, &["jobs", "list"]);
    assert_eq!(jobs["jobs"].as_array().unwrap().len(), 3, "denied jobs are not stored: {jobs}");
    let awaiting = server.json(&alice, &["jobs", "list", "--state", "awaiting_approval"]);
    assert_eq!(ids(&awaiting, "jobs", "job_id"), vec![held_job.clone()]);
    let bad_state = server.run(&alice, &["jobs", "list", "--state", "sleeping"]);
    check(&bad_state, 1, &[], &["invalid_request", "state:"]);
    check(
        &server.run(&alice, &["jobs", "get", &held_job]),
        0,
        &["awaiting_approval", &approval, "-> awaiting_approval"],
        &[],
    );
    check(&server.run(&alice, &["jobs", "get", "job_nope"]), 1, &[], &["not_found", "HTTP 404"]);
    check(&server.run(&bob, &["approvals", "list"]), 0, &["STATUS", &approval, "pending", "alice"], &[]);
    check(&server.run(&bob, &["approvals", "get", &approval]), 0, &[&held_job, "require_human"], &[]);

    // Approve: not by the submitter's key (no approver role), then by the approver.
    check(&server.run(&alice, &["approvals", "approve", &approval]), 1, &[], &["forbidden", "HTTP 403"]);
    check(&server.run(&bob, &["approvals", "approve", &approval]), 0, &["is approved", "is queued"], &[]);
    assert_eq!(server.json(&alice, &["jobs", "get", &held_job])["state"], "queued");
    check(&server.run(&bob, &["approvals", "approve", &approval]), 1, &[], &["approval_not_pending"]);
    let all = server.json(&bob, &["approvals", "list", "--status", "all"]);
    assert_eq!(all["approvals"][0]["status"], "approved");

    // Reject another.
    let second = server.json(&alice, &["submit", "--topic", "infra.resource.delete", "--env", "production"]);
    let second_approval = second["approval"]["id"].as_str().unwrap();
    check(
        &server.run(&bob, &["approvals", "reject", second_approval, "--comment", "wrong window"]),
        0,
        &["is rejected"],
        &[],
    );
    assert_eq!(
        server.json(&alice, &["jobs", "get", second["job_id"].as_str().unwrap()])["state"],
        "rejected"
    );

    // Diff a candidate (operator), then publish it (platform admin) and see it listed.
    let candidate = server.file("candidate.yaml", DENY_PRODUCTION);
    let diff = server.json(&bob, &["policy", "diff", &candidate]);
    assert_eq!(diff["jobs_evaluated"], 4, "{diff}");
    let changed = ids(&diff, "changed", "job_id");
    assert!(changed.contains(&held_job), "{diff}");
    assert_eq!(diff["changed"][0]["candidate"]["decision"], "deny");
    check(
        &server.run(&bob, &["policy", "diff", &candidate]),
        0,
        &["would change", "deny (deny-all-production)"],
        &[],
    );
    let none = server.json(&bob, &["policy", "diff", &candidate, "--since", "4102444800000"]);
    assert_eq!(none["jobs_evaluated"], 0);
    check(&server.run(&bob, &["policy", "publish", &candidate]), 1, &[], &["forbidden", "platform"]);
    check(
        &server.run(ADMIN, &["policy", "publish", &candidate]),
        0,
        &["published: version 2 is active"],
        &[],
    );
    let snapshots = server.json(&alice, &["policy", "snapshots"]);
    assert_eq!(snapshots["snapshots"][0]["version"], 2);
    assert_eq!(snapshots["active"]["version"], 2);
    assert!(snapshots["active"]["source"].is_null(), "the source is for operators and admins");
    let as_operator = server.json(&bob, &["policy", "snapshots"]);
    assert_eq!(as_operator["active"]["source"], DENY_PRODUCTION);
    check(&server.run(&alice, &["policy", "snapshots"]), 0, &["VERSION", "ACTIVE", "HASH"], &[]);
    let frozen = server.run(&alice, &["submit", "--topic", "infra.resource.delete", "--env", "production"]);
    check(&frozen, 2, &[], &["deny-all-production", "production is frozen"]);
    let broken =
        server.file("broken.yaml", "version: v1\nrules:\n  - id: x\n    when: {}\n    decision: maybe\n");
    check(
        &server.run(ADMIN, &["policy", "publish", &broken]),
        1,
        &[],
        &["invalid_policy", "unknown decision"],
    );
    check(
        &server.run(ADMIN, &["policy", "rollback", "1"]),
        0,
        &["version 3 is active", "rollback to version 1"],
        &[],
    );
    check(&server.run(ADMIN, &["policy", "rollback", "99"]), 1, &[], &["not_found"]);

    // Cancel, then revoke a key and see it refused.
    let queued = first["job_id"].as_str().unwrap();
    check(&server.run(&alice, &["jobs", "cancel", queued]), 0, &["is cancelled"], &[]);
    check(&server.run(&alice, &["jobs", "cancel", queued]), 1, &[], &["invalid_transition", "HTTP 409"]);
    let keys = server.json(ADMIN, &["keys", "list"]);
    let alice_id = keys["keys"].as_array().unwrap().iter().find(|k| k["name"] == "alice").unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    check(
        &server.run(ADMIN, &["keys", "list"]),
        0,
        &["TENANT", "NAME", "ROLES", "alice", "approver, operator"],
        &[],
    );
    check(&server.run(ADMIN, &["keys", "revoke", &alice_id]), 0, &["revoked"], &[]);
    check(&server.run(&alice, &["jobs", "list"]), 1, &[], &["unauthorized", "HTTP 401", "revoked"]);
}

#[test]
fn an_unreachable_server_or_a_missing_key_is_a_clear_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}");
    check(&airlock(&url, Some("k"), &["jobs", "list"]), 1, &[], &["cannot reach the Airlock server", &url]);
    check(&airlock(&url, None, &["approvals", "list"]), 1, &[], &["AIRLOCK_API_KEY"]);
    check(&airlock("https://example.invalid", Some("k"), &["keys", "list"]), 1, &[], &["http://"]);
}

#[test]
fn submit_documents_its_exit_codes() {
    let help = airlock("http://127.0.0.1:1", None, &["submit", "--help"]);
    check(&help, 0, &["Exit status", "2  denied by the policy", "--idempotency-key", "AIRLOCK_URL"], &[]);
    let both =
        airlock("http://127.0.0.1:1", Some("k"), &["submit", "--topic", "t", "--env", "e", "--job", "{}"]);
    assert_eq!(both.status.code(), Some(1), "usage errors exit 1: {}", stderr(&both));
}

#[test]
fn a_missing_policy_file_is_named() {
    let missing = Path::new("/nonexistent/airlock/policy.yaml");
    let output =
        airlock("http://127.0.0.1:1", Some("k"), &["policy", "publish", &missing.display().to_string()]);
    check(&output, 1, &[], &["cannot read policy", "/nonexistent/airlock/policy.yaml"]);
}

#[test]
fn dead_lettered_jobs_are_listed_retried_and_discarded_through_the_client() {
    // Two scheduling attempts, no real backoff, and a breaker that stays closed through the
    // outage, so that the retried job is leased as soon as the safety check is back.
    let config = "scheduling: { attempts_max: 2, backoff_base_ms: 1, backoff_cap_ms: 1 }\n\
                  breaker: { failures_to_open: 10 }\n";
    let server = Server::start_with("dlq", Some(config), &["--enable-fault-injection"]);
    let submitter = server.create_key("sam", &["submitter"]);
    let operator = server.create_key("olga", &["operator"]);
    let worker = server.create_key("wendy", &["worker"]);
    let submit = |env: &str| {
        let accepted = server.json(&submitter, &["submit", "--topic", "infra.resource.update", "--env", env]);
        accepted["job_id"].as_str().unwrap().to_owned()
    };
    let (retried, discarded) = (submit("staging"), submit("dev"));
    check(&server.run(&operator, &["dlq", "list"]), 0, &["no dead-lettered jobs"], &[]);

    // The safety check is down: every claim requeues, then dead-letters, both jobs.
    let (status, _) =
        server.http("POST", "/api/v1/admin/faults", ADMIN, Some(&json!({"safety": "unavailable"})));
    assert_eq!(status, 200);
    let state =
        |id: &str| server.http("GET", &format!("/api/v1/jobs/{id}"), &submitter, None).1["state"].clone();
    let deadline = Instant::now() + Duration::from_secs(5);
    while state(&retried) != "dead_lettered" || state(&discarded) != "dead_lettered" {
        assert!(Instant::now() < deadline, "not dead-lettered: {} {}", state(&retried), state(&discarded));
        let (status, body) =
            server.http("POST", "/api/v1/workers/claim", &worker, Some(&json!({"wait_ms": 0})));
        assert_eq!(status, 204, "nothing is leased while the safety check is down: {body}");
        std::thread::sleep(Duration::from_millis(5));
    }

    // List: a table with the reason and the attempts, filters, JSON, and the operator role.
    check(
        &server.run(&operator, &["dlq", "list"]),
        0,
        &[
            "ID",
            "TOPIC",
            "ENV",
            "REASON",
            "ATTEMPTS",
            &retried,
            &discarded,
            "scheduling attempts exhausted",
            "2/0",
        ],
        &[],
    );
    let listed = server.json(&operator, &["dlq", "list"]);
    let mut listed_ids = ids(&listed, "dead_letters", "job_id");
    let first = listed_ids[0].clone();
    listed_ids.sort();
    let mut both = vec![retried.clone(), discarded.clone()];
    both.sort();
    assert_eq!(listed_ids, both, "{listed}");
    assert_eq!(listed["dead_letters"][0]["scheduling_attempts"], 2);
    assert_eq!(listed["dead_letters"][0]["execution_attempts"], 0);
    let by_reason = server.json(&operator, &["dlq", "list", "--reason", "injected fault", "--limit", "1"]);
    assert_eq!(ids(&by_reason, "dead_letters", "job_id"), vec![first.clone()]);
    assert_eq!(by_reason["next"], first.as_str());
    check(
        &server.run(&operator, &["dlq", "list", "--topic", "infra.other"]),
        0,
        &["no dead-lettered jobs"],
        &[],
    );
    check(
        &server.run(&operator, &["dlq", "list", "--reason", "execution"]),
        0,
        &["no dead-lettered jobs"],
        &[],
    );
    check(&server.run(&worker, &["dlq", "list"]), 1, &[], &["forbidden", "HTTP 403", "operator"]);

    // Get: the reason and the history.
    check(
        &server.run(&operator, &["dlq", "get", &retried]),
        0,
        &["dead-lettered", "scheduling attempts exhausted (2)", "queued -> dead_lettered"],
        &[],
    );
    check(&server.run(&operator, &["dlq", "get", "job_nope"]), 1, &[], &["not_found", "HTTP 404"]);

    // Retry one (once), discard the other (once): both leave the DLQ.
    check(&server.run(&operator, &["dlq", "retry", &retried]), 0, &[&retried, "is queued"], &[]);
    check(&server.run(&operator, &["dlq", "retry", &retried]), 1, &[], &["not_found", "HTTP 404"]);
    let gone = server.json(&operator, &["dlq", "discard", &discarded]);
    assert_eq!(gone["state"], "dead_lettered");
    assert!(gone["discarded_at"].is_i64(), "{gone}");
    check(&server.run(&operator, &["dlq", "discard", &discarded]), 1, &[], &["not_found"]);
    check(&server.run(&operator, &["dlq", "get", &discarded]), 1, &[], &["not_found"]);
    check(&server.run(&operator, &["dlq", "list"]), 0, &["no dead-lettered jobs"], &[]);
    assert_eq!(state(&discarded), "dead_lettered", "a discarded job is kept");

    // The safety check is back: the retried job passes Gate B and is leased; the discarded
    // one never comes back.
    let (status, _) = server.http("POST", "/api/v1/admin/faults", ADMIN, Some(&json!({"safety": "none"})));
    assert_eq!(status, 200);
    let (status, claim) =
        server.http("POST", "/api/v1/workers/claim", &worker, Some(&json!({"wait_ms": 2000})));
    assert_eq!(status, 200, "{claim}");
    assert_eq!(claim["job_id"], retried.as_str());
    assert_eq!(claim["attempt"], 1);
    assert_eq!(claim["gate_b"]["decision"], "allow");
    assert_eq!(state(&retried), "leased");
    let (status, _) = server.http("POST", "/api/v1/workers/claim", &worker, Some(&json!({"wait_ms": 0})));
    assert_eq!(status, 204);
}
