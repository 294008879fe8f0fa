//! The client commands (`airlock submit`, `jobs`, `approvals`, `dlq`, `keys`, and the
//! server-side `policy` commands): thin HTTP calls to a running server that print its answers as tables
//! for people or as the server's own JSON for scripts. The server decides everything; nothing
//! here interprets a policy.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::{Map, Value, json};

use crate::Format;

/// The server `--url` names when neither the flag nor `AIRLOCK_URL` is set.
const DEFAULT_URL: &str = "http://127.0.0.1:8080";
/// How long one request may take in all; a diff over many stored jobs is the slowest call.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// Largest answer read from the server: a snapshot list carries a policy of up to 16 MiB.
const RESPONSE_BYTES_MAX: u64 = 64 * 1024 * 1024;

/// Exit statuses of `airlock submit`, shown in its help.
pub const SUBMIT_EXIT_CODES: &str = "Exit status:\n  \
    0  accepted: queued, or awaiting approval (the approval id is printed)\n  \
    1  not accepted for another reason: bad input, unauthorized, throttled (429), unavailable (503), \
    server unreachable\n  \
    2  denied by the policy (the deciding rule ids and reason are printed)";

/// Where the server is and who is asking; every client command takes these.
#[derive(Args)]
pub struct Connection {
    /// The server's base URL [env: AIRLOCK_URL] [default: http://127.0.0.1:8080].
    #[arg(long, value_name = "URL")]
    url: Option<String>,
    /// The API key [env: AIRLOCK_API_KEY]. Prefer the variable: a flag shows in the process list.
    #[arg(long, value_name = "KEY")]
    api_key: Option<String>,
    /// `human` for tables, `json` for the server's JSON as is (errors included).
    #[arg(long, value_enum, default_value_t)]
    format: Format,
}

/// `airlock submit`.
#[derive(Args)]
pub struct SubmitArgs {
    /// The action, e.g. `infra.resource.delete`.
    #[arg(long, required_unless_present = "job", conflicts_with = "job")]
    topic: Option<String>,
    /// The environment, e.g. `production`.
    #[arg(long, required_unless_present = "job", conflicts_with = "job")]
    env: Option<String>,
    /// A label `KEY=VALUE`; repeat for more.
    #[arg(long = "label", value_name = "KEY=VALUE", conflicts_with = "job")]
    labels: Vec<String>,
    /// The payload as JSON, or `@FILE` to read it from a file (`@-` for stdin).
    #[arg(long, value_name = "JSON|@FILE", conflicts_with = "job")]
    payload: Option<String>,
    /// Makes retries safe: the same key and job return the original answer.
    #[arg(long, value_name = "KEY", conflicts_with = "job")]
    idempotency_key: Option<String>,
    /// The hash of the plan the job executes.
    #[arg(long, value_name = "HASH", conflicts_with = "job")]
    plan_hash: Option<String>,
    /// The whole submit body as JSON, or `@FILE` (`@-` for stdin), instead of the flags above.
    #[arg(long, value_name = "JSON|@FILE")]
    job: Option<String>,
    #[command(flatten)]
    connection: Connection,
}

/// `airlock jobs ...`.
#[derive(Subcommand)]
pub enum JobsCommand {
    /// List the tenant's jobs, oldest first, a page at a time.
    List {
        /// Only jobs in this state, e.g. `queued` or `awaiting_approval`.
        #[arg(long)]
        state: Option<String>,
        /// Only jobs with this exact topic.
        #[arg(long)]
        topic: Option<String>,
        /// Only jobs in this environment.
        #[arg(long)]
        env: Option<String>,
        /// The page after this job id (the `next` of the previous page).
        #[arg(long, value_name = "JOB_ID")]
        after: Option<String>,
        /// Page size, 1 to 500 (server default 50).
        #[arg(long)]
        limit: Option<u32>,
        #[command(flatten)]
        connection: Connection,
    },
    /// One job: its decision, approval request and history.
    Get {
        /// The job id.
        id: String,
        #[command(flatten)]
        connection: Connection,
    },
    /// Cancel a job that has not finished (its submitter, or an operator).
    Cancel {
        /// The job id.
        id: String,
        #[command(flatten)]
        connection: Connection,
    },
}

/// `airlock approvals ...`.
#[derive(Subcommand)]
pub enum ApprovalsCommand {
    /// List approval requests (approver or operator).
    List {
        /// `pending` (default), `approved`, `rejected`, `expired`, `stale` or `all`.
        #[arg(long)]
        status: Option<String>,
        /// The page after this approval id.
        #[arg(long, value_name = "APPROVAL_ID")]
        after: Option<String>,
        /// Page size, 1 to 500 (server default 50).
        #[arg(long)]
        limit: Option<u32>,
        #[command(flatten)]
        connection: Connection,
    },
    /// One approval request with its binding, its job and the job's current decision.
    Get {
        /// The approval id.
        id: String,
        #[command(flatten)]
        connection: Connection,
    },
    /// Approve (approver; never the job's submitter). Refused if the job or policy changed.
    Approve {
        /// The approval id.
        id: String,
        #[command(flatten)]
        connection: Connection,
    },
    /// Reject (approver; never the job's submitter); the job becomes `rejected`.
    Reject {
        /// The approval id.
        id: String,
        /// Why, kept in the audit record.
        #[arg(long)]
        comment: Option<String>,
        #[command(flatten)]
        connection: Connection,
    },
}

