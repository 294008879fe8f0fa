//! `airlock demo`: one command, no setup. It starts Airlock in embedded mode in this process
//! (a fresh SQLite file, a loopback port), acts as agent, approver and worker over the real
//! HTTP API, and narrates each case of the dual-gate model. Every step checks its outcome;
//! any surprise exits 1.

#![expect(
    clippy::indexing_slicing,
    reason = "only serde_json::Value is indexed, which yields Null and never panics"
)]

use std::process::ExitCode;
use std::time::Duration;

use airlock_core::breaker::BreakerConfig;
use airlock_core::dispatch::Caps;
use airlock_policy::glob::Glob;
use airlock_server::state::{AppState, Config, FailMode, FailModes, Fault};
use serde_json::{Value, json};

use crate::inproc::{self, ADMIN, SEED};

struct Http {
    base: String,
    agent: ureq::Agent,
}

impl Http {
    fn call(
        &self,
        method: &str,
        path: &str,
        key: &str,
        body: Option<String>,
    ) -> Result<(u16, Value), String> {
        let url = format!("{}{path}", self.base);
        let auth = format!("Bearer {key}");
        let response = match (method, body) {
            ("GET", _) => self.agent.get(&url).header("authorization", &auth).call(),
            (_, Some(body)) => self
                .agent
                .post(&url)
                .header("authorization", &auth)
                .header("content-type", "application/json")
                .send(body),
            (_, None) => self.agent.post(&url).header("authorization", &auth).send_empty(),
        };
        let mut response = response.map_err(|e| format!("{method} {path}: {e}"))?;
        let status = response.status().as_u16();
        let text = response.body_mut().read_to_string().map_err(|e| e.to_string())?;
        Ok((status, serde_json::from_str(&text).unwrap_or(Value::String(text))))
    }

    fn post(&self, path: &str, key: &str, body: Value) -> Result<(u16, Value), String> {
        self.call("POST", path, key, Some(body.to_string()))
    }

    fn get(&self, path: &str, key: &str) -> Result<(u16, Value), String> {
        self.call("GET", path, key, None)
    }
}

/// The keys of the demo tenant.
struct Keys {
    agent: String,
    alice: String,
    worker: String,
}

fn expect(ok: bool, what: &str) -> Result<(), String> {
    if ok { Ok(()) } else { Err(format!("unexpected outcome: {what}")) }
}

fn text(v: &Value) -> &str {
    v.as_str().unwrap_or("?")
}

