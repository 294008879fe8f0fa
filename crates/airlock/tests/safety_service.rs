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

/// A party on the path to the safety service at `upstream`: it relays each request and turns
/// every `deny` answer into `allow`, keeping the signature header unless `strip_signature`.
/// Its address.
fn tampering_proxy(upstream: String, strip_signature: bool) -> String {
    use std::io::{BufRead as _, Read as _, Write as _};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { continue };
            let mut reader = std::io::BufReader::new(client);
            let mut head = String::new();
            let mut length = 0;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap();
                }
                head.push_str(&line);
                if line == "\r\n" {
                    break;
                }
            }
            let mut body = vec![0; length];
            reader.read_exact(&mut body).unwrap();
            let mut service = std::net::TcpStream::connect(&upstream).unwrap();
            service.write_all(head.as_bytes()).unwrap();
            service.write_all(&body).unwrap();
            let mut answer = String::new();
            service.read_to_string(&mut answer).unwrap();
            let (head, body) = answer.split_once("\r\n\r\n").unwrap();
            let body = body.replace("\"decision\":\"deny\"", "\"decision\":\"allow\"");
            let mut forged = String::new();
            for line in head.lines() {
                let name = line.split(':').next().unwrap().to_ascii_lowercase();
                if name == "content-length" || (strip_signature && name == "x-airlock-signature") {
                    continue;
                }
                forged.push_str(line);
                forged.push_str("\r\n");
            }
            forged.push_str(&format!("content-length: {}\r\n\r\n{body}", body.len()));
            let _ = reader.get_mut().write_all(forged.as_bytes());
        }
    });
    addr
}

#[test]
fn a_tampered_or_unsigned_answer_is_the_service_unavailable_never_allow() {
    let dir = temp_dir("safety-signed");
    let data = dir.to_str().unwrap();
    let answer_key = dir.join("answer.key");
    let env = [("AIRLOCK_ADMIN_KEY", ADMIN), ("AIRLOCK_SAFETY_TOKEN", TOKEN)];
    let (_safety, safety, printed) = support::airlock_printing(
        &[
            "serve",
            "--role",
            "safety",
            "--listen",
            "127.0.0.1:0",
            "--data",
            data,
            "--safety-answer-key",
            answer_key.to_str().unwrap(),
        ],
        &env,
    );
    let public_key = printed
        .iter()
        .find_map(|l| l.split("(for `--safety-public-key`): ").nth(1))
        .unwrap_or_else(|| panic!("no public key in {printed:?}"))
        .to_owned();
    let gateway = |safety: &str, signed: bool| {
        let url = format!("http://{safety}");
        let mut args = vec!["serve", "--listen", "127.0.0.1:0", "--data", data, "--safety-url", &url];
        if signed {
            args.extend(["--safety-public-key", &public_key]);
        }
        spawn(&args)
    };
    let deny = json!({"topic": "infra.security_group.update", "env": "production", "payload": {"cidr": "0.0.0.0/0"}});
    let allow = json!({"topic": "infra.vm.create", "env": "dev"});

    // Signed answers straight from the service verify.
    let (_direct, direct) = gateway(&safety, true);
    let agent = key(&direct, "agent", "submitter");
    let operator = key(&direct, "operator", "operator");
    let (status, reply) = call(&direct, "/api/v1/jobs", &agent, Some(deny.clone()));
    assert_eq!((status, reply["rule_ids"][0].as_str()), (403, Some("deny-prod-public-ingress")), "{reply}");
    assert_eq!(call(&direct, "/api/v1/jobs", &agent, Some(allow.clone())).0, 202);

    // The party on the path turns the deny into an allow: a caller that does not check
    // signatures admits the job.
    let forging = tampering_proxy(safety.clone(), false);
    let (_trusting, trusting) = gateway(&forging, false);
    assert_eq!(call(&trusting, "/api/v1/jobs", &agent, Some(deny.clone())).0, 202, "the proxy forges");

    // A caller with the service's public key finds the signature broken: the service is
    // unavailable, Gate A fails closed, counted and audited.
    let (_checking, checking) = gateway(&forging, true);
    let (status, reply) = call(&checking, "/api/v1/jobs", &agent, Some(deny.clone()));
    assert_eq!((status, reply["error"].as_str()), (503, Some("safety_unavailable")), "{reply}");
    assert!(reply["message"].as_str().unwrap().contains("does not verify"), "{reply}");
    let failures = "airlock_safety_check_failures_total{gate=\"a\",reason=\"unavailable\"}";
    assert_eq!(support::metric(&checking, failures), 1.0);

    // An answer with its signature removed is refused the same way.
    let stripping = tampering_proxy(safety, true);
    let (_stripped, stripped) = gateway(&stripping, true);
    let (status, reply) = call(&stripped, "/api/v1/jobs", &agent, Some(allow));
    assert_eq!((status, reply["error"].as_str()), (503, Some("safety_unavailable")), "{reply}");
    assert!(reply["message"].as_str().unwrap().contains("not signed"), "{reply}");

    let (_, audit) = call(&direct, "/api/v1/audit?limit=500", &operator, None);
    let errors: Vec<&str> = audit["records"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["kind"] == "gate_a.unavailable")
        .map(|r| r["data"]["error"].as_str().unwrap())
        .collect();
    assert_eq!(errors.len(), 2, "{audit}");
    assert!(
        errors.iter().any(|e| e.contains("does not verify"))
            && errors.iter().any(|e| e.contains("not signed"))
    );
}
