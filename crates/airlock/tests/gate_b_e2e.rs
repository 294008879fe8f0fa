//! Gate B's failure paths through the real binary: the breaker opens after three failures and
//! lets at most three probes through while half-open; a fail-open setting that reaches
//! high-risk topics refuses to start unless forced.

#![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic, reason = "a test fails by panicking")]

mod support;

use std::time::Duration;

use serde_json::json;
use support::{Process, call_json as call, get, metric, post, temp_dir};

const ADMIN: &str = "gate-b-e2e-admin-key-0123456789";

fn start(dir: &std::path::Path, config: &str, extra: &[&str]) -> (Process, String) {
    let path = dir.join("airlock.yaml");
    std::fs::write(&path, config).unwrap();
    let mut args = vec!["serve", "--listen", "127.0.0.1:0", "--data", dir.to_str().unwrap()];
    args.extend(["--config", path.to_str().unwrap()]);
    args.extend(extra);
    support::airlock(&args, &[("AIRLOCK_ADMIN_KEY", ADMIN)])
}

#[test]
fn the_breaker_opens_and_admits_at_most_three_probes() {
    let dir = temp_dir("gate-b-e2e-breaker");
    let config = "gate_b: { timeout_ms: 200 }\nbreaker: { failures_to_open: 3, open_ms: 1500, probes: 3 }\n\
                  scheduling: { backoff_base_ms: 1, backoff_cap_ms: 1 }\n";
    let (_server, addr) = start(&dir, config, &["--enable-fault-injection"]);
    let (_, agent) = call(
        &addr,
        "/api/v1/keys",
        ADMIN,
        Some(json!({"tenant": "acme", "name": "agent", "roles": ["submitter"]})),
    );
    let (_, worker) = call(
        &addr,
        "/api/v1/keys",
        ADMIN,
        Some(json!({"tenant": "acme", "name": "w1", "roles": ["worker"]})),
    );
    let (agent, worker) =
        (agent["key"].as_str().unwrap().to_owned(), worker["key"].as_str().unwrap().to_owned());
    for n in 0..8 {
        let (status, _) = call(
            &addr,
            "/api/v1/jobs",
            &agent,
            Some(json!({"topic": "infra.vm.create", "env": "dev", "payload": {"n": n}})),
        );
        assert_eq!(status, 202);
    }
    let (status, _) = post(&addr, "/api/v1/admin/faults", ADMIN, json!({"safety": "slow", "delay_ms": 5000}));
    assert_eq!(status, 200);
    let timeouts = "airlock_safety_check_failures_total{gate=\"b\",reason=\"timeout\"}";
    for _ in 0..3 {
        let (status, _) = post(&addr, "/api/v1/workers/claim", &worker, json!({}));
        assert_eq!(status, 204, "fail closed");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(metric(&addr, timeouts), 3.0);
    assert_eq!(metric(&addr, "airlock_safety_circuit_state"), 2.0, "open after three failures");
    let (status, _) = post(&addr, "/api/v1/workers/claim", &worker, json!({}));
    assert_eq!(status, 204);
    assert_eq!(metric(&addr, timeouts), 3.0, "while open, no call reaches the safety check");

    std::thread::sleep(Duration::from_millis(1600));
    let claims: Vec<_> = (0..6)
        .map(|_| {
            let (addr, worker) = (addr.clone(), worker.clone());
            std::thread::spawn(move || post(&addr, "/api/v1/workers/claim", &worker, json!({})).0)
        })
        .collect();
    for c in claims {
        assert_eq!(c.join().unwrap(), 204);
    }
    let probes = metric(&addr, timeouts) - 3.0;
    assert!((1.0..=3.0).contains(&probes), "half-open let {probes} probes through; at most 3 are allowed");
    assert_eq!(metric(&addr, "airlock_safety_circuit_state"), 2.0, "failed probes re-open it");

    post(&addr, "/api/v1/admin/faults", ADMIN, json!({"safety": "none"}));
    std::thread::sleep(Duration::from_millis(1600));
    let (status, claim) = post(&addr, "/api/v1/workers/claim", &worker, json!({}));
    assert_eq!(status, 200, "a successful probe leases: {claim}");
    assert_eq!(metric(&addr, "airlock_safety_circuit_state"), 0.0, "and closes the breaker");
}

#[test]
fn fail_open_on_high_risk_topics_must_be_forced() {
    let dir = temp_dir("gate-b-e2e-high-risk");
    let config = dir.join("airlock.yaml");
    std::fs::write(&config, "gate_b: { fail_mode_risk: { high: open } }\n").unwrap();
    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--data",
            dir.to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
        ])
        .env("AIRLOCK_ADMIN_KEY", ADMIN)
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("--force-fail-open-high-risk"), "{stderr}");
    let (server, addr) =
        start(&dir, "gate_b: { fail_mode_risk: { high: open } }\n", &["--force-fail-open-high-risk"]);
    let (status, _) = get(&addr, "/healthz", "");
    assert_eq!(status, 200, "forced, it starts (and warns)");
    drop(server);
}
