//! Why this exists: distributed mode must survive its processes dying. Two tests through the
//! real binary on PostgreSQL: `scripts/distributed-demo.sh` (the documented example) runs to
//! exit 0, and a deployment of separate processes, two `airlock serve --role gateway` and two
//! `--role scheduler` replicas on one store and one job bus (`--bus`, a JetStream stream of the
//! test's own), with submitters on the gateways and workers on the schedulers, has a random
//! replica of either role killed with SIGKILL every ~3 s (ten times) and restarted with the same
//! role on a new port, after which every accepted job is present and succeeded (or still queued
//! with attempts left), none completed twice, and the audit chain verifies. PostgreSQL must be
//! reachable (127.0.0.1:5432, or `AIRLOCK_TEST_POSTGRES_URL`), and NATS with JetStream must
//! listen on 127.0.0.1:4222: these tests fail, never skip, without them.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    reason = "a test fails by panicking"
)]

mod support;

use std::collections::HashMap;
use std::hash::{BuildHasher as _, RandomState};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{
    BusStream, NATS, Process, Replica, Schema, postgres_url, replica_with, require_postgres, try_metric,
};

const ADMIN: &str = "distributed-faults-admin-key-0123456789";

/// Both tests hold many PostgreSQL connections (up to 16 per replica); one at a time keeps
/// them under the default `max_connections` of 100.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A uniformly random index below `n` (no `rand` dependency: `RandomState` is seeded per call).
fn pick(n: usize) -> usize {
    (RandomState::new().hash_one(Instant::now()) % n.max(1) as u64) as usize
}

