//! The proxy's shell: one MCP session on stdio with the agent, one with the upstream server,
//! and a thread per `tools/call` that takes the call through Airlock (Gate A at the call,
//! approval wait, Gate B at the claim) before it reaches the upstream. Everything else passes
//! through byte for byte, ids unchanged: each side keeps its own id space, and the proxy only
//! remembers which of the agent's requests are in flight.

use std::collections::HashMap;
use std::io::{BufReader, Write as _};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use airlock_core::defaults::MCP_RESULT_BYTES_MAX;
use serde_json::{Value, json};

use crate::airlock::{Airlock, Answer};
use crate::call::{self, Admission, Call, Step, UNAVAILABLE};
use crate::http_upstream::HttpUpstream;
use crate::jsonrpc::{self, INTERNAL_ERROR, INVALID_PARAMS, INVALID_REQUEST, Message};

/// MCP protocol versions the proxy speaks, oldest first.
pub const PROTOCOL_VERSIONS: [&str; 4] = ["2024-11-05", "2025-03-26", "2025-06-18", LATEST_PROTOCOL_VERSION];
/// The newest of them, offered to an agent that asks for one the proxy does not know.
const LATEST_PROTOCOL_VERSION: &str = "2025-11-25";
/// How often a call waiting for a human (or for a job someone else runs) looks again.
const POLL: Duration = Duration::from_millis(250);
/// How often a waiting call tells the agent it is still waiting (when it asked for progress).
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// Longest long-poll of one claim while a queued job is not yet due (throttled, backing off).
const CLAIM_WAIT_MAX: Duration = Duration::from_secs(5);
/// How long calls in flight get to cancel their jobs when the proxy stops.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);
/// How long the upstream gets to exit once its stdin is closed.
const UPSTREAM_EXIT_GRACE: Duration = Duration::from_secs(2);

/// What the proxy is told to do.
pub struct Options {
    /// The upstream's name: topics are `mcp.<name>.<tool>`.
    pub server: String,
    /// The env of every job.
    pub env: String,
    /// The worker pool the proxy claims its jobs from.
    pub pool: String,
    /// How long a call that needs a human is held before the agent hears "pending".
    pub approval_wait: Duration,
    /// Where approvers approve, for the "pending" answer.
    pub console_url: Option<String>,
    /// Leave out of `tools/list` the tools the policy denies whatever the arguments.
    pub hide_denied: bool,
    /// The Airlock deployment.
    pub airlock: Airlock,
    /// Where the upstream is.
    pub upstream: Upstream,
}

/// The upstream MCP server.
pub enum Upstream {
    /// A command the proxy runs, speaking MCP on its stdio.
    Command(Vec<String>),
    /// A server reached over MCP's streamable HTTP transport at this URL.
    Url(String),
}

/// How messages reach the upstream.
enum Link {
    /// The child's stdin; `None` once it is gone.
    Stdio(Mutex<Option<ChildStdin>>),
    Http(HttpUpstream),
}

/// An agent's request the proxy waits on an answer for.
enum Pending {
    /// Passed through; its answer too.
    Plain,
    /// `initialize`: the answer's protocol version is checked.
    Initialize,
    /// `tools/list` with `--hide-denied`: the answer is filtered.
    ToolsList,
    /// A governed tool call, forwarded: its answer goes to the agent at once (unless the call
    /// was cancelled, the flag), then to the call's thread, which records it.
    Call(mpsc::Sender<Result<Value, Value>>, Arc<AtomicBool>),
}

struct Proxy {
    options: Options,
    /// This MCP session: part of every idempotency key.
    session: String,
    client: Mutex<std::io::Stdout>,
    link: Link,
    alive: AtomicBool,
    pending: Mutex<HashMap<String, Pending>>,
    /// Governed calls in flight, by id: set to cancel.
    calls: Mutex<HashMap<String, Arc<AtomicBool>>>,
    /// Per call digest, the generation of its idempotency key.
    generations: Mutex<HashMap<String, u32>>,
}

