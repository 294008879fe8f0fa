//! `airlock worker --exec CMD`: governs existing scripts without code (SPEC 9). Built on the
//! worker SDK, it runs CMD through `sh -c` once per job with the job's JSON on stdin, and turns
//! the exit status into the outcome: 0 succeeds with stdout as the result, 75 (`EX_TEMPFAIL`)
//! asks for a retry, anything else fails with the tail of stderr as the error. With
//! `--terraform DIR` it applies plan jobs instead (see `terraform_apply`).

use std::io::{Read, Write as _};
use std::os::unix::process::{CommandExt as _, ExitStatusExt as _};
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use airlock_worker::{
    EffectLedger, End, Handler, Job, OnceError, Outcome, RESULT_BYTES_MAX, Report, Worker, WorkerConfig,
};
use clap::Args;
use serde_json::Value;

/// The server `--url` names when neither the flag nor `AIRLOCK_URL` is set.
const DEFAULT_URL: &str = "http://127.0.0.1:8080";
/// The exit status that asks for a retry (`EX_TEMPFAIL` in sysexits.h).
const EXIT_RETRYABLE: i32 = 75;
/// How often a running command is checked for exit, cancellation and a forced stop.
const CHILD_POLL: Duration = Duration::from_millis(20);
/// How long output pipes may stay open after the command exited (held by a process it left
/// behind) before that process group is killed.
const OUTPUT_GRACE: Duration = Duration::from_secs(1);
/// How much of stderr's end is kept for the error.
const STDERR_TAIL_BYTES: usize = 2048;
/// How much of an error is shown on the per-job line.
const LINE_ERROR_CHARS: usize = 200;

/// `airlock worker`.
#[derive(Args)]
pub struct WorkerArgs {
    /// The pool to claim jobs for (the server routes topics to pools; `default` takes all
    /// topics unless the server configures pools).
    #[arg(long, value_name = "NAME")]
    pool: String,
    /// The command to run per job, through `sh -c`.
    ///
    /// The job's JSON (job_id, attempt, idempotency_key, topic, env, labels, payload, job_hash,
    /// gate_b, lease_expires_at, heartbeat_ms; never the lease token) comes on stdin, and
    /// AIRLOCK_JOB_ID, AIRLOCK_ATTEMPT, AIRLOCK_TOPIC and AIRLOCK_EFFECT_KEY (the idempotency
    /// key, or the job id: pass it on so the system you change can drop repeats) are set.
    /// Exit 0: success, with stdout as the result (JSON if it parses, else a string; empty is
    /// null). Exit 75: retryable failure. Anything else: failure, with the end of stderr as the
    /// error. A cancelled job or a lost lease kills the command and its process group.
    #[arg(long, value_name = "CMD", required_unless_present = "terraform", conflicts_with = "terraform")]
    exec: Option<String>,
    /// Apply plan jobs (`airlock plan submit --plan-file`) in this Terraform working directory,
    /// instead of running a command.
    ///
    /// The plan file (the job's `tf_plan_file` label, default `tfplan`) is applied only when its
    /// sha256 is the job's `plan_hash` and `terraform show -json` of it gives exactly the changes
    /// that were decided; otherwise the job fails with the reason and nothing is applied. The
    /// result holds the end of `apply`'s output. Without `--ledger`, the effect ledger is
    /// DIR/.airlock-apply-ledger.jsonl, so a retried job never applies twice.
    #[arg(long, value_name = "DIR")]
    terraform: Option<PathBuf>,
    /// The Terraform binary for `--terraform`: `terraform`, `tofu`, or a path.
    #[arg(long, value_name = "BIN", default_value = "terraform", requires = "terraform")]
    terraform_bin: String,
    /// The server's base URL [env: AIRLOCK_URL] [default: http://127.0.0.1:8080].
    #[arg(long, value_name = "URL")]
    url: Option<String>,
    /// An API key with the worker role [env: AIRLOCK_API_KEY]. Prefer the variable: a flag
    /// shows in the process list. The command does not inherit it.
    #[arg(long, value_name = "KEY")]
    api_key: Option<String>,
    /// How long one claim waits for a job (long poll), 0 to 30000. An idle worker takes up to
    /// this long to stop.
    #[arg(long, value_name = "MS", default_value_t = 5_000)]
    wait_ms: u64,
    /// An effect ledger file: a command that succeeded is not run again for the same job.
    ///
    /// Each success is recorded (fsynced) under the job's idempotency key, or its id; a retry
    /// of that job (say, the worker died before reporting) gets the recorded result without
    /// running the command. A crash between the command's exit and the record can still
    /// repeat it: AIRLOCK_EFFECT_KEY is there for the downstream system to drop the repeat.
    #[arg(long, value_name = "PATH")]
    ledger: Option<PathBuf>,
    /// A name for this worker, sent as its User-Agent [default: airlock-worker-PID].
    #[arg(long)]
    name: Option<String>,
}

