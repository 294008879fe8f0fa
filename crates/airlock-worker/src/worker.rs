//! The worker loop: claim with a long poll, heartbeat from a second thread while the handler
//! runs, report under the lease token, and stop claiming on shutdown after the current job.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher as _;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use crate::RESULT_BYTES_MAX;
use crate::error::Error;
use crate::job::{End, Handler, Job, Outcome, Report, Signals};
use crate::protocol::{Beat, Claim, Client};

/// The long-poll wait a claim asks for unless told otherwise.
pub const WAIT_MS_DEFAULT: u64 = 10_000;
/// The longest long-poll wait the server accepts.
pub const WAIT_MS_MAX: u64 = 30_000;
/// Shortest heartbeat interval, whatever the server says.
const HEARTBEAT_MIN: Duration = Duration::from_millis(100);
/// Shortest heartbeat request timeout: a slow heartbeat is retried, not abandoned too early.
const HEARTBEAT_TIMEOUT_MIN: Duration = Duration::from_secs(1);
/// First and longest pause after a claim failed for a transient reason.
const BACKOFF_FIRST: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How often a pause looks at the shutdown flag.
const SHUTDOWN_POLL: Duration = Duration::from_millis(100);
/// Reports (complete or fail) sent before giving up on a transient error, and the first pause
/// between them (doubling). Heartbeats keep the lease while these run.
const REPORT_TRIES: u32 = 5;
const REPORT_PAUSE_FIRST: Duration = Duration::from_millis(250);

/// Where to claim and as whom.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// The server's base URL, `http://HOST:PORT`.
    pub url: String,
    /// An API key with the `worker` role; it decides the tenant the worker serves.
    pub api_key: String,
    /// The pool to claim for; the server routes topics to pools by pattern.
    pub pool: String,
    /// How long one claim waits for a job (long poll), 0 to 30 000 ms. A shutdown while idle
    /// takes up to this long, since the claim in flight is let finish: a job it brings is run.
    pub wait_ms: u64,
    /// A name for this worker, sent in the `User-Agent` (the server knows the worker by its key).
    pub name: String,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            url: "http://127.0.0.1:8080".into(),
            api_key: String::new(),
            pool: "default".into(),
            wait_ms: WAIT_MS_DEFAULT,
            name: "airlock-worker".into(),
        }
    }
}

/// A worker: one job at a time.
pub struct Worker {
    client: Client,
    pool: String,
    wait: Duration,
}

impl Worker {
    /// Checks the configuration; nothing is sent yet.
    pub fn new(config: WorkerConfig) -> Result<Self, Error> {
        if config.wait_ms > WAIT_MS_MAX {
            return Err(Error::Config(format!("`wait_ms` is {}; the most is {WAIT_MS_MAX}", config.wait_ms)));
        }
        if config.pool.trim().is_empty() {
            return Err(Error::Config("the pool name is empty".into()));
        }
        Ok(Self {
            client: Client::new(&config.url, &config.api_key, &config.name)?,
            pool: config.pool,
            wait: Duration::from_millis(config.wait_ms),
        })
    }

