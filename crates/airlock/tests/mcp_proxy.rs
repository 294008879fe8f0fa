//! `airlock mcp proxy` through the binary, with real MCP parts: the official Python SDK (`mcp`)
//! as the client, `@modelcontextprotocol/server-filesystem` and `server-everything` from npm
//! and a Python SDK server (`tests/mcp/test_server.py`) as upstreams, and the MCP Inspector's
//! CLI. `.ci/run` installs them; `AIRLOCK_MCP_PYTHON` (a Python with `mcp`) and
//! `AIRLOCK_MCP_NPM` (a folder with those npm packages installed) point elsewhere. A missing
//! tool fails the test, never skips it.

#![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic, reason = "a test fails by panicking")]

mod support;

use std::collections::HashMap;
use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{BusStream, NATS, Process, Schema, get, key, post, replica_with, temp_dir};

const ADMIN: &str = "mcp-test-admin-key-0001";
const BIN: &str = env!("CARGO_BIN_EXE_airlock");

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").join(path)
}

/// The Python with the `mcp` SDK.
fn python() -> String {
    let python =
        std::env::var("AIRLOCK_MCP_PYTHON").unwrap_or_else(|_| "/root/.cache/airlock/venv/bin/python".into());
    let ok = Command::new(&python).args(["-c", "import mcp"]).output().is_ok_and(|o| o.status.success());
    assert!(ok, "`{python}` cannot import the MCP SDK: run .ci/run's MCP block or set AIRLOCK_MCP_PYTHON");
    python
}

/// An executable of the npm packages.
fn npm_bin(name: &str) -> String {
    let root = std::env::var("AIRLOCK_MCP_NPM").unwrap_or_else(|_| "/root/.cache/airlock/npm".into());
    let bin = Path::new(&root).join("node_modules/.bin").join(name);
    assert!(bin.exists(), "`{}` is missing: run .ci/run's MCP block or set AIRLOCK_MCP_NPM", bin.display());
    bin.to_str().unwrap().to_owned()
}

/// An embedded server with `policy`, and keys: the agent's (submitter and worker) and an approver's.
struct Airlock {
    process: Option<Process>,
    addr: String,
    agent: String,
    approver: String,
}

