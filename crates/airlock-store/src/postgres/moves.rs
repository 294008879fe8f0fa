//! The writes that follow a decision: a submit, a dispatch, a finish, a heartbeat, an approval
//! change, each checking in its own transaction that it was decided under the active snapshot
//! ([`guard`]).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use airlock_core::Millis;
use airlock_core::audit::{Draft, Kind};
use airlock_core::ids::{ApprovalId, JobId, TenantId};
use airlock_core::moves::{ApprovalWrite, Beat, Move, plan_approval_change, plan_heartbeat};
use airlock_core::state::JobState;
use airlock_core::throttle::{self, Bucket, Take};
use serde_json::{Value, json};
use tokio_postgres::GenericClient;
use tokio_postgres::types::ToSql;

use super::notifications::WORK_CHANNEL;
use super::pool::{Db, Fail, Tx};
use super::rows::{
    JOB_COLUMNS, big, big_u64, get, job_from_row, load_approval, load_idempotency, load_job, lock_job_under,
};
use super::sealing::append_audit;
use crate::codec::{Applied, Cell, corrupt, gate_json, job_cells, refused};
use crate::{
    ApprovalChange, ApprovalRecord, Budget, Heartbeat, JobRecord, StoreError, Submission, SubmitOutcome,
};

/// Refuses, inside the caller's transaction, a write decided under a snapshot that is no longer
/// active; the publish lock it holds shared keeps a publish out until the commit.
pub(super) async fn guard(
    db: &Db<'_, impl GenericClient + Sync>,
    decided_under: Option<u64>,
) -> Result<(), Fail> {
    let Some(version) = decided_under else { return Ok(()) };
    db.execute("SELECT airlock_decided_under($1)", &[&big_u64(version)]).await?;
    Ok(())
}

/// A column of `jobs` and its new value, written by the UPDATE that moves the job.
pub(super) type Change<'a> = (&'static str, &'a (dyn ToSql + Sync));

/// One statement built from parts: data-modifying CTEs, which PostgreSQL runs together,
/// atomically even outside a transaction, in one round trip and (its text being cached per
/// connection) without parsing it again. Parameters are numbered as they are added.
#[derive(Default)]
pub(super) struct Composed<'a> {
    pub(super) parts: Vec<String>,
    pub(super) params: Vec<&'a (dyn ToSql + Sync)>,
    /// The placeholder of the snapshot version the write was decided under ([`guard`]).
    pub(super) guard: Option<String>,
}

impl<'a> Composed<'a> {
    /// Adds a parameter; its placeholder.
    pub(super) fn param(&mut self, value: &'a (dyn ToSql + Sync)) -> String {
        self.params.push(value);
        format!("${}", self.params.len())
    }

    /// Makes the statement fail, writing nothing, unless `decided_under` is still the active
    /// snapshot at its commit ([`guard`]).
    pub(super) fn guard(&mut self, decided_under: &'a Option<i64>) {
        if decided_under.is_some() {
            self.guard = Some(self.param(decided_under));
        }
    }

    /// Adds a data-modifying statement.
    pub(super) fn with(&mut self, sql: String) {
        self.parts.push(sql);
    }

