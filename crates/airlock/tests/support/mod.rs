//! What the tests through the real binary share: starting `airlock` processes that are killed
//! when dropped, and JSON calls to them over loopback.

#![allow(dead_code, reason = "each test file uses the part it needs")]
#![allow(clippy::unwrap_used, clippy::panic, reason = "a test fails by panicking")]

use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

/// A process this test started; killed (by its own handle) when dropped.
pub struct Process(pub Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `airlock ARGS` with `ENV`, and reads the address from the first stdout line that
/// says `listening on http://ADDR` (`airlock listening on …`, `airlock safety service listening
/// on …`) or `https://ADDR`. The rest of stdout is drained, so the process never writes into a
/// closed pipe.
pub fn airlock(args: &[&str], env: &[(&str, &str)]) -> (Process, String) {
    let (process, addr, _) = airlock_printing(args, env);
    (process, addr)
}

/// [`airlock`] for a process that may listen on HTTPS: the address from the first line that
/// says `listening on http://ADDR` or `https://ADDR`, and the lines printed before it.
pub fn airlock_printing(args: &[&str], env: &[(&str, &str)]) -> (Process, String, Vec<String>) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_airlock"));
    command.args(args).env("RUST_LOG", "error").stdout(Stdio::piped()).stderr(Stdio::inherit());
    for (k, v) in env {
        command.env(k, v);
    }
    let mut child = command.spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let process = Process(child);
    let mut before = Vec::new();
    let addr = loop {
        let line = lines
            .next()
            .and_then(Result::ok)
            .unwrap_or_else(|| panic!("`airlock {}` exited before printing its address", args.join(" ")));
        let listening = line.split("listening on ").nth(1).and_then(|rest| rest.split("://").nth(1));
        if let Some(rest) = listening {
            break rest.split_whitespace().next().unwrap().to_owned();
        }
        before.push(line);
    };
    std::thread::spawn(move || lines.for_each(drop));
    (process, addr, before)
}

/// An `airlock serve` replica on `store` (a `postgres://` URL), killed when dropped.
pub struct Replica {
    _process: Process,
    pub addr: String,
}

/// Starts a replica with `config` and the platform admin key `admin`; its logs are off, since
/// fault tests make it log every failed request.
pub fn replica(store: &str, config: &std::path::Path, admin: &str) -> Replica {
    replica_with(store, config, admin, &[])
}

/// [`replica`] with more `serve` arguments (`--role gateway`, `--bus nats://…`).
pub fn replica_with(store: &str, config: &std::path::Path, admin: &str, extra: &[&str]) -> Replica {
    let config = config.to_str().unwrap();
    let mut args = vec!["serve", "--listen", "127.0.0.1:0", "--store", store, "--config", config];
    args.extend_from_slice(extra);
    let (process, addr) = airlock(&args, &[("AIRLOCK_ADMIN_KEY", admin), ("RUST_LOG", "off")]);
    Replica { _process: process, addr }
}

/// One call: POST `body` when given, GET otherwise. `None` when the connection failed or the
/// call outlived `timeout`.
pub fn try_call(
    addr: &str,
    path: &str,
    key: &str,
    body: Option<&str>,
    timeout: Duration,
) -> Option<(u16, Value)> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(timeout))
        .build()
        .into();
    let url = format!("http://{addr}{path}");
    let auth = format!("Bearer {key}");
    let response = match body {
        Some(b) => {
            agent.post(&url).header("authorization", &auth).header("content-type", "application/json").send(b)
        }
        None => agent.get(&url).header("authorization", &auth).call(),
    };
    let mut response = response.ok()?;
    let status = response.status().as_u16();
    let text = response.body_mut().read_to_string().ok()?;
    Some((status, serde_json::from_str(&text).unwrap_or(Value::String(text))))
}

/// A POST of `body` (any JSON or text) that must reach the server.
pub fn post(addr: &str, path: &str, key: &str, body: impl std::fmt::Display) -> (u16, Value) {
    let body = body.to_string();
    try_call(addr, path, key, Some(&body), Duration::from_secs(10))
        .unwrap_or_else(|| panic!("POST {path} on {addr} failed"))
}