impl Airlock {
    fn start(tag: &str, policy: &str, config: &str, extra: &[&str]) -> Self {
        // Its own directory: the tests make others (sandboxes, marks) with `temp_dir` too.
        let dir = temp_dir(&format!("mcp-airlock-{tag}"));
        std::fs::write(dir.join("policy.yaml"), policy).unwrap();
        std::fs::write(dir.join("config.yaml"), config).unwrap();
        let data = dir.join("data");
        let (policy, config) = (dir.join("policy.yaml"), dir.join("config.yaml"));
        let mut args = vec!["serve", "--listen", "127.0.0.1:0", "--data", data.to_str().unwrap()];
        args.extend(["--policy", policy.to_str().unwrap(), "--config", config.to_str().unwrap()]);
        args.extend_from_slice(extra);
        let (process, addr) = support::airlock(&args, &[("AIRLOCK_ADMIN_KEY", ADMIN)]);
        let agent = key(&addr, ADMIN, "acme", "agent", &["submitter", "worker"]);
        let approver = key(&addr, ADMIN, "acme", "alice", &["approver"]);
        Self { process: Some(process), addr, agent, approver }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn jobs(&self, topic: &str) -> Vec<Value> {
        let (status, body) = get(&self.addr, &format!("/api/v1/jobs?topic={topic}"), &self.agent);
        assert_eq!(status, 200, "{body}");
        body["jobs"].as_array().unwrap().clone()
    }

    fn job(&self, id: &str) -> Value {
        get(&self.addr, &format!("/api/v1/jobs/{id}"), &self.agent).1
    }

    /// The pending approval requests, waiting up to 10 s for at least one.
    fn pending_approvals(&self) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (status, body) = get(&self.addr, "/api/v1/approvals", &self.approver);
            assert_eq!(status, 200, "{body}");
            let found = body["approvals"].as_array().unwrap().clone();
            if !found.is_empty() || Instant::now() > deadline {
                return found;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn approve(&self, approval: &str) {
        let (status, body) =
            post(&self.addr, &format!("/api/v1/approvals/{approval}/approve"), &self.approver, "{}");
        assert_eq!(status, 200, "{body}");
    }

    fn publish(&self, policy: &str) {
        let (status, body) = post(&self.addr, "/api/v1/policy/publish", ADMIN, policy);
        assert_eq!(status, 201, "{body}");
    }

    /// Waits until job `id` is in `state`.
    fn wait_state(&self, id: &str, state: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let job = self.job(id);
            if job["state"] == state {
                return job;
            }
            assert!(Instant::now() < deadline, "job {id} never became {state}: {job}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The environment of a proxy talking to `airlock`.
fn proxy_env(airlock: &Airlock) -> Vec<(String, String)> {
    vec![("AIRLOCK_URL".into(), airlock.url()), ("AIRLOCK_API_KEY".into(), airlock.agent.clone())]
}

/// `airlock mcp proxy OPTIONS -- UPSTREAM`, as a command line.
fn proxy_command(options: &[&str], upstream: &[&str]) -> Vec<String> {
    let mut command = vec![BIN.to_owned(), "mcp".into(), "proxy".into()];
    command.extend(options.iter().map(|s| (*s).to_owned()));
    command.push("--".into());
    command.extend(upstream.iter().map(|s| (*s).to_owned()));
    command
}

/// The Python SDK client (`tests/mcp/client.py`) connected to a server command.
struct Client {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<Value>,
    seen: HashMap<String, Value>,
    initialized: Value,
}

impl Client {
    fn start(server: &[String], env: &[(String, String)]) -> Self {
        let mut command = Command::new(python());
        command.arg(repo("tests/mcp/client.py")).args(server).env("RUST_LOG", "warn");
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child =
            command.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (sender, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let value = serde_json::from_str(&line).unwrap_or_else(|_| json!({"unreadable": line}));
                if sender.send(value).is_err() {
                    break;
                }
            }
        });
        let stdin = child.stdin.take();
        let initialized = lines
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("the client never initialized"));
        assert_eq!(initialized["event"], "initialized", "{initialized}");
        Self { child, stdin, lines, seen: HashMap::new(), initialized }
    }

    fn send(&mut self, command: Value) {
        let stdin = self.stdin.as_mut().unwrap();
        writeln!(stdin, "{command}").unwrap();
        stdin.flush().unwrap();
    }

    fn call(&mut self, tag: &str, tool: &str, arguments: Value) {
        self.send(json!({"op": "call", "tag": tag, "name": tool, "arguments": arguments, "progress": true}));
    }

    /// The answer tagged `tag`.
    fn answer(&mut self, tag: &str, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        loop {
            if let Some(found) = self.seen.remove(tag) {
                return found;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.lines.recv_timeout(left).unwrap_or_else(|_| panic!("no answer tagged {tag}"));
            let got = line["tag"].as_str().unwrap_or("").to_owned();
            self.seen.insert(got, line);
        }
    }

    /// Calls a tool and waits for its answer.
    fn call_now(&mut self, tag: &str, tool: &str, arguments: Value) -> Value {
        self.call(tag, tool, arguments);
        self.answer(tag, Duration::from_secs(60))
    }

    fn close(mut self) {
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        panic!("the client did not exit after its input ended");
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The text of a tool result.
fn text(answer: &Value) -> String {
    answer["result"]["content"][0]["text"]
        .as_str()
        .unwrap_or_else(|| panic!("no text in {answer}"))
        .to_owned()
}

fn is_error(answer: &Value) -> bool {
    answer["result"]["isError"] == true
}

const NO_CONFIG: &str = "{}\n";

#[test]
fn the_example_policy_passes_its_cases() {
    let output = Command::new(BIN)
        .args(["policy", "test"])
        .arg(repo("examples/policies/mcp.yaml"))
        .arg(repo("examples/policies/mcp.tests.yaml"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success() && stdout.contains("0 failed"), "{stdout}");
}

/// The filesystem server behind the proxy: reads pass unchanged, a denied move never reaches
/// it, a write waits for a human and runs once, and repeating it is the same job.
#[test]
fn filesystem_reads_pass_denials_never_reach_it_and_writes_wait_for_a_human() {
    let sandbox = temp_dir("mcp-fs-sandbox");
    let outside = temp_dir("mcp-fs-outside");
    let sandbox_text = sandbox.canonicalize().unwrap().to_str().unwrap().to_owned();
    let policy = format!(
        "version: v1\ndefaults: {{ decision: allow }}\nrules:\n\
         - id: deny-move-out-of-sandbox\n  when:\n    topic: mcp.fs.move_file\n    \
         not: {{ destination: {{ regex: \"^{sandbox_text}/\" }} }}\n  decision: deny\n  \
         reason: files leave the sandbox only by hand\n\
         - id: approve-prod-writes\n  when: {{ topic: mcp.fs.write_file, env: production }}\n  \
         decision: require_human\n  reason: production writes need a human\n"
    );
    let airlock = Airlock::start("fs", &policy, NO_CONFIG, &[]);
    std::fs::write(sandbox.join("notes.txt"), "hello from the sandbox\n").unwrap();
    let upstream = [npm_bin("mcp-server-filesystem"), sandbox_text.clone()];
    let upstream: Vec<&str> = upstream.iter().map(String::as_str).collect();

    let read = json!({"path": format!("{sandbox_text}/notes.txt")});
    let mut direct = Client::start(&upstream.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>(), &[]);
    let expected = direct.call_now("read", "read_text_file", read.clone());
    direct.close();

    let proxy = proxy_command(&["--name", "fs", "--env", "production"], &upstream);
    let mut client = Client::start(&proxy, &proxy_env(&airlock));
    assert_eq!(client.initialized["server"], "secure-filesystem-server", "initialize passes through");
    let through = client.call_now("read", "read_text_file", read);
    assert_eq!(through["result"], expected["result"], "an allowed read passes through unchanged");
    let jobs = airlock.jobs("mcp.fs.read_text_file");
    assert_eq!(jobs.len(), 1);
    airlock.wait_state(jobs[0]["job_id"].as_str().unwrap(), "succeeded");

    let escape =
        json!({"source": format!("{sandbox_text}/notes.txt"), "destination": outside.join("stolen.txt")});
    let denied = client.call_now("move", "move_file", escape);
    assert!(is_error(&denied), "{denied}");
    assert!(
        text(&denied).contains("deny-move-out-of-sandbox") && text(&denied).contains("by hand"),
        "{denied}"
    );
    assert!(
        sandbox.join("notes.txt").exists() && !outside.join("stolen.txt").exists(),
        "the upstream was never called"
    );
    assert!(airlock.jobs("mcp.fs.move_file").is_empty(), "a denial makes no job");

    let target = sandbox.join("change.txt");
    let write = json!({"path": target, "content": "approved content"});
    client.call("write", "write_file", write.clone());
    let pending = airlock.pending_approvals();
    assert_eq!(pending.len(), 1, "{pending:?}");
    std::thread::sleep(Duration::from_millis(1_500));
    assert!(!target.exists(), "nothing runs before the approval");
    airlock.approve(pending[0]["id"].as_str().unwrap());
    let written = client.answer("write", Duration::from_secs(30));
    assert!(!is_error(&written), "{written}");
    assert!(!written["progress"].as_array().unwrap().is_empty(), "progress while waiting: {written}");
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "approved content");
    let jobs = airlock.jobs("mcp.fs.write_file");
    assert_eq!(jobs.len(), 1);
    let job = airlock.wait_state(jobs[0]["job_id"].as_str().unwrap(), "succeeded");
    assert_eq!(job["attempts"]["execution"], 1);
    assert_eq!(job["labels"], json!({"mcp_server": "fs", "mcp_tool": "write_file"}));
    assert_eq!(job["payload"]["content"], "approved content");
    assert!(job["idempotency_key"].as_str().unwrap().starts_with("mcp:"));

    std::fs::remove_file(&target).unwrap();
    let again = client.call_now("write-again", "write_file", write);
    assert_eq!(again["result"], written["result"], "the recorded result");
    assert!(!target.exists(), "the same call is the same job: not run again");
    assert_eq!(airlock.jobs("mcp.fs.write_file").len(), 1);
    client.close();
}

/// Approved, then a publish before the call runs: Gate B stops it, and the upstream is never called.
#[test]
fn a_publish_between_approval_and_execution_stops_the_call_at_gate_b() {
    let sandbox = temp_dir("mcp-gate-b-sandbox");
    let sandbox_text = sandbox.canonicalize().unwrap().to_str().unwrap().to_owned();
    let policy = "version: v1\ndefaults: { decision: allow }\nrules:\n\
                  - id: approve-writes\n  when: { topic: mcp.fs.write_file }\n  decision: require_human\n";
    let airlock = Airlock::start("gate-b", policy, NO_CONFIG, &[]);
    let proxy = proxy_command(
        &["--name", "fs", "--approval-wait", "1", "--console-url", "http://console.example:8080"],
        &[&npm_bin("mcp-server-filesystem"), &sandbox_text],
    );
    let mut client = Client::start(&proxy, &proxy_env(&airlock));
    let target = sandbox.join("late.txt");
    let write = json!({"path": target, "content": "x"});
    let pending = client.call_now("first", "write_file", write.clone());
    assert!(is_error(&pending), "{pending}");
    let approval = airlock.pending_approvals()[0]["id"].as_str().unwrap().to_owned();
    assert!(text(&pending).contains(&format!("pending approval {approval}")), "{pending}");
    assert!(
        text(&pending).contains(&format!("http://console.example:8080/approvals/{approval}")),
        "{pending}"
    );

    airlock.approve(&approval);
    let job = airlock.jobs("mcp.fs.write_file")[0]["job_id"].as_str().unwrap().to_owned();
    airlock.wait_state(&job, "queued");
    airlock.publish(
        "version: v1\ndefaults: { decision: allow }\nrules:\n\
         - id: freeze\n  when: { topic: \"mcp.**\" }\n  decision: deny\n  reason: change freeze\n",
    );
    let stopped = client.call_now("again", "write_file", write);
    assert!(is_error(&stopped), "{stopped}");
    assert!(text(&stopped).contains("Gate B") && text(&stopped).contains("freeze"), "{stopped}");
    assert_eq!(airlock.job(&job)["state"], "denied", "the same job, stopped at Gate B");
    assert_eq!(airlock.jobs("mcp.fs.write_file").len(), 1);
    assert!(!target.exists(), "the upstream was never called");
    client.close();
}

/// Concurrent calls keep their ids; a throttle and an unavailable safety check answer as tool
/// errors; the upstream's resources, prompts and notifications pass through.
#[test]
fn concurrent_calls_throttles_and_an_unavailable_gate_through_server_everything() {
    let policy = "version: v1\ndefaults: { decision: allow }\nrules:\n\
                  - id: no-sums\n  when: { topic: mcp.everything.get-sum }\n  decision: deny\n  reason: no sums today\n\
                  - id: one-image-an-hour\n  when: { topic: mcp.everything.get-tiny-image }\n  decision: throttle\n  \
                  limit: { rate: 1, per: 1h, key: [tenant, topic] }\n";
    let airlock = Airlock::start("everything", policy, NO_CONFIG, &["--enable-fault-injection"]);
    let proxy = proxy_command(&["--name", "everything"], &[&npm_bin("mcp-server-everything")]);
    let mut client = Client::start(&proxy, &proxy_env(&airlock));
    assert!(client.initialized["capabilities"]["resources"].is_object(), "{}", client.initialized);

    for i in 0..24 {
        client.call(&format!("echo-{i}"), "echo", json!({"message": format!("message {i}")}));
        if i % 6 == 0 {
            client.call(&format!("sum-{i}"), "get-sum", json!({"a": i, "b": 1}));
        }
    }
    for i in 0..24 {
        let answer = client.answer(&format!("echo-{i}"), Duration::from_secs(60));
        assert_eq!(text(&answer), format!("Echo: message {i}"), "each answer to its own call");
        if i % 6 == 0 {
            let sum = client.answer(&format!("sum-{i}"), Duration::from_secs(60));
            assert!(is_error(&sum) && text(&sum).contains("no sums today"), "{sum}");
        }
    }
    assert_eq!(airlock.jobs("mcp.everything.echo").len(), 24);
    client.send(json!({"op": "list", "tag": "tools"}));
    let tools = client.answer("tools", Duration::from_secs(30));
    assert!(tools["tools"].as_array().unwrap().contains(&json!("get-sum")), "listed: {tools}");
    client.send(json!({"op": "resources", "tag": "resources"}));
    let resources = client.answer("resources", Duration::from_secs(30));
    assert!(!resources["resources"].as_array().unwrap().is_empty(), "resources pass through: {resources}");
    assert!(resources["first"].is_string(), "and can be read: {resources}");
    client.send(json!({"op": "prompts", "tag": "prompts"}));
    let prompts = client.answer("prompts", Duration::from_secs(30));
    assert!(!prompts["prompts"].as_array().unwrap().is_empty(), "prompts pass through: {prompts}");

    let first = client.call_now("image-1", "get-tiny-image", json!({}));
    assert!(!is_error(&first), "{first}");
    let throttled = client.call_now("image-2", "get-tiny-image", json!({"n": 2}));
    assert!(is_error(&throttled), "{throttled}");
    assert!(
        text(&throttled).contains("throttled") && text(&throttled).contains("retry after"),
        "{throttled}"
    );

    let (status, body) = post(&airlock.addr, "/api/v1/admin/faults", ADMIN, json!({"safety": "unavailable"}));
    assert_eq!(status, 200, "{body}");
    let closed = client.call_now("closed", "echo", json!({"message": "while the check is down"}));
    assert!(is_error(&closed) && text(&closed).contains("governance unavailable, retry later"), "{closed}");
    post(&airlock.addr, "/api/v1/admin/faults", ADMIN, json!({"safety": "none"}));
    let open_again = client.call_now("closed-again", "echo", json!({"message": "while the check is down"}));
    assert_eq!(text(&open_again), "Echo: while the check is down", "the refusal left nothing behind");
    client.close();
}

/// With Airlock down, every call fails closed and the upstream is never called.
#[test]
fn airlock_down_fails_closed() {
    let sandbox = temp_dir("mcp-down-sandbox");
    let sandbox_text = sandbox.canonicalize().unwrap().to_str().unwrap().to_owned();
    let mut airlock =
        Airlock::start("down", "version: v1\ndefaults: { decision: allow }\nrules: []\n", NO_CONFIG, &[]);
    let proxy = proxy_command(&["--name", "fs"], &[&npm_bin("mcp-server-filesystem"), &sandbox_text]);
    let mut client = Client::start(&proxy, &proxy_env(&airlock));
    let ok = client.call_now("before", "list_allowed_directories", json!({}));
    assert!(!is_error(&ok), "{ok}");
    drop(airlock.process.take());
    let target = sandbox.join("never.txt");
    let refused = client.call_now("after", "write_file", json!({"path": target, "content": "x"}));
    assert!(
        is_error(&refused) && text(&refused).contains("governance unavailable, retry later"),
        "{refused}"
    );
    assert!(!target.exists(), "fail closed: the upstream was never called");
    client.close();
}

/// A proxy driven by raw JSON-RPC lines, for what an SDK client would never send.
struct Raw {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<Value>,
}

impl Raw {
    fn start(options: &[&str], upstream: &[&str], env: &[(String, String)]) -> Self {
        let command = proxy_command(options, upstream);
        let mut child = Command::new(&command[0])
            .args(&command[1..])
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (sender, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let value = serde_json::from_str(&line).unwrap_or_else(|_| json!({"unreadable": line}));
                if sender.send(value).is_err() {
                    break;
                }
            }
        });
        let stdin = child.stdin.take().unwrap();
        let mut raw = Self { child, stdin, lines };
        raw.send(r#"{"jsonrpc":"2.0","id":"init","method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"raw","version":"1"}}}"#);
        let init = raw.answer(&json!("init"));
        assert_eq!(init["result"]["protocolVersion"], "2025-06-18", "{init}");
        raw.send(r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#);
        raw
    }

    fn send(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").unwrap();
        self.stdin.flush().unwrap();
    }

    fn call(&mut self, id: u64, tool: &str, arguments: Value) {
        let line = json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": tool, "arguments": arguments}});
        self.send(&line.to_string());
    }

    /// The next message answering `id` (notifications in between are skipped).
    fn answer(&mut self, id: &Value) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.lines.recv_timeout(left).unwrap_or_else(|_| panic!("no answer to {id}"));
            if &line["id"] == id && (line.get("result").is_some() || line.get("error").is_some()) {
                return line;
            }
        }
    }
}

impl Drop for Raw {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn test_server(mark: &Path) -> (Vec<String>, Vec<(String, String)>) {
    let upstream = vec![python(), repo("tests/mcp/test_server.py").to_str().unwrap().to_owned()];
    (upstream, vec![("MARK_FILE".into(), mark.to_str().unwrap().to_owned())])
}

fn marks(file: &Path) -> Vec<String> {
    std::fs::read_to_string(file).unwrap_or_default().lines().map(str::to_owned).collect()
}

/// Malformed JSON-RPC from either side gets a JSON-RPC error and the proxy keeps serving; an
/// upstream crash fails the job and the agent hears it.
#[test]
fn malformed_messages_and_an_upstream_crash() {
    let airlock =
        Airlock::start("crash", "version: v1\ndefaults: { decision: allow }\nrules: []\n", NO_CONFIG, &[]);
    let dir = temp_dir("mcp-crash");
    let mark = dir.join("marks.txt");
    let (upstream, mut env) = test_server(&mark);
    env.extend(proxy_env(&airlock));
    let upstream: Vec<&str> = upstream.iter().map(String::as_str).collect();
    let mut raw = Raw::start(&["--name", "test"], &upstream, &env);

    raw.send("{this is not json");
    let parse = raw.answer(&Value::Null);
    assert_eq!(parse["error"]["code"], -32_700, "{parse}");
    raw.send(r#"{"jsonrpc":"2.0","id":5}"#);
    let invalid = raw.answer(&json!(5));
    assert_eq!(invalid["error"]["code"], -32_600, "{invalid}");
    raw.send(r#"[{"jsonrpc":"2.0","id":6,"method":"ping"}]"#);
    assert_eq!(raw.answer(&Value::Null)["error"]["code"], -32_600);
    raw.send(r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"arguments":{}}}"#);
    assert_eq!(raw.answer(&json!(7))["error"]["code"], -32_602);

    raw.call(8, "garbage", json!({"note": "g"}));
    let after = raw.answer(&json!(8));
    assert_eq!(after["result"]["content"][0]["text"], "after garbage g", "kept serving: {after}");
    raw.call(9, "mark", json!({"note": "still here"}));
    assert_eq!(raw.answer(&json!(9))["result"]["content"][0]["text"], "marked still here");

    raw.call(10, "crash", json!({"note": "crash"}));
    let crashed = raw.answer(&json!(10));
    assert!(crashed["error"]["message"].as_str().unwrap().contains("exited"), "{crashed}");
    let jobs = airlock.jobs("mcp.test.crash");
    let job = airlock.wait_state(jobs[0]["job_id"].as_str().unwrap(), "failed");
    assert!(job["error"].as_str().unwrap().contains("exited"), "{job}");
    raw.send(r#"{"jsonrpc":"2.0","id":11,"method":"tools/list"}"#);
    let after_crash = raw.answer(&json!(11));
    assert!(after_crash["error"]["message"].as_str().unwrap().contains("has exited"), "{after_crash}");
    assert_eq!(marks(&mark), ["still here", "crash"]);
}

/// The proxy killed mid-call: the lease lapses and the job is dead-lettered, never run again.
/// A cancelled request cancels its job.
#[test]
fn a_killed_proxy_never_runs_a_call_twice_and_a_cancelled_request_cancels_its_job() {
    let policy = "version: v1\ndefaults: { decision: allow }\nrules:\n\
                  - id: human-for-mark\n  when: { topic: mcp.test.mark }\n  decision: require_human\n";
    let config = "leases: { lease_ms: 1500, heartbeat_ms: 500 }\n";
    let airlock = Airlock::start("killed", policy, config, &[]);
    let dir = temp_dir("mcp-killed");
    let mark = dir.join("marks.txt");
    let (upstream, mut env) = test_server(&mark);
    env.extend(proxy_env(&airlock));
    let upstream: Vec<&str> = upstream.iter().map(String::as_str).collect();

    let mut raw = Raw::start(&["--name", "test"], &upstream, &env);
    raw.call(1, "slow", json!({"note": "once", "seconds": 30}));
    let deadline = Instant::now() + Duration::from_secs(20);
    while marks(&mark).is_empty() {
        assert!(Instant::now() < deadline, "the slow call never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    let job = airlock.jobs("mcp.test.slow")[0]["job_id"].as_str().unwrap().to_owned();
    assert_eq!(airlock.job(&job)["state"], "leased");
    let _ = raw.child.kill();
    let _ = raw.child.wait();
    let ended = airlock.wait_state(&job, "dead_lettered");
    assert_eq!(ended["attempts"]["execution"], 1, "{ended}");
    assert_eq!(marks(&mark), ["once"], "never run twice");

    let mut raw = Raw::start(&["--name", "test"], &upstream, &env);
    raw.call(2, "mark", json!({"note": "cancel me"}));
    if airlock.pending_approvals().len() != 1 {
        panic!("no approval request; the proxy answered {}", raw.answer(&json!(2)));
    }
    raw.send(r#"{"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":2,"reason":"no longer needed"}}"#);
    let cancelled = airlock.jobs("mcp.test.mark")[0]["job_id"].as_str().unwrap().to_owned();
    airlock.wait_state(&cancelled, "cancelled");
    raw.send(r#"{"jsonrpc":"2.0","id":3,"method":"ping"}"#);
    assert_eq!(raw.answer(&json!(3))["result"], json!({}), "still serving");
    assert_eq!(marks(&mark), ["once"]);
}

/// The MCP Inspector's CLI lists the upstream's tools through the proxy.
#[test]
fn the_inspector_cli_lists_tools_through_the_proxy() {
    let airlock = Airlock::start(
        "inspector",
        "version: v1\ndefaults: { decision: allow }\nrules: []\n",
        NO_CONFIG,
        &[],
    );
    // The Inspector hands its server only the variables given with `-e`.
    let env: Vec<String> =
        proxy_env(&airlock).into_iter().flat_map(|(k, v)| ["-e".into(), format!("{k}={v}")]).collect();
    let output = Command::new(npm_bin("mcp-inspector"))
        .arg("--cli")
        .args(env)
        .args(["--method", "tools/list", "--"])
        .args(proxy_command(&["--name", "everything"], &[&npm_bin("mcp-server-everything")]))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}{}", String::from_utf8_lossy(&output.stderr));
    let listed: Value = serde_json::from_str(&stdout[stdout.find('{').unwrap()..]).unwrap();
    let names: Vec<&str> =
        listed["tools"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert!(names.contains(&"echo") && names.contains(&"get-sum"), "{names:?}");
}

/// Distributed: 2 gateways and 2 schedulers on PostgreSQL and NATS; the proxy submits to one
/// gateway and claims on one scheduler, a human approves on the other gateway.
#[test]
fn distributed_two_gateways_two_schedulers() {
    let schema = Schema::create("mcp");
    let stream = BusStream::new("mcp");
    let config = temp_dir("mcp-distributed").join("config.yaml");
    std::fs::write(&config, "").unwrap();
    let bus = format!("nats://{NATS}");
    let start = |role: &str| {
        replica_with(
            &schema.url(),
            &config,
            ADMIN,
            &["--role", role, "--bus", &bus, "--bus-stream", &stream.name],
        )
    };
    // Declared after `stream`, so stopped before it is deleted.
    let replicas = [start("gateway"), start("gateway"), start("scheduler"), start("scheduler")];
    let (gateway, other_gateway, scheduler) = (&replicas[0].addr, &replicas[1].addr, &replicas[3].addr);
    let policy = "version: v1\ndefaults: { decision: allow }\nrules:\n\
                  - id: no-sums\n  when: { topic: mcp.everything.get-sum }\n  decision: deny\n  reason: no sums\n\
                  - id: human-echo\n  when: { topic: mcp.everything.echo, message: needs a human }\n  \
                  decision: require_human\n";
    let (status, body) = post(gateway, "/api/v1/policy/publish", ADMIN, policy);
    assert_eq!(status, 201, "{body}");
    let agent = key(gateway, ADMIN, "acme", "agent", &["submitter", "worker"]);
    let approver = key(gateway, ADMIN, "acme", "alice", &["approver"]);
    let env = vec![
        ("AIRLOCK_URL".to_owned(), format!("http://{gateway}")),
        ("AIRLOCK_WORKER_URL".to_owned(), format!("http://{scheduler}")),
        ("AIRLOCK_API_KEY".to_owned(), agent.clone()),
    ];
    let proxy = proxy_command(&["--name", "everything"], &[&npm_bin("mcp-server-everything")]);
    let mut client = Client::start(&proxy, &env);
    assert_eq!(text(&client.call_now("echo", "echo", json!({"message": "hi"}))), "Echo: hi");
    let denied = client.call_now("sum", "get-sum", json!({"a": 1, "b": 2}));
    assert!(is_error(&denied) && text(&denied).contains("no-sums"), "{denied}");

    client.call("human", "echo", json!({"message": "needs a human"}));
    let deadline = Instant::now() + Duration::from_secs(20);
    let approval = loop {
        let (_, body) = get(other_gateway, "/api/v1/approvals", &approver);
        if let Some(first) = body["approvals"].as_array().unwrap().first() {
            break first["id"].as_str().unwrap().to_owned();
        }
        assert!(Instant::now() < deadline, "no approval request");
        std::thread::sleep(Duration::from_millis(50));
    };
    let (status, body) =
        post(other_gateway, &format!("/api/v1/approvals/{approval}/approve"), &approver, "{}");
    assert_eq!(status, 200, "{body}");
    let approved = client.answer("human", Duration::from_secs(60));
    assert_eq!(text(&approved), "Echo: needs a human", "{approved}");
    let (_, jobs) = get(other_gateway, "/api/v1/jobs?topic=mcp.everything.echo", &agent);
    let jobs = jobs["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 2);
    let deadline = Instant::now() + Duration::from_secs(15);
    for job in jobs {
        let id = job["job_id"].as_str().unwrap();
        loop {
            let (_, view) = get(other_gateway, &format!("/api/v1/jobs/{id}"), &agent);
            if view["state"] == "succeeded" {
                assert_eq!(view["attempts"]["execution"], 1);
                break;
            }
            assert!(Instant::now() < deadline, "job {id} did not succeed: {view}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    client.close();
    drop(replicas);
}

/// `--hide-denied` leaves out a tool denied whatever its arguments, and lists one whose denial
/// depends on them.
#[test]
fn hide_denied_lists_only_what_the_arguments_could_allow() {
    let policy = "version: v1\ndefaults: { decision: allow }\nrules:\n\
                  - id: no-sums\n  when: { topic: mcp.everything.get-sum }\n  decision: deny\n\
                  - id: no-rude-echo\n  when: { topic: mcp.everything.echo, message: rude }\n  decision: deny\n";
    let airlock = Airlock::start("hide", policy, NO_CONFIG, &[]);
    let proxy =
        proxy_command(&["--name", "everything", "--hide-denied"], &[&npm_bin("mcp-server-everything")]);
    let mut client = Client::start(&proxy, &proxy_env(&airlock));
    client.send(json!({"op": "list", "tag": "tools"}));
    let tools = client.answer("tools", Duration::from_secs(30));
    let tools = tools["tools"].as_array().unwrap();
    assert!(!tools.contains(&json!("get-sum")), "denied whatever the arguments: {tools:?}");
    assert!(tools.contains(&json!("echo")) && tools.contains(&json!("get-env")), "{tools:?}");
    let rude = client.call_now("rude", "echo", json!({"message": "rude"}));
    assert!(is_error(&rude) && text(&rude).contains("no-rude-echo"), "{rude}");
    let hidden = client.call_now("sum", "get-sum", json!({"a": 1, "b": 1}));
    assert!(is_error(&hidden) && text(&hidden).contains("no-sums"), "hidden, and still governed: {hidden}");
    client.close();
}

/// The README's MCP client configuration, run as written: the proxy in front of the filesystem
/// server (with this build of `airlock`, the npm package installed for the tests, a temporary
/// sandbox and a test server in place of the placeholders).
#[test]
fn the_readme_configuration_puts_the_proxy_in_front_of_the_server() {
    let readme = std::fs::read_to_string(repo("README.md")).unwrap();
    let section = &readme[readme.find("## Agents through MCP").unwrap()..];
    let block = &section[section.find("```json").unwrap() + "```json".len()..];
    let config: Value = serde_json::from_str(&block[..block.find("```").unwrap()]).unwrap();
    let server = &config["mcpServers"]["filesystem"];
    assert_eq!(server["command"], "airlock");
    let sandbox = temp_dir("mcp-readme-sandbox");
    let sandbox_text = sandbox.canonicalize().unwrap().to_str().unwrap().to_owned();
    let mut command = vec![BIN.to_owned()];
    let args: Vec<&str> = server["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    let npx = args.iter().position(|a| *a == "npx").unwrap();
    assert_eq!(args[npx..], ["npx", "-y", "@modelcontextprotocol/server-filesystem", "/srv/agent-sandbox"]);
    command.extend(args[..npx].iter().map(|a| (*a).to_owned()));
    command.extend([npm_bin("mcp-server-filesystem"), sandbox_text.clone()]);

    let airlock =
        Airlock::start("readme", "version: v1\ndefaults: { decision: allow }\nrules: []\n", NO_CONFIG, &[]);
    let env: Vec<(String, String)> = server["env"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| {
            let value = match k.as_str() {
                "AIRLOCK_URL" => airlock.url(),
                "AIRLOCK_API_KEY" => airlock.agent.clone(),
                other => panic!("the README sets `{other}`, which this test does not know: {v}"),
            };
            (k.clone(), value)
        })
        .collect();
    let mut client = Client::start(&command, &env);
    let listed = client.call_now("dirs", "list_allowed_directories", json!({}));
    assert!(!is_error(&listed) && text(&listed).contains(&sandbox_text), "{listed}");
    let jobs = airlock.jobs("mcp.fs.list_allowed_directories");
    assert_eq!((jobs.len(), jobs[0]["env"].as_str()), (1, Some("production")), "{jobs:?}");
    client.close();
}

/// An upstream over streamable HTTP (`--upstream-url`): calls governed the same way, and the
/// upstream's progress notifications (in the call's event stream) reach the agent.
#[test]
fn an_upstream_over_streamable_http() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let upstream = Command::new(npm_bin("mcp-server-everything"))
        .arg("streamableHttp")
        .env("PORT", port.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _upstream = Process(upstream);
    assert!(
        support::wait_reachable(&format!("127.0.0.1:{port}"), Duration::from_secs(30)),
        "the HTTP server never listened"
    );
    let policy = "version: v1\ndefaults: { decision: allow }\nrules:\n\
                  - id: no-sums\n  when: { topic: mcp.everything.get-sum }\n  decision: deny\n";
    let airlock = Airlock::start("http", policy, NO_CONFIG, &[]);
    let url = format!("http://127.0.0.1:{port}/mcp");
    let proxy = proxy_command(&["--name", "everything", "--upstream-url", &url], &[]);
    let proxy: Vec<String> = proxy.into_iter().filter(|a| a != "--").collect();
    let mut client = Client::start(&proxy, &proxy_env(&airlock));
    assert_eq!(text(&client.call_now("echo", "echo", json!({"message": "over http"}))), "Echo: over http");
    let denied = client.call_now("sum", "get-sum", json!({"a": 1, "b": 2}));
    assert!(is_error(&denied) && text(&denied).contains("no-sums"), "{denied}");
    let long = client.call_now("long", "trigger-long-running-operation", json!({"duration": 1, "steps": 3}));
    assert!(text(&long).contains("Long running operation completed"), "{long}");
    assert_eq!(
        long["progress"].as_array().unwrap().len(),
        3,
        "the upstream's progress passed through: {long}"
    );
    client.send(json!({"op": "list", "tag": "tools"}));
    assert!(
        client.answer("tools", Duration::from_secs(30))["tools"].as_array().unwrap().contains(&json!("echo"))
    );
    let job = &airlock.jobs("mcp.everything.trigger-long-running-operation")[0];
    airlock.wait_state(job["job_id"].as_str().unwrap(), "succeeded");
    client.close();
}
