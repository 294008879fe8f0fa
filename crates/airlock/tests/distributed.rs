//! Distributed mode through the real binary: two `airlock serve --store postgres://…`
//! replicas on one PostgreSQL schema behave as one service. A job submitted to one is claimed
//! and completed through the other, a publish on one reaches the other, and the audit chain
//! they share verifies. PostgreSQL must be reachable (127.0.0.1:5432, or
//! `AIRLOCK_TEST_POSTGRES_URL`): this test fails, never skips, without it.

#![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic, reason = "a test fails by panicking")]

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::{Process as Replica, Schema, call_text as call, metric};

const ADMIN: &str = "distributed-e2e-admin-key-0123456789";

fn replica(url: &str) -> (Replica, String) {
    replica_with(url, &[])
}

fn replica_with(url: &str, extra: &[&str]) -> (Replica, String) {
    let mut args = vec!["serve", "--listen", "127.0.0.1:0", "--store", url];
    args.extend(extra);
    support::airlock(
        &args,
        &[("AIRLOCK_ADMIN_KEY", ADMIN), ("AIRLOCK_SAFETY_TOKEN", "distributed-e2e-safety-token")],
    )
}

fn key(addr: &str, name: &str, roles: &[&str]) -> String {
    support::key(addr, ADMIN, "acme", name, roles)
}

#[test]
fn two_replicas_on_postgres_act_as_one_service() {
    let schema = Schema::create("replicas");
    let url = schema.url();
    let (_a, a) = replica(&url);
    let (_b, b) = replica(&url);
    let agent = key(&a, "agent", &["submitter", "operator"]);
    let worker = key(&b, "w1", &["worker"]);

    let job = json!({"topic": "infra.vm.create", "env": "dev", "idempotency_key": "vm-1"}).to_string();
    let (status, submitted) = call(&a, "/api/v1/jobs", &agent, Some(job.clone()));
    assert_eq!(status, 202, "{submitted}");
    let (status, replay) = call(&b, "/api/v1/jobs", &agent, Some(job));
    assert_eq!((status, &replay["job_id"]), (202, &submitted["job_id"]), "the idempotency key is shared");

    let (status, claim) =
        call(&b, "/api/v1/workers/claim", &worker, Some(json!({"wait_ms": 2000}).to_string()));
    assert_eq!(status, 200, "{claim}");
    assert_eq!(claim["job_id"], submitted["job_id"]);
    let (status, again) = call(&a, "/api/v1/workers/claim", &worker, Some("{}".into()));
    assert_eq!(status, 204, "never two leases for one job: {again}");
    let id = claim["job_id"].as_str().unwrap();
    let body = json!({"lease_token": claim["lease_token"], "result": {"ok": true}}).to_string();
    assert_eq!(call(&b, &format!("/api/v1/workers/jobs/{id}/complete"), &worker, Some(body)).0, 200);
    assert_eq!(call(&a, &format!("/api/v1/jobs/{id}"), &agent, None).1["state"], "succeeded");

    // A claim waiting on one replica wakes up when the other commits a job (LISTEN/NOTIFY),
    // not at its next 200 ms poll: polling alone would put the median wait near 100 ms.
    let mut waits = Vec::new();
    for n in 0..5 {
        let waiting = {
            let (b, worker) = (b.clone(), worker.clone());
            std::thread::spawn(move || {
                call(&b, "/api/v1/workers/claim", &worker, Some(json!({"wait_ms": 5000}).to_string()))
            })
        };
        std::thread::sleep(Duration::from_millis(150));
        let submitted_at = Instant::now();
        let body = json!({"topic": "infra.vm.create", "env": "dev", "payload": {"wake": n}}).to_string();
        assert_eq!(call(&a, "/api/v1/jobs", &agent, Some(body)).0, 202);
        assert_eq!(waiting.join().unwrap().0, 200);
        waits.push(submitted_at.elapsed());
    }
    waits.sort();
    assert!(waits[2] < Duration::from_millis(60), "claims woke {waits:?} after the submits");

    let deny_vms = format!(
        "{}  - id: no-vms\n    when: {{ topic: infra.vm.create }}\n    decision: deny\n",
        include_str!("../../../examples/policies/seed.yaml")
    );
    let (status, published) = call(&a, "/api/v1/policy/publish", ADMIN, Some(deny_vms));
    assert_eq!(status, 201, "{published}");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, _) = call(
            &b,
            "/api/v1/jobs",
            &agent,
            Some(json!({"topic": "infra.vm.create", "env": "dev"}).to_string()),
        );
        if status == 403 {
            break;
        }
        assert!(Instant::now() < deadline, "the publish never reached the other replica");
        std::thread::sleep(Duration::from_millis(200));
    }

    // Each replica trusts a key it authenticated for a second without asking the store; a key
    // revoked on one replica is refused by the other at once, because the revocation's NOTIFY
    // empties the other's cache.
    let (_, keys) = call(&a, "/api/v1/keys", ADMIN, None);
    let agent_id = keys["keys"].as_array().unwrap().iter().find(|k| k["name"] == "agent").unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(call(&b, "/api/v1/jobs", &agent, None).0, 200, "the agent's key is now cached on b");
    let revoked = ureq::delete(format!("http://{a}/api/v1/keys/{agent_id}"))
        .header("authorization", format!("Bearer {ADMIN}"))
        .call()
        .unwrap();
    assert_eq!(revoked.status(), 200);
    let revoked_at = Instant::now();
    while call(&b, "/api/v1/jobs", &agent, None).0 != 401 {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        revoked_at.elapsed() < Duration::from_millis(500),
        "the revocation took {:?} to reach the other replica",
        revoked_at.elapsed()
    );

    let (_, verify) = call(&b, "/api/v1/audit/verify", ADMIN, Some(String::new()));
    assert_eq!(verify["ok"], true, "{verify}");
}