    /// Inserts an approval request.
    pub(super) fn approval(&mut self, row: &'a ApprovalRow<'a>) {
        let (a, r) = (row.approval, &row.approval.request);
        let values = [
            self.param(&row.keys[0]),
            self.param(&row.keys[1]),
            self.param(&row.keys[2]),
            self.param(&row.keys[3]),
            self.param(&r.job_hash),
            self.param(&r.snapshot_hash),
            self.param(&row.lists[0]),
            self.param(&row.lists[1]),
            self.param(&r.requested_by),
            self.param(&r.created_at),
            self.param(&r.expires_at),
            self.param(&row.quorum),
            self.param(&row.lists[2]),
            self.param(&a.decided_at),
            self.param(&a.decided_by),
        ];
        self.with(format!(
            "INSERT INTO approvals (id, tenant, job_id, status, job_hash, snapshot_hash, rule_ids, rule_hashes,
             requested_by, created_at, expires_at, quorum, approvers, decided_at, decided_by)
             VALUES ({})",
            values.join(", ")
        ));
    }

    /// Queues audit records, in order (one multi-row INSERT keeps their ids in that order);
    /// `encoded` is [`encode`]`(drafts)`.
    pub(super) fn audit(
        &mut self,
        tenant: &'a &'a str,
        drafts: &'a [Draft],
        encoded: &'a [(&'static str, String)],
    ) {
        let rows: Vec<String> = drafts
            .iter()
            .zip(encoded)
            .map(|(d, (kind, data))| {
                let t = self.param(tenant);
                let (at, kind, subject) = (self.param(&d.at), self.param(kind), self.param(&d.subject));
                let (actor, data) = (self.param(&d.actor), self.param(data));
                format!("({t}, {at}, {kind}, {subject}, {actor}, {data})")
            })
            .collect();
        self.with(format!(
            "INSERT INTO audit_pending (tenant, at, kind, subject, actor, data) VALUES {}",
            rows.join(", ")
        ));
    }

    /// The statement, ending with the guard and `SELECT pg_notify(channel)` when they are given.
    pub(super) fn sql(&mut self, notify: Option<&'a &'a str>) -> String {
        let mut selected = Vec::new();
        if let Some(version) = &self.guard {
            selected.push(format!("airlock_decided_under({version})"));
        }
        if let Some(channel) = notify {
            selected.push(format!("pg_notify({}, '')", self.param(channel)));
        }
        let last = if selected.is_empty() {
            "SELECT 1".to_owned()
        } else {
            format!("SELECT {}", selected.join(", "))
        };
        let ctes: Vec<String> =
            self.parts.iter().enumerate().map(|(n, part)| format!("p{n} AS ({part})")).collect();
        if ctes.is_empty() { last } else { format!("WITH {} {last}", ctes.join(", ")) }
    }

    /// Runs it (see [`Composed::sql`]).
    pub(super) async fn run(
        mut self,
        db: &Db<'_, impl GenericClient + Sync>,
        notify: Option<&'a &'a str>,
    ) -> Result<(), Fail> {
        let sql = self.sql(notify);
        db.execute(&sql, &self.params).await?;
        Ok(())
    }

    /// Runs it as the transaction's last statement: when its text is already prepared on this
    /// connection, `COMMIT` goes out right behind it (one round trip for both; were it to fail,
    /// the `COMMIT` of the aborted transaction only rolls back). A statement still to prepare
    /// would go out after its prepare, behind the `COMMIT`, so it is run alone first.
    pub(super) async fn run_last(mut self, tx: &Tx<'_>, notify: Option<&'a &'a str>) -> Result<(), Fail> {
        let sql = self.sql(notify);
        if !tx.alone || !tx.is_prepared(&sql) {
            tx.execute(&sql, &self.params).await?;
            return Ok(());
        }
        tokio::try_join!(tx.execute(&sql, &self.params), tx.simple("COMMIT"))?;
        tx.committed.store(true, Ordering::Relaxed);
        Ok(())
    }
}

/// Each draft's kind name and data text, as [`Composed::audit`] binds them.
pub(super) fn encode(drafts: &[Draft]) -> Vec<(&'static str, String)> {
    drafts.iter().map(|d| (d.kind.as_str(), d.data.to_string())).collect()
}

/// What [`write_job`] writes besides the job's new state: its history step (when `reason` is
/// given), the changed columns and the audit records, in order.
pub(super) struct Step<'a> {
    pub(super) from: JobState,
    pub(super) reason: Option<&'a str>,
    pub(super) actor: &'a str,
    pub(super) changes: &'a [Change<'a>],
    pub(super) drafts: &'a [Draft],
}

