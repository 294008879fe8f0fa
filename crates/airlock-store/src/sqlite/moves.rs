//! The writes that follow a decision: a submit, a dispatch, a finish, an approval change, each
//! checking on the writer thread, which also runs every publish, that it was decided under the
//! active snapshot ([`check_decided_under`]); and the shared breaker's state.

use airlock_core::Millis;
use airlock_core::audit::Kind;
use airlock_core::breaker::BreakerState;
use airlock_core::ids::{ApprovalId, JobId, TenantId};
use airlock_core::moves::{self, ApprovalWrite, Beat, Move};
use airlock_core::throttle::{self, Bucket, Take};
use rusqlite::types::ToSqlOutput;
use rusqlite::{Connection, OptionalExtension, ToSql, params};
use serde_json::{Value, json};

use super::rows::{JOB_INSERT_COLUMNS, load_approval, load_idempotency, load_job};
use super::writer::{Output, Reply, Tx};
use crate::codec::{Applied, Cell, corrupt, gate_json, job_cells, refused};
use crate::{ApprovalChange, Budget, Heartbeat, JobRecord, StoreError, Submission, SubmitOutcome};

/// Refuses a write decided under a snapshot that is no longer active. Publishes go through the
/// same writer thread, so nothing can activate another snapshot between this check and the
/// commit of the write.
pub(super) fn check_decided_under(conn: &Connection, decided_under: Option<u64>) -> Result<(), StoreError> {
    let Some(version) = decided_under else { return Ok(()) };
    let active: Option<i64> = conn
        .prepare_cached("SELECT version FROM active_snapshot WHERE id = 1")?
        .query_row([], |r| r.get(0))
        .optional()?;
    let active = active.map_or(0, i64::unsigned_abs);
    if active == version { Ok(()) } else { Err(StoreError::Stale { active }) }
}

pub(super) fn submit(tx: &mut Tx<'_>, s: Submission, retained_since: Millis) -> Reply {
    let tenant = s.job.tenant.as_str().to_owned();
    if let Some((key, _, _)) = &s.idempotency
        && let Some(existing) = load_idempotency(tx.conn, &tenant, key, retained_since)?
    {
        let outcome = if existing.job_hash == s.job.job_hash {
            SubmitOutcome::Replay(existing)
        } else {
            SubmitOutcome::KeyReused(existing)
        };
        return Ok(Output::Submit(outcome));
    }
    check_decided_under(tx.conn, s.decided_under)?;
    let at = s.job.created_at;
    if let Err(retry_after_ms) = take_budgets(tx.conn, &s.budgets, at)? {
        let mut draft = s.audit;
        if let Value::Object(data) = &mut draft.data {
            data.insert("outcome".into(), json!("throttled"));
            data.insert("retry_after_ms".into(), json!(retry_after_ms));
        }
        draft.kind = Kind::GateADecision;
        draft.subject = "-".into();
        tx.append_audit(&tenant, draft)?;
        return Ok(Output::Submit(SubmitOutcome::Throttled { retry_after_ms }));
    }
    let j = &s.job;
    let labels = serde_json::to_string(&j.labels).map_err(corrupt)?;
    tx.conn
        .prepare_cached(&format!(
            "INSERT INTO jobs ({JOB_INSERT_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)"
        ))?
        .execute(params![
            j.id.as_str(),
            tenant,
            j.principal,
            j.topic,
            j.env,
            labels,
            j.payload.to_string(),
            j.plan_hash,
            j.idempotency_key,
            j.job_hash,
            j.state.as_str(),
            gate_json(&j.gate_a),
            j.approval_id.as_ref().map(ApprovalId::as_str),
            j.created_at,
            j.updated_at,
        ])?;
    tx.conn
        .prepare_cached(
            "INSERT INTO job_transitions (job_id, seq, from_state, to_state, at, actor, reason)
             VALUES (?1, 1, NULL, ?2, ?3, ?4, 'submitted')",
        )?
        .execute(params![j.id.as_str(), j.state.as_str(), at, j.principal])?;
    if let Some(approval) = &s.approval {
        tx.insert_approval(approval)?;
    }
    if let Some((key, status, body)) = &s.idempotency {
        tx.conn
            .prepare_cached(
                "INSERT INTO idempotency (tenant, key, job_hash, job_id, status, body, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT (tenant, key) DO UPDATE SET job_hash = excluded.job_hash, job_id = excluded.job_id,
                 status = excluded.status, body = excluded.body, created_at = excluded.created_at",
            )?
            .execute(params![tenant, key, j.job_hash, j.id.as_str(), status, body, at])?;
    }
    tx.append_audit(&tenant, s.audit)?;
    Ok(Output::Submit(SubmitOutcome::Accepted))
}

