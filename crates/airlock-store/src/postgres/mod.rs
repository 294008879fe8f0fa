//! The distributed store: PostgreSQL, shared by any number of gateway and scheduler replicas.
//! Every write is one transaction at READ COMMITTED that takes explicit row locks on what it
//! decides from (the job row, the approval row, the throttle buckets), so replicas keep the same
//! invariants the embedded store's single writer keeps; a deadlock or serialization failure is
//! retried a few times. Audit records are written by the same transaction but chained after
//! commit, in batches, by a sealer ([`seal`]): a per-tenant chain head locked by every write
//! would serialize every replica. Connections are plain TCP without
//! TLS: run it on loopback or a private network only.

mod admin;
mod group;
mod migrations;
mod moves;
mod notifications;
mod pool;
mod rows;
mod sealing;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use airlock_core::Millis;
use airlock_core::approval::Status;
use airlock_core::audit::{Draft, Record};
use airlock_core::breaker::{Admission, Breaker, BreakerConfig, BreakerState};
use airlock_core::ids::{ApprovalId, JobId, KeyId, TenantId};
use airlock_core::state::JobState;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_postgres::types::ToSql;
use tokio_postgres::{IsolationLevel, Row};

use crate::codec::corrupt;
use crate::{
    Applied, ApprovalChange, ApprovalRecord, ApprovalSummary, AuditPage, Heartbeat, IdempotencyRecord,
    JobFilter, JobRecord, KeyRecord, Move, SnapshotRecord, Store, StoreError, StoreEvent, Submission,
    SubmitOutcome, TenantOverview, Transition,
};
use admin::{breaker_admit, breaker_report, create_key, publish, rehash_key, revoke_key};
use group::{Grouped, Write, Written, group_commit, mismatch};
use moves::{Floor, change_approval, guard, heartbeat, submit};
use notifications::listen;
use pool::{CONNECT_TIMEOUT, Fail, POOL_MAX, Pool, Pooled, TX_ATTEMPTS, write_tx};
use rows::{
    APPROVAL_COLUMNS, JOB_COLUMNS, KEY_COLUMNS, SNAPSHOT_SELECT, approval_from_row, big, big_u64, get,
    get_u32, get_u64, job_from_row, key_from_row, load_approval, load_idempotency, load_job, parsed,
    parsed_opt, record_from_row, snapshot_from_row,
};
use sealing::{append_audit, seal_all, seal_loop};

/// How long a relay has the outbox rows it took to itself before another may take them.
const OUTBOX_TAKE_MS: i64 = 5_000;

/// The PostgreSQL store.
pub struct PgStore {
    pool: Arc<Pool>,
    events: tokio::sync::broadcast::Sender<StoreEvent>,
    /// The writes waiting to be committed in a group ([`group_commit`]).
    group: mpsc::UnboundedSender<Grouped>,
    /// Where each tenant's claims start looking ([`Floor`]).
    floors: Mutex<HashMap<TenantId, Floor>>,
    /// The sealer, the notification listener and the group committer, stopped with the store.
    background: Vec<tokio::task::AbortHandle>,
}

impl Drop for PgStore {
    fn drop(&mut self) {
        for task in &self.background {
            task.abort();
        }
    }
}