pub fn run() -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match demo(&runtime) {
        Ok(()) => {
            println!("\nDemo complete: every case behaved as the spec says.");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("\ndemo failed: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Starts an in-process server; returns its state and a client for it.
fn start(runtime: &tokio::runtime::Runtime, name: &str, config: Config) -> Result<(AppState, Http), String> {
    let server = inproc::start(runtime, &format!("demo-{name}"), SEED, config)?;
    println!("  airlock serving on http://{}, data in {}", server.addr, server.dir.display());
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into();
    Ok((server.state, Http { base: format!("http://{}", server.addr), agent }))
}

fn keys(http: &Http) -> Result<Keys, String> {
    let make = |name: &str, roles: Value| -> Result<String, String> {
        let (status, body) =
            http.post("/api/v1/keys", ADMIN, json!({"tenant": "acme", "name": name, "roles": roles}))?;
        expect(status == 201, &format!("creating key {name}: {status} {body}"))?;
        Ok(text(&body["key"]).to_owned())
    };
    Ok(Keys {
        agent: make("infra-agent", json!(["submitter", "operator"]))?,
        alice: make("alice", json!(["approver"]))?,
        worker: make("worker-1", json!(["worker"]))?,
    })
}

fn submit(http: &Http, k: &Keys, job: Value) -> Result<(u16, Value), String> {
    let (status, body) = http.post("/api/v1/jobs", &k.agent, job.clone())?;
    let outcome = match status {
        202 => format!("202 {} ({})", text(&body["state"]), text(&body["decision"]["decision"])),
        403 => format!("403 denied by {}", body["rule_ids"]),
        429 => format!("429 throttled by {}; retry after {} s", body["rule_ids"], body["retry_after_secs"]),
        other => format!("{other} {}", text(&body["error"])),
    };
    println!("  agent submits {} in {:<11} → {outcome}", text(&job["topic"]), text(&job["env"]));
    Ok((status, body))
}

/// The worker claims once; completes what it gets. Returns the job id leased, if any.
fn work(http: &Http, k: &Keys) -> Result<Option<String>, String> {
    let (status, claim) = http.post("/api/v1/workers/claim", &k.worker, json!({"wait_ms": 0}))?;
    if status == 204 {
        println!("  worker claims                          → nothing dispatchable");
        return Ok(None);
    }
    expect(status == 200, &format!("claim answered {status}: {claim}"))?;
    let id = text(&claim["job_id"]).to_owned();
    let gate = &claim["gate_b"];
    let how = if gate["bypassed"] == true {
        "safety unavailable, dispatched by fail-open (bypass counted)".to_owned()
    } else {
        format!("Gate B: {} under snapshot v{}", text(&gate["decision"]), gate["snapshot_version"])
    };
    println!("  worker claims {id} → {how}; leased, attempt {}", claim["attempt"]);
    let token = text(&claim["lease_token"]).to_owned();
    let (status, done) = http.post(
        &format!("/api/v1/workers/jobs/{id}/complete"),
        &k.worker,
        json!({"lease_token": token, "result": {"ok": true}}),
    )?;
    expect(status == 200 && done["state"] == "succeeded", &format!("complete answered {status}: {done}"))?;
    println!("  worker completes it                    → succeeded");
    Ok(Some(id))
}

fn state_of(http: &Http, k: &Keys, id: &str) -> Result<String, String> {
    let (_, job) = http.get(&format!("/api/v1/jobs/{id}"), &k.agent)?;
    Ok(text(&job["state"]).to_owned())
}

fn publish(http: &Http, policy: &str, what: &str) -> Result<(), String> {
    let (status, body) = http.call("POST", "/api/v1/policy/publish", ADMIN, Some(policy.to_owned()))?;
    expect(status == 201, &format!("publish answered {status}: {body}"))?;
    println!("  admin publishes snapshot v{} ({what})", body["version"]);
    Ok(())
}

fn approve(http: &Http, k: &Keys, approval: &str) -> Result<(u16, Value), String> {
    let (status, body) = http.post(&format!("/api/v1/approvals/{approval}/approve"), &k.alice, json!({}))?;
    let outcome = if status == 200 {
        format!("approved; job {}", text(&body["job_state"]))
    } else {
        format!("{status} {}", text(&body["error"]))
    };
    println!("  alice approves {approval} → {outcome}");
    Ok((status, body))
}

fn metric(http: &Http, line_start: &str) -> Result<f64, String> {
    let (_, text) = http.get("/metrics", "none")?;
    Ok(text
        .as_str()
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0))
}

fn demo(runtime: &tokio::runtime::Runtime) -> Result<(), String> {
    println!("Airlock demo: two gates between autonomous agents and production.\n");
    println!("Starting Airlock (embedded mode: one process, one SQLite file) with the seed policy:");
    println!(
        "  deny public ingress in production; a human for production deletes; throttle cluster recreates."
    );
    let config = Config {
        breaker: BreakerConfig { failures_to_open: 3, open_ms: 1_000, probes: 3 },
        caps: Caps { backoff_base_ms: 50, backoff_cap_ms: 200, ..Caps::default() },
        ..Config::default()
    };
    let (state, http) = start(runtime, "closed", config)?;
    let k = keys(&http)?;

    println!("\n1. An allowed job runs.");
    let (_, body) =
        submit(&http, &k, json!({"topic": "infra.vm.create", "env": "staging", "idempotency_key": "vm-1"}))?;
    let id = work(&http, &k)?;
    expect(id.as_deref() == body["job_id"].as_str(), "the worker ran the allowed job")?;

    println!("\n2. A denied job never enters the queue (Gate A).");
    let (status, _) = submit(
        &http,
        &k,
        json!({"topic": "infra.security_group.update", "env": "production", "payload": {"cidr": "0.0.0.0/0"}}),
    )?;
    expect(status == 403, "public ingress is denied")?;

    println!("\n3. A throttled topic: the budget admits one per 10 minutes.");
    let (first, _) = submit(&http, &k, json!({"topic": "infra.cluster.recreate", "env": "production"}))?;
    let (second, _) = submit(&http, &k, json!({"topic": "infra.cluster.recreate", "env": "production"}))?;
    expect(first == 202 && second == 429, "one admitted, the excess refused with Retry-After")?;
    work(&http, &k)?;

    println!("\n4. A production delete waits for a human, then runs.");
    let (_, body) = submit(
        &http,
        &k,
        json!({"topic": "infra.resource.delete", "env": "production", "payload": {"id": "db-7"}}),
    )?;
    let (delete, approval) = (text(&body["job_id"]).to_owned(), text(&body["approval"]["id"]).to_owned());
    expect(work(&http, &k)?.is_none(), "nothing runs before the approval")?;
    approve(&http, &k, &approval)?;
    expect(work(&http, &k)?.as_deref() == Some(delete.as_str()), "the approved delete runs")?;

    println!("\n5. The policy turns to deny between submit and dispatch: Gate B catches it.");
    let (_, body) = submit(&http, &k, json!({"topic": "infra.dns.record.update", "env": "production"}))?;
    let dns = text(&body["job_id"]).to_owned();
    let v2 = format!(
        "{SEED}  - id: freeze-dns\n    when: {{ topic: infra.dns.record.update }}\n    decision: deny\n    reason: DNS change freeze\n"
    );
    publish(&http, &v2, "adds a DNS change freeze")?;
    expect(work(&http, &k)?.is_none(), "the worker is never handed the job")?;
    let dns_state = state_of(&http, &k, &dns)?;
    println!(
        "  job {dns} is now `{dns_state}`: denied at dispatch, under the snapshot active at that moment"
    );
    expect(dns_state == "denied", "Gate B denied the job")?;

    println!("\n6. An approval goes stale when the policy changes before dispatch.");
    let (_, body) = submit(
        &http,
        &k,
        json!({"topic": "infra.resource.delete", "env": "production", "payload": {"id": "vm-9"}}),
    )?;
    let (stale_job, approval) = (text(&body["job_id"]).to_owned(), text(&body["approval"]["id"]).to_owned());
    approve(&http, &k, &approval)?;
    publish(
        &http,
        &v2.replace("DNS change freeze", "DNS change freeze (extended)"),
        "edits a reason: a new snapshot hash",
    )?;
    expect(work(&http, &k)?.is_none(), "the stale approval does not dispatch")?;
    let (_, job) = http.get(&format!("/api/v1/jobs/{stale_job}"), &k.agent)?;
    let (_, snapshots) = http.get("/api/v1/policy/snapshots", &k.agent)?;
    let bound = text(&job["approval"]["binding"]["snapshot"]);
    println!(
        "  job is back to `{}`; the old approval is recorded as stale, a new request {} is bound to snapshot v{} ({}…)",
        text(&job["state"]),
        text(&job["approval"]["id"]),
        snapshots["active"]["version"],
        bound.get(..15).unwrap_or(bound)
    );
    expect(bound == text(&snapshots["active"]["hash"]), "the new request is bound to the active snapshot")?;
    expect(job["state"] == "awaiting_approval", "back to awaiting approval")?;
    approve(&http, &k, text(&job["approval"]["id"]))?;
    expect(
        work(&http, &k)?.as_deref() == Some(stale_job.as_str()),
        "re-approved under the new snapshot, it runs",
    )?;

    println!("\n7. The safety check goes down; fail mode `closed` (the default).");
    state.safety().inject(Some(Fault::Unavailable));
    println!("  (safety service unavailable)");
    let (_, a) =
        submit(&http, &k, json!({"topic": "infra.vm.create", "env": "staging", "payload": {"n": 1}}))?;
    expect(a["error"] == "safety_unavailable", "Gate A fails closed: 503, nothing stored")?;
    state.safety().inject(None);
    let (_, a) =
        submit(&http, &k, json!({"topic": "infra.vm.create", "env": "staging", "payload": {"n": 2}}))?;
    let (_, b) =
        submit(&http, &k, json!({"topic": "infra.vm.create", "env": "staging", "payload": {"n": 3}}))?;
    state.safety().inject(Some(Fault::Unavailable));
    println!("  (safety service unavailable again, with two jobs queued)");
    for _ in 0..4 {
        expect(work(&http, &k)?.is_none(), "nothing is dispatched without a decision")?;
        std::thread::sleep(Duration::from_millis(220));
    }
    let circuit = metric(&http, "airlock_safety_circuit_state")?;
    println!(
        "  circuit breaker: {} after 3 consecutive failures (airlock_safety_circuit_state {circuit})",
        if circuit == 2.0 { "open" } else { "not open" }
    );
    expect(circuit == 2.0, "the breaker opened")?;
    let attempts = metric(&http, "airlock_scheduling_attempts_total")?;
    println!(
        "  jobs wait in the queue with backoff; scheduling attempts counted: {attempts} (cap 50, then the DLQ)"
    );
    std::thread::sleep(Duration::from_millis(1_100));
    state.safety().inject(None);
    println!("  (safety service recovers; the breaker half-opens and admits at most 3 probes)");
    let mut done = Vec::new();
    for _ in 0..20 {
        if let Some(id) = work(&http, &k)? {
            done.push(id);
        }
        if done.len() == 2 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    expect(
        done.contains(&text(&a["job_id"]).to_owned()) && done.contains(&text(&b["job_id"]).to_owned()),
        "both jobs completed after recovery",
    )?;
    println!(
        "  circuit breaker: closed again (airlock_safety_circuit_state {})",
        metric(&http, "airlock_safety_circuit_state")?
    );

    println!(
        "\n8. The same outage with fail mode `open` for low-risk `infra.vm.*` topics (a second Airlock)."
    );
    let open_config = Config {
        gate_b_fail: FailModes {
            topics: vec![(Glob::new("infra.vm.*").map_err(|e| e.to_string())?, FailMode::Open)],
            ..FailModes::default()
        },
        ..Config::default()
    };
    let (open_state, open_http) = start(runtime, "open", open_config)?;
    let ko = keys(&open_http)?;
    submit(&open_http, &ko, json!({"topic": "infra.vm.create", "env": "staging", "payload": {"n": 4}}))?;
    open_state.safety().inject(Some(Fault::Unavailable));
    println!("  (safety service unavailable)");
    expect(work(&open_http, &ko)?.is_some(), "fail open dispatches")?;
    let bypassed = metric(&open_http, "airlock_scheduler_input_fail_open_total")?;
    println!(
        "  airlock_scheduler_input_fail_open_total{{topic=\"infra.vm.create\"}} = {bypassed}: the seed's alert fires on this"
    );
    expect(bypassed == 1.0, "the bypass is counted")?;

    println!("\n9. The audit trail: every decision and transition, hash-chained per tenant.");
    let (_, verify) = http.call("POST", "/api/v1/audit/verify", ADMIN, None)?;
    for t in verify["tenants"].as_array().into_iter().flatten() {
        println!(
            "  tenant {}: {} records, chain {}",
            text(&t["tenant"]),
            t["records"],
            if t["ok"] == true { "verifies" } else { "BROKEN" }
        );
    }
    expect(verify["ok"] == true, "the audit chains verify")?;
    Ok(())
}
