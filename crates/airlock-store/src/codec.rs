//! How the stores encode what has no column type of its own (a gate decision, a list of
//! strings) and how they report stored data they cannot read: one encoding, shared by the
//! embedded and the PostgreSQL store, so that neither borrows from the other. Here too is the
//! one mapping from a job's fields to its columns ([`job_cells`]), through which both stores
//! write every [`airlock_core::moves::Move`].

use airlock_core::audit::Kind;
use airlock_core::moves::{Field, Refusal};
use airlock_policy::Decision;
use serde_json::{Value, json};

use crate::{GateDecision, JobRecord, StoreError};

/// Stored data this version of Airlock cannot read.
pub(crate) fn corrupt(what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(what.to_string())
}

/// A gate decision as the JSON text stored in its column.
pub(crate) fn gate_json(g: &GateDecision) -> String {
    json!({
        "decision": g.decision.as_str(),
        "rule_ids": g.rule_ids,
        "reason": g.reason,
        "snapshot_hash": g.snapshot_hash,
        "snapshot_version": g.snapshot_version,
        "at": g.at,
        "bypassed": g.bypassed,
    })
    .to_string()
}

pub(crate) fn gate_from_json(text: &str) -> Result<GateDecision, StoreError> {
    let v: Value = serde_json::from_str(text).map_err(corrupt)?;
    let s = |k: &str| {
        v.get(k).and_then(Value::as_str).map(str::to_owned).ok_or_else(|| corrupt(format!("gate `{k}`")))
    };
    Ok(GateDecision {
        decision: Decision::parse(&s("decision")?).ok_or_else(|| corrupt("gate decision"))?,
        rule_ids: v
            .get("rule_ids")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).map(str::to_owned).collect())
            .unwrap_or_default(),
        reason: s("reason")?,
        snapshot_hash: s("snapshot_hash")?,
        snapshot_version: v.get("snapshot_version").and_then(Value::as_u64).unwrap_or(0),
        at: v.get("at").and_then(Value::as_i64).unwrap_or(0),
        bypassed: v.get("bypassed").and_then(Value::as_bool).unwrap_or(false),
    })
}

/// A JSON list of strings, as stored.
pub(crate) fn strings(text: &str) -> Result<Vec<String>, StoreError> {
    serde_json::from_str(text).map_err(corrupt)
}

/// An audit record's stored kind; one this version does not know is corrupt data.
pub(crate) fn audit_kind(text: &str) -> Result<Kind, StoreError> {
    text.parse().map_err(corrupt)
}

/// A value of a job's column, as both stores bind it.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Cell {
    /// An integer column.
    Int(i64),
    /// A nullable integer column.
    OptInt(Option<i64>),
    /// A nullable text column.
    OptText(Option<String>),
}

/// The columns of `jobs` that hold `field`, with their values in `job`, appended to `cells`.
pub(crate) fn job_cells(job: &JobRecord, field: Field, cells: &mut Vec<(&'static str, Cell)>) {
    let d = &job.dispatch;
    match field {
        Field::GateB => cells.push(("gate_b", Cell::OptText(d.gate_b.as_ref().map(gate_json)))),
        Field::Lease => {
            let lease = d.lease.as_ref();
            cells.push(("lease_token", Cell::OptText(lease.map(|l| l.token.clone()))));
            cells.push(("lease_expires_at", Cell::OptInt(lease.map(|l| l.expires_at))));
            cells.push(("leased_by", Cell::OptText(lease.map(|l| l.worker.clone()))));
        }
        Field::ExecutionAttempts => {
            cells.push(("execution_attempts", Cell::Int(i64::from(d.execution_attempts))))
        }
        Field::SchedulingAttempts => {
            cells.push(("scheduling_attempts", Cell::Int(i64::from(d.scheduling_attempts))));
        }
        Field::NotBefore => cells.push(("not_before", Cell::Int(d.not_before))),
        Field::DeadLetterReason => {
            cells.push(("dead_letter_reason", Cell::OptText(d.dead_letter_reason.clone())))
        }
        Field::Error => cells.push(("error", Cell::OptText(d.error.clone()))),
        Field::Result => cells.push(("result", Cell::OptText(d.result.as_ref().map(Value::to_string)))),
        Field::ApprovalId => {
            cells.push((
                "approval_id",
                Cell::OptText(job.approval_id.as_ref().map(|a| a.as_str().to_owned())),
            ));
        }
        Field::DiscardedAt => cells.push(("discarded_at", Cell::OptInt(d.discarded_at))),
    }
}

/// What became of a [`airlock_core::moves::Move`] given to [`crate::Store::apply`].
#[derive(Debug)]
pub enum Applied {
    /// Applied; the job as it is now.
    Moved(Box<JobRecord>),
    /// A budget refused: the move's throttled form was applied instead.
    Throttled {
        /// When a token will be available.
        retry_after_ms: u64,
    },
    /// The precondition did not hold; nothing was written.
    Refused(Refusal),
}

/// A move refused by its precondition, as its caller sees it: a conflict that says which
/// (a dispatch's refusal by state is [`Applied::dispatched`]'s `Gone`).
pub(crate) fn refused(refusal: Refusal) -> StoreError {
    StoreError::Conflict(refusal.to_string())
}

impl Applied {
    /// As Gate B's caller sees it: a job no longer queued is gone.
    pub fn dispatched(self) -> Result<crate::DispatchOutcome, StoreError> {
        Ok(match self {
            Self::Moved(job) => crate::DispatchOutcome::Applied(job),
            Self::Throttled { retry_after_ms } => crate::DispatchOutcome::Throttled { retry_after_ms },
            Self::Refused(Refusal::State { .. }) => crate::DispatchOutcome::Gone,
            Self::Refused(other) => return Err(refused(other)),
        })
    }

    /// As the caller of a move that takes no budget sees it (a finish, a cancellation, an
    /// operator retry or discard, an approval's job): the job, or a conflict.
    pub fn finished(self) -> Result<JobRecord, StoreError> {
        match self {
            Self::Moved(job) => Ok(*job),
            Self::Throttled { .. } => {
                Err(StoreError::Conflict("the move took no budget, yet was throttled".into()))
            }
            Self::Refused(refusal) => Err(refused(refusal)),
        }
    }
}
