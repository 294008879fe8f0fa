//! The write that follows a decision, as one value. A job comes into being by [`admit`] (Gate
//! A's [`Submission`]); every later change of it is a [`Move`], which says what a job's commit must
//! find (its [`Precondition`]), which budgets it takes, which fields it changes, which state it
//! moves to and why, which approval requests it writes and which audit records it adds. The
//! plan functions here are the only place such a write is decided; a store locks and loads the
//! job, checks the precondition, takes the budgets with [`crate::throttle::take`], applies the
//! move to the loaded record ([`JobRecord::apply`]) and writes the changed fields, each through
//! its one column mapping ([`Field`]). The simulator applies the same moves to its records.

use serde_json::{Value, json};

use airlock_policy::Decision;

use crate::Millis;
use crate::approval::{Request, Status};
use crate::audit::{Draft, Kind};
use crate::decided::{Decided, Gate, merge};
use crate::dispatch::{self, Action, ApprovalState, Caps, FailMode, Rescheduled, Safety};
use crate::ids::{ApprovalId, JobId, TenantId};
use crate::record::{ApprovalRecord, Budget, DispatchState, GateDecision, JobRecord, Lease};
use crate::state::{Event, InvalidTransition, JobState};

/// What Gate B does with a queued job (the write of a [`crate::dispatch::Action`]).
#[derive(Clone, Debug)]
pub enum DispatchAction {
    /// Lease it, after charging these budgets (all or nothing).
    Lease {
        /// The lease.
        lease: Lease,
        /// Gate B's throttle budgets; a refusal requeues the job until the budget refills.
        budgets: Vec<Budget>,
    },
    /// Gate B denied it.
    Deny,
    /// Back to awaiting approval with a fresh request; the previous request, if any, is
    /// recorded as stale.
    NeedsApproval {
        /// The new request.
        replacement: ApprovalRecord,
    },
    /// Back to the queue until `not_before`; `counted` uses a scheduling attempt.
    Requeue {
        /// When it may be tried again.
        not_before: Millis,
        /// Whether it counts against the scheduling cap.
        counted: bool,
    },
    /// Out of attempts.
    DeadLetter {
        /// Why.
        reason: String,
    },
}

/// One Gate B decision to apply to a job that must still be queued.
#[derive(Clone, Debug)]
pub struct Dispatch {
    /// The tenant.
    pub tenant: TenantId,
    /// The job.
    pub job_id: JobId,
    /// What to do.
    pub action: DispatchAction,
    /// The decision, recorded on the job; `None` for a move no decision was made for (a job
    /// whose topic no pool takes), which keeps the job's last one.
    pub gate_b: Option<GateDecision>,
    /// When.
    pub at: Millis,
    /// The audit record.
    pub audit: Draft,
    /// The snapshot version the decision was made under, checked at the commit; `None` when
    /// the safety check was unavailable.
    pub decided_under: Option<u64>,
}

/// How an execution attempt ended, reported under the lease's token.
#[derive(Clone, Debug, PartialEq)]
pub enum Finish {
    /// Done.
    Succeeded {
        /// What the worker returned.
        result: Value,
    },
    /// Failed; run it again.
    Retry {
        /// Why it failed.
        error: String,
    },
    /// Failed for good.
    Failed {
        /// Why.
        error: String,
    },
    /// Failed with no attempts left.
    DeadLetter {
        /// Why.
        reason: String,
    },
}

/// Everything an accepted submission writes, committed atomically.
#[derive(Clone, Debug)]
pub struct Submission {
    /// The job.
    pub job: JobRecord,
    /// The approval request, for `require_human`.
    pub approval: Option<ApprovalRecord>,
    /// The idempotency key and the response to remember with it.
    pub idempotency: Option<(String, u16, String)>,
    /// Budgets that must all admit the job (throttle rules); none are charged unless all admit.
    pub budgets: Vec<Budget>,
    /// The audit record of the decision.
    pub audit: Draft,
    /// The snapshot version the decision was made under: the commit checks, in its own
    /// transaction, that it is still the active one (the store refuses it as stale otherwise). `None`
    /// for a decision made under no snapshot (a fail-open bypass).
    pub decided_under: Option<u64>,
}

/// A job Gate A lets through (allow, throttle, require_human, or accepted by fail-open mode),
/// with what it decided.
#[derive(Clone, Debug)]
pub struct Admit<'a> {
    /// The new job's id.
    pub id: JobId,
    /// The caller's tenant.
    pub tenant: TenantId,
    /// The job as policy saw it.
    pub job: &'a airlock_policy::Job,
    /// Its hash.
    pub job_hash: String,
    /// Gate A's decision (`bypassed` for fail-open mode, which was decided under no snapshot).
    pub gate: GateDecision,
    /// The approval request a `require_human` decision opens, and its id.
    pub approval: Option<(ApprovalId, Request)>,
    /// Budgets a throttle decision must take.
    pub budgets: Vec<Budget>,
    /// The decision's details for the audit record.
    pub audit_data: Value,
    /// The submitter.
    pub actor: String,
    /// When.
    pub at: Millis,
}

/// Gate A's write for a job it lets through: the job, `awaiting_approval` with its request or
/// `queued`; the budgets to take; the `job.submitted` record; and the snapshot the commit must
/// find active. The idempotency key's answer is the caller's to add: it is the HTTP body.
pub fn admit(a: Admit<'_>) -> Submission {
    let state = if a.approval.is_some() { JobState::AwaitingApproval } else { JobState::Queued };
    let j = a.job;
    let approval =
        a.approval.map(|(id, request)| ApprovalRecord::open(id, a.tenant.clone(), a.id.clone(), request));
    let mut data = a.audit_data;
    if let Value::Object(fields) = &mut data {
        fields.insert("topic".into(), json!(j.topic));
        fields.insert("env".into(), json!(j.env));
        fields.insert("job_hash".into(), json!(a.job_hash));
        fields.insert("state".into(), json!(state.as_str()));
    }
    let decided_under = (!a.gate.bypassed).then_some(a.gate.snapshot_version);
    Submission {
        audit: Draft {
            at: a.at,
            kind: Kind::JobSubmitted,
            subject: a.id.as_str().to_owned(),
            actor: a.actor,
            data,
        },
        job: JobRecord {
            id: a.id,
            tenant: a.tenant,
            principal: j.principal.clone(),
            topic: j.topic.clone(),
            env: j.env.clone(),
            labels: j.labels.clone(),
            payload: j.payload.clone(),
            plan_hash: j.plan_hash.clone(),
            idempotency_key: j.idempotency_key.clone(),
            job_hash: a.job_hash,
            state,
            gate_a: a.gate,
            approval_id: approval.as_ref().map(|r| r.id.clone()),
            created_at: a.at,
            updated_at: a.at,
            dispatch: DispatchState::default(),
        },
        approval,
        idempotency: None,
        budgets: a.budgets,
        decided_under,
    }
}