pub(super) fn change_approval(tx: &mut Tx<'_>, c: ApprovalChange) -> Reply {
    let current = load_approval(tx.conn, &c.tenant, &c.id)?.ok_or(StoreError::NotFound)?;
    let plan = moves::plan_approval_change(&current, c).map_err(refused)?;
    let a = &plan.approval;
    tx.conn
        .prepare_cached(
            "UPDATE approvals SET status = ?1, approvers = ?2, decided_at = ?3, decided_by = ?4 WHERE id = ?5",
        )?
        .execute(params![
            a.request.status.as_str(),
            json!(a.request.approvers).to_string(),
            a.decided_at,
            a.decided_by,
            a.id.as_str(),
        ])?;
    let job = load_job(tx.conn, &plan.job.tenant, &plan.job.job_id)?.ok_or(StoreError::NotFound)?;
    if let Applied::Refused(refusal) = apply_move(tx, job, plan.job)? {
        return Err(refused(refusal));
    }
    Ok(Output::Approval(plan.approval))
}

/// Takes every budget or none; `Err(retry_after_ms)` when one refuses.
pub(super) fn take_budgets(
    conn: &Connection,
    budgets: &[Budget],
    at: Millis,
) -> Result<Result<(), u64>, StoreError> {
    let mut taken = Vec::with_capacity(budgets.len());
    let mut retry_after_ms = 0;
    for budget in budgets {
        let bucket = conn
            .prepare_cached("SELECT tokens, updated_at FROM throttle_buckets WHERE key = ?1")?
            .query_row([&budget.key], |r| Ok(Bucket { tokens: r.get(0)?, updated_at: r.get(1)? }))
            .optional()?;
        match throttle::take(bucket, &budget.limit, at) {
            Take::Admitted(b) => taken.push((&budget.key, b)),
            Take::Refused { retry_after_ms: ms } => retry_after_ms = retry_after_ms.max(ms),
        }
    }
    if retry_after_ms > 0 {
        return Ok(Err(retry_after_ms));
    }
    for (key, bucket) in taken {
        conn.prepare_cached(
            "INSERT INTO throttle_buckets (key, tokens, updated_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (key) DO UPDATE SET tokens = excluded.tokens, updated_at = excluded.updated_at",
        )?
        .execute(params![key, bucket.tokens, bucket.updated_at])?;
    }
    Ok(Ok(()))
}