/// Runs the proxy until the agent closes stdin or `stop` receives (a signal): calls still
/// waiting in Airlock are cancelled there, and the upstream is stopped. An error when the
/// upstream cannot start.
pub fn run(options: Options, stop: mpsc::Receiver<()>) -> Result<(), String> {
    let (link, mut child, stdout) = match &options.upstream {
        Upstream::Command(command) => {
            let Some((program, args)) = command.split_first() else {
                return Err("no upstream command: put it after `--`".into());
            };
            let mut child = Command::new(program)
                .args(args)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .map_err(|e| format!("cannot start the upstream `{program}`: {e}"))?;
            let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
                stop_child(&mut child);
                return Err("the upstream's stdio could not be opened".into());
            };
            (Link::Stdio(Mutex::new(Some(stdin))), Some(child), Some(stdout))
        }
        Upstream::Url(url) => (Link::Http(HttpUpstream::new(url)?), None, None),
    };
    let proxy = Arc::new(Proxy {
        options,
        session: session_id()?,
        client: Mutex::new(std::io::stdout()),
        link,
        alive: AtomicBool::new(true),
        pending: Mutex::new(HashMap::new()),
        calls: Mutex::new(HashMap::new()),
        generations: Mutex::new(HashMap::new()),
    });
    tracing::info!(server = %proxy.options.server, session = %proxy.session, "mcp proxy started");
    if let Some(stdout) = stdout {
        let proxy = Arc::clone(&proxy);
        std::thread::spawn(move || proxy.read_upstream(BufReader::new(stdout)));
    }
    let threads = Arc::new(Mutex::new(Vec::new()));
    let (ended, end) = mpsc::channel();
    {
        let (proxy, threads, ended) = (Arc::clone(&proxy), Arc::clone(&threads), ended.clone());
        std::thread::spawn(move || {
            proxy.read_client(std::io::stdin().lock(), &threads);
            let _ = ended.send(());
        });
    }
    std::thread::spawn(move || {
        if stop.recv().is_ok() {
            let _ = ended.send(());
        }
    });
    let _ = end.recv();
    // The agent is gone (or we are told to stop): calls still waiting for Airlock are cancelled
    // there, then the upstream is told to stop by the end of its input, as MCP's stdio
    // shutdown says, and killed if it does not.
    for flag in lock(&proxy.calls).values() {
        flag.store(true, Ordering::SeqCst);
    }
    let deadline = Instant::now() + SHUTDOWN_GRACE;
    let threads: Vec<JoinHandle<()>> = lock(&threads).drain(..).collect();
    for thread in threads {
        while !thread.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    match &proxy.link {
        Link::Stdio(stdin) => drop(lock(stdin).take()),
        Link::Http(http) => http.close(),
    }
    if let Some(child) = &mut child {
        stop_child(child);
    }
    Ok(())
}

