//! The domain's records: a job as it is kept (its gate decisions, its dispatch progress, its
//! lease) and an approval request with its outcome. The stores persist them and the gates and
//! the simulator decide over them; here they are plain values.

use std::collections::BTreeMap;

use airlock_policy::{Decision, Limit};
use serde_json::Value;

use crate::Millis;
use crate::approval::Request;
use crate::ids::{ApprovalId, JobId, TenantId};
use crate::state::JobState;

/// A decision as recorded on a job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GateDecision {
    /// The decision.
    pub decision: Decision,
    /// The deciding rules.
    pub rule_ids: Vec<String>,
    /// Why.
    pub reason: String,
    /// The snapshot it was made under.
    pub snapshot_hash: String,
    /// That snapshot's version.
    pub snapshot_version: u64,
    /// When.
    pub at: Millis,
    /// Whether the safety check was unavailable and the gate failed open.
    pub bypassed: bool,
}

/// A job as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct JobRecord {
    /// Its id.
    pub id: JobId,
    /// Its tenant.
    pub tenant: TenantId,
    /// Who submitted it.
    pub principal: String,
    /// Action name.
    pub topic: String,
    /// Target environment.
    pub env: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Arguments.
    pub payload: Value,
    /// Plan hash, when given.
    pub plan_hash: Option<String>,
    /// Idempotency key, when given.
    pub idempotency_key: Option<String>,
    /// The job hash at submit time.
    pub job_hash: String,
    /// Where it is in its lifecycle.
    pub state: JobState,
    /// Gate A's decision.
    pub gate_a: GateDecision,
    /// The current approval request, when one was needed.
    pub approval_id: Option<ApprovalId>,
    /// When it was submitted.
    pub created_at: Millis,
    /// When it last changed.
    pub updated_at: Millis,
    /// Gate B's progress: attempts, lease, decision and outcome.
    pub dispatch: DispatchState,
}

/// Everything Gate B and the workers add to a job.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DispatchState {
    /// Scheduling attempts that failed (safety unavailable in closed mode).
    pub scheduling_attempts: u32,
    /// Execution attempts started (leases handed out).
    pub execution_attempts: u32,
    /// Not dispatchable before this time (backoff, throttle delay).
    pub not_before: Millis,
    /// The live lease, when leased.
    pub lease: Option<Lease>,
    /// Gate B's last decision.
    pub gate_b: Option<GateDecision>,
    /// Why it was dead-lettered.
    pub dead_letter_reason: Option<String>,
    /// When an operator discarded it from the DLQ.
    pub discarded_at: Option<Millis>,
    /// The worker's result, on success.
    pub result: Option<Value>,
    /// The worker's last error.
    pub error: Option<String>,
}

/// A lease: who holds the job, until when, fenced by a token only the holder knows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    /// The fencing token.
    pub token: String,
    /// When it lapses without a heartbeat.
    pub expires_at: Millis,
    /// The worker (principal) holding it.
    pub worker: String,
}

impl JobRecord {
    /// The job as policy sees it.
    pub fn to_policy_job(&self) -> airlock_policy::Job {
        airlock_policy::Job {
            tenant: self.tenant.as_str().to_owned(),
            principal: self.principal.clone(),
            topic: self.topic.clone(),
            env: self.env.clone(),
            labels: self.labels.clone(),
            payload: self.payload.clone(),
            plan_hash: self.plan_hash.clone(),
            idempotency_key: self.idempotency_key.clone(),
        }
    }
}

/// An approval request as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApprovalRecord {
    /// Its id.
    pub id: ApprovalId,
    /// Its tenant.
    pub tenant: TenantId,
    /// The job it is for.
    pub job_id: JobId,
    /// Binding, quorum, approvers and status.
    pub request: Request,
    /// When it left `pending`.
    pub decided_at: Option<Millis>,
    /// Who decided it (the last approver, the rejecter, or `system`).
    pub decided_by: Option<String>,
}

impl ApprovalRecord {
    /// A request of a job, pending: how Gate A, Gate B and a stale request's replacement open
    /// one (`request` from [`Request::pending`]).
    pub fn open(id: ApprovalId, tenant: TenantId, job_id: JobId, request: Request) -> Self {
        Self { id, tenant, job_id, request, decided_at: None, decided_by: None }
    }
}

/// One throttle budget a submission must be admitted by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Budget {
    /// The bucket key (gate, rule and limit key values).
    pub key: String,
    /// Its limit.
    pub limit: Limit,
}