/// Commits `mv` to `job`, loaded by the writer thread: checks its precondition and its
/// snapshot, takes its budgets (a refusal commits [`Move::throttled`] instead), applies it to
/// the record and writes the fields it changed through the one field-to-column mapping
/// ([`job_cells`]), its history step, its approval requests and its audit records (the
/// transition's, then the decision's).
pub(super) fn apply_move(tx: &mut Tx<'_>, mut job: JobRecord, mut mv: Move) -> Result<Applied, StoreError> {
    if let Err(refusal) = mv.precondition.check(&job) {
        return Ok(Applied::Refused(refusal));
    }
    check_decided_under(tx.conn, mv.precondition.decided_under)?;
    let mut throttled = None;
    if let Err(retry_after_ms) = take_budgets(tx.conn, &mv.budgets, mv.at)? {
        mv = mv.throttled(retry_after_ms);
        throttled = Some(retry_after_ms);
    }
    let (from, old_approval) = (job.state, job.approval_id.clone());
    let fields = job.apply(&mv)?;
    let mut cells = Vec::with_capacity(fields.len() + 2);
    for field in fields {
        job_cells(&job, field, &mut cells);
    }
    if mv.touches_job() {
        let mut sql = String::from("UPDATE jobs SET state = ?1, updated_at = ?2");
        for (n, (column, _)) in cells.iter().enumerate() {
            sql.push_str(&format!(", {column} = ?{}", n + 4));
        }
        sql.push_str(" WHERE id = ?3");
        let (state, id) = (job.state.as_str(), job.id.as_str());
        let mut values: Vec<&dyn ToSql> = vec![&state, &job.updated_at, &id];
        values.extend(cells.iter().map(|(_, cell)| cell as &dyn ToSql));
        tx.conn.prepare_cached(&sql)?.execute(values.as_slice())?;
    }
    let tenant = job.tenant.as_str().to_owned();
    match &mv.approval {
        ApprovalWrite::None => {}
        ApprovalWrite::Replace(replacement) => {
            if let Some(old) = &old_approval {
                tx.conn
                    .prepare_cached(
                        "UPDATE approvals SET status = 'stale', decided_at = ?1, decided_by = 'system'
                         WHERE id = ?2 AND status IN ('pending', 'approved')",
                    )?
                    .execute(params![mv.at, old.as_str()])?;
            }
            tx.insert_approval(replacement)?;
        }
        ApprovalWrite::Open(request) => tx.insert_approval(request)?,
    }
    if let Some(record) = mv.transition_record(from, job.state) {
        let reason = mv.transition.as_ref().map_or("", |(_, reason)| reason.as_str());
        tx.conn
            .prepare_cached(
                "INSERT INTO job_transitions (job_id, seq, from_state, to_state, at, actor, reason)
                 SELECT ?1, COALESCE(MAX(seq), 0) + 1, ?2, ?3, ?4, ?5, ?6 FROM job_transitions WHERE job_id = ?1",
            )?
            .execute(params![job.id.as_str(), from.as_str(), job.state.as_str(), mv.at, mv.actor, reason])?;
        tx.append_audit(&tenant, record)?;
    }
    for draft in mv.audit {
        tx.append_audit(&tenant, draft)?;
    }
    Ok(match throttled {
        Some(retry_after_ms) => Applied::Throttled { retry_after_ms },
        None => Applied::Moved(Box::new(job)),
    })
}

impl ToSql for Cell {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        match self {
            Cell::Int(n) => n.to_sql(),
            Cell::OptInt(n) => n.to_sql(),
            Cell::OptText(text) => text.to_sql(),
        }
    }
}

/// A worker's heartbeat, planned by the core against the job as the writer loaded it.
pub(super) fn heartbeat(
    tx: &mut Tx<'_>,
    tenant: &TenantId,
    id: &JobId,
    token: &str,
    now: Millis,
    expires_at: Millis,
) -> Reply {
    let job = load_job(tx.conn, tenant, id)?.ok_or(StoreError::NotFound)?;
    match moves::plan_heartbeat(&job, token, now, expires_at).map_err(refused)? {
        Beat::Cancelled => Ok(Output::Heartbeat(Heartbeat::Cancelled)),
        Beat::Extend(mv) => {
            apply_move(tx, job, *mv)?.finished()?;
            Ok(Output::Heartbeat(Heartbeat::Extended { expires_at }))
        }
    }
}

/// Commits a move of the job it names ([`crate::Store::apply`]).
pub(super) fn apply(tx: &mut Tx<'_>, mv: Move) -> Reply {
    let job = load_job(tx.conn, &mv.tenant, &mv.job_id)?.ok_or(StoreError::NotFound)?;
    Ok(Output::Applied(apply_move(tx, job, mv)?))
}

pub(super) fn load_breaker(conn: &Connection) -> Result<BreakerState, StoreError> {
    let row = conn
        .prepare_cached("SELECT kind, value FROM breaker WHERE id = 1")?
        .query_row([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
        .optional()?;
    match row {
        None => Ok(BreakerState::Closed { failures: 0 }),
        Some((kind, value)) => BreakerState::decode(&kind, value).ok_or_else(|| corrupt("breaker state")),
    }
}

pub(super) fn save_breaker(conn: &Connection, state: BreakerState) -> Result<(), StoreError> {
    let (kind, value) = state.encode();
    conn.prepare_cached(
        "INSERT INTO breaker (id, kind, value) VALUES (1, ?1, ?2)
         ON CONFLICT (id) DO UPDATE SET kind = excluded.kind, value = excluded.value",
    )?
    .execute(params![kind, value])?;
    Ok(())
}