impl PgStore {
    /// Connects to the database at `url` (a `postgres://` URL or key-value string) and applies
    /// the migrations it lacks, under an advisory lock so replicas may start together.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let (mut config, tls) = crate::pg_tls::configure(url).map_err(StoreError::Unavailable)?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        let pool = Arc::new(Pool {
            config,
            tls,
            idle: Mutex::new(Vec::new()),
            permits: Semaphore::new(POOL_MAX),
            notify_work: AtomicBool::new(true),
        });
        pool.migrate().await?;
        let (events, _) = tokio::sync::broadcast::channel(64);
        let (group, grouped) = mpsc::unbounded_channel();
        let background = vec![
            tokio::spawn(seal_loop(pool.config.clone(), pool.tls.clone())).abort_handle(),
            tokio::spawn(listen(pool.config.clone(), pool.tls.clone(), events.clone())).abort_handle(),
            tokio::spawn(group_commit(Arc::clone(&pool), grouped)).abort_handle(),
        ];
        Ok(Self { pool, events, group, floors: Mutex::new(HashMap::new()), background })
    }

    /// The job bus wakes other processes when a job becomes queued (through the outbox), so
    /// this store stops announcing it with `NOTIFY` too: every `NOTIFY` serializes its commit
    /// on the server's notification queue and signals every listening connection.
    #[must_use]
    pub fn bus_wakes(self) -> Self {
        self.pool.notify_work.store(false, Ordering::Relaxed);
        self
    }

    async fn checkout(&self) -> Result<Pooled<'_>, Fail> {
        self.pool.checkout().await
    }

    /// Runs `write` in the next group commit ([`group_commit`]).
    async fn grouped(&self, write: Write) -> Result<Written, StoreError> {
        let stopped = || StoreError::Unavailable("the group committer stopped".into());
        let (reply, written) = oneshot::channel();
        self.group.send((write, reply)).map_err(|_| stopped())?;
        written.await.map_err(|_| stopped())?
    }

    /// The first sealed audit sequence number of `tenant` stamped at or after `since`, by binary
    /// search over the chain (records are sealed in time order, within
    /// [`crate::AUDIT_ORDER_SLACK_MS`]): counting a recent window then reads only that window.
    async fn first_seq_since(&self, tenant: &str, since: Millis) -> Result<i64, StoreError> {
        let max = self
            .read("SELECT COALESCE(MAX(seq), 0) FROM audit WHERE tenant = $1", &[&tenant], |r| {
                get::<i64>(r, 0)
            })
            .await?;
        let (mut lo, mut hi) = (0, max.first().copied().unwrap_or(0) + 1);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let found = self
                .read(
                    "SELECT seq, at FROM audit WHERE tenant = $1 AND seq >= $2 ORDER BY seq LIMIT 1",
                    &[&tenant, &mid],
                    |r| Ok((get::<i64>(r, 0)?, get::<i64>(r, 1)?)),
                )
                .await?;
            match found.first() {
                Some(&(seq, at)) if at < since => lo = seq + 1,
                _ => hi = mid,
            }
        }
        Ok(lo)
    }

    async fn read<T>(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        map: impl Fn(&Row) -> Result<T, Fail>,
    ) -> Result<Vec<T>, StoreError> {
        let mut pooled = self.checkout().await?;
        let rows = pooled.db()?.query(sql, params).await?;
        Ok(rows.iter().map(map).collect::<Result<_, _>>()?)
    }
}

#[async_trait::async_trait]
impl Store for PgStore {
    async fn create_key(&self, key: KeyRecord, audit: Draft) -> Result<(), StoreError> {
        Ok(write_tx!(self, |tx| create_key(&tx, &key, &audit)).await?)
    }

    async fn key(&self, id: &KeyId) -> Result<Option<KeyRecord>, StoreError> {
        let sql = format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE id = $1");
        Ok(self.read(&sql, &[&id.as_str()], key_from_row).await?.pop())
    }

    async fn key_by_secret(&self, secret_hash: &[u8; 32]) -> Result<Option<KeyRecord>, StoreError> {
        let sql = format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE secret_hash = $1");
        Ok(self.read(&sql, &[&secret_hash.as_slice()], key_from_row).await?.pop())
    }

    async fn keys(&self, tenant: Option<&TenantId>) -> Result<Vec<KeyRecord>, StoreError> {
        let sql =
            format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE ($1::TEXT IS NULL OR tenant = $1) ORDER BY id");
        self.read(&sql, &[&tenant.map(TenantId::as_str)], key_from_row).await
    }

    async fn rehash_key(&self, id: &KeyId, from: &[u8; 32], to: &[u8; 32]) -> Result<(), StoreError> {
        let (from, to) = (from.as_slice(), to.as_slice());
        Ok(write_tx!(self, |tx| rehash_key(&tx, id.as_str(), from, to)).await?)
    }

    async fn revoke_key(&self, id: &KeyId, at: Millis, audit: Draft) -> Result<KeyRecord, StoreError> {
        Ok(write_tx!(self, |tx| revoke_key(&tx, id.as_str(), at, &audit)).await?)
    }

