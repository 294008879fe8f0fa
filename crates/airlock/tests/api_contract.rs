//! Issue 11, the API contract through the real binary: the read-only `viewer` role, JSON
//! submissions only, payload schemas per topic, and an OpenAPI document that says what the
//! server does.

#![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic, reason = "a test fails by panicking")]

use serde_json::{Value, json};

mod support;

const ADMIN: &str = "contract-admin-key-0123456789";

/// An `airlock serve` on loopback with its own data directory, killed when dropped.
struct Server {
    _process: support::Process,
    addr: String,
}

impl Server {
    /// A server with `policy` (the seed when `None`) and the config text `config`.
    fn start(name: &str, policy: Option<&str>, config: &str) -> Self {
        let dir = support::temp_dir(&format!("contract-{name}"));
        let config_file = dir.join("config.yaml");
        std::fs::write(&config_file, config).unwrap();
        let data = dir.join("store");
        let mut args = vec!["serve", "--listen", "127.0.0.1:0", "--data", data.to_str().unwrap()];
        args.extend(["--config", config_file.to_str().unwrap()]);
        let policy_file = dir.join("policy.yaml");
        if let Some(policy) = policy {
            std::fs::write(&policy_file, policy).unwrap();
            args.extend(["--policy", policy_file.to_str().unwrap()]);
        }
        let (process, addr) = support::airlock(&args, &[("AIRLOCK_ADMIN_KEY", ADMIN)]);
        Self { _process: process, addr }
    }

    fn key(&self, tenant: &str, name: &str, roles: &[&str]) -> String {
        support::key(&self.addr, ADMIN, tenant, name, roles)
    }

    fn post(&self, path: &str, key: &str, body: Value) -> (u16, Value) {
        support::post(&self.addr, path, key, body)
    }

    fn get(&self, path: &str, key: &str) -> (u16, Value) {
        support::get(&self.addr, path, key)
    }
}

