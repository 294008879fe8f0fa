//! The operator console in real headless Chromium, against the real binary in embedded mode:
//! sign-in and out, the inbox updating live, approve → queued → a worker runs the job, refusals
//! (self-approval, stale binding after a publish), reject with a comment, quorum 2, the DLQ,
//! policy pages, CSRF, session expiry, revocation, and agent-sent markup that must stay text;
//! a Terraform plan job's changes with each change's decision.
//! Every page is checked with axe-core and photographed at 1280×800 and 390×844
//! (`AIRLOCK_SCREENSHOTS_DIR=docs/console` refreshes the committed set).

#![allow(clippy::unwrap_used, clippy::panic, clippy::indexing_slicing, reason = "a test fails by panicking")]

mod browser;
mod support;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use browser::{Browser, Chromedriver, ENTER, TAB};
use serde_json::{Value, json};
use support::{Process, get, key, post};

/// One browser test at a time: each runs a Chromium, and the machine has few cores.
static SERIAL: Mutex<()> = Mutex::new(());

const ADMIN: &str = "console-browser-admin-key-0001";

/// The seed policy plus a two-approver rule.
const POLICY: &str = "version: v1
defaults:
  decision: allow
risk:
  high: [\"infra.resource.delete\", \"infra.cluster.*\"]
rules:
  - id: require-approval-prod-delete
    when: { topic: infra.resource.delete, env: production }
    decision: require_human
    reason: deleting production resources needs a human
  - id: two-approvers-cluster-delete
    when: { topic: infra.cluster.delete, env: production }
    decision: require_human
    approvals: 2
    reason: deleting a production cluster needs two approvers
";

/// A console site: the server, its keys, a browser.
struct Site {
    _server: Process,
    addr: String,
    base: String,
    agent: String,
    alice: String,
    bob: String,
    carol: String,
    olga: String,
    worker: String,
    // Fields drop in this order: the browser's session closes (Chromium quits) while its
    // chromedriver still runs; a browser whose chromedriver was killed first outlives the test.
    browser: Browser,
    _driver: Chromedriver,
}

impl Site {
    fn start(name: &str, config: &str, extra: &[&str]) -> Self {
        let dir = support::temp_dir(name);
        std::fs::write(dir.join("policy.yaml"), POLICY).unwrap();
        std::fs::write(dir.join("config.yaml"), config).unwrap();
        let data = dir.join("data");
        let (policy, config) = (dir.join("policy.yaml"), dir.join("config.yaml"));
        let mut args = vec![
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--data",
            data.to_str().unwrap(),
            "--policy",
            policy.to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let (server, addr) = support::airlock(&args, &[("AIRLOCK_ADMIN_KEY", ADMIN)]);
        let k = |n: &str, roles: &[&str]| key(&addr, ADMIN, "acme", n, roles);
        let (agent, alice, bob) =
            (k("agent-1", &["submitter"]), k("alice", &["approver"]), k("bob", &["approver"]));
        let (carol, olga) = (k("carol", &["submitter", "approver"]), k("olga", &["operator", "approver"]));
        let worker = k("w1", &["worker"]);
        let driver = Chromedriver::start();
        let browser = driver.browser();
        let base = format!("http://{addr}");
        Site { _server: server, addr, base, agent, alice, bob, carol, olga, worker, browser, _driver: driver }
    }

    fn submit(&self, key: &str, job: Value) -> Value {
        let (status, reply) = post(&self.addr, "/api/v1/jobs", key, job);
        assert_eq!(status, 202, "{reply}");
        reply
    }

    fn job_state(&self, id: &str) -> String {
        let (_, job) = get(&self.addr, &format!("/api/v1/jobs/{id}"), &self.olga);
        job["state"].as_str().unwrap().to_owned()
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

fn delete_job(resource: &str) -> Value {
    json!({"topic": "infra.resource.delete", "env": "production", "labels": {"team": "db"}, "payload": {"resource": resource}})
}

#[test]
fn sign_in_live_inbox_keyboard_approve_and_the_job_runs() {
    let _serial = SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let site = Site::start("console-main", "{}\n", &[]);
    let b = &site.browser;

    // Signed out, any page leads to sign-in, keeping the page asked for.
    b.goto(&site.url("/inbox?topic=infra.resource.delete"));
    assert!(b.url().contains("/login?next=%2Finbox%3Ftopic%3Dinfra.resource.delete"), "{}", b.url());
    b.check_page("login");
    b.sign_in_here(&site.alice);
    assert!(b.url().ends_with("/inbox?topic=infra.resource.delete"), "{}", b.url());
    let cookie = b.exec("return document.cookie", json!([]));
    assert_eq!(cookie, json!(""), "the session cookie is HttpOnly, and no key is readable by script");
    let storage = b.exec("return localStorage.length + sessionStorage.length", json!([]));
    assert_eq!(storage, json!(0));
    b.goto(&site.url("/"));
    assert!(b.url().ends_with("/inbox"), "an approver's home is the inbox: {}", b.url());
    b.find("#inbox-empty");

    // A job submitted through the API appears live, without a reload.
    b.exec("window.__marker = 'same page'; return true", json!([]));
    let submitted = Instant::now();
    let job = site.submit(&site.agent, delete_job("db-7"));
    let job_id = job["job_id"].as_str().unwrap();
    let row = format!("tr[data-job-id=\"{job_id}\"]");
    b.wait_for(&row, Duration::from_secs(5));
    let live = submitted.elapsed();
    assert!(live < Duration::from_secs(2), "the inbox updated after {live:?}");
    assert_eq!(b.exec("return window.__marker", json!([])), json!("same page"));
    b.wait_text("#pending-count", "1", Duration::from_secs(2));
    let row_text = b.text(&b.find(&row));
    for part in [
        "infra.resource.delete",
        "production",
        "agent-1",
        "0/1",
        "require-approval-prod-delete",
        "needs a human",
    ] {
        assert!(row_text.contains(part), "`{part}` in `{row_text}`");
    }
    b.check_page("inbox");

    // Keyboard only: from the inbox, Tab to the request, Enter, Tab to Approve, Enter.
    let approval_id = job["approval"]["id"].as_str().unwrap();
    b.exec(
        "document.activeElement && document.activeElement.blur(); window.scrollTo(0, 0); return true",
        json!([]),
    );
    let link_href = format!("/approvals/{approval_id}");
    let mut reached = false;
    for _ in 0..40 {
        b.keys(&[TAB]);
        let href = b.exec("return document.activeElement.getAttribute('href')", json!([]));
        if href == json!(link_href) {
            reached = true;
            break;
        }
    }
    assert!(reached, "Tab never reached the request's link");
    b.keys(&[ENTER]);
    b.find("#approve");
    assert!(b.url().ends_with(&link_href));
    b.wait_text("#binding-state", "current", Duration::from_secs(2));
    let trace = b.text(&b.find("table.trace"));
    assert!(trace.contains("require-approval-prod-delete") && trace.contains("matched"), "{trace}");
    b.check_page("approval");
    let mut focused = false;
    for _ in 0..60 {
        b.keys(&[TAB]);
        if b.focused_id() == "approve" {
            focused = true;
            break;
        }
    }
    assert!(focused, "Tab never reached the Approve button");
    b.keys(&[ENTER]);
    b.wait_text("p.banner.done", "Approved", Duration::from_secs(5));
    assert_eq!(site.job_state(job_id), "queued");

    // A worker claims it and succeeds; the job page tells the whole story.
    let (status, claim) = post(&site.addr, "/api/v1/workers/claim", &site.worker, json!({"wait_ms": 2000}));
    assert_eq!(status, 200, "{claim}");
    assert_eq!(claim["job_id"], json!(job_id));
    let token = claim["lease_token"].as_str().unwrap();
    let (status, done) = post(
        &site.addr,
        &format!("/api/v1/workers/jobs/{job_id}/complete"),
        &site.worker,
        json!({"lease_token": token, "result": {"deleted": "db-7"}}),
    );
    assert_eq!(status, 200, "{done}");
    b.goto(&site.url(&format!("/jobs/{job_id}")));
    b.wait_text("#job-state", "succeeded", Duration::from_secs(2));
    let timeline = b.text(&b.find("#timeline"));
    for part in ["awaiting_approval", "queued", "leased", "succeeded", "gate A", "gate B", "alice"] {
        assert!(timeline.contains(part), "`{part}` in the timeline: {timeline}");
    }
    b.check_page("job");
    b.goto(&site.url("/jobs"));
    b.find(&format!("#jobs-table tr[data-job-id=\"{job_id}\"]"));
    b.check_page("jobs");
    b.goto(&site.url("/overview"));
    b.find("#pending-count");
    b.check_page("overview");

    // Sign out: the session is gone.
    b.click_css("header .who button");
    b.find("#key");
    b.goto(&site.url("/jobs"));
    assert!(b.url().contains("/login?next=%2Fjobs"), "{}", b.url());
}

#[test]
fn refusals_stale_binding_reject_and_quorum() {
    let _serial = SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let site = Site::start("console-refusals", "{}\n", &[]);
    let b = &site.browser;

    // Self-approval: carol submitted it, so carol sees why she cannot decide, and no button.
    let own = site.submit(&site.carol, delete_job("own"));
    b.sign_in(&site.base, &site.carol);
    b.goto(&site.url(&format!("/approvals/{}", own["approval"]["id"].as_str().unwrap())));
    let why = b.text(&b.find("#not-approvable"));
    assert!(why.contains("carol") && why.contains("submitted this job"), "{why}");
    assert!(b.try_find("#approve").is_none(), "no approve button for the submitter");
    b.clear_cookies();

    // Stale: a publish while the page is open shows it before anyone clicks; approving then
    // gets the 409 with the new request to approve.
    let stale = site.submit(&site.agent, delete_job("stale"));
    let stale_id = stale["approval"]["id"].as_str().unwrap();
    b.sign_in(&site.base, &site.alice);
    b.goto(&site.url(&format!("/approvals/{stale_id}")));
    b.wait_text("#binding-state", "current", Duration::from_secs(2));
    let republished =
        format!("{POLICY}  - id: deny-nothing-yet\n    when: {{ topic: none.such }}\n    decision: deny\n");
    let (status, reply) = post(&site.addr, "/api/v1/policy/publish", ADMIN, &republished);
    assert!(status == 201 || status == 200, "{status} {reply}");
    b.wait_text("#binding-state", "stale", Duration::from_secs(3));
    b.click_css("#approve");
    let banner = b.text(&b.find("p.banner.error"));
    assert!(banner.contains("approval_stale"), "{banner}");
    b.click_css("#new-approval");
    b.wait_text("#binding-state", "current", Duration::from_secs(2));
    b.click_css("#approve");
    b.wait_text("p.banner.done", "Approved", Duration::from_secs(5));
    assert_eq!(site.job_state(stale["job_id"].as_str().unwrap()), "queued");

    // Reject needs a comment; the comment is kept in the audit trail.
    let rejected = site.submit(&site.agent, delete_job("keep"));
    b.goto(&site.url(&format!("/approvals/{}", rejected["approval"]["id"].as_str().unwrap())));
    let comment = b.find("#comment");
    b.type_into(&comment, "not during the freeze <b>really</b>");
    b.click_css("#reject");
    b.wait_text("p.banner.done", "Rejected", Duration::from_secs(5));
    assert_eq!(site.job_state(rejected["job_id"].as_str().unwrap()), "rejected");
    let (_, audit) = get(&site.addr, "/api/v1/audit?tenant=acme&limit=500", ADMIN);
    let kept = audit["records"].as_array().unwrap().iter().any(|r| {
        r["kind"] == json!("approval.rejected")
            && r["data"]["comment"] == json!("not during the freeze <b>really</b>")
    });
    assert!(kept, "the comment is in the audit record: {audit}");
    let rejected_page = site.url(&format!("/jobs/{}", rejected["job_id"].as_str().unwrap()));
    b.goto(&rejected_page);
    let timeline = b.text(&b.find("#timeline"));
    assert!(!timeline.contains("approval.rejected"), "an approver does not read the audit trail: {timeline}");

    // Quorum 2: alice's vote is counted, bob's completes it.
    let cluster = site.submit(
        &site.agent,
        json!({"topic": "infra.cluster.delete", "env": "production", "payload": {"cluster": "eu-1"}}),
    );
    let cluster_page = site.url(&format!("/approvals/{}", cluster["approval"]["id"].as_str().unwrap()));
    b.goto(&cluster_page);
    b.click_css("#approve");
    b.wait_text("p.banner.done", "counted", Duration::from_secs(5));
    assert!(b.text(&b.find("#not-approvable")).contains("already approved"));
    assert_eq!(site.job_state(cluster["job_id"].as_str().unwrap()), "awaiting_approval");
    b.clear_cookies();
    b.sign_in(&site.base, &site.bob);
    b.goto(&cluster_page);
    b.click_css("#approve");
    b.wait_text("p.banner.done", "Approved", Duration::from_secs(5));
    assert_eq!(site.job_state(cluster["job_id"].as_str().unwrap()), "queued");

    // An operator's job timeline has the job's other audit records: votes, the rejection and
    // its comment (as text).
    b.clear_cookies();
    b.sign_in(&site.base, &site.olga);
    b.goto(&rejected_page);
    let timeline = b.text(&b.find("#timeline"));
    assert!(
        timeline.contains("approval.rejected by alice — not during the freeze <b>really</b>"),
        "{timeline}"
    );
    assert!(b.try_find("#timeline b").is_none(), "the comment's markup stays text");
    b.goto(&site.url(&format!("/jobs/{}", cluster["job_id"].as_str().unwrap())));
    let timeline = b.text(&b.find("#timeline"));
    for part in ["approval.vote by alice", "approval.approved by bob"] {
        assert!(timeline.contains(part), "`{part}` in the timeline: {timeline}");
    }
}

#[test]
fn dlq_retry_and_discard_and_policy_pages() {
    let _serial = SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let site = Site::start("console-dlq", "execution:\n  attempts_max: 1\n", &[]);
    let b = &site.browser;

    // Three jobs that fail their only attempt end in the DLQ.
    let mut ids = Vec::new();
    for (i, error) in ["disk full", "disk full", "timeout talking to the cloud"].iter().enumerate() {
        let job = site
            .submit(&site.agent, json!({"topic": "infra.vm.create", "env": "staging", "payload": {"n": i}}));
        let id = job["job_id"].as_str().unwrap().to_owned();
        let (status, claim) =
            post(&site.addr, "/api/v1/workers/claim", &site.worker, json!({"wait_ms": 2000}));
        assert_eq!((status, claim["job_id"].as_str()), (200, Some(id.as_str())), "{claim}");
        let (status, reply) = post(
            &site.addr,
            &format!("/api/v1/workers/jobs/{id}/fail"),
            &site.worker,
            json!({"lease_token": claim["lease_token"], "error": error, "retryable": true}),
        );
        assert_eq!(status, 200, "{reply}");
        assert_eq!(site.job_state(&id), "dead_lettered");
        ids.push(id);
    }
    // Roles decide what is shown: an approver without the operator role gets no DLQ link, and
    // the DLQ itself is refused by the API.
    b.sign_in(&site.base, &site.alice);
    assert!(b.try_find("nav a[href=\"/dlq\"]").is_none(), "no DLQ link for an approver");
    b.goto(&site.url("/dlq"));
    assert!(b.text(&b.find("p.banner.error")).contains("operator"), "the API's refusal is shown");
    assert!(b.try_find("#bulk-retry").is_none());
    b.clear_cookies();
    b.sign_in(&site.base, &site.olga);
    assert!(b.url().ends_with("/overview"), "an operator's home is the overview: {}", b.url());
    b.goto(&site.url("/dlq"));
    let groups = b.text(&b.find("#dlq-groups"));
    assert!(groups.contains('2') && groups.contains('1'), "{groups}");
    b.check_page("dlq");

    // Single retry, with confirmation.
    b.click_css(&format!("button[value=\"retry {}\"]", ids[0]));
    b.wait_text("main", "Retry (through Gate B again)", Duration::from_secs(5));
    b.check_page("dlq-confirm");
    b.click_css("#confirm");
    b.wait_text("p.banner.done", "1 job(s) retried", Duration::from_secs(5));
    assert_eq!(site.job_state(&ids[0]), "queued");

    // Bulk discard of the other two.
    for id in &ids[1..] {
        b.click_css(&format!("input[name=ids][value=\"{id}\"]"));
    }
    b.click_css("#bulk-discard");
    b.click_css("#confirm");
    b.wait_text("p.banner.done", "2 job(s) discarded", Duration::from_secs(5));
    b.find("#dlq-empty");
    let (_, dlq) = get(&site.addr, "/api/v1/dlq", &site.olga);
    assert_eq!(dlq["dead_letters"], json!([]), "{dlq}");

    // Policy: snapshots, source, diff between two, simulate with the trace.
    let v2 = format!(
        "{POLICY}  - id: deny-public-buckets\n    when: {{ topic: storage.bucket.update, acl: public }}\n    decision: deny\n"
    );
    let (status, reply) = post(&site.addr, "/api/v1/policy/publish", ADMIN, &v2);
    assert!(status == 201 || status == 200, "{status} {reply}");
    b.goto(&site.url("/policy"));
    b.find("#snapshots");
    b.check_page("policy");
    b.goto(&site.url("/policy/snapshots/1"));
    b.wait_text("pre.source", "two-approvers-cluster-delete", Duration::from_secs(2));
    b.goto(&site.url("/policy/diff?from=1&to=2"));
    let summary = b.text(&b.find("#diff-summary"));
    assert!(summary.contains("3 line(s) added, 0 removed"), "{summary}");
    assert!(b.text(&b.find("pre.diff ins")).contains("deny-public-buckets"));
    b.check_page("policy-diff");
    b.goto(&site.url("/policy/simulate"));
    b.click_css("form button[type=submit]:not(.link)");
    let result = b.text(&b.find("#sim-result"));
    assert!(result.contains("require_human") && result.contains("require-approval-prod-delete"), "{result}");
    b.check_page("policy-simulate");
}

#[test]
fn csrf_expiry_revocation_and_agent_markup_stay_inert() {
    let _serial = SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let site = Site::start("console-security", "{}\n", &["--console-idle-secs", "2"]);
    let b = &site.browser;

    // The sign-in form is protected too: a POST without its token is refused.
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let plain = agent
        .post(&site.url("/login"))
        .content_type("application/x-www-form-urlencoded")
        .send(format!("key={}&next=%2F", site.alice))
        .unwrap();
    assert_eq!(plain.status().as_u16(), 403);
    let page = agent.get(&site.url("/login")).call().unwrap();
    let csp = page.headers().get("content-security-policy").unwrap().to_str().unwrap().to_owned();
    assert!(csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"), "{csp}");
    assert_eq!(page.headers().get("x-frame-options").unwrap(), "DENY");

    // Agent-sent markup everywhere it can go, and a payload of about 1 MiB.
    let xss = [
        "<script>window.__pwned=1;alert(1)</script>",
        "\"><img src=x onerror=alert(1)>",
        "javascript:alert(1)",
    ];
    let nasty = site.submit(
        &site.agent,
        json!({"topic": "infra.resource.delete", "env": "production",
               "labels": {"note": xss[0], "x\"><img src=x onerror=alert(1)>": xss[1], "link": xss[2]},
               "payload": {"html": xss[0], "img": xss[1], "url": xss[2],
                           "address": xss[1], "actions": ["update"], "before": {"a": xss[0]}, "after": {"a": xss[1]}}}),
    );
    let big = site.submit(
        &site.agent,
        json!({"topic": "infra.resource.delete", "env": "production", "payload": {"blob": "y".repeat(1_000_000)}}),
    );
    b.sign_in(&site.base, &site.alice);
    b.goto(&site.url("/inbox"));
    b.find(&format!("tr[data-job-id=\"{}\"]", nasty["job_id"].as_str().unwrap()));
    b.assert_inert("the inbox");
    b.goto(&site.url(&format!("/approvals/{}", nasty["approval"]["id"].as_str().unwrap())));
    let labels = b.text(&b.find("table.kv"));
    assert!(labels.contains(xss[0]) && labels.contains(xss[2]), "shown as text: {labels}");
    assert!(b.text(&b.find("table.plan")).contains(xss[1]), "the plan's before/after as text");
    b.assert_inert("the approval page");
    b.goto(&site.url(&format!("/jobs/{}", nasty["job_id"].as_str().unwrap())));
    b.assert_inert("the job page");
    let started = Instant::now();
    b.goto(&site.url(&format!("/approvals/{}", big["approval"]["id"].as_str().unwrap())));
    b.find("#approve");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the 1 MiB payload page took {:?}",
        started.elapsed()
    );
    let open = b.exec("return document.querySelector('details.payload').open", json!([]));
    assert_eq!(open, json!(false), "a large payload is collapsed");
    let responsive = b.exec("return 1 + 1", json!([]));
    assert_eq!(responsive, json!(2));

    // A form POST without the session's CSRF token is refused with 403.
    let status = b.exec(
        "return fetch(arguments[0], {method: 'POST', headers: {'Content-Type': 'application/x-www-form-urlencoded'}, body: 'csrf=forged'}).then(r => r.status)",
        json!([format!("/approvals/{}/approve", big["approval"]["id"].as_str().unwrap())]),
    );
    assert_eq!(status, json!(403));
    assert_eq!(site.job_state(big["job_id"].as_str().unwrap()), "awaiting_approval");

    // An idle session ends; sign-in brings the person back to the page they asked for.
    std::thread::sleep(Duration::from_millis(2_500));
    b.goto(&site.url("/jobs?state=awaiting_approval"));
    assert!(b.url().contains("expired=1"), "{}", b.url());
    b.find("p.banner.error");
    b.sign_in_here(&site.alice);
    assert!(b.url().ends_with("/jobs?state=awaiting_approval"), "{}", b.url());

    // Revoking the key ends its sessions.
    let (_, keys) = get(&site.addr, "/api/v1/keys", ADMIN);
    let alice_id =
        keys["keys"].as_array().unwrap().iter().find(|k| k["name"] == json!("alice")).unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned();
    let del = agent
        .delete(&site.url(&format!("/api/v1/keys/{alice_id}")))
        .header("authorization", &format!("Bearer {ADMIN}"))
        .call()
        .unwrap();
    assert!(del.status().is_success(), "revoke: {}", del.status());
    b.goto(&site.url("/inbox"));
    assert!(b.url().contains("/login"), "a revoked key's session ends: {}", b.url());
}

#[test]
fn a_plan_job_shows_its_changes_and_each_changes_decision() {
    let _serial = SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let site = Site::start("console-plan", "{}\n", &[]);
    let b = &site.browser;
    let terraform = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/policies/terraform.yaml"),
    )
    .unwrap();
    let (status, reply) = post(&site.addr, "/api/v1/policy/publish", ADMIN, &terraform);
    assert_eq!(status, 201, "{reply}");
    const SECRET: &str = "PLANTED-console-db-password-55e1";
    let xss = "<script>window.__pwned=1;alert(1)</script>\"><img src=x onerror=alert(1)>";
    let web = "module.edge[\"<img src=x onerror=alert(1)>\"].aws_instance.web";
    let plan = json!({
        "format_version": "1.2",
        "terraform_version": "1.6.6",
        "planned_values": {"root_module": {}},
        "resource_changes": [
            {"address": "aws_db_instance.main", "mode": "managed", "type": "aws_db_instance", "name": "main",
             "provider_name": "registry.terraform.io/hashicorp/aws",
             "change": {"actions": ["delete", "create"],
                        "before": {"engine": "postgres", "allocated_storage": 20, "password": SECRET},
                        "after": {"engine": "postgres", "allocated_storage": 50, "password": SECRET},
                        "before_sensitive": {"password": true}, "after_sensitive": {"password": true}}},
            {"address": "aws_iam_policy.ops", "mode": "managed", "type": "aws_iam_policy", "name": "ops",
             "provider_name": "registry.terraform.io/hashicorp/aws",
             "change": {"actions": ["update"],
                        "before": {"policy": "{\"Statement\":[{\"Action\":\"s3:GetObject\"}]}"},
                        "after": {"policy": "{\"Statement\":[{\"Action\":\"s3:PutObject\"}]}"}}},
            {"address": web, "module_address": "module.edge[\"<img src=x onerror=alert(1)>\"]",
             "mode": "managed", "type": "aws_instance", "name": "web",
             "provider_name": "registry.terraform.io/hashicorp/aws",
             "change": {"actions": ["create"], "before": null,
                        "after": {"ami": "ami-123", "tags": {"note": xss}}}},
            {"address": "aws_instance.unchanged", "type": "aws_instance", "name": "unchanged",
             "change": {"actions": ["no-op"], "before": {}, "after": {}}},
        ],
    });
    let (status, submitted) = post(&site.addr, "/api/v1/plans?env=production", &site.agent, plan);
    assert_eq!(status, 202, "{submitted}");
    assert_eq!(submitted["state"], "awaiting_approval", "{submitted}");
    let job_id = submitted["job_id"].as_str().unwrap();
    let approval_id = submitted["approval"]["id"].as_str().unwrap();

    b.sign_in(&site.base, &site.alice);
    b.goto(&site.url(&format!("/approvals/{approval_id}")));
    b.find("#approve");
    let overall = b.text(&b.find("#plan-decision"));
    assert!(
        overall.contains("require_human")
            && overall.contains("two-approvers-stateful-destroy")
            && overall.contains("human-iam-policy-change"),
        "the plan's decision, from its changes: {overall}"
    );
    let outside = b.exec(
        "return [...document.querySelectorAll('table.trace')].filter(t => !t.closest('details.change-trace')).length",
        json!([]),
    );
    assert_eq!(outside, json!(0), "no single-job rule trace for a plan job, only each change's");
    let expected = [
        (
            "aws_db_instance.main",
            "delete, create",
            "require_human",
            "two-approvers-stateful-destroy",
            "two approvers",
        ),
        (
            "aws_iam_policy.ops",
            "update",
            "require_human",
            "human-iam-policy-change",
            "IAM policy changes need a human",
        ),
        (web, "create", "allow", "(default)", "no rule restricts this change"),
    ];
    let check_rows = |page: &str| {
        let table = b.find("#plan-decisions");
        let caption = b.text(&table);
        assert!(caption.contains("3 changes"), "{page}: the no-op is not a change: {caption}");
        for (address, actions, decision, rules, reason) in expected {
            let row = b.text(
                &b.find(&format!("#plan-decisions tr[data-address='{}']", address.replace('\'', "\\'"))),
            );
            for part in [address, actions, decision, rules, reason] {
                assert!(row.contains(part), "{page}: `{part}` in the row of {address}: {row}");
            }
        }
        let db = b.text(&b.find("table.plan"));
        assert!(
            db.contains("aws_db_instance.main")
                && db.contains("require_human")
                && db.contains("allocated_storage")
                && db.contains("50"),
            "{page}: the first change's before and after: {db}"
        );
        let source = b.exec("return document.documentElement.outerHTML", json!([]));
        let source = source.as_str().unwrap();
        assert!(!source.contains(SECRET), "{page}: a sensitive value reached the page");
        assert!(source.contains("(sensitive)"), "{page}: the sensitive value is shown as replaced");
        assert!(
            b.text(&b.find("main")).contains("<img src=x onerror=alert(1)>"),
            "{page}: agent markup as text"
        );
        b.assert_inert(page);
    };
    check_rows("the plan's approval page");
    // Each change's trace, collapsed: every rule's verdict on that change.
    let traces = b.exec("return document.querySelectorAll('details.change-trace').length", json!([]));
    assert_eq!(traces, json!(3));
    b.click_css("details.change-trace[data-address='aws_iam_policy.ops'] summary");
    let trace = b.text(&b.find("details.change-trace[data-address='aws_iam_policy.ops'] table.trace"));
    assert!(trace.contains("human-iam-policy-change") && trace.contains("matched"), "{trace}");
    assert!(trace.contains("deny-prod-iam-wildcard") && trace.contains("not_matched"), "{trace}");
    b.check_page("approval-plan");

    b.goto(&site.url(&format!("/jobs/{job_id}")));
    b.wait_text("#job-state", "awaiting_approval", Duration::from_secs(2));
    check_rows("the plan's job page");
    b.check_page("job-plan");
}
