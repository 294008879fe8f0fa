//! Long-poll claims through the real binary (issue 11): a waiting claim is woken by new work
//! and by a job coming due, not by polling the store every 200 ms, and one key keeps at most
//! its cap of claims waiting.

#![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic, reason = "a test fails by panicking")]

use std::time::{Duration, Instant};

use serde_json::json;

mod support;

const ADMIN: &str = "long-poll-admin-key-0123456789";

/// Gate B takes one token per three seconds for `infra.vm.create`: a retry right after a
/// dispatch is throttled, and requeued until the bucket refills.
const POLICY: &str = "version: v1
defaults: { decision: allow }
rules:
  - id: throttle-vm-create
    when: { topic: infra.vm.create }
    decision: throttle
    limit: { rate: 1, per: 3s, key: [tenant, topic] }
";

fn serve(name: &str, config: &str) -> (support::Process, String) {
    let dir = support::temp_dir(&format!("long-poll-{name}"));
    std::fs::write(dir.join("config.yaml"), config).unwrap();
    std::fs::write(dir.join("policy.yaml"), POLICY).unwrap();
    let (data, config, policy) = (dir.join("data"), dir.join("config.yaml"), dir.join("policy.yaml"));
    support::airlock(
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--data",
            data.to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
            "--policy",
            policy.to_str().unwrap(),
        ],
        &[("AIRLOCK_ADMIN_KEY", ADMIN)],
    )
}

fn claim(addr: &str, key: &str, wait_ms: u64) -> (u16, serde_json::Value) {
    support::post(addr, "/api/v1/workers/claim", key, json!({"wait_ms": wait_ms}))
}

