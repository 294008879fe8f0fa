//! The NATS JetStream job bus through the real binary (`serve --store postgres://… --bus
//! nats://…`): a claim on one replica wakes through the bus alone (with a bus, queued jobs send
//! no `NOTIFY`), a crash between commit and publish loses no job and doubles none (the outbox
//! row survives), and a NATS restart under load loses no acknowledged job. PostgreSQL must be
//! reachable (as in `distributed.rs`); NATS must listen on 127.0.0.1:4222 (started here if it
//! does not) and `/usr/sbin/nats-server` must exist. With `CI=true` a missing service fails;
//! elsewhere the test says so and returns.

#![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic, reason = "a test fails by panicking")]

mod support;

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{NATS, NATS_BIN, Process, Schema, wait_reachable};

const ADMIN: &str = "bus-e2e-admin-key-0123456789abcdef";

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Makes sure the shared NATS server runs; false (outside CI only) when it cannot.
fn shared_nats() -> bool {
    let up = support::start_shared_nats();
    assert!(up || !in_ci(), "NATS with JetStream must listen on {NATS} for the bus tests");
    if !up {
        eprintln!("skipped: no NATS server on {NATS}");
    }
    up
}

/// A replica on `url` with the bus at `nats` on `stream`; `env` adds variables.
fn replica(url: &str, nats: &str, stream: &str, env: &[(&str, &str)]) -> (Process, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args(["serve", "--listen", "127.0.0.1:0", "--store", url])
        .args(["--bus", &format!("nats://{nats}"), "--bus-stream", stream])
        .envs(env.iter().copied())
        .env("AIRLOCK_SAFETY_TOKEN", "bus-e2e-safety-token-0123")
        .env("AIRLOCK_ADMIN_KEY", ADMIN)
        .env("RUST_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let line = BufReader::new(child.stdout.take().unwrap()).lines().next().unwrap().unwrap();
    let addr = line.split("http://").nth(1).unwrap().split_whitespace().next().unwrap().to_owned();
    (Process(child), addr)
}

/// The status and body, or `None` if the connection failed.
fn try_call(addr: &str, path: &str, key: &str, body: Option<String>) -> Option<(u16, Value)> {
    support::try_call(addr, path, key, body.as_deref(), Duration::from_secs(10))
}

fn call(addr: &str, path: &str, key: &str, body: Option<String>) -> (u16, Value) {
    try_call(addr, path, key, body).unwrap()
}

fn key(addr: &str, name: &str, roles: &[&str]) -> String {
    let body = json!({"tenant": "acme", "name": name, "roles": roles}).to_string();
    let (status, reply) = call(addr, "/api/v1/keys", ADMIN, Some(body));
    assert_eq!(status, 201, "{reply}");
    reply["key"].as_str().unwrap().to_owned()
}

fn complete(addr: &str, worker: &str, claim: &Value) -> u16 {
    let id = claim["job_id"].as_str().unwrap();
    let body = json!({"lease_token": claim["lease_token"], "result": {"ok": true}}).to_string();
    call(addr, &format!("/api/v1/workers/jobs/{id}/complete"), worker, Some(body)).0
}

#[test]
fn the_bus_alone_wakes_a_waiting_claim() {
    if !shared_nats() {
        return;
    }
    let schema = Schema::create("wake");
    let stream = support::BusStream::new("bus1");
    let url = schema.url();
    let (_a, a) = replica(&url, NATS, &stream.name, &[]);
    let (_b, b) = replica(&url, NATS, &stream.name, &[]);
    let agent = key(&a, "agent", &["submitter"]);
    let worker = key(&b, "w1", &["worker"]);

    let mut waits = Vec::new();
    for n in 0..5_u64 {
        let waiting = {
            let (b, worker) = (b.clone(), worker.clone());
            std::thread::spawn(move || {
                call(&b, "/api/v1/workers/claim", &worker, Some(json!({"wait_ms": 5000}).to_string()))
            })
        };
        // Mid-wait: without the wake-up the claim would wait for its 1 s safety-net re-check.
        std::thread::sleep(Duration::from_millis(210 + 20 * n));
        let submitted_at = Instant::now();
        let body = json!({"topic": "infra.vm.create", "env": "dev", "payload": {"wake": n}}).to_string();
        assert_eq!(call(&a, "/api/v1/jobs", &agent, Some(body)).0, 202);
        let (status, claim) = waiting.join().unwrap();
        waits.push(submitted_at.elapsed());
        assert_eq!(status, 200, "{claim}");
        assert_eq!(complete(&b, &worker, &claim), 200);
    }
    waits.sort();
    eprintln!("claims woke {waits:?} after the submits");
    // Woken by the bus, a claim answers within tens of milliseconds on a quiet machine (and
    // within a couple of hundred on a loaded one); by its 1 s re-check alone, it would answer
    // about 750 ms after the submit.
    assert!(waits[2] < Duration::from_millis(400), "claims woke {waits:?} after the submits");
    let deadline = Instant::now() + Duration::from_secs(5);
    while schema.count("SELECT COUNT(*) FROM outbox") != 0 {
        assert!(Instant::now() < deadline, "the relay never drained the outbox");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Jobs queued together cost the bus one message per relay round and tenant, not one per job.
#[test]
fn a_relay_round_publishes_one_wake_up_for_many_jobs() {
    if !shared_nats() {
        return;
    }
    let schema = Schema::create("rounds");
    let stream = support::BusStream::new("bus4");
    let (_a, a) = replica(&schema.url(), NATS, &stream.name, &[]);
    let agent = key(&a, "agent", &["submitter"]);
    let submitters: Vec<_> = (0..8)
        .map(|s| {
            let (a, agent) = (a.clone(), agent.clone());
            std::thread::spawn(move || {
                for n in 0..10 {
                    let payload = json!({"submitter": s, "n": n});
                    let body = json!({"topic": "infra.vm.create", "env": "dev", "payload": payload});
                    assert_eq!(call(&a, "/api/v1/jobs", &agent, Some(body.to_string())).0, 202);
                }
            })
        })
        .collect();
    for s in submitters {
        s.join().unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while schema.count("SELECT COUNT(*) FROM outbox") != 0 {
        assert!(Instant::now() < deadline, "the relay never drained the outbox");
        std::thread::sleep(Duration::from_millis(50));
    }
    let messages = stream.messages().expect("the stream's info");
    eprintln!("80 jobs, {messages} bus messages");
    assert!((1..80).contains(&messages), "80 jobs queued together took {messages} bus messages");
}

#[test]
fn a_crash_between_commit_and_publish_loses_and_doubles_nothing() {
    if !shared_nats() {
        return;
    }
    let schema = Schema::create("crash");
    let stream = support::BusStream::new("bus2");
    let url = schema.url();
    let (mut a, a_addr) = replica(&url, NATS, &stream.name, &[("AIRLOCK_FAULT_CRASH_AFTER_COMMIT", "1")]);
    let agent = key(&a_addr, "agent", &["submitter"]);
    let worker = key(&a_addr, "w1", &["worker"]);
    let body = json!({"topic": "infra.vm.create", "env": "dev", "idempotency_key": "crash-1"}).to_string();
    // The 202 may or may not arrive before the process exits.
    let _ = try_call(&a_addr, "/api/v1/jobs", &agent, Some(body));
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = a.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the fault never fired");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(86), "the relay's fault exits 86");
    assert_eq!(schema.count("SELECT COUNT(*) FROM jobs WHERE idempotency_key = 'crash-1'"), 1, "committed");
    assert_eq!(schema.count("SELECT COUNT(*) FROM outbox"), 1, "its wake-up is still owed");

    let (_a, a_addr) = replica(&url, NATS, &stream.name, &[]);
    let (status, claim) =
        call(&a_addr, "/api/v1/workers/claim", &worker, Some(json!({"wait_ms": 5000}).to_string()));
    assert_eq!(status, 200, "{claim}");
    assert_eq!(complete(&a_addr, &worker, &claim), 200);
    let (status, again) =
        call(&a_addr, "/api/v1/workers/claim", &worker, Some(json!({"wait_ms": 500}).to_string()));
    assert_eq!(status, 204, "never a second lease: {again}");
    let id = claim["job_id"].as_str().unwrap();
    let (_, job) = call(&a_addr, &format!("/api/v1/jobs/{id}"), &agent, None);
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(
        schema.count(&format!(
            "SELECT COUNT(*) FROM job_transitions WHERE job_id = '{id}' AND to_state = 'succeeded'"
        )),
        1,
        "exactly one success"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while schema.count("SELECT COUNT(*) FROM outbox") != 0 {
        assert!(Instant::now() < deadline, "the restarted relay never drained the outbox");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A NATS server of this test's own, on `port` with its store in `dir`.
fn throwaway_nats(port: u16, dir: &std::path::Path) -> Process {
    let child = Command::new(NATS_BIN)
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(
        wait_reachable(&format!("127.0.0.1:{port}"), Duration::from_secs(10)),
        "nats-server did not start"
    );
    Process(child)
}

#[test]
fn a_nats_restart_under_load_loses_no_acknowledged_job() {
    if !std::path::Path::new(NATS_BIN).exists() {
        assert!(!in_ci(), "{NATS_BIN} is needed for the bus tests");
        eprintln!("skipped: no {NATS_BIN}");
        return;
    }
    let schema = Schema::create("restart");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dir = std::env::temp_dir().join(format!("airlock-bus-nats-{}-{port}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let server = format!("127.0.0.1:{port}");
    let mut nats = throwaway_nats(port, &dir);
    let stream = format!("AIRLOCK_WORK_{}_R", std::process::id());
    let url = schema.url();
    let (_a, a) = replica(&url, &server, &stream, &[]);
    let (_b, b) = replica(&url, &server, &stream, &[]);
    let agent = key(&a, "agent", &["submitter"]);
    let worker = key(&b, "w1", &["worker"]);

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let (b, worker, stop) = (b.clone(), worker.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut done = 0;
                while !stop.load(Ordering::Relaxed) {
                    let claim = try_call(
                        &b,
                        "/api/v1/workers/claim",
                        &worker,
                        Some(json!({"wait_ms": 300}).to_string()),
                    );
                    if let Some((200, claim)) = claim {
                        assert_eq!(complete(&b, &worker, &claim), 200);
                        done += 1;
                    }
                }
                done
            })
        })
        .collect();
    let mut accepted = Vec::new();
    let started = Instant::now();
    let mut restarted = false;
    for n in 0..300 {
        let body = json!({"topic": "infra.vm.create", "env": "dev", "payload": {"n": n}}).to_string();
        if let Some((202, reply)) = try_call(&a, "/api/v1/jobs", &agent, Some(body)) {
            accepted.push(reply["job_id"].as_str().unwrap().to_owned());
        }
        if n == 100 {
            // kill -9 the server this test started, by its PID, then restart it on the same port.
            nats.0.kill().unwrap();
            nats.0.wait().unwrap();
            std::thread::sleep(Duration::from_millis(1500));
            nats = throwaway_nats(port, &dir);
            restarted = true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(restarted);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let done = schema.count("SELECT COUNT(*) FROM jobs WHERE state = 'succeeded'");
        if done == i64::try_from(accepted.len()).unwrap() {
            break;
        }
        assert!(Instant::now() < deadline, "{done} of {} acknowledged jobs completed", accepted.len());
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Relaxed);
    let completed: usize = workers.into_iter().map(|w| w.join().unwrap()).sum();
    assert_eq!(completed, accepted.len(), "each job completed exactly once");
    assert!(accepted.len() >= 290, "only {} of 300 submits acknowledged", accepted.len());
    let deadline = Instant::now() + Duration::from_secs(15);
    while schema.count("SELECT COUNT(*) FROM outbox") != 0 {
        assert!(Instant::now() < deadline, "the relay never caught up after the restart");
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("{} jobs in {:?}, NATS restarted once", accepted.len(), started.elapsed());
    drop(nats);
    let _ = std::fs::remove_dir_all(&dir);
}