/// A change to an approval request, applied only if the request is still as the caller read
/// it (optimistic concurrency: same status, same number of approvers).
#[derive(Clone, Debug)]
pub struct ApprovalChange {
    /// The tenant.
    pub tenant: TenantId,
    /// The request.
    pub id: ApprovalId,
    /// The status the caller read.
    pub expected_status: Status,
    /// The number of approvers the caller read.
    pub expected_approvers: usize,
    /// The request after the change.
    pub request: Request,
    /// What happens to the job, if anything (approved → queued, rejected, expired).
    pub job_event: Option<Event>,
    /// A fresh request to attach to the job (when this one went stale).
    pub replacement: Option<ApprovalRecord>,
    /// Audit records, in order.
    pub audit: Vec<Draft>,
    /// When.
    pub at: Millis,
    /// Who.
    pub actor: String,
    /// The snapshot version the approval's binding was checked under, checked at the commit;
    /// `None` for changes that do not depend on it.
    pub decided_under: Option<u64>,
}

/// A lease the commit must find live on the job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseCheck {
    /// The token the caller holds.
    pub token: String,
    /// When given, the lease must not have lapsed by then (a worker's call; the lapsed-lease
    /// sweep gives none).
    pub live_at: Option<Millis>,
}

/// What the job must be like at the commit for the move to apply.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Precondition {
    /// The job's state, when the move needs one (an approval change leaves it to the transition
    /// table).
    pub state: Option<JobState>,
    /// The live lease, checked before the state.
    pub lease: Option<LeaseCheck>,
    /// The snapshot version the decision was made under, which must still be the active one;
    /// only the store can check it, in the move's own transaction.
    pub decided_under: Option<u64>,
    /// The job must not have been discarded from the dead-letter queue.
    pub undiscarded: bool,
}

/// Why a precondition does not hold.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The job is in another state.
    #[error("the job is `{found}`, not `{expected}`")]
    State {
        /// The state the commit found.
        found: JobState,
        /// The state the move needs.
        expected: JobState,
    },
    /// The caller's token is not the job's live lease.
    #[error("the lease token is not the job's live lease")]
    NotLeaseHolder,
    /// The caller holds the lease, but it lapsed.
    #[error("the lease lapsed; the job will be retried")]
    LeaseLapsed,
    /// The approval request is no longer as the caller read it.
    #[error("the approval request changed; read it again")]
    ApprovalChanged,
    /// The job was discarded from the dead-letter queue.
    #[error("the job was discarded from the DLQ")]
    Discarded,
}

impl Precondition {
    /// Whether `job`, as locked by the commit, allows the move (all but `decided_under`).
    pub fn check(&self, job: &JobRecord) -> Result<(), Refusal> {
        if let Some(check) = &self.lease {
            match &job.dispatch.lease {
                Some(lease) if lease.token == check.token => {
                    if check.live_at.is_some_and(|now| now > lease.expires_at) {
                        return Err(Refusal::LeaseLapsed);
                    }
                }
                _ => return Err(Refusal::NotLeaseHolder),
            }
        }
        match self.state {
            Some(expected) if expected != job.state => Err(Refusal::State { found: job.state, expected }),
            _ if self.undiscarded && job.dispatch.discarded_at.is_some() => Err(Refusal::Discarded),
            _ => Ok(()),
        }
    }
}

/// A field of a job a move can change, each stored in fixed columns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Field {
    /// Gate B's last decision.
    GateB,
    /// The lease (token, expiry, holder).
    Lease,
    /// Execution attempts started.
    ExecutionAttempts,
    /// Scheduling attempts used.
    SchedulingAttempts,
    /// Not dispatchable before.
    NotBefore,
    /// Why it was dead-lettered.
    DeadLetterReason,
    /// The worker's last error.
    Error,
    /// The worker's result.
    Result,
    /// The current approval request.
    ApprovalId,
    /// When it was discarded from the dead-letter queue.
    DiscardedAt,
}

/// One change to a job's fields.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    /// Records Gate B's decision.
    GateB(GateDecision),
    /// Hands out a lease; an execution attempt starts ([`Change::CountExecutionAttempt`]).
    Lease(Lease),
    /// Extends the lease until then.
    ExtendLease(Millis),
    /// Ends the lease.
    ClearLease,
    /// One more execution attempt.
    CountExecutionAttempt,
    /// One more scheduling attempt.
    CountSchedulingAttempt,
    /// Execution attempts back to none (an operator retry).
    ResetExecutionAttempts,
    /// Scheduling attempts back to none (an operator retry).
    ResetSchedulingAttempts,
    /// Not dispatchable before then.
    NotBefore(Millis),
    /// Why it was dead-lettered.
    DeadLetterReason(String),
    /// Out of the dead-letter queue.
    ClearDeadLetterReason,
    /// The worker's error.
    Error(String),
    /// The worker's result.
    Result(Value),
    /// The job's current approval request.
    ApprovalId(ApprovalId),
    /// Out of the dead-letter queue for good, kept for the record.
    Discard(Millis),
}

