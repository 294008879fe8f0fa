//! The embedded store: one SQLite file in WAL mode with `synchronous = FULL`, so that a
//! response is only sent after its commit is on disk. All writes go through one writer
//! thread that groups the commands waiting for it into a single transaction (group commit,
//! one fsync for many submits), each command inside its own savepoint so that one failure
//! does not undo its neighbours. Reads use a small pool of read-only connections.

mod migrations;
mod moves;
mod readers;
mod rows;
mod writer;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex, mpsc};

use airlock_core::Millis;
use airlock_core::approval::Status;
use airlock_core::audit::{Draft, Kind, Record};
use airlock_core::breaker::{Admission, Breaker, BreakerConfig, BreakerState};
use airlock_core::ids::{ApprovalId, JobId, KeyId, TenantId};
use airlock_core::state::JobState;
use rusqlite::{Connection, OptionalExtension, params};
use serde_json::json;
use tokio::sync::oneshot;

use crate::codec::corrupt;
use crate::{
    Applied, ApprovalChange, ApprovalRecord, ApprovalSummary, AuditPage, Heartbeat, IdempotencyRecord,
    JobFilter, JobRecord, KeyRecord, Move, SnapshotRecord, Store, StoreError, Submission, SubmitOutcome,
    TenantOverview, Transition,
};
use migrations::migrate;
use moves::{apply, change_approval, check_decided_under, heartbeat, load_breaker, save_breaker, submit};
use readers::{CACHE_KIB, Readers};
use rows::{
    APPROVAL_COLUMNS, AUDIT_COLUMNS, JOB_COLUMNS, KEY_COLUMNS, SNAPSHOT_SELECT, approval_from_row, collect,
    job_from_row, key_from_row, load_approval, load_idempotency, load_job, load_key, record_from_row,
    snapshot_from_row,
};
use writer::{Command, Op, Output, Reply, Writer};

/// The file name inside the data directory.
pub const DATABASE_FILE: &str = "airlock.db";

/// The embedded store.
pub struct SqliteStore {
    writer: Mutex<mpsc::Sender<Command>>,
    readers: Arc<Readers>,
    /// Claim holds, until when: one process owns the file, so they need not be stored.
    holds: Mutex<HashMap<JobId, Millis>>,
}

/// Dispatchable jobs read per look for one that no claim holds.
const HOLD_PAGE: u32 = 32;

/// Pages a hold looks through before it reports no job.
const HOLD_PAGES: u32 = 4;

/// Holds kept before the lapsed ones are dropped.
const HOLDS_PRUNE_AT: usize = 1_024;

/// Makes the data directory private to this user (0700) and its files too (0600), creating
/// the directory and the database file so: the store holds key hashes, payloads and the audit
/// trail. SQLite gives its WAL and shared-memory files the database file's mode.
fn restrict(data_dir: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
    let fail = |what: &Path, e: std::io::Error| {
        StoreError::Unavailable(format!("cannot secure `{}`: {e}", what.display()))
    };
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(data_dir).map_err(|e| fail(data_dir, e))?;
    std::fs::set_permissions(data_dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| fail(data_dir, e))?;
    let database = data_dir.join(DATABASE_FILE);
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&database)
        .map_err(|e| fail(&database, e))?;
    for suffix in ["", "-wal", "-shm"] {
        let file = data_dir.join(format!("{DATABASE_FILE}{suffix}"));
        if file.exists() {
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| fail(&file, e))?;
        }
    }
    Ok(())
}