/// A GET that must reach the server.
pub fn get(addr: &str, path: &str, key: &str) -> (u16, Value) {
    try_call(addr, path, key, None, Duration::from_secs(10))
        .unwrap_or_else(|| panic!("GET {path} on {addr} failed"))
}

/// A key in `tenant`, created with the platform admin key `admin`.
pub fn key(addr: &str, admin: &str, tenant: &str, name: &str, roles: &[&str]) -> String {
    let (status, reply) = post(
        addr,
        "/api/v1/keys",
        admin,
        serde_json::json!({"tenant": tenant, "name": name, "roles": roles}),
    );
    assert_eq!(status, 201, "{reply}");
    reply["key"].as_str().unwrap().to_owned()
}

/// The value of one Prometheus series (0 when absent).
pub fn metric(addr: &str, series: &str) -> f64 {
    let (_, text) = get(addr, "/metrics", "");
    series_value(text.as_str().unwrap(), series)
}

/// [`metric`] of a process that may be down: `None` when `/metrics` did not answer in 3 s.
pub fn try_metric(addr: &str, series: &str) -> Option<f64> {
    let (_, text) = try_call(addr, "/metrics", "", None, Duration::from_secs(3))?;
    Some(series_value(text.as_str()?, series))
}

fn series_value(text: &str, series: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .map_or(0.0, |v| v.parse().unwrap())
}

