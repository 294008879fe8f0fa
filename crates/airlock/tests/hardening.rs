//! Issue 11, "safe to expose", through the real binary: what an attacker on the network tried
//! and what now holds. Each test failed on the code before the hardening.

#![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic, reason = "a test fails by panicking")]

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

mod support;

const ADMIN: &str = "hardening-admin-key-0123456789";

/// An `airlock serve` on loopback with its own data directory and config, killed when dropped.
struct Server {
    child: Child,
    addr: String,
    data: PathBuf,
}

impl Server {
    fn start(name: &str, config: &str, extra: &[&str]) -> Self {
        Self::start_with(name, config, extra, None)
    }

    /// With `file_limit`, the server runs under `ulimit -n` of that many descriptors.
    fn start_with(name: &str, config: &str, extra: &[&str], file_limit: Option<u32>) -> Self {
        Self::start_in(support::temp_dir(&format!("harden-{name}")), config, extra, file_limit)
    }

    /// A server on `data` (its store is `data/store`), which may hold an earlier server's state.
    fn start_in(data: PathBuf, config: &str, extra: &[&str], file_limit: Option<u32>) -> Self {
        let config_file = data.join("config.yaml");
        std::fs::write(&config_file, config).unwrap();
        let bin = env!("CARGO_BIN_EXE_airlock");
        let mut command = match file_limit {
            None => Command::new(bin),
            Some(n) => {
                let mut c = Command::new("sh");
                c.args(["-c", &format!("ulimit -n {n} && exec \"$0\" \"$@\""), bin]);
                c
            }
        };
        command
            .args(["serve", "--listen", "127.0.0.1:0", "--data"])
            .arg(data.join("store"))
            .arg("--config")
            .arg(&config_file)
            .args(extra)
            .env("AIRLOCK_ADMIN_KEY", ADMIN)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(
                std::fs::OpenOptions::new().create(true).append(true).open(data.join("server.log")).unwrap(),
            );
        let mut child = command.spawn().unwrap();
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        std::io::BufRead::read_line(&mut out, &mut line).unwrap();
        let addr = line
            .split("http://")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("no address in `{line}`"))
            .to_owned();
        let mut stdout = std::fs::File::create(data.join("stdout.log")).unwrap();
        std::thread::spawn(move || std::io::copy(&mut out, &mut stdout));
        Self { child, addr, data }
    }

    fn post(&self, path: &str, key: &str, body: Value) -> (u16, Value) {
        support::post(&self.addr, path, key, body)
    }

    fn key(&self, tenant: &str, name: &str, roles: &[&str]) -> String {
        support::key(&self.addr, ADMIN, tenant, name, roles)
    }

    /// What the server logged so far.
    fn log(&self) -> String {
        std::fs::read_to_string(self.data.join("server.log")).unwrap()
    }

    /// SIGTERM, and how long the process took to exit (and whether it exited 0).
    fn terminate(&mut self) -> (Duration, bool) {
        let started = Instant::now();
        Command::new("kill").arg(self.child.id().to_string()).status().unwrap();
        let status = self.child.wait().unwrap();
        (started.elapsed(), status.success())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A raw connection to the server.
fn connect(addr: &str) -> TcpStream {
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
    stream
}

/// Reads until the server closes the connection; how long that took, and what it sent.
fn until_closed(stream: &mut TcpStream) -> (Duration, String) {
    let started = Instant::now();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("the server kept the connection open ({e}) after {:?}", started.elapsed()),
        }
    }
    (started.elapsed(), String::from_utf8_lossy(&seen).into_owned())
}

/// One raw HTTP/1.1 exchange on a fresh connection: the whole response text.
fn raw(addr: &str, request: &str) -> String {
    let mut stream = connect(addr);
    stream.write_all(request.as_bytes()).unwrap();
    until_closed(&mut stream).1
}

#[test]
fn a_half_sent_request_is_cut_at_the_header_timeout() {
    let server =
        Server::start("header", "http: { header_read_timeout_ms: 1000, idle_timeout_ms: 5000 }\n", &[]);
    let mut stream = connect(&server.addr);
    stream.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n").unwrap();
    let started = Instant::now();
    // Trickle a header line every 200 ms: never idle, never done.
    let cut = loop {
        std::thread::sleep(Duration::from_millis(200));
        if stream.write_all(b"x-slow: 1\r\n").is_err() {
            break started.elapsed();
        }
        stream.set_read_timeout(Some(Duration::from_millis(1))).unwrap();
        let mut buf = [0u8; 1024];
        match stream.read(&mut buf) {
            Ok(_) => break started.elapsed(),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => break started.elapsed(),
        }
        assert!(started.elapsed() < Duration::from_secs(6), "the half-sent request was never cut");
    };
    assert!(
        cut >= Duration::from_millis(800),
        "cut too early, after {cut:?}: the idle timeout does not apply"
    );
    assert!(cut < Duration::from_millis(2500), "cut after {cut:?}");
}

