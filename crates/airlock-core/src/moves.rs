//! The write that follows a decision, as one value: a [`Move`] says what a job's commit must
//! find (its [`Precondition`]), which budgets it takes, which fields it changes, which state it
//! moves to and why, which approval requests it writes and which audit records it adds. The
//! plan functions here are the only place such a write is decided; a store locks and loads the
//! job, checks the precondition, takes the budgets with [`crate::throttle::take`], applies the
//! move to the loaded record ([`JobRecord::apply`]) and writes the changed fields, each through
//! its one column mapping ([`Field`]). The simulator applies the same moves to its records.

use serde_json::{Value, json};

use crate::Millis;
use crate::approval::{Request, Status};
use crate::audit::{Draft, Kind};
use crate::ids::{ApprovalId, JobId, TenantId};
use crate::record::{ApprovalRecord, Budget, GateDecision, JobRecord, Lease};
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
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Precondition {
    /// The job's state, when the move needs one (an approval change leaves it to the transition
    /// table).
    pub state: Option<JobState>,
    /// The live lease, checked before the state.
    pub lease: Option<LeaseCheck>,
    /// The snapshot version the decision was made under, which must still be the active one;
    /// only the store can check it, in the move's own transaction.
    pub decided_under: Option<u64>,
}

/// Why a precondition does not hold.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The job is in another state.
    #[error("the job is `{0}`")]
    State(JobState),
    /// The caller's token is not the job's live lease.
    #[error("the lease token is not the job's live lease")]
    NotLeaseHolder,
    /// The caller holds the lease, but it lapsed.
    #[error("the lease lapsed; the job will be retried")]
    LeaseLapsed,
    /// The approval request is no longer as the caller read it.
    #[error("the approval request changed; read it again")]
    ApprovalChanged,
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
            Some(state) if state != job.state => Err(Refusal::State(job.state)),
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
}

/// One change to a job's fields.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    /// Records Gate B's decision.
    GateB(GateDecision),
    /// Hands out a lease; an execution attempt starts ([`Change::CountExecutionAttempt`]).
    Lease(Lease),
    /// Ends the lease.
    ClearLease,
    /// One more execution attempt.
    CountExecutionAttempt,
    /// One more scheduling attempt.
    CountSchedulingAttempt,
    /// Not dispatchable before then.
    NotBefore(Millis),
    /// Why it was dead-lettered.
    DeadLetterReason(String),
    /// The worker's error.
    Error(String),
    /// The worker's result.
    Result(Value),
    /// The job's current approval request.
    ApprovalId(ApprovalId),
}

impl Change {
    /// The field it changes.
    pub fn field(&self) -> Field {
        match self {
            Self::GateB(_) => Field::GateB,
            Self::Lease(_) | Self::ClearLease => Field::Lease,
            Self::CountExecutionAttempt => Field::ExecutionAttempts,
            Self::CountSchedulingAttempt => Field::SchedulingAttempts,
            Self::NotBefore(_) => Field::NotBefore,
            Self::DeadLetterReason(_) => Field::DeadLetterReason,
            Self::Error(_) => Field::Error,
            Self::Result(_) => Field::Result,
            Self::ApprovalId(_) => Field::ApprovalId,
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
            lease: None,
            decided_under: d.decided_under,
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
        precondition: Precondition { state: Some(JobState::Leased), lease: Some(lease), decided_under: None },
        budgets: Vec::new(),
        transition: Some((event, reason)),
        changes,
        approval: ApprovalWrite::None,
        audit: Vec::new(),
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
            precondition: Precondition { state: None, lease: None, decided_under: c.decided_under },
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
                Change::ClearLease => d.lease = None,
                Change::CountExecutionAttempt => {
                    d.execution_attempts = d.execution_attempts.saturating_add(1)
                }
                Change::CountSchedulingAttempt => {
                    d.scheduling_attempts = d.scheduling_attempts.saturating_add(1);
                }
                Change::NotBefore(at) => d.not_before = *at,
                Change::DeadLetterReason(reason) => d.dead_letter_reason = Some(reason.clone()),
                Change::Error(error) => d.error = Some(error.clone()),
                Change::Result(result) => d.result = Some(result.clone()),
                Change::ApprovalId(id) => self.approval_id = Some(id.clone()),
            }
            let field = change.field();
            if !fields.contains(&field) {
                fields.push(field);
            }
        }
        Ok(fields)
    }
}
