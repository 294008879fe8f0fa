//! `airlock serve` through the real binary: the acceptance walk of Gate A (allow, deny,
//! throttle, require_human, self-approval, approval, stale approval, expiry, idempotency,
//! tenancy, audit verify before and after tampering), on the embedded store and on PostgreSQL;
//! graceful shutdown; and a kill -9 under submit load that must lose no acknowledged job or
//! idempotency key.

#![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic, reason = "a test fails by panicking")]

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

mod support;

const ADMIN: &str = "e2e-admin-key-0123456789";

struct Server {
    child: Child,
    url: String,
}

impl Server {
    fn start(data: &Path, extra: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_airlock"))
            .args(["serve", "--listen", "127.0.0.1:0", "--data"])
            .arg(data)
            .args(extra)
            .env("AIRLOCK_ADMIN_KEY", ADMIN)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let line = lines.next().unwrap().unwrap();
        let addr =
            line.strip_prefix("airlock listening on http://").unwrap().split_whitespace().next().unwrap();
        Self { child, url: format!("http://{addr}") }
    }

    fn stop(mut self) {
        // SIGTERM: a graceful stop drains in-flight requests and exits 0.
        Command::new("kill").arg(self.child.id().to_string()).status().unwrap();
        let status = self.child.wait().unwrap();
        assert!(status.success(), "graceful shutdown exits 0, got {status}");
    }

    fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Reply {
    status: u16,
    retry_after: Option<String>,
    replayed: bool,
    body: Value,
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into()
}

fn call(method: &str, url: &str, key: &str, body: Option<String>) -> Result<Reply, ureq::Error> {
    let agent = agent();
    let auth = format!("Bearer {key}");
    let response = match (method, body) {
        ("GET", _) => agent.get(url).header("authorization", &auth).call(),
        (_, Some(body)) => agent
            .post(url)
            .header("authorization", &auth)
            .header("content-type", "application/json")
            .send(body),
        (_, None) => agent.post(url).header("authorization", &auth).send_empty(),
    };
    let mut response = response?;
    let header = |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let (retry_after, replayed) =
        (header("retry-after"), header("idempotent-replayed").as_deref() == Some("true"));
    let status = response.status().as_u16();
    let text = response.body_mut().read_to_string()?;
    Ok(Reply {
        status,
        retry_after,
        replayed,
        body: serde_json::from_str(&text).unwrap_or(Value::String(text)),
    })
}

fn post(s: &Server, path: &str, key: &str, body: Value) -> Reply {
    call("POST", &format!("{}{path}", s.url), key, Some(body.to_string())).unwrap()
}

fn get(s: &Server, path: &str, key: &str) -> Reply {
    call("GET", &format!("{}{path}", s.url), key, None).unwrap()
}

fn key(s: &Server, tenant: &str, name: &str, roles: &[&str]) -> String {
    let r = post(s, "/api/v1/keys", ADMIN, json!({"tenant": tenant, "name": name, "roles": roles}));
    assert_eq!(r.status, 201, "{}", r.body);
    r.body["key"].as_str().unwrap().to_owned()
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("airlock-e2e-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn audit_verify(data: &Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args(["audit", "verify", "--data"])
        .arg(data)
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn gate_a_acceptance_walk_through_the_binary() {
    let data = temp_dir("walk");
    let config = data.join("airlock.yaml");
    std::fs::write(&config, "approvals:\n  ttl_secs: 1\n").unwrap();
    let server = Server::start(&data, &["--config", config.to_str().unwrap()]);
    gate_a_walk(&server);

    server.stop();
    let (ok, report) = audit_verify(&data);
    assert!(ok, "{report}");
    assert!(report.contains("acme: ok"), "{report}");

    let conn = rusqlite::Connection::open(data.join("airlock.db")).unwrap();
    conn.execute("DELETE FROM audit WHERE tenant = 'acme' AND seq = 3", []).unwrap();
    drop(conn);
    let (ok, report) = audit_verify(&data);
    assert!(!ok, "a deleted record must fail verification: {report}");
    assert!(report.contains("acme: BROKEN"), "{report}");
}

/// The same walk in distributed mode, on a PostgreSQL schema of its own.
#[test]
fn gate_a_acceptance_walk_on_postgres() {
    let schema = support::Schema::create("walk");
    let data = temp_dir("walk-postgres");
    let config = data.join("airlock.yaml");
    std::fs::write(&config, "approvals:\n  ttl_secs: 1\n").unwrap();
    let server = Server::start(&data, &["--config", config.to_str().unwrap(), "--store", &schema.url()]);
    gate_a_walk(&server);
    let verified = call("POST", &format!("{}/api/v1/audit/verify", server.url), ADMIN, None).unwrap();
    assert_eq!((verified.status, &verified.body["ok"]), (200, &json!(true)), "{}", verified.body);
    server.stop();
    assert!(schema.count("SELECT COUNT(*) FROM audit WHERE tenant = 'acme'") > 10);
}

/// Gate A's acceptance, through `server`: allow, deny, throttle, require_human, self-approval,
/// tenancy, approval, a stale approval, expiry (the server's approval TTL must be 1 s) and
/// idempotency.
fn gate_a_walk(server: &Server) {
    let acme = key(server, "acme", "agent", &["submitter"]);
    let acme_approver = key(server, "acme", "alice", &["approver"]);
    let globex = key(server, "globex", "agent", &["submitter", "approver"]);

    let allow = post(server, "/api/v1/jobs", &acme, json!({"topic": "infra.vm.create", "env": "production"}));
    assert_eq!((allow.status, allow.body["state"].as_str()), (202, Some("queued")));

    let deny = post(
        server,
        "/api/v1/jobs",
        &acme,
        json!({"topic": "infra.security_group.update", "env": "production", "payload": {"cidr": "0.0.0.0/0"}}),
    );
    assert_eq!((deny.status, deny.body["rule_ids"][0].as_str()), (403, Some("deny-prod-public-ingress")));

    let recreate = json!({"topic": "infra.cluster.recreate", "env": "production"});
    assert_eq!(post(server, "/api/v1/jobs", &acme, recreate.clone()).status, 202);
    let throttled = post(server, "/api/v1/jobs", &acme, recreate);
    assert_eq!(throttled.status, 429);
    assert!(throttled.retry_after.unwrap().parse::<u64>().unwrap() > 0);

    let delete = json!({"topic": "infra.resource.delete", "env": "production", "payload": {"id": "db-1"}});
    let human = post(server, "/api/v1/jobs", &acme, delete.clone());
    assert_eq!((human.status, human.body["state"].as_str()), (202, Some("awaiting_approval")));
    let approval = human.body["approval"]["id"].as_str().unwrap().to_owned();

    // Self-approval: globex's key is both submitter and approver, in its own tenant.
    let own = post(server, "/api/v1/jobs", &globex, delete.clone());
    let own_approval = own.body["approval"]["id"].as_str().unwrap();
    let refused = post(server, &format!("/api/v1/approvals/{own_approval}/approve"), &globex, json!({}));
    assert_eq!((refused.status, refused.body["error"].as_str()), (403, Some("self_approval")));

    // Cross-tenant: globex cannot see or approve acme's job.
    let job_id = human.body["job_id"].as_str().unwrap();
    assert_eq!(get(server, &format!("/api/v1/jobs/{job_id}"), &globex).status, 404);
    assert_eq!(
        post(server, &format!("/api/v1/approvals/{approval}/approve"), &globex, json!({})).status,
        404
    );

    let approved = post(server, &format!("/api/v1/approvals/{approval}/approve"), &acme_approver, json!({}));
    assert_eq!(
        (approved.status, approved.body["job_state"].as_str()),
        (200, Some("queued")),
        "{}",
        approved.body
    );

    // A publish between request and approval: 409 with the reason and the current decision.
    let pending = post(server, "/api/v1/jobs", &acme, delete.clone());
    let pending_approval = pending.body["approval"]["id"].as_str().unwrap().to_owned();
    let v2 = include_str!("../../../examples/policies/seed.yaml")
        .replace("reason: public ingress", "reason: v2 public ingress");
    let published = call("POST", &format!("{}/api/v1/policy/publish", server.url), ADMIN, Some(v2)).unwrap();
    assert_eq!(published.status, 201, "{}", published.body);
    let stale =
        post(server, &format!("/api/v1/approvals/{pending_approval}/approve"), &acme_approver, json!({}));
    assert_eq!((stale.status, stale.body["error"].as_str()), (409, Some("approval_stale")), "{}", stale.body);
    assert_eq!(stale.body["current_decision"]["decision"], "require_human");

    // Expiry: the TTL is 1 s and the server sweeps every second.
    let expiring = post(server, "/api/v1/jobs", &acme, delete);
    let expiring_id = expiring.body["job_id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let state = get(server, &format!("/api/v1/jobs/{expiring_id}"), &acme).body["state"].clone();
        if state == "expired" {
            break;
        }
        assert!(Instant::now() < deadline, "the job never expired: {state}");
        std::thread::sleep(Duration::from_millis(100));
    }

    // Idempotency: replay, then 409 on a different job under the same key.
    let keyed = json!({"topic": "infra.vm.create", "env": "staging", "idempotency_key": "deploy-7"});
    let first = post(server, "/api/v1/jobs", &acme, keyed.clone());
    let replay = post(server, "/api/v1/jobs", &acme, keyed);
    assert!(replay.replayed && replay.body == first.body && replay.status == 202);
    let reused = post(
        server,
        "/api/v1/jobs",
        &acme,
        json!({"topic": "infra.vm.create", "env": "dev", "idempotency_key": "deploy-7"}),
    );
    assert_eq!((reused.status, reused.body["error"].as_str()), (409, Some("idempotency_key_reused")));
}

#[test]
fn kill_9_under_submit_load_loses_no_acknowledged_job() {
    let data = temp_dir("kill9");
    let server = Server::start(&data, &[]);
    let submitter = key(&server, "acme", "agent", &["submitter"]);
    let acknowledged: Arc<Mutex<Vec<(String, String, Value)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for t in 0..8 {
        let (url, key, acknowledged, stop) =
            (server.url.clone(), submitter.clone(), Arc::clone(&acknowledged), Arc::clone(&stop));
        threads.push(std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let idempotency_key = format!("t{t}-n{n}");
                let body = json!({"topic": "infra.vm.create", "env": "dev", "payload": {"n": n}, "idempotency_key": idempotency_key});
                match call("POST", &format!("{url}/api/v1/jobs"), &key, Some(body.to_string())) {
                    Ok(r) if r.status == 202 => {
                        let id = r.body["job_id"].as_str().unwrap().to_owned();
                        acknowledged.lock().unwrap().push((id, idempotency_key, body));
                    }
                    Ok(r) => panic!("unexpected {}: {}", r.status, r.body),
                    Err(_) => break, // the server died mid-request: this job was never acknowledged
                }
                n += 1;
            }
        }));
    }
    std::thread::sleep(Duration::from_millis(1500));
    server.kill9();
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let acknowledged = acknowledged.lock().unwrap().clone();
    assert!(acknowledged.len() >= 20, "the load was too light to mean anything: {}", acknowledged.len());

    let server = Server::start(&data, &[]);
    for (id, _, _) in &acknowledged {
        let r = get(&server, &format!("/api/v1/jobs/{id}"), &submitter);
        assert_eq!(r.status, 200, "acknowledged job {id} was lost");
    }
    for (id, _, body) in acknowledged.iter().step_by(7) {
        let r = post(&server, "/api/v1/jobs", &submitter, body.clone());
        assert!(
            r.replayed && r.body["job_id"] == id.as_str(),
            "idempotency key of {id} was lost: {}",
            r.body
        );
    }
    server.stop();
    let (ok, report) = audit_verify(&data);
    assert!(ok, "the audit chain survives kill -9: {report}");
}
