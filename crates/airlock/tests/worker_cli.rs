//! `airlock worker --exec` and the worker SDK against a real `airlock serve` on port 0: exit
//! codes become outcomes, a retry after `exit 75`, heartbeats that outlive the lease, cancel
//! and lost leases kill the command, SIGTERM finishes the current job, `kill -9` mid-job is
//! retried exactly once after the lease lapses (on the embedded store and on PostgreSQL), and
//! the effect ledger replays a result.

#![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic, reason = "a test fails by panicking")]

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use airlock_worker::{End, Job, Outcome, Worker, WorkerConfig};
use serde_json::{Value, json};

mod support;

const ADMIN: &str = "worker-cli-admin-key-0123456789";
/// Short leases so that lapses, heartbeats and cancels show within a second.
const SHORT_LEASES: &str = "leases: { lease_ms: 1000, heartbeat_ms: 300 }\n";
/// The longest any wait in these tests may take before it counts as a failure.
const PATIENCE: Duration = Duration::from_secs(10);

/// A running `airlock serve` over its own scratch directory; killed and cleaned up on drop.
struct Server {
    child: Child,
    url: String,
    dir: PathBuf,
    submitter: String,
    worker: String,
    agent: ureq::Agent,
    /// The PostgreSQL schema it runs on, if not on its embedded store.
    schema: Option<support::Schema>,
    // Held so the server's stdout stays open while it runs.
    _stdout: BufReader<ChildStdout>,
}

impl Server {
    fn start(name: &str, config: Option<&str>) -> Self {
        Self::start_on(name, config, None)
    }

