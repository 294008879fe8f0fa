//! Gate B's failure paths through the real binary: the breaker opens after three failures and
//! lets at most three probes through while half-open; a fail-open setting that reaches
//! high-risk topics refuses to start unless forced.

#![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic, reason = "a test fails by panicking")]

use std::io::{BufRead as _, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

const ADMIN: &str = "gate-b-e2e-admin-key-0123456789";

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("airlock-gate-b-e2e-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn start(dir: &std::path::Path, config: &str, extra: &[&str]) -> (Server, String) {
    let path = dir.join("airlock.yaml");
    std::fs::write(&path, config).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--data",
            dir.to_str().unwrap(),
            "--config",
            path.to_str().unwrap(),
        ])
        .args(extra)
        .env("AIRLOCK_ADMIN_KEY", ADMIN)
        .env("RUST_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let line = BufReader::new(child.stdout.take().unwrap()).lines().next().unwrap().unwrap();
    let addr = line.split("http://").nth(1).unwrap().split_whitespace().next().unwrap().to_owned();
    (Server(child), addr)
}

fn call(addr: &str, path: &str, key: &str, body: Option<Value>) -> (u16, Value) {
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let url = format!("http://{addr}{path}");
    let auth = format!("Bearer {key}");
    let mut response = match body {
        Some(b) => agent.post(&url).header("authorization", &auth).send(b.to_string()),
        None => agent.get(&url).header("authorization", &auth).call(),
    }
    .unwrap();
    let status = response.status().as_u16();
    let text = response.body_mut().read_to_string().unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

fn metric(addr: &str, series: &str) -> f64 {
    let (_, text) = call(addr, "/metrics", "", None);
    text.as_str()
        .unwrap()
        .lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .map_or(0.0, |v| v.parse().unwrap())
}

#[test]
fn the_breaker_opens_and_admits_at_most_three_probes() {
    let dir = temp_dir("breaker");
    let config = "gate_b: { timeout_ms: 200 }\nbreaker: { failures_to_open: 3, open_ms: 400, probes: 3 }\n\
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
    let (status, _) =
        call(&addr, "/api/v1/admin/faults", ADMIN, Some(json!({"safety": "slow", "delay_ms": 5000})));
    assert_eq!(status, 200);
    let timeouts = "airlock_safety_check_failures_total{gate=\"b\",reason=\"timeout\"}";
    for _ in 0..3 {
        let (status, _) = call(&addr, "/api/v1/workers/claim", &worker, Some(json!({})));
        assert_eq!(status, 204, "fail closed");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(metric(&addr, timeouts), 3.0);
    assert_eq!(metric(&addr, "airlock_safety_circuit_state"), 2.0, "open after three failures");
    let (status, _) = call(&addr, "/api/v1/workers/claim", &worker, Some(json!({})));
    assert_eq!(status, 204);
    assert_eq!(metric(&addr, timeouts), 3.0, "while open, no call reaches the safety check");

    std::thread::sleep(Duration::from_millis(450));
    let claims: Vec<_> = (0..6)
        .map(|_| {
            let (addr, worker) = (addr.clone(), worker.clone());
            std::thread::spawn(move || call(&addr, "/api/v1/workers/claim", &worker, Some(json!({}))).0)
        })
        .collect();
    for c in claims {
        assert_eq!(c.join().unwrap(), 204);
    }
    let probes = metric(&addr, timeouts) - 3.0;
    assert!((1.0..=3.0).contains(&probes), "half-open let {probes} probes through; at most 3 are allowed");
    assert_eq!(metric(&addr, "airlock_safety_circuit_state"), 2.0, "failed probes re-open it");

    call(&addr, "/api/v1/admin/faults", ADMIN, Some(json!({"safety": "none"})));
    std::thread::sleep(Duration::from_millis(450));
    let (status, claim) = call(&addr, "/api/v1/workers/claim", &worker, Some(json!({})));
    assert_eq!(status, 200, "a successful probe leases: {claim}");
    assert_eq!(metric(&addr, "airlock_safety_circuit_state"), 0.0, "and closes the breaker");
}

#[test]
fn fail_open_on_high_risk_topics_must_be_forced() {
    let dir = temp_dir("high-risk");
    let config = dir.join("airlock.yaml");
    std::fs::write(&config, "gate_b: { fail_mode_risk: { high: open } }\n").unwrap();
    let refused = Command::new(env!("CARGO_BIN_EXE_airlock"))
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
    let (status, _) = call(&addr, "/healthz", "", None);
    assert_eq!(status, 200, "forced, it starts (and warns)");
    drop(server);
}
