//! The console in distributed mode: two `airlock serve --role gateway` replicas on one
//! PostgreSQL schema, each with its own console and its own Chromium. A job submitted through
//! one replica appears live in the other's inbox, and an approval made on one replica's console
//! leaves the other's open inbox live. PostgreSQL must be reachable (127.0.0.1:5432, or
//! `AIRLOCK_TEST_POSTGRES_URL`) and the browser tools installed: this test fails, never skips.

#![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic, reason = "a test fails by panicking")]

mod browser;
mod support;

use std::time::{Duration, Instant};

use browser::Chromedriver;
use serde_json::json;
use support::{Schema, post};

const ADMIN: &str = "console-distributed-admin-key-01";

#[test]
fn an_approval_on_one_replica_shows_live_on_the_other() {
    let schema = Schema::create("console");
    let url = schema.url();
    let gateway = |url: &str| {
        support::airlock(
            &["serve", "--listen", "127.0.0.1:0", "--store", url, "--role", "gateway"],
            &[("AIRLOCK_ADMIN_KEY", ADMIN), ("RUST_LOG", "off")],
        )
    };
    let (_one, one) = gateway(&url);
    let (_two, two) = gateway(&url);
    let agent = support::key(&one, ADMIN, "acme", "agent-1", &["submitter"]);
    let alice = support::key(&one, ADMIN, "acme", "alice", &["approver"]);
    let bob = support::key(&two, ADMIN, "acme", "bob", &["approver"]);

    let driver = Chromedriver::start();
    let (on_one, on_two) = (driver.browser(), driver.browser());
    // Different host names, so that each browser's cookie belongs to its own replica.
    let (base_one, base_two) =
        (format!("http://{one}"), format!("http://{two}").replace("127.0.0.1", "localhost"));
    on_one.sign_in(&base_one, &alice);
    on_two.sign_in(&base_two, &bob);
    on_two.goto(&format!("{base_two}/inbox"));
    on_two.find("#inbox-empty");

    // Submitted through replica one: appears in replica two's open inbox.
    let submitted = Instant::now();
    let job = json!({"topic": "infra.resource.delete", "env": "production", "payload": {"resource": "db-9"}});
    let (status, reply) = post(&one, "/api/v1/jobs", &agent, job);
    assert_eq!(status, 202, "{reply}");
    let row = format!("tr[data-job-id=\"{}\"]", reply["job_id"].as_str().unwrap());
    on_two.wait_for(&row, Duration::from_secs(5));
    let seen = submitted.elapsed();
    assert!(seen < Duration::from_secs(2), "replica two's inbox saw it after {seen:?}");

    // Approved on replica one's console: leaves replica two's inbox, live.
    on_one.goto(&format!("{base_one}/approvals/{}", reply["approval"]["id"].as_str().unwrap()));
    on_one.click_css("#approve");
    on_one.wait_text("p.banner.done", "Approved", Duration::from_secs(5));
    let approved = Instant::now();
    on_two.wait_text("#pending-count", "0", Duration::from_secs(5));
    assert!(on_two.try_find(&row).is_none(), "the approved request left replica two's inbox");
    let gone = approved.elapsed();
    assert!(gone < Duration::from_secs(2), "replica two's inbox updated after {gone:?}");
    let (_, state) = support::get(&two, &format!("/api/v1/jobs/{}", reply["job_id"].as_str().unwrap()), &bob);
    assert_eq!(state["state"], json!("queued"));
}