    /// A server on `schema` when given, else on its embedded store.
    fn start_on(name: &str, config: Option<&str>, schema: Option<support::Schema>) -> Self {
        let dir = std::env::temp_dir().join(format!("airlock-worker-cli-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_airlock"));
        command.args(["serve", "--listen", "127.0.0.1:0", "--data"]).arg(dir.join("data"));
        if let Some(schema) = &schema {
            command.args(["--store", &schema.url()]);
        }
        if let Some(config) = config {
            std::fs::write(dir.join("config.yaml"), config).unwrap();
            command.arg("--config").arg(dir.join("config.yaml"));
        }
        let mut child = command
            .env("AIRLOCK_ADMIN_KEY", ADMIN)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let addr = line
            .strip_prefix("airlock listening on http://")
            .unwrap_or_else(|| panic!("unexpected first line: {line}"))
            .split_whitespace()
            .next()
            .unwrap();
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(PATIENCE))
            .build()
            .into();
        let mut server = Self {
            url: format!("http://{addr}"),
            child,
            dir,
            submitter: String::new(),
            worker: String::new(),
            agent,
            schema,
            _stdout: stdout,
        };
        server.submitter = server.key("agent", &["submitter"]);
        server.worker = server.key("runner", &["worker"]);
        server
    }

    fn call(&self, key: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let url = format!("{}{path}", self.url);
        let auth = format!("Bearer {key}");
        let mut response = match body {
            Some(body) => self
                .agent
                .post(&url)
                .header("authorization", &auth)
                .header("content-type", "application/json")
                .send(body.to_string()),
            None => self.agent.get(&url).header("authorization", &auth).call(),
        }
        .unwrap();
        let status = response.status().as_u16();
        let text = response.body_mut().read_to_string().unwrap();
        (status, if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap() })
    }

    fn key(&self, name: &str, roles: &[&str]) -> String {
        let (status, body) =
            self.call(ADMIN, "/api/v1/keys", Some(json!({"tenant": "acme", "name": name, "roles": roles})));
        assert_eq!(status, 201, "{body}");
        body["key"].as_str().unwrap().to_owned()
    }

    /// Submits an allowed job; its id.
    fn submit(&self, payload: Value, idempotency_key: &str) -> String {
        let body = json!({
            "topic": "infra.vm.create", "env": "dev", "payload": payload, "idempotency_key": idempotency_key,
        });
        let (status, answer) = self.call(&self.submitter, "/api/v1/jobs", Some(body));
        assert_eq!((status, answer["state"].as_str()), (202, Some("queued")), "{answer}");
        answer["job_id"].as_str().unwrap().to_owned()
    }

    fn job(&self, id: &str) -> Value {
        let (status, job) = self.call(&self.submitter, &format!("/api/v1/jobs/{id}"), None);
        assert_eq!(status, 200, "{job}");
        job
    }

    /// Waits for a job to reach `state`; the job then.
    fn wait_for(&self, id: &str, state: &str) -> Value {
        let start = Instant::now();
        loop {
            let job = self.job(id);
            if job["state"] == state {
                return job;
            }
            assert!(start.elapsed() < PATIENCE, "job {id} never became `{state}`: {job:#}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn cancel(&self, id: &str) {
        let (status, body) =
            self.call(&self.submitter, &format!("/api/v1/jobs/{id}/cancel"), Some(json!({})));
        assert_eq!(status, 200, "{body}");
    }

    /// The result the worker reported, as stored (the job API does not show it).
    fn result(&self, id: &str) -> Value {
        let text: Option<String> = match &self.schema {
            Some(schema) => Some(schema.text(&format!("SELECT result FROM jobs WHERE id = '{id}'")))
                .filter(|t| !t.is_empty()),
            None => {
                let db = rusqlite::Connection::open(self.dir.join("data").join("airlock.db")).unwrap();
                db.query_row("SELECT result FROM jobs WHERE id = ?1", [id], |row| row.get(0)).unwrap()
            }
        };
        serde_json::from_str(&text.unwrap_or_else(|| panic!("job {id} has no result"))).unwrap()
    }

    /// A shell-quoted path in the scratch directory.
    fn path(&self, name: &str) -> String {
        format!("'{}'", self.dir.join(name).display())
    }

    /// `airlock worker --exec COMMAND` with this server's worker key.
    fn worker(&self, command: &str, extra: &[&str]) -> WorkerProcess {
        let mut child = Command::new(env!("CARGO_BIN_EXE_airlock"))
            .args(["worker", "--pool", "default", "--wait-ms", "500", "--exec", command])
            .args(extra)
            .env("AIRLOCK_URL", &self.url)
            .env("AIRLOCK_API_KEY", &self.worker)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let lines = Arc::new(Mutex::new(Vec::new()));
        let shared = Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                shared.lock().unwrap().push(line);
            }
        });
        WorkerProcess { child, lines }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A running `airlock worker`, killed by PID on drop, with its stderr lines.