/// Writes a moved job (`job` holds its new state and fields) in one statement: its row with
/// the new state and the `changes` (unless the step only audits), its history step, the
/// approval request it opens (with the one it replaces, if given, recorded as stale), its audit
/// records and, when it became queued, the wake-ups.
pub(super) async fn write_job(
    tx: &Tx<'_>,
    job: &JobRecord,
    step: Step<'_>,
    approval: Option<(&ApprovalRow<'_>, Option<&Option<&str>>)>,
    last: bool,
) -> Result<(), Fail> {
    let (tenant, id, from, to) =
        (job.tenant.as_str(), job.id.as_str(), step.from.as_str(), job.state.as_str());
    let data = encode(step.drafts);
    let queued = step.reason.is_some() && job.state == JobState::Queued;
    let mut c = Composed::default();
    if step.reason.is_none() && step.changes.is_empty() {
        // Only audit records (a vote short of the quorum): the job's row stays as it is.
        if step.drafts.is_empty() {
            return Ok(());
        }
        c.audit(&tenant, step.drafts, &data);
        return if last { c.run_last(tx, None).await } else { c.run(tx, None).await };
    }
    let (p_to, p_at, p_id) = (c.param(&to), c.param(&job.updated_at), c.param(&id));
    // A job that moves is no longer held by the claim that dispatched it.
    let mut set = format!("state = {p_to}, updated_at = {p_at}, held_until = 0");
    for (column, value) in step.changes {
        set.push_str(&format!(", {column} = {}", c.param(*value)));
    }
    c.with(format!("UPDATE jobs SET {set} WHERE id = {p_id}"));
    if let Some((row, replaced)) = approval {
        c.approval(row);
        if let Some(old) = replaced {
            let p_old = c.param(old);
            c.with(format!(
                "UPDATE approvals SET status = 'stale', decided_at = {p_at}, decided_by = 'system'
                 WHERE id = {p_old} AND status IN ('pending', 'approved')"
            ));
        }
    }
    if let Some(reason) = &step.reason {
        let (p_from, p_actor, p_reason) = (c.param(&from), c.param(&step.actor), c.param(reason));
        c.with(format!(
            "INSERT INTO job_transitions (job_id, seq, from_state, to_state, at, actor, reason)
             SELECT {p_id}, COALESCE(MAX(seq), 0) + 1, {p_from}, {p_to}, {p_at}, {p_actor}, {p_reason}
             FROM job_transitions WHERE job_id = {p_id}"
        ));
    }
    if !step.drafts.is_empty() {
        c.audit(&tenant, step.drafts, &data);
    }
    if queued {
        let p_tenant = c.param(&tenant);
        c.with(format!(
            "INSERT INTO outbox (tenant, job_id, created_at) VALUES ({p_tenant}, {p_id}, {p_at})"
        ));
    }
    let notify = (queued && tx.notify_work).then_some(&WORK_CHANNEL);
    if last { c.run_last(tx, notify).await } else { c.run(tx, notify).await }
}

/// A column value of a move, as PostgreSQL binds it.
fn cell_param(cell: &Cell) -> &(dyn ToSql + Sync) {
    match cell {
        Cell::Int(n) => n,
        Cell::OptInt(n) => n,
        Cell::OptText(text) => text,
    }
}

/// Commits `mv` in the caller's transaction (as its last statement when `last`): locks and loads the job
/// (the snapshot guard run by the same statement), checks the precondition, takes the budgets (a
/// refusal commits [`Move::throttled`] instead), applies the move to the record and writes it
/// ([`write_job`]) through the one field-to-column mapping ([`job_cells`]).
pub(super) async fn apply_move(tx: &Tx<'_>, mv: &Move, last: bool) -> Result<Applied, Fail> {
    // Waits for the row rather than skipping it: a claim that holds the job must not give it up
    // because another claim's `hold_next` (or a dispatch of a page claim) has it locked for an
    // instant; a job dispatched meanwhile fails the precondition below.
    let job = lock_job_under(tx, &mv.tenant, &mv.job_id, mv.precondition.decided_under).await?;
    apply_loaded(tx, job.ok_or(StoreError::NotFound)?, mv, last).await
}

/// [`apply_move`] to `job`, already locked and loaded by the caller (whose snapshot guard, if
/// the move has one, has run).
async fn apply_loaded(tx: &Tx<'_>, mut job: JobRecord, mv: &Move, last: bool) -> Result<Applied, Fail> {
    if let Err(refusal) = mv.precondition.check(&job) {
        return Ok(Applied::Refused(refusal));
    }
    let throttled_move;
    let (mv, throttled) = match take_budgets(tx, &mv.budgets, mv.at).await? {
        Ok(()) => (mv, None),
        Err(retry_after_ms) => {
            throttled_move = mv.clone().throttled(retry_after_ms);
            (&throttled_move, Some(retry_after_ms))
        }
    };
    let (from, old_approval) = (job.state, job.approval_id.clone());
    let fields = job.apply(mv).map_err(StoreError::from)?;
    let mut cells = Vec::with_capacity(fields.len() + 2);
    for field in fields {
        job_cells(&job, field, &mut cells);
    }
    let changes: Vec<Change<'_>> = cells.iter().map(|(column, cell)| (*column, cell_param(cell))).collect();
    let mut drafts = Vec::with_capacity(2);
    drafts.extend(mv.transition_record(from, job.state));
    drafts.extend(mv.audit.iter().cloned());
    let reason = mv.transition.as_ref().map(|(_, reason)| reason.as_str());
    let step = Step { from, reason, actor: &mv.actor, changes: &changes, drafts: &drafts };
    let old = old_approval.as_ref().map(ApprovalId::as_str);
    let (row, replaces) = match &mv.approval {
        ApprovalWrite::None => (None, false),
        ApprovalWrite::Replace(replacement) => (Some(ApprovalRow::new(replacement)), true),
        ApprovalWrite::Open(request) => (Some(ApprovalRow::new(request)), false),
    };
    let approval = row.as_ref().map(|r| (r, replaces.then_some(&old)));
    write_job(tx, &job, step, approval, last).await?;
    Ok(match throttled {
        Some(retry_after_ms) => Applied::Throttled { retry_after_ms },
        None => Applied::Moved(Box::new(job)),
    })
}

/// An approval request as the values of its row.
pub(super) struct ApprovalRow<'a> {
    pub(super) approval: &'a ApprovalRecord,
    pub(super) keys: [&'a str; 4],
    pub(super) lists: [String; 3],
    pub(super) quorum: i64,
}

impl<'a> ApprovalRow<'a> {
    pub(super) fn new(approval: &'a ApprovalRecord) -> Self {
        let r = &approval.request;
        Self {
            approval,
            keys: [
                approval.id.as_str(),
                approval.tenant.as_str(),
                approval.job_id.as_str(),
                r.status.as_str(),
            ],
            lists: [
                json!(r.rule_ids).to_string(),
                json!(r.rule_hashes).to_string(),
                json!(r.approvers).to_string(),
            ],
            quorum: big(r.quorum),
        }
    }
}

/// Takes every budget or none; `Err(retry_after_ms)` when one refuses. The buckets stay
/// locked, in key order (so two takers never deadlock), until the transaction ends.
pub(super) async fn take_budgets(
    tx: &Tx<'_>,
    budgets: &[Budget],
    at: Millis,
) -> Result<Result<(), u64>, Fail> {
    if budgets.is_empty() {
        return Ok(Ok(()));
    }
    let mut keys: Vec<&str> = budgets.iter().map(|b| b.key.as_str()).collect();
    keys.sort_unstable();
    keys.dedup();
    tx.execute(
        "INSERT INTO throttle_buckets (key, tokens, updated_at) SELECT k, NULL, 0 FROM UNNEST($1::TEXT[]) AS k
         ORDER BY k COLLATE \"C\" ON CONFLICT (key) DO NOTHING",
        &[&keys],
    )
    .await?;
    let rows = tx
        .query(
            "SELECT key, tokens, updated_at FROM throttle_buckets WHERE key = ANY($1) ORDER BY key FOR UPDATE",
            &[&keys],
        )
        .await?;
    let mut current = BTreeMap::new();
    for row in &rows {
        let tokens: Option<f64> = get(row, 1)?;
        let bucket = tokens.map(|tokens| Ok::<_, Fail>(Bucket { tokens, updated_at: get(row, 2)? }));
        current.insert(get::<String>(row, 0)?, bucket.transpose()?);
    }
    let mut taken = Vec::with_capacity(budgets.len());
    let mut retry_after_ms = 0;
    for budget in budgets {
        // A key listed twice reads the stored bucket each time, as in the embedded store.
        let bucket = current.get(&budget.key).cloned().flatten();
        match throttle::take(bucket, &budget.limit, at) {
            Take::Admitted(b) => taken.push((&budget.key, b)),
            Take::Refused { retry_after_ms: ms } => retry_after_ms = retry_after_ms.max(ms),
        }
    }
    if retry_after_ms > 0 {
        return Ok(Err(retry_after_ms));
    }
    for (key, bucket) in taken {
        tx.execute(
            "UPDATE throttle_buckets SET tokens = $2, updated_at = $3 WHERE key = $1",
            &[key, &bucket.tokens, &bucket.updated_at],
        )
        .await?;
    }
    Ok(Ok(()))
}

pub(super) async fn submit(
    tx: &Tx<'_>,
    s: &Submission,
    retained_since: Millis,
) -> Result<SubmitOutcome, Fail> {
    let tenant = s.job.tenant.as_str();
    if let Some((key, _, _)) = &s.idempotency {
        // Submits with the same key wait for each other here, so the re-check below sees the
        // winner's commit; the primary key on (tenant, key) is the backstop.
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended($1 || '|' || $2, 0))",
            &[&tenant, &key.as_str()],
        )
        .await?;
        if let Some(existing) = load_idempotency(tx, tenant, key, retained_since).await? {
            let outcome = if existing.job_hash == s.job.job_hash {
                SubmitOutcome::Replay(existing)
            } else {
                SubmitOutcome::KeyReused(existing)
            };
            return Ok(outcome);
        }
    }
    let at = s.job.created_at;
    if let Err(retry_after_ms) = take_budgets(tx, &s.budgets, at).await? {
        let mut draft = s.audit.clone();
        if let Value::Object(data) = &mut draft.data {
            data.insert("outcome".into(), json!("throttled"));
            data.insert("retry_after_ms".into(), json!(retry_after_ms));
        }
        draft.kind = Kind::GateADecision;
        draft.subject = "-".into();
        guard(tx, s.decided_under).await?;
        append_audit(tx, tenant, draft).await?;
        return Ok(SubmitOutcome::Throttled { retry_after_ms });
    }
    let j = &s.job;
    if let Some((key, status, body)) = &s.idempotency {
        // Overwrites only a key past retention; a live one means a concurrent submit won.
        let claimed = tx
            .execute(
                "INSERT INTO idempotency (tenant, key, job_hash, job_id, status, body, created_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)
                 ON CONFLICT (tenant, key) DO UPDATE SET job_hash = excluded.job_hash, job_id = excluded.job_id,
                 status = excluded.status, body = excluded.body, created_at = excluded.created_at
                 WHERE idempotency.created_at < $8",
                &[&tenant, key, &j.job_hash, &j.id.as_str(), &i32::from(*status), body, &at, &retained_since],
            )
            .await?;
        if claimed == 0 {
            return Err(Fail::KeyRaced);
        }
    }
    insert_job(tx, s).await?;
    Ok(SubmitOutcome::Accepted)
}