impl SqliteStore {
    /// Opens (creating if needed) the store in `data_dir`, applying migrations.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        restrict(data_dir)?;
        let path = data_dir.join(DATABASE_FILE);
        let mut conn = Connection::open(&path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "busy_timeout", 5_000)?;
        conn.pragma_update(None, "cache_size", -CACHE_KIB)?;
        // Each command's savepoint journals the pages it changes: in memory, not in a temporary
        // file, whose writes were most of the writer's I/O per job (BENCHMARKS.md).
        conn.pragma_update(None, "temp_store", "MEMORY")?;
        migrate(&mut conn)?;
        let (sender, receiver) = mpsc::channel::<Command>();
        std::thread::Builder::new()
            .name("airlock-sqlite-writer".into())
            .spawn(move || Writer { conn, heads: HashMap::new() }.run(&receiver))
            .map_err(|e| StoreError::Unavailable(format!("cannot start the writer thread: {e}")))?;
        let readers = Arc::new(Readers { path, idle: Mutex::new(Vec::new()) });
        Ok(Self { writer: Mutex::new(sender), readers, holds: Mutex::new(HashMap::new()) })
    }

    async fn write(&self, op: Op) -> Reply {
        let (reply, receive) = oneshot::channel();
        self.writer
            .lock()
            .map_err(|_| StoreError::Unavailable("the writer lock is poisoned".into()))?
            .send(Command { op, reply })
            .map_err(|_| StoreError::Unavailable("the writer thread has stopped".into()))?;
        receive.await.map_err(|_| StoreError::Unavailable("the writer thread has stopped".into()))?
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let readers = Arc::clone(&self.readers);
        tokio::task::spawn_blocking(move || {
            let conn = readers.checkout()?;
            let result = f(&conn);
            readers.checkin(conn);
            result
        })
        .await
        .map_err(|e| StoreError::Unavailable(format!("read task failed: {e}")))?
    }
}

macro_rules! expect_output {
    ($reply:expr, $variant:ident) => {
        match $reply? {
            Output::$variant(v) => Ok(v),
            _ => Err(StoreError::Unavailable("the writer returned an unexpected reply".into())),
        }
    };
}

#[async_trait::async_trait]
impl Store for SqliteStore {
    async fn create_key(&self, key: KeyRecord, audit: Draft) -> Result<(), StoreError> {
        let reply = self
            .write(Box::new(move |tx| {
                let inserted = tx
                    .conn
                    .prepare_cached(&format!(
                        "INSERT INTO api_keys ({KEY_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"
                    ))?
                    .execute(params![
                        key.id.as_str(),
                        key.tenant.as_str(),
                        key.name,
                        key.roles.to_string(),
                        key.secret_hash.as_slice(),
                        key.created_at,
                        key.revoked_at,
                        key.principal,
                    ]);
                match inserted.map_err(StoreError::from) {
                    Err(StoreError::Conflict(_)) => {
                        return Err(StoreError::Conflict(format!(
                            "a key named `{}` already exists in tenant `{}`",
                            key.name, key.tenant
                        )));
                    }
                    other => other?,
                };
                tx.append_audit(key.tenant.as_str(), audit)?;
                Ok(Output::Unit(()))
            }))
            .await;
        expect_output!(reply, Unit)
    }

    async fn key(&self, id: &KeyId) -> Result<Option<KeyRecord>, StoreError> {
        let id = id.to_string();
        self.read(move |conn| load_key(conn, &id)).await
    }

    async fn key_by_secret(&self, secret_hash: &[u8; 32]) -> Result<Option<KeyRecord>, StoreError> {
        let hash = secret_hash.to_vec();
        self.read(move |conn| {
            let sql = format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE secret_hash = ?1");
            Ok(collect(conn, &sql, [hash], key_from_row)?.pop())
        })
        .await
    }

    async fn keys(&self, tenant: Option<&TenantId>) -> Result<Vec<KeyRecord>, StoreError> {
        let tenant = tenant.map(ToString::to_string);
        self.read(move |conn| match tenant {
            Some(t) => collect(
                conn,
                &format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE tenant = ?1 ORDER BY id"),
                [t],
                key_from_row,
            ),
            None => {
                collect(conn, &format!("SELECT {KEY_COLUMNS} FROM api_keys ORDER BY id"), [], key_from_row)
            }
        })
        .await
    }

    async fn rehash_key(&self, id: &KeyId, from: &[u8; 32], to: &[u8; 32]) -> Result<(), StoreError> {
        let (id, from, to) = (id.to_string(), from.to_vec(), to.to_vec());
        let reply = self
            .write(Box::new(move |tx| {
                let changed = tx
                    .conn
                    .prepare_cached(
                        "UPDATE api_keys SET secret_hash = ?1 WHERE id = ?2 AND secret_hash = ?3",
                    )?
                    .execute(params![to, id, from])?;
                if changed == 0 {
                    return Err(StoreError::NotFound);
                }
                Ok(Output::Unit(()))
            }))
            .await;
        expect_output!(reply, Unit)
    }