/// `airlock dlq ...`.
#[derive(Subcommand)]
pub enum DlqCommand {
    /// List dead-lettered jobs (operator), oldest first, a page at a time.
    List {
        /// Only jobs with this exact topic.
        #[arg(long)]
        topic: Option<String>,
        /// Only jobs whose dead-letter reason contains this text.
        #[arg(long, value_name = "TEXT")]
        reason: Option<String>,
        /// The page after this job id (the `next` of the previous page).
        #[arg(long, value_name = "JOB_ID")]
        after: Option<String>,
        /// Page size, 1 to 500 (server default 50).
        #[arg(long)]
        limit: Option<u32>,
        #[command(flatten)]
        connection: Connection,
    },
    /// One dead-lettered job: why it was dead-lettered, its decision and history (operator).
    Get {
        /// The job id.
        id: String,
        #[command(flatten)]
        connection: Connection,
    },
    /// Send a dead-lettered job back to the queue with fresh attempts (operator); Gate B runs again.
    Retry {
        /// The job id.
        id: String,
        #[command(flatten)]
        connection: Connection,
    },
    /// Take a job out of the DLQ for good (operator); it is kept, `dead_lettered`, for the record.
    Discard {
        /// The job id.
        id: String,
        #[command(flatten)]
        connection: Connection,
    },
}

/// `airlock keys ...`.
#[derive(Subcommand)]
pub enum KeysCommand {
    /// Create an API key (admin) and print its secret, once.
    Create {
        /// The tenant the key acts in.
        #[arg(long)]
        tenant: String,
        /// The key's name, unique in its tenant.
        #[arg(long)]
        name: String,
        /// The person the key authenticates as (default: the name). Quorum and self-approval
        /// compare principals, so one person's several keys count once.
        #[arg(long)]
        principal: Option<String>,
        /// A role: submitter, approver, operator, admin, worker. Repeat or separate with commas.
        #[arg(long = "role", value_name = "ROLE", required = true, value_delimiter = ',')]
        roles: Vec<String>,
        #[command(flatten)]
        connection: Connection,
    },
    /// List API keys (admin); never their secrets.
    List {
        #[command(flatten)]
        connection: Connection,
    },
    /// Revoke an API key (admin); requests with it then get 401.
    Revoke {
        /// The key id.
        id: String,
        #[command(flatten)]
        connection: Connection,
    },
}

/// `airlock policy publish`.
#[derive(Args)]
pub struct PublishArgs {
    /// The policy file to make the active snapshot.
    file: PathBuf,
    #[command(flatten)]
    connection: Connection,
}

/// `airlock policy rollback`.
#[derive(Args)]
pub struct RollbackArgs {
    /// The snapshot version to restore; it is published again as a new version.
    #[arg(value_name = "VERSION")]
    snapshot_version: u64,
    #[command(flatten)]
    connection: Connection,
}

/// `airlock policy snapshots`.
#[derive(Args)]
pub struct SnapshotsArgs {
    #[command(flatten)]
    connection: Connection,
}

/// `airlock policy diff`.
#[derive(Args)]
pub struct DiffArgs {
    /// The candidate policy file.
    file: PathBuf,
    /// Only jobs created at or after this time, in milliseconds since the epoch.
    #[arg(long, value_name = "MS")]
    since: Option<i64>,
    /// Only jobs created before this time, in milliseconds since the epoch.
    #[arg(long, value_name = "MS")]
    until: Option<i64>,
    /// Evaluate at most this many jobs (server default 100000).
    #[arg(long)]
    limit: Option<u32>,
    #[command(flatten)]
    connection: Connection,
}

/// A failure already reported to the user, with the status to exit with.
struct Exit(u8);

fn finish(result: Result<(), Exit>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Exit(code)) => ExitCode::from(code),
    }
}

fn fail(message: impl std::fmt::Display) -> Exit {
    eprintln!("error: {message}");
    Exit(1)
}

enum Verb {
    Get,
    Post,
    Delete,
}

enum Payload<'a> {
    Empty,
    Json(&'a Value),
    Text { text: &'a str, content_type: &'a str },
}

/// A server answer: status, JSON body, and whether it replays an earlier submission.
struct Reply {
    status: u16,
    body: Value,
    replayed: bool,
}

impl Reply {
    fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    fn code(&self) -> &str {
        field(&self.body, "error").as_str().unwrap_or("")
    }
}

/// One server, one key, one output format.
struct Client {
    base: String,
    key: String,
    format: Format,
    agent: ureq::Agent,
}

