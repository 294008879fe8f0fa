//! Gate B and the worker protocol in process: dispatch-time decisions under the snapshot
//! active at claim time, fenced leases, lease expiry, execution and scheduling caps ending in
//! the DLQ, fail modes, the breaker, Gate B's own throttle budgets, and cancellation.

#![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic, reason = "a test fails by panicking")]

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use airlock_core::breaker::BreakerConfig;
use airlock_core::dispatch::Caps;
use airlock_server::state::{AppState, Config, FailMode, FailModes, Fault};
use airlock_store::{SqliteStore, Store};
use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use serde_json::{Value, json};
use tower::ServiceExt as _;

const ADMIN: &str = "test-admin-key-0123456789";
const SEED: &str = include_str!("../../../examples/policies/seed.yaml");

static DIRS: AtomicUsize = AtomicUsize::new(0);

fn temp_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "airlock-gate-b-{}-{}",
        std::process::id(),
        DIRS.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

struct Api {
    app: Router,
    state: AppState,
    submitter: String,
    worker: String,
    approver: String,
}

impl Api {
    async fn start(config: Config) -> Self {
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&temp_dir()).unwrap());
        let active = airlock_server::load_policy(&*store, ("seed", SEED)).await.unwrap();
        airlock_server::bootstrap_admin(&*store, Some(ADMIN.into())).await.unwrap();
        let state = airlock_server::app_state(store, active, config);
        let mut api = Self {
            app: airlock_server::router(state.clone()),
            state,
            submitter: String::new(),
            worker: String::new(),
            approver: String::new(),
        };
        api.submitter = api.key("agent", &["submitter", "operator"]).await;
        api.worker = api.key("w1", &["worker"]).await;
        api.approver = api.key("alice", &["approver"]).await;
        api
    }

    async fn call(&self, method: Method, uri: &str, key: &str, body: Option<Value>) -> (StatusCode, Value) {
        let request = Request::builder()
            .method(method)
            .uri(uri)
            .header("authorization", format!("Bearer {key}"))
            .header("content-type", "application/json")
            .body(body.map_or(Body::empty(), |b| Body::from(b.to_string())))
            .unwrap();
        let response = self.app.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into())),
        )
    }

    async fn key(&self, name: &str, roles: &[&str]) -> String {
        let (status, body) = self
            .call(
                Method::POST,
                "/api/v1/keys",
                ADMIN,
                Some(json!({"tenant": "acme", "name": name, "roles": roles})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED);
        body["key"].as_str().unwrap().to_owned()
    }

    async fn submit(&self, job: Value) -> String {
        let (status, body) = self.call(Method::POST, "/api/v1/jobs", &self.submitter, Some(job)).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        body["job_id"].as_str().unwrap().to_owned()
    }

    async fn claim(&self) -> Option<Value> {
        let (status, body) =
            self.call(Method::POST, "/api/v1/workers/claim", &self.worker, Some(json!({"wait_ms": 0}))).await;
        match status {
            StatusCode::OK => Some(body),
            StatusCode::NO_CONTENT => None,
            other => panic!("claim answered {other}: {body}"),
        }
    }

    async fn worker_call(&self, job: &str, action: &str, body: Value) -> (StatusCode, Value) {
        self.call(Method::POST, &format!("/api/v1/workers/jobs/{job}/{action}"), &self.worker, Some(body))
            .await
    }

    async fn job(&self, id: &str) -> Value {
        self.call(Method::GET, &format!("/api/v1/jobs/{id}"), &self.submitter, None).await.1
    }

    async fn publish(&self, policy: &str) {
        let request = Request::builder()
            .method(Method::POST)
            .uri("/api/v1/policy/publish")
            .header("authorization", format!("Bearer {ADMIN}"))
            .body(Body::from(policy.to_owned()))
            .unwrap();
        assert_eq!(self.app.clone().oneshot(request).await.unwrap().status(), StatusCode::CREATED);
    }

    async fn metrics(&self) -> String {
        let (_, body) = self.call(Method::GET, "/metrics", "none", None).await;
        body.as_str().unwrap().to_owned()
    }
}

fn vm() -> Value {
    json!({"topic": "infra.vm.create", "env": "dev", "payload": {"size": "m5.large"}, "idempotency_key": "vm-1"})
}