impl Change {
    /// The field it changes.
    pub fn field(&self) -> Field {
        match self {
            Self::GateB(_) => Field::GateB,
            Self::Lease(_) | Self::ExtendLease(_) | Self::ClearLease => Field::Lease,
            Self::CountExecutionAttempt | Self::ResetExecutionAttempts => Field::ExecutionAttempts,
            Self::CountSchedulingAttempt | Self::ResetSchedulingAttempts => Field::SchedulingAttempts,
            Self::NotBefore(_) => Field::NotBefore,
            Self::DeadLetterReason(_) | Self::ClearDeadLetterReason => Field::DeadLetterReason,
            Self::Error(_) => Field::Error,
            Self::Result(_) => Field::Result,
            Self::ApprovalId(_) => Field::ApprovalId,
            Self::Discard(_) => Field::DiscardedAt,
        }
    }
}

/// The approval requests a move writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApprovalWrite {
    /// None.
    None,
    /// Records the job's current request (if pending or approved) as stale, decided by
    /// `system`, and opens this one ([`Change::ApprovalId`] attaches it).
    Replace(Box<ApprovalRecord>),
    /// Opens this request ([`Change::ApprovalId`] attaches it); the request it follows was
    /// decided by the same change.
    Open(Box<ApprovalRecord>),
}

/// One transition of one job, decided: everything its commit checks and writes.
#[derive(Clone, Debug, PartialEq)]
pub struct Move {
    /// The tenant.
    pub tenant: TenantId,
    /// The job.
    pub job_id: JobId,
    /// What the commit must find.
    pub precondition: Precondition,
    /// Budgets that must all admit the move; none is charged unless all admit. A refusal
    /// turns the move into [`Move::throttled`].
    pub budgets: Vec<Budget>,
    /// The lifecycle event and its reason; `None` for a move that keeps the state (a
    /// throttled dispatch).
    pub transition: Option<(Event, String)>,
    /// The field changes, applied in order.
    pub changes: Vec<Change>,
    /// Approval requests written with it.
    pub approval: ApprovalWrite,
    /// The decision's audit records, chained after the transition's.
    pub audit: Vec<Draft>,
    /// When (the job's `updated_at` and the transition's time).
    pub at: Millis,
    /// Who or what made it.
    pub actor: String,
}

/// Gate B's decision on a queued job as a move.
pub fn plan_dispatch(d: Dispatch) -> Move {
    let mut changes = Vec::with_capacity(4);
    changes.extend(d.gate_b.map(Change::GateB));
    let mut approval = ApprovalWrite::None;
    let mut budgets = Vec::new();
    let (event, reason) = match d.action {
        DispatchAction::Lease { lease, budgets: taken } => {
            budgets = taken;
            let reason = format!("leased to {}", lease.worker);
            changes.push(Change::Lease(lease));
            changes.push(Change::CountExecutionAttempt);
            (Event::Lease, reason)
        }
        DispatchAction::Deny => (Event::GateBDeny, "denied at gate b".to_owned()),
        DispatchAction::NeedsApproval { replacement } => {
            changes.push(Change::ApprovalId(replacement.id.clone()));
            approval = ApprovalWrite::Replace(Box::new(replacement));
            (Event::NeedsApproval, "gate b needs a fresh approval".to_owned())
        }
        DispatchAction::Requeue { not_before, counted } => {
            changes.push(Change::NotBefore(not_before));
            if counted {
                changes.push(Change::CountSchedulingAttempt);
            }
            (Event::Requeue, "requeued with backoff".to_owned())
        }
        DispatchAction::DeadLetter { reason } => {
            changes.push(Change::DeadLetterReason(reason.clone()));
            changes.push(Change::CountSchedulingAttempt);
            (Event::DeadLetter, reason)
        }
    };
    Move {
        tenant: d.tenant,
        job_id: d.job_id,
        precondition: Precondition {
            state: Some(JobState::Queued),
            decided_under: d.decided_under,
            ..Precondition::default()
        },
        budgets,
        transition: Some((event, reason)),
        changes,
        approval,
        actor: d.audit.actor.clone(),
        audit: vec![d.audit],
        at: d.at,
    }
}

/// What Gate B's safety check answered.
#[derive(Clone, Debug)]
pub enum Answer<'a> {
    /// A decision under a snapshot, with the job's approval checked against it when the
    /// decision is `require_human`.
    Decided(Decided<'a>, ApprovalState),
    /// No answer (timeout, error, open circuit); the snapshot is the one active when the check
    /// started, recorded with a bypass.
    Unavailable {
        /// Why.
        why: String,
        /// The active snapshot's hash.
        snapshot_hash: String,
        /// The active snapshot's version.
        snapshot_version: u64,
    },
}

/// Everything Gate B decides a queued job with.
#[derive(Clone, Debug)]
pub struct GateB<'a> {
    /// The job, as the claim read it.
    pub job: &'a JobRecord,
    /// The job as policy saw it.
    pub policy_job: &'a airlock_policy::Job,
    /// The safety check's answer.
    pub answer: Answer<'a>,
    /// What an unavailable check means for the job's topic.
    pub fail_mode: FailMode,
    /// The topic's caps and backoff.
    pub caps: Caps,
    /// Backoff jitter, drawn from [0.5, 1.5].
    pub jitter: f64,
    /// The lease to hand out if the job is leased.
    pub lease: Lease,
    /// The id of the fresh approval request if one is needed.
    pub approval_id: ApprovalId,
    /// How long a fresh approval request stays open.
    pub approval_ttl_ms: Millis,
    /// When (the decision's and the move's time).
    pub at: Millis,
    /// The claimer.
    pub actor: String,
}

/// Gate B's decision on a job, and the move that commits it.
#[derive(Clone, Debug)]
pub struct GateBPlan {
    /// What Gate B does.
    pub action: Action,
    /// The decision recorded on the job.
    pub decision: GateDecision,
    /// The write.
    pub mv: Move,
}