/// Writes an accepted submission in one statement: the job, its first history step, its
/// approval request, its audit record and, when queued, its wake-ups. Atomic by itself, so a
/// submit with no idempotency key and no budget to take needs no transaction around it.
pub(super) async fn insert_job(db: &Db<'_, impl GenericClient + Sync>, s: &Submission) -> Result<(), Fail> {
    let j = &s.job;
    let (tenant, id, state) = (j.tenant.as_str(), j.id.as_str(), j.state.as_str());
    let labels = serde_json::to_string(&j.labels).map_err(corrupt)?;
    let (payload, gate_a) = (j.payload.to_string(), gate_json(&j.gate_a));
    let approval_id = j.approval_id.as_ref().map(ApprovalId::as_str);
    let drafts = [s.audit.clone()];
    let data = encode(&drafts);
    let approval = s.approval.as_ref().map(ApprovalRow::new);
    let decided_under = s.decided_under.map(big_u64);
    let mut c = Composed::default();
    c.guard(&decided_under);
    let (p_id, p_tenant, p_state, p_at) =
        (c.param(&id), c.param(&tenant), c.param(&state), c.param(&j.created_at));
    let (principal, topic, env) = (c.param(&j.principal), c.param(&j.topic), c.param(&j.env));
    let (labels, payload, plan_hash) = (c.param(&labels), c.param(&payload), c.param(&j.plan_hash));
    let (key, hash, gate) = (c.param(&j.idempotency_key), c.param(&j.job_hash), c.param(&gate_a));
    let (approval_p, updated_at) = (c.param(&approval_id), c.param(&j.updated_at));
    c.with(format!(
        "INSERT INTO jobs (id, tenant, principal, topic, env, labels, payload, plan_hash, idempotency_key,
         job_hash, state, gate_a, approval_id, created_at, updated_at)
         VALUES ({p_id}, {p_tenant}, {principal}, {topic}, {env}, {labels}, {payload}, {plan_hash}, {key},
         {hash}, {p_state}, {gate}, {approval_p}, {p_at}, {updated_at})"
    ));
    c.with(format!(
        "INSERT INTO job_transitions (job_id, seq, from_state, to_state, at, actor, reason)
         VALUES ({p_id}, 1, NULL, {p_state}, {p_at}, {principal}, 'submitted')"
    ));
    if let Some(row) = &approval {
        c.approval(row);
    }
    c.audit(&tenant, &drafts, &data);
    let queued = j.state == JobState::Queued;
    if queued {
        c.with(format!(
            "INSERT INTO outbox (tenant, job_id, created_at) VALUES ({p_tenant}, {p_id}, {p_at})"
        ));
    }
    c.run(db, (queued && db.notify_work).then_some(&WORK_CHANNEL)).await
}