fn session_id() -> Result<String, String> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| format!("no randomness for the session id: {e}"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn stop_child(child: &mut Child) {
    let deadline = Instant::now() + UPSTREAM_EXIT_GRACE;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// How a governed call ends for the agent.
enum Reply {
    /// A tool result (refusal, pending, recorded result).
    Result(Value),
    /// A JSON-RPC error.
    Error(i64, String),
    /// Already answered (the upstream's answer went through), or cancelled (no answer).
    Done,
}

impl Proxy {
    fn to_client(&self, line: &str) {
        let mut out = lock(&self.client);
        let written =
            out.write_all(line.as_bytes()).and_then(|()| out.write_all(b"\n")).and_then(|()| out.flush());
        if let Err(e) = written {
            tracing::warn!(error = %e, "cannot write to the MCP client");
        }
    }

    /// Sends a line to the upstream; false when it is gone. Over HTTP the answer comes back on
    /// a thread of its own, as the stdio reader would deliver it.
    fn to_upstream(self: &Arc<Self>, line: &str) -> bool {
        match &self.link {
            Link::Stdio(stdin) => {
                let mut stdin = lock(stdin);
                let Some(stdin) = stdin.as_mut() else { return false };
                let written = stdin
                    .write_all(line.as_bytes())
                    .and_then(|()| stdin.write_all(b"\n"))
                    .and_then(|()| stdin.flush());
                written.is_ok()
            }
            Link::Http(_) => {
                let (proxy, line) = (Arc::clone(self), line.to_owned());
                std::thread::spawn(move || {
                    let Link::Http(http) = &proxy.link else { return };
                    if let Err(e) = http.post(&line, &mut |message| proxy.from_upstream(&message)) {
                        tracing::warn!(error = %e, "the upstream failed");
                        proxy.upstream_failed(&line, &e);
                    }
                });
                true
            }
        }
    }

    /// A message the upstream could not take: its request is answered with an error (a tool
    /// call's thread sees its channel close, and fails the job).
    fn upstream_failed(&self, line: &str, error: &str) {
        let Ok(Message::Request { id, .. }) = jsonrpc::parse(line) else { return };
        let pending = lock(&self.pending).remove(&jsonrpc::id_key(&id));
        if let Some(Pending::Plain | Pending::Initialize | Pending::ToolsList) = pending {
            self.to_client(&jsonrpc::error(
                &id,
                INTERNAL_ERROR,
                &format!("the upstream MCP server failed: {error}"),
            ));
        }
    }

    fn read_client(self: &Arc<Self>, input: impl std::io::BufRead, threads: &Mutex<Vec<JoinHandle<()>>>) {
        for line in input.lines() {
            let line = match line {
                Ok(line) => line,
                Err(e) => {
                    self.to_client(&jsonrpc::error(
                        &Value::Null,
                        jsonrpc::PARSE_ERROR,
                        &format!("parse error: {e}"),
                    ));
                    continue;
                }
            };
            if line.trim().is_empty() {
                continue;
            }
            lock(threads).retain(|t| !t.is_finished());
            match jsonrpc::parse(&line) {
                Err(bad) => self.to_client(&bad.answer()),
                Ok(Message::Request { id, method, params }) => {
                    if let Some(thread) = self.client_request(line, id, &method, params) {
                        lock(threads).push(thread);
                    }
                }
                Ok(Message::Notification { method, params }) => {
                    if method == "notifications/cancelled"
                        && let Some(request) = params.as_ref().and_then(|p| p.get("requestId"))
                        && let Some(flag) = lock(&self.calls).get(&jsonrpc::id_key(request))
                    {
                        flag.store(true, Ordering::SeqCst);
                    }
                    self.to_upstream(&line);
                }
                Ok(Message::Response { .. }) => {
                    self.to_upstream(&line);
                }
            }
        }
    }

    /// An agent's request; the thread that governs it when it is a tool call.
    fn client_request(
        self: &Arc<Self>,
        line: String,
        id: Value,
        method: &str,
        params: Option<Value>,
    ) -> Option<JoinHandle<()>> {
        let key = jsonrpc::id_key(&id);
        if !self.alive.load(Ordering::SeqCst) {
            self.to_client(&jsonrpc::error(&id, INTERNAL_ERROR, "the upstream MCP server has exited"));
            return None;
        }
        if lock(&self.pending).contains_key(&key) || lock(&self.calls).contains_key(&key) {
            self.to_client(&jsonrpc::error(
                &id,
                INVALID_REQUEST,
                &format!("request id {key} is already in use"),
            ));
            return None;
        }
        match method {
            "tools/call" => {
                let call = match Call::parse(params.as_ref()) {
                    Ok(call) => call,
                    Err(message) => {
                        self.to_client(&jsonrpc::error(&id, INVALID_PARAMS, &message));
                        return None;
                    }
                };
                let flag = Arc::new(AtomicBool::new(false));
                lock(&self.calls).insert(key.clone(), Arc::clone(&flag));
                let proxy = Arc::clone(self);
                Some(std::thread::spawn(move || {
                    let reply = proxy.govern(&line, &id, &call, &flag);
                    lock(&proxy.calls).remove(&key);
                    match reply {
                        Reply::Result(result) => proxy.to_client(&jsonrpc::result(&id, &result)),
                        Reply::Error(code, message) => proxy.to_client(&jsonrpc::error(&id, code, &message)),
                        Reply::Done => {}
                    }
                }))
            }
            "initialize" => {
                let line = negotiate(line, params);
                lock(&self.pending).insert(key, Pending::Initialize);
                self.forward(&id, &line);
                None
            }
            "tools/list" if self.options.hide_denied => {
                lock(&self.pending).insert(key, Pending::ToolsList);
                self.forward(&id, &line);
                None
            }
            _ => {
                lock(&self.pending).insert(key, Pending::Plain);
                self.forward(&id, &line);
                None
            }
        }
    }

    fn forward(self: &Arc<Self>, id: &Value, line: &str) {
        if !self.to_upstream(line) {
            lock(&self.pending).remove(&jsonrpc::id_key(id));
            self.to_client(&jsonrpc::error(id, INTERNAL_ERROR, "the upstream MCP server has exited"));
        }
    }

    fn read_upstream(self: &Arc<Self>, output: impl std::io::BufRead) {
        for line in output.lines() {
            let Ok(line) = line else {
                tracing::warn!("the upstream wrote a line that is not UTF-8; answered with a parse error");
                self.to_upstream(&jsonrpc::error(
                    &Value::Null,
                    jsonrpc::PARSE_ERROR,
                    "parse error: not UTF-8",
                ));
                continue;
            };
            self.from_upstream(&line);
        }
        // The upstream's output ended: it exited. Requests waiting on it get an error; calls
        // forwarded to it see their sender dropped.
        self.alive.store(false, Ordering::SeqCst);
        if let Link::Stdio(stdin) = &self.link {
            lock(stdin).take();
        }
        let pending: Vec<(String, Pending)> = lock(&self.pending).drain().collect();
        for (key, pending) in pending {
            if !matches!(pending, Pending::Call(..))
                && let Ok(id) = serde_json::from_str::<Value>(&key)
            {
                self.to_client(&jsonrpc::error(&id, INTERNAL_ERROR, "the upstream MCP server has exited"));
            }
        }
        tracing::warn!("the upstream MCP server has exited");
    }

    /// One message from the upstream: an answer goes where its request came from, anything
    /// else to the agent as it is.
    fn from_upstream(self: &Arc<Self>, line: &str) {
        if line.trim().is_empty() {
            return;
        }
        match jsonrpc::parse(line) {
            Err(bad) => {
                tracing::warn!(error = %bad.message, "the upstream wrote a malformed message");
                self.to_upstream(&bad.answer());
            }
            Ok(Message::Response { id, outcome }) => {
                let pending = lock(&self.pending).remove(&jsonrpc::id_key(&id));
                match pending {
                    Some(Pending::Call(sender, cancelled)) => {
                        // Answered from this thread, the fastest way back; a cancelled call's
                        // late answer is dropped.
                        if !cancelled.load(Ordering::SeqCst) {
                            self.to_client(line);
                        }
                        let _ = sender.send(outcome);
                    }
                    Some(Pending::Initialize) => {
                        if let (Link::Http(http), Ok(result)) = (&self.link, &outcome) {
                            if let Some(version) = result.get("protocolVersion").and_then(Value::as_str) {
                                http.set_version(version);
                            }
                            let proxy = Arc::clone(self);
                            std::thread::spawn(move || {
                                if let Link::Http(http) = &proxy.link {
                                    http.listen(&mut |message| proxy.from_upstream(&message));
                                }
                            });
                        }
                        self.to_client(&initialized(line.to_owned(), &id, &outcome));
                    }
                    Some(Pending::ToolsList) => {
                        // Asking Airlock about each tool takes round trips: not on this thread.
                        let (proxy, line) = (Arc::clone(self), line.to_owned());
                        std::thread::spawn(move || {
                            let answer = match outcome {
                                Ok(result) => jsonrpc::result(&id, &proxy.without_denied(result)),
                                Err(_) => line,
                            };
                            proxy.to_client(&answer);
                        });
                    }
                    Some(Pending::Plain) | None => self.to_client(line),
                }
            }
            Ok(_) => self.to_client(line),
        }
    }

    /// A `tools/list` result without the tools the policy denies whatever the arguments; a
    /// tool Airlock cannot be asked about stays listed (calling it is still governed).
    fn without_denied(&self, mut result: Value) -> Value {
        let Some(tools) = result.get_mut("tools").and_then(Value::as_array_mut) else { return result };
        tools.retain(|tool| {
            let Some(name) = tool.get("name").and_then(Value::as_str) else { return true };
            let body = call::explain_body(&self.options.server, &self.options.env, name);
            match self.options.airlock.explain(&body) {
                Ok(Answer { status: 200, body, .. }) => !call::denied_whatever_the_arguments(&body),
                Ok(Answer { status, .. }) => {
                    tracing::warn!(tool = name, status, "cannot ask Airlock whether the tool is denied; listed");
                    true
                }
                Err(e) => {
                    tracing::warn!(tool = name, error = %e, "cannot ask Airlock whether the tool is denied; listed");
                    true
                }
            }
        });
        result
    }

    /// Takes one tool call through Airlock, and through the upstream when the gates allow it.
    fn govern(self: &Arc<Self>, line: &str, id: &Value, call: &Call, cancelled: &Arc<AtomicBool>) -> Reply {
        let server = &self.options.server;
        let digest = call::call_digest(&self.session, server, &call.tool, &call.arguments);
        loop {
            let generation = lock(&self.generations).get(&digest).copied().unwrap_or(0);
            let key = call::idempotency_key(&digest, generation);
            let body = call::submission(server, &self.options.env, call, &key);
            let answer = match self.options.airlock.submit(&body) {
                Ok(answer) => answer,
                Err(e) => {
                    tracing::warn!(error = %e, "gate a unreachable; the call is refused");
                    return Reply::Result(call::tool_error(&format!("{UNAVAILABLE}: {e}")));
                }
            };
            match call::admission(answer.status, &answer.body, answer.replayed) {
                Admission::Refused(result) => return Reply::Result(result),
                Admission::Job { job_id, state, replayed } => {
                    match self.follow(line, id, call, &job_id, &state, replayed, cancelled) {
                        Some(reply) => return reply,
                        None => {
                            // Ended without success before this call: the agent asks again.
                            let mut generations = lock(&self.generations);
                            let next = generations.entry(digest.clone()).or_insert(0);
                            *next = (*next).max(generation + 1);
                        }
                    }
                }
            }
        }
    }

    /// Follows a job until the call can be answered; `None` when a new job must be submitted.
    #[expect(clippy::too_many_arguments, reason = "the call, its job and its cancellation, all needed")]
    fn follow(
        self: &Arc<Self>,
        line: &str,
        id: &Value,
        call: &Call,
        job_id: &str,
        state: &str,
        mut repeat: bool,
        cancelled: &Arc<AtomicBool>,
    ) -> Option<Reply> {
        let deadline = Instant::now() + self.options.approval_wait;
        let mut progress = Progress::new(call.progress_token.clone());
        let mut claim_wait = Duration::ZERO;
        let mut step = if state == "queued" && !repeat {
            Step::Claim
        } else {
            match self.look(job_id, repeat) {
                Ok(step) => step,
                Err(reply) => return Some(reply),
            }
        };
        loop {
            repeat = false;
            if cancelled.load(Ordering::SeqCst) {
                self.cancel(job_id);
                return Some(Reply::Done);
            }
            match step {
                Step::Claim => {
                    // Claimed before and still queued (throttled or backing off at Gate B).
                    if !claim_wait.is_zero() && Instant::now() >= deadline {
                        return Some(Reply::Result(call::tool_error(&format!(
                            "job {job_id} is queued but not dispatched yet (throttled or backing off at Gate B); \
                             call the tool again with the same arguments to continue"
                        ))));
                    }
                    let wait = claim_wait.min(deadline.saturating_duration_since(Instant::now()));
                    match self.options.airlock.claim(&self.options.pool, job_id, wait) {
                        Ok(Answer { status: 200, body, .. }) => {
                            return Some(self.execute(line, id, job_id, &body, cancelled));
                        }
                        Ok(Answer { status: 204, .. }) => {}
                        Ok(Answer { status, body, .. }) => {
                            let message = body.get("message").and_then(Value::as_str).unwrap_or("");
                            return Some(Reply::Result(call::tool_error(&format!(
                                "Airlock refused to dispatch job {job_id} (HTTP {status}): {message}"
                            ))));
                        }
                        Err(e) => {
                            return Some(Reply::Result(call::tool_error(&format!("{UNAVAILABLE}: {e}"))));
                        }
                    }
                    claim_wait = CLAIM_WAIT_MAX;
                    progress.tick(self, &format!("job {job_id} is waiting for Gate B"));
                }
                Step::AwaitApproval(ref approval) => {
                    if Instant::now() >= deadline {
                        let console = self.options.console_url.as_deref();
                        return Some(Reply::Result(call::pending(approval, job_id, console)));
                    }
                    progress.tick(self, &format!("waiting for a human to approve {approval} (job {job_id})"));
                    std::thread::sleep(POLL);
                }
                Step::AwaitEnd => {
                    if Instant::now() >= deadline {
                        return Some(Reply::Result(call::tool_error(&format!(
                            "this call is running as job {job_id}; call the tool again with the same arguments \
                             for its result"
                        ))));
                    }
                    progress.tick(self, &format!("job {job_id} is running"));
                    std::thread::sleep(POLL);
                }
                Step::Done(result) => return Some(Reply::Result(result)),
                Step::Ended(result) => return Some(Reply::Result(result)),
                Step::Again => return None,
            }
            step = match self.look(job_id, repeat) {
                Ok(step) => step,
                Err(reply) => return Some(reply),
            };
        }
    }

    /// The job's view, read as the next step.
    fn look(&self, job_id: &str, repeat: bool) -> Result<Step, Reply> {
        match self.options.airlock.job(job_id) {
            Ok(Answer { status: 200, body, .. }) => Ok(call::step(&body, repeat)),
            Ok(Answer { status, .. }) => Err(Reply::Result(call::tool_error(&format!(
                "{UNAVAILABLE}: reading job {job_id} answered HTTP {status}"
            )))),
            Err(e) => Err(Reply::Result(call::tool_error(&format!("{UNAVAILABLE}: {e}")))),
        }
    }

    fn cancel(&self, job_id: &str) {
        match self.options.airlock.cancel(job_id) {
            Ok(Answer { status: 200, .. }) => tracing::info!(job_id, "cancelled by the MCP client"),
            Ok(Answer { status, body, .. }) => {
                tracing::warn!(job_id, status, answer = %body, "the job could not be cancelled");
            }
            Err(e) => tracing::warn!(job_id, error = %e, "the job could not be cancelled"),
        }
    }

    /// Runs a leased job on the upstream: forwards the call and keeps the lease; the reader
    /// hands the agent the upstream's answer as it came, and this records it with the job.
    fn execute(
        self: &Arc<Self>,
        line: &str,
        id: &Value,
        job_id: &str,
        claim: &Value,
        cancelled: &Arc<AtomicBool>,
    ) -> Reply {
        let token = claim.get("lease_token").and_then(Value::as_str).unwrap_or_default().to_owned();
        let heartbeat =
            Duration::from_millis(claim.get("heartbeat_ms").and_then(Value::as_u64).unwrap_or(10_000));
        let key = jsonrpc::id_key(id);
        let (sender, receiver) = mpsc::channel();
        lock(&self.pending).insert(key.clone(), Pending::Call(sender, Arc::clone(cancelled)));
        if !self.alive.load(Ordering::SeqCst) || !self.to_upstream(line) {
            lock(&self.pending).remove(&key);
            self.report(
                self.options.airlock.fail(job_id, &token, "the upstream MCP server has exited"),
                job_id,
            );
            return Reply::Error(INTERNAL_ERROR, "the upstream MCP server has exited".into());
        }
        let mut next_beat = Instant::now() + heartbeat;
        loop {
            match receiver.recv_timeout(POLL.min(heartbeat)) {
                Ok(outcome) => {
                    let recorded = match outcome {
                        Ok(result) if result.get("isError") == Some(&Value::Bool(true)) => {
                            self.options.airlock.fail(job_id, &token, &call::error_text(&result))
                        }
                        Ok(result) => self.options.airlock.complete(
                            job_id,
                            &token,
                            &call::recorded(&result, MCP_RESULT_BYTES_MAX),
                        ),
                        Err(error) => {
                            let message = error.get("message").and_then(Value::as_str).unwrap_or("an error");
                            self.options.airlock.fail(
                                job_id,
                                &token,
                                &format!("the upstream answered {message}"),
                            )
                        }
                    };
                    self.report(recorded, job_id);
                    return Reply::Done;
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let failed = self.options.airlock.fail(
                        job_id,
                        &token,
                        "the upstream MCP server exited or failed during the call",
                    );
                    self.report(failed, job_id);
                    return Reply::Error(
                        INTERNAL_ERROR,
                        "the upstream MCP server exited or failed during the call".into(),
                    );
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
            if cancelled.load(Ordering::SeqCst) {
                // The agent's cancellation went on to the upstream already.
                self.cancel(job_id);
                return Reply::Done;
            }
            if Instant::now() >= next_beat {
                next_beat = Instant::now() + heartbeat;
                let beat = self.options.airlock.heartbeat(job_id, &token);
                if let Ok(Answer { status: 200, body, .. }) = &beat
                    && body.get("cancel") == Some(&Value::Bool(true))
                {
                    // The upstream's late answer, if any, is dropped (the entry stays, flagged).
                    cancelled.store(true, Ordering::SeqCst);
                    let params = json!({"requestId": id, "reason": "cancelled in Airlock"});
                    self.to_upstream(&jsonrpc::notification("notifications/cancelled", &params));
                    return Reply::Result(call::tool_error(&format!(
                        "this call was cancelled in Airlock (job {job_id})"
                    )));
                }
                if let Err(e) = beat {
                    tracing::warn!(job_id, error = %e, "heartbeat failed; the lease may lapse");
                }
            }
        }
    }

    fn report(&self, recorded: Result<Answer, crate::airlock::Unreachable>, job_id: &str) {
        match recorded {
            Ok(Answer { status: 200, .. }) => {}
            Ok(Answer { status, body, .. }) => {
                tracing::warn!(job_id, status, answer = %body, "the job's outcome was not recorded");
            }
            Err(e) => tracing::warn!(job_id, error = %e, "the job's outcome was not recorded"),
        }
    }
}

/// Progress notifications to the agent while a call waits, when it asked for them.
struct Progress {
    token: Option<Value>,
    count: u64,
    next: Instant,
}

impl Progress {
    fn new(token: Option<Value>) -> Self {
        Self { token, count: 0, next: Instant::now() }
    }

    fn tick(&mut self, proxy: &Proxy, message: &str) {
        let Some(token) = &self.token else { return };
        if Instant::now() < self.next {
            return;
        }
        self.next = Instant::now() + PROGRESS_EVERY;
        self.count += 1;
        let params = json!({"progressToken": token, "progress": self.count, "message": message});
        proxy.to_client(&jsonrpc::notification("notifications/progress", &params));
    }
}

/// The `initialize` line for the upstream: the agent's, unless it asks for a protocol version
/// the proxy does not speak, in which case the proxy offers its latest.
fn negotiate(line: String, params: Option<Value>) -> String {
    let asked = params.as_ref().and_then(|p| p.get("protocolVersion")).and_then(Value::as_str);
    if asked.is_some_and(|v| PROTOCOL_VERSIONS.contains(&v)) {
        return line;
    }
    let Ok(Value::Object(mut message)) = serde_json::from_str::<Value>(&line) else { return line };
    let mut params = params.unwrap_or_else(|| json!({}));
    if let Value::Object(p) = &mut params {
        p.insert("protocolVersion".into(), json!(LATEST_PROTOCOL_VERSION));
    }
    message.insert("params".into(), params);
    Value::Object(message).to_string()
}

/// The `initialize` answer for the agent: the upstream's, unless it chose a protocol version
/// the proxy does not speak. Task-augmented tool calls (2025-11-25) are taken out of the
/// capabilities: their result arrives after the call returns, where no job could record it.
fn initialized(line: String, id: &Value, outcome: &Result<Value, Value>) -> String {
    match outcome {
        Ok(result) => match result.get("protocolVersion").and_then(Value::as_str) {
            Some(v) if PROTOCOL_VERSIONS.contains(&v) => {
                let tasks = result.pointer("/capabilities/tasks/requests");
                if tasks.and_then(|r| r.get("tools")).is_none() {
                    return line;
                }
                let mut result = result.clone();
                if let Some(Value::Object(requests)) = result.pointer_mut("/capabilities/tasks/requests") {
                    requests.remove("tools");
                }
                jsonrpc::result(id, &result)
            }
            other => jsonrpc::error(
                id,
                INTERNAL_ERROR,
                &format!(
                    "the upstream MCP server chose protocol version {}, which the Airlock proxy does not speak \
                     (it speaks {})",
                    other.map_or_else(|| "(none)".to_owned(), |v| format!("`{v}`")),
                    PROTOCOL_VERSIONS.join(", ")
                ),
            ),
        },
        Err(_) => line,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "a test fails by panicking")]

    use super::*;

    #[test]
    fn a_known_protocol_version_passes_unchanged_and_an_unknown_one_gets_the_latest() {
        let known = r#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{}}}"#;
        assert_eq!(negotiate(known.into(), Some(json!({"protocolVersion": "2025-06-18"}))), known);
        let future = r#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2099-01-01","capabilities":{"x":1}}}"#;
        let params = serde_json::from_str::<Value>(future).unwrap()["params"].clone();
        let sent: Value = serde_json::from_str(&negotiate(future.into(), Some(params))).unwrap();
        assert_eq!(sent["params"]["protocolVersion"], "2025-11-25");
        assert_eq!(sent["params"]["capabilities"], json!({"x": 1}), "the rest is the agent's");
    }

    #[test]
    fn task_augmented_tool_calls_are_not_offered() {
        let result = json!({"protocolVersion": "2025-11-25",
            "capabilities": {"tools": {}, "tasks": {"list": {}, "requests": {"tools": {"call": {}}}}}});
        let line = jsonrpc::result(&json!(0), &result);
        let answer: Value = serde_json::from_str(&initialized(line, &json!(0), &Ok(result))).unwrap();
        assert_eq!(answer["result"]["capabilities"]["tasks"], json!({"list": {}, "requests": {}}));
        assert_eq!(answer["result"]["capabilities"]["tools"], json!({}));
    }

    #[test]
    fn an_upstream_speaking_an_unknown_version_is_refused() {
        let ok = r#"{"jsonrpc":"2.0","id":0,"result":{"protocolVersion":"2024-11-05"}}"#;
        assert_eq!(initialized(ok.into(), &json!(0), &Ok(json!({"protocolVersion": "2024-11-05"}))), ok);
        let odd = initialized("x".into(), &json!(0), &Ok(json!({"protocolVersion": "1999"})));
        let answer: Value = serde_json::from_str(&odd).unwrap();
        assert!(answer["error"]["message"].as_str().unwrap().contains("`1999`"));
    }
}