/// Gate B on a queued job (SPEC 6): the action [`dispatch::gate_b`] picks for the answer, the
/// decision recorded on the job, and the move with its audit record, its budgets (a throttle
/// charges every dispatch that would run the job, retries included), the fresh approval
/// request a `require_human` without a valid approval opens, and the snapshot version its
/// commit must find active.
pub fn plan_gate_b(g: GateB<'_>) -> GateBPlan {
    let job = g.job;
    let attempts = job.dispatch.scheduling_attempts;
    let safety = match &g.answer {
        Answer::Decided(d, approval) => Safety::Decided(d.evaluation.decision, approval.clone()),
        Answer::Unavailable { why, .. } => Safety::Unavailable(why.clone()),
    };
    let action = dispatch::gate_b(safety, g.fail_mode, attempts, &g.caps, g.jitter);
    let (decision, mut data, decided_under) = match &g.answer {
        Answer::Decided(d, _) => {
            let decision = d.record(g.at);
            let data = d.audit_data(&decision);
            (decision, data, Some(d.version))
        }
        Answer::Unavailable { snapshot_hash, snapshot_version, .. } => {
            let decision = GateDecision {
                decision: Decision::Allow,
                rule_ids: Vec::new(),
                reason: "safety check unavailable".into(),
                snapshot_hash: snapshot_hash.clone(),
                snapshot_version: *snapshot_version,
                at: g.at,
                bypassed: matches!(action, Action::Lease { bypassed: true, .. }),
            };
            let data = json!({
                "decision": "unavailable",
                "rule_ids": decision.rule_ids,
                "reason": decision.reason,
                "snapshot": decision.snapshot_hash,
                "snapshot_version": decision.snapshot_version,
            });
            (decision, data, None)
        }
    };
    merge(&mut data, json!({"fail_mode": g.fail_mode.as_str(), "scheduling_attempts": attempts}));
    let (outcome, dispatch_action) = match &action {
        Action::Lease { budgets, bypassed } => {
            let budgets = match (&g.answer, budgets) {
                (Answer::Decided(d, _), true) => d.budgets(Gate::B, g.policy_job),
                _ => Vec::new(),
            };
            let outcome = json!({
                "outcome": if *bypassed { "bypassed" } else { "leased" },
                "gate_b_bypassed": bypassed,
            });
            (outcome, DispatchAction::Lease { lease: g.lease, budgets })
        }
        Action::Deny => (json!({"outcome": "denied"}), DispatchAction::Deny),
        Action::NeedsApproval(stale) => match &g.answer {
            Answer::Decided(d, _) => {
                let request = d.request(g.policy_job.hash(), job.principal.clone(), g.at, g.approval_ttl_ms);
                let replacement =
                    ApprovalRecord::open(g.approval_id, job.tenant.clone(), job.id.clone(), request);
                let stale = stale.as_ref().map(ToString::to_string);
                (
                    json!({"outcome": "needs_approval", "stale": stale}),
                    DispatchAction::NeedsApproval { replacement },
                )
            }
            // `dispatch::gate_b` asks for an approval only of a decision; were it ever to ask
            // without one, there would be nothing to bind a request to: fail closed.
            Answer::Unavailable { .. } => (json!({"outcome": "denied"}), DispatchAction::Deny),
        },
        Action::Requeue { delay_ms, counted, reason } => (
            json!({"outcome": "requeued", "delay_ms": delay_ms, "counted": counted, "why": reason}),
            DispatchAction::Requeue { not_before: after(g.at, *delay_ms), counted: *counted },
        ),
        Action::DeadLetter(reason) => (
            json!({"outcome": "dead_lettered", "why": reason}),
            DispatchAction::DeadLetter { reason: reason.clone() },
        ),
    };
    merge(&mut data, outcome);
    let mv = plan_dispatch(Dispatch {
        tenant: job.tenant.clone(),
        job_id: job.id.clone(),
        action: dispatch_action,
        gate_b: Some(decision.clone()),
        at: g.at,
        audit: Draft {
            at: g.at,
            kind: Kind::GateBDecision,
            subject: job.id.as_str().to_owned(),
            actor: g.actor,
            data,
        },
        decided_under,
    });
    GateBPlan { action, decision, mv }
}

/// A queued job whose topic no worker pool takes (SPEC 6, reason `no_worker`): one more
/// counted scheduling attempt with the usual backoff, or at the cap the DLQ. The job keeps
/// its last Gate B decision; no snapshot is involved.
pub fn plan_no_worker(job: &JobRecord, caps: &Caps, jitter: f64, at: Millis) -> (Rescheduled, Move) {
    let attempts = job.dispatch.scheduling_attempts;
    let rescheduled = dispatch::no_worker(attempts, caps, jitter);
    let (action, outcome) = match &rescheduled {
        Rescheduled::DeadLetter(reason) => {
            (DispatchAction::DeadLetter { reason: reason.clone() }, "dead_lettered")
        }
        Rescheduled::Later { delay_ms } => {
            (DispatchAction::Requeue { not_before: after(at, *delay_ms), counted: true }, "requeued")
        }
    };
    let mv = plan_dispatch(Dispatch {
        tenant: job.tenant.clone(),
        job_id: job.id.clone(),
        action,
        gate_b: None,
        at,
        audit: Draft {
            at,
            kind: Kind::SchedulerNoWorker,
            subject: job.id.as_str().to_owned(),
            actor: "system".into(),
            data: json!({
                "outcome": outcome,
                "why": dispatch::NO_WORKER,
                "scheduling_attempts": attempts.saturating_add(1),
            }),
        },
        decided_under: None,
    });
    (rescheduled, mv)
}

/// `at` plus `delay_ms`.
fn after(at: Millis, delay_ms: u64) -> Millis {
    at.saturating_add(i64::try_from(delay_ms).unwrap_or(i64::MAX))
}

impl Move {
    /// The move a lease becomes when a budget refuses it: the job stays queued, uncounted, until
    /// the budget refills; Gate B's decision is kept and audited as throttled.
    #[must_use]
    pub fn throttled(self, retry_after_ms: u64) -> Self {
        let not_before = self.at.saturating_add(i64::try_from(retry_after_ms).unwrap_or(i64::MAX));
        let mut changes: Vec<Change> =
            self.changes.into_iter().filter(|c| matches!(c, Change::GateB(_))).collect();
        changes.push(Change::NotBefore(not_before));
        let mut audit = self.audit;
        for draft in &mut audit {
            draft.kind = Kind::GateBThrottled;
            if let Value::Object(data) = &mut draft.data {
                data.insert("outcome".into(), json!("throttled"));
                data.insert("retry_after_ms".into(), json!(retry_after_ms));
            }
        }
        Self { budgets: Vec::new(), transition: None, changes, approval: ApprovalWrite::None, audit, ..self }
    }

