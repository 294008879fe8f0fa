//! Why this exists: a distributed deployment must ride out its database restarting. A throwaway
//! PostgreSQL 15 cluster (initdb on a random port, removed at the end) backs two `airlock serve
//! --store postgres://…` replicas under submit and worker load; PostgreSQL is restarted with
//! `pg_ctl stop -m immediate`, kept down 2 s, and started again on the same port in the middle. Requests during the outage may fail (503
//! `store_unavailable`), but both replicas answer 202 again afterwards without being restarted,
//! every acknowledged job exists and ends succeeded (once), an acknowledged idempotency key
//! replays its job, and the audit chain verifies. Needs the PostgreSQL 15 server binaries in
//! /usr/lib/postgresql/15/bin (or `AIRLOCK_TEST_PG_BIN`): fails without them when `CI=true`.

#![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic, reason = "a test fails by panicking")]

mod support;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{Replica, replica, try_metric};

const ADMIN: &str = "postgres-restart-admin-key-0123456789";

/// How long PostgreSQL stays down during the restart.
const DOWN: Duration = Duration::from_secs(2);

fn pg_bin() -> PathBuf {
    std::env::var_os("AIRLOCK_TEST_PG_BIN")
        .map_or_else(|| PathBuf::from("/usr/lib/postgresql/15/bin"), PathBuf::from)
}

/// Whether this process runs as root (initdb refuses root: run the server as `postgres` then).
fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// A throwaway PostgreSQL cluster: its directory (data, socket, log) and port. Stopped
/// (immediate) and removed when dropped.
struct Cluster {
    dir: PathBuf,
    port: u16,
    as_postgres: bool,
}

