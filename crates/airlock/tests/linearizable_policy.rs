//! A history checker for SPEC 6's linearizable policy, through the real binary (in the manner
//! of Jepsen's Elle, for one property). Publishers, submitters, claimers and an approver run
//! concurrently against `airlock serve`, embedded and distributed (two gateways and two
//! schedulers on PostgreSQL and NATS), and every operation is recorded with the wall-clock
//! times it was invoked and acknowledged. Every published policy is unique (a marker rule), so
//! each answer's snapshot hash names its version. The checker then asserts:
//!
//! - no decision acknowledged to a client (a 202, a 403, a lease, an approval) was made under a
//!   snapshot older than one whose publish had been acknowledged before the operation began;
//! - no gate decision stored on any job (every one, from the job view) was stamped after the
//!   acknowledgement of a publish newer than the snapshot it was made under: decisions are
//!   stamped when made, before their commit, and a commit under a superseded snapshot is
//!   refused, so a decision made after a publish was answered uses that snapshot or a later one.
//!
//! Load runs for a few seconds per mode; the whole test stays well under two minutes.

#![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic, reason = "a test fails by panicking")]

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::json;
use support::{BusStream, NATS, Process, Replica, Schema, get, post, replica_with, temp_dir};

const ADMIN: &str = "linearizable-policy-admin-key-0123456789";
const SEED: &str = include_str!("../../../examples/policies/seed.yaml");
const LOAD: Duration = Duration::from_secs(6);

fn now_ms() -> i64 {
    i64::try_from(SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis()).unwrap()
}

/// The n-th policy of publisher `p`: the seed with a marker rule that makes its hash unique,
/// and every other one denying `infra.vm.create`.
fn policy(p: usize, n: usize) -> String {
    let mut text =
        format!("{SEED}  - id: marker-{p}-{n}\n    when: {{ topic: never.used }}\n    decision: allow\n");
    if n % 2 == 1 {
        text.push_str("  - id: deny-vms\n    when: { topic: infra.vm.create }\n    decision: deny\n");
    }
    text
}

/// An acknowledged publish.
#[derive(Clone, Debug)]
struct Publish {
    version: u64,
    hash: String,
    ack_ms: i64,
}

/// An acknowledged decision and the snapshot it names.
#[derive(Clone, Debug)]
struct Decided {
    what: String,
    invoke_ms: i64,
    snapshot: Snapshot,
}

#[derive(Clone, Debug)]
enum Snapshot {
    Hash(String),
    Version(u64),
}

/// Where the load goes: gateways take publishes, submits and approvals; schedulers claims.
struct Target {
    gateways: Vec<String>,
    schedulers: Vec<String>,
}

#[derive(Default)]
struct History {
    publishes: Mutex<Vec<Publish>>,
    decided: Mutex<Vec<Decided>>,
}

impl History {
    fn decided(&self, what: String, invoke_ms: i64, snapshot: Snapshot) {
        self.decided.lock().unwrap().push(Decided { what, invoke_ms, snapshot });
    }
}

fn key(addr: &str, name: &str, roles: &[&str]) -> String {
    support::key(addr, ADMIN, "acme", name, roles)
}