#[test]
fn waiting_claims_look_only_when_woken_and_a_key_has_a_cap() {
    let (_server, addr) = serve("cap", "http: { long_polls_per_key_max: 3 }\n");
    let worker = support::key(&addr, ADMIN, "acme", "worker", &["worker"]);
    let other = support::key(&addr, ADMIN, "acme", "other-worker", &["worker"]);

    // Three claims of one key wait 4 s on an empty queue (each until it got in: a try below
    // may hold a slot for its millisecond).
    let waiting: Vec<_> = (0..3)
        .map(|_| {
            let (addr, worker) = (addr.clone(), worker.clone());
            std::thread::spawn(move || {
                loop {
                    match claim(&addr, &worker, 4_000) {
                        (429, _) => std::thread::sleep(Duration::from_millis(5)),
                        (status, _) => return status,
                    }
                }
            })
        })
        .collect();
    // A fourth waiting claim of that key is refused once the three wait (they start in a moment).
    let started = Instant::now();
    let mut tries = 0.0;
    let refused = loop {
        let (status, reply) = claim(&addr, &worker, 1);
        if status == 429 {
            break reply;
        }
        tries += 1.0;
        assert_eq!(status, 204, "{reply}");
        assert!(started.elapsed() < Duration::from_secs(3), "no claim was refused ({tries} tries)");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(refused["error"], "too_many_long_polls", "{refused}");
    assert_eq!(refused["retry_after_secs"], 1, "{refused}");
    // A claim that does not wait is not a long-poll, and the cap is per key.
    assert_eq!(claim(&addr, &worker, 0).0, 204);
    assert_eq!(claim(&addr, &other, 500).0, 204);
    for w in waiting {
        assert_eq!(w.join().unwrap(), 204);
    }
    // Each waiting claim looked once, then once per second's safety-net re-check (about 5 each);
    // polling every 200 ms made it about 20 each. A claim that waited 1 ms before the cap was
    // reached looked at most twice, the two last claims three times together.
    let looks = support::metric(&addr, "airlock_claim_looks_total");
    assert!(looks >= 3.0, "the waiting claims looked: {looks}");
    assert!(looks <= 3.0 * 6.0 + 2.0 * tries + 3.0, "claims polled the store: {looks} looks, {tries} tries");
    // The key may wait again once its claims were answered.
    assert_eq!(claim(&addr, &worker, 10).0, 204);
}

#[test]
fn a_submit_wakes_a_waiting_claim_and_a_throttled_job_is_claimed_when_due() {
    // The safety-net re-check is far off: only a wake-up or the due time can end these waits.
    let (_server, addr) = serve("wake", "http: { long_poll_recheck_ms: 30000 }\n");
    let worker = support::key(&addr, ADMIN, "acme", "worker", &["worker"]);
    let submitter = support::key(&addr, ADMIN, "acme", "agent", &["submitter"]);

    let waiting = {
        let (addr, worker) = (addr.clone(), worker.clone());
        std::thread::spawn(move || claim(&addr, &worker, 9_000))
    };
    std::thread::sleep(Duration::from_millis(300));
    let submitted = Instant::now();
    let (status, reply) =
        support::post(&addr, "/api/v1/jobs", &submitter, json!({"topic": "infra.vm.create", "env": "dev"}));
    assert_eq!(status, 202, "{reply}");
    let (status, leased) = waiting.join().unwrap();
    let woke_after = submitted.elapsed();
    assert_eq!(status, 200, "{leased}");
    assert_eq!(leased["job_id"], reply["job_id"]);
    assert!(woke_after < Duration::from_secs(2), "the submit did not wake the claim: {woke_after:?}");

    // A retry right away is throttled at Gate B and requeued until the bucket refills; the
    // claim that put it back waits for that moment, which nothing announces.
    let id = leased["job_id"].as_str().unwrap();
    let token = leased["lease_token"].as_str().unwrap();
    let failed = support::post(
        &addr,
        &format!("/api/v1/workers/jobs/{id}/fail"),
        &worker,
        json!({"lease_token": token, "error": "flaky", "retryable": true}),
    );
    assert_eq!(failed.0, 200, "{}", failed.1);
    let asked = Instant::now();
    let (status, again) = claim(&addr, &worker, 9_000);
    let waited = asked.elapsed();
    assert_eq!(status, 200, "{again}");
    assert_eq!((again["job_id"].as_str(), again["attempt"].as_u64()), (Some(id), Some(2)), "{again}");
    assert!(waited > Duration::from_millis(500), "Gate B throttled the retry first: {waited:?}");
    assert!(waited < Duration::from_secs(8), "the throttled job was not claimed when due: {waited:?}");
}

#[test]
fn a_job_gate_b_puts_back_is_claimed_when_due_though_a_waiting_claim_read_the_due_times_before() {
    // The safety-net re-check is far off. Pool `other` takes no job here: its claim only reads
    // the tenant's next due time and waits.
    let config =
        "http: { long_poll_recheck_ms: 30000 }\npools: { vm: [\"infra.vm.**\"], other: [\"other.**\"] }\n";
    let (_server, addr) = serve("put-back", config);
    let worker = support::key(&addr, ADMIN, "acme", "worker", &["worker"]);
    let submitter = support::key(&addr, ADMIN, "acme", "agent", &["submitter"]);
    let claim_from = |pool: &str, wait_ms: u64| {
        support::post(&addr, "/api/v1/workers/claim", &worker, json!({"wait_ms": wait_ms, "pool": pool}))
    };
    let (status, reply) =
        support::post(&addr, "/api/v1/jobs", &submitter, json!({"topic": "infra.vm.create", "env": "dev"}));
    assert_eq!(status, 202, "{reply}");
    let (status, leased) = claim_from("vm", 0);
    assert_eq!(status, 200, "{leased}");
    let id = leased["job_id"].as_str().unwrap();
    let body = json!({"lease_token": leased["lease_token"], "error": "flaky", "retryable": true});
    let failed = support::post(&addr, &format!("/api/v1/workers/jobs/{id}/fail"), &worker, body);
    assert_eq!(failed.0, 200, "{}", failed.1);

    // After the retry's wake-up, a claim of pool `other` reads the due times and waits.
    let idle = {
        let (addr, worker) = (addr.clone(), worker.clone());
        std::thread::spawn(move || {
            support::post(&addr, "/api/v1/workers/claim", &worker, json!({"wait_ms": 6_000, "pool": "other"}))
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    // Gate B throttles the retry and puts the job back for later, which wakes no claim: the
    // due times read before are out of date.
    let (status, body) = claim_from("vm", 0);
    assert_eq!(status, 204, "{body}");
    let asked = Instant::now();
    let (status, again) = claim_from("vm", 9_000);
    let waited = asked.elapsed();
    assert_eq!(status, 200, "{again}");
    assert_eq!((again["job_id"].as_str(), again["attempt"].as_u64()), (Some(id), Some(2)), "{again}");
    assert!(waited > Duration::from_millis(500), "the bucket had no token yet: {waited:?}");
    assert!(waited < Duration::from_secs(8), "the put-back job was not claimed when due: {waited:?}");
    assert_eq!(idle.join().unwrap().0, 204);
}