pub(super) async fn change_approval(tx: &Tx<'_>, c: &ApprovalChange) -> Result<ApprovalRecord, Fail> {
    let current = load_approval(tx, &c.tenant, &c.id, true).await?.ok_or(StoreError::NotFound)?;
    let plan = plan_approval_change(&current, c.clone()).map_err(refused)?;
    let a = &plan.approval;
    tx.execute(
        "UPDATE approvals SET status = $1, approvers = $2, decided_at = $3, decided_by = $4 WHERE id = $5",
        &[
            &a.request.status.as_str(),
            &json!(a.request.approvers).to_string(),
            &a.decided_at,
            &a.decided_by,
            &a.id.as_str(),
        ],
    )
    .await?;
    // The job is locked by the move, after the request: the order every approval change takes.
    if let Applied::Refused(refusal) = apply_move(tx, &plan.job, true).await? {
        return Err(refused(refusal).into());
    }
    Ok(plan.approval)
}

/// Holds the next dispatchable job of `tenant` until `until` for the claim that asked, from
/// `from` on when given. The classic queue pattern: rows another claim is holding (locked by
/// this statement or dispatching) are skipped, not waited for; `held_until` is not indexed, so
/// the hold is usually a HOT update.
pub(super) async fn hold_next(
    tx: &Tx<'_>,
    tenant: &TenantId,
    now: Millis,
    until: Millis,
    from: Option<&Floor>,
) -> Result<Option<JobRecord>, Fail> {
    let floor = if from.is_some() { "AND (not_before, id) >= ($4, $5)" } else { "" };
    let sql = format!(
        "UPDATE jobs SET held_until = $3 WHERE id = (
             SELECT id FROM jobs WHERE tenant = $1 AND state = 'queued' AND not_before <= $2
             AND held_until <= $2 {floor} ORDER BY not_before, id LIMIT 1 FOR UPDATE SKIP LOCKED)
         RETURNING {JOB_COLUMNS}"
    );
    let row = match from {
        Some(f) => tx.query_opt(&sql, &[&tenant.as_str(), &now, &until, &f.not_before, &f.id]).await?,
        None => tx.query_opt(&sql, &[&tenant.as_str(), &now, &until]).await?,
    };
    row.as_ref().map(job_from_row).transpose()
}