    /// Whether the job's row changes (a vote that reaches no quorum only audits).
    pub fn touches_job(&self) -> bool {
        self.transition.is_some() || !self.changes.is_empty()
    }

    /// The state the job ends in, from `from`.
    pub fn target(&self, from: JobState) -> Result<JobState, InvalidTransition> {
        match &self.transition {
            Some((event, _)) => from.next(*event),
            None => Ok(from),
        }
    }

    /// The audit record of the transition from `from` (the first of the move's records).
    pub fn transition_record(&self, from: JobState, to: JobState) -> Option<Draft> {
        let (_, reason) = self.transition.as_ref()?;
        Some(Draft {
            at: self.at,
            kind: Kind::JobTransition,
            subject: self.job_id.as_str().to_owned(),
            actor: self.actor.clone(),
            data: json!({"from": from.as_str(), "to": to.as_str(), "reason": reason}),
        })
    }
}

/// A worker's (or the lapsed-lease sweep's) end of an execution attempt as a move, fenced by
/// the lease token.
pub fn plan_finish(
    tenant: TenantId,
    job_id: JobId,
    lease: LeaseCheck,
    finish: Finish,
    at: Millis,
    actor: String,
) -> Move {
    let (event, reason, changes) = match finish {
        Finish::Succeeded { result } => {
            (Event::Succeed, "succeeded".to_owned(), vec![Change::Result(result)])
        }
        Finish::Retry { error } => (
            Event::Requeue,
            format!("attempt failed, retrying: {error}"),
            vec![Change::Error(error), Change::NotBefore(at), Change::ClearLease],
        ),
        Finish::Failed { error } => (Event::Fail, format!("failed: {error}"), vec![Change::Error(error)]),
        Finish::DeadLetter { reason } => (
            Event::DeadLetter,
            reason.clone(),
            vec![Change::DeadLetterReason(reason.clone()), Change::Error(reason), Change::ClearLease],
        ),
    };
    Move {
        tenant,
        job_id,
        precondition: Precondition {
            state: Some(JobState::Leased),
            lease: Some(lease),
            ..Precondition::default()
        },
        budgets: Vec::new(),
        transition: Some((event, reason)),
        changes,
        approval: ApprovalWrite::None,
        audit: Vec::new(),
        at,
        actor,
    }
}

/// What a worker's heartbeat comes to, decided against the job as its commit loaded it.
#[derive(Clone, Debug, PartialEq)]
pub enum Beat {
    /// The job is still leased: this move extends the lease.
    Extend(Box<Move>),
    /// The job was cancelled while leased: the worker is to stop.
    Cancelled,
}

/// A heartbeat under `token` at `now`, against `job` as its commit loaded it: refused unless
/// `token` is the job's live lease; on a leased job, the move that extends the lease until
/// `expires_at` (no transition, no audit record); on a cancelled one, [`Beat::Cancelled`].
pub fn plan_heartbeat(
    job: &JobRecord,
    token: &str,
    now: Millis,
    expires_at: Millis,
) -> Result<Beat, Refusal> {
    let live = Precondition {
        lease: Some(LeaseCheck { token: token.to_owned(), live_at: Some(now) }),
        ..Precondition::default()
    };
    live.check(job)?;
    match job.state {
        JobState::Cancelled => Ok(Beat::Cancelled),
        JobState::Leased => Ok(Beat::Extend(Box::new(Move {
            tenant: job.tenant.clone(),
            job_id: job.id.clone(),
            precondition: Precondition { state: Some(JobState::Leased), ..live },
            budgets: Vec::new(),
            transition: None,
            changes: vec![Change::ExtendLease(expires_at)],
            approval: ApprovalWrite::None,
            audit: Vec::new(),
            at: now,
            actor: job.dispatch.lease.as_ref().map(|l| l.worker.clone()).unwrap_or_default(),
        }))),
        found => Err(Refusal::State { found, expected: JobState::Leased }),
    }
}

/// A job moved by `event` alone (a cancellation), whatever its state: the transition table
/// decides whether it may.
pub fn plan_transition(
    tenant: TenantId,
    job_id: JobId,
    event: Event,
    at: Millis,
    actor: String,
    reason: String,
) -> Move {
    Move {
        tenant,
        job_id,
        precondition: Precondition::default(),
        budgets: Vec::new(),
        transition: Some((event, reason)),
        changes: Vec::new(),
        approval: ApprovalWrite::None,
        audit: Vec::new(),
        at,
        actor,
    }
}

/// An operator's retry of a dead-lettered `job`: back to the queue through Gate B, with fresh
/// attempts. Its commit must find the job still dead-lettered and not discarded.
pub fn plan_operator_retry(job: &JobRecord, at: Millis, actor: String) -> Move {
    let was = job.dispatch.dead_letter_reason.as_deref().unwrap_or_default();
    let reason = format!("operator retry from the DLQ (was: {was})");
    let mut mv = plan_transition(job.tenant.clone(), job.id.clone(), Event::OperatorRetry, at, actor, reason);
    mv.precondition =
        Precondition { state: Some(JobState::DeadLettered), undiscarded: true, ..Precondition::default() };
    mv.changes = vec![
        Change::ResetSchedulingAttempts,
        Change::ResetExecutionAttempts,
        Change::NotBefore(at),
        Change::ClearDeadLetterReason,
        Change::ClearLease,
    ];
    mv
}

/// An operator's discard of a dead-lettered `job`: kept for the record, out of the DLQ; its
/// commit must find the job still dead-lettered and not yet discarded.
pub fn plan_discard(job: &JobRecord, at: Millis, actor: String) -> Move {
    Move {
        tenant: job.tenant.clone(),
        job_id: job.id.clone(),
        precondition: Precondition {
            state: Some(JobState::DeadLettered),
            undiscarded: true,
            ..Precondition::default()
        },
        budgets: Vec::new(),
        transition: None,
        changes: vec![Change::Discard(at)],
        approval: ApprovalWrite::None,
        audit: vec![Draft {
            at,
            kind: Kind::DlqDiscarded,
            subject: job.id.as_str().to_owned(),
            actor: actor.clone(),
            data: json!({"reason": job.dispatch.dead_letter_reason}),
        }],
        at,
        actor,
    }
}