    async fn publish(
        &self,
        hash: &str,
        source: &str,
        note: Option<&str>,
        at: Millis,
        actor: &str,
    ) -> Result<SnapshotRecord, StoreError> {
        Ok(write_tx!(self, |tx| publish(&tx, hash, source, note, at, actor)).await?)
    }

    async fn active_snapshot(&self) -> Result<Option<SnapshotRecord>, StoreError> {
        let sql = format!("{SNAPSHOT_SELECT} WHERE a.version IS NOT NULL");
        Ok(self.read(&sql, &[], snapshot_from_row).await?.pop())
    }

    async fn snapshots(&self) -> Result<Vec<SnapshotRecord>, StoreError> {
        self.read(&format!("{SNAPSHOT_SELECT} ORDER BY s.version DESC"), &[], snapshot_from_row).await
    }

    async fn snapshot(&self, version: u64) -> Result<Option<SnapshotRecord>, StoreError> {
        let version = i64::try_from(version).map_err(|_| StoreError::NotFound)?;
        let sql = format!("{SNAPSHOT_SELECT} WHERE s.version = $1");
        Ok(self.read(&sql, &[&version], snapshot_from_row).await?.pop())
    }

    async fn idempotency(
        &self,
        tenant: &TenantId,
        key: &str,
        retained_since: Millis,
    ) -> Result<Option<IdempotencyRecord>, StoreError> {
        let mut pooled = self.checkout().await?;
        Ok(load_idempotency(&pooled.db()?, tenant.as_str(), key, retained_since).await?)
    }

    async fn submit(
        &self,
        submission: Submission,
        retained_since: Millis,
    ) -> Result<SubmitOutcome, StoreError> {
        if submission.idempotency.is_none() && submission.budgets.is_empty() {
            // Nothing to decide from: one statement, committed with other writes in a group.
            let Written::Inserted = self.grouped(Write::Insert(Box::new(submission))).await? else {
                return Err(mismatch());
            };
            return Ok(SubmitOutcome::Accepted);
        }
        match write_tx!(self, |tx| submit(&tx, &submission, retained_since)).await {
            Err(Fail::KeyRaced) => {
                let (tenant, key) = (&submission.job.tenant, submission.idempotency.as_ref().map(|i| &i.0));
                let existing = match key {
                    Some(key) => self.idempotency(tenant, key, retained_since).await?,
                    None => None,
                };
                match existing {
                    Some(e) if e.job_hash == submission.job.job_hash => Ok(SubmitOutcome::Replay(e)),
                    Some(e) => Ok(SubmitOutcome::KeyReused(e)),
                    None => Err(Fail::KeyRaced.into()),
                }
            }
            other => Ok(other?),
        }
    }

    async fn append_audit(
        &self,
        tenant: &TenantId,
        draft: Draft,
        decided_under: Option<u64>,
    ) -> Result<(), StoreError> {
        write_tx!(self, |tx| async {
            guard(&tx, decided_under).await?;
            append_audit(&tx, tenant.as_str(), draft.clone()).await
        })
        .await?;
        Ok(())
    }

    async fn job(&self, tenant: &TenantId, id: &JobId) -> Result<Option<JobRecord>, StoreError> {
        let mut pooled = self.checkout().await?;
        Ok(load_job(&pooled.db()?, tenant, id, false).await?)
    }

