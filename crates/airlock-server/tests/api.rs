//! Gate A and the API around it, in process through `router(state)`: every status of SPEC 5,
//! approvals bound to hashes, idempotency across restarts, tenancy, the audit chain under
//! tampering, side-effect-free questions, and bad input. Each test has its own data dir.

#![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic, reason = "a test fails by panicking")]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use airlock_server::state::{AppState, Config, FailMode, FailModes, Fault};
use airlock_store::{SqliteStore, Store};
use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode};
use serde_json::{Value, json};
use tower::ServiceExt as _;

const ADMIN: &str = "test-admin-key-0123456789";
const SEED: &str = include_str!("../../../examples/policies/seed.yaml");

static DIRS: AtomicUsize = AtomicUsize::new(0);

fn temp_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "airlock-api-{}-{}",
        std::process::id(),
        DIRS.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

struct Api {
    app: Router,
    state: AppState,
    dir: PathBuf,
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Value,
}

impl Api {
    async fn start(config: Config) -> Self {
        Self::open(temp_dir(), config).await
    }

    async fn open(dir: PathBuf, config: Config) -> Self {
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir).unwrap());
        let active = airlock_server::load_policy(&*store, ("seed", SEED)).await.unwrap();
        airlock_server::bootstrap_admin(&*store, Some(ADMIN.into())).await.unwrap();
        let state = airlock_server::app_state(store, active, config);
        Self { app: airlock_server::router(state.clone()), state, dir }
    }

    async fn call(&self, method: Method, uri: &str, key: Option<&str>, body: impl Into<Body>) -> Reply {
        let mut request =
            Request::builder().method(method).uri(uri).header("content-type", "application/json");
        if let Some(key) = key {
            request = request.header("authorization", format!("Bearer {key}"));
        }
        let response = self.app.clone().oneshot(request.body(body.into()).unwrap()).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
        let body = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
        Reply { status, headers, body }
    }

    async fn post(&self, uri: &str, key: &str, body: Value) -> Reply {
        self.call(Method::POST, uri, Some(key), body.to_string()).await
    }

    async fn get(&self, uri: &str, key: &str) -> Reply {
        self.call(Method::GET, uri, Some(key), Body::empty()).await
    }

    async fn key(&self, tenant: &str, name: &str, roles: &[&str]) -> String {
        let r =
            self.post("/api/v1/keys", ADMIN, json!({"tenant": tenant, "name": name, "roles": roles})).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
        r.body["key"].as_str().unwrap().to_owned()
    }

    async fn submit(&self, key: &str, job: Value) -> Reply {
        self.post("/api/v1/jobs", key, job).await
    }

    async fn publish(&self, policy: &str) -> Reply {
        self.call(Method::POST, "/api/v1/policy/publish", Some(ADMIN), policy.to_owned()).await
    }

    async fn audit_ok(&self, key: &str) -> bool {
        let r = self.call(Method::POST, "/api/v1/audit/verify", Some(key), Body::empty()).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        r.body["ok"].as_bool().unwrap()
    }
}

fn delete_prod() -> Value {
    json!({"topic": "infra.resource.delete", "env": "production", "payload": {"id": "vm-1"}})
}

fn public_ingress() -> Value {
    json!({"topic": "infra.security_group.update", "env": "production", "payload": {"cidr": "0.0.0.0/0"}})
}

fn recreate() -> Value {
    json!({"topic": "infra.cluster.recreate", "env": "production"})
}