/// Signal state shared between the signal thread and the handler.
#[derive(Default)]
struct Stop {
    /// First signal: claim no more; finish the current job.
    shutdown: AtomicBool,
    /// Second signal: kill the current command and hand the job back.
    force: AtomicBool,
    /// A job is being handled.
    busy: AtomicBool,
}

pub fn run(args: WorkerArgs) -> ExitCode {
    init_logging();
    match work(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).init();
}

fn work(args: WorkerArgs) -> Result<(), String> {
    let from_env = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    let url = args.url.or_else(|| from_env("AIRLOCK_URL")).unwrap_or_else(|| DEFAULT_URL.to_owned());
    let api_key = args
        .api_key
        .or_else(|| from_env("AIRLOCK_API_KEY"))
        .ok_or("no API key: set `AIRLOCK_API_KEY` (or pass `--api-key`) to a key with the worker role")?;
    let worker = Worker::new(WorkerConfig {
        url: url.clone(),
        api_key,
        pool: args.pool.clone(),
        wait_ms: args.wait_ms,
        name: args.name.unwrap_or_else(|| format!("airlock-worker-{}", std::process::id())),
    })
    .map_err(|e| e.to_string())?;
    let (run, ledger_path, doing) = match (args.exec, args.terraform) {
        (Some(command), None) => {
            let doing = format!("running `{}`", one_line(&command, LINE_ERROR_CHARS));
            (Run::Shell(command), args.ledger, doing)
        }
        (None, Some(dir)) => {
            if !dir.is_dir() {
                return Err(format!("--terraform `{}` is not a directory", dir.display()));
            }
            let ledger = args.ledger.unwrap_or_else(|| crate::terraform_apply::default_ledger(&dir));
            let doing = format!("applying plans in `{}` with `{}`", dir.display(), args.terraform_bin);
            (
                Run::Terraform(crate::terraform_apply::Apply { dir, bin: args.terraform_bin }),
                Some(ledger),
                doing,
            )
        }
        _ => return Err("pass exactly one of `--exec` and `--terraform`".into()),
    };
    let ledger = ledger_path.as_deref().map(EffectLedger::open).transpose().map_err(|e| e.to_string())?;
    let stop = Arc::new(Stop::default());
    watch_signals(Arc::clone(&stop), args.wait_ms)?;
    eprintln!(
        "airlock worker: claiming for pool `{}` from {url}; {doing} per job (Ctrl-C or SIGTERM stops \
         after the current job)",
        args.pool,
    );
    let exec = Exec { run, ledger, stop: Arc::clone(&stop), replayed: false };
    worker.run(exec, &stop.shutdown).map_err(|e| e.to_string())?;
    eprintln!("airlock worker: stopped");
    Ok(())
}

/// SIGTERM or SIGINT once: stop claiming and finish the current job. Twice: kill the command
/// and hand its job back for a retry (or exit at once when idle).
fn watch_signals(stop: Arc<Stop>, wait_ms: u64) -> Result<(), String> {
    use tokio::signal::unix::{SignalKind, signal};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|e| format!("cannot start the signal runtime: {e}"))?;
    // Registered before any job is claimed, so a signal never hits the default action.
    let (mut term, mut int) = {
        let _context = runtime.enter();
        let listen = |kind| signal(kind).map_err(|e| format!("cannot listen for signals: {e}"));
        (listen(SignalKind::terminate())?, listen(SignalKind::interrupt())?)
    };
    std::thread::Builder::new()
        .name("airlock-worker-signals".into())
        .spawn(move || {
            runtime.block_on(async move {
                loop {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                    }
                    let busy = stop.busy.load(Ordering::SeqCst);
                    if !stop.shutdown.swap(true, Ordering::SeqCst) {
                        if busy {
                            eprintln!(
                                "airlock worker: stopping after the current job (signal again to kill it \
                                 and hand the job back)"
                            );
                        } else {
                            eprintln!("airlock worker: stopping (within {wait_ms} ms, the claim in flight)");
                        }
                    } else if busy {
                        eprintln!(
                            "airlock worker: killing the current command; its job goes back to the queue"
                        );
                        stop.force.store(true, Ordering::SeqCst);
                    } else {
                        eprintln!("airlock worker: stopped");
                        std::process::exit(130);
                    }
                }
            });
        })
        .map_err(|e| format!("cannot start the signal thread: {e}"))?;
    Ok(())
}