/// An approval change, decided against the request as its commit loaded it: the request as it
/// will be stored, and the move of its job (which may only audit: a vote short of the quorum).
#[derive(Clone, Debug, PartialEq)]
pub struct ApprovalPlan {
    /// The request after the change.
    pub approval: ApprovalRecord,
    /// The job's move.
    pub job: Move,
}

/// An approver's vote or rejection, an expiry or a stale request's replacement, as the write
/// of the request and a move of its job; refused when `current`, the request as the commit
/// loaded it, is no longer as the caller read it.
pub fn plan_approval_change(current: &ApprovalRecord, c: ApprovalChange) -> Result<ApprovalPlan, Refusal> {
    if current.request.status != c.expected_status || current.request.approvers.len() != c.expected_approvers
    {
        return Err(Refusal::ApprovalChanged);
    }
    let decided = c.request.status != Status::Pending;
    let transition = c.job_event.map(|event| (event, format!("approval {}", c.request.status)));
    let (changes, approval) = match c.replacement {
        Some(replacement) => {
            (vec![Change::ApprovalId(replacement.id.clone())], ApprovalWrite::Open(Box::new(replacement)))
        }
        None => (Vec::new(), ApprovalWrite::None),
    };
    Ok(ApprovalPlan {
        approval: ApprovalRecord {
            request: c.request,
            decided_at: decided.then_some(c.at),
            decided_by: decided.then(|| c.actor.clone()),
            ..current.clone()
        },
        job: Move {
            tenant: c.tenant,
            job_id: current.job_id.clone(),
            precondition: Precondition { decided_under: c.decided_under, ..Precondition::default() },
            budgets: Vec::new(),
            transition,
            changes,
            approval,
            audit: c.audit,
            at: c.at,
            actor: c.actor,
        },
    })
}