#[tokio::test]
async fn gate_a_answers_every_decision() {
    let api = Api::start(Config::default()).await;
    let agent = api.key("acme", "agent", &["submitter"]).await;

    let allowed = api.submit(&agent, json!({"topic": "infra.vm.create", "env": "production"})).await;
    assert_eq!(allowed.status, StatusCode::ACCEPTED);
    assert_eq!(allowed.body["state"], "queued");
    assert_eq!(allowed.body["decision"]["decision"], "allow");
    assert!(allowed.body["decision"]["snapshot"].as_str().unwrap().starts_with("sha256:"));

    let denied = api.submit(&agent, public_ingress()).await;
    assert_eq!(denied.status, StatusCode::FORBIDDEN);
    assert_eq!(denied.body["error"], "policy_denied");
    assert_eq!(denied.body["rule_ids"], json!(["deny-prod-public-ingress"]));
    assert_eq!(denied.body["reason"], "public ingress in production is never allowed");

    let first = api.submit(&agent, recreate()).await;
    assert_eq!(
        (first.status, first.body["decision"]["decision"].as_str()),
        (StatusCode::ACCEPTED, Some("throttle"))
    );
    let second = api.submit(&agent, recreate()).await;
    assert_eq!(second.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(second.body["error"], "throttled");
    let retry: u64 = second.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((590..=600).contains(&retry), "the 1-per-10-minutes bucket refills in about 600 s, got {retry}");

    let human = api.submit(&agent, delete_prod()).await;
    assert_eq!(human.status, StatusCode::ACCEPTED);
    assert_eq!(human.body["state"], "awaiting_approval");
    assert!(human.body["approval"]["id"].as_str().unwrap().starts_with("apr_"));

    // Deny and throttle stored no job; every decision is in the audit chain.
    let jobs = api.get("/api/v1/jobs?limit=100", &agent).await;
    assert_eq!(jobs.body["jobs"].as_array().unwrap().len(), 3);
    let operator = api.key("acme", "ops", &["operator"]).await;
    let audit = api.get("/api/v1/audit?limit=100", &operator).await;
    let kinds: Vec<&str> =
        audit.body["records"].as_array().unwrap().iter().map(|r| r["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds.iter().filter(|k| **k == "gate_a.decision").count(),
        2,
        "one deny, one throttle: {kinds:?}"
    );
    assert_eq!(kinds.iter().filter(|k| **k == "job.submitted").count(), 3, "{kinds:?}");
    assert!(api.audit_ok(&operator).await);

    let job_id = human.body["job_id"].as_str().unwrap();
    let job = api.get(&format!("/api/v1/jobs/{job_id}"), &agent).await;
    assert_eq!(job.body["decisions"]["gate_a"]["rule_ids"], json!(["require-approval-prod-delete"]));
    assert_eq!(job.body["history"][0]["to"], "awaiting_approval");
    assert_eq!(job.body["approval"]["status"], "pending");
}

#[tokio::test]
async fn approvals_are_bound_to_job_and_snapshot() {
    let api = Api::start(Config::default()).await;
    let agent = api.key("acme", "agent", &["submitter"]).await;
    let alice = api.key("acme", "alice", &["approver"]).await;
    let both = api.key("acme", "agent2", &["submitter", "approver"]).await;

    let submitted = api.submit(&both, delete_prod()).await;
    let approval = submitted.body["approval"]["id"].as_str().unwrap().to_owned();
    let own = api.post(&format!("/api/v1/approvals/{approval}/approve"), &both, json!({})).await;
    assert_eq!((own.status, own.body["error"].as_str()), (StatusCode::FORBIDDEN, Some("self_approval")));
    let by_submitter_role =
        api.post(&format!("/api/v1/approvals/{approval}/approve"), &agent, json!({})).await;
    assert_eq!(by_submitter_role.status, StatusCode::FORBIDDEN, "a submitter key cannot approve");

    let ok = api.post(&format!("/api/v1/approvals/{approval}/approve"), &alice, json!({})).await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.body);
    assert_eq!(ok.body["job_state"], "queued");
    assert_eq!(ok.body["approval"]["status"], "approved");
    let again = api.post(&format!("/api/v1/approvals/{approval}/approve"), &alice, json!({})).await;
    assert_eq!(
        (again.status, again.body["error"].as_str()),
        (StatusCode::CONFLICT, Some("approval_not_pending"))
    );

    // A publish between request and approval makes the approval stale.
    let pending = api.submit(&agent, delete_prod()).await;
    let stale_id = pending.body["approval"]["id"].as_str().unwrap().to_owned();
    let stricter = SEED
        .replace("decision: require_human", "decision: require_human\n    reason: deletes need a human, v2");
    assert_eq!(api.publish(&stricter).await.status, StatusCode::CREATED);
    let refused = api.post(&format!("/api/v1/approvals/{stale_id}/approve"), &alice, json!({})).await;
    assert_eq!(refused.status, StatusCode::CONFLICT, "{}", refused.body);
    assert_eq!(refused.body["error"], "approval_stale");
    assert!(refused.body["reason"].as_str().unwrap().contains("policy changed"), "{}", refused.body);
    assert_eq!(refused.body["current_decision"]["decision"], "require_human");
    let old = api.get(&format!("/api/v1/approvals/{stale_id}"), &alice).await;
    assert_eq!(old.body["status"], "stale");
    let fresh = refused.body["new_approval_id"].as_str().unwrap();
    let approved = api.post(&format!("/api/v1/approvals/{fresh}/approve"), &alice, json!({})).await;
    assert_eq!(
        (approved.status, approved.body["job_state"].as_str()),
        (StatusCode::OK, Some("queued")),
        "{}",
        approved.body
    );
}

#[tokio::test]
async fn rule_binding_survives_unrelated_publishes() {
    let config = Config { approval_binding: airlock_core::approval::Binding::Rule, ..Config::default() };
    let api = Api::start(config).await;
    let agent = api.key("acme", "agent", &["submitter"]).await;
    let alice = api.key("acme", "alice", &["approver"]).await;
    let first = api.submit(&agent, delete_prod()).await;
    let second = api.submit(&agent, delete_prod()).await;
    let unrelated =
        format!("{SEED}  - id: new-rule\n    when: {{ topic: infra.dns.zone.delete }}\n    decision: deny\n");
    assert_eq!(api.publish(&unrelated).await.status, StatusCode::CREATED);
    let id = first.body["approval"]["id"].as_str().unwrap();
    let kept = api.post(&format!("/api/v1/approvals/{id}/approve"), &alice, json!({})).await;
    assert_eq!(kept.status, StatusCode::OK, "the deciding rule did not change: {}", kept.body);
    let edited = unrelated.replace(
        "when: { topic: infra.resource.delete, env: production }",
        "when: { topic: infra.resource.delete, env: [production, prod] }",
    );
    assert_eq!(api.publish(&edited).await.status, StatusCode::CREATED);
    let id = second.body["approval"]["id"].as_str().unwrap();
    let stale = api.post(&format!("/api/v1/approvals/{id}/approve"), &alice, json!({})).await;
    assert_eq!(stale.body["error"], "approval_stale", "{}", stale.body);
    assert!(stale.body["reason"].as_str().unwrap().contains("require-approval-prod-delete"));
}

#[tokio::test]
async fn quorum_reject_and_expiry() {
    let quorum = SEED.replace("decision: require_human", "decision: require_human\n    approvals: 2");
    let api = Api::start(Config { approval_ttl_ms: 200, ..Config::default() }).await;
    assert_eq!(api.publish(&quorum).await.status, StatusCode::CREATED);
    let agent = api.key("acme", "agent", &["submitter"]).await;
    let alice = api.key("acme", "alice", &["approver"]).await;
    let bob = api.key("acme", "bob", &["approver"]).await;

    let job = api.submit(&agent, delete_prod()).await;
    let id = job.body["approval"]["id"].as_str().unwrap().to_owned();
    assert_eq!(job.body["approval"]["quorum"], 2);
    let first = api.post(&format!("/api/v1/approvals/{id}/approve"), &alice, json!({})).await;
    assert_eq!(
        (first.body["remaining"].as_u64(), first.body["job_state"].as_str()),
        (Some(1), Some("awaiting_approval"))
    );
    let second = api.post(&format!("/api/v1/approvals/{id}/approve"), &bob, json!({})).await;
    assert_eq!(second.body["job_state"], "queued", "{}", second.body);

    let rejected = api.submit(&agent, delete_prod()).await;
    let rid = rejected.body["approval"]["id"].as_str().unwrap().to_owned();
    let r = api.post(&format!("/api/v1/approvals/{rid}/reject"), &alice, json!({})).await;
    assert_eq!(r.body["job_state"], "rejected", "{}", r.body);

    let expiring = api.submit(&agent, delete_prod()).await;
    let eid = expiring.body["approval"]["id"].as_str().unwrap().to_owned();
    tokio::time::sleep(Duration::from_millis(250)).await;
    let late = api.post(&format!("/api/v1/approvals/{eid}/approve"), &alice, json!({})).await;
    assert_eq!((late.status, late.body["error"].as_str()), (StatusCode::CONFLICT, Some("approval_expired")));
    let job_id = expiring.body["job_id"].as_str().unwrap();
    assert_eq!(api.get(&format!("/api/v1/jobs/{job_id}"), &agent).await.body["state"], "expired");
}

#[tokio::test]
async fn idempotency_replays_conflicts_and_survives_restart() {
    let dir = temp_dir();
    let agent;
    let first;
    {
        let api = Api::open(dir.clone(), Config::default()).await;
        agent = api.key("acme", "agent", &["submitter"]).await;
        let job = json!({"topic": "infra.vm.create", "env": "dev", "idempotency_key": "deploy-42"});
        first = api.submit(&agent, job.clone()).await;
        assert_eq!(first.status, StatusCode::ACCEPTED);
        let replay = api.submit(&agent, job).await;
        assert_eq!(replay.status, StatusCode::ACCEPTED);
        assert_eq!(replay.headers["idempotent-replayed"], "true");
        assert_eq!(replay.body, first.body);
    }
    let api = Api::open(dir, Config::default()).await;
    let job = json!({"topic": "infra.vm.create", "env": "dev", "idempotency_key": "deploy-42"});
    let after_restart = api.submit(&agent, job).await;
    assert_eq!(after_restart.body, first.body, "the key survives a restart");
    let reused = api
        .submit(&agent, json!({"topic": "infra.vm.create", "env": "staging", "idempotency_key": "deploy-42"}))
        .await;
    assert_eq!(
        (reused.status, reused.body["error"].as_str()),
        (StatusCode::CONFLICT, Some("idempotency_key_reused"))
    );

    // A denied request leaves no key behind: after a policy change its retry is evaluated afresh.
    let denied = api
        .submit(
            &agent,
            json!({"topic": "infra.security_group.update", "env": "production",
        "payload": {"cidr": "0.0.0.0/0"}, "idempotency_key": "sg-1"}),
        )
        .await;
    assert_eq!(denied.status, StatusCode::FORBIDDEN);
    assert_eq!(api.publish("version: v1\nrules: []\n").await.status, StatusCode::CREATED);
    let retried = api
        .submit(
            &agent,
            json!({"topic": "infra.security_group.update", "env": "production",
        "payload": {"cidr": "0.0.0.0/0"}, "idempotency_key": "sg-1"}),
        )
        .await;
    assert_eq!(retried.status, StatusCode::ACCEPTED);
}

#[tokio::test]
async fn tenants_are_invisible_to_each_other() {
    let api = Api::start(Config::default()).await;
    let acme = api.key("acme", "agent", &["submitter", "approver", "operator"]).await;
    let other = api.key("globex", "agent", &["submitter", "approver", "operator"]).await;
    let job = api.submit(&acme, delete_prod()).await;
    let job_id = job.body["job_id"].as_str().unwrap();
    let approval = job.body["approval"]["id"].as_str().unwrap();
    assert_eq!(api.get(&format!("/api/v1/jobs/{job_id}"), &other).await.status, StatusCode::NOT_FOUND);
    assert_eq!(api.get(&format!("/api/v1/approvals/{approval}"), &other).await.status, StatusCode::NOT_FOUND);
    let cancel = api.post(&format!("/api/v1/jobs/{job_id}/cancel"), &other, json!({})).await;
    assert_eq!(cancel.status, StatusCode::NOT_FOUND);
    let approve = api.post(&format!("/api/v1/approvals/{approval}/approve"), &other, json!({})).await;
    assert_eq!(approve.status, StatusCode::NOT_FOUND);
    assert_eq!(api.get("/api/v1/jobs", &other).await.body["jobs"], json!([]));
    assert_eq!(api.get("/api/v1/jobs/job_notanid", &acme).await.status, StatusCode::NOT_FOUND);
    let cancelled = api.post(&format!("/api/v1/jobs/{job_id}/cancel"), &acme, json!({})).await;
    assert_eq!(cancelled.body["state"], "cancelled");
    let twice = api.post(&format!("/api/v1/jobs/{job_id}/cancel"), &acme, json!({})).await;
    assert_eq!(
        (twice.status, twice.body["error"].as_str()),
        (StatusCode::CONFLICT, Some("invalid_transition"))
    );
}

#[tokio::test]
async fn auth_and_roles_are_checked() {
    let api = Api::start(Config::default()).await;
    let none = api.call(Method::GET, "/api/v1/jobs", None, Body::empty()).await;
    assert_eq!((none.status, none.body["error"].as_str()), (StatusCode::UNAUTHORIZED, Some("unauthorized")));
    let wrong = api.get("/api/v1/jobs", "ak_nope").await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    let approver = api.key("acme", "alice", &["approver"]).await;
    let submit = api.submit(&approver, json!({"topic": "a.b", "env": "dev"})).await;
    assert_eq!(submit.status, StatusCode::FORBIDDEN);
    assert!(submit.body["message"].as_str().unwrap().contains("`submitter`"));
    assert_eq!(api.publish_as(&approver, "version: v1\n").await, StatusCode::FORBIDDEN);
    let tenant_admin = api.key("acme", "acme-admin", &["admin"]).await;
    let cross = api
        .post("/api/v1/keys", &tenant_admin, json!({"tenant": "globex", "name": "x", "roles": ["submitter"]}))
        .await;
    assert_eq!(cross.status, StatusCode::FORBIDDEN, "a tenant admin manages only its tenant");
    let dup = api
        .post("/api/v1/keys", ADMIN, json!({"tenant": "acme", "name": "alice", "roles": ["approver"]}))
        .await;
    assert_eq!((dup.status, dup.body["error"].as_str()), (StatusCode::CONFLICT, Some("key_name_taken")));
    let bad =
        api.post("/api/v1/keys", ADMIN, json!({"tenant": "Acme!", "name": "", "roles": ["root"]})).await;
    assert_eq!(bad.body["fields"].as_array().unwrap().len(), 3, "{}", bad.body);

    let agent = api.key("acme", "agent", &["submitter"]).await;
    let keys = api.get("/api/v1/keys", ADMIN).await;
    let id =
        keys.body["keys"].as_array().unwrap().iter().find(|k| k["name"] == "agent").unwrap()["id"].clone();
    let revoked = api
        .call(Method::DELETE, &format!("/api/v1/keys/{}", id.as_str().unwrap()), Some(ADMIN), Body::empty())
        .await;
    assert_eq!(revoked.status, StatusCode::OK);
    let twice = api
        .call(Method::DELETE, &format!("/api/v1/keys/{}", id.as_str().unwrap()), Some(ADMIN), Body::empty())
        .await;
    assert_eq!((twice.status, twice.body["error"].as_str()), (StatusCode::CONFLICT, Some("already_revoked")));
    let dotted = api
        .post("/api/v1/keys", ADMIN, json!({"tenant": "acme", "name": "bob.", "roles": ["submitter"]}))
        .await;
    assert_eq!(dotted.status, StatusCode::BAD_REQUEST, "a key name must be a valid principal");
    let after = api.submit(&agent, json!({"topic": "a.b", "env": "dev"})).await;
    assert_eq!(
        (after.status, after.body["message"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("this API key was revoked"))
    );
}

impl Api {
    async fn publish_as(&self, key: &str, policy: &str) -> StatusCode {
        self.call(Method::POST, "/api/v1/policy/publish", Some(key), policy.to_owned()).await.status
    }
}

#[tokio::test]
async fn bad_input_gets_clear_errors_and_the_server_keeps_serving() {
    let api = Api::start(Config::default()).await;
    let agent = api.key("acme", "agent", &["submitter"]).await;
    let malformed = api.call(Method::POST, "/api/v1/jobs", Some(&agent), "{\"topic\":").await;
    assert_eq!(malformed.status, StatusCode::BAD_REQUEST);
    assert!(malformed.body["message"].as_str().unwrap().contains("not valid JSON"));
    let wrong_types =
        api.submit(&agent, json!({"topic": 5, "env": ["prod"], "payload": "x", "colour": "red"})).await;
    let fields: Vec<&str> =
        wrong_types.body["fields"].as_array().unwrap().iter().map(|f| f["field"].as_str().unwrap()).collect();
    assert_eq!(wrong_types.status, StatusCode::BAD_REQUEST);
    assert!(fields.contains(&"topic") && fields.contains(&"env") && fields.contains(&"colour"), "{fields:?}");
    let big = "x".repeat(airlock_core::defaults::REQUEST_BODY_BYTES_MAX + 1);
    let oversize = api.submit(&agent, json!({"topic": "a.b", "env": "dev", "payload": {"blob": big}})).await;
    assert_eq!(
        (oversize.status, oversize.body["error"].as_str()),
        (StatusCode::PAYLOAD_TOO_LARGE, Some("payload_too_large"))
    );
    let labels: serde_json::Map<String, Value> = (0..100).map(|i| (format!("l{i}"), json!("v"))).collect();
    let many = api.submit(&agent, json!({"topic": "a.b", "env": "dev", "labels": labels})).await;
    assert_eq!(many.status, StatusCode::BAD_REQUEST);
    assert!(many.body["message"].as_str().unwrap().contains("at most 64"), "{}", many.body);
    let mut deep = json!(1);
    for _ in 0..100 {
        deep = json!([deep]);
    }
    let deep = api.submit(&agent, json!({"topic": "a.b", "env": "dev", "payload": deep})).await;
    assert_eq!(deep.status, StatusCode::BAD_REQUEST);
    let unknown_query = api.get("/api/v1/jobs?colour=red", &agent).await;
    assert_eq!(unknown_query.status, StatusCode::BAD_REQUEST);
    let bad_state = api.get("/api/v1/jobs?state=done", &agent).await;
    assert!(bad_state.body["message"].as_str().unwrap().contains("unknown state `done`"));
    let bad_policy =
        api.publish("version: v1\nrules:\n  - id: a\n    when: {topic: x}\n    decision: block\n").await;
    assert_eq!(bad_policy.status, StatusCode::BAD_REQUEST);
    assert_eq!(bad_policy.body["diagnostics"][0]["line"], 5);
    assert_eq!(api.call(Method::GET, "/nope", None, Body::empty()).await.status, StatusCode::NOT_FOUND);
    let wrong_method = api.call(Method::DELETE, "/api/v1/jobs", Some(&agent), Body::empty()).await;
    assert_eq!(
        (wrong_method.status, wrong_method.body["error"].as_str()),
        (StatusCode::METHOD_NOT_ALLOWED, Some("method_not_allowed"))
    );
    let ok = api.submit(&agent, json!({"topic": "a.b", "env": "dev"})).await;
    assert_eq!(ok.status, StatusCode::ACCEPTED, "still serving");
}

#[tokio::test]
async fn fail_modes_when_the_safety_check_is_unavailable() {
    let api = Api::start(Config { gate_a_timeout: Duration::from_millis(50), ..Config::default() }).await;
    let agent = api.key("acme", "agent", &["submitter"]).await;
    api.state.safety().inject(Some(Fault::Unavailable));
    let closed =
        api.submit(&agent, json!({"topic": "infra.vm.create", "env": "dev", "idempotency_key": "k"})).await;
    assert_eq!(closed.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(closed.body["error"], "safety_unavailable");
    assert!(closed.headers.contains_key("retry-after"));
    api.state.safety().inject(Some(Fault::Slow(Duration::from_secs(5))));
    let slow = api.submit(&agent, json!({"topic": "infra.vm.create", "env": "dev"})).await;
    assert_eq!(slow.status, StatusCode::SERVICE_UNAVAILABLE, "the evaluation timeout fails closed");
    assert!(slow.body["message"].as_str().unwrap().contains("timed out"));
    assert_eq!(api.get("/api/v1/jobs", &agent).await.body["jobs"], json!([]), "nothing persisted");
    api.state.safety().inject(None);
    let retried =
        api.submit(&agent, json!({"topic": "infra.vm.create", "env": "dev", "idempotency_key": "k"})).await;
    assert_eq!(retried.status, StatusCode::ACCEPTED, "a 503 never poisons an idempotency key");

    let open = Api::start(Config {
        gate_a_fail: FailModes { default: FailMode::Open, ..FailModes::default() },
        ..Config::default()
    })
    .await;
    let agent = open.key("acme", "agent", &["submitter"]).await;
    open.state.safety().inject(Some(Fault::Unavailable));
    let bypassed = open.submit(&agent, public_ingress()).await;
    assert_eq!(bypassed.status, StatusCode::ACCEPTED);
    assert_eq!(bypassed.body["gate_a_bypassed"], true);
    let job = open.get(&format!("/api/v1/jobs/{}", bypassed.body["job_id"].as_str().unwrap()), &agent).await;
    assert_eq!(job.body["gate_a_bypassed"], true);
    let metrics = open.call(Method::GET, "/metrics", None, Body::empty()).await;
    let text = metrics.body.as_str().unwrap();
    assert!(
        text.contains("airlock_gateway_fail_open_total{topic=\"infra.security_group.update\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("airlock_safety_check_failures_total{gate=\"a\",reason=\"unavailable\"} 1"),
        "{text}"
    );
}

#[tokio::test]
async fn simulate_explain_and_diff_have_no_side_effects() {
    let api = Api::start(Config::default()).await;
    let agent = api.key("acme", "agent", &["submitter", "operator"]).await;
    for _ in 0..3 {
        let sim = api.post("/api/v1/policy/simulate", &agent, json!({"job": recreate()})).await;
        assert_eq!(sim.body["decision"], "throttle", "{}", sim.body);
    }
    let explain = api.post("/api/v1/policy/explain", &agent, json!({"job": public_ingress()})).await;
    assert_eq!(explain.body["rules"][0]["verdict"], "matched");
    assert_eq!(explain.body["rules"][1]["verdict"], "not_matched");
    let candidate = api
        .post(
            "/api/v1/policy/simulate",
            &agent,
            json!({"job": public_ingress(), "policy": "version: v1\nrules: []\n"}),
        )
        .await;
    assert_eq!(candidate.body["decision"], "allow");
    assert_eq!(api.get("/api/v1/jobs", &agent).await.body["jobs"], json!([]), "nothing stored");
    let real = api.submit(&agent, recreate()).await;
    assert_eq!(real.status, StatusCode::ACCEPTED, "simulations consumed no budget");

    api.submit(&agent, delete_prod()).await;
    api.submit(&agent, json!({"topic": "infra.vm.create", "env": "dev"})).await;
    let deny_deletes = format!(
        "{SEED}  - id: no-deletes\n    when: {{ topic: infra.resource.delete }}\n    decision: deny\n"
    );
    let diff = api.post("/api/v1/policy/diff", &agent, json!({"policy": deny_deletes})).await;
    assert_eq!(diff.status, StatusCode::OK, "{}", diff.body);
    assert_eq!(diff.body["jobs_evaluated"], 3);
    let changed = diff.body["changed"].as_array().unwrap();
    assert_eq!(changed.len(), 1);
    assert_eq!(changed[0]["active"]["decision"], "require_human");
    assert_eq!(changed[0]["candidate"]["rule_ids"], json!(["no-deletes"]));
}

#[tokio::test]
async fn snapshots_publish_and_rollback() {
    let api = Api::start(Config::default()).await;
    let reader = api.key("acme", "agent", &["submitter"]).await;
    let v1 = api.get("/api/v1/policy/snapshots", &reader).await;
    let v1_hash = v1.body["active"]["hash"].as_str().unwrap().to_owned();
    assert_eq!(v1.body["active"]["version"], 1);
    let published = api.publish("version: v1\nrules: []\n").await;
    assert_eq!((published.status, published.body["version"].as_u64()), (StatusCode::CREATED, Some(2)));
    let rolled = api.post("/api/v1/policy/rollback", ADMIN, json!({"version": 1})).await;
    assert_eq!(rolled.status, StatusCode::CREATED, "{}", rolled.body);
    assert_eq!(
        (rolled.body["version"].as_u64(), rolled.body["hash"].as_str()),
        (Some(3), Some(v1_hash.as_str()))
    );
    assert_eq!(rolled.body["note"], "rollback to version 1");
    let history = api.get("/api/v1/policy/snapshots", &reader).await;
    assert_eq!(history.body["snapshots"].as_array().unwrap().len(), 3);
    assert_eq!(history.body["active"]["version"], 3);
    let missing = api.post("/api/v1/policy/rollback", ADMIN, json!({"version": 9})).await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    let denied = api.submit(&reader, public_ingress()).await;
    assert_eq!(denied.status, StatusCode::FORBIDDEN, "the rolled-back policy is enforced again");
}

#[tokio::test]
async fn required_idempotency_keys_per_topic() {
    let config = Config {
        require_idempotency_key: vec![airlock_policy::glob::Glob::new("infra.resource.*").unwrap()],
        ..Config::default()
    };
    let api = Api::start(config).await;
    let agent = api.key("acme", "agent", &["submitter"]).await;
    let missing = api.submit(&agent, delete_prod()).await;
    assert_eq!(missing.status, StatusCode::BAD_REQUEST);
    assert_eq!(missing.body["fields"][0]["field"], "idempotency_key");
    let other = api.submit(&agent, json!({"topic": "infra.vm.create", "env": "dev"})).await;
    assert_eq!(other.status, StatusCode::ACCEPTED);
    let metrics = api.call(Method::GET, "/metrics", None, Body::empty()).await;
    assert!(
        metrics
            .body
            .as_str()
            .unwrap()
            .contains("airlock_submissions_without_idempotency_key_total{topic=\"infra.vm.create\"} 1")
    );
}

fn tamper(dir: &Path, sql: &str) {
    let conn = rusqlite::Connection::open(dir.join("airlock.db")).unwrap();
    conn.execute_batch(sql).unwrap();
}

#[tokio::test]
async fn audit_verify_detects_tampering() {
    let api = Api::start(Config::default()).await;
    let agent = api.key("acme", "agent", &["submitter", "operator"]).await;
    for _ in 0..3 {
        api.submit(&agent, json!({"topic": "infra.vm.create", "env": "dev"})).await;
    }
    assert!(api.audit_ok(&agent).await);
    tamper(&api.dir, "UPDATE audit SET data = '{\"outcome\":\"edited\"}' WHERE tenant = 'acme' AND seq = 2;");
    let verify = api.call(Method::POST, "/api/v1/audit/verify", Some(&agent), Body::empty()).await;
    assert_eq!(verify.body["ok"], false);
    assert_eq!(verify.body["tenants"][0]["seq"], 2);
    let all = api.call(Method::POST, "/api/v1/audit/verify", Some(ADMIN), Body::empty()).await;
    assert_eq!(all.body["ok"], false, "the platform admin's verify covers every tenant");
}

#[tokio::test]
async fn metrics_and_health() {
    let api = Api::start(Config::default()).await;
    let agent = api.key("acme", "agent", &["submitter"]).await;
    api.submit(&agent, public_ingress()).await;
    assert_eq!(api.call(Method::GET, "/healthz", None, Body::empty()).await.status, StatusCode::OK);
    assert_eq!(api.call(Method::GET, "/readyz", None, Body::empty()).await.body["status"], "ready");
    let text = api.call(Method::GET, "/metrics", None, Body::empty()).await.body;
    let text = text.as_str().unwrap();
    for name in [
        "airlock_gate_decisions_total{gate=\"a\",decision=\"deny\",topic=\"infra.security_group.update\"} 1",
        "airlock_jobs{state=\"queued\"} 0",
        "airlock_approvals_pending 0",
        "airlock_policy_eval_seconds_count{gate=\"a\"} 1",
        "airlock_http_requests_total{method=\"POST\",route=\"/api/v1/jobs\",status=\"403\"} 1",
        "# TYPE airlock_idempotent_replays_total counter",
        "# TYPE airlock_approval_wait_seconds histogram",
        "# TYPE airlock_approvals_stale_total counter",
    ] {
        assert!(text.contains(name), "missing `{name}` in\n{text}");
    }
}

#[tokio::test]
async fn what_the_console_reads_overview_summary_binding_and_snapshots() {
    let api = Api::start(Config::default()).await;
    let agent = api.key("acme", "agent", &["submitter"]).await;
    let alice = api.key("acme", "alice", &["approver"]).await;
    let olga = api.key("acme", "olga", &["operator"]).await;
    let submitted = api.submit(&agent, delete_prod()).await;
    assert_eq!(submitted.status, StatusCode::ACCEPTED, "{}", submitted.body);
    let approval_id = submitted.body["approval"]["id"].as_str().unwrap().to_owned();

    let o = api.get("/api/v1/overview", &alice).await;
    assert_eq!(o.status, StatusCode::OK, "{}", o.body);
    assert_eq!((o.body["principal"].clone(), o.body["roles"].clone()), (json!("alice"), json!(["approver"])));
    assert_eq!(o.body["approvals"]["pending"], json!(1));
    assert_eq!(o.body["jobs"]["awaiting_approval"], json!(1));
    assert_eq!(o.body["jobs"]["succeeded"], json!(0), "every state is present");
    assert_eq!((o.body["dlq_depth"].clone(), o.body["breaker"].clone()), (json!(0), json!("closed")));
    assert_eq!(o.body["fail_open_last_hour"], json!({"gate_a": 0, "gate_b": 0}));

    let s = api.get("/api/v1/approvals/summary", &alice).await;
    assert_eq!((s.body["pending"].clone(), s.body["newest_id"].clone()), (json!(1), json!(approval_id)));
    assert_eq!(api.get("/api/v1/approvals/summary", &agent).await.status, StatusCode::FORBIDDEN);

    let list = api.get("/api/v1/jobs?state=awaiting_approval", &alice).await;
    assert_eq!(list.body["jobs"][0]["approval_id"], json!(approval_id));
    assert_eq!(list.body["jobs"][0]["rule_ids"], json!(["require-approval-prod-delete"]));

    let before = api.get(&format!("/api/v1/approvals/{approval_id}"), &alice).await;
    assert_eq!(
        (before.body["binding_current"].clone(), before.body["stale_reason"].clone()),
        (json!(true), Value::Null)
    );
    assert_eq!(before.body["explanation"]["decision"], json!("require_human"));
    assert!(before.body["explanation"]["rules"].as_array().unwrap().len() >= 3);
    let candidate =
        format!("{SEED}  - id: deny-nothing\n    when: {{ topic: none.such }}\n    decision: deny\n");
    assert_eq!(
        api.call(Method::POST, "/api/v1/policy/publish", Some(ADMIN), candidate).await.status,
        StatusCode::CREATED
    );
    let after = api.get(&format!("/api/v1/approvals/{approval_id}"), &alice).await;
    assert_eq!(
        after.body["binding_current"],
        json!(false),
        "a publish makes the binding stale before anyone approves"
    );
    assert!(
        after.body["stale_reason"].as_str().unwrap().contains("snapshot"),
        "{}",
        after.body["stale_reason"]
    );

    let v1 = api.get("/api/v1/policy/snapshots/1", &olga).await;
    assert_eq!((v1.body["version"].clone(), v1.body["source"].clone()), (json!(1), json!(SEED)));
    let hidden = api.get("/api/v1/policy/snapshots/1", &alice).await;
    assert!(hidden.body.get("source").is_none(), "the source is for operators: {}", hidden.body);
    assert_eq!(api.get("/api/v1/policy/snapshots/9", &olga).await.status, StatusCode::NOT_FOUND);
    assert_eq!(api.get("/api/v1/policy/snapshots/x", &olga).await.status, StatusCode::NOT_FOUND);

    let bad =
        api.post(&format!("/api/v1/approvals/{approval_id}/reject"), &alice, json!({"comment": 5})).await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST, "{}", bad.body);
    let unknown =
        api.post(&format!("/api/v1/approvals/{approval_id}/reject"), &alice, json!({"why": "x"})).await;
    assert_eq!(unknown.status, StatusCode::BAD_REQUEST, "{}", unknown.body);
    let long = api
        .post(
            &format!("/api/v1/approvals/{approval_id}/reject"),
            &alice,
            json!({"comment": "x".repeat(4_001)}),
        )
        .await;
    assert_eq!(long.status, StatusCode::BAD_REQUEST, "{}", long.body);
    let rejected = api
        .post(&format!("/api/v1/approvals/{approval_id}/reject"), &alice, json!({"comment": "not now"}))
        .await;
    assert_eq!(rejected.status, StatusCode::OK, "{}", rejected.body);
    let audit = api.get("/api/v1/audit?limit=100", &olga).await;
    let kept =
        audit.body["records"].as_array().unwrap().iter().any(|r| r["data"]["comment"] == json!("not now"));
    assert!(kept, "the comment is in the audit record");

    // The job's own records, its approval requests' among them, in chain order.
    let job_id = submitted.body["job_id"].as_str().unwrap();
    let mine = api.get(&format!("/api/v1/audit?job={job_id}&limit=100"), &olga).await;
    assert_eq!(mine.status, StatusCode::OK, "{}", mine.body);
    let kinds: Vec<&str> =
        mine.body["records"].as_array().unwrap().iter().map(|r| r["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["job.submitted", "job.transition", "approval.rejected"], "{kinds:?}");
    let both = api.get(&format!("/api/v1/audit?job={job_id}&after=1"), &olga).await;
    assert_eq!(both.status, StatusCode::BAD_REQUEST, "{}", both.body);
    assert_eq!(api.get("/api/v1/audit?job=nope", &olga).await.status, StatusCode::BAD_REQUEST);
    assert_eq!(api.get(&format!("/api/v1/audit?job={job_id}"), &alice).await.status, StatusCode::FORBIDDEN);
}