/// Runs the load against `target` and checks the history; `what` names the mode in failures.
fn check(what: &str, target: &Target) {
    let gateway = target.gateways[0].clone();
    let agent = key(&gateway, "agent", &["submitter"]);
    let worker = key(&gateway, "w1", &["worker"]);
    let approver = key(&gateway, "alice", &["approver"]);
    let (_, snapshots) = get(&gateway, "/api/v1/policy/snapshots", &agent);
    let initial = Publish {
        version: snapshots["active"]["version"].as_u64().unwrap(),
        hash: snapshots["active"]["hash"].as_str().unwrap().to_owned(),
        ack_ms: 0,
    };
    let history = Arc::new(History::default());
    let deadline = Instant::now() + LOAD;
    let mut threads = Vec::new();

    for p in 0..2 {
        let (history, addr) = (Arc::clone(&history), target.gateways[p % target.gateways.len()].clone());
        threads.push(std::thread::spawn(move || {
            let mut n = 0;
            while let Some(left) = deadline.checked_duration_since(Instant::now()) {
                // Both publishers pause for the same 300 ms of every second: an approval
                // succeeds only when no publish lands between its request and its vote, which
                // on a loaded machine, with publishes every few tens of milliseconds, is rare.
                if left.as_millis() % 1000 < 300 {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
                let (status, body) = post(&addr, "/api/v1/policy/publish", ADMIN, policy(p, n));
                assert_eq!(status, 201, "publish: {body}");
                let ack_ms = now_ms();
                history.publishes.lock().unwrap().push(Publish {
                    version: body["version"].as_u64().unwrap(),
                    hash: body["hash"].as_str().unwrap().to_owned(),
                    ack_ms,
                });
                n += 1;
                std::thread::sleep(Duration::from_millis(30));
            }
        }));
    }
    for s in 0..2 {
        let (history, agent) = (Arc::clone(&history), agent.clone());
        let addr = target.gateways[s % target.gateways.len()].clone();
        threads.push(std::thread::spawn(move || {
            let mut n = 0;
            while Instant::now() < deadline {
                let job = json!({"topic": "infra.vm.create", "env": "dev", "payload": {"s": s, "n": n}});
                let invoke_ms = now_ms();
                let (status, body) = post(&addr, "/api/v1/jobs", &agent, job);
                let snapshot = match status {
                    202 => body["decision"]["snapshot"].as_str(),
                    403 => body["snapshot"].as_str(),
                    // Superseded more often than the retries allow: nothing was decided.
                    503 => None,
                    other => panic!("submit answered {other}: {body}"),
                };
                if let Some(hash) = snapshot {
                    history.decided(format!("submit {status}"), invoke_ms, Snapshot::Hash(hash.to_owned()));
                }
                n += 1;
            }
        }));
    }
    for c in 0..2 {
        let (history, worker) = (Arc::clone(&history), worker.clone());
        let addr = target.schedulers[c % target.schedulers.len()].clone();
        threads.push(std::thread::spawn(move || {
            while Instant::now() < deadline {
                let invoke_ms = now_ms();
                let (status, claim) = post(&addr, "/api/v1/workers/claim", &worker, json!({"wait_ms": 100}));
                match status {
                    200 => {}
                    204 | 503 => continue,
                    other => panic!("claim answered {other}: {claim}"),
                }
                let version = claim["gate_b"]["snapshot_version"].as_u64().unwrap();
                history.decided("lease".into(), invoke_ms, Snapshot::Version(version));
                let id = claim["job_id"].as_str().unwrap();
                let body = json!({"lease_token": claim["lease_token"], "result": {}});
                let (status, done) =
                    post(&addr, &format!("/api/v1/workers/jobs/{id}/complete"), &worker, body);
                assert_eq!(status, 200, "complete: {done}");
            }
        }));
    }
    {
        let (history, agent) = (Arc::clone(&history), agent.clone());
        let addr = target.gateways[0].clone();
        threads.push(std::thread::spawn(move || {
            let mut n = 0;
            while Instant::now() < deadline {
                let job = json!({"topic": "infra.resource.delete", "env": "production", "payload": {"n": n}});
                n += 1;
                let (status, submitted) = post(&addr, "/api/v1/jobs", &agent, job);
                let Some(mut approval) =
                    submitted["approval"]["id"].as_str().filter(|_| status == 202).map(str::to_owned)
                else {
                    continue;
                };
                // A publish since the request makes it stale: its replacement, bound to the
                // snapshot active then, is approved instead (as often as it takes: on a loaded
                // machine a publish often lands between the request and the vote).
                while Instant::now() < deadline {
                    let invoke_ms = now_ms();
                    let (status, body) =
                        post(&addr, &format!("/api/v1/approvals/{approval}/approve"), &approver, json!({}));
                    if status == 200 {
                        let hash = body["approval"]["binding"]["snapshot"].as_str().unwrap().to_owned();
                        history.decided("approval".into(), invoke_ms, Snapshot::Hash(hash));
                        break;
                    }
                    match body["new_approval_id"].as_str() {
                        Some(fresh) if status == 409 => approval = fresh.to_owned(),
                        _ => break,
                    }
                }
            }
        }));
    }
    for t in threads {
        t.join().unwrap();
    }

    let mut publishes = history.publishes.lock().unwrap().clone();
    publishes.push(initial);
    publishes.sort_by_key(|p| p.ack_ms);
    let versions: HashMap<&str, u64> = publishes.iter().map(|p| (p.hash.as_str(), p.version)).collect();
    assert_eq!(versions.len(), publishes.len(), "{what}: every published policy has its own hash");
    // The newest version whose publish was acknowledged strictly before `at`.
    let newest_acked_before = |at: i64| -> u64 {
        publishes.iter().take_while(|p| p.ack_ms < at).map(|p| p.version).max().unwrap_or(0)
    };

    let decided = history.decided.lock().unwrap().clone();
    let mut violations = Vec::new();
    let mut counts: HashMap<String, usize> = HashMap::new();
    for d in &decided {
        *counts.entry(d.what.clone()).or_default() += 1;
        let version = match &d.snapshot {
            Snapshot::Version(v) => *v,
            Snapshot::Hash(h) => *versions.get(h.as_str()).unwrap_or_else(|| panic!("unknown snapshot {h}")),
        };
        let floor = newest_acked_before(d.invoke_ms);
        if version < floor {
            violations.push(format!(
                "{} invoked at {} decided under {version}, {floor} was acknowledged",
                d.what, d.invoke_ms
            ));
        }
    }

    // Every gate decision stored on every job, against the publishes acknowledged before it.
    let mut stored = 0;
    let mut after = String::new();
    loop {
        let (status, page) = get(&gateway, &format!("/api/v1/jobs?limit=500{after}"), &agent);
        assert_eq!(status, 200, "{page}");
        let jobs = page["jobs"].as_array().unwrap();
        for job in jobs {
            let id = job["job_id"].as_str().unwrap();
            let (_, view) = get(&gateway, &format!("/api/v1/jobs/{id}"), &agent);
            for decision in view["gate_decisions"].as_array().unwrap() {
                let (Some(version), Some(at)) =
                    (decision["snapshot_version"].as_u64(), decision["at"].as_i64())
                else {
                    continue;
                };
                stored += 1;
                let floor = newest_acked_before(at);
                if version < floor {
                    violations
                        .push(format!("job {id}: {decision} stamped after version {floor} was acknowledged"));
                }
            }
        }
        match jobs.last() {
            Some(last) if jobs.len() == 500 => after = format!("&after={}", last["job_id"].as_str().unwrap()),
            _ => break,
        }
    }
    eprintln!("{what}: {} publishes, {counts:?}, {stored} stored gate decisions", publishes.len() - 1);
    assert!(
        violations.is_empty(),
        "{what}: {} violations, first: {:#?}",
        violations.len(),
        &violations[..violations.len().min(5)]
    );
    // The history must have exercised what it checks.
    assert!(publishes.len() > 20, "{what}: only {} publishes", publishes.len());
    // An approval succeeds only between two publishes, so there are fewer of them.
    for (kind, least) in [("submit 202", 10), ("submit 403", 10), ("lease", 10), ("approval", 3)] {
        assert!(counts.get(kind).copied().unwrap_or(0) >= least, "{what}: too few `{kind}` in {counts:?}");
    }
    assert!(stored > 100, "{what}: only {stored} stored gate decisions");
}

#[test]
fn embedded_no_decision_commits_under_a_superseded_snapshot() {
    let dir = temp_dir("linearizable");
    let (_server, addr): (Process, String) = support::airlock(
        &["serve", "--listen", "127.0.0.1:0", "--data", dir.to_str().unwrap()],
        &[("AIRLOCK_ADMIN_KEY", ADMIN), ("RUST_LOG", "off")],
    );
    check("embedded", &Target { gateways: vec![addr.clone()], schedulers: vec![addr] });
}

#[test]
fn distributed_no_decision_commits_under_a_superseded_snapshot() {
    let schema = Schema::create("linearizable");
    let stream = BusStream::new("linearizable");
    let config = std::env::temp_dir().join(format!("airlock-linearizable-{}.yaml", std::process::id()));
    std::fs::write(&config, "").unwrap();
    let bus = format!("nats://{NATS}");
    let start = |role: &str| -> Replica {
        replica_with(
            &schema.url(),
            &config,
            ADMIN,
            &["--role", role, "--bus", &bus, "--bus-stream", &stream.name],
        )
    };
    // Declared after `stream`, so stopped before it is deleted.
    let replicas = [start("gateway"), start("gateway"), start("scheduler"), start("scheduler")];
    let addrs: Vec<String> = replicas.iter().map(|r| r.addr.clone()).collect();
    check("distributed", &Target { gateways: addrs[..2].to_vec(), schedulers: addrs[2..].to_vec() });
    drop(replicas);
    let _ = std::fs::remove_file(&config);
}