impl JobRecord {
    /// Applies `mv`'s changes and transition to the job as the commit loaded it (after its
    /// precondition held); the fields it changed, each once, in first-change order, for the
    /// store to write.
    pub fn apply(&mut self, mv: &Move) -> Result<Vec<Field>, InvalidTransition> {
        self.state = mv.target(self.state)?;
        if mv.touches_job() {
            self.updated_at = mv.at;
        }
        let d = &mut self.dispatch;
        let mut fields = Vec::with_capacity(mv.changes.len());
        for change in &mv.changes {
            match change {
                Change::GateB(gate) => d.gate_b = Some(gate.clone()),
                Change::Lease(lease) => d.lease = Some(lease.clone()),
                Change::ExtendLease(until) => {
                    if let Some(lease) = &mut d.lease {
                        lease.expires_at = *until;
                    }
                }
                Change::ClearLease => d.lease = None,
                Change::CountExecutionAttempt => {
                    d.execution_attempts = d.execution_attempts.saturating_add(1)
                }
                Change::CountSchedulingAttempt => {
                    d.scheduling_attempts = d.scheduling_attempts.saturating_add(1);
                }
                Change::ResetExecutionAttempts => d.execution_attempts = 0,
                Change::ResetSchedulingAttempts => d.scheduling_attempts = 0,
                Change::NotBefore(at) => d.not_before = *at,
                Change::DeadLetterReason(reason) => d.dead_letter_reason = Some(reason.clone()),
                Change::ClearDeadLetterReason => d.dead_letter_reason = None,
                Change::Error(error) => d.error = Some(error.clone()),
                Change::Result(result) => d.result = Some(result.clone()),
                Change::ApprovalId(id) => self.approval_id = Some(id.clone()),
                Change::Discard(at) => d.discarded_at = Some(*at),
            }
            let field = change.field();
            if !fields.contains(&field) {
                fields.push(field);
            }
        }
        Ok(fields)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing, reason = "a test fails by panicking")]

    use std::collections::BTreeMap;

    use airlock_policy::Decision;
    use serde_json::json;

    use super::*;

    /// A job of tenant `acme` in `state`, for the core's tests.
    pub(crate) fn job(state: JobState) -> JobRecord {
        JobRecord {
            id: JobId::generate(1, [1; 10]),
            tenant: "acme".parse().unwrap(),
            principal: "agent".into(),
            topic: "t".into(),
            env: "e".into(),
            labels: BTreeMap::new(),
            payload: json!({}),
            plan_hash: None,
            idempotency_key: None,
            job_hash: "h".into(),
            state,
            gate_a: GateDecision {
                decision: Decision::Allow,
                rule_ids: Vec::new(),
                reason: String::new(),
                snapshot_hash: "s".into(),
                snapshot_version: 1,
                at: 1,
                bypassed: false,
            },
            approval_id: None,
            created_at: 1,
            updated_at: 1,
            dispatch: DispatchState::default(),
        }
    }

    fn lease(token: &str, expires_at: Millis) -> Lease {
        Lease { token: token.into(), expires_at, worker: "w".into() }
    }

    fn dispatch(j: &JobRecord, action: DispatchAction) -> Move {
        plan_dispatch(Dispatch {
            tenant: j.tenant.clone(),
            job_id: j.id.clone(),
            action,
            gate_b: None,
            at: 10,
            audit: Draft {
                at: 10,
                kind: Kind::GateBDecision,
                subject: "j".into(),
                actor: "w".into(),
                data: json!({}),
            },
            decided_under: Some(1),
        })
    }

    #[test]
    fn a_lease_counts_an_attempt_on_the_record_as_loaded() {
        let mut j = job(JobState::Queued);
        j.dispatch.execution_attempts = 2;
        let mv = dispatch(&j, DispatchAction::Lease { lease: lease("t", 100), budgets: Vec::new() });
        assert_eq!(mv.precondition.check(&j), Ok(()));
        let fields = j.apply(&mv).unwrap();
        assert_eq!(fields, [Field::Lease, Field::ExecutionAttempts]);
        assert_eq!((j.state, j.dispatch.execution_attempts, j.updated_at), (JobState::Leased, 3, 10));
        assert_eq!(
            mv.precondition.check(&j),
            Err(Refusal::State { found: JobState::Leased, expected: JobState::Queued }),
            "no second lease"
        );
    }

    #[test]
    fn a_throttled_lease_keeps_the_job_queued_and_audits_the_wait() {
        let mut j = job(JobState::Queued);
        let mv = dispatch(&j, DispatchAction::Lease { lease: lease("t", 100), budgets: Vec::new() })
            .throttled(500);
        assert_eq!((mv.transition.as_ref(), mv.audit[0].kind), (None, Kind::GateBThrottled));
        j.apply(&mv).unwrap();
        assert_eq!(
            (j.state, j.dispatch.not_before, j.dispatch.lease.as_ref()),
            (JobState::Queued, 510, None)
        );
        assert_eq!(j.dispatch.execution_attempts, 0);
    }

    #[test]
    fn a_finish_is_fenced_by_token_expiry_and_state() {
        let mut j = job(JobState::Leased);
        j.dispatch.lease = Some(lease("t", 100));
        let finish = |token: &str, live_at| {
            let check = LeaseCheck { token: token.into(), live_at };
            plan_finish(
                j.tenant.clone(),
                j.id.clone(),
                check,
                Finish::Retry { error: "x".into() },
                50,
                "w".into(),
            )
        };
        assert_eq!(finish("other", Some(50)).precondition.check(&j), Err(Refusal::NotLeaseHolder));
        assert_eq!(finish("t", Some(101)).precondition.check(&j), Err(Refusal::LeaseLapsed));
        assert_eq!(finish("t", Some(100)).precondition.check(&j), Ok(()), "live until its expiry");
        assert_eq!(finish("t", None).precondition.check(&j), Ok(()), "the sweep gives no time");
        let mut cancelled = JobRecord { state: JobState::Cancelled, ..j.clone() };
        assert_eq!(
            finish("t", Some(50)).precondition.check(&cancelled),
            Err(Refusal::State { found: JobState::Cancelled, expected: JobState::Leased })
        );
        let mv = finish("t", Some(50));
        j.apply(&mv).unwrap();
        assert_eq!(
            (j.state, j.dispatch.lease.as_ref(), j.dispatch.error.as_deref()),
            (JobState::Queued, None, Some("x"))
        );
        assert!(cancelled.apply(&mv).is_err(), "the table refuses what the precondition would");
    }

    #[test]
    fn an_approval_change_is_refused_when_the_request_moved_on() {
        let j = job(JobState::AwaitingApproval);
        let request = Request {
            job_hash: "h".into(),
            snapshot_hash: "s".into(),
            rule_ids: Vec::new(),
            rule_hashes: Vec::new(),
            requested_by: "agent".into(),
            created_at: 1,
            expires_at: 1_000,
            quorum: 2,
            approvers: vec!["alice".into()],
            status: Status::Pending,
        };
        let current =
            ApprovalRecord::open(ApprovalId::generate(1, [2; 10]), j.tenant.clone(), j.id.clone(), request);
        let change = |read: usize| ApprovalChange {
            tenant: j.tenant.clone(),
            id: current.id.clone(),
            expected_status: Status::Pending,
            expected_approvers: read,
            request: Request {
                approvers: vec!["alice".into(), "bob".into()],
                status: Status::Approved,
                ..current.request.clone()
            },
            job_event: Some(Event::Approved),
            replacement: None,
            audit: Vec::new(),
            at: 20,
            actor: "bob".into(),
            decided_under: Some(1),
        };
        assert_eq!(plan_approval_change(&current, change(0)).map(|_| ()), Err(Refusal::ApprovalChanged));
        let plan = plan_approval_change(&current, change(1)).unwrap();
        assert_eq!((plan.approval.decided_at, plan.approval.decided_by.as_deref()), (Some(20), Some("bob")));
        let mut after = j.clone();
        after.apply(&plan.job).unwrap();
        assert_eq!((after.state, plan.job.precondition.decided_under), (JobState::Queued, Some(1)));
    }

    const POLICY: &str = r#"version: v1
defaults: { decision: allow }
rules:
  - id: slow-updates
    when: { topic: t }
    decision: throttle
    limit: { rate: 1, per: 1m, key: [tenant, topic] }
  - id: no-prod
    when: { env: prod }
    decision: deny
  - id: ask-staging
    when: { env: staging }
    decision: require_human