    async fn revoke_key(&self, id: &KeyId, at: Millis, audit: Draft) -> Result<KeyRecord, StoreError> {
        let id = id.to_string();
        let reply = self
            .write(Box::new(move |tx| {
                // One writer: no other revocation runs between this check and the update.
                if load_key(tx.conn, &id)?.is_some_and(|k| k.is_live_platform_admin()) {
                    let sql = format!(
                        "SELECT {KEY_COLUMNS} FROM api_keys WHERE tenant = ?1 AND revoked_at IS NULL AND id <> ?2"
                    );
                    let others = collect(tx.conn, &sql, params![TenantId::PLATFORM, id], key_from_row)?;
                    if !others.iter().any(KeyRecord::is_live_platform_admin) {
                        return Err(StoreError::Conflict(crate::LAST_PLATFORM_ADMIN.into()));
                    }
                }
                let changed = tx
                    .conn
                    .prepare_cached(
                        "UPDATE api_keys SET revoked_at = ?1 WHERE id = ?2 AND revoked_at IS NULL",
                    )?
                    .execute(params![at, id])?;
                if changed == 0 {
                    return Err(StoreError::NotFound);
                }
                let key = load_key(tx.conn, &id)?.ok_or(StoreError::NotFound)?;
                tx.append_audit(key.tenant.as_str(), audit)?;
                Ok(Output::Key(key))
            }))
            .await;
        expect_output!(reply, Key)
    }

    async fn publish(
        &self,
        hash: &str,
        source: &str,
        note: Option<&str>,
        at: Millis,
        actor: &str,
    ) -> Result<SnapshotRecord, StoreError> {
        let (hash, source, note, actor) =
            (hash.to_owned(), source.to_owned(), note.map(str::to_owned), actor.to_owned());
        let reply = self
            .write(Box::new(move |tx| {
                let version: i64 =
                    tx.conn
                        .query_row("SELECT COALESCE(MAX(version), 0) + 1 FROM snapshots", [], |r| r.get(0))?;
                tx.conn.execute(
                    "INSERT INTO snapshots (version, hash, source, created_at, created_by, note)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    params![version, hash, source, at, actor, note],
                )?;
                tx.conn.execute(
                    "INSERT INTO active_snapshot (id, version) VALUES (1, ?1)
                     ON CONFLICT (id) DO UPDATE SET version = excluded.version",
                    [version],
                )?;
                tx.append_audit(
                    TenantId::PLATFORM,
                    Draft {
                        at,
                        kind: Kind::PolicyPublished,
                        subject: format!("snapshot:{version}"),
                        actor: actor.clone(),
                        data: json!({"version": version, "hash": hash, "note": note}),
                    },
                )?;
                Ok(Output::Snapshot(SnapshotRecord {
                    version: version.unsigned_abs(),
                    hash,
                    source,
                    created_at: at,
                    created_by: actor,
                    note,
                    active: true,
                }))
            }))
            .await;
        expect_output!(reply, Snapshot)
    }

    async fn active_snapshot(&self) -> Result<Option<SnapshotRecord>, StoreError> {
        self.read(|conn| {
            let sql = format!("{SNAPSHOT_SELECT} WHERE a.version IS NOT NULL");
            Ok(collect(conn, &sql, [], snapshot_from_row)?.pop())
        })
        .await
    }

    async fn snapshots(&self) -> Result<Vec<SnapshotRecord>, StoreError> {
        self.read(|conn| {
            collect(conn, &format!("{SNAPSHOT_SELECT} ORDER BY s.version DESC"), [], snapshot_from_row)
        })
        .await
    }

    async fn snapshot(&self, version: u64) -> Result<Option<SnapshotRecord>, StoreError> {
        let version = i64::try_from(version).map_err(|_| StoreError::NotFound)?;
        self.read(move |conn| {
            Ok(collect(
                conn,
                &format!("{SNAPSHOT_SELECT} WHERE s.version = ?1"),
                [version],
                snapshot_from_row,
            )?
            .pop())
        })
        .await
    }

    async fn idempotency(
        &self,
        tenant: &TenantId,
        key: &str,
        retained_since: Millis,
    ) -> Result<Option<IdempotencyRecord>, StoreError> {
        let (tenant, key) = (tenant.to_string(), key.to_owned());
        self.read(move |conn| load_idempotency(conn, &tenant, &key, retained_since)).await
    }

    async fn submit(
        &self,
        submission: Submission,
        retained_since: Millis,
    ) -> Result<SubmitOutcome, StoreError> {
        let reply = self.write(Box::new(move |tx| submit(tx, submission, retained_since))).await;
        expect_output!(reply, Submit)
    }