/// What the worker does per job.
enum Run {
    /// `sh -c CMD`.
    Shell(String),
    /// Apply the job's plan.
    Terraform(crate::terraform_apply::Apply),
}

/// The handler: one `sh -c CMD` (or one apply) per job.
struct Exec {
    run: Run,
    ledger: Option<EffectLedger>,
    stop: Arc<Stop>,
    /// The current job's result came from the ledger.
    replayed: bool,
}

impl Handler for Exec {
    fn handle(&mut self, job: &Job) -> Outcome {
        self.stop.busy.store(true, Ordering::SeqCst);
        self.replayed = false;
        let Some(ledger) = &self.ledger else { return self.exec(job) };
        let key = job.effect_key();
        self.replayed = ledger.get(key).is_some();
        let ran = ledger.once(key, || match self.exec(job) {
            Outcome::Success(result) => Ok(result),
            other => Err(other),
        });
        match ran {
            Ok(result) => Outcome::Success(result),
            Err(OnceError::Effect(outcome)) => outcome,
            Err(OnceError::Unrecorded { result, source }) => {
                // The command did succeed: report it, so the job is not retried at all.
                tracing::warn!(job_id = %job.id, error = %source, "the result was not recorded in the ledger");
                Outcome::Success(result)
            }
        }
    }

    fn finished(&mut self, report: &Report) {
        self.stop.busy.store(false, Ordering::SeqCst);
        eprintln!(
            "{} {} attempt {}: {} in {:.2}s",
            report.job_id,
            report.topic,
            report.attempt,
            summary(report, self.replayed),
            report.duration.as_secs_f64()
        );
    }
}

impl Exec {
    fn exec(&self, job: &Job) -> Outcome {
        match &self.run {
            Run::Shell(script) => {
                let mut command = Command::new("sh");
                command
                    .arg("-c")
                    .arg(script)
                    .env("AIRLOCK_JOB_ID", &job.id)
                    .env("AIRLOCK_ATTEMPT", job.attempt.to_string())
                    .env("AIRLOCK_TOPIC", &job.topic)
                    .env("AIRLOCK_EFFECT_KEY", job.effect_key());
                let input = format!("{}\n", job.to_json());
                match self.run_child(command, job, Some(input), Capture::Head(RESULT_BYTES_MAX + 1)) {
                    Ok((status, stdout, stderr)) => outcome(status, &stdout, &stderr),
                    Err(outcome) => outcome,
                }
            }
            Run::Terraform(apply) => {
                apply.run(job, |command, capture| self.run_child(command, job, None, capture))
            }
        }
    }

    /// Runs `command` in its own process group until it exits, the job is cancelled or the
    /// worker is forced to stop; its stdout as `capture` says, and the tail of its stderr.
    fn run_child(
        &self,
        mut command: Command,
        job: &Job,
        input: Option<String>,
        capture: Capture,
    ) -> Result<(ExitStatus, Vec<u8>, Vec<u8>), Outcome> {
        let program = command.get_program().to_string_lossy().into_owned();
        let spawned = command
            .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group: a Ctrl-C at the terminal reaches only the worker, which then
            // lets the command finish; and a kill reaches everything the command started.
            .process_group(0)
            .env_remove("AIRLOCK_API_KEY")
            .spawn();
        let mut child = match spawned {
            Ok(child) => child,
            Err(e) => return Err(Outcome::Retryable(format!("cannot start `{program}`: {e}"))),
        };
        if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
            // A command that does not read its stdin must not block the worker.
            std::thread::spawn(move || {
                let _ = stdin.write_all(input.as_bytes());
            });
        }
        let (sender, output) = mpsc::channel();
        if let Some(stdout) = child.stdout.take() {
            let sender = sender.clone();
            std::thread::spawn(move || {
                sender.send(Output::Stdout(match capture {
                    Capture::Head(max) => read_head(stdout, max),
                    Capture::Tail(max) => read_tail(stdout, max),
                }))
            });
        }
        if let Some(stderr) = child.stderr.take() {
            std::thread::spawn(move || sender.send(Output::Stderr(read_tail(stderr, STDERR_TAIL_BYTES))));
        }
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) => {}
                Err(e) => {
                    kill_group(&mut child);
                    return Err(Outcome::Retryable(format!("cannot wait for the command: {e}")));
                }
            }
            if job.cancelled() {
                kill_group(&mut child);
                let why = if job.lease_lost() { "the lease was lost" } else { "the job was cancelled" };
                return Err(Outcome::Failed(format!("{why}; the command was killed")));
            }
            if self.stop.force.load(Ordering::SeqCst) {
                kill_group(&mut child);
                return Err(Outcome::Retryable("the worker was stopped; the command was killed".into()));
            }
            std::thread::sleep(CHILD_POLL);
        };
        let (stdout, stderr) = collect(&output, &mut child);
        Ok((status, stdout, stderr))
    }
}