#[tokio::test]
async fn a_claimed_job_completes_once_under_its_lease() {
    let api = Api::start(Config::default()).await;
    let id = api.submit(vm()).await;
    let claim = api.claim().await.unwrap();
    assert_eq!((claim["job_id"].as_str(), claim["attempt"].as_u64()), (Some(id.as_str()), Some(1)));
    assert_eq!(claim["idempotency_key"], "vm-1");
    assert_eq!(claim["gate_b"]["decision"], "allow");
    assert!(api.claim().await.is_none(), "never two live leases for one job");
    let token = claim["lease_token"].as_str().unwrap();
    let (status, beat) = api.worker_call(&id, "heartbeat", json!({"lease_token": token})).await;
    assert_eq!((status, beat["cancel"].as_bool()), (StatusCode::OK, Some(false)));
    let (status, done) =
        api.worker_call(&id, "complete", json!({"lease_token": token, "result": {"id": "i-123"}})).await;
    assert_eq!((status, done["state"].as_str()), (StatusCode::OK, Some("succeeded")));
    let (status, again) = api.worker_call(&id, "complete", json!({"lease_token": token, "result": {}})).await;
    assert_eq!(
        (status, again["error"].as_str()),
        (StatusCode::CONFLICT, Some("lease_lost")),
        "at most one completion"
    );
    let (status, _) = api.worker_call(&id, "complete", json!({"lease_token": "forged", "result": {}})).await;
    assert_eq!(status, StatusCode::CONFLICT);
    let job = api.job(&id).await;
    let states: Vec<&str> =
        job["history"].as_array().unwrap().iter().map(|h| h["to"].as_str().unwrap()).collect();
    assert_eq!(states, ["queued", "leased", "succeeded"]);
    let (status, body) =
        api.call(Method::POST, "/api/v1/workers/claim", &api.submitter, Some(json!({}))).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let (status, body) =
        api.call(Method::POST, "/api/v1/workers/claim", &api.worker, Some(json!({"pool": "gpu"}))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
}

#[tokio::test]
async fn a_policy_turning_to_deny_between_submit_and_claim_is_caught_by_gate_b() {
    let api = Api::start(Config::default()).await;
    let id = api.submit(vm()).await;
    api.publish(&format!(
        "{SEED}  - id: no-vms\n    when: {{ topic: infra.vm.create }}\n    decision: deny\n"
    ))
    .await;
    assert!(api.claim().await.is_none(), "the worker is never handed a job the active policy denies");
    let job = api.job(&id).await;
    assert_eq!(job["state"], "denied");
    let metrics = api.metrics().await;
    assert!(
        metrics.contains(
            "airlock_gate_decisions_total{gate=\"b\",decision=\"deny\",topic=\"infra.vm.create\"} 1"
        ),
        "{metrics}"
    );
}

#[tokio::test]
async fn an_approval_goes_stale_when_the_snapshot_changes_before_dispatch() {
    let api = Api::start(Config::default()).await;
    let (_, body) = api
        .call(
            Method::POST,
            "/api/v1/jobs",
            &api.submitter,
            Some(json!({"topic": "infra.resource.delete", "env": "production"})),
        )
        .await;
    let (id, approval) =
        (body["job_id"].as_str().unwrap().to_owned(), body["approval"]["id"].as_str().unwrap().to_owned());
    let (status, _) =
        api.call(Method::POST, &format!("/api/v1/approvals/{approval}/approve"), &api.approver, None).await;
    assert_eq!(status, StatusCode::OK);
    api.publish(&SEED.replace("reason: public ingress", "reason: v2 public ingress")).await;
    assert!(api.claim().await.is_none());
    let job = api.job(&id).await;
    assert_eq!(job["state"], "awaiting_approval", "{job}");
    let fresh = job["approval"]["id"].as_str().unwrap().to_owned();
    assert_ne!(fresh, approval);
    let (_, old) = api.call(Method::GET, &format!("/api/v1/approvals/{approval}"), &api.approver, None).await;
    assert_eq!(old["status"], "stale");
    let (status, _) =
        api.call(Method::POST, &format!("/api/v1/approvals/{fresh}/approve"), &api.approver, None).await;
    assert_eq!(status, StatusCode::OK);
    let claim = api.claim().await.unwrap();
    assert_eq!(claim["job_id"], id.as_str());
    assert_eq!(claim["gate_b"]["decision"], "require_human");
}

#[tokio::test]
async fn a_lapsed_lease_is_retried_and_the_old_worker_is_fenced_out() {
    let api = Api::start(Config { lease_ms: 50, ..Config::default() }).await;
    let id = api.submit(vm()).await;
    let first = api.claim().await.unwrap();
    tokio::time::sleep(Duration::from_millis(80)).await;
    let token = first["lease_token"].as_str().unwrap();
    let (status, body) = api.worker_call(&id, "complete", json!({"lease_token": token, "result": {}})).await;
    assert_eq!(status, StatusCode::CONFLICT, "a lapsed lease is fenced even before the sweep: {body}");
    airlock_server::sweep(&api.state).await;
    assert_eq!(api.job(&id).await["state"], "queued");
    let token = first["lease_token"].as_str().unwrap();
    let (status, _) = api.worker_call(&id, "heartbeat", json!({"lease_token": token})).await;
    assert_eq!(status, StatusCode::CONFLICT, "a lapsed lease cannot be extended");
    let second = api.claim().await.unwrap();
    assert_eq!(second["attempt"], 2);
    let (status, _) = api.worker_call(&id, "complete", json!({"lease_token": token, "result": {}})).await;
    assert_eq!(status, StatusCode::CONFLICT, "the first worker cannot complete after its lease lapsed");
    let token = second["lease_token"].as_str().unwrap();
    let (status, _) = api.worker_call(&id, "complete", json!({"lease_token": token, "result": {}})).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn execution_attempts_end_in_the_dlq_and_operators_retry_or_discard() {
    let api = Api::start(Config::default()).await;
    let id = api.submit(vm()).await;
    for attempt in 1..=3 {
        let claim = api.claim().await.unwrap();
        assert_eq!(claim["attempt"], attempt);
        let token = claim["lease_token"].as_str().unwrap();
        let (status, body) = api
            .worker_call(&id, "fail", json!({"lease_token": token, "error": "api 503", "retryable": true}))
            .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["state"], if attempt < 3 { "queued" } else { "dead_lettered" });
    }
    let (_, dlq) = api.call(Method::GET, "/api/v1/dlq", &api.submitter, None).await;
    let entry = &dlq["dead_letters"][0];
    assert_eq!(entry["job_id"], id.as_str());
    assert!(entry["reason"].as_str().unwrap().contains("execution attempts exhausted (3)"), "{entry}");
    let metrics = api.metrics().await;
    assert!(metrics.contains("airlock_dlq_depth 1"), "{metrics}");
    let (status, retried) =
        api.call(Method::POST, &format!("/api/v1/dlq/{id}/retry"), &api.submitter, None).await;
    assert_eq!((status, retried["state"].as_str()), (StatusCode::OK, Some("queued")));
    let claim = api.claim().await.unwrap();
    assert_eq!(claim["attempt"], 1, "an operator retry resets the attempts and goes through Gate B again");
    let token = claim["lease_token"].as_str().unwrap();
    let (_, failed) = api
        .worker_call(&id, "fail", json!({"lease_token": token, "error": "bad input", "retryable": false}))
        .await;
    assert_eq!(failed["state"], "failed");

    let other = api.submit(json!({"topic": "infra.vm.create", "env": "dev", "payload": {"n": 2}})).await;
    for _ in 0..3 {
        let claim = api.claim().await.unwrap();
        let token = claim["lease_token"].as_str().unwrap();
        api.worker_call(&other, "fail", json!({"lease_token": token, "error": "x", "retryable": true})).await;
    }
    let (status, discarded) =
        api.call(Method::POST, &format!("/api/v1/dlq/{other}/discard"), &api.submitter, None).await;
    assert_eq!(status, StatusCode::OK, "{discarded}");
    let (_, dlq) = api.call(Method::GET, "/api/v1/dlq", &api.submitter, None).await;
    assert_eq!(dlq["dead_letters"], json!([]));
}

#[tokio::test]
async fn fail_closed_requeues_with_backoff_until_the_cap_then_dead_letters() {
    let config = Config {
        caps: Caps { scheduling_attempts_max: 50, backoff_base_ms: 1, backoff_cap_ms: 1, ..Caps::default() },
        ..Config::default()
    };
    let api = Api::start(config).await;
    let id = api.submit(vm()).await;
    api.state.safety().inject(Some(Fault::Unavailable));
    let mut claims = 0;
    loop {
        assert!(api.claim().await.is_none(), "fail closed never leases");
        claims += 1;
        let job = api.job(&id).await;
        if job["state"] == "dead_lettered" {
            break;
        }
        assert!(claims < 200, "never dead-lettered: {job}");
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    assert_eq!(claims, 50, "exactly 50 scheduling attempts");
    let (_, dlq) = api.call(Method::GET, &format!("/api/v1/dlq/{id}"), &api.submitter, None).await;
    assert!(dlq["reason"].as_str().unwrap().contains("scheduling attempts exhausted (50)"), "{dlq}");
    let metrics = api.metrics().await;
    assert!(
        metrics.contains(
            "airlock_dead_lettered_total{topic=\"infra.vm.create\",reason=\"scheduling_attempts\"} 1"
        )
    );
    assert!(
        metrics.contains("airlock_safety_check_failures_total{gate=\"b\",reason=\"circuit_open\"}"),
        "{metrics}"
    );
}

#[tokio::test]
async fn the_breaker_opens_after_three_failures_and_admits_at_most_three_probes() {
    let config = Config {
        breaker: BreakerConfig { failures_to_open: 3, open_ms: 200, probes: 3 },
        caps: Caps { backoff_base_ms: 1, backoff_cap_ms: 1, ..Caps::default() },
        ..Config::default()
    };
    let api = Api::start(config).await;
    for n in 0..6 {
        api.submit(json!({"topic": "infra.vm.create", "env": "dev", "payload": {"n": n}})).await;
    }
    api.state.safety().inject(Some(Fault::Unavailable));
    for _ in 0..3 {
        assert!(api.claim().await.is_none());
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    let metrics = api.metrics().await;
    assert!(metrics.contains("airlock_safety_circuit_state 2"), "open after 3 failures: {metrics}");
    assert!(api.claim().await.is_none());
    let metrics = api.metrics().await;
    let unavailable = "airlock_safety_check_failures_total{gate=\"b\",reason=\"unavailable\"}";
    assert!(
        metrics.contains(&format!("{unavailable} 3")),
        "open: no more calls reach the service: {metrics}"
    );
    tokio::time::sleep(Duration::from_millis(220)).await;
    api.state.safety().inject(None);
    let leased = api.claim().await.unwrap();
    assert!(leased["job_id"].is_string(), "a successful probe leases");
    let metrics = api.metrics().await;
    assert!(metrics.contains("airlock_safety_circuit_state 0"), "a probe success closes it: {metrics}");

    // Half-open admits at most three probes: hold them all with a slow service.
    api.state.safety().inject(Some(Fault::Unavailable));
    for _ in 0..3 {
        api.claim().await;
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    tokio::time::sleep(Duration::from_millis(220)).await;
    let before = api.metrics().await.matches("reason=\"unavailable\"} ").count();
    api.state.safety().inject(Some(Fault::Slow(Duration::from_secs(5))));
    let api = Arc::new(api);
    let mut probes = Vec::new();
    for _ in 0..6 {
        let api = Arc::clone(&api);
        probes.push(tokio::spawn(async move { api.claim().await }));
    }
    for p in probes {
        assert!(p.await.unwrap().is_none());
    }
    let metrics = api.metrics().await;
    let timeouts = metrics
        .lines()
        .find(|l| l.starts_with("airlock_safety_check_failures_total{gate=\"b\",reason=\"timeout\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .map_or(0.0, |v| v.parse::<f64>().unwrap());
    assert!(
        (1.0..=3.0).contains(&timeouts),
        "at most 3 half-open probes reached the service, got {timeouts}: {metrics}"
    );
    assert!(before > 0);
}

#[tokio::test]
async fn fail_open_dispatches_marks_and_counts() {
    let config = Config {
        gate_b_fail: FailModes { default: FailMode::Open, ..FailModes::default() },
        ..Config::default()
    };
    let api = Api::start(config).await;
    let id = api.submit(vm()).await;
    api.state.safety().inject(Some(Fault::Unavailable));
    let claim = api.claim().await.unwrap();
    assert_eq!(claim["gate_b"]["bypassed"], true);
    let job = api.job(&id).await;
    assert_eq!(job["state"], "leased");
    let metrics = api.metrics().await;
    assert!(
        metrics.contains("airlock_scheduler_input_fail_open_total{topic=\"infra.vm.create\"} 1"),
        "{metrics}"
    );
    let (_, audit) = api.call(Method::GET, "/api/v1/audit?limit=500", &api.submitter, None).await;
    let bypass =
        audit["records"].as_array().unwrap().iter().find(|r| r["kind"] == "gate_b.decision").unwrap();
    assert_eq!(bypass["data"]["outcome"], "bypassed");
}

#[tokio::test]
async fn gate_b_keeps_its_own_throttle_budget() {
    let api = Api::start(Config::default()).await;
    let first = api.submit(json!({"topic": "infra.vm.create", "env": "dev", "payload": {"n": 1}})).await;
    let second = api.submit(json!({"topic": "infra.vm.create", "env": "dev", "payload": {"n": 2}})).await;
    api.publish(&format!(
        "{SEED}  - id: throttle-vms\n    when: {{ topic: infra.vm.create }}\n    decision: throttle\n    limit: {{ rate: 1, per: 10m }}\n"
    ))
    .await;
    // Both were submitted in the same millisecond or two; either may be first in the queue.
    let claim = api.claim().await.unwrap();
    let leased = claim["job_id"].as_str().unwrap().to_owned();
    assert!(leased == first || leased == second);
    assert!(api.claim().await.is_none(), "the second dispatch waits for the budget");
    let waiting = if leased == first { &second } else { &first };
    let job = api.job(waiting).await;
    assert_eq!(job["state"], "queued");
    let (_, audit) = api.call(Method::GET, "/api/v1/audit?limit=500", &api.submitter, None).await;
    let throttled =
        audit["records"].as_array().unwrap().iter().find(|r| r["kind"] == "gate_b.throttled").unwrap();
    assert!(throttled["data"]["retry_after_ms"].as_u64().unwrap() > 590_000);
}

#[tokio::test]
async fn cancelling_a_leased_job_reaches_its_worker_on_the_next_heartbeat() {
    let api = Api::start(Config::default()).await;
    let id = api.submit(vm()).await;
    let claim = api.claim().await.unwrap();
    let token = claim["lease_token"].as_str().unwrap();
    let (status, _) =
        api.call(Method::POST, &format!("/api/v1/jobs/{id}/cancel"), &api.submitter, None).await;
    assert_eq!(status, StatusCode::OK);
    let (_, beat) = api.worker_call(&id, "heartbeat", json!({"lease_token": token})).await;
    assert_eq!(beat["cancel"], true);
    let (status, _) = api.worker_call(&id, "complete", json!({"lease_token": token, "result": {}})).await;
    assert_eq!(status, StatusCode::CONFLICT, "a cancelled job cannot complete");
    assert_eq!(api.job(&id).await["state"], "cancelled");
}

#[tokio::test]
async fn bad_worker_calls_change_nothing() {
    let api = Api::start(Config::default()).await;
    let id = api.submit(vm()).await;
    let claim = api.claim().await.unwrap();
    let token = claim["lease_token"].as_str().unwrap();
    let (status, _) = api.worker_call(&id, "complete", json!({"result": {}})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "no lease token");
    let big = "x".repeat(300 * 1024);
    let (status, _) = api.worker_call(&id, "complete", json!({"lease_token": token, "result": big})).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    let (status, _) = api.worker_call(&id, "complete", json!({"lease_token": token, "colour": 1})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = api.worker_call(&id, "fail", json!({"lease_token": token, "retryable": "true"})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "a mistyped flag is refused, not read as false");
    let (status, _) = api.worker_call("job_notanid", "complete", json!({"lease_token": token})).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(api.job(&id).await["state"], "leased", "nothing changed");
    let (status, _) =
        api.worker_call(&id, "complete", json!({"lease_token": token, "result": {"ok": true}})).await;
    assert_eq!(status, StatusCode::OK);
}

const DENY_VMS: &str = "  - id: deny-vms\n    when: { topic: infra.vm.create }\n    decision: deny\n";

/// Defect 2 of issue 10, SPEC 6 (linearizable policy): a claim whose Gate B check was asked
/// under version 1 and answers after a deny publish (version 2) was acknowledged is decided
/// again under version 2 at its commit, never leased under version 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_answered_while_gate_b_decides_is_never_leased_under_the_older_snapshot() {
    let api = Arc::new(Api::start(Config::default()).await);
    let id = api.submit(vm()).await;
    api.state.safety().inject(Some(Fault::Slow(Duration::from_millis(500))));
    let claiming = {
        let api = Arc::clone(&api);
        tokio::spawn(async move { api.claim().await })
    };
    // The claim is now deciding under version 1; the publish is answered well before it ends.
    tokio::time::sleep(Duration::from_millis(100)).await;
    api.publish(&format!("{SEED}{DENY_VMS}")).await;
    api.state.safety().inject(None);
    assert_eq!(claiming.await.unwrap(), None, "leased under the superseded snapshot");
    let job = api.job(&id).await;
    assert_eq!(job["state"], "denied", "{job}");
    let gate_b = &job["decisions"]["gate_b"];
    assert_eq!((gate_b["snapshot_version"].as_u64(), gate_b["decision"].as_str()), (Some(2), Some("deny")));
}

/// The same at Gate A: a submit decided under version 1 whose commit comes after a deny
/// publish was acknowledged is decided again, and refused under version 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_answered_while_gate_a_decides_is_never_accepted_under_the_older_snapshot() {
    let api = Arc::new(Api::start(Config::default()).await);
    api.state.safety().inject(Some(Fault::Slow(Duration::from_millis(500))));
    let submitting = {
        let api = Arc::clone(&api);
        tokio::spawn(async move { api.call(Method::POST, "/api/v1/jobs", &api.submitter, Some(vm())).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    api.publish(&format!("{SEED}{DENY_VMS}")).await;
    api.state.safety().inject(None);
    let (status, body) = submitting.await.unwrap();
    assert_eq!((status, body["rule_ids"][0].as_str()), (StatusCode::FORBIDDEN, Some("deny-vms")), "{body}");
    let (_, jobs) = api.call(Method::GET, "/api/v1/jobs", &api.submitter, None).await;
    assert_eq!(jobs["jobs"].as_array().map(Vec::len), Some(0), "nothing accepted: {jobs}");
}

/// Defect 1 of issue 10: activation compares versions, so a publish answered out of order or
/// racing the refresh sweep never puts an older snapshot back.
#[tokio::test]
async fn activation_never_moves_back_to_an_older_version() {
    let api = Api::start(Config::default()).await;
    api.publish(&format!("{SEED}{DENY_VMS}")).await;
    let (older, _) = airlock_policy::compile(SEED).unwrap();
    let activated =
        api.state.safety().activate(airlock_server::state::ActivePolicy { version: 1, policy: older });
    assert!(!activated, "version 1 activated over version 2");
    assert_eq!(api.state.safety().active().version, 2);
    let (status, body) = api.call(Method::POST, "/api/v1/jobs", &api.submitter, Some(vm())).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "decided under version 2: {body}");
}

/// Defect 3 of issue 10, SPEC 6: Gate B's throttle charges every dispatch that would run the
/// job, retries included, so a throttle published against a retry storm slows the retries.
#[tokio::test]
async fn gate_b_charges_retried_dispatches_too() {
    let api = Api::start(Config::default()).await;
    let id = api.submit(vm()).await;
    api.publish(&format!(
        "{SEED}  - id: throttle-vms\n    when: {{ topic: infra.vm.create }}\n    decision: throttle\n    limit: {{ rate: 1, per: 10m }}\n"
    ))
    .await;
    let claim = api.claim().await.unwrap();
    let token = claim["lease_token"].as_str().unwrap();
    let (status, failed) = api
        .worker_call(&id, "fail", json!({"lease_token": token, "error": "flaky", "retryable": true}))
        .await;
    assert_eq!((status, failed["state"].as_str()), (StatusCode::OK, Some("queued")));
    assert!(api.claim().await.is_none(), "the retry is charged: the budget is spent for 10 minutes");
    assert_eq!(api.job(&id).await["state"], "queued");
    let (_, audit) = api.call(Method::GET, "/api/v1/audit?limit=500", &api.submitter, None).await;
    let throttled =
        audit["records"].as_array().unwrap().iter().find(|r| r["kind"] == "gate_b.throttled").unwrap();
    assert_eq!(throttled["data"]["outcome"], "throttled", "{throttled}");
}

/// Defect 5 of issue 10, SPEC 7: quorum and self-approval compare principals, so one person's
/// two keys count once, and a submitter's second key cannot approve their own job.
#[tokio::test]
async fn a_quorum_counts_people_not_keys() {
    let api = Api::start(Config::default()).await;
    api.publish(&format!(
        "{SEED}  - id: two-people-drop-dbs\n    when: {{ topic: infra.db.drop }}\n    decision: require_human\n    approvals: 2\n"
    ))
    .await;
    let api = &api;
    let key = |name: &'static str, principal: &'static str| {
        let body = json!({"tenant": "acme", "name": name, "principal": principal, "roles": ["approver"]});
        async move {
            let (status, created) = api.call(Method::POST, "/api/v1/keys", ADMIN, Some(body)).await;
            assert_eq!(status, StatusCode::CREATED, "{created}");
            created["key"].as_str().unwrap().to_owned()
        }
    };
    let (laptop, phone) = (key("alice-laptop", "alice").await, key("alice-phone", "alice").await);
    let (own, bob) = (key("agent-2", "agent").await, key("bob", "bob").await);
    let (status, submitted) = api
        .call(
            Method::POST,
            "/api/v1/jobs",
            &api.submitter,
            Some(json!({"topic": "infra.db.drop", "env": "dev"})),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{submitted}");
    let approve = |key: String| {
        let uri = format!("/api/v1/approvals/{}/approve", submitted["approval"]["id"].as_str().unwrap());
        async move { api.call(Method::POST, &uri, &key, Some(json!({}))).await }
    };
    let (status, body) = approve(own).await;
    assert_eq!((status, body["error"].as_str()), (StatusCode::FORBIDDEN, Some("self_approval")), "{body}");
    let (status, body) = approve(laptop).await;
    assert_eq!((status, body["approval"]["status"].as_str()), (StatusCode::OK, Some("pending")), "{body}");
    let (status, body) = approve(phone).await;
    assert_eq!((status, body["error"].as_str()), (StatusCode::CONFLICT, Some("approval_refused")), "{body}");
    let (status, body) = approve(bob).await;
    assert_eq!((status, body["approval"]["status"].as_str()), (StatusCode::OK, Some("approved")), "{body}");
    assert_eq!(body["approval"]["approvers"], json!(["alice", "bob"]), "{body}");
}

/// Defect 6 of issue 10: Gate A's evaluation timeout interrupts evaluation itself. Hundreds of
/// regexes that scan a large payload take far longer than the timeout (over a second in a
/// debug build); the submit is answered 503 (fail closed) at about the timeout, not when
/// evaluation would have ended. What a large request costs without the heavy rules (reading,
/// hashing and storing it) is measured first, in the same test, so that a loaded machine slows
/// both sides of the comparison alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gate_a_answers_unavailable_at_its_timeout_however_heavy_the_policy() {
    let timeout = Duration::from_millis(150);
    let api = Api::start(Config { gate_a_timeout: timeout, ..Config::default() }).await;
    let job = json!({"topic": "infra.vm.create", "env": "dev", "payload": {"text": "a".repeat(900_000)}});
    let started = std::time::Instant::now();
    let (status, body) = api.call(Method::POST, "/api/v1/jobs", &api.submitter, Some(job.clone())).await;
    let request_cost = started.elapsed();
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let mut policy = SEED.to_owned();
    for i in 0..400 {
        policy.push_str(&format!(
            "  - id: heavy-{i}\n    when: {{ payload: {{ text: {{ regex: \"[0-9][a-z]{{8}}[0-9]{i}\" }} }} }}\n    decision: deny\n"
        ));
    }
    api.publish(&policy).await;
    let started = std::time::Instant::now();
    let (status, body) = api.call(Method::POST, "/api/v1/jobs", &api.submitter, Some(job)).await;
    let elapsed = started.elapsed();
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("safety_unavailable")),
        "{body}"
    );
    assert!(
        elapsed < request_cost + timeout * 3,
        "answered after {elapsed:?}; the timeout is {timeout:?} and the request alone took {request_cost:?}"
    );
}

/// Defect 4 of issue 10, SPEC 6: a topic no pool takes is a scheduling failure like any other
/// (reason `no_worker`): counted, with backoff, then the DLQ; and a claim that names no pool
/// when pools are configured is told which exist.
#[tokio::test]
async fn a_topic_no_pool_takes_uses_its_scheduling_attempts_then_the_dlq() {
    let config = Config {
        pools: vec![("vms".into(), vec![airlock_policy::glob::Glob::new("infra.vm.*").unwrap()])],
        caps: Caps { scheduling_attempts_max: 5, backoff_base_ms: 1, backoff_cap_ms: 1, ..Caps::default() },
        ..Config::default()
    };
    let api = Api::start(config).await;
    let (status, body) = api.call(Method::POST, "/api/v1/workers/claim", &api.worker, Some(json!({}))).await;
    assert_eq!(
        (status, body["fields"][0]["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("pool")),
        "{body}"
    );
    assert!(body["message"].as_str().unwrap().contains("vms"), "{body}");
    let routed = api.submit(vm()).await;
    let id = api.submit(json!({"topic": "infra.db.backup", "env": "dev"})).await;
    let mut sweeps = 0;
    while api.job(&id).await["state"] != "dead_lettered" {
        sweeps += 1;
        assert!(sweeps < 200, "never dead-lettered: {}", api.job(&id).await);
        airlock_server::sweep(&api.state).await;
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    let job = api.job(&id).await;
    assert_eq!(job["attempts"]["scheduling"], 5, "{job}");
    assert!(job["dead_letter_reason"].as_str().unwrap().ends_with("no_worker"), "{job}");
    assert_eq!(api.job(&routed).await["state"], "queued", "a job a pool takes waits for its worker");
    let metrics = api.metrics().await;
    assert!(
        metrics.contains("airlock_dead_lettered_total{topic=\"infra.db.backup\",reason=\"no_worker\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_claim_naming_a_job_runs_gate_b_on_that_job_only() {
    let config = Config {
        pools: vec![
            ("infra".into(), vec![airlock_policy::glob::Glob::new("infra.**").unwrap()]),
            ("mcp".into(), vec![airlock_policy::glob::Glob::new("mcp.**").unwrap()]),
        ],
        ..Config::default()
    };
    let api = Api::start(config).await;
    let older = api.submit(vm()).await;
    let mut newer_job = vm();
    newer_job["idempotency_key"] = json!("vm-2");
    let newer = api.submit(newer_job).await;
    let claim = |pool: &str, id: &str| json!({"pool": pool, "job_id": id, "wait_ms": 1000});
    let (status, leased) =
        api.call(Method::POST, "/api/v1/workers/claim", &api.worker, Some(claim("infra", &newer))).await;
    assert_eq!((status, leased["job_id"].as_str()), (StatusCode::OK, Some(newer.as_str())), "{leased}");
    assert_eq!(api.job(&older).await["state"], "queued", "the older job is not touched");

    let started = std::time::Instant::now();
    let (status, _) =
        api.call(Method::POST, "/api/v1/workers/claim", &api.worker, Some(claim("infra", &newer))).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "leased already");
    let human = json!({"topic": "infra.resource.delete", "env": "production", "payload": {"id": "r1"}});
    let waiting = api.submit(human).await;
    let (status, _) =
        api.call(Method::POST, "/api/v1/workers/claim", &api.worker, Some(claim("infra", &waiting))).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "awaiting approval");
    assert!(started.elapsed() < Duration::from_millis(900), "a job that is not queued is answered at once");

    let (status, body) =
        api.call(Method::POST, "/api/v1/workers/claim", &api.worker, Some(claim("mcp", &older))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body["fields"][0]["message"].as_str().unwrap().contains("does not take"), "{body}");
    let (status, _) = api
        .call(
            Method::POST,
            "/api/v1/workers/claim",
            &api.worker,
            Some(claim("infra", "job_01J0000000000000000000000")),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = api
        .call(Method::POST, "/api/v1/workers/claim", &api.worker, Some(json!({"pool": "infra", "job_id": 5})))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}