"#;

    fn gate_b_plan(j: &JobRecord, answer: Answer<'_>, fail_mode: FailMode) -> GateBPlan {
        let policy_job = j.to_policy_job();
        plan_gate_b(GateB {
            job: j,
            policy_job: &policy_job,
            answer,
            fail_mode,
            caps: Caps::default(),
            jitter: 1.0,
            lease: lease("t", 1_000),
            approval_id: ApprovalId::generate(10, [3; 10]),
            approval_ttl_ms: 500,
            at: 10,
            actor: "w".into(),
        })
    }

    #[test]
    fn gate_b_charges_a_throttle_on_every_dispatch_under_the_snapshot_it_decided() {
        let (policy, _) = airlock_policy::compile(POLICY).unwrap();
        let mut j = job(JobState::Queued);
        j.dispatch.execution_attempts = 2;
        let evaluation = policy.evaluate(&j.to_policy_job());
        let decided = Decided { policy: &policy, version: 7, evaluation: &evaluation, plan: None };
        let plan = gate_b_plan(&j, Answer::Decided(decided, ApprovalState::Missing), FailMode::Closed);
        assert_eq!(plan.action, Action::Lease { budgets: true, bypassed: false });
        assert_eq!(plan.mv.budgets.len(), 1, "a retried job is charged too");
        assert!(plan.mv.budgets[0].key.starts_with("b|"), "{}", plan.mv.budgets[0].key);
        assert_eq!(plan.mv.precondition.decided_under, Some(7));
        assert_eq!(plan.mv.precondition.state, Some(JobState::Queued));
        assert_eq!((plan.decision.snapshot_version, plan.decision.at), (7, 10));
        let data = &plan.mv.audit[0].data;
        assert_eq!(
            (data["outcome"].as_str(), data["rule_ids"][0].as_str()),
            (Some("leased"), Some("slow-updates"))
        );
    }

    #[test]
    fn gate_b_opens_a_fresh_request_bound_to_the_job_and_the_snapshot() {
        let (policy, _) = airlock_policy::compile(POLICY).unwrap();
        let mut j = job(JobState::Queued);
        j.env = "staging".into();
        let evaluation = policy.evaluate(&j.to_policy_job());
        let decided = Decided { policy: &policy, version: 3, evaluation: &evaluation, plan: None };
        let plan = gate_b_plan(&j, Answer::Decided(decided, ApprovalState::Missing), FailMode::Closed);
        let ApprovalWrite::Replace(request) = &plan.mv.approval else { panic!("{:?}", plan.mv.approval) };
        assert_eq!(request.request.job_hash, j.to_policy_job().hash());
        assert_eq!(request.request.snapshot_hash, policy.hash());
        assert_eq!((request.request.created_at, request.request.expires_at), (10, 510));
        assert_eq!(plan.mv.changes.last(), Some(&Change::ApprovalId(request.id.clone())));
        let mut after = j.clone();
        after.apply(&plan.mv).unwrap();
        assert_eq!(after.state, JobState::AwaitingApproval);

        j.env = "prod".into();
        let evaluation = policy.evaluate(&j.to_policy_job());
        let decided = Decided { policy: &policy, version: 3, evaluation: &evaluation, plan: None };
        let plan = gate_b_plan(&j, Answer::Decided(decided, ApprovalState::Valid), FailMode::Closed);
        assert_eq!((plan.action, plan.mv.transition.map(|t| t.0)), (Action::Deny, Some(Event::GateBDeny)));
    }

    #[test]
    fn gate_b_unavailable_follows_the_fail_mode_and_checks_no_snapshot() {
        let j = job(JobState::Queued);
        let down =
            || Answer::Unavailable { why: "timeout".into(), snapshot_hash: "s".into(), snapshot_version: 4 };
        let closed = gate_b_plan(&j, down(), FailMode::Closed);
        assert!(matches!(closed.action, Action::Requeue { counted: true, .. }));
        assert_eq!(closed.mv.precondition.decided_under, None);
        assert!(closed.mv.changes.contains(&Change::CountSchedulingAttempt));
        assert!(closed.mv.changes.contains(&Change::NotBefore(1_010)), "{:?}", closed.mv.changes);
        let open = gate_b_plan(&j, down(), FailMode::Open);
        assert!(open.decision.bypassed);
        assert_eq!(open.mv.audit[0].data["outcome"], "bypassed");
        assert_eq!(open.mv.transition.map(|t| t.0), Some(Event::Lease));
    }

    #[test]
    fn no_worker_counts_with_backoff_then_dead_letters() {
        let mut j = job(JobState::Queued);
        let (rescheduled, mv) = plan_no_worker(&j, &Caps::default(), 1.0, 10);
        assert_eq!(rescheduled, Rescheduled::Later { delay_ms: 1_000 });
        assert_eq!(mv.audit[0].kind, Kind::SchedulerNoWorker);
        assert!(!mv.changes.iter().any(|c| matches!(c, Change::GateB(_))), "keeps the last decision");
        j.apply(&mv).unwrap();
        assert_eq!((j.dispatch.scheduling_attempts, j.dispatch.not_before), (1, 1_010));
        j.dispatch.scheduling_attempts = 49;
        let (rescheduled, mv) = plan_no_worker(&j, &Caps::default(), 1.0, 20);
        assert!(matches!(rescheduled, Rescheduled::DeadLetter(r) if r.contains("no_worker")));
        j.apply(&mv).unwrap();
        assert_eq!(j.state, JobState::DeadLettered);
    }

    #[test]
    fn a_dead_letter_is_discarded_once_and_then_never_retried() {
        let mut j = job(JobState::DeadLettered);
        j.dispatch.dead_letter_reason = Some("why".into());
        let discard = plan_discard(&j, 30, "op".into());
        assert_eq!(discard.precondition.check(&j), Ok(()));
        assert_eq!(j.apply(&discard).unwrap(), [Field::DiscardedAt]);
        assert_eq!((j.state, j.dispatch.discarded_at, j.updated_at), (JobState::DeadLettered, Some(30), 30));
        assert_eq!(discard.precondition.check(&j), Err(Refusal::Discarded));
        assert_eq!(plan_operator_retry(&j, 40, "op".into()).precondition.check(&j), Err(Refusal::Discarded));
        let queued = job(JobState::Queued);
        assert_eq!(
            plan_discard(&queued, 30, "op".into()).precondition.check(&queued),
            Err(Refusal::State { found: JobState::Queued, expected: JobState::DeadLettered })
        );
    }

    #[test]
    fn a_heartbeat_extends_a_live_lease_and_tells_a_cancelled_worker_to_stop() {
        let mut j = job(JobState::Leased);
        j.dispatch.lease = Some(lease("t", 100));
        assert_eq!(plan_heartbeat(&j, "other", 50, 200), Err(Refusal::NotLeaseHolder));
        assert_eq!(plan_heartbeat(&j, "t", 101, 200), Err(Refusal::LeaseLapsed));
        let Ok(Beat::Extend(mv)) = plan_heartbeat(&j, "t", 50, 200) else { panic!("an extension") };
        assert_eq!(j.apply(&mv).unwrap(), [Field::Lease]);
        assert_eq!((j.state, j.dispatch.lease.as_ref().map(|l| l.expires_at)), (JobState::Leased, Some(200)));
        assert!(mv.transition.is_none() && mv.audit.is_empty());
        j.state = JobState::Cancelled;
        assert_eq!(plan_heartbeat(&j, "t", 60, 300), Ok(Beat::Cancelled));
        j.state = JobState::Succeeded;
        assert_eq!(
            plan_heartbeat(&j, "t", 60, 300),
            Err(Refusal::State { found: JobState::Succeeded, expected: JobState::Leased })
        );
    }
}