/// Which part of stdout is kept.
#[derive(Clone, Copy)]
pub enum Capture {
    /// The first bytes (a result: past the limit it is refused, not cut).
    Head(usize),
    /// The last bytes (a log whose end says how it went).
    Tail(usize),
}

enum Output {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
}

/// Both outputs of a command that exited; a process it left behind holding a pipe open is
/// killed (with its group) after a grace period.
fn collect(output: &mpsc::Receiver<Output>, child: &mut Child) -> (Vec<u8>, Vec<u8>) {
    let (mut stdout, mut stderr) = (None, None);
    let mut deadline = Instant::now() + OUTPUT_GRACE;
    let mut killed = false;
    while stdout.is_none() || stderr.is_none() {
        match output.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(Output::Stdout(bytes)) => stdout = Some(bytes),
            Ok(Output::Stderr(bytes)) => stderr = Some(bytes),
            Err(mpsc::RecvTimeoutError::Timeout) if !killed => {
                tracing::warn!(
                    "the command left processes holding its output open; killing its process group"
                );
                kill_group(child);
                killed = true;
                deadline = Instant::now() + OUTPUT_GRACE;
            }
            Err(_) => break,
        }
    }
    (stdout.unwrap_or_default(), stderr.unwrap_or_default())
}

/// The outcome a finished command stands for.
fn outcome(status: ExitStatus, stdout: &[u8], stderr: &[u8]) -> Outcome {
    let error = |head: String| {
        let tail = String::from_utf8_lossy(stderr);
        let tail = tail.trim();
        if tail.is_empty() { head } else { format!("{head}: {tail}") }
    };
    match status.code() {
        Some(0) => result(stdout),
        Some(EXIT_RETRYABLE) => Outcome::Retryable(error(format!("exit {EXIT_RETRYABLE}"))),
        Some(code) => Outcome::Failed(error(format!("exit {code}"))),
        None => Outcome::Failed(error(format!("killed by signal {}", status.signal().unwrap_or_default()))),
    }
}

/// Stdout as a result: JSON when it parses, else the text; nothing is `null`.
fn result(stdout: &[u8]) -> Outcome {
    if stdout.len() > RESULT_BYTES_MAX {
        return Outcome::Failed(format!(
            "the command wrote more than {RESULT_BYTES_MAX} bytes on stdout, the most a result may hold"
        ));
    }
    let text = String::from_utf8_lossy(stdout);
    if text.trim().is_empty() {
        return Outcome::Success(Value::Null);
    }
    match serde_json::from_str(text.trim()) {
        Ok(json) => Outcome::Success(json),
        Err(_) => Outcome::Success(Value::String(text.trim_end_matches(['\n', '\r']).to_owned())),
    }
}

/// The first `max` bytes; the rest is read and dropped so the writer never blocks.
fn read_head(mut from: impl Read, max: usize) -> Vec<u8> {
    let mut kept = Vec::new();
    let mut buffer = [0u8; 8192];
    while let Ok(n @ 1..) = from.read(&mut buffer) {
        let room = max.saturating_sub(kept.len());
        kept.extend(buffer.iter().take(n.min(room)));
    }
    kept
}

/// The last `max` bytes.
fn read_tail(mut from: impl Read, max: usize) -> Vec<u8> {
    let mut kept = Vec::new();
    let mut buffer = [0u8; 8192];
    while let Ok(n @ 1..) = from.read(&mut buffer) {
        kept.extend(buffer.iter().take(n));
        let excess = kept.len().saturating_sub(max);
        kept.drain(..excess);
    }
    kept
}