    async fn append_audit(
        &self,
        tenant: &TenantId,
        draft: Draft,
        decided_under: Option<u64>,
    ) -> Result<(), StoreError> {
        let tenant = tenant.to_string();
        let reply = self
            .write(Box::new(move |tx| {
                check_decided_under(tx.conn, decided_under)?;
                tx.append_audit(&tenant, draft)?;
                Ok(Output::Unit(()))
            }))
            .await;
        expect_output!(reply, Unit)
    }

    async fn job(&self, tenant: &TenantId, id: &JobId) -> Result<Option<JobRecord>, StoreError> {
        let (tenant, id) = (tenant.clone(), id.clone());
        self.read(move |conn| load_job(conn, &tenant, &id)).await
    }

    async fn jobs(&self, tenant: &TenantId, filter: &JobFilter) -> Result<Vec<JobRecord>, StoreError> {
        let (tenant, filter) = (tenant.to_string(), filter.clone());
        self.read(move |conn| {
            let sql = format!(
                "SELECT {JOB_COLUMNS} FROM jobs WHERE tenant = ?1
                 AND (?2 IS NULL OR state = ?2) AND (?3 IS NULL OR topic = ?3) AND (?4 IS NULL OR env = ?4)
                 AND (?5 IS NULL OR id > ?5) AND (?6 IS NULL OR created_at >= ?6) AND (?7 IS NULL OR created_at < ?7)
                 ORDER BY id LIMIT ?8"
            );
            collect(
                conn,
                &sql,
                params![
                    tenant,
                    filter.state.map(JobState::as_str),
                    filter.topic,
                    filter.env,
                    filter.after.as_ref().map(JobId::as_str),
                    filter.since,
                    filter.until,
                    filter.limit,
                ],
                job_from_row,
            )
        })
        .await
    }

    async fn history(&self, tenant: &TenantId, id: &JobId) -> Result<Vec<Transition>, StoreError> {
        let (tenant, id) = (tenant.to_string(), id.to_string());
        self.read(move |conn| {
            collect(
                conn,
                "SELECT t.seq, t.from_state, t.to_state, t.at, t.actor, t.reason FROM job_transitions t
                 JOIN jobs j ON j.id = t.job_id WHERE t.job_id = ?1 AND j.tenant = ?2 ORDER BY t.seq",
                params![id, tenant],
                |row| {
                    Ok(Transition {
                        seq: row.get(0)?,
                        from: row
                            .get::<_, Option<String>>(1)?
                            .map(|s| s.parse())
                            .transpose()
                            .map_err(corrupt)?,
                        to: row.get::<_, String>(2)?.parse().map_err(corrupt)?,
                        at: row.get(3)?,
                        actor: row.get(4)?,
                        reason: row.get(5)?,
                    })
                },
            )
        })
        .await
    }

    async fn idempotency_report(&self, tenant: &TenantId) -> Result<Vec<(String, u64, u64)>, StoreError> {
        let tenant = tenant.to_string();
        self.read(move |conn| {
            collect(
                conn,
                "SELECT topic, COUNT(*), SUM(idempotency_key IS NULL) FROM jobs WHERE tenant = ?1
                 GROUP BY topic ORDER BY topic",
                [tenant],
                |row| {
                    Ok((
                        row.get(0)?,
                        row.get::<_, i64>(1)?.unsigned_abs(),
                        row.get::<_, i64>(2)?.unsigned_abs(),
                    ))
                },
            )
        })
        .await
    }

    async fn job_counts(&self) -> Result<BTreeMap<JobState, u64>, StoreError> {
        self.read(|conn| {
            let rows = collect(conn, "SELECT state, COUNT(*) FROM jobs GROUP BY state", [], |row| {
                let state: JobState = row.get::<_, String>(0)?.parse().map_err(corrupt)?;
                Ok((state, row.get::<_, i64>(1)?.unsigned_abs()))
            })?;
            Ok(rows.into_iter().collect())
        })
        .await
    }