/// A POST with `content_type` (none when `None`): status and body.
fn post_as(addr: &str, path: &str, key: &str, content_type: Option<&str>, body: &str) -> (u16, Value) {
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let mut request =
        agent.post(format!("http://{addr}{path}")).header("authorization", format!("Bearer {key}"));
    if let Some(t) = content_type {
        request = request.header("content-type", t);
    }
    let mut response = request.send(body).unwrap();
    let status = response.status().as_u16();
    let text = response.body_mut().read_to_string().unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

fn vm_job() -> Value {
    json!({"topic": "infra.vm.create", "env": "dev", "payload": {"size": "small"}})
}

#[test]
fn a_viewer_reads_everything_of_its_tenant_and_changes_nothing() {
    let server = Server::start("viewer", None, "");
    let agent = server.key("acme", "agent", &["submitter"]);
    let viewer = server.key("acme", "dashboard", &["viewer"]);
    let (status, submitted) = server.post("/api/v1/jobs", &agent, vm_job());
    assert_eq!(status, 202, "{submitted}");
    let id = submitted["job_id"].as_str().unwrap();

    for path in [
        "/api/v1/jobs".to_owned(),
        format!("/api/v1/jobs/{id}"),
        "/api/v1/approvals".into(),
        "/api/v1/approvals/summary".into(),
        "/api/v1/dlq".into(),
        "/api/v1/audit".into(),
        "/api/v1/reports/idempotency".into(),
        "/api/v1/overview".into(),
    ] {
        let (status, body) = server.get(&path, &viewer);
        assert_eq!(status, 200, "a viewer reads {path}: {body}");
    }
    let (status, snapshots) = server.get("/api/v1/policy/snapshots", &viewer);
    assert_eq!(status, 200);
    assert!(
        snapshots["active"]["hash"].is_string() && snapshots["active"]["version"].is_u64(),
        "{snapshots}"
    );
    assert!(snapshots["active"]["source"].is_null(), "the policy source is for operators: {snapshots}");
    let (_, one) = server.get("/api/v1/policy/snapshots/1", &viewer);
    assert!(one["source"].is_null() && one["hash"].is_string(), "{one}");

    for (path, body) in [
        ("/api/v1/jobs", vm_job()),
        (&*format!("/api/v1/jobs/{id}/cancel"), json!({})),
        ("/api/v1/policy/simulate", json!({"job": vm_job()})),
        ("/api/v1/policy/rollback", json!({"version": 1})),
        ("/api/v1/workers/claim", json!({})),
        ("/api/v1/keys", json!({"tenant": "acme", "name": "x", "roles": ["viewer"]})),
        ("/api/v1/audit/verify", json!({})),
    ] {
        let (status, answer) = server.post(path, &viewer, body);
        assert_eq!(status, 403, "a viewer may not POST {path}: {answer}");
    }
    let (_, job) = server.get(&format!("/api/v1/jobs/{id}"), &agent);
    assert_eq!(job["state"], "queued", "{job}");

    // Another tenant's viewer sees nothing of acme.
    let other = server.key("globex", "dashboard", &["viewer"]);
    assert_eq!(server.get(&format!("/api/v1/jobs/{id}"), &other).0, 404);
}

#[test]
fn a_job_must_be_sent_as_json() {
    let server = Server::start("content-type", None, "");
    let agent = server.key("acme", "agent", &["submitter"]);
    let body = vm_job().to_string();
    for content_type in [None, Some("text/plain"), Some("application/x-www-form-urlencoded")] {
        let (status, answer) = post_as(&server.addr, "/api/v1/jobs", &agent, content_type, &body);
        assert_eq!(status, 415, "{content_type:?}: {answer}");
        assert_eq!(answer["error"], "unsupported_media_type", "{answer}");
        assert!(answer["message"].as_str().unwrap().contains("application/json"), "{answer}");
    }
    let (status, answer) =
        post_as(&server.addr, "/api/v1/jobs", &agent, Some("Application/JSON; charset=utf-8"), &body);
    assert_eq!(status, 202, "{answer}");
    // Authentication comes first: without a key the answer is 401 whatever the body.
    assert_eq!(post_as(&server.addr, "/api/v1/jobs", "", Some("text/plain"), &body).0, 401);
}

#[test]
fn the_served_document_lists_only_what_a_default_serve_serves() {
    let server = Server::start("document", None, "");
    let (status, doc) = server.get("/api/v1/openapi.json", "");
    assert_eq!(status, 200);
    let paths = doc["paths"].as_object().unwrap();
    for absent in ["/api/v1/admin/faults", "/api/v1/safety/evaluate"] {
        assert!(!paths.contains_key(absent), "{absent} is not served by a default `serve`");
        assert_eq!(server.post(absent, ADMIN, json!({})).0, 404, "{absent}");
    }
    assert!(paths.contains_key("/api/v1/jobs") && paths.contains_key("/api/v1/workers/claim"));

    // The validation rules are in the document: a generated job that follows them is accepted.
    let submit = &doc["components"]["schemas"]["SubmitRequest"]["properties"];
    assert_eq!(submit["topic"]["pattern"], "^[a-z0-9_-]+(\\.[a-z0-9_-]+)*$", "{submit}");
    assert_eq!(submit["env"]["maxLength"], 256, "{submit}");
    let after = doc["paths"]["/api/v1/jobs"]["get"]["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "after")
        .unwrap()
        .clone();
    assert_eq!(after["schema"]["pattern"], "^job_[0-9A-HJKMNP-TV-Z]{26}$", "{after}");
    let responses = &doc["paths"]["/api/v1/jobs"]["post"]["responses"];
    assert!(responses["415"].is_object() && responses["429"].is_object(), "{responses}");

    // A claim without a body is the default pool without waiting, as documented; the pools
    // are this server's.
    assert_eq!(doc["paths"]["/api/v1/workers/claim"]["post"]["requestBody"]["required"], false);
    assert_eq!(
        doc["components"]["schemas"]["ClaimRequest"]["properties"]["pool"]["enum"],
        json!(["default"])
    );
    let worker = server.key("acme", "worker", &["worker"]);
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let response = agent
        .post(format!("http://{}/api/v1/workers/claim", server.addr))
        .header("authorization", format!("Bearer {worker}"))
        .send_empty()
        .unwrap();
    assert_eq!(response.status().as_u16(), 204);
}

const SCHEMA_POLICY: &str = r#"version: v1
rules:
  - id: deny-public-ingress
    when: { topic: infra.security_group.update, cidr: "0.0.0.0/0" }
    decision: deny
schemas:
  "infra.security_group.*":
    type: object
    required: [cidr, port]
    additionalProperties: false
    properties:
      cidr: { type: string, pattern: "^[0-9a-f.:/]+$" }
      port: { type: integer, minimum: 1, maximum: 65535 }
"#;

#[test]
fn a_payload_that_breaks_its_topics_schema_gets_400_with_every_violation() {
    let server = Server::start("schemas", Some(SCHEMA_POLICY), "");
    let agent = server.key("acme", "agent", &["submitter"]);
    let job =
        |payload: Value| json!({"topic": "infra.security_group.update", "env": "dev", "payload": payload});

    // A list where a string belongs would otherwise reach the deny rule as another shape.
    let (status, body) =
        server.post("/api/v1/jobs", &agent, job(json!({"cidr": ["0.0.0.0/0"], "port": 70000, "x": 1})));
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"], "invalid_request", "{body}");
    let fields: Vec<&str> =
        body["fields"].as_array().unwrap().iter().map(|f| f["field"].as_str().unwrap()).collect();
    for field in ["payload", "payload/cidr", "payload/port"] {
        assert!(fields.contains(&field), "`{field}` is named: {body}");
    }
    assert!(body["message"].as_str().unwrap().contains("65535"), "{body}");
    let (_, jobs) = server.get("/api/v1/jobs", &agent);
    assert_eq!(jobs["jobs"], json!([]), "nothing stored");

    let (status, body) = server.post("/api/v1/jobs", &agent, job(json!({"port": 443})));
    assert_eq!(status, 400, "{body}");
    assert!(body["message"].as_str().unwrap().contains("cidr"), "{body}");

    let (status, body) = server.post("/api/v1/jobs", &agent, job(json!({"cidr": "0.0.0.0/0", "port": 443})));
    assert_eq!(status, 403, "a conforming payload goes on to the gates: {body}");
    let (status, body) = server.post("/api/v1/jobs", &agent, job(json!({"cidr": "10.0.0.0/8", "port": 443})));
    assert_eq!(status, 202, "{body}");
    let other = json!({"topic": "infra.vm.create", "env": "dev", "payload": ["anything"]});
    assert_eq!(server.post("/api/v1/jobs", &agent, other).0, 202, "no schema for this topic");
}

fn policy_check(name: &str, text: &str) -> (bool, String) {
    let dir = support::temp_dir(&format!("contract-check-{name}"));
    let file = dir.join("policy.yaml");
    std::fs::write(&file, text).unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args(["policy", "check", file.to_str().unwrap()])
        .output()
        .unwrap();
    let text =
        format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    (output.status.success(), text)
}

#[test]
fn policy_check_validates_the_schemas_themselves() {
    assert!(policy_check("good", SCHEMA_POLICY).0, "{}", policy_check("good", SCHEMA_POLICY).1);
    let bad = "version: v1\nschemas:\n  \"infra.*\":\n    type: 5\n  \"mcp.**\":\n    $ref: \"https://example.com/s.json\"\n  \"tf.**\": [1]\n";
    let (ok, report) = policy_check("bad", bad);
    assert!(!ok, "{report}");
    assert!(
        report.contains("4:5") && report.contains("the schema of `infra.*` is not a valid JSON Schema"),
        "{report}"
    );
    assert!(report.contains("6:5") && report.contains("example.com"), "remote refs are refused: {report}");
    assert!(report.contains("7:12") && report.contains("must be a map or a boolean"), "{report}");
}

const THROTTLE_POLICY: &str = r#"version: v1
rules:
  - id: throttle-recreate
    when: { topic: infra.cluster.recreate }
    decision: throttle
    limit: { rate: 1, per: 10m }
"#;

#[test]
fn gate_decisions_separate_an_admitted_throttle_from_a_refused_one() {
    let server = Server::start("throttle-metrics", Some("version: v1\n"), "");
    let agent = server.key("acme", "agent", &["submitter"]);
    let worker = server.key("acme", "worker", &["worker"]);
    let job = |n: u32| json!({"topic": "infra.cluster.recreate", "env": "dev", "payload": {"n": n}});
    let series = |gate: &str, decision: &str| {
        let name = format!(
            "airlock_gate_decisions_total{{gate=\"{gate}\",decision=\"{decision}\",topic=\"infra.cluster.recreate\"}}"
        );
        support::try_metric(&server.addr, &name).unwrap_or(0.0)
    };
    // Two jobs queued before the throttle exists, so that Gate B has one to admit and one to refuse.
    assert_eq!(server.post("/api/v1/jobs", &agent, job(1)).0, 202);
    assert_eq!(server.post("/api/v1/jobs", &agent, job(2)).0, 202);
    let (status, body) = support::post(&server.addr, "/api/v1/policy/publish", ADMIN, THROTTLE_POLICY);
    assert_eq!(status, 201, "{body}");

    assert_eq!(server.post("/api/v1/jobs", &agent, job(3)).0, 202);
    assert_eq!(server.post("/api/v1/jobs", &agent, job(4)).0, 429);
    assert_eq!((series("a", "throttle_admitted"), series("a", "throttle_refused")), (1.0, 1.0));

    assert_eq!(server.post("/api/v1/workers/claim", &worker, json!({})).0, 200);
    // The second claim meets the two jobs left (2 and 3), and Gate B's budget refuses both.
    assert_eq!(server.post("/api/v1/workers/claim", &worker, json!({})).0, 204);
    assert_eq!((series("b", "throttle_admitted"), series("b", "throttle_refused")), (1.0, 2.0));
    assert_eq!(series("a", "throttle") + series("b", "throttle"), 0.0, "no unsplit throttle series");
}

#[test]
fn a_key_with_a_principal_that_is_not_a_string_is_refused() {
    // Found by schemathesis: `{"principal": {}}` used to be ignored and the key created.
    let server = Server::start("key-principal", None, "");
    let body = json!({"tenant": "acme", "name": "agent", "roles": ["submitter"], "principal": {}});
    let (status, answer) = server.post("/api/v1/keys", ADMIN, body);
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["fields"][0]["field"], "principal", "{answer}");
    let (_, keys) = server.get("/api/v1/keys", ADMIN);
    assert!(!keys.to_string().contains("\"agent\""), "no key was created: {keys}");
}