/// Kills the command and everything in its process group, and reaps it. Through the shell's
/// `kill` builtin: std has no `killpg`, and this workspace forbids `unsafe`.
fn kill_group(child: &mut Child) {
    let killed = Command::new("sh")
        .arg("-c")
        .arg(format!("kill -KILL -{}", child.id()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !killed {
        let _ = child.kill();
    }
    let _ = child.wait();
}

/// `text` on one line, whitespace collapsed, cut at `max` characters.
fn one_line(text: &str, max: usize) -> String {
    let joined = text.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut cut: String = joined.chars().take(max).collect();
    if cut.len() < joined.len() {
        cut.push('…');
    }
    cut
}

/// What became of a job, for its line on stderr.
fn summary(report: &Report, replayed: bool) -> String {
    let short = |e: &str| one_line(e, LINE_ERROR_CHARS);
    match (&report.end, &report.outcome) {
        (End::Recorded { state }, Outcome::Success(_)) => {
            let mut s =
                if state == "succeeded" { "succeeded".to_owned() } else { format!("succeeded; job {state}") };
            if replayed {
                s.push_str(" (result from the effect ledger; the command did not run)");
            }
            s
        }
        (End::Recorded { state }, Outcome::Retryable(e)) => {
            format!("retryable failure ({}); job {state}", short(e))
        }
        (End::Recorded { state }, Outcome::Failed(e)) => {
            if state == "failed" {
                format!("failed ({})", short(e))
            } else {
                format!("failed ({}); job {state}", short(e))
            }
        }
        (End::Cancelled, _) => "cancelled; the command was stopped".into(),
        (End::LeaseLost, _) => "lease lost; the job is retried elsewhere".into(),
        (End::Unreported(e), _) => format!("not reported ({}); the lease will lapse", short(e)),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic, reason = "a test fails by panicking")]

    use serde_json::json;

    use super::*;

    fn exited(code: i32) -> ExitStatus {
        ExitStatus::from_raw(code << 8)
    }

    #[test]
    fn exit_statuses_become_outcomes() {
        assert_eq!(outcome(exited(0), b"{\"vm\": 1}\n", b""), Outcome::Success(json!({"vm": 1})));
        assert_eq!(outcome(exited(0), b"created vm-1\n", b""), Outcome::Success(json!("created vm-1")));
        assert_eq!(outcome(exited(0), b" \n", b"noise"), Outcome::Success(Value::Null));
        assert_eq!(outcome(exited(75), b"", b"busy\n"), Outcome::Retryable("exit 75: busy".into()));
        assert_eq!(outcome(exited(3), b"", b""), Outcome::Failed("exit 3".into()));
        assert_eq!(outcome(ExitStatus::from_raw(9), b"", b""), Outcome::Failed("killed by signal 9".into()));
        let big = vec![b'1'; RESULT_BYTES_MAX + 1];
        assert!(matches!(outcome(exited(0), &big, b""), Outcome::Failed(m) if m.contains("stdout")));
    }

    #[test]
    fn output_is_capped_at_the_head_and_the_tail() {
        let text: Vec<u8> = (0..20_000u32).map(|i| b'a' + (i % 26) as u8).collect();
        assert_eq!(read_head(&text[..], 10), text[..10].to_vec());
        assert_eq!(read_tail(&text[..], 10), text[text.len() - 10..].to_vec());
        assert_eq!(read_tail(&b"short"[..], 10), b"short".to_vec());
    }

    #[test]
    fn a_job_line_says_what_became_of_it() {
        let report = |outcome, end| Report {
            job_id: "job_1".into(),
            topic: "t".into(),
            attempt: 1,
            outcome,
            end,
            duration: Duration::ZERO,
        };
        let recorded = |s: &str| End::Recorded { state: s.into() };
        assert_eq!(
            summary(&report(Outcome::Success(Value::Null), recorded("succeeded")), false),
            "succeeded"
        );
        assert_eq!(
            summary(&report(Outcome::Retryable("exit 75: a\nb".into()), recorded("queued")), false),
            "retryable failure (exit 75: a b); job queued"
        );
        assert_eq!(
            summary(&report(Outcome::Failed("exit 3".into()), recorded("failed")), false),
            "failed (exit 3)"
        );
        assert!(
            summary(&report(Outcome::Success(Value::Null), recorded("succeeded")), true).contains("ledger")
        );
        assert!(
            summary(&report(Outcome::Failed("x".into()), End::Cancelled), false).starts_with("cancelled")
        );
    }
}
