//! The remote safety service through the real binaries: `airlock serve --role safety` and a
//! server using it with `--safety-url`. Stopping the service makes Gate B fail closed (jobs
//! wait, then complete once it is back on the same address) or, for topics set to `open`,
//! dispatch with the bypass counted.

#![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic, reason = "a test fails by panicking")]

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;
use support::{Process, call_json as call, temp_dir};

const ADMIN: &str = "safety-e2e-admin-key-0123456789";
const TOKEN: &str = "safety-e2e-token-0123456789";

fn spawn(args: &[&str]) -> (Process, String) {
    support::airlock(args, &[("AIRLOCK_ADMIN_KEY", ADMIN), ("AIRLOCK_SAFETY_TOKEN", TOKEN)])
}

fn key(addr: &str, name: &str, role: &str) -> String {
    support::key(addr, ADMIN, "acme", name, &[role])
}

fn submit(addr: &str, key: &str, n: u64) -> String {
    let (status, body) = call(
        addr,
        "/api/v1/jobs",
        key,
        Some(json!({"topic": "infra.vm.create", "env": "dev", "payload": {"n": n}})),
    );
    assert_eq!(status, 202, "{body}");
    body["job_id"].as_str().unwrap().to_owned()
}

/// Claims once; completes what it gets; returns (job id, bypassed).
fn work(addr: &str, worker: &str) -> Option<(String, bool)> {
    let (status, claim) = call(addr, "/api/v1/workers/claim", worker, Some(json!({"wait_ms": 0})));
    if status == 204 {
        return None;
    }
    assert_eq!(status, 200, "{claim}");
    let id = claim["job_id"].as_str().unwrap().to_owned();
    let body = json!({"lease_token": claim["lease_token"], "result": {}});
    let (status, _) = call(addr, &format!("/api/v1/workers/jobs/{id}/complete"), worker, Some(body));
    assert_eq!(status, 200);
    Some((id, claim["gate_b"]["bypassed"] == true))
}

fn config(dir: &Path, extra: &str) -> String {
    let path = dir.join("airlock.yaml");
    std::fs::write(
        &path,
        format!(
            "scheduling: {{ backoff_base_ms: 20, backoff_cap_ms: 50 }}\nbreaker: {{ open_ms: 300 }}\n{extra}"
        ),
    )
    .unwrap();
    path.display().to_string()
}

#[test]
fn a_stopped_safety_service_fails_closed_then_jobs_complete_after_it_returns() {
    let dir = temp_dir("safety-closed");
    let data = dir.to_str().unwrap();
    let (safety, safety_addr) =
        spawn(&["serve", "--role", "safety", "--listen", "127.0.0.1:0", "--data", data]);
    let url = format!("http://{safety_addr}");
    let conf = config(&dir, "");
    let (_server, addr) =
        spawn(&["serve", "--listen", "127.0.0.1:0", "--data", data, "--safety-url", &url, "--config", &conf]);
    let (agent, worker) = (key(&addr, "agent", "submitter"), key(&addr, "w1", "worker"));

    let first = submit(&addr, &agent, 1);
    assert_eq!(work(&addr, &worker).map(|(id, _)| id), Some(first), "decided by the remote service");
    let waiting: Vec<String> = (2..4).map(|n| submit(&addr, &agent, n)).collect();

    drop(safety);
    for _ in 0..5 {
        assert!(work(&addr, &worker).is_none(), "fail closed: nothing dispatched without a decision");
        std::thread::sleep(Duration::from_millis(60));
    }
    let (_, metrics) = call(&addr, "/metrics", "", None);
    let metrics = metrics.as_str().unwrap().to_owned();
    assert!(
        metrics.contains("airlock_safety_check_failures_total{gate=\"b\",reason=\"unavailable\"}"),
        "{metrics}"
    );
    let (status, _) =
        call(&addr, "/api/v1/jobs", &agent, Some(json!({"topic": "infra.vm.create", "env": "dev"})));
    assert_eq!(status, 503, "Gate A fails closed too");

    let (_safety, again) = spawn(&["serve", "--role", "safety", "--listen", &safety_addr, "--data", data]);
    assert_eq!(again, safety_addr);
    let (status, _) = call(&safety_addr, "/api/v1/safety/evaluate", "not-the-token", Some(json!({})));
    assert_eq!(status, 401, "the safety service requires the shared token");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut done = Vec::new();
    while done.len() < waiting.len() {
        assert!(Instant::now() < deadline, "jobs did not complete after the service returned: {done:?}");
        if let Some((id, bypassed)) = work(&addr, &worker) {
            assert!(!bypassed);
            done.push(id);
        } else {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    done.sort();
    assert_eq!(done, waiting);
}

#[test]
fn a_stopped_safety_service_with_fail_open_dispatches_and_counts() {
    let dir = temp_dir("safety-open");
    let data = dir.to_str().unwrap();
    let (safety, safety_addr) =
        spawn(&["serve", "--role", "safety", "--listen", "127.0.0.1:0", "--data", data]);
    let url = format!("http://{safety_addr}");
    let conf = config(&dir, "gate_b: { fail_mode_topics: { \"infra.vm.*\": open } }\n");
    let (_server, addr) =
        spawn(&["serve", "--listen", "127.0.0.1:0", "--data", data, "--safety-url", &url, "--config", &conf]);
    let (agent, worker) = (key(&addr, "agent", "submitter"), key(&addr, "w1", "worker"));
    let job = submit(&addr, &agent, 1);
    drop(safety);
    let (id, bypassed) = work(&addr, &worker).expect("fail open dispatches");
    assert_eq!((id, bypassed), (job, true));
    let (_, metrics) = call(&addr, "/metrics", "", None);
    assert!(
        metrics
            .as_str()
            .unwrap()
            .contains("airlock_scheduler_input_fail_open_total{topic=\"infra.vm.create\"} 1"),
        "{metrics}"
    );
}