/// A fresh directory under the system temp dir.
pub fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("airlock-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// [`post`] when `body` is given, [`get`] otherwise.
pub fn call_json(addr: &str, path: &str, key: &str, body: Option<Value>) -> (u16, Value) {
    match body {
        Some(b) => post(addr, path, key, b),
        None => get(addr, path, key),
    }
}

/// [`call_json`] for a body already rendered as text.
pub fn call_text(addr: &str, path: &str, key: &str, body: Option<String>) -> (u16, Value) {
    match body {
        Some(b) => post(addr, path, key, b),
        None => get(addr, path, key),
    }
}

/// The PostgreSQL the distributed tests use: `AIRLOCK_TEST_POSTGRES_URL`, or the local one.
pub fn postgres_url() -> String {
    std::env::var("AIRLOCK_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// `psql`, without its notices.
pub fn psql() -> Command {
    let mut command = Command::new("psql");
    command.env("PGOPTIONS", "-c client_min_messages=warning");
    command
}

/// Fails the test, saying how to start it, unless PostgreSQL answers at `base`: the
/// distributed tests never skip.
pub fn require_postgres(base: &str) {
    let status = psql().args([base, "-q", "-c", "SELECT 1"]).stdout(Stdio::null()).status();
    assert!(
        status.is_ok_and(|s| s.success()),
        "PostgreSQL must be reachable at {base} (with psql on PATH) for the distributed tests \
         (start it with `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`, \
         or set AIRLOCK_TEST_POSTGRES_URL)"
    );
}

/// A fresh PostgreSQL schema for one test, dropped at the end.
pub struct Schema {
    base: String,
    name: String,
}

impl Schema {
    pub fn create(tag: &str) -> Self {
        let base = postgres_url();
        require_postgres(&base);
        let name = format!("airlock_test_{tag}_{}", std::process::id());
        let status = psql()
            .args([&base, "-q", "-c", &format!("DROP SCHEMA IF EXISTS {name} CASCADE; CREATE SCHEMA {name}")])
            .status();
        assert!(status.is_ok_and(|s| s.success()), "cannot create schema {name} at {base}");
        Self { base, name }
    }

    /// The store URL of this schema.
    pub fn url(&self) -> String {
        let sep = if self.base.contains('?') { '&' } else { '?' };
        format!("{}{sep}options=-csearch_path%3D{}", self.base, self.name)
    }

    /// One number from a query in this schema.
    pub fn count(&self, sql: &str) -> i64 {
        self.text(sql).parse().unwrap()
    }

    /// One value from a query in this schema, as text (empty for NULL).
    pub fn text(&self, sql: &str) -> String {
        let out = psql()
            .args([&self.base, "-qtA", "-c", &format!("SET search_path = {}; {sql}", self.name)])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        let _ = psql()
            .args([&self.base, "-q", "-c", &format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name)])
            .status();
    }
}

/// The NATS server (with JetStream) the distributed tests use for `serve --bus`.
pub const NATS: &str = "127.0.0.1:4222";

/// The NATS server binary (Debian's package).
pub const NATS_BIN: &str = "/usr/sbin/nats-server";

/// Whether something listens at `addr` within `within`.
pub fn wait_reachable(addr: &str, within: Duration) -> bool {
    let deadline = std::time::Instant::now() + within;
    loop {
        if std::net::TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_millis(300)).is_ok() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts the shared NATS server (as `.ci/run` does) unless it listens at [`NATS`]; whether it
/// listens within 5 s.
pub fn start_shared_nats() -> bool {
    if !wait_reachable(NATS, Duration::ZERO) {
        let _ = Command::new("start-stop-daemon")
            .args(["--start", "--oknodo", "--background", "--exec", NATS_BIN, "--"])
            .args(["-a", "127.0.0.1", "-p", "4222", "-js", "-sd", "/var/lib/nats-server"])
            .args(["-l", "/var/log/nats-server.log"])
            .status();
    }
    wait_reachable(NATS, Duration::from_secs(5))
}

/// Fails the test unless the shared NATS server listens at [`NATS`] (started if it did not).
pub fn require_nats() {
    assert!(start_shared_nats(), "NATS with JetStream must listen on {NATS} for this test ({NATS_BIN} -js)");
}

/// A JetStream stream of one test's own (`serve --bus-stream NAME`), deleted when dropped.
/// Drop it after every replica using it: a live replica would create it again.
pub struct BusStream {
    pub name: String,
}

impl BusStream {
    pub fn new(tag: &str) -> Self {
        require_nats();
        Self { name: format!("AIRLOCK_TEST_{}_{}", tag.to_ascii_uppercase(), std::process::id()) }
    }
}

impl BusStream {
    /// How many messages the stream holds (`None` if NATS did not answer).
    pub fn messages(&self) -> Option<u64> {
        let reply = jetstream_request(&format!("STREAM.INFO.{}", self.name))?;
        let info: Value = serde_json::from_str(&reply).ok()?;
        info["state"]["messages"].as_u64()
    }
}

impl Drop for BusStream {
    fn drop(&mut self) {
        let _ = jetstream_request(&format!("STREAM.DELETE.{}", self.name));
    }
}

/// Sends `$JS.API.<api>` to the shared NATS over the plain protocol and returns the reply's
/// payload, waiting up to 2 s for it.
fn jetstream_request(api: &str) -> Option<String> {
    use std::io::{Read as _, Write as _};
    let mut c = std::net::TcpStream::connect(NATS).ok()?;
    c.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let request = format!(
        "CONNECT {{\"verbose\":false}}\r\nSUB _INBOX.api 1\r\nPUB $JS.API.{api} _INBOX.api 0\r\n\r\n"
    );
    c.write_all(request.as_bytes()).ok()?;
    let mut buf = [0_u8; 4096];
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    let mut seen = String::new();
    while std::time::Instant::now() < deadline {
        // `MSG <subject> <sid> <size>\r\n<payload>\r\n`
        if let Some(at) = seen.find("MSG ")
            && let Some(header_end) = seen[at..].find("\r\n")
        {
            let header = &seen[at..at + header_end];
            let size: usize = header.rsplit(' ').next()?.parse().ok()?;
            let body = at + header_end + 2;
            if seen.len() >= body + size {
                return Some(seen[body..body + size].to_owned());
            }
        }
        match c.read(&mut buf) {
            Ok(0) | Err(_) => return None,
            Ok(n) => seen.push_str(&String::from_utf8_lossy(buf.get(..n).unwrap_or_default())),
        }
    }
    None
}