impl Client {
    fn new(connection: &Connection) -> Result<Self, Exit> {
        let from_env = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let base = connection
            .url
            .clone()
            .or_else(|| from_env("AIRLOCK_URL"))
            .unwrap_or_else(|| DEFAULT_URL.to_owned())
            .trim_end_matches('/')
            .to_owned();
        if !base.starts_with("http://") {
            return Err(fail(format!(
                "the server URL `{base}` must start with `http://` (this client speaks plain HTTP; \
                 put a TLS-terminating proxy in front of it for HTTPS)"
            )));
        }
        let key = connection
            .api_key
            .clone()
            .or_else(|| from_env("AIRLOCK_API_KEY"))
            .ok_or_else(|| fail("no API key: set `AIRLOCK_API_KEY` (or pass `--api-key`)"))?;
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(REQUEST_TIMEOUT))
            .build()
            .into();
        Ok(Self { base, key, format: connection.format, agent })
    }

    /// Sends one request; only a transport failure is an error here.
    fn send(&self, verb: Verb, path: &str, payload: Payload<'_>) -> Result<Reply, Exit> {
        let url = format!("{}{path}", self.base);
        let auth = format!("Bearer {}", self.key);
        let result = match (verb, payload) {
            (Verb::Get, _) => self.agent.get(&url).header("authorization", &auth).call(),
            (Verb::Delete, _) => self.agent.delete(&url).header("authorization", &auth).call(),
            (Verb::Post, Payload::Empty) => self.agent.post(&url).header("authorization", &auth).send_empty(),
            (Verb::Post, Payload::Json(value)) => self
                .agent
                .post(&url)
                .header("authorization", &auth)
                .header("content-type", "application/json")
                .send(value.to_string()),
            (Verb::Post, Payload::Text { text, content_type }) => self
                .agent
                .post(&url)
                .header("authorization", &auth)
                .header("content-type", content_type)
                .send(text),
        };
        let mut response = result.map_err(|e| {
            fail(format!(
                "cannot reach the Airlock server at {}: {e} \
                 (is `airlock serve` running? set `--url` or `AIRLOCK_URL`)",
                self.base
            ))
        })?;
        let status = response.status();
        let replayed = response
            .headers()
            .get("idempotent-replayed")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"));
        let text = response
            .body_mut()
            .with_config()
            .limit(RESPONSE_BYTES_MAX)
            .read_to_string()
            .map_err(|e| fail(format!("cannot read the answer from {}: {e}", self.base)))?;
        let body = match serde_json::from_str::<Value>(&text) {
            Ok(body) => body,
            Err(_) => {
                let reason = status.canonical_reason().unwrap_or("");
                let excerpt: String = text.trim().chars().take(200).collect();
                let shown = if excerpt.is_empty() { "no body".to_owned() } else { format!("`{excerpt}`") };
                return Err(fail(format!(
                    "the server at {} answered {} {reason} with {shown}, not JSON",
                    self.base,
                    status.as_u16()
                )));
            }
        };
        Ok(Reply { status: status.as_u16(), body, replayed })
    }

    /// Sends a request and returns the body of a 2xx answer; anything else is reported.
    fn call(&self, verb: Verb, path: &str, payload: Payload<'_>) -> Result<Value, Exit> {
        let reply = self.send(verb, path, payload)?;
        if reply.is_success() { Ok(reply.body) } else { Err(self.refused(&reply)) }
    }

    /// Reports an error answer: its JSON on stdout with `--format json`, and always the code,
    /// message and details on stderr.
    fn refused(&self, reply: &Reply) -> Exit {
        if self.format == Format::Json {
            print_json(&reply.body);
        }
        let code = if reply.code().is_empty() { "error" } else { reply.code() };
        let message = field(&reply.body, "message").as_str().unwrap_or("(no message)");
        eprintln!("error: {code} (HTTP {}): {message}", reply.status);
        if let Some(object) = reply.body.as_object() {
            for (key, value) in object {
                match (key.as_str(), value) {
                    ("error" | "message", _) => {}
                    ("fields", Value::Array(fields)) => {
                        for f in fields {
                            eprintln!("  {}: {}", text(f, "field"), text(f, "message"));
                        }
                    }
                    ("diagnostics", Value::Array(diagnostics)) => {
                        for d in diagnostics {
                            eprintln!(
                                "  {}:{}: {}: {}",
                                field(d, "line"),
                                field(d, "col"),
                                text(d, "severity"),
                                text(d, "message")
                            );
                            if let Some(help) = field(d, "help").as_str() {
                                eprintln!("    help: {help}");
                            }
                        }
                    }
                    ("current_decision", decision) => {
                        eprintln!("  current decision: {}", decision_line(decision));
                    }
                    (key, value) => eprintln!("  {}: {}", key.replace('_', " "), scalar(value)),
                }
            }
        }
        Exit(1)
    }

    /// Prints a successful answer: the server's JSON as is, or the human rendering.
    fn show(&self, body: &Value, human: impl FnOnce(&Value)) {
        match self.format {
            Format::Json => print_json(body),
            Format::Human => human(body),
        }
    }
}

fn print_json(value: &Value) {
    println!("{}", serde_json::to_string_pretty(value).unwrap_or_default());
}

/// A field of a JSON object, or null: answers are read leniently and shown as they are.
fn field<'a>(value: &'a Value, key: &str) -> &'a Value {
    value.get(key).unwrap_or(&Value::Null)
}