    async fn overview(&self, tenant: &TenantId, since: Millis) -> Result<TenantOverview, StoreError> {
        let tenant = tenant.to_string();
        self.read(move |conn| {
            let jobs = collect(
                conn,
                "SELECT state, COUNT(*) FROM jobs WHERE tenant = ?1 GROUP BY state",
                params![tenant],
                |row| {
                    let state: JobState = row.get::<_, String>(0)?.parse().map_err(corrupt)?;
                    Ok((state, row.get::<_, i64>(1)?.unsigned_abs()))
                },
            )?;
            let (pending, oldest): (i64, Option<i64>) = conn
                .prepare_cached(
                    "SELECT COUNT(*), MIN(created_at) FROM approvals WHERE tenant = ?1 AND status = 'pending'",
                )?
                .query_row(params![tenant], |r| Ok((r.get(0)?, r.get(1)?)))?;
            let dlq: i64 = conn
                .prepare_cached(
                    "SELECT COUNT(*) FROM jobs WHERE tenant = ?1 AND state = 'dead_lettered' AND discarded_at IS NULL",
                )?
                .query_row(params![tenant], |r| r.get(0))?;
            let [gate_a, gate_b] = crate::FAIL_OPEN_MARKS;
            let from = rows::first_seq_since(conn, &tenant, since - crate::AUDIT_ORDER_SLACK_MS)?;
            let fail_open: (Option<i64>, Option<i64>) = conn
                .prepare_cached(
                    "SELECT SUM(data LIKE ?4), SUM(data LIKE ?5) FROM audit
                     WHERE tenant = ?1 AND seq >= ?2 AND at >= ?3",
                )?
                .query_row(params![tenant, from, since, gate_a, gate_b], |r| Ok((r.get(0)?, r.get(1)?)))?;
            let fail_open = [fail_open.0, fail_open.1].map(|n| n.unwrap_or(0).unsigned_abs());
            Ok(TenantOverview {
                jobs: jobs.into_iter().collect(),
                pending_approvals: pending.unsigned_abs(),
                oldest_pending_at: oldest,
                dlq_depth: dlq.unsigned_abs(),
                fail_open_gate_a: fail_open[0],
                fail_open_gate_b: fail_open[1],
            })
        })
        .await
    }

    async fn approval(
        &self,
        tenant: &TenantId,
        id: &ApprovalId,
    ) -> Result<Option<ApprovalRecord>, StoreError> {
        let (tenant, id) = (tenant.clone(), id.clone());
        self.read(move |conn| load_approval(conn, &tenant, &id)).await
    }

    async fn approvals(
        &self,
        tenant: &TenantId,
        status: Option<Status>,
        after: Option<&ApprovalId>,
        limit: u32,
    ) -> Result<Vec<ApprovalRecord>, StoreError> {
        let (tenant, after) = (tenant.to_string(), after.map(ToString::to_string));
        self.read(move |conn| {
            let sql = format!(
                "SELECT {APPROVAL_COLUMNS} FROM approvals WHERE tenant = ?1 AND (?2 IS NULL OR status = ?2)
                 AND (?3 IS NULL OR id > ?3) ORDER BY id LIMIT ?4"
            );
            collect(conn, &sql, params![tenant, status.map(Status::as_str), after, limit], approval_from_row)
        })
        .await
    }