impl Cluster {
    /// `None` (after saying why) when the server binaries are missing outside CI.
    fn start() -> Option<Self> {
        let bin = pg_bin();
        let missing: Vec<_> =
            ["initdb", "pg_ctl", "postgres"].into_iter().filter(|b| !bin.join(b).is_file()).collect();
        if !missing.is_empty() {
            let message = format!(
                "the PostgreSQL restart test needs the PostgreSQL 15 server binaries {missing:?} in {} \
                 (install postgresql-15, or set AIRLOCK_TEST_PG_BIN)",
                bin.display()
            );
            assert!(!std::env::var("CI").is_ok_and(|v| v == "true"), "{message}");
            eprintln!("SKIPPED: {message}");
            return None;
        }
        let as_postgres = is_root();
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
        let dir = std::env::temp_dir().join(format!("airlock-pg-restart-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        // From here on the guard stops whatever started and removes the directory.
        let cluster = Self { dir, port, as_postgres };
        if as_postgres {
            let status = Command::new("chown").arg("postgres").arg(&cluster.dir).status();
            assert!(status.is_ok_and(|s| s.success()), "cannot chown {} to postgres", cluster.dir.display());
        }
        let data = cluster.data();
        let out = cluster
            .pg("initdb")
            .arg("-D")
            .arg(&data)
            .args(["-A", "trust", "-U", "postgres", "--no-sync"])
            .output()
            .unwrap();
        assert!(out.status.success(), "initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        let out = cluster.pg_ctl("start").output().unwrap();
        assert!(
            out.status.success(),
            "pg_ctl start failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            cluster.log()
        );
        Some(cluster)
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// A PostgreSQL program, run as `postgres` when this process is root.
    fn pg(&self, program: &str) -> Command {
        let path = pg_bin().join(program);
        if self.as_postgres {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(path);
            command
        } else {
            Command::new(path)
        }
    }

    /// `pg_ctl ACTION -m immediate -w` on this cluster (same port, socket and log).
    fn pg_ctl(&self, action: &str) -> Command {
        let mut command = self.pg("pg_ctl");
        command
            .arg("-D")
            .arg(self.data())
            .arg("-o")
            .arg(format!(
                "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=100 -c fsync=off",
                self.port,
                self.dir.display()
            ))
            .arg("-l")
            .arg(self.dir.join("log"))
            .arg(action)
            .args(["-m", "immediate", "-w", "-t", "30"]);
        command.stdout(Stdio::null());
        command
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.data().join("postmaster.pid").exists() {
            let _ = self.pg_ctl("stop").stderr(Stdio::null()).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// An HTTP call with a short timeout; `None` when the replica could not be reached in time.
fn call(addr: &str, path: &str, key: &str, body: Option<String>) -> Option<(u16, Value)> {
    support::try_call(addr, path, key, body.as_deref(), Duration::from_secs(3))
}

/// Calls `addr` until it answers other than 503 or a transport failure, for up to 20 s.
fn call_until(addr: &str, path: &str, key: &str, body: Option<&str>) -> (u16, Value) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(answer) = call(addr, path, key, body.map(str::to_owned))
            && answer.0 != 503
        {
            return answer;
        }
        assert!(Instant::now() < deadline, "{addr} did not answer {path} for 20 s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What one submitter saw.
#[derive(Default)]
struct Seen {
    /// idempotency key → (job id, request body) of every 202.
    accepted: HashMap<String, (String, String)>,
    /// (when, replica index) of every 202.
    acks: Vec<(Instant, usize)>,
    /// 503 answers (with their error codes) and transport failures.
    unavailable: HashMap<String, usize>,
}

#[test]
fn postgres_restarted_under_load_loses_nothing_acknowledged() {
    let Some(cluster) = Cluster::start() else { return };
    let config = cluster.dir.join("airlock.yaml");
    // Short leases, so that a lease whose complete was lost to the outage comes back within the
    // test; more execution attempts than the outage can use up.
    std::fs::write(
        &config,
        "leases: { lease_ms: 2000, heartbeat_ms: 500 }\nexecution: { attempts_max: 10 }\n",
    )
    .unwrap();
    let url = cluster.url();
    let replicas: Vec<Replica> = (0..2).map(|_| replica(&url, &config, ADMIN)).collect();
    let addrs: Arc<Vec<String>> = Arc::new(replicas.iter().map(|r| r.addr.clone()).collect());

    let key = |name: &str, roles: &[&str]| {
        let body = json!({"tenant": "acme", "name": name, "roles": roles}).to_string();
        let (status, reply) = call_until(&addrs[0], "/api/v1/keys", ADMIN, Some(&body));
        assert_eq!(status, 201, "{reply}");
        reply["key"].as_str().unwrap().to_owned()
    };
    let agent = key("agent", &["submitter"]);
    let worker = key("worker", &["worker"]);

    let stop_submitting = Arc::new(AtomicBool::new(false));
    let stop_working = Arc::new(AtomicBool::new(false));
    let submitters: Vec<_> = (0..3)
        .map(|t| {
            let (addrs, agent, stop) = (Arc::clone(&addrs), agent.clone(), Arc::clone(&stop_submitting));
            std::thread::spawn(move || {
                let mut seen = Seen::default();
                let mut n = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let key = format!("t{t}-{n}");
                    let body = json!({"topic": "infra.vm.create", "env": "dev", "idempotency_key": key,
                                      "payload": {"n": n, "t": t}})
                    .to_string();
                    // The same key, alternating replicas, until one answers 202 or 2 s have
                    // passed (then the key is abandoned: it was never acknowledged).
                    let deadline = Instant::now() + Duration::from_secs(2);
                    let mut turn = n;
                    while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
                        turn += 1;
                        let replica = turn % addrs.len();
                        match call(&addrs[replica], "/api/v1/jobs", &agent, Some(body.clone())) {
                            Some((202, reply)) => {
                                let id = reply["job_id"].as_str().unwrap().to_owned();
                                if let Some((before, _)) =
                                    seen.accepted.insert(key.clone(), (id.clone(), body.clone()))
                                {
                                    assert_eq!(before, id, "one idempotency key, two jobs");
                                }
                                seen.acks.push((Instant::now(), replica));
                                break;
                            }
                            Some((503, reply)) => {
                                let code = reply["error"].as_str().or(reply["code"].as_str()).unwrap_or("?");
                                *seen.unavailable.entry(format!("503 {code}")).or_default() += 1;
                            }
                            Some((status, reply)) if status < 500 => {
                                panic!("submit {key} answered {status}: {reply}")
                            }
                            Some((status, _)) => {
                                *seen.unavailable.entry(format!("{status}")).or_default() += 1
                            }
                            None => *seen.unavailable.entry("transport".into()).or_default() += 1,
                        }
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                seen
            })
        })
        .collect();
    let claim_failures = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..2)
        .map(|w| {
            let (addrs, worker, stop, failures) =
                (Arc::clone(&addrs), worker.clone(), Arc::clone(&stop_working), Arc::clone(&claim_failures));
            std::thread::spawn(move || {
                // (job id, lease token) of every complete answered 200.
                let mut completed: Vec<(String, String)> = Vec::new();
                let mut turn = w;
                while !stop.load(Ordering::Relaxed) {
                    turn += 1;
                    let addr = &addrs[turn % addrs.len()];
                    let claim = call(
                        addr,
                        "/api/v1/workers/claim",
                        &worker,
                        Some(json!({"wait_ms": 300}).to_string()),
                    );
                    let (id, token) = match claim {
                        Some((200, claim)) => (
                            claim["job_id"].as_str().unwrap().to_owned(),
                            claim["lease_token"].as_str().unwrap().to_owned(),
                        ),
                        Some((204, _)) => continue,
                        _ => {
                            failures.fetch_add(1, Ordering::Relaxed);
                            std::thread::sleep(Duration::from_millis(50));
                            continue;
                        }
                    };
                    let body = json!({"lease_token": token, "result": {"ok": true}}).to_string();
                    // After a lost answer the first try may have committed, so a refusal then
                    // is expected; if nothing committed, the lease lapses and the job comes back.
                    for i in 0..20 {
                        let addr = &addrs[(turn + i) % addrs.len()];
                        match call(
                            addr,
                            &format!("/api/v1/workers/jobs/{id}/complete"),
                            &worker,
                            Some(body.clone()),
                        ) {
                            Some((200, _)) => {
                                completed.push((id, token));
                                break;
                            }
                            Some((status, _)) if status < 500 => break,
                            _ => std::thread::sleep(Duration::from_millis(100)),
                        }
                    }
                }
                completed
            })
        })
        .collect();

    // Load for ~10 s; at ~4 s PostgreSQL is stopped in immediate mode (no checkpoint: crash
    // recovery on start), kept down for 2 s so the outage is felt, and started again on the
    // same port.
    let load = Instant::now();
    std::thread::sleep(Duration::from_secs(4));
    let restart_began = Instant::now();
    let out = cluster.pg_ctl("stop").output().unwrap();
    assert!(out.status.success(), "pg_ctl stop failed: {}", String::from_utf8_lossy(&out.stderr));
    std::thread::sleep(DOWN);
    let out = cluster.pg_ctl("start").output().unwrap();
    let restarted = Instant::now();
    assert!(
        out.status.success(),
        "pg_ctl start (after the stop) failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        cluster.log()
    );
    let restart_took = restarted - restart_began;
    while load.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
    }
    stop_submitting.store(true, Ordering::Relaxed);
    let mut seen = Seen::default();
    for s in submitters {
        let part = s.join().unwrap();
        seen.accepted.extend(part.accepted);
        seen.acks.extend(part.acks);
        for (k, v) in part.unavailable {
            *seen.unavailable.entry(k).or_default() += v;
        }
    }

    // Both replicas answered 202 after the restart, on their own.
    let first_ack_after = |replica: usize| {
        seen.acks.iter().filter(|(at, r)| *r == replica && *at > restarted).map(|(at, _)| *at).min()
    };
    let recovered: Vec<Duration> = (0..addrs.len())
        .map(|r| {
            let at = first_ack_after(r).unwrap_or_else(|| {
                panic!(
                    "replica {r} answered no 202 after PostgreSQL restarted (failures: {:?})",
                    seen.unavailable
                )
            });
            at - restarted
        })
        .collect();
    let acks_during = seen.acks.iter().filter(|(at, _)| *at > restart_began && *at < restarted).count();

    // Drain: workers keep going until nothing is queued or leased (lapsed leases come back).
    let drain = Instant::now();
    while drain.elapsed() < Duration::from_secs(20) {
        let queued = try_metric(&addrs[0], "airlock_jobs{state=\"queued\"}");
        let leased = try_metric(&addrs[0], "airlock_jobs{state=\"leased\"}");
        if queued == Some(0.0) && leased == Some(0.0) {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let drain_took = drain.elapsed();
    stop_working.store(true, Ordering::Relaxed);
    let mut completes: HashMap<String, Vec<String>> = HashMap::new();
    for w in workers {
        for (id, token) in w.join().unwrap() {
            completes.entry(id).or_default().push(token);
        }
    }

    // Every acknowledged job exists, succeeded, and succeeded once.
    for (key, (id, _)) in &seen.accepted {
        let (status, job) = call_until(&addrs[0], &format!("/api/v1/jobs/{id}"), &agent, None);
        assert_eq!(status, 200, "acknowledged job {id} ({key}) is missing: {job}");
        let succeeded = job["history"].as_array().unwrap().iter().filter(|t| t["to"] == "succeeded").count();
        assert_eq!(
            job["state"], "succeeded",
            "acknowledged job {id} ({key}) did not succeed after the drain: {job}"
        );
        assert_eq!(succeeded, 1, "job {id} has {succeeded} succeeded transitions: {job}");
    }
    for (id, tokens) in &completes {
        assert_eq!(tokens.len(), 1, "job {id} was completed {} times", tokens.len());
    }

    // An acknowledged key submitted again replays its job, on either replica; including keys
    // acknowledged just before and just after the restart.
    let mut keys: Vec<_> = seen.accepted.iter().collect();
    keys.sort_by_key(|(k, _)| (*k).clone());
    for (i, (key, (id, body))) in keys.iter().enumerate().filter(|(i, _)| i % 5 == 0) {
        let (status, reply) = call_until(&addrs[i % addrs.len()], "/api/v1/jobs", &agent, Some(body));
        assert!(matches!(status, 200 | 202), "replaying {key} answered {status}: {reply}");
        assert_eq!(reply["job_id"].as_str(), Some(id.as_str()), "replaying {key} gave another job: {reply}");
    }

    let (status, verify) = call_until(&addrs[1], "/api/v1/audit/verify", ADMIN, Some(""));
    assert_eq!((status, &verify["ok"]), (200, &json!(true)), "the audit chain does not verify: {verify}");

    let failed: usize = seen.unavailable.values().sum();
    eprintln!(
        "postgres restart test: restart took {:.2} s; {} jobs acknowledged ({acks_during} while restarting), \
         {failed} submit attempts failed {:?}, {} claim failures; first 202 after the restart per replica \
         {:?}; drain {:.1} s; {} completes answered 200",
        restart_took.as_secs_f64(),
        seen.accepted.len(),
        seen.unavailable,
        claim_failures.load(Ordering::Relaxed),
        recovered.iter().map(|d| format!("{:.2} s", d.as_secs_f64())).collect::<Vec<_>>(),
        drain_took.as_secs_f64(),
        completes.len(),
    );
    // The outage was felt, and answered as such: 503 `store_unavailable`, never a hang
    // (transport timeout) or another error.
    assert!(failed > 0, "no submit failed while PostgreSQL was down for {DOWN:?}");
    assert!(
        seen.unavailable.keys().all(|k| k == "503 store_unavailable"),
        "submits failed other than with 503 store_unavailable: {:?}",
        seen.unavailable
    );
    assert!(seen.accepted.len() >= 50, "too little load: {} jobs acknowledged", seen.accepted.len());
    drop(replicas);
}