/// A field as one line of text.
fn text(value: &Value, key: &str) -> String {
    scalar(field(value, key))
}

/// A JSON value as one line: strings bare, null as `-`, lists comma-separated.
fn scalar(value: &Value) -> String {
    match value {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        Value::Array(items) if items.iter().all(|i| !i.is_object() && !i.is_array()) => {
            if items.is_empty() {
                "-".to_owned()
            } else {
                items.iter().map(scalar).collect::<Vec<_>>().join(", ")
            }
        }
        other => other.to_string(),
    }
}

/// A time field (milliseconds since the epoch) in UTC, or `-`.
fn time(value: &Value, key: &str) -> String {
    value[key].as_i64().map_or_else(|| "-".to_owned(), utc)
}

/// `2025-06-01T12:00:00Z` for milliseconds since the epoch.
fn utc(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, day_secs) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Days to a civil date: Howard Hinnant's `civil_from_days`.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        day_secs / 3600,
        day_secs % 3600 / 60,
        day_secs % 60
    )
}

/// `deny (rule-a, rule-b)`, or `allow (default)` when no rule decided.
fn decision_line(decision: &Value) -> String {
    let rules = scalar(field(decision, "rule_ids"));
    let rules = if rules == "-" { "default".to_owned() } else { rules };
    format!("{} ({rules})", text(decision, "decision"))
}