struct WorkerProcess {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl WorkerProcess {
    /// Waits for a stderr line containing every one of `parts`; that line.
    fn line(&self, parts: &[&str]) -> String {
        let start = Instant::now();
        loop {
            if let Some(line) =
                self.lines.lock().unwrap().iter().find(|l| parts.iter().all(|p| l.contains(p)))
            {
                return line.clone();
            }
            assert!(
                start.elapsed() < PATIENCE,
                "no line with {parts:?} in {:#?}",
                self.lines.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn signal(&self, name: &str) {
        signal(self.child.id(), name);
    }

    fn wait_exit(&mut self) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(start.elapsed() < PATIENCE, "the worker did not exit: {:#?}", self.lines.lock().unwrap());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Kills, on drop, the process whose PID a command wrote to a file (a command that outlives
/// a `kill -9`ed worker).
struct PidFile(PathBuf);

impl PidFile {
    fn wait(&self) -> u32 {
        let start = Instant::now();
        loop {
            if let Ok(pid) = std::fs::read_to_string(&self.0).unwrap_or_default().trim().parse() {
                return pid;
            }
            assert!(start.elapsed() < PATIENCE, "{} never held a PID", self.0.display());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(&self.0).unwrap_or_default().trim().parse() {
            signal(pid, "KILL");
        }
    }
}

/// Sends a signal; whether the process was there to get it.
fn signal(pid: u32, name: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("kill -{name} {pid}"))
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success()
}

fn wait_file(path: &Path) {
    let start = Instant::now();
    while !path.exists() {
        assert!(start.elapsed() < PATIENCE, "{} never appeared", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The states a job went through, in order.
fn states(job: &Value) -> Vec<String> {
    job["history"].as_array().unwrap().iter().map(|t| t["to"].as_str().unwrap().to_owned()).collect()
}

fn reasons(job: &Value) -> Vec<String> {
    job["history"].as_array().unwrap().iter().map(|t| t["reason"].as_str().unwrap_or("").to_owned()).collect()
}

#[test]
fn exit_codes_become_outcomes() {
    let server = Server::start("outcomes", None);
    let flaky = server.path("flaky");
    let command = format!(
        r#"job=$(cat)
case "$job" in
  *'"mode":"echo"'*) printf '%s' "$job" ;;
  *'"mode":"flaky"'*)
    if [ -e {flaky} ]; then echo '{{"ok": true}}'; else touch {flaky}; echo 'transient trouble' >&2; exit 75; fi ;;
  *) echo 'boom: bad input' >&2; exit 3 ;;
esac"#
    );
    let echo = server.submit(json!({"mode": "echo", "size": 2}), "k-echo");
    let retried = server.submit(json!({"mode": "flaky"}), "k-flaky");
    let failed = server.submit(json!({"mode": "fail"}), "k-fail");
    let worker = server.worker(&command, &[]);

    // Exit 0: stdout is the result; here the job JSON the command got, without the token.
    let job = server.wait_for(&echo, "succeeded");
    let result = server.result(&echo);
    assert_eq!(result["job_id"], echo.as_str());
    assert_eq!((result["attempt"].as_u64(), result["topic"].as_str()), (Some(1), Some("infra.vm.create")));
    assert_eq!(
        (&result["payload"], &result["idempotency_key"]),
        (&json!({"mode": "echo", "size": 2}), &json!("k-echo"))
    );
    assert_eq!(result["job_hash"], job["job_hash"]);
    assert!(result.get("lease_token").is_none(), "{result}");
    assert!(worker.line(&[&echo, "infra.vm.create attempt 1: succeeded in"]).ends_with('s'));

    // Exit 75: retried (a second lease), then exit 0 with JSON on stdout.
    let job = server.wait_for(&retried, "succeeded");
    assert_eq!(server.result(&retried), json!({"ok": true}));
    assert_eq!(states(&job), ["queued", "leased", "queued", "leased", "succeeded"], "{job:#}");
    assert!(reasons(&job)[2].contains("exit 75: transient trouble"), "{job:#}");
    worker.line(&[&retried, "attempt 1: retryable failure (exit 75: transient trouble); job queued"]);
    worker.line(&[&retried, "attempt 2: succeeded"]);

    // Any other exit: failed for good, with stderr as the error.
    let job = server.wait_for(&failed, "failed");
    assert_eq!(states(&job), ["queued", "leased", "failed"], "{job:#}");
    assert!(reasons(&job)[2].contains("exit 3: boom: bad input"), "{job:#}");
    worker.line(&[&failed, "attempt 1: failed (exit 3: boom: bad input)"]);
}

#[test]
fn a_worker_killed_mid_job_is_retried_once_after_its_lease_lapses() {
    worker_killed_mid_job(&Server::start("kill9", Some(SHORT_LEASES)));
}

#[test]
fn a_worker_killed_mid_job_is_retried_once_after_its_lease_lapses_on_postgres() {
    let schema = support::Schema::create("kill9");
    worker_killed_mid_job(&Server::start_on("kill9-postgres", Some(SHORT_LEASES), Some(schema)));
}

fn worker_killed_mid_job(server: &Server) {
    let started = server.dir.join("started");
    // The first run records its PID and hangs (as the same process, so the guard can kill it);
    // the retry echoes the job.
    let command =
        format!("if [ -e {0} ]; then cat; else echo $$ > {0}; exec sleep 30; fi", server.path("started"));
    let orphan = PidFile(started.clone());
    let id = server.submit(json!({"mode": "slow"}), "k-kill9");
    let mut first = server.worker(&command, &[]);
    orphan.wait();
    server.wait_for(&id, "leased");
    first.child.kill().unwrap(); // SIGKILL: no report, no cleanup
    first.child.wait().unwrap();
    let killed_at = Instant::now();

    let second = server.worker(&command, &[]);
    let job = server.wait_for(&id, "succeeded");
    let elapsed = killed_at.elapsed();
    assert_eq!(server.result(&id)["attempt"], 2);
    assert_eq!(states(&job), ["queued", "leased", "queued", "leased", "succeeded"], "{job:#}");
    assert!(reasons(&job)[2].contains("lease expired"), "{job:#}");
    second.line(&[&id, "attempt 2: succeeded"]);
    // Lease 1 s after the last heartbeat, plus the once-a-second sweep.
    assert!(elapsed < Duration::from_secs(5), "retried only after {elapsed:?}");
    // The dead worker's command still runs (it got no signal), but its lease is gone.
    assert!(signal(orphan.wait(), "0"), "the orphan should still be there for the guard");
}

#[test]
fn the_sdk_heartbeats_past_the_lease_and_hears_cancel_and_shutdown() {
    let server = Server::start("sdk", Some(SHORT_LEASES));
    let worker = Worker::new(WorkerConfig {
        url: server.url.clone(),
        api_key: server.worker.clone(),
        pool: "default".into(),
        wait_ms: 2_000,
        name: "sdk-test".into(),
    })
    .unwrap();

    // Runs 2.5 s under a 1 s lease: only heartbeats keep it.
    let slow = server.submit(json!({"mode": "slow"}), "k-sdk-slow");
    let mut handler = |job: &Job| {
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(2_500) {
            if job.cancelled() {
                return Outcome::Failed("stopped".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Outcome::Success(json!({"attempt": job.attempt, "key": job.effect_key()}))
    };
    let report = worker.run_once(&mut handler).unwrap().unwrap();
    assert_eq!((report.job_id.as_str(), report.attempt), (slow.as_str(), 1));
    assert_eq!(report.end, End::Recorded { state: "succeeded".into() });
    assert!(report.duration >= Duration::from_millis(2_500));
    assert_eq!(server.result(&slow), json!({"attempt": 1, "key": "k-sdk-slow"}));
    assert_eq!(states(&server.job(&slow)), ["queued", "leased", "succeeded"]);

    // A cancel reaches the handler through the next heartbeat; nothing is reported.
    let doomed = server.submit(json!({"mode": "doomed"}), "k-sdk-cancel");
    let report = std::thread::scope(|scope| {
        scope.spawn(|| {
            server.wait_for(&doomed, "leased");
            server.cancel(&doomed);
        });
        worker
            .run_once(&mut |job: &Job| {
                let start = Instant::now();
                while !job.cancelled() {
                    if start.elapsed() > PATIENCE {
                        return Outcome::Failed("never cancelled".into());
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Outcome::Failed("cancelled".into())
            })
            .unwrap()
            .unwrap()
    });
    assert_eq!((report.job_id.as_str(), &report.end), (doomed.as_str(), &End::Cancelled));
    server.wait_for(&doomed, "cancelled");

    // Shutdown while a job runs: that job is finished and reported, the next is not claimed.
    let current = server.submit(json!({"n": 1}), "k-sdk-current");
    let next = server.submit(json!({"n": 2}), "k-sdk-next");
    let shutdown = AtomicBool::new(false);
    let mut handled = Vec::new();
    worker
        .run(
            |job: &Job| {
                shutdown.store(true, std::sync::atomic::Ordering::SeqCst);
                handled.push(job.id.clone());
                Outcome::Success(json!("done"))
            },
            &shutdown,
        )
        .unwrap();
    assert_eq!(handled.len(), 1);
    let (done, left) = if handled[0] == current { (&current, &next) } else { (&next, &current) };
    server.wait_for(done, "succeeded");
    assert_eq!(server.job(left)["state"], "queued");
}

#[test]
fn cancel_kills_the_command_and_sigterm_finishes_the_current_job() {
    let server = Server::start("signals", Some(SHORT_LEASES));
    let command = format!(
        r#"job=$(cat)
case "$job" in
  *'"mode":"hang"'*) echo $$ > {hang}; exec sleep 30 ;;
  *) touch {started}; sleep 1; printf '%s' "$job" ;;
esac"#,
        hang = server.path("hang.pid"),
        started = server.path("slow.started"),
    );
    let mut worker = server.worker(&command, &[]);

    let hang = server.submit(json!({"mode": "hang"}), "k-hang");
    let hang_pid = PidFile(server.dir.join("hang.pid"));
    let pid = hang_pid.wait();
    server.cancel(&hang);
    worker.line(&[&hang, "attempt 1: cancelled"]);
    assert!(!signal(pid, "0"), "the command {pid} still runs after the cancel");
    server.wait_for(&hang, "cancelled");

    let slow = server.submit(json!({"mode": "slow"}), "k-slow");
    wait_file(&server.dir.join("slow.started"));
    let queued = server.submit(json!({"mode": "never"}), "k-never");
    worker.signal("TERM");
    worker.line(&["stopping after the current job"]);
    assert!(worker.wait_exit().success(), "{:#?}", worker.lines.lock().unwrap());
    worker.line(&[&slow, "attempt 1: succeeded"]);
    worker.line(&["airlock worker: stopped"]);
    assert_eq!(server.job(&slow)["state"], "succeeded");
    assert_eq!(server.result(&slow)["job_id"], slow.as_str());
    assert_eq!(server.job(&queued)["state"], "queued", "claimed after the shutdown");
}

#[test]
fn the_effect_ledger_replays_a_recorded_result_without_running_the_command() {
    let server = Server::start("ledger", None);
    let ledger = server.dir.join("effects.jsonl");
    // As if an earlier attempt ran the command and then died before reporting.
    std::fs::write(&ledger, "{\"key\":\"k-done\",\"result\":{\"from\":\"ledger\"}}\n").unwrap();
    let command = format!(
        r#"echo "$AIRLOCK_JOB_ID" >> {runs}; printf '%s %s' "$AIRLOCK_EFFECT_KEY" "${{AIRLOCK_API_KEY:-no-key}}""#,
        runs = server.path("runs"),
    );
    let done = server.submit(json!({"n": 1}), "k-done");
    let fresh = server.submit(json!({"n": 2}), "k-new");
    let worker = server.worker(&command, &["--ledger", ledger.to_str().unwrap()]);

    server.wait_for(&done, "succeeded");
    server.wait_for(&fresh, "succeeded");
    assert_eq!(server.result(&done), json!({"from": "ledger"}));
    // The command got the effect key, and not the worker's API key.
    assert_eq!(server.result(&fresh), json!("k-new no-key"));
    worker.line(&[&done, "succeeded (result from the effect ledger; the command did not run)"]);
    let runs = std::fs::read_to_string(server.dir.join("runs")).unwrap();
    assert_eq!(runs.lines().collect::<Vec<_>>(), [fresh.as_str()]);
    let recorded = std::fs::read_to_string(&ledger).unwrap();
    assert_eq!(recorded.lines().count(), 2, "{recorded}");
    assert!(recorded.lines().nth(1).unwrap().contains("\"key\":\"k-new\""), "{recorded}");
}