    async fn jobs(&self, tenant: &TenantId, filter: &JobFilter) -> Result<Vec<JobRecord>, StoreError> {
        let sql = format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE tenant = $1
             AND ($2::TEXT IS NULL OR state = $2) AND ($3::TEXT IS NULL OR topic = $3)
             AND ($4::TEXT IS NULL OR env = $4) AND ($5::TEXT IS NULL OR id > $5)
             AND ($6::BIGINT IS NULL OR created_at >= $6) AND ($7::BIGINT IS NULL OR created_at < $7)
             ORDER BY id LIMIT $8"
        );
        self.read(
            &sql,
            &[
                &tenant.as_str(),
                &filter.state.map(JobState::as_str),
                &filter.topic,
                &filter.env,
                &filter.after.as_ref().map(JobId::as_str),
                &filter.since,
                &filter.until,
                &big(filter.limit),
            ],
            job_from_row,
        )
        .await
    }

    async fn history(&self, tenant: &TenantId, id: &JobId) -> Result<Vec<Transition>, StoreError> {
        self.read(
            "SELECT t.seq, t.from_state, t.to_state, t.at, t.actor, t.reason FROM job_transitions t
             JOIN jobs j ON j.id = t.job_id WHERE t.job_id = $1 AND j.tenant = $2 ORDER BY t.seq",
            &[&id.as_str(), &tenant.as_str()],
            |row| {
                Ok(Transition {
                    seq: get_u32(row, 0)?,
                    from: parsed_opt(row, 1)?,
                    to: parsed(row, 2)?,
                    at: get(row, 3)?,
                    actor: get(row, 4)?,
                    reason: get(row, 5)?,
                })
            },
        )
        .await
    }

    async fn idempotency_report(&self, tenant: &TenantId) -> Result<Vec<(String, u64, u64)>, StoreError> {
        let tenant = tenant.as_str();
        Ok(self
            .read(
                "SELECT topic, COUNT(*), COUNT(*) FILTER (WHERE idempotency_key IS NULL) FROM jobs
                 WHERE tenant = $1 GROUP BY topic ORDER BY topic COLLATE \"C\"",
                &[&tenant],
                |row| Ok((get::<String>(row, 0)?, get_u64(row, 1)?, get_u64(row, 2)?)),
            )
            .await?)
    }

    async fn job_counts(&self) -> Result<BTreeMap<JobState, u64>, StoreError> {
        let rows = self
            .read("SELECT state, COUNT(*) FROM jobs GROUP BY state", &[], |row| {
                Ok((parsed::<JobState>(row, 0)?, get_u64(row, 1)?))
            })
            .await?;
        Ok(rows.into_iter().collect())
    }

    async fn overview(&self, tenant: &TenantId, since: Millis) -> Result<TenantOverview, StoreError> {
        let t = tenant.as_str();
        let jobs = self
            .read("SELECT state, COUNT(*) FROM jobs WHERE tenant = $1 GROUP BY state", &[&t], |row| {
                Ok((parsed::<JobState>(row, 0)?, get_u64(row, 1)?))
            })
            .await?;
        let pending = self
            .read(
                "SELECT COUNT(*), MIN(created_at) FROM approvals WHERE tenant = $1 AND status = 'pending'",
                &[&t],
                |r| Ok((get_u64(r, 0)?, get::<Option<i64>>(r, 1)?)),
            )
            .await?;
        let (pending_approvals, oldest_pending_at) = pending.into_iter().next().unwrap_or((0, None));
        let dlq = self
            .read(
                "SELECT COUNT(*) FROM jobs WHERE tenant = $1 AND state = 'dead_lettered' AND discarded_at IS NULL",
                &[&t],
                |r| get_u64(r, 0),
            )
            .await?;
        let [gate_a, gate_b] = crate::FAIL_OPEN_MARKS;
        let from = self.first_seq_since(t, since - crate::AUDIT_ORDER_SLACK_MS).await?;
        let counts = self
            .read(
                // Records not yet sealed into the chain count too (one statement: one snapshot,
                // so a record the sealer moves meanwhile is seen once).
                "SELECT COUNT(*) FILTER (WHERE data LIKE $3), COUNT(*) FILTER (WHERE data LIKE $4)
                 FROM (SELECT data FROM audit WHERE tenant = $1 AND seq >= $5 AND at >= $2
                       UNION ALL SELECT data FROM audit_pending WHERE tenant = $1 AND at >= $2) recent",
                &[&t, &since, &gate_a, &gate_b, &from],
                |r| Ok([get_u64(r, 0)?, get_u64(r, 1)?]),
            )
            .await?;
        let fail_open = counts.into_iter().next().unwrap_or([0, 0]);
        Ok(TenantOverview {
            jobs: jobs.into_iter().collect(),
            pending_approvals,
            oldest_pending_at,
            dlq_depth: dlq.into_iter().sum(),
            fail_open_gate_a: fail_open[0],
            fail_open_gate_b: fail_open[1],
        })
    }

    async fn approval(
        &self,
        tenant: &TenantId,
        id: &ApprovalId,
    ) -> Result<Option<ApprovalRecord>, StoreError> {
        let mut pooled = self.checkout().await?;
        Ok(load_approval(&pooled.db()?, tenant, id, false).await?)
    }

    async fn approvals(
        &self,
        tenant: &TenantId,
        status: Option<Status>,
        after: Option<&ApprovalId>,
        limit: u32,
    ) -> Result<Vec<ApprovalRecord>, StoreError> {
        let sql = format!(
            "SELECT {APPROVAL_COLUMNS} FROM approvals WHERE tenant = $1 AND ($2::TEXT IS NULL OR status = $2)
             AND ($3::TEXT IS NULL OR id > $3) ORDER BY id LIMIT $4"
        );
        let params: [&(dyn ToSql + Sync); 4] =
            [&tenant.as_str(), &status.map(Status::as_str), &after.map(ApprovalId::as_str), &big(limit)];
        self.read(&sql, &params, approval_from_row).await
    }

    async fn approval_summary(&self, tenant: &TenantId) -> Result<ApprovalSummary, StoreError> {
        let t = tenant.as_str();
        let rows = self
            .read(
                "SELECT COUNT(*), MIN(created_at), MAX(id), COALESCE(SUM(json_array_length(approvers::json)), 0)::BIGINT
                 FROM approvals WHERE tenant = $1 AND status = 'pending'",
                &[&t],
                |r| {
                    Ok(ApprovalSummary {
                        pending: get_u64(r, 0)?,
                        oldest_created_at: get::<Option<i64>>(r, 1)?,
                        newest_id: parsed_opt::<ApprovalId>(r, 2)?,
                        votes: get_u64(r, 3)?,
                    })
                },
            )
            .await?;
        Ok(rows.into_iter().next().unwrap_or_default())
    }

    async fn pending_approvals(&self) -> Result<u64, StoreError> {
        let counts = self
            .read("SELECT COUNT(*) FROM approvals WHERE status = 'pending'", &[], |r| get_u64(r, 0))
            .await?;
        Ok(counts.into_iter().sum())
    }

    async fn expired_approvals(&self, now: Millis, limit: u32) -> Result<Vec<ApprovalRecord>, StoreError> {
        let sql = format!(
            "SELECT {APPROVAL_COLUMNS} FROM approvals WHERE status = 'pending' AND expires_at <= $1
             ORDER BY expires_at LIMIT $2"
        );
        self.read(&sql, &[&now, &big(limit)], approval_from_row).await
    }

    async fn change_approval(&self, change: ApprovalChange) -> Result<ApprovalRecord, StoreError> {
        Ok(write_tx!(self, |tx| change_approval(&tx, &change)).await?)
    }

    async fn hold_next(
        &self,
        tenant: &TenantId,
        now: Millis,
        hold_ms: u64,
    ) -> Result<Option<JobRecord>, StoreError> {
        let until = now.saturating_add(i64::try_from(hold_ms).unwrap_or(i64::MAX));
        let hold = |from| async move {
            let Written::Held(job) =
                self.grouped(Write::Hold { tenant: tenant.clone(), now, until, from }).await?
            else {
                return Err(mismatch());
            };
            Ok::<_, StoreError>(job)
        };
        let floor =
            self.floors.lock().ok().and_then(|floors| floors.get(tenant).filter(|f| f.fresh()).cloned());
        if let Some(floor) = floor
            && let Some(job) = hold(Some(floor)).await?
        {
            return Ok(Some(job));
        }
        let job = hold(None).await?;
        if let Ok(mut floors) = self.floors.lock() {
            match &job {
                Some(job) => floors.insert(tenant.clone(), Floor::at(job)),
                None => floors.remove(tenant),
            };
        }
        Ok(job)
    }

    async fn dispatchable(
        &self,
        tenant: &TenantId,
        now: Millis,
        offset: u32,
        limit: u32,
    ) -> Result<Vec<JobRecord>, StoreError> {
        let sql = format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE tenant = $1 AND state = 'queued' AND not_before <= $2
             ORDER BY not_before, id LIMIT $3 OFFSET $4"
        );
        self.read(&sql, &[&tenant.as_str(), &now, &big(limit), &big(offset)], job_from_row).await
    }

    async fn next_due(&self, tenant: &TenantId, now: Millis) -> Result<Option<Millis>, StoreError> {
        let due = self
            .read(
                "SELECT not_before FROM jobs WHERE tenant = $1 AND state = 'queued' AND not_before > $2
                 ORDER BY not_before LIMIT 1",
                &[&tenant.as_str(), &now],
                |r| get::<i64>(r, 0),
            )
            .await?;
        Ok(due.into_iter().next())
    }

    async fn apply(&self, mv: Move) -> Result<Applied, StoreError> {
        let Written::Moved(applied) = self.grouped(Write::Move(Box::new(mv))).await? else {
            return Err(mismatch());
        };
        Ok(applied)
    }

    async fn heartbeat(
        &self,
        tenant: &TenantId,
        id: &JobId,
        token: &str,
        now: Millis,
        expires_at: Millis,
    ) -> Result<Heartbeat, StoreError> {
        Ok(write_tx!(self, |tx| heartbeat(&tx, tenant, id, token, now, expires_at)).await?)
    }

    async fn lapsed_leases(&self, now: Millis, limit: u32) -> Result<Vec<JobRecord>, StoreError> {
        let sql = format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE state = 'leased' AND lease_expires_at < $1
             ORDER BY lease_expires_at LIMIT $2"
        );
        self.read(&sql, &[&now, &big(limit)], job_from_row).await
    }

    async fn dead_letters(
        &self,
        tenant: &TenantId,
        topic: Option<&str>,
        after: Option<&JobId>,
        limit: u32,
    ) -> Result<Vec<JobRecord>, StoreError> {
        let sql = format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE tenant = $1 AND state = 'dead_lettered' AND discarded_at IS NULL
             AND ($2::TEXT IS NULL OR topic = $2) AND ($3::TEXT IS NULL OR id > $3) ORDER BY id LIMIT $4"
        );
        let params: [&(dyn ToSql + Sync); 4] =
            [&tenant.as_str(), &topic, &after.map(JobId::as_str), &big(limit)];
        self.read(&sql, &params, job_from_row).await
    }

    async fn dlq_depth(&self) -> Result<u64, StoreError> {
        let counts = self
            .read(
                "SELECT COUNT(*) FROM jobs WHERE state = 'dead_lettered' AND discarded_at IS NULL",
                &[],
                |r| get_u64(r, 0),
            )
            .await?;
        Ok(counts.into_iter().sum())
    }

    fn events(&self) -> Option<tokio::sync::broadcast::Receiver<StoreEvent>> {
        Some(self.events.subscribe())
    }

    async fn outbox_take(&self, limit: u32) -> Result<Vec<(i64, String, String)>, StoreError> {
        let mut rows = self
            .read(
                "UPDATE outbox SET taken_until = (EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT + $2
                 WHERE id IN (SELECT id FROM outbox
                              WHERE taken_until <= (EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT
                              ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED)
                 RETURNING id, tenant, job_id",
                &[&i64::from(limit), &OUTBOX_TAKE_MS],
                |r| Ok((get::<i64>(r, 0)?, get::<String>(r, 1)?, get::<String>(r, 2)?)),
            )
            .await?;
        rows.sort_unstable_by_key(|r| r.0);
        Ok(rows)
    }

    async fn outbox_done(&self, ids: &[i64]) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        let ids = ids.to_vec();
        write_tx!(self, |tx| async {
            tx.execute("DELETE FROM outbox WHERE id = ANY($1)", &[&ids]).await?;
            Ok::<_, Fail>(())
        })
        .await?;
        Ok(())
    }

    async fn outbox_prune(&self, before: Millis) -> Result<u64, StoreError> {
        let pruned = write_tx!(self, |tx| async {
            tx.execute("DELETE FROM outbox WHERE created_at < $1", &[&before]).await
        })
        .await?;
        Ok(pruned)
    }

    async fn breaker_admit(&self, config: BreakerConfig, now: Millis) -> Result<Admission, StoreError> {
        // The healthy case, a closed breaker, admits without a write: every claim asks, and a
        // locked update of the one shared row per call would serialize every replica.
        if matches!(self.breaker_state(now).await?, BreakerState::Closed { .. }) {
            return Ok(Admission::Call);
        }
        Ok(write_tx!(self, |tx| breaker_admit(&tx, config, now)).await?)
    }

    async fn breaker_report(
        &self,
        config: BreakerConfig,
        now: Millis,
        success: bool,
    ) -> Result<BreakerState, StoreError> {
        // A success on a closed breaker with no failures counted changes nothing.
        if success {
            let state = self.breaker_state(now).await?;
            if state == (BreakerState::Closed { failures: 0 }) {
                return Ok(state);
            }
        }
        Ok(write_tx!(self, |tx| breaker_report(&tx, config, now, success)).await?)
    }

    async fn breaker_state(&self, now: Millis) -> Result<BreakerState, StoreError> {
        let rows = self
            .read("SELECT kind, value FROM breaker WHERE id = 1", &[], |r| {
                let (kind, value): (String, i64) = (get(r, 0)?, get(r, 1)?);
                Ok(BreakerState::decode(&kind, value).ok_or_else(|| corrupt("breaker state"))?)
            })
            .await?;
        let stored = rows.into_iter().next().unwrap_or(BreakerState::Closed { failures: 0 });
        Ok(Breaker::restore(BreakerConfig::default(), stored).state(now))
    }

    async fn audit(&self, tenant: &TenantId, after_seq: u64, limit: u32) -> Result<AuditPage, StoreError> {
        let mut pooled = self.checkout().await?;
        // Whatever was committed before this read is in the chain before it is read.
        seal_all(pooled.client()?).await?;
        // One snapshot for the page and the head, so the head is never ahead of what a full
        // read of the records would show.
        let tx = pooled
            .client()?
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(Fail::from)?;
        let tenant_ = tenant.as_str();
        let rows = tx
            .query(
                "SELECT seq, at, kind, subject, actor, data, prev_hash, hash FROM audit
                 WHERE tenant = $1 AND seq > $2 ORDER BY seq LIMIT $3",
                &[&tenant_, &big_u64(after_seq), &big(limit)],
            )
            .await
            .map_err(Fail::from)?;
        let records =
            rows.iter().map(|row| record_from_row(tenant_, row)).collect::<Result<Vec<_>, Fail>>()?;
        let head = tx
            .query_opt("SELECT seq, hash FROM audit_heads WHERE tenant = $1 AND seq > 0", &[&tenant_])
            .await
            .map_err(Fail::from)?
            .map(|r| Ok::<_, Fail>((get_u64(&r, 0)?, get(&r, 1)?)))
            .transpose()?;
        tx.commit().await.map_err(Fail::from)?;
        Ok(AuditPage { records, head })
    }

    async fn job_audit(&self, tenant: &TenantId, id: &JobId, limit: u32) -> Result<Vec<Record>, StoreError> {
        let mut pooled = self.checkout().await?;
        // Whatever was committed before this read is in the chain before it is read.
        seal_all(pooled.client()?).await?;
        let db = pooled.db()?;
        let rows = db
            .query(
                "SELECT seq, at, kind, subject, actor, data, prev_hash, hash FROM audit
                 WHERE tenant = $1 AND (subject = $2 OR subject IN
                     (SELECT id FROM approvals WHERE tenant = $1 AND job_id = $2))
                 ORDER BY seq LIMIT $3",
                &[&tenant.as_str(), &id.as_str(), &big(limit)],
            )
            .await?;
        Ok(rows.iter().map(|row| record_from_row(tenant.as_str(), row)).collect::<Result<Vec<_>, Fail>>()?)
    }

    async fn audit_tenants(&self) -> Result<Vec<TenantId>, StoreError> {
        seal_all(self.checkout().await?.client()?).await?;
        self.read("SELECT tenant FROM audit_heads WHERE seq > 0 ORDER BY tenant", &[], |row| parsed(row, 0))
            .await
    }
}