    /// Claims and runs jobs until `shutdown` is set, then returns once the current job is
    /// reported. Transient errors (server unreachable or unavailable) are retried with backoff;
    /// an error that retrying cannot fix (a revoked key, an unknown pool) ends the loop.
    pub fn run(&self, mut handler: impl Handler, shutdown: &AtomicBool) -> Result<(), Error> {
        let mut pause = BACKOFF_FIRST;
        let random = RandomState::new();
        while !shutdown.load(Ordering::SeqCst) {
            match self.run_once(&mut handler) {
                Ok(_) => pause = BACKOFF_FIRST,
                Err(e) if e.is_transient() => {
                    // Jitter in [0.5, 1.5) so that a fleet does not come back in step.
                    let jitter = 0.5 + (random.hash_one(Instant::now()) % 1000) as f64 / 1000.0;
                    let wait = pause.mul_f64(jitter);
                    tracing::warn!(error = %e, retry_in_ms = wait.as_millis(), "claim failed");
                    sleep_unless(shutdown, wait);
                    pause = (pause * 2).min(BACKOFF_MAX);
                }
                Err(Error::Protocol(message)) => {
                    tracing::warn!(%message, "unreadable claim");
                    sleep_unless(shutdown, pause);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Claims once (waiting up to `wait_ms`) and runs the job if one came: its report, or
    /// `None` when no job came.
    pub fn run_once(&self, handler: &mut impl Handler) -> Result<Option<Report>, Error> {
        let Some(claim) = self.client.claim(&self.pool, self.wait)? else { return Ok(None) };
        let report = self.work(claim, handler);
        handler.finished(&report);
        Ok(Some(report))
    }

    fn work(&self, claim: Claim, handler: &mut impl Handler) -> Report {
        let started = Instant::now();
        let Claim { job, token, heartbeat } = claim;
        tracing::debug!(job_id = %job.id, topic = %job.topic, attempt = job.attempt, "claimed");
        let (outcome, end) = std::thread::scope(|scope| {
            // Dropping `stop` (also on unwind) ends the heartbeat thread at once.
            let (stop, stopped) = mpsc::channel::<()>();
            let (client, signals, id, token) = (&self.client, &*job.signals, job.id.as_str(), token.as_str());
            scope.spawn(move || heartbeats(client, id, token, heartbeat, signals, &stopped));
            let outcome = catch_unwind(AssertUnwindSafe(|| handler.handle(&job))).unwrap_or_else(|panic| {
                Outcome::Failed(format!("the handler panicked: {}", panic_text(&*panic)))
            });
            let reported = self.report(&job, token, outcome);
            drop(stop);
            reported
        });
        Report {
            job_id: job.id.clone(),
            topic: job.topic.clone(),
            attempt: job.attempt,
            outcome,
            end,
            duration: started.elapsed(),
        }
    }

    /// Sends the outcome under the lease, retrying transient errors; a result over the size
    /// limit is reported as a failure instead.
    fn report(&self, job: &Job, token: &str, outcome: Outcome) -> (Outcome, End) {
        let outcome = within_limit(outcome);
        let mut pause = REPORT_PAUSE_FIRST;
        let mut tries = 0;
        let end = loop {
            if let Some(end) = stopped(&job.signals) {
                break end;
            }
            let sent = match &outcome {
                Outcome::Success(result) => self.client.complete(&job.id, token, result),
                Outcome::Retryable(error) => self.client.fail(&job.id, token, error, true),
                Outcome::Failed(error) => self.client.fail(&job.id, token, error, false),
            };
            tries += 1;
            match sent {
                Ok(state) => break End::Recorded { state },
                Err(Error::LeaseLost(_)) => {
                    // A cancel that came after the last heartbeat is refused the same way; a
                    // cancelled job still answers heartbeats under its token, so ask.
                    let beat = self.client.heartbeat(&job.id, token, HEARTBEAT_TIMEOUT_MIN);
                    break if job.signals.is_cancelled() || matches!(beat, Ok(Beat::Cancel)) {
                        End::Cancelled
                    } else {
                        End::LeaseLost
                    };
                }
                Err(e) if e.is_transient() && tries < REPORT_TRIES => {
                    tracing::warn!(job_id = %job.id, error = %e, "report failed; retrying");
                    std::thread::sleep(pause);
                    pause *= 2;
                }
                Err(e) => {
                    tracing::warn!(job_id = %job.id, error = %e, "report failed; the lease will lapse");
                    break End::Unreported(e.to_string());
                }
            }
        };
        (outcome, end)
    }
}

/// The outcome to report: a result over the server's limit (which would be refused with 413
/// and leave the job leased until the lease lapsed) becomes a failure that says why.
fn within_limit(outcome: Outcome) -> Outcome {
    match outcome {
        Outcome::Success(result) => match serde_json::to_string(&result).map(|s| s.len()) {
            Ok(size) if size <= RESULT_BYTES_MAX => Outcome::Success(result),
            Ok(size) => Outcome::Failed(format!(
                "the result is {size} bytes of JSON; the limit is {RESULT_BYTES_MAX}"
            )),
            Err(e) => Outcome::Failed(format!("the result cannot be written as JSON: {e}")),
        },
        other => other,
    }
}

/// Why the job was stopped, when it was: nothing is reported then.
fn stopped(signals: &Signals) -> Option<End> {
    if signals.is_cancelled() {
        Some(End::Cancelled)
    } else if signals.is_lease_lost() {
        Some(End::LeaseLost)
    } else {
        None
    }
}

/// Extends the lease every `interval` until `stop` is dropped; raises the job's flags when the
/// server says cancel or that the lease is gone, and then stops (there is nothing to extend).
fn heartbeats(
    client: &Client,
    id: &str,
    token: &str,
    interval: Duration,
    signals: &Signals,
    stop: &mpsc::Receiver<()>,
) {
    let interval = interval.max(HEARTBEAT_MIN);
    let timeout = interval.max(HEARTBEAT_TIMEOUT_MIN);
    let mut wait = interval;
    loop {
        match stop.recv_timeout(wait) {
            Err(RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
        }
        match client.heartbeat(id, token, timeout) {
            Ok(Beat::Extended) => wait = interval,
            Ok(Beat::Cancel) => {
                tracing::info!(job_id = %id, "job cancelled");
                signals.cancel();
                return;
            }
            Err(Error::LeaseLost(message)) => {
                tracing::warn!(job_id = %id, %message, "lease lost");
                signals.lose_lease();
                return;
            }
            Err(e) => {
                // Try again sooner: the lease lasts about three intervals.
                tracing::warn!(job_id = %id, error = %e, "heartbeat failed");
                wait = interval / 3;
            }
        }
    }
}

fn sleep_unless(shutdown: &AtomicBool, total: Duration) {
    let until = Instant::now() + total;
    loop {
        let now = Instant::now();
        if shutdown.load(Ordering::SeqCst) || now >= until {
            return;
        }
        std::thread::sleep(SHUTDOWN_POLL.min(until - now));
    }
}

fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "a test fails by panicking")]

    use serde_json::Value;

    use super::*;

    #[test]
    fn configs_are_checked_before_anything_is_sent() {
        let ok = WorkerConfig { api_key: "k".into(), ..WorkerConfig::default() };
        assert!(Worker::new(ok.clone()).is_ok());
        let long = WorkerConfig { wait_ms: WAIT_MS_MAX + 1, ..ok.clone() };
        assert!(matches!(Worker::new(long), Err(Error::Config(m)) if m.contains("30000")));
        let no_pool = WorkerConfig { pool: " ".into(), ..ok };
        assert!(matches!(Worker::new(no_pool), Err(Error::Config(_))));
    }

    #[test]
    fn a_stopped_job_is_not_reported() {
        let signals = Signals::default();
        assert_eq!(stopped(&signals), None);
        signals.lose_lease();
        assert_eq!(stopped(&signals), Some(End::LeaseLost));
        signals.cancel();
        assert_eq!(stopped(&signals), Some(End::Cancelled), "a cancel explains a lost lease");
    }

    #[test]
    fn an_unreachable_server_is_given_up_on_after_a_few_tries_without_panicking() {
        // Port 9 (discard) on localhost refuses connections: every report is transient.
        let worker = Worker::new(WorkerConfig {
            url: "http://127.0.0.1:9".into(),
            api_key: "k".into(),
            ..WorkerConfig::default()
        })
        .unwrap();
        let claim = crate::protocol::tests_support::claim();
        let (outcome, end) = worker.report(&claim.job, &claim.token, Outcome::Success(Value::Null));
        assert_eq!(outcome, Outcome::Success(Value::Null));
        assert!(matches!(end, End::Unreported(m) if m.contains("cannot reach")));
    }

    #[test]
    fn a_result_over_the_limit_becomes_a_failure() {
        let small = Value::String("x".repeat(RESULT_BYTES_MAX - 2));
        assert_eq!(within_limit(Outcome::Success(small.clone())), Outcome::Success(small));
        let big = Value::String("x".repeat(RESULT_BYTES_MAX));
        let outcome = within_limit(Outcome::Success(big));
        assert!(matches!(outcome, Outcome::Failed(m) if m.contains("the limit is 262144")));
        assert_eq!(within_limit(Outcome::Retryable("r".into())), Outcome::Retryable("r".into()));
    }
}