#[test]
fn two_schedulers_share_one_breaker() {
    let schema = Schema::create("breaker");
    let url = schema.url();
    let config = std::env::temp_dir().join(format!("airlock-shared-breaker-{}.yaml", std::process::id()));
    std::fs::write(&config, "breaker: { failures_to_open: 3, open_ms: 2500, probes: 3 }\nscheduling: { backoff_base_ms: 1, backoff_cap_ms: 1 }\n").unwrap();
    let config = config.to_str().unwrap().to_owned();
    // A safety service that is down: nothing listens on this port.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let safety = format!("http://{dead}");
    let (_gateway, gateway) = replica_with(&url, &["--role", "gateway"]);
    let scheduler = ["--role", "scheduler", "--safety-url", &safety, "--config", &config];
    let (_s1, s1) = replica_with(&url, &scheduler);
    let (_s2, s2) = replica_with(&url, &scheduler);
    let agent = key(&gateway, "agent", &["submitter"]);
    let worker = key(&gateway, "w1", &["worker"]);
    for n in 0..8 {
        let body = json!({"topic": "infra.vm.create", "env": "dev", "payload": {"n": n}}).to_string();
        assert_eq!(call(&gateway, "/api/v1/jobs", &agent, Some(body)).0, 202);
    }
    assert_eq!(
        call(&gateway, "/api/v1/workers/claim", &worker, Some("{}".into())).0,
        404,
        "a gateway does not serve workers"
    );
    let unavailable = "airlock_safety_check_failures_total{gate=\"b\",reason=\"unavailable\"}";
    let calls = || metric(&s1, unavailable) + metric(&s2, unavailable);
    for n in 0..3 {
        let scheduler = if n % 2 == 0 { &s1 } else { &s2 };
        assert_eq!(call(scheduler, "/api/v1/workers/claim", &worker, Some("{}".into())).0, 204);
    }
    assert_eq!(calls(), 3.0);
    assert_eq!(
        metric(&s2, "airlock_safety_circuit_state"),
        2.0,
        "three failures across both replicas opened it"
    );
    assert_eq!(metric(&s1, "airlock_safety_circuit_state"), 2.0, "one breaker for both");
    for scheduler in [&s1, &s2] {
        assert_eq!(call(scheduler, "/api/v1/workers/claim", &worker, Some("{}".into())).0, 204);
    }
    assert_eq!(calls(), 3.0, "while open, neither replica calls the safety service");
    std::thread::sleep(Duration::from_millis(2600));
    let claims: Vec<_> = (0..8)
        .map(|n| {
            let (addr, worker) = (if n % 2 == 0 { s1.clone() } else { s2.clone() }, worker.clone());
            std::thread::spawn(move || call(&addr, "/api/v1/workers/claim", &worker, Some("{}".into())).0)
        })
        .collect();
    for c in claims {
        assert_eq!(c.join().unwrap(), 204);
    }
    let probes = calls() - 3.0;
    assert!((1.0..=3.0).contains(&probes), "half-open probes across both replicas: {probes}");
}