/// Where a tenant's claims of this store start looking for the next job: the last job a claim
/// held after looking from the queue's start, for [`FLOOR_TTL`]. Jobs that leave the queue
/// leave their entries in the queued-jobs index until a vacuum removes them, and they all sort
/// before the live ones, so a look from the start reads every page of them: at 1,000 jobs/s
/// with autovacuum off, over a hundred pages per claim after 20 s. What sorts before the floor
/// and was not taken then was held by another claim or locked; if it comes free (a hold
/// lapses), or a job becomes queued with an earlier `not_before` (an approval), a look from the
/// start finds it when the floor has expired or a look from it found nothing.
#[derive(Clone)]
pub(super) struct Floor {
    pub(super) set: std::time::Instant,
    pub(super) not_before: Millis,
    pub(super) id: String,
}

/// How long a [`Floor`] is used.
pub(super) const FLOOR_TTL: Duration = Duration::from_secs(1);

impl Floor {
    pub(super) fn at(job: &JobRecord) -> Self {
        Self {
            set: std::time::Instant::now(),
            not_before: job.dispatch.not_before,
            id: job.id.as_str().to_owned(),
        }
    }

    pub(super) fn fresh(&self) -> bool {
        self.set.elapsed() < FLOOR_TTL
    }
}

/// A worker's heartbeat, planned by the core against the job as this transaction locked it.
pub(super) async fn heartbeat(
    tx: &Tx<'_>,
    tenant: &TenantId,
    id: &JobId,
    token: &str,
    now: Millis,
    expires_at: Millis,
) -> Result<Heartbeat, Fail> {
    let job = load_job(tx, tenant, id, true).await?.ok_or(StoreError::NotFound)?;
    match plan_heartbeat(&job, token, now, expires_at).map_err(refused)? {
        Beat::Cancelled => Ok(Heartbeat::Cancelled),
        Beat::Extend(mv) => {
            apply_loaded(tx, job, &mv, true).await?.finished()?;
            Ok(Heartbeat::Extended { expires_at })
        }
    }
}
