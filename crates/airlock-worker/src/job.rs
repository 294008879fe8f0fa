//! What a handler sees (`Job`), what it answers (`Outcome`), and what became of the answer
//! (`Report`): the SDK's domain types, kept apart from the JSON the protocol speaks.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::Value;

/// A leased job, as the handler sees it. The lease token stays inside the SDK.
#[derive(Debug)]
pub struct Job {
    /// The job id, e.g. `job_01J...`.
    pub id: String,
    /// The execution attempt, from 1; a retry after a failure or a lapsed lease counts up.
    pub attempt: u32,
    /// The submitter's idempotency key, when the job was submitted with one.
    pub idempotency_key: Option<String>,
    /// The action, e.g. `infra.vm.create`.
    pub topic: String,
    /// The target environment.
    pub env: String,
    /// The job's labels.
    pub labels: BTreeMap<String, String>,
    /// The job's arguments.
    pub payload: Value,
    /// The job hash the gates decided on.
    pub job_hash: String,
    /// The claim as the server sent it, minus the lease token.
    pub(crate) claim: Value,
    pub(crate) signals: Arc<Signals>,
}

/// Flags the heartbeat thread raises for the handler.
#[derive(Debug, Default)]
pub(crate) struct Signals {
    cancelled: AtomicBool,
    lease_lost: AtomicBool,
}

impl Signals {
    pub(crate) fn cancel(&self) {
        self.cancelled.store(true, Ordering::SeqCst);
    }

    pub(crate) fn lose_lease(&self) {
        self.lease_lost.store(true, Ordering::SeqCst);
    }

    pub(crate) fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::SeqCst)
    }

    pub(crate) fn is_lease_lost(&self) -> bool {
        self.lease_lost.load(Ordering::SeqCst)
    }
}

impl Job {
    /// Whether the handler should stop: the job was cancelled, or the lease was lost (another
    /// worker may already be running it). Whatever the handler returns afterwards is dropped.
    pub fn cancelled(&self) -> bool {
        self.signals.is_cancelled() || self.signals.is_lease_lost()
    }

    /// Whether the server said the lease is gone (it lapsed, or the job was requeued).
    pub fn lease_lost(&self) -> bool {
        self.signals.is_lease_lost()
    }

    /// The key side effects are recorded under: the idempotency key, or the job id when the
    /// job has none. Both stay the same across the job's retries. Idempotency keys are scoped
    /// per tenant, and a worker's API key acts in one tenant, so keep one ledger per tenant.
    pub fn effect_key(&self) -> &str {
        self.idempotency_key.as_deref().unwrap_or(&self.id)
    }

    /// The claim as the server sent it (id, attempt, topic, env, labels, payload, job hash,
    /// Gate B's decision, lease expiry), without the lease token: what `airlock worker --exec`
    /// hands a command on stdin.
    pub fn to_json(&self) -> &Value {
        &self.claim
    }
}

/// What a handler answers for a job.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// Done; the result is stored with the job (at most 256 KiB of JSON).
    Success(Value),
    /// Failed in a way a later attempt may fix; the server requeues the job while execution
    /// attempts are left, and dead-letters it after.
    Retryable(String),
    /// Failed for good.
    Failed(String),
}

/// What became of one job.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    /// The job id.
    pub job_id: String,
    /// The job's topic.
    pub topic: String,
    /// The execution attempt.
    pub attempt: u32,
    /// What the handler answered (or what the SDK reported instead, e.g. a result over the size
    /// limit becomes `Failed`).
    pub outcome: Outcome,
    /// Whether and how the server recorded it.
    pub end: End,
    /// From the claim to the end of the report.
    pub duration: Duration,
}

/// Whether the server recorded an outcome.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum End {
    /// Recorded; the job's state afterwards: `succeeded`, `failed`, `queued` (to be retried)
    /// or `dead_lettered` (attempts exhausted).
    Recorded {
        /// The job's state after the report.
        state: String,
    },
    /// The job was cancelled while it ran; nothing was reported.
    Cancelled,
    /// The lease was lost; the server refused or would refuse the report, and the job is (or
    /// was) retried by another worker. Also what a report looks like whose answer was lost in
    /// transit after the server recorded it: the retried report finds the lease spent.
    LeaseLost,
    /// The server could not be reached in time; the lease will lapse and the job be retried.
    Unreported(String),
}

/// Runs jobs. Any `FnMut(&Job) -> Outcome` is a handler.
pub trait Handler {
    /// Does the work of one job. Long work should look at [`Job::cancelled`] now and then and
    /// stop when it turns true.
    fn handle(&mut self, job: &Job) -> Outcome;

    /// Called after each job with what became of it (for logs and metrics).
    fn finished(&mut self, _report: &Report) {}
}

impl<F: FnMut(&Job) -> Outcome> Handler for F {
    fn handle(&mut self, job: &Job) -> Outcome {
        self(job)
    }
}