#[test]
fn an_idle_connection_is_closed_and_a_busy_one_is_not() {
    let server = Server::start("idle", "http: { idle_timeout_ms: 500 }\n", &[]);
    let mut silent = connect(&server.addr);
    let (after, _) = until_closed(&mut silent);
    assert!(after < Duration::from_secs(2), "a silent connection stayed open {after:?}");

    // Keep-alive: served, then closed once idle.
    let mut kept = connect(&server.addr);
    kept.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
    let (after, text) = until_closed(&mut kept);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(after < Duration::from_secs(2), "an idle keep-alive connection stayed open {after:?}");

    // A long-poll claim is silent for longer than the idle timeout, and is not cut.
    let worker = server.key("acme", "w", &["worker"]);
    let started = Instant::now();
    let (status, _) = server.post("/api/v1/workers/claim", &worker, json!({"wait_ms": 1500}));
    assert_eq!(status, 204);
    assert!(started.elapsed() >= Duration::from_millis(1400));
}

#[test]
fn connections_over_the_cap_get_503_at_once() {
    let server = Server::start("cap", "http: { connections_max: 4, idle_timeout_ms: 5000 }\n", &[]);
    let held: Vec<TcpStream> = (0..4).map(|_| connect(&server.addr)).collect();
    std::thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    let text = raw(&server.addr, "GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n");
    assert!(started.elapsed() < Duration::from_secs(1), "the refusal took {:?}", started.elapsed());
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    assert!(text.to_ascii_lowercase().contains("retry-after: 1"), "{text}");
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(3);
    while !raw(&server.addr, "GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .starts_with("HTTP/1.1 200")
    {
        assert!(Instant::now() < deadline, "closed connections did not free their slots");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn idle_sockets_beyond_the_file_limit_do_not_starve_requests() {
    // The attack of the issue: 300 idle sockets against a file limit of 256.
    let server = Server::start_with("fd", "http: { idle_timeout_ms: 1000 }\n", &[], Some(256));
    let idle: Vec<TcpStream> = (0..300).filter_map(|_| TcpStream::connect(&server.addr).ok()).collect();
    assert!(idle.len() >= 250, "only {} sockets connected", idle.len());
    let started = Instant::now();
    loop {
        let answer = support::try_call(&server.addr, "/healthz", "", None, Duration::from_secs(2));
        if matches!(answer, Some((200, _))) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(6),
            "no request was served for {:?} with 300 idle sockets open (last answer {answer:?})",
            started.elapsed()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(idle);
}

#[test]
fn requests_over_the_in_flight_limit_are_shed() {
    let server = Server::start("inflight", "http: { in_flight_max: 2 }\n", &[]);
    let worker = server.key("acme", "w", &["worker"]);
    let submitter = server.key("acme", "s", &["submitter"]);
    let polls: Vec<_> = (0..2)
        .map(|_| {
            let (addr, worker) = (server.addr.clone(), worker.clone());
            std::thread::spawn(move || {
                support::post(&addr, "/api/v1/workers/claim", &worker, json!({"wait_ms": 2500}))
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let text = raw(
        &server.addr,
        &format!(
            "GET /api/v1/jobs HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {submitter}\r\nconnection: close\r\n\r\n"
        ),
    );
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    assert!(text.to_ascii_lowercase().contains("retry-after: 1"), "{text}");
    assert!(text.contains("\"overloaded\""), "{text}");
    let health = raw(&server.addr, "GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
    assert!(health.starts_with("HTTP/1.1 200"), "liveness is never shed: {health}");
    for poll in polls {
        assert_eq!(poll.join().unwrap().0, 204);
    }
    assert_eq!(support::get(&server.addr, "/api/v1/jobs", &submitter).0, 200);
}

#[test]
fn a_request_past_its_timeout_gets_503() {
    let server =
        Server::start("timeout", "http: { request_timeout_ms: 300 }\n", &["--enable-fault-injection"]);
    let (status, _) = server.post("/api/v1/admin/faults", ADMIN, json!({"safety": "slow", "delay_ms": 4000}));
    assert_eq!(status, 200);
    let submitter = server.key("acme", "s", &["submitter"]);
    let started = Instant::now();
    let (status, body) = server.post(
        "/api/v1/jobs",
        &submitter,
        json!({"topic": "infra.vm.read", "env": "dev", "payload": {}}),
    );
    assert_eq!((status, body["error"].as_str()), (503, Some("request_timeout")), "{body}");
    assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
}

#[test]
fn shutdown_drains_for_a_bounded_time() {
    let mut server = Server::start("drain", "http: { drain_timeout_ms: 1000 }\n", &[]);
    let worker = server.key("acme", "w", &["worker"]);
    let _idle = connect(&server.addr);
    let (addr, key) = (server.addr.clone(), worker.clone());
    let poll = std::thread::spawn(move || {
        support::try_call(
            &addr,
            "/api/v1/workers/claim",
            &key,
            Some("{\"wait_ms\": 20000}"),
            Duration::from_secs(25),
        )
    });
    std::thread::sleep(Duration::from_millis(300));
    let (took, clean) = server.terminate();
    assert!(clean, "a drained stop exits 0");
    assert!(took < Duration::from_secs(3), "SIGTERM waited {took:?} for a 20 s long-poll");
    let _ = poll.join();
}

#[test]
fn unknown_methods_are_counted_as_other() {
    let server = Server::start("method", "", &[]);
    let text = raw(&server.addr, "BREW /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
    assert!(text.starts_with("HTTP/1.1 405"), "{text}");
    let (_, metrics) = support::get(&server.addr, "/metrics", "");
    let metrics = metrics.as_str().unwrap();
    assert!(!metrics.contains("BREW"), "{metrics}");
    assert!(metrics.contains("method=\"other\""), "{metrics}");
}

/// A simulate body for a job of the seed's public-ingress shape.
fn ingress_job() -> Value {
    json!({"topic": "infra.security_group.update", "env": "production", "payload": {"cidr": "0.0.0.0/0"}})
}

#[test]
fn a_candidate_policy_needs_the_operator_role() {
    let server = Server::start("candidate-role", "", &[]);
    let submitter = server.key("acme", "s", &["submitter"]);
    let operator = server.key("acme", "o", &["operator"]);
    let candidate = "version: v1\nrules: []\n";
    for path in ["/api/v1/policy/simulate", "/api/v1/policy/explain"] {
        let (status, body) =
            server.post(path, &submitter, json!({"job": ingress_job(), "policy": candidate}));
        assert_eq!((status, body["error"].as_str()), (403, Some("forbidden")), "{path}: {body}");
        assert!(body["message"].as_str().unwrap().contains("operator"), "{body}");
        let (status, body) = server.post(path, &submitter, json!({"job": ingress_job()}));
        assert_eq!(status, 200, "{path} against the active snapshot: {body}");
        let (status, body) = server.post(path, &operator, json!({"job": ingress_job(), "policy": candidate}));
        assert_eq!((status, body["decision"].as_str()), (200, Some("allow")), "{path}: {body}");
    }
}

#[test]
fn a_candidate_body_over_1_mib_gets_413() {
    let server = Server::start("candidate-size", "", &[]);
    let operator = server.key("acme", "o", &["operator"]);
    let padding = format!("version: v1\n# {}\nrules: []\n", "x".repeat(1024 * 1024));
    let (status, body) =
        server.post("/api/v1/policy/simulate", &operator, json!({"job": ingress_job(), "policy": padding}));
    assert_eq!((status, body["limit_bytes"].as_u64()), (413, Some(1024 * 1024)), "{body}");
}

/// A candidate policy with `n` rules, each testing `payload.name` against its own regex.
fn regex_policy(n: usize, pattern: &str) -> String {
    let mut text = String::from("version: v1\nrules:\n");
    for i in 0..n {
        text.push_str(&format!(
            "  - id: r{i}\n    when: {{ topic: infra.x.y, name: {{ regex: '{pattern}{i}' }} }}\n    decision: deny\n"
        ));
    }
    text
}

#[test]
fn heavy_candidate_regexes_are_refused_within_the_policy_budget() {
    let server = Server::start("candidate-regex", "", &[]);
    let operator = server.key("acme", "o", &["operator"]);
    // Each regex is under the per-regex limit; together they are far over the policy's budget.
    let heavy = regex_policy(200, "\\w{10}\\d{10}");
    let started = Instant::now();
    let (status, body) =
        server.post("/api/v1/policy/simulate", &operator, json!({"job": ingress_job(), "policy": heavy}));
    let took = started.elapsed();
    assert_eq!((status, body["error"].as_str()), (422, Some("over_budget")), "{body}");
    assert!(body["message"].as_str().unwrap().contains("regexes need more than"), "{body}");
    assert!(took < Duration::from_millis(2500), "refusing took {took:?}");
    // A modest one is answered.
    let (status, body) = server.post(
        "/api/v1/policy/simulate",
        &operator,
        json!({"job": ingress_job(), "policy": regex_policy(20, "^db-[a-z]+-")}),
    );
    assert_eq!(status, 200, "{body}");
}

#[test]
fn a_candidate_over_the_time_budget_gets_422() {
    let server = Server::start("candidate-time", "dry_run: { budget_ms: 1 }\n", &[]);
    let operator = server.key("acme", "o", &["operator"]);
    let (status, body) = server.post(
        "/api/v1/policy/explain",
        &operator,
        json!({"job": ingress_job(), "policy": regex_policy(3000, "^x")}),
    );
    assert_eq!((status, body["error"].as_str()), (422, Some("over_budget")), "{body}");
    assert!(body["message"].as_str().unwrap().contains("time budget"), "{body}");
}

/// A raw request's status line and lower-cased headers.
fn head(text: &str) -> (String, String) {
    let (status, rest) = text.split_once("\r\n").unwrap_or((text, ""));
    (status.to_owned(), rest.split("\r\n\r\n").next().unwrap_or_default().to_ascii_lowercase())
}

#[test]
fn unauthenticated_answers_carry_www_authenticate() {
    let server = Server::start("www-auth", "", &[]);
    for auth in ["", "authorization: Basic Zm9vOmJhcg==\r\n", "authorization: Bearer ak_nope\r\n"] {
        let text = raw(
            &server.addr,
            &format!("GET /api/v1/jobs HTTP/1.1\r\nhost: x\r\n{auth}connection: close\r\n\r\n"),
        );
        let (status, headers) = head(&text);
        assert!(status.starts_with("HTTP/1.1 401"), "{text}");
        assert!(headers.contains("www-authenticate: bearer"), "{text}");
    }
}

#[test]
fn failed_authentications_are_logged_and_rate_limited_per_source() {
    let server = Server::start("auth-limit", "auth: { failures_per_minute: 5 }\n", &[]);
    let good = server.key("acme", "s", &["submitter"]);
    let guess = |n: usize| format!("ak_{n:064x}");
    for n in 0..5 {
        let (status, body) = support::get(&server.addr, "/api/v1/jobs", &guess(n));
        assert_eq!(status, 401, "{body}");
    }
    let text = raw(
        &server.addr,
        &format!(
            "GET /api/v1/jobs HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\nconnection: close\r\n\r\n",
            guess(5)
        ),
    );
    let (status, headers) = head(&text);
    assert!(status.starts_with("HTTP/1.1 429"), "{text}");
    assert!(headers.contains("retry-after: "), "{text}");
    // While the address is blocked, no key from it is checked: no oracle for a guess.
    let (status, body) = support::get(&server.addr, "/api/v1/jobs", &good);
    assert_eq!((status, body["error"].as_str()), (429, Some("too_many_auth_failures")), "{body}");
    let log = server.log();
    assert_eq!(log.matches("authentication failed").count(), 5, "{log}");
    assert!(log.contains("key_prefix=ak_0000"), "{log}");
    assert!(!log.contains(&guess(1)), "a presented key is never logged whole: {log}");
}

/// The repository's example policies.
fn example(name: &str) -> String {
    format!("{}/../../examples/policies/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn submit(server: &Server, key: &str, topic: &str, env: &str, cidr: Value) -> (u16, Value) {
    server.post("/api/v1/jobs", key, json!({"topic": topic, "env": env, "payload": {"cidr": cidr}}))
}

#[test]
fn case_padding_and_lists_cannot_slip_past_the_seed_deny() {
    let server = Server::start("seed-variants", "", &[]);
    let agent = server.key("acme", "agent", &["submitter"]);
    let sg = "infra.security_group.update";
    for (topic, env, cidr) in [
        (sg, "Production", json!("0.0.0.0/0")),
        (sg, " production ", json!("0.0.0.0/0")),
        ("INFRA.security_group.update", "production", json!("0.0.0.0/0")),
        (sg, "production", json!(["0.0.0.0/0"])),
    ] {
        let (status, body) = submit(&server, &agent, topic, env, cidr.clone());
        assert_eq!(
            (status, body["error"].as_str()),
            (403, Some("policy_denied")),
            "{topic} {env:?} {cidr}: {body}"
        );
    }
    // Accepted jobs are stored normalised.
    let (status, body) = submit(&server, &agent, "Infra.VM.Create", " Staging", json!("10.0.0.0/8"));
    assert_eq!(status, 202, "{body}");
    let (_, job) =
        support::get(&server.addr, &format!("/api/v1/jobs/{}", body["job_id"].as_str().unwrap()), &agent);
    assert_eq!(
        (job["topic"].as_str(), job["env"].as_str()),
        (Some("infra.vm.create"), Some("staging")),
        "{job}"
    );
    let (status, body) = submit(&server, &agent, "infra.vm.create", "stag ing", json!("10.0.0.0/8"));
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["fields"][0]["field"], "env", "{body}");
}

#[test]
fn the_hardened_seed_denies_every_variant_of_the_issue() {
    let policy = example("seed-hardened.yaml");
    let server = Server::start("hardened", "", &["--policy", &policy]);
    let agent = server.key("acme", "agent", &["submitter"]);
    let sg = "infra.security_group.update";
    for cidr in [
        json!(" 0.0.0.0/0"),
        json!("0.0.0.0/00"),
        json!(["0.0.0.0/0"]),
        json!("::/0"),
        json!("010.0.0.0/8"),
        json!("10.0.0.0/8\n"),
        json!("::ffff:8.8.8.8"),
        json!(["10.0.0.0/8", "0.0.0.0/0"]),
    ] {
        let (status, body) = submit(&server, &agent, sg, "production", cidr.clone());
        assert_eq!((status, body["error"].as_str()), (403, Some("policy_denied")), "{cidr}: {body}");
    }
    for cidr in [json!("10.1.0.0/16"), json!("::ffff:10.0.0.1")] {
        let (status, body) = submit(&server, &agent, sg, "production", cidr.clone());
        assert_eq!(status, 202, "{cidr}: {body}");
    }
}

#[test]
fn policy_check_warns_on_the_seed_text_comparison() {
    let out = Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args(["policy", "check", &example("seed.yaml")])
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "warnings do not fail the check: {text}");
    assert!(text.contains("`0.0.0.0/0`, which is a network"), "{text}");
    assert!(text.contains("cidr_overlaps"), "{text}");
    let out = Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args(["policy", "check", &example("seed-hardened.yaml")])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("warning"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A raw request with `method`, `path` and `key`: the status code and the body.
fn request(addr: &str, method: &str, path: &str, key: &str) -> (u16, Value) {
    let text = raw(
        addr,
        &format!(
            "{method} {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {key}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
        ),
    );
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

fn platform_admin_ids(server: &Server, admin: &str) -> Vec<String> {
    let (_, keys) = support::get(&server.addr, "/api/v1/keys", admin);
    keys["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["tenant"] == "platform" && k["revoked_at"].is_null())
        .map(|k| k["id"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn the_last_platform_admin_key_cannot_be_revoked() {
    let server = Server::start("last-admin", "", &[]);
    let only = platform_admin_ids(&server, ADMIN);
    assert_eq!(only.len(), 1);
    let (status, body) = request(&server.addr, "DELETE", &format!("/api/v1/keys/{}", only[0]), ADMIN);
    assert_eq!((status, body["error"].as_str()), (409, Some("last_platform_admin")), "{body}");
    let second = server.key("platform", "second-admin", &["admin"]);
    let (status, body) = request(&server.addr, "DELETE", &format!("/api/v1/keys/{}", only[0]), &second);
    assert_eq!(status, 200, "with another admin the first may go: {body}");
    let left = platform_admin_ids(&server, &second);
    let (status, body) = request(&server.addr, "DELETE", &format!("/api/v1/keys/{}", left[0]), &second);
    assert_eq!((status, body["error"].as_str()), (409, Some("last_platform_admin")), "{body}");
}

#[test]
fn admin_recover_mints_an_audited_key_offline() {
    let mut server = Server::start("recover", "", &[]);
    let data = server.data.clone();
    server.terminate();
    let out = Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args(["admin", "recover", "--data"])
        .arg(data.join("store"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let key = stdout.rsplit(' ').next().unwrap().trim().to_owned();
    assert!(key.starts_with("ak_"), "{stdout}");
    let server = Server::start_in(data, "", &[], None);
    let (status, body) = support::get(&server.addr, "/api/v1/keys", &key);
    assert_eq!(status, 200, "the recovered key is a platform admin: {body}");
    let (_, audit) = support::get(&server.addr, "/api/v1/audit?tenant=platform&limit=500", &key);
    let recovered: Vec<&Value> =
        audit["records"].as_array().unwrap().iter().filter(|r| r["kind"] == "key.recovered").collect();
    assert_eq!(recovered.len(), 1, "{audit}");
    assert_eq!(recovered[0]["actor"], "airlock admin recover");
    let missing = Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args(["admin", "recover", "--data", "/nonexistent"])
        .output()
        .unwrap();
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no Airlock store in `/nonexistent`"));
}

#[test]
fn fault_injection_is_audited() {
    let server = Server::start("fault-audit", "", &["--enable-fault-injection"]);
    let (status, _) = server.post("/api/v1/admin/faults", ADMIN, json!({"safety": "unavailable"}));
    assert_eq!(status, 200);
    let (_, audit) = support::get(&server.addr, "/api/v1/audit?tenant=platform&limit=500", ADMIN);
    let records = audit["records"].as_array().unwrap();
    let fault =
        records.iter().find(|r| r["kind"] == "safety.fault_injected").unwrap_or_else(|| panic!("{audit}"));
    assert_eq!(fault["data"]["safety"], "unavailable", "{fault}");
}

#[test]
fn the_data_directory_and_its_files_are_private() {
    use std::os::unix::fs::PermissionsExt as _;
    let server = Server::start("perms", "", &[]);
    let agent = server.key("acme", "agent", &["submitter"]);
    assert_eq!(submit(&server, &agent, "infra.vm.create", "dev", json!("10.0.0.0/8")).0, 202);
    let store = server.data.join("store");
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&store), 0o700, "{}", store.display());
    let files: Vec<_> = std::fs::read_dir(&store).unwrap().map(|e| e.unwrap().path()).collect();
    assert!(files.len() >= 2, "{files:?}");
    for file in files {
        assert_eq!(mode(&file), 0o600, "{}", file.display());
    }
}

#[test]
fn metrics_can_require_a_key_and_alerted_counters_start_at_zero() {
    let server = Server::start("metrics-key", "metrics: { require_key: true }\n", &[]);
    let (status, _) = request(&server.addr, "GET", "/metrics", "");
    assert_eq!(status, 401);
    let agent = server.key("acme", "agent", &["submitter"]);
    let (status, text) = support::get(&server.addr, "/metrics", &agent);
    assert_eq!(status, 200);
    let text = text.as_str().unwrap();
    assert!(
        text.contains("airlock_safety_check_failures_total{gate=\"b\",reason=\"unavailable\"} 0\n"),
        "{text}"
    );
    assert!(text.contains("airlock_approvals_stale_total 0\n"), "{text}");
    assert_eq!(submit(&server, &agent, "infra.vm.create", "dev", json!("10.0.0.0/8")).0, 202);
    let (_, text) = support::get(&server.addr, "/metrics", &agent);
    let text = text.as_str().unwrap();
    assert!(
        text.contains("airlock_scheduler_input_fail_open_total{topic=\"infra.vm.create\"} 0\n"),
        "{text}"
    );
    assert!(!text.contains("acme"), "tenant names never appear in metric labels: {text}");
}

/// The Prometheus server binary (Debian's package, installed by `.ci/run`).
const PROMETHEUS_BIN: &str = "/usr/bin/prometheus";

/// A Prometheus process this test started; killed when dropped.
struct Prometheus {
    child: Child,
    addr: String,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// Scrapes `target` every second and evaluates `rules` every second.
    fn start(dir: &std::path::Path, target: &str, rules: &str) -> Self {
        assert!(
            std::path::Path::new(PROMETHEUS_BIN).exists(),
            "{PROMETHEUS_BIN} is required for this test (Debian's `prometheus`; `.ci/run` installs it)"
        );
        std::fs::write(dir.join("rules.yml"), rules).unwrap();
        std::fs::write(
            dir.join("prometheus.yml"),
            format!(
                "global: {{ scrape_interval: 1s, evaluation_interval: 1s }}\nrule_files: [\"{}\"]\n\
                 scrape_configs:\n  - job_name: airlock\n    static_configs: [{{ targets: [\"{target}\"] }}]\n",
                dir.join("rules.yml").display()
            ),
        )
        .unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let addr = format!("127.0.0.1:{port}");
        let child = Command::new(PROMETHEUS_BIN)
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("tsdb").display()))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
            .spawn()
            .unwrap();
        let prometheus = Self { child, addr };
        assert!(
            support::wait_reachable(&prometheus.addr, Duration::from_secs(20)),
            "Prometheus did not start"
        );
        prometheus
    }

    fn api(&self, path: &str) -> Value {
        let (status, body) = support::get(&self.addr, path, "");
        assert_eq!(status, 200, "{path}: {body}");
        body
    }

    /// Waits until `query` has a sample, and returns its value.
    fn wait_for(&self, query: &str, within: Duration) -> f64 {
        let deadline = Instant::now() + within;
        loop {
            let body = self.api(&format!(
                "/api/v1/query?query={}",
                query.replace('"', "%22").replace('{', "%7B").replace('}', "%7D")
            ));
            if let Some(value) = body["data"]["result"][0]["value"][1].as_str() {
                return value.parse().unwrap();
            }
            assert!(Instant::now() < deadline, "no sample of `{query}` within {within:?}: {body}");
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

#[test]
fn a_real_prometheus_fires_the_seed_alert_on_the_first_fail_open_dispatch() {
    let config = "gate_b: { fail_mode_topics: { \"infra.vm.*\": open } }\n";
    let server = Server::start("prometheus", config, &["--enable-fault-injection"]);
    let rules = "groups:\n  - name: airlock\n    rules:\n      - alert: AirlockFailOpenDispatch\n        \
                 expr: 'sum(rate(airlock_scheduler_input_fail_open_total{topic=~\"infra.*\"}[5m])) > 0'\n";
    let prometheus = Prometheus::start(&server.data, &server.addr, rules);
    let agent = server.key("acme", "agent", &["submitter"]);
    let worker = server.key("acme", "worker", &["worker"]);
    assert_eq!(submit(&server, &agent, "infra.vm.create", "dev", json!("10.0.0.0/8")).0, 202);
    // Prometheus has seen the series at 0 before the dispatch.
    let series = "airlock_scheduler_input_fail_open_total{topic=\"infra.vm.create\"}";
    assert_eq!(prometheus.wait_for(series, Duration::from_secs(20)), 0.0);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(server.post("/api/v1/admin/faults", ADMIN, json!({"safety": "unavailable"})).0, 200);
    let (status, leased) = server.post("/api/v1/workers/claim", &worker, json!({"wait_ms": 2000}));
    assert_eq!(status, 200, "the job is dispatched fail-open: {leased}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let alerts = prometheus.api("/api/v1/alerts");
        let firing = alerts["data"]["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["labels"]["alertname"] == "AirlockFailOpenDispatch" && a["state"] == "firing");
        if firing {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the alert did not fire on the first fail-open dispatch: {alerts}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(prometheus.wait_for(series, Duration::from_secs(5)), 1.0);
}

/// `airlock audit verify --data DIR [ARGS]`: whether it passed, and what it printed.
fn audit_verify(data: &std::path::Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args(["audit", "verify", "--data"])
        .arg(data)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
    )
}

/// A copy of a stopped server's store, changed by `tamper` as a database writer could.
fn tampered(store: &std::path::Path, name: &str, tamper: impl FnOnce(&rusqlite::Connection)) -> PathBuf {
    let copy = store.with_file_name(name);
    let _ = std::fs::remove_dir_all(&copy);
    std::fs::create_dir_all(&copy).unwrap();
    for entry in std::fs::read_dir(store).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, copy.join(path.file_name().unwrap())).unwrap();
    }
    tamper(&rusqlite::Connection::open(copy.join("airlock.db")).unwrap());
    copy
}

/// Rewrites record `seq` of `tenant` with `edit` and recomputes every hash after it, and the
/// head: what the chains alone cannot catch.
fn rewrite_and_recompute(
    conn: &rusqlite::Connection,
    tenant: &str,
    seq: i64,
    edit: impl Fn(&mut airlock_core::audit::Draft),
) {
    let mut rows: Vec<(i64, airlock_core::audit::Draft, String)> = conn
        .prepare(
            "SELECT seq, at, kind, subject, actor, data, prev_hash FROM audit WHERE tenant = ?1 ORDER BY seq",
        )
        .unwrap()
        .query_map([tenant], |r| {
            let data: String = r.get(5)?;
            let draft = airlock_core::audit::Draft {
                at: r.get(1)?,
                kind: r.get::<_, String>(2)?.parse().unwrap(),
                subject: r.get(3)?,
                actor: r.get(4)?,
                data: serde_json::from_str(&data).unwrap(),
            };
            Ok((r.get(0)?, draft, r.get(6)?))
        })
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let mut prev = rows[0].2.clone();
    for (s, draft, _) in &mut rows {
        if *s == seq {
            edit(draft);
        }
        let hash = airlock_core::audit::hash(tenant, s.unsigned_abs(), draft, &prev);
        conn.execute(
            "UPDATE audit SET kind = ?1, data = ?2, prev_hash = ?3, hash = ?4 WHERE tenant = ?5 AND seq = ?6",
            rusqlite::params![draft.kind.as_str(), draft.data.to_string(), prev, hash, tenant, *s],
        )
        .unwrap();
        prev = hash;
    }
    conn.execute("UPDATE audit_heads SET hash = ?1 WHERE tenant = ?2", rusqlite::params![prev, tenant])
        .unwrap();
}

#[test]
fn signed_checkpoints_catch_what_a_database_writer_can_do_to_the_chains() {
    let data = support::temp_dir("harden-audit-sign");
    let (key_file, export) = (data.join("audit.key"), data.join("checkpoints"));
    let args = ["--audit-key", key_file.to_str().unwrap(), "--audit-export", export.to_str().unwrap()];
    let mut server = Server::start_in(data.clone(), "audit: { checkpoint_ms: 200 }\n", &args, None);
    let agent = server.key("acme", "agent", &["submitter"]);
    assert_eq!(submit(&server, &agent, "infra.vm.create", "dev", json!("10.0.0.0/8")).0, 202);
    let denied = submit(&server, &agent, "infra.security_group.update", "production", json!("0.0.0.0/0"));
    assert_eq!(denied.0, 403);
    assert_eq!(submit(&server, &agent, "infra.vm.create", "dev", json!("10.1.0.0/16")).0, 202);
    std::thread::sleep(Duration::from_millis(600));
    let (_, clean) = server.terminate();
    assert!(clean);
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key_file).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "the generated audit key is private");
    let printed = std::fs::read_to_string(data.join("stdout.log")).unwrap();
    let public_key = printed
        .lines()
        .find_map(|l| l.split("public key (for `audit verify --public-key`): ").nth(1))
        .unwrap_or_else(|| panic!("no public key printed: {printed}"))
        .trim()
        .to_owned();
    let checkpoints = ["--public-key", public_key.as_str(), "--checkpoints", export.to_str().unwrap()];
    let store = data.join("store");
    let (ok, report) = audit_verify(&store, &checkpoints);
    assert!(ok, "{report}");
    assert!(report.contains("every signed head is in the store"), "{report}");

    // Truncation: the tail record and the head moved back, consistently.
    let truncated = tampered(&store, "truncated", |c| {
        c.execute_batch(
            "DELETE FROM audit WHERE tenant = 'acme' AND seq = (SELECT MAX(seq) FROM audit WHERE tenant = 'acme');
             UPDATE audit_heads SET seq = seq - 1, hash = (SELECT hash FROM audit a WHERE a.tenant = 'acme' AND a.seq = audit_heads.seq - 1) WHERE tenant = 'acme';",
        )
        .unwrap();
    });
    assert!(audit_verify(&truncated, &[]).0, "the chains alone do not see a truncation");
    let (ok, report) = audit_verify(&truncated, &checkpoints);
    assert!(!ok && report.contains("tenant `acme`: truncated"), "{report}");

    // A whole tenant deleted.
    let deleted = tampered(&store, "deleted", |c| {
        c.execute_batch(
            "DELETE FROM audit WHERE tenant = 'acme'; DELETE FROM audit_heads WHERE tenant = 'acme';",
        )
        .unwrap();
    });
    assert!(audit_verify(&deleted, &[]).0, "the chains alone do not see a deleted tenant");
    let (ok, report) = audit_verify(&deleted, &checkpoints);
    assert!(!ok && report.contains("tenant `acme`: its chain is gone"), "{report}");

    // A denial rewritten as an allow, every later hash recomputed.
    let rewritten = tampered(&store, "rewritten", |c| {
        let seq: i64 = c
            .query_row(
                "SELECT seq FROM audit WHERE tenant = 'acme' AND data LIKE '%\"deny\"%' ORDER BY seq LIMIT 1",
                [],
                |r| r.get(0),
            )
            .unwrap();
        rewrite_and_recompute(c, "acme", seq, |d| {
            d.data = serde_json::from_str(&d.data.to_string().replace("\"deny\"", "\"allow\"")).unwrap();
        });
    });
    assert!(audit_verify(&rewritten, &[]).0, "the chains alone do not see a recomputed chain");
    let (ok, report) = audit_verify(&rewritten, &checkpoints);
    assert!(!ok && report.contains("tenant `acme`: rewritten"), "{report}");

    // Another key's checkpoints do not count.
    let other = "00".repeat(32);
    let (ok, report) =
        audit_verify(&store, &["--public-key", &other, "--checkpoints", export.to_str().unwrap()]);
    assert!(!ok && report.contains("does not verify"), "{report}");
}

/// The stored hash of the key named `name`.
fn stored_hash(store: &std::path::Path, name: &str) -> Vec<u8> {
    let conn = rusqlite::Connection::open(store.join("airlock.db")).unwrap();
    conn.query_row("SELECT secret_hash FROM api_keys WHERE name = ?1", [name], |r| r.get(0)).unwrap()
}

#[test]
fn key_hashes_are_peppered_and_old_hashes_are_upgraded() {
    use sha2::Digest as _;
    let mut server = Server::start("pepper", "", &[]);
    let data = server.data.clone();
    let store = data.join("store");
    let agent = server.key("acme", "agent", &["submitter"]);
    server.terminate();
    let plain = sha2::Sha256::digest(agent.as_bytes()).to_vec();
    let peppered = stored_hash(&store, "agent");
    assert_ne!(peppered, plain, "a stored hash is not the plain SHA-256 of the key");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(store.join("key-pepper")).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);

    // A key stored before the pepper (plain SHA-256) still works, once, and is re-hashed.
    let conn = rusqlite::Connection::open(store.join("airlock.db")).unwrap();
    conn.execute("UPDATE api_keys SET secret_hash = ?1 WHERE name = 'agent'", [&plain]).unwrap();
    drop(conn);
    let server = Server::start_in(data, "", &[], None);
    assert_eq!(support::get(&server.addr, "/api/v1/jobs", &agent).0, 200);
    assert_eq!(stored_hash(&store, "agent"), peppered, "re-hashed with the pepper");
    assert_eq!(support::get(&server.addr, "/api/v1/jobs", &agent).0, 200);
}

#[test]
fn the_policy_source_is_for_operators_and_fail_open_counts_as_bypassed() {
    let config = "gate_b: { fail_mode_topics: { \"infra.vm.*\": open } }\n";
    let server = Server::start("visibility", config, &["--enable-fault-injection"]);
    let submitter = server.key("acme", "agent", &["submitter"]);
    let operator = server.key("acme", "ops", &["operator"]);
    let worker = server.key("acme", "worker", &["worker"]);
    let (_, seen) = support::get(&server.addr, "/api/v1/policy/snapshots", &submitter);
    assert!(seen["active"]["source"].is_null() && seen["active"]["hash"].is_string(), "{seen}");
    let (_, seen) = support::get(&server.addr, "/api/v1/policy/snapshots", &operator);
    assert!(seen["active"]["source"].as_str().unwrap().contains("deny-prod-public-ingress"), "{seen}");

    assert_eq!(submit(&server, &submitter, "infra.vm.create", "dev", json!("10.0.0.0/8")).0, 202);
    assert_eq!(server.post("/api/v1/admin/faults", ADMIN, json!({"safety": "unavailable"})).0, 200);
    assert_eq!(server.post("/api/v1/workers/claim", &worker, json!({"wait_ms": 2000})).0, 200);
    let bypassed = "airlock_gate_decisions_total{gate=\"b\",decision=\"bypassed\",topic=\"infra.vm.create\"}";
    assert_eq!(support::metric(&server.addr, bypassed), 1.0);
}

#[test]
fn simulate_takes_the_seed_article_body_and_names_every_missing_field() {
    let server = Server::start("article-body", "", &[]);
    let agent = server.key("acme", "agent", &["submitter"]);
    let (status, body) = server.post(
        "/api/v1/policy/simulate",
        &agent,
        json!({"topic": "infra.resource.delete", "tenant": "prod"}),
    );
    assert_eq!(status, 400, "{body}");
    let fields: Vec<&str> =
        body["fields"].as_array().unwrap().iter().map(|f| f["field"].as_str().unwrap()).collect();
    assert_eq!(fields, ["tenant", "env"], "{body}");
    let (status, body) = server.post(
        "/api/v1/policy/simulate",
        &agent,
        json!({"topic": "infra.resource.delete", "env": "production", "tenant": "acme"}),
    );
    assert_eq!((status, body["decision"].as_str()), (200, Some("require_human")), "{body}");
}

#[test]
fn rollback_says_what_is_wrong_with_a_version() {
    let server = Server::start("rollback", "", &[]);
    for (version, expected) in [
        (json!(1.0), "`1.0` is not a snapshot version"),
        (json!("1"), "`\"1\"` is not"),
        (Value::Null, "is required"),
    ] {
        let (status, body) = server.post("/api/v1/policy/rollback", ADMIN, json!({"version": version}));
        assert_eq!(status, 400, "{body}");
        assert!(body["fields"][0]["message"].as_str().unwrap().contains(expected), "{version}: {body}");
    }
}