/// Columns aligned to their widest cell, two spaces apart; `empty` when there are no rows.
fn table(headers: &[&str], rows: &[Vec<String>], empty: &str) {
    if rows.is_empty() {
        println!("{empty}");
        return;
    }
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> =
            cells.iter().zip(&widths).map(|(cell, width)| format!("{cell:<width$}")).collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(headers.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

/// `key  value` lines with the values aligned.
fn block(pairs: &[(&str, String)]) {
    let width = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (key, value) in pairs {
        println!("{key:<width$}  {value}");
    }
}

/// A path segment or query value, percent-encoded.
fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// `?a=1&b=2` from the parameters that are set, or nothing.
fn query(params: &[(&str, Option<String>)]) -> String {
    let set: Vec<String> =
        params.iter().filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", encode(v)))).collect();
    if set.is_empty() { String::new() } else { format!("?{}", set.join("&")) }
}

fn read_file(path: &Path, what: &str) -> Result<String, Exit> {
    std::fs::read_to_string(path).map_err(|e| fail(format!("cannot read {what} `{}`: {e}", path.display())))
}

/// JSON from a flag value: inline, `@FILE`, or `@-` for stdin.
fn json_argument(spec: &str, flag: &str) -> Result<Value, Exit> {
    let (text, source) = match spec.strip_prefix('@') {
        Some("-") => {
            let mut buffer = String::new();
            std::io::stdin()
                .read_to_string(&mut buffer)
                .map_err(|e| fail(format!("cannot read {flag} from stdin: {e}")))?;
            (buffer, "stdin".to_owned())
        }
        Some(path) => (read_file(Path::new(path), flag)?, format!("`{path}`")),
        None => (spec.to_owned(), flag.to_owned()),
    };
    serde_json::from_str(&text).map_err(|e| fail(format!("{flag}: {source} is not valid JSON: {e}")))
}

// ---- submit ----------------------------------------------------------------------------

/// `airlock submit`: exit 0 accepted, 1 not accepted, 2 denied (see [`SUBMIT_EXIT_CODES`]).
pub fn submit(args: &SubmitArgs) -> ExitCode {
    finish(submit_job(args))
}

fn submit_body(args: &SubmitArgs) -> Result<Value, Exit> {
    if let Some(spec) = &args.job {
        let body = json_argument(spec, "--job")?;
        return if body.is_object() { Ok(body) } else { Err(fail("--job must be a JSON object")) };
    }
    let mut body = Map::new();
    body.insert("topic".into(), json!(args.topic));
    body.insert("env".into(), json!(args.env));
    if !args.labels.is_empty() {
        let mut labels = Map::new();
        for label in &args.labels {
            let (key, value) = label
                .split_once('=')
                .ok_or_else(|| fail(format!("--label `{label}` must be `KEY=VALUE`")))?;
            labels.insert(key.to_owned(), json!(value));
        }
        body.insert("labels".into(), Value::Object(labels));
    }
    if let Some(spec) = &args.payload {
        body.insert("payload".into(), json_argument(spec, "--payload")?);
    }
    if let Some(key) = &args.idempotency_key {
        body.insert("idempotency_key".into(), json!(key));
    }
    if let Some(hash) = &args.plan_hash {
        body.insert("plan_hash".into(), json!(hash));
    }
    Ok(Value::Object(body))
}

fn submit_job(args: &SubmitArgs) -> Result<(), Exit> {
    let client = Client::new(&args.connection)?;
    let body = submit_body(args)?;
    let reply = client.send(Verb::Post, "/api/v1/jobs", Payload::Json(&body))?;
    show_submitted(&client, &reply)
}

/// `airlock plan submit`: the plan JSON to `POST /api/v1/plans` with the parameters in the
/// query; exit codes as `airlock submit`, and the changes that are not allowed are listed.
pub fn submit_plan(connection: &Connection, params: &[(&str, Option<String>)], plan_json: &str) -> ExitCode {
    let submitted = Client::new(connection).and_then(|client| {
        let path = format!("/api/v1/plans{}", query(params));
        let reply = client.send(
            Verb::Post,
            &path,
            Payload::Text { text: plan_json, content_type: "application/json" },
        )?;
        if client.format == Format::Human {
            let rows: Vec<Vec<String>> = field(&reply.body, "changes")
                .as_array()
                .map(|all| {
                    all.iter()
                        .filter(|c| field(c, "decision") != "allow")
                        .map(|c| {
                            vec![
                                text(c, "decision"),
                                text(c, "action"),
                                text(c, "address"),
                                text(c, "reason"),
                            ]
                        })
                        .collect()
                })
                .unwrap_or_default();
            if !rows.is_empty() {
                table(&["DECISION", "ACTION", "ADDRESS", "REASON"], &rows, "");
                println!();
            }
        }
        show_submitted(&client, &reply)
    });
    finish(submitted)
}

/// Prints Gate A's answer to a submission; exit 2 when denied.
fn show_submitted(client: &Client, reply: &Reply) -> Result<(), Exit> {
    if reply.status == 403 && reply.code() == "policy_denied" {
        match client.format {
            Format::Json => print_json(&reply.body),
            Format::Human => {
                let b = &reply.body;
                eprintln!("denied by {}: {}", scalar(field(b, "rule_ids")), text(b, "reason"));
                eprintln!("snapshot {}", text(b, "snapshot"));
            }
        }
        return Err(Exit(2));
    }
    if !reply.is_success() {
        return Err(client.refused(reply));
    }
    client.show(&reply.body, |b| {
        let decision = field(b, "decision");
        let approval = field(b, "approval");
        if approval.is_object() {
            println!(
                "job {} awaits approval {} (quorum {}, expires {})",
                text(b, "job_id"),
                text(approval, "id"),
                text(approval, "quorum"),
                time(approval, "expires_at"),
            );
        } else {
            println!("job {} is {}", text(b, "job_id"), text(b, "state"));
        }
        let mut pairs = vec![
            ("decision", decision_line(decision)),
            ("reason", text(decision, "reason")),
            ("snapshot", text(decision, "snapshot")),
            ("job hash", text(b, "job_hash")),
        ];
        if field(b, "gate_a_bypassed") == true {
            pairs.push((
                "bypassed",
                "yes: the safety check was unavailable; accepted by fail-open mode".into(),
            ));
        }
        if reply.replayed {
            pairs.push(("replayed", "yes: the answer recorded for this idempotency key".into()));
        }
        block(&pairs);
    });
    Ok(())
}

// ---- jobs --------------------------------------------------------------------------------

/// `airlock jobs ...`.
pub fn jobs(command: JobsCommand) -> ExitCode {
    finish(match command {
        JobsCommand::List { state, topic, env, after, limit, connection } => {
            let path = format!(
                "/api/v1/jobs{}",
                query(&[
                    ("state", state),
                    ("topic", topic),
                    ("env", env),
                    ("after", after),
                    ("limit", limit.map(|n| n.to_string())),
                ])
            );
            list_jobs(&connection, &path)
        }
        JobsCommand::Get { id, connection } => get_job(&connection, &id),
        JobsCommand::Cancel { id, connection } => Client::new(&connection).and_then(|client| {
            let path = format!("/api/v1/jobs/{}/cancel", encode(&id));
            let body = client.call(Verb::Post, &path, Payload::Empty)?;
            client.show(&body, |b| println!("job {} is {}", text(b, "job_id"), text(b, "state")));
            Ok(())
        }),
    })
}

fn list_jobs(connection: &Connection, path: &str) -> Result<(), Exit> {
    let headers = ["ID", "STATE", "TOPIC", "ENV", "DECISION", "CREATED"];
    list_page(connection, path, "jobs", &headers, "no jobs", |j| {
        vec![
            text(j, "job_id"),
            text(j, "state"),
            text(j, "topic"),
            text(j, "env"),
            text(j, "decision"),
            time(j, "created_at"),
        ]
    })
}

/// Fetches one page of a list endpoint and prints it as a table, with the next-page cursor.
fn list_page(
    connection: &Connection,
    path: &str,
    key: &str,
    headers: &[&str],
    empty: &str,
    row: impl Fn(&Value) -> Vec<String>,
) -> Result<(), Exit> {
    let client = Client::new(connection)?;
    let body = client.call(Verb::Get, path, Payload::Empty)?;
    client.show(&body, |b| {
        let rows: Vec<Vec<String>> =
            field(b, key).as_array().map(|items| items.iter().map(&row).collect()).unwrap_or_default();
        table(headers, &rows, empty);
        if let Some(next) = field(b, "next").as_str() {
            println!("more: --after {next}");
        }
    });
    Ok(())
}

fn get_job(connection: &Connection, id: &str) -> Result<(), Exit> {
    let client = Client::new(connection)?;
    let body = client.call(Verb::Get, &format!("/api/v1/jobs/{}", encode(id)), Payload::Empty)?;
    client.show(&body, print_job);
    Ok(())
}

/// A job in full (`GET /api/v1/jobs/{id}` or `GET /api/v1/dlq/{id}`), then its history.
fn print_job(b: &Value) {
    let gate_a = field(field(b, "decisions"), "gate_a");
    let labels = field(b, "labels")
        .as_object()
        .map(|l| l.iter().map(|(k, v)| format!("{k}={}", scalar(v))).collect::<Vec<_>>().join(", "))
        .filter(|l| !l.is_empty())
        .unwrap_or_else(|| "-".to_owned());
    let mut pairs = vec![
        ("id", text(b, "job_id")),
        ("state", text(b, "state")),
        ("topic", text(b, "topic")),
        ("env", text(b, "env")),
        ("tenant", text(b, "tenant")),
        ("principal", text(b, "principal")),
        ("labels", labels),
        ("payload", field(b, "payload").to_string()),
        ("plan hash", text(b, "plan_hash")),
        ("idempotency key", text(b, "idempotency_key")),
        ("job hash", text(b, "job_hash")),
        ("decision", decision_line(gate_a)),
        ("reason", text(gate_a, "reason")),
        ("snapshot", format!("{} (version {})", text(gate_a, "snapshot"), text(gate_a, "snapshot_version"))),
    ];
    if field(b, "gate_a_bypassed") == true {
        pairs.push(("bypassed", "yes: accepted by fail-open mode without a safety check".into()));
    }
    if !field(b, "reason").is_null() {
        pairs.insert(2, ("dead-lettered", text(b, "reason")));
    }
    let approval = field(b, "approval");
    if approval.is_object() {
        pairs.push(("approval", approval_line(approval)));
    }
    pairs.push(("created", time(b, "created_at")));
    pairs.push(("updated", time(b, "updated_at")));
    block(&pairs);
    let history: Vec<Vec<String>> = field(b, "history")
        .as_array()
        .map(|h| {
            h.iter()
                .map(|t| {
                    vec![
                        time(t, "at"),
                        format!("{} -> {}", text(t, "from"), text(t, "to")),
                        text(t, "actor"),
                        text(t, "reason"),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    println!();
    table(&["AT", "TRANSITION", "ACTOR", "REASON"], &history, "no history");
}

/// `appr_... pending, 1/2 approvals (alice), expires ...`.
fn approval_line(a: &Value) -> String {
    let count = field(a, "approvers").as_array().map_or(0, Vec::len);
    let approvers = if count == 0 { String::new() } else { format!(" ({})", scalar(field(a, "approvers"))) };
    format!(
        "{} {}, {count}/{} approvals{approvers}, expires {}",
        text(a, "id"),
        text(a, "status"),
        text(a, "quorum"),
        time(a, "expires_at")
    )
}

// ---- approvals ---------------------------------------------------------------------------

/// `airlock approvals ...`.
pub fn approvals(command: ApprovalsCommand) -> ExitCode {
    finish(match command {
        ApprovalsCommand::List { status, after, limit, connection } => {
            let path = format!(
                "/api/v1/approvals{}",
                query(&[("status", status), ("after", after), ("limit", limit.map(|n| n.to_string()))])
            );
            list_approvals(&connection, &path)
        }
        ApprovalsCommand::Get { id, connection } => get_approval(&connection, &id),
        ApprovalsCommand::Approve { id, connection } => decide(&connection, &id, "approve", None),
        ApprovalsCommand::Reject { id, comment, connection } => {
            decide(&connection, &id, "reject", comment.map(|c| serde_json::json!({"comment": c})))
        }
    })
}

fn list_approvals(connection: &Connection, path: &str) -> Result<(), Exit> {
    let headers = ["ID", "STATUS", "JOB", "REQUESTED BY", "APPROVALS", "RULES", "EXPIRES"];
    list_page(connection, path, "approvals", &headers, "no approval requests", |a| {
        let count = field(a, "approvers").as_array().map_or(0, Vec::len);
        vec![
            text(a, "id"),
            text(a, "status"),
            text(a, "job_id"),
            text(a, "requested_by"),
            format!("{count}/{}", text(a, "quorum")),
            scalar(field(field(a, "binding"), "rule_ids")),
            time(a, "expires_at"),
        ]
    })
}

fn get_approval(connection: &Connection, id: &str) -> Result<(), Exit> {
    let client = Client::new(connection)?;
    let body = client.call(Verb::Get, &format!("/api/v1/approvals/{}", encode(id)), Payload::Empty)?;
    client.show(&body, |a| {
        let job = field(a, "job");
        let binding = field(a, "binding");
        let count = field(a, "approvers").as_array().map_or(0, Vec::len);
        block(&[
            ("id", text(a, "id")),
            ("status", text(a, "status")),
            (
                "job",
                format!(
                    "{} ({} {} in {})",
                    text(a, "job_id"),
                    text(job, "state"),
                    text(job, "topic"),
                    text(job, "env")
                ),
            ),
            ("payload", field(job, "payload").to_string()),
            ("requested by", text(a, "requested_by")),
            ("approvals", format!("{count}/{} ({})", text(a, "quorum"), scalar(field(a, "approvers")))),
            ("created", time(a, "created_at")),
            ("expires", time(a, "expires_at")),
            ("decided", format!("{} by {}", time(a, "decided_at"), text(a, "decided_by"))),
            ("bound job hash", text(binding, "job_hash")),
            ("bound snapshot", text(binding, "snapshot")),
            ("bound rules", scalar(field(binding, "rule_ids"))),
            ("decision now", decision_line(field(a, "current_decision"))),
            ("snapshot now", text(field(a, "current_decision"), "snapshot")),
        ]);
    });
    Ok(())
}

fn decide(connection: &Connection, id: &str, action: &str, body: Option<Value>) -> Result<(), Exit> {
    let client = Client::new(connection)?;
    let path = format!("/api/v1/approvals/{}/{action}", encode(id));
    let payload = body.as_ref().map_or(Payload::Empty, Payload::Json);
    let body = client.call(Verb::Post, &path, payload)?;
    client.show(&body, |b| {
        let approval = field(b, "approval");
        let job = format!("job {} is {}", text(approval, "job_id"), text(b, "job_state"));
        match field(b, "remaining").as_u64() {
            Some(remaining) if remaining > 0 => {
                println!("approval {} counted; {remaining} more needed; {job}", text(approval, "id"));
            }
            _ => println!("approval {} is {}; {job}", text(approval, "id"), text(approval, "status")),
        }
    });
    Ok(())
}

// ---- dlq ---------------------------------------------------------------------------------

/// `airlock dlq ...`.
pub fn dlq(command: DlqCommand) -> ExitCode {
    finish(match command {
        DlqCommand::List { topic, reason, after, limit, connection } => {
            let path = format!(
                "/api/v1/dlq{}",
                query(&[
                    ("topic", topic),
                    ("reason", reason),
                    ("after", after),
                    ("limit", limit.map(|n| n.to_string())),
                ])
            );
            list_dead_letters(&connection, &path)
        }
        DlqCommand::Get { id, connection } => Client::new(&connection).and_then(|client| {
            let body = client.call(Verb::Get, &format!("/api/v1/dlq/{}", encode(&id)), Payload::Empty)?;
            client.show(&body, print_job);
            Ok(())
        }),
        DlqCommand::Retry { id, connection } => Client::new(&connection).and_then(|client| {
            let path = format!("/api/v1/dlq/{}/retry", encode(&id));
            let body = client.call(Verb::Post, &path, Payload::Empty)?;
            client.show(&body, |b| {
                println!(
                    "job {} is {} with fresh attempts; it passes Gate B again when a worker claims it",
                    text(b, "job_id"),
                    text(b, "state")
                );
            });
            Ok(())
        }),
        DlqCommand::Discard { id, connection } => Client::new(&connection).and_then(|client| {
            let path = format!("/api/v1/dlq/{}/discard", encode(&id));
            let body = client.call(Verb::Post, &path, Payload::Empty)?;
            client.show(&body, |b| {
                println!(
                    "job {} discarded from the DLQ {} (kept as {} for the record)",
                    text(b, "job_id"),
                    time(b, "discarded_at"),
                    text(b, "state")
                );
            });
            Ok(())
        }),
    })
}

fn list_dead_letters(connection: &Connection, path: &str) -> Result<(), Exit> {
    let headers = ["ID", "TOPIC", "ENV", "REASON", "ATTEMPTS (SCHED/EXEC)"];
    list_page(connection, path, "dead_letters", &headers, "no dead-lettered jobs", |j| {
        vec![
            text(j, "job_id"),
            text(j, "topic"),
            text(j, "env"),
            text(j, "reason"),
            format!("{}/{}", text(j, "scheduling_attempts"), text(j, "execution_attempts")),
        ]
    })
}

// ---- keys --------------------------------------------------------------------------------

/// `airlock keys ...`.
pub fn keys(command: KeysCommand) -> ExitCode {
    finish(match command {
        KeysCommand::Create { tenant, name, principal, roles, connection } => Client::new(&connection)
            .and_then(|client| {
                let request = json!({"tenant": tenant, "name": name, "principal": principal, "roles": roles});
                let body = client.call(Verb::Post, "/api/v1/keys", Payload::Json(&request))?;
                client.show(&body, |b| {
                    block(&[("id", text(b, "id")), ("key", text(b, "key"))]);
                    eprintln!("the key is shown only now: store it");
                });
                Ok(())
            }),
        KeysCommand::List { connection } => Client::new(&connection).and_then(|client| {
            let body = client.call(Verb::Get, "/api/v1/keys", Payload::Empty)?;
            client.show(&body, |b| {
                let rows: Vec<Vec<String>> = field(b, "keys")
                    .as_array()
                    .map(|keys| {
                        keys.iter()
                            .map(|k| {
                                vec![
                                    text(k, "id"),
                                    text(k, "tenant"),
                                    text(k, "name"),
                                    scalar(field(k, "roles")),
                                    time(k, "created_at"),
                                    time(k, "revoked_at"),
                                ]
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                table(&["ID", "TENANT", "NAME", "ROLES", "CREATED", "REVOKED"], &rows, "no keys");
            });
            Ok(())
        }),
        KeysCommand::Revoke { id, connection } => Client::new(&connection).and_then(|client| {
            let body = client.call(Verb::Delete, &format!("/api/v1/keys/{}", encode(&id)), Payload::Empty)?;
            client.show(&body, |k| {
                println!(
                    "key {} ({} in {}) revoked {}",
                    text(k, "id"),
                    text(k, "name"),
                    text(k, "tenant"),
                    time(k, "revoked_at")
                );
            });
            Ok(())
        }),
    })
}

// ---- policy on the server ----------------------------------------------------------------

fn print_snapshot_change(b: &Value, verb: &str) {
    println!("{verb}: version {} is active, {}", text(b, "version"), text(b, "hash"));
    if let Some(note) = field(b, "note").as_str() {
        println!("note: {note}");
    }
    for w in field(b, "warnings").as_array().into_iter().flatten() {
        println!("warning {}:{}: {}", field(w, "line"), field(w, "col"), text(w, "message"));
    }
}

/// `airlock policy publish FILE`.
pub fn publish(args: &PublishArgs) -> ExitCode {
    finish(Client::new(&args.connection).and_then(|client| {
        let source = read_file(&args.file, "policy")?;
        let payload = Payload::Text { text: &source, content_type: "application/yaml" };
        let body = client.call(Verb::Post, "/api/v1/policy/publish", payload)?;
        client.show(&body, |b| print_snapshot_change(b, "published"));
        Ok(())
    }))
}

/// `airlock policy rollback VERSION`.
pub fn rollback(args: &RollbackArgs) -> ExitCode {
    finish(Client::new(&args.connection).and_then(|client| {
        let request = json!({"version": args.snapshot_version});
        let body = client.call(Verb::Post, "/api/v1/policy/rollback", Payload::Json(&request))?;
        client.show(&body, |b| print_snapshot_change(b, "rolled back"));
        Ok(())
    }))
}

/// `airlock policy snapshots`.
pub fn snapshots(args: &SnapshotsArgs) -> ExitCode {
    finish(Client::new(&args.connection).and_then(|client| {
        let body = client.call(Verb::Get, "/api/v1/policy/snapshots", Payload::Empty)?;
        client.show(&body, |b| {
            let rows: Vec<Vec<String>> = field(b, "snapshots")
                .as_array()
                .map(|list| {
                    list.iter()
                        .map(|s| {
                            vec![
                                text(s, "version"),
                                if field(s, "active") == true { "*".to_owned() } else { String::new() },
                                text(s, "hash"),
                                time(s, "created_at"),
                                text(s, "created_by"),
                                text(s, "note"),
                            ]
                        })
                        .collect()
                })
                .unwrap_or_default();
            table(&["VERSION", "ACTIVE", "HASH", "CREATED", "BY", "NOTE"], &rows, "no snapshots");
        });
        Ok(())
    }))
}

/// `airlock policy diff FILE`.
pub fn diff(args: &DiffArgs) -> ExitCode {
    finish(Client::new(&args.connection).and_then(|client| {
        let source = read_file(&args.file, "policy")?;
        let mut request = json!({"policy": source});
        if let Some(object) = request.as_object_mut() {
            for (key, value) in
                [("since", args.since), ("until", args.until), ("limit", args.limit.map(i64::from))]
            {
                if let Some(value) = value {
                    object.insert(key.into(), json!(value));
                }
            }
        }
        let body = client.call(Verb::Post, "/api/v1/policy/diff", Payload::Json(&request))?;
        client.show(&body, |b| {
            let changed = field(b, "changed").as_array().map_or(&[][..], Vec::as_slice);
            block(&[
                ("active", text(b, "active")),
                ("candidate", text(b, "candidate")),
                (
                    "evaluated",
                    format!("{} job(s), {} would change", text(b, "jobs_evaluated"), changed.len()),
                ),
            ]);
            let rows: Vec<Vec<String>> = changed
                .iter()
                .map(|c| {
                    vec![
                        text(c, "job_id"),
                        text(c, "topic"),
                        text(c, "env"),
                        text(c, "state"),
                        decision_line(field(c, "active")),
                        decision_line(field(c, "candidate")),
                    ]
                })
                .collect();
            if !rows.is_empty() {
                println!();
                table(&["JOB", "TOPIC", "ENV", "STATE", "ACTIVE", "CANDIDATE"], &rows, "");
            }
        });
        Ok(())
    }))
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        crate::Cli::command().debug_assert();
    }

    #[test]
    fn times_are_utc_dates() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(utc(1_767_225_599_999), "2025-12-31T23:59:59Z");
        assert_eq!(utc(-1_000), "1969-12-31T23:59:59Z");
    }

    #[test]
    fn query_values_are_encoded() {
        assert_eq!(query(&[("a", None), ("topic", Some("infra.x y&z".into()))]), "?topic=infra.x%20y%26z");
        assert_eq!(query(&[("a", None)]), "");
        assert_eq!(encode("job_01/../x"), "job_01%2F..%2Fx");
    }
}