#[test]
fn the_distributed_demo_script_succeeds() {
    let _serial = serial();
    let base = postgres_url();
    require_postgres(&base);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let log = std::env::temp_dir().join(format!("airlock-demo-test-{}.log", std::process::id()));
    let out = std::fs::File::create(&log).unwrap();
    let started = Instant::now();
    let mut script = Process(
        Command::new("bash")
            .arg(root.join("scripts/distributed-demo.sh"))
            .current_dir(&root)
            .env("AIRLOCK_BIN", env!("CARGO_BIN_EXE_airlock"))
            .env("AIRLOCK_DEMO_POSTGRES_URL", &base)
            .stdout(Stdio::from(out.try_clone().unwrap()))
            .stderr(Stdio::from(out))
            .spawn()
            .unwrap(),
    );
    let status = loop {
        if let Some(status) = script.0.try_wait().unwrap() {
            break Some(status);
        }
        if started.elapsed() > Duration::from_secs(60) {
            // SIGTERM, so that the script's trap stops what it started and drops its schema.
            let _ = Command::new("kill").args(["-TERM", &script.0.id().to_string()]).status();
            let grace = Instant::now();
            while grace.elapsed() < Duration::from_secs(10) && script.0.try_wait().unwrap().is_none() {
                std::thread::sleep(Duration::from_millis(100));
            }
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let output = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    eprintln!("{output}");
    match status {
        Some(s) => assert!(s.success(), "the demo script failed ({s}):\n{output}"),
        None => panic!("the demo script did not finish within 60 s:\n{output}"),
    }
    assert!(output.contains("all 50 jobs succeeded"), "{output}");
    eprintln!("demo script: {:.1} s", started.elapsed().as_secs_f64());
}

/// An HTTP call; `None` when the replica could not be reached or the connection broke.
fn call(addr: &str, path: &str, key: &str, body: Option<String>) -> Option<(u16, Value)> {
    support::try_call(addr, path, key, body.as_deref(), Duration::from_secs(10))
}

/// The addresses of the live replicas of one role, re-read by every client before each call.
type Live = Arc<Mutex<Vec<String>>>;

fn any_live(live: &Live) -> String {
    let addrs = live.lock().unwrap_or_else(PoisonError::into_inner);
    addrs[pick(addrs.len())].clone()
}

/// Calls a random live replica until one answers (a killed one fails fast), for up to 20 s.
fn call_any(live: &Live, path: &str, key: &str, body: Option<&str>) -> (u16, Value) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(answer) = call(&any_live(live), path, key, body.map(str::to_owned))
            && answer.0 != 503
        {
            return answer;
        }
        assert!(Instant::now() < deadline, "no replica answered {path} for 20 s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The two kinds of replica under test: `serve --role gateway` takes submits, keys and reads;
/// `serve --role scheduler` the worker protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Role {
    Gateway,
    Scheduler,
}

impl Role {
    fn flag(self) -> &'static str {
        match self {
            Self::Gateway => "gateway",
            Self::Scheduler => "scheduler",
        }
    }
}

/// Execution attempts per job in the test's config: more than the kills can take from one job.
const ATTEMPTS_MAX: usize = 10;
/// SIGKILLs during the load, one every 2.5–3.5 s.
const KILLS: usize = 10;

#[test]
fn gateways_and_schedulers_killed_with_sigkill_lose_no_job_and_complete_none_twice() {
    let _serial = serial();
    let schema = Schema::create("kill");
    let stream = BusStream::new("kill");
    let url = schema.url();
    let bus = format!("nats://{NATS}");
    let config = std::env::temp_dir().join(format!("airlock-faults-{}.yaml", std::process::id()));
    // Short leases so that a lease handed out by a scheduler that died before answering comes
    // back within the test; more execution attempts than kills can take.
    std::fs::write(
        &config,
        format!(
            "leases: {{ lease_ms: 2000, heartbeat_ms: 500 }}\nexecution: {{ attempts_max: {ATTEMPTS_MAX} }}\n"
        ),
    )
    .unwrap();
    let start = |role: Role| {
        let extra = ["--role", role.flag(), "--bus", &bus, "--bus-stream", &stream.name];
        (role, replica_with(&url, &config, ADMIN, &extra))
    };

    // Declared after `stream`, so dropped (killed) before it is deleted, even on a panic.
    let mut replicas: Vec<(Role, Replica)> =
        [Role::Gateway, Role::Gateway, Role::Scheduler, Role::Scheduler].map(start).into();
    let live_of = |role: Role| -> Live {
        Arc::new(Mutex::new(
            replicas.iter().filter(|(r, _)| *r == role).map(|(_, p)| p.addr.clone()).collect(),
        ))
    };
    let (gateways, schedulers) = (live_of(Role::Gateway), live_of(Role::Scheduler));
    let live = |role: Role| match role {
        Role::Gateway => &gateways,
        Role::Scheduler => &schedulers,
    };
    let key = |name: &str, roles: &[&str]| {
        let body = json!({"tenant": "acme", "name": name, "roles": roles}).to_string();
        let (status, reply) = call_any(&gateways, "/api/v1/keys", ADMIN, Some(&body));
        assert_eq!(status, 201, "{reply}");
        reply["key"].as_str().unwrap().to_owned()
    };
    let agent = key("agent", &["submitter"]);
    let worker = key("worker", &["worker"]);

    let stop_submitting = Arc::new(AtomicBool::new(false));
    let stop_working = Arc::new(AtomicBool::new(false));
    let submit_errors = Arc::new(AtomicUsize::new(0));
    let submitters: Vec<_> = (0..3)
        .map(|t| {
            let (gateways, agent, stop, errors) = (
                Arc::clone(&gateways),
                agent.clone(),
                Arc::clone(&stop_submitting),
                Arc::clone(&submit_errors),
            );
            std::thread::spawn(move || {
                // idempotency key → job id of every 202.
                let mut accepted: HashMap<String, String> = HashMap::new();
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let key = format!("t{t}-{n}");
                    let body = json!({"topic": "infra.vm.create", "env": "dev", "idempotency_key": key,
                                      "payload": {"n": n, "t": t}})
                    .to_string();
                    // Retry the same key on the gateways until one answers for it.
                    for _ in 0..50 {
                        match call(&any_live(&gateways), "/api/v1/jobs", &agent, Some(body.clone())) {
                            Some((202, reply)) => {
                                let id = reply["job_id"].as_str().unwrap().to_owned();
                                if let Some(before) = accepted.insert(key.clone(), id.clone()) {
                                    assert_eq!(before, id, "one idempotency key, two jobs");
                                }
                                break;
                            }
                            Some((status, reply)) if status < 500 => {
                                panic!("submit {key} answered {status}: {reply}")
                            }
                            _ => {
                                errors.fetch_add(1, Ordering::Relaxed);
                                std::thread::sleep(Duration::from_millis(20));
                            }
                        }
                    }
                    std::thread::sleep(Duration::from_millis(25));
                }
                accepted
            })
        })
        .collect();
    let workers: Vec<_> = (0..3)
        .map(|_| {
            let (schedulers, worker, stop) =
                (Arc::clone(&schedulers), worker.clone(), Arc::clone(&stop_working));
            std::thread::spawn(move || {
                // (job id, lease token) of every complete answered 200.
                let mut completed: Vec<(String, String)> = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let claim = call(
                        &any_live(&schedulers),
                        "/api/v1/workers/claim",
                        &worker,
                        Some(json!({"wait_ms": 300}).to_string()),
                    );
                    let Some((200, claim)) = claim else { continue };
                    let id = claim["job_id"].as_str().unwrap().to_owned();
                    let token = claim["lease_token"].as_str().unwrap().to_owned();
                    let body = json!({"lease_token": token, "result": {"ok": true}}).to_string();
                    // Complete through any scheduler; after a broken connection the first try may
                    // have committed, so a refusal then is expected and the lease lapses otherwise.
                    for _ in 0..20 {
                        match call(
                            &any_live(&schedulers),
                            &format!("/api/v1/workers/jobs/{id}/complete"),
                            &worker,
                            Some(body.clone()),
                        ) {
                            Some((200, _)) => {
                                completed.push((id, token));
                                break;
                            }
                            Some((status, _)) if status < 500 => break,
                            _ => std::thread::sleep(Duration::from_millis(20)),
                        }
                    }
                }
                completed
            })
        })
        .collect();

    // Chaos: every ~3 s, SIGKILL a random replica of either role and start one of the same role
    // on a new port. The last kill takes a role no kill has taken yet, if there is one.
    let load = Instant::now();
    let mut killed: HashMap<Role, usize> = HashMap::new();
    for k in 0..KILLS {
        std::thread::sleep(Duration::from_millis(2500 + pick(1000) as u64));
        let candidates: Vec<usize> = (0..replicas.len())
            .filter(|&i| k + 1 < KILLS || killed.len() == 2 || !killed.contains_key(&replicas[i].0))
            .collect();
        let (role, victim) = replicas.swap_remove(candidates[pick(candidates.len())]);
        live(role).lock().unwrap().retain(|a| *a != victim.addr);
        drop(victim); // kill -9 and reap
        *killed.entry(role).or_default() += 1;
        let fresh = start(role);
        live(role).lock().unwrap().push(fresh.1.addr.clone());
        replicas.push(fresh);
    }
    stop_submitting.store(true, Ordering::Relaxed);
    let mut accepted: HashMap<String, String> = HashMap::new();
    for s in submitters {
        accepted.extend(s.join().unwrap());
    }
    let load = load.elapsed();

    // Drain: workers keep going until nothing is queued or leased (lapsed leases come back).
    let drain = Instant::now();
    while drain.elapsed() < Duration::from_secs(30) {
        let addr = any_live(&schedulers);
        let queued = try_metric(&addr, "airlock_jobs{state=\"queued\"}");
        let leased = try_metric(&addr, "airlock_jobs{state=\"leased\"}");
        if queued == Some(0.0) && leased == Some(0.0) {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    stop_working.store(true, Ordering::Relaxed);
    let mut completes: HashMap<String, Vec<String>> = HashMap::new();
    for w in workers {
        for (id, token) in w.join().unwrap() {
            completes.entry(id).or_default().push(token);
        }
    }
    let drain = drain.elapsed();

    // Every 202 is present (read through the gateways) and succeeded once, or is still queued
    // (or leased) with execution attempts left and never succeeded.
    let mut states: HashMap<String, usize> = HashMap::new();
    for id in accepted.values() {
        let (status, job) = call_any(&gateways, &format!("/api/v1/jobs/{id}"), &agent, None);
        assert_eq!(status, 200, "accepted job {id} is missing: {job}");
        let state = job["state"].as_str().unwrap().to_owned();
        let history = job["history"].as_array().unwrap();
        let times = |to: &str| history.iter().filter(|t| t["to"] == to).count();
        let (succeeded, leases) = (times("succeeded"), times("leased"));
        match state.as_str() {
            "succeeded" => assert_eq!(succeeded, 1, "job {id} succeeded {succeeded} times: {job}"),
            "queued" => assert!(succeeded == 0 && leases < ATTEMPTS_MAX, "{job}"),
            "leased" => assert!(succeeded == 0 && leases <= ATTEMPTS_MAX, "{job}"),
            other => panic!("job {id} ended {other} (not succeeded, not queued with attempts left): {job}"),
        }
        *states.entry(state).or_default() += 1;
    }
    for (id, tokens) in &completes {
        assert_eq!(tokens.len(), 1, "job {id} was completed {} times", tokens.len());
    }
    // A second complete under a lease token already used is refused.
    let (id, tokens) = completes.iter().next().expect("no job was completed");
    let body = json!({"lease_token": tokens[0], "result": {"ok": true}}).to_string();
    let (status, reply) =
        call_any(&schedulers, &format!("/api/v1/workers/jobs/{id}/complete"), &worker, Some(&body));
    assert_ne!(status, 200, "a second complete with the same lease token succeeded: {reply}");

    let (status, verify) = call_any(&gateways, "/api/v1/audit/verify", ADMIN, Some(""));
    assert_eq!((status, &verify["ok"]), (200, &json!(true)), "the audit chain does not verify: {verify}");

    eprintln!(
        "kill -9 test (2 gateways, 2 schedulers, bus stream {}): {KILLS} kills ({} gateway, {} scheduler) \
         in {:.1} s of load, {} jobs accepted ({} transport retries), {} completes answered 200, \
         final states {states:?}, drain {:.1} s",
        stream.name,
        killed.get(&Role::Gateway).copied().unwrap_or(0),
        killed.get(&Role::Scheduler).copied().unwrap_or(0),
        load.as_secs_f64(),
        accepted.len(),
        submit_errors.load(Ordering::Relaxed),
        completes.len(),
        drain.as_secs_f64()
    );
    assert!(accepted.len() >= 100, "too little load: {} jobs accepted", accepted.len());
    assert!(
        states.get("succeeded").copied().unwrap_or(0) * 10 >= accepted.len() * 9,
        "fewer than 90% of the accepted jobs succeeded: {states:?}"
    );
    drop(replicas);
    let _ = std::fs::remove_file(&config);
}