    async fn approval_summary(&self, tenant: &TenantId) -> Result<ApprovalSummary, StoreError> {
        let tenant = tenant.to_string();
        self.read(move |conn| {
            let (pending, oldest, newest, votes): (i64, Option<i64>, Option<String>, Option<i64>) = conn
                .prepare_cached(
                    "SELECT COUNT(*), MIN(created_at), MAX(id), SUM(json_array_length(approvers)) FROM approvals
                     WHERE tenant = ?1 AND status = 'pending'",
                )?
                .query_row(params![tenant], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?;
            Ok(ApprovalSummary {
                pending: pending.unsigned_abs(),
                oldest_created_at: oldest,
                newest_id: newest.map(|id| id.parse()).transpose().map_err(corrupt)?,
                votes: votes.unwrap_or(0).unsigned_abs(),
            })
        })
        .await
    }

    async fn pending_approvals(&self) -> Result<u64, StoreError> {
        self.read(|conn| {
            let n: i64 = conn
                .prepare_cached("SELECT COUNT(*) FROM approvals WHERE status = 'pending'")?
                .query_row([], |r| r.get(0))?;
            Ok(n.unsigned_abs())
        })
        .await
    }

    async fn expired_approvals(&self, now: Millis, limit: u32) -> Result<Vec<ApprovalRecord>, StoreError> {
        self.read(move |conn| {
            let sql = format!(
                "SELECT {APPROVAL_COLUMNS} FROM approvals WHERE status = 'pending' AND expires_at <= ?1
                 ORDER BY expires_at LIMIT ?2"
            );
            collect(conn, &sql, params![now, limit], approval_from_row)
        })
        .await
    }

    async fn change_approval(&self, change: ApprovalChange) -> Result<ApprovalRecord, StoreError> {
        let reply = self.write(Box::new(move |tx| change_approval(tx, change))).await;
        expect_output!(reply, Approval)
    }

    async fn hold_next(
        &self,
        tenant: &TenantId,
        now: Millis,
        hold_ms: u64,
    ) -> Result<Option<JobRecord>, StoreError> {
        let until = now.saturating_add(i64::try_from(hold_ms).unwrap_or(i64::MAX));
        for page in 0..HOLD_PAGES {
            let candidates = self.dispatchable(tenant, now, page * HOLD_PAGE, HOLD_PAGE).await?;
            let full = candidates.len() == HOLD_PAGE as usize;
            let mut holds =
                self.holds.lock().map_err(|_| StoreError::Unavailable("holds poisoned".into()))?;
            // Dispatch ends a hold; only those of claims that never dispatched pile up here.
            if holds.len() > HOLDS_PRUNE_AT {
                holds.retain(|_, held_until| *held_until > now);
            }
            let free = |j: &JobRecord| holds.get(&j.id).is_none_or(|held_until| *held_until <= now);
            if let Some(job) = candidates.into_iter().find(free) {
                holds.insert(job.id.clone(), until);
                return Ok(Some(job));
            }
            if !full {
                break;
            }
        }
        Ok(None)
    }

    async fn dispatchable(
        &self,
        tenant: &TenantId,
        now: Millis,
        offset: u32,
        limit: u32,
    ) -> Result<Vec<JobRecord>, StoreError> {
        let tenant = tenant.to_string();
        self.read(move |conn| {
            let sql = format!(
                "SELECT {JOB_COLUMNS} FROM jobs WHERE tenant = ?1 AND state = 'queued' AND not_before <= ?2
                 ORDER BY not_before, id LIMIT ?3 OFFSET ?4"
            );
            collect(conn, &sql, params![tenant, now, limit, offset], job_from_row)
        })
        .await
    }

    async fn next_due(&self, tenant: &TenantId, now: Millis) -> Result<Option<Millis>, StoreError> {
        let tenant = tenant.to_string();
        self.read(move |conn| {
            let mut statement = conn.prepare_cached(
                "SELECT not_before FROM jobs WHERE tenant = ?1 AND state = 'queued' AND not_before > ?2
                 ORDER BY not_before LIMIT 1",
            )?;
            let mut rows = statement.query(params![tenant, now])?;
            Ok(match rows.next()? {
                Some(row) => Some(row.get(0)?),
                None => None,
            })
        })
        .await
    }

    async fn apply(&self, mv: Move) -> Result<Applied, StoreError> {
        let id = mv.job_id.clone();
        let reply = self.write(Box::new(move |tx| apply(tx, mv))).await;
        // The job has moved on (or stays queued with a later `not_before`): its hold is done.
        if let Ok(mut holds) = self.holds.lock() {
            holds.remove(&id);
        }
        expect_output!(reply, Applied)
    }

    async fn heartbeat(
        &self,
        tenant: &TenantId,
        id: &JobId,
        token: &str,
        now: Millis,
        expires_at: Millis,
    ) -> Result<Heartbeat, StoreError> {
        let (tenant, id, token) = (tenant.clone(), id.clone(), token.to_owned());
        let reply =
            self.write(Box::new(move |tx| heartbeat(tx, &tenant, &id, &token, now, expires_at))).await;
        expect_output!(reply, Heartbeat)
    }

    async fn lapsed_leases(&self, now: Millis, limit: u32) -> Result<Vec<JobRecord>, StoreError> {
        self.read(move |conn| {
            let sql = format!(
                "SELECT {JOB_COLUMNS} FROM jobs WHERE state = 'leased' AND lease_expires_at < ?1
                 ORDER BY lease_expires_at LIMIT ?2"
            );
            collect(conn, &sql, params![now, limit], job_from_row)
        })
        .await
    }

    async fn dead_letters(
        &self,
        tenant: &TenantId,
        topic: Option<&str>,
        after: Option<&JobId>,
        limit: u32,
    ) -> Result<Vec<JobRecord>, StoreError> {
        let (tenant, topic, after) =
            (tenant.to_string(), topic.map(str::to_owned), after.map(ToString::to_string));
        self.read(move |conn| {
            let sql = format!(
                "SELECT {JOB_COLUMNS} FROM jobs WHERE tenant = ?1 AND state = 'dead_lettered' AND discarded_at IS NULL
                 AND (?2 IS NULL OR topic = ?2) AND (?3 IS NULL OR id > ?3) ORDER BY id LIMIT ?4"
            );
            collect(conn, &sql, params![tenant, topic, after, limit], job_from_row)
        })
        .await
    }

    async fn dlq_depth(&self) -> Result<u64, StoreError> {
        self.read(|conn| {
            let n: i64 = conn
                .prepare_cached(
                    "SELECT COUNT(*) FROM jobs WHERE state = 'dead_lettered' AND discarded_at IS NULL",
                )?
                .query_row([], |r| r.get(0))?;
            Ok(n.unsigned_abs())
        })
        .await
    }

    async fn breaker_admit(&self, config: BreakerConfig, now: Millis) -> Result<Admission, StoreError> {
        let reply = self
            .write(Box::new(move |tx| {
                let mut breaker = Breaker::restore(config, load_breaker(tx.conn)?);
                let admission = breaker.admit(now);
                save_breaker(tx.conn, breaker.saved())?;
                Ok(Output::Admission(admission))
            }))
            .await;
        expect_output!(reply, Admission)
    }

    async fn breaker_report(
        &self,
        config: BreakerConfig,
        now: Millis,
        success: bool,
    ) -> Result<BreakerState, StoreError> {
        let reply = self
            .write(Box::new(move |tx| {
                let mut breaker = Breaker::restore(config, load_breaker(tx.conn)?);
                if success {
                    breaker.success(now);
                } else {
                    breaker.failure(now);
                }
                save_breaker(tx.conn, breaker.saved())?;
                Ok(Output::Breaker(breaker.state(now)))
            }))
            .await;
        expect_output!(reply, Breaker)
    }

    async fn breaker_state(&self, now: Millis) -> Result<BreakerState, StoreError> {
        self.read(move |conn| {
            let stored = load_breaker(conn)?;
            Ok(Breaker::restore(BreakerConfig::default(), stored).state(now))
        })
        .await
    }

    async fn audit(&self, tenant: &TenantId, after_seq: u64, limit: u32) -> Result<AuditPage, StoreError> {
        let tenant = tenant.to_string();
        let after = i64::try_from(after_seq).unwrap_or(i64::MAX);
        self.read(move |conn| {
            let records = collect(
                conn,
                &format!(
                    "SELECT {AUDIT_COLUMNS} FROM audit WHERE tenant = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3"
                ),
                params![tenant, after, limit],
                |row| record_from_row(&tenant, row),
            )?;
            let head = conn
                .prepare_cached("SELECT seq, hash FROM audit_heads WHERE tenant = ?1")?
                .query_row([&tenant], |r| Ok((r.get::<_, i64>(0)?.unsigned_abs(), r.get::<_, String>(1)?)))
                .optional()?;
            Ok(AuditPage { records, head })
        })
        .await
    }

    async fn job_audit(&self, tenant: &TenantId, id: &JobId, limit: u32) -> Result<Vec<Record>, StoreError> {
        let (tenant, id) = (tenant.to_string(), id.to_string());
        self.read(move |conn| {
            collect(
                conn,
                &format!(
                    // Without the hint SQLite walks the tenant's whole chain in `seq` order (the
                    // primary key avoids a sort): ~90 ms per job at 100,000 jobs.
                    "SELECT {AUDIT_COLUMNS} FROM audit INDEXED BY audit_by_subject
                     WHERE tenant = ?1 AND subject = ?2
                     UNION ALL
                     SELECT {AUDIT_COLUMNS} FROM audit INDEXED BY audit_by_subject
                     WHERE tenant = ?1 AND subject IN
                         (SELECT id FROM approvals WHERE tenant = ?1 AND job_id = ?2)
                     ORDER BY seq LIMIT ?3"
                ),
                params![tenant, id, limit],
                |row| record_from_row(&tenant, row),
            )
        })
        .await
    }

    async fn audit_tenants(&self) -> Result<Vec<TenantId>, StoreError> {
        self.read(|conn| {
            collect(conn, "SELECT tenant FROM audit_heads ORDER BY tenant", [], |row| {
                row.get::<_, String>(0)?.parse().map_err(corrupt)
            })
        })
        .await
    }
}
