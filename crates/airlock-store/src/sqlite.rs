//! The embedded store: one SQLite file in WAL mode with `synchronous = FULL`, so that a
//! response is only sent after its commit is on disk. All writes go through one writer
//! thread that groups the commands waiting for it into a single transaction (group commit,
//! one fsync for many submits), each command inside its own savepoint so that one failure
//! does not undo its neighbours. Reads use a small pool of read-only connections.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc};

use airlock_core::Millis;
use airlock_core::approval::{Request, Status};
use airlock_core::audit::{self, Draft, Record};
use airlock_core::breaker::{Admission, Breaker, BreakerConfig, BreakerState};
use airlock_core::ids::{ApprovalId, JobId, KeyId, TenantId};
use airlock_core::role::{Role, Roles};
use airlock_core::state::{Event, JobState};
use airlock_core::throttle::{self, Bucket, Take};
use rusqlite::{Connection, OpenFlags, OptionalExtension, Row, TransactionBehavior, params};
use serde_json::{Value, json};
use tokio::sync::oneshot;

use crate::codec::{corrupt, gate_from_json, gate_json, strings};
use crate::{
    ApprovalChange, ApprovalRecord, AuditPage, Budget, Dispatch, DispatchAction, DispatchOutcome,
    DispatchState, Finish, Heartbeat, IdempotencyRecord, JobFilter, JobRecord, KeyRecord, Lease,
    SnapshotRecord, Store, StoreError, Submission, SubmitOutcome, Transition,
};

/// The schema migrations, in order; `PRAGMA user_version` counts how many are applied.
const MIGRATIONS: [&str; 5] = [
    include_str!("schema.sql"),
    include_str!("schema_v2.sql"),
    include_str!("schema_v3.sql"),
    include_str!("schema_v4.sql"),
    include_str!("schema_v5.sql"),
];

/// Most commands committed in one transaction.
const GROUP_COMMIT_MAX: usize = 512;

/// Read connections kept open.
const READERS: usize = 4;

/// Pages of SQLite cache per connection (negative: KiB).
const CACHE_KIB: i64 = 8 * 1024;

/// The file name inside the data directory.
pub const DATABASE_FILE: &str = "airlock.db";

type Reply = Result<Output, StoreError>;
type Op = Box<dyn FnOnce(&mut Tx<'_>) -> Reply + Send>;

enum Output {
    Unit(()),
    Key(KeyRecord),
    Snapshot(SnapshotRecord),
    Submit(SubmitOutcome),
    Job(Box<JobRecord>),
    Approval(ApprovalRecord),
    Dispatch(DispatchOutcome),
    Heartbeat(Heartbeat),
    Admission(Admission),
    Breaker(BreakerState),
}

struct Command {
    op: Op,
    reply: oneshot::Sender<Reply>,
}

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

struct Readers {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        match e {
            rusqlite::Error::QueryReturnedNoRows => StoreError::NotFound,
            rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::ConstraintViolation => {
                StoreError::Conflict(e.to_string())
            }
            other => StoreError::Unavailable(other.to_string()),
        }
    }
}

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

impl Readers {
    fn checkout(&self) -> Result<Connection, StoreError> {
        if let Some(conn) = self.idle.lock().ok().and_then(|mut idle| idle.pop()) {
            return Ok(conn);
        }
        let conn = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_URI,
        )?;
        conn.pragma_update(None, "busy_timeout", 5_000)?;
        conn.pragma_update(None, "cache_size", -CACHE_KIB)?;
        Ok(conn)
    }

    fn checkin(&self, conn: Connection) {
        if let Ok(mut idle) = self.idle.lock()
            && idle.len() < READERS
        {
            idle.push(conn);
        }
    }
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let applied: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let applied = usize::try_from(applied).map_err(corrupt)?;
    if applied > MIGRATIONS.len() {
        return Err(corrupt(format!(
            "the database has schema version {applied}, newer than this Airlock ({})",
            MIGRATIONS.len()
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(applied) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i64::try_from(i + 1).map_err(corrupt)?)?;
        tx.commit()?;
    }
    Ok(())
}

/// The writer thread: owns the only read-write connection and the cached audit chain heads.
struct Writer {
    conn: Connection,
    heads: HashMap<String, (u64, String)>,
}

/// What one command sees: the open transaction and the chain heads as of the commands
/// before it in the same batch.
struct Tx<'a> {
    conn: &'a Connection,
    committed: &'a HashMap<String, (u64, String)>,
    batch: &'a mut HashMap<String, (u64, String)>,
}

impl Writer {
    fn run(mut self, receiver: &mpsc::Receiver<Command>) {
        while let Ok(first) = receiver.recv() {
            let mut batch = vec![first];
            while batch.len() < GROUP_COMMIT_MAX {
                match receiver.try_recv() {
                    Ok(command) => batch.push(command),
                    Err(_) => break,
                }
            }
            self.commit_batch(batch);
        }
    }

    fn commit_batch(&mut self, batch: Vec<Command>) {
        let mut replies = Vec::with_capacity(batch.len());
        let mut batch_heads = HashMap::new();
        let tx = match self.conn.transaction_with_behavior(TransactionBehavior::Immediate) {
            Ok(tx) => tx,
            Err(e) => {
                let message = e.to_string();
                for command in batch {
                    let _ = command.reply.send(Err(StoreError::Unavailable(message.clone())));
                }
                return;
            }
        };
        for command in batch {
            let mut op_heads = batch_heads.clone();
            let result = savepoint(&tx, |conn| {
                let mut ctx = Tx { conn, committed: &self.heads, batch: &mut op_heads };
                (command.op)(&mut ctx)
            });
            if result.is_ok() {
                batch_heads = op_heads;
            }
            replies.push((command.reply, result));
        }
        match tx.commit() {
            Ok(()) => {
                self.heads.extend(batch_heads);
                for (reply, result) in replies {
                    let _ = reply.send(result);
                }
            }
            Err(e) => {
                self.heads.clear();
                let message = e.to_string();
                for (reply, _) in replies {
                    let _ = reply.send(Err(StoreError::Unavailable(message.clone())));
                }
            }
        }
    }
}

fn savepoint(conn: &Connection, f: impl FnOnce(&Connection) -> Reply) -> Reply {
    conn.execute_batch("SAVEPOINT op")?;
    let result = f(conn);
    let cleanup = if result.is_ok() { "RELEASE op" } else { "ROLLBACK TO op; RELEASE op" };
    conn.execute_batch(cleanup)?;
    result
}

impl Tx<'_> {
    fn head(&self, tenant: &str) -> Result<Option<(u64, String)>, StoreError> {
        if let Some(head) = self.batch.get(tenant).or_else(|| self.committed.get(tenant)) {
            return Ok(Some(head.clone()));
        }
        Ok(self
            .conn
            .prepare_cached("SELECT seq, hash FROM audit_heads WHERE tenant = ?1")?
            .query_row([tenant], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))
            .optional()?
            .map(|(seq, hash)| (seq.unsigned_abs(), hash)))
    }

    fn append_audit(&mut self, tenant: &str, draft: Draft) -> Result<Record, StoreError> {
        let head = self.head(tenant)?;
        let record = audit::seal(tenant, head.as_ref().map(|(s, h)| (*s, h.as_str())), draft);
        let seq = i64::try_from(record.seq).map_err(corrupt)?;
        self.conn
            .prepare_cached(
                "INSERT INTO audit (tenant, seq, at, kind, subject, actor, data, prev_hash, hash)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )?
            .execute(params![
                tenant,
                seq,
                record.draft.at,
                record.draft.kind,
                record.draft.subject,
                record.draft.actor,
                record.draft.data.to_string(),
                record.prev_hash,
                record.hash,
            ])?;
        self.conn
            .prepare_cached(
                "INSERT INTO audit_heads (tenant, seq, hash) VALUES (?1, ?2, ?3)
                 ON CONFLICT (tenant) DO UPDATE SET seq = excluded.seq, hash = excluded.hash",
            )?
            .execute(params![tenant, seq, record.hash])?;
        self.batch.insert(tenant.to_owned(), (record.seq, record.hash.clone()));
        Ok(record)
    }

    fn transition(
        &mut self,
        tenant: &TenantId,
        id: &JobId,
        event: Event,
        at: Millis,
        actor: &str,
        reason: &str,
    ) -> Result<JobRecord, StoreError> {
        let job = load_job(self.conn, tenant, id)?.ok_or(StoreError::NotFound)?;
        let to = job.state.next(event)?;
        self.conn
            .prepare_cached("UPDATE jobs SET state = ?1, updated_at = ?2 WHERE id = ?3")?
            .execute(params![to.as_str(), at, id.as_str()])?;
        self.conn
            .prepare_cached(
                "INSERT INTO job_transitions (job_id, seq, from_state, to_state, at, actor, reason)
                 SELECT ?1, COALESCE(MAX(seq), 0) + 1, ?2, ?3, ?4, ?5, ?6 FROM job_transitions WHERE job_id = ?1",
            )?
            .execute(params![id.as_str(), job.state.as_str(), to.as_str(), at, actor, reason])?;
        self.append_audit(
            tenant.as_str(),
            Draft {
                at,
                kind: "job.transition".into(),
                subject: id.to_string(),
                actor: actor.to_owned(),
                data: json!({"from": job.state.as_str(), "to": to.as_str(), "reason": reason}),
            },
        )?;
        Ok(JobRecord { state: to, updated_at: at, ..job })
    }

    fn insert_approval(&self, approval: &ApprovalRecord) -> Result<(), StoreError> {
        let r = &approval.request;
        self.conn
            .prepare_cached(
                "INSERT INTO approvals (id, tenant, job_id, status, job_hash, snapshot_hash, rule_ids, rule_hashes,
                 requested_by, created_at, expires_at, quorum, approvers, decided_at, decided_by)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
            )?
            .execute(params![
                approval.id.as_str(),
                approval.tenant.as_str(),
                approval.job_id.as_str(),
                r.status.as_str(),
                r.job_hash,
                r.snapshot_hash,
                json!(r.rule_ids).to_string(),
                json!(r.rule_hashes).to_string(),
                r.requested_by,
                r.created_at,
                r.expires_at,
                r.quorum,
                json!(r.approvers).to_string(),
                approval.decided_at,
                approval.decided_by,
            ])?;
        Ok(())
    }
}

/// The columns a submit writes.
const JOB_INSERT_COLUMNS: &str = "id, tenant, principal, topic, env, labels, payload, plan_hash, idempotency_key, \
                                  job_hash, state, gate_a, approval_id, created_at, updated_at";

/// Every column of a job, in `job_from_row` order.
const JOB_COLUMNS: &str = "id, tenant, principal, topic, env, labels, payload, plan_hash, idempotency_key, job_hash, \
                           state, gate_a, approval_id, created_at, updated_at, scheduling_attempts, \
                           execution_attempts, not_before, lease_token, lease_expires_at, leased_by, gate_b, \
                           dead_letter_reason, discarded_at, result, error";

fn job_from_row(row: &Row<'_>) -> Result<JobRecord, StoreError> {
    let text = |i: usize| row.get::<_, String>(i);
    let labels: BTreeMap<String, String> = serde_json::from_str(&text(5)?).map_err(corrupt)?;
    Ok(JobRecord {
        id: text(0)?.parse().map_err(corrupt)?,
        tenant: text(1)?.parse().map_err(corrupt)?,
        principal: text(2)?,
        topic: text(3)?,
        env: text(4)?,
        labels,
        payload: serde_json::from_str(&text(6)?).map_err(corrupt)?,
        plan_hash: row.get(7)?,
        idempotency_key: row.get(8)?,
        job_hash: text(9)?,
        state: text(10)?.parse().map_err(corrupt)?,
        gate_a: gate_from_json(&text(11)?)?,
        approval_id: row.get::<_, Option<String>>(12)?.map(|s| s.parse()).transpose().map_err(corrupt)?,
        created_at: row.get(13)?,
        updated_at: row.get(14)?,
        dispatch: DispatchState {
            scheduling_attempts: row.get(15)?,
            execution_attempts: row.get(16)?,
            not_before: row.get(17)?,
            lease: match (
                row.get::<_, Option<String>>(18)?,
                row.get::<_, Option<i64>>(19)?,
                row.get::<_, Option<String>>(20)?,
            ) {
                (Some(token), Some(expires_at), Some(worker)) => Some(Lease { token, expires_at, worker }),
                _ => None,
            },
            gate_b: row.get::<_, Option<String>>(21)?.map(|g| gate_from_json(&g)).transpose()?,
            dead_letter_reason: row.get(22)?,
            discarded_at: row.get(23)?,
            result: row
                .get::<_, Option<String>>(24)?
                .map(|r| serde_json::from_str(&r))
                .transpose()
                .map_err(corrupt)?,
            error: row.get(25)?,
        },
    })
}

fn load_job(conn: &Connection, tenant: &TenantId, id: &JobId) -> Result<Option<JobRecord>, StoreError> {
    let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1 AND tenant = ?2");
    let mut stmt = conn.prepare_cached(&sql)?;
    let mut rows = stmt.query(params![id.as_str(), tenant.as_str()])?;
    match rows.next()? {
        Some(row) => Ok(Some(job_from_row(row)?)),
        None => Ok(None),
    }
}

const APPROVAL_COLUMNS: &str = "id, tenant, job_id, status, job_hash, snapshot_hash, rule_ids, rule_hashes, \
                                requested_by, created_at, expires_at, quorum, approvers, decided_at, decided_by";

fn approval_from_row(row: &Row<'_>) -> Result<ApprovalRecord, StoreError> {
    let text = |i: usize| row.get::<_, String>(i);
    Ok(ApprovalRecord {
        id: text(0)?.parse().map_err(corrupt)?,
        tenant: text(1)?.parse().map_err(corrupt)?,
        job_id: text(2)?.parse().map_err(corrupt)?,
        request: Request {
            status: text(3)?.parse().map_err(corrupt)?,
            job_hash: text(4)?,
            snapshot_hash: text(5)?,
            rule_ids: strings(&text(6)?)?,
            rule_hashes: strings(&text(7)?)?,
            requested_by: text(8)?,
            created_at: row.get(9)?,
            expires_at: row.get(10)?,
            quorum: row.get(11)?,
            approvers: strings(&text(12)?)?,
        },
        decided_at: row.get(13)?,
        decided_by: row.get(14)?,
    })
}

fn load_approval(
    conn: &Connection,
    tenant: &TenantId,
    id: &ApprovalId,
) -> Result<Option<ApprovalRecord>, StoreError> {
    let sql = format!("SELECT {APPROVAL_COLUMNS} FROM approvals WHERE id = ?1 AND tenant = ?2");
    let mut stmt = conn.prepare_cached(&sql)?;
    let mut rows = stmt.query(params![id.as_str(), tenant.as_str()])?;
    match rows.next()? {
        Some(row) => Ok(Some(approval_from_row(row)?)),
        None => Ok(None),
    }
}

fn key_from_row(row: &Row<'_>) -> Result<KeyRecord, StoreError> {
    let roles: Roles = row
        .get::<_, String>(3)?
        .split(',')
        .filter(|r| !r.is_empty())
        .map(|r| r.parse::<Role>())
        .collect::<Result<_, _>>()
        .map_err(corrupt)?;
    let hash: Vec<u8> = row.get(4)?;
    Ok(KeyRecord {
        id: row.get::<_, String>(0)?.parse().map_err(corrupt)?,
        tenant: row.get::<_, String>(1)?.parse().map_err(corrupt)?,
        name: row.get(2)?,
        roles,
        secret_hash: hash.try_into().map_err(|_| corrupt("key hash length"))?,
        created_at: row.get(5)?,
        revoked_at: row.get(6)?,
        principal: row.get::<_, Option<String>>(7)?,
    })
}

const KEY_COLUMNS: &str = "id, tenant, name, roles, secret_hash, created_at, revoked_at, principal";

const AUDIT_COLUMNS: &str = "seq, at, kind, subject, actor, data, prev_hash, hash";

fn record_from_row(tenant: &str, row: &Row<'_>) -> Result<Record, StoreError> {
    Ok(Record {
        tenant: tenant.to_owned(),
        seq: row.get::<_, i64>(0)?.unsigned_abs(),
        draft: Draft {
            at: row.get(1)?,
            kind: row.get(2)?,
            subject: row.get(3)?,
            actor: row.get(4)?,
            data: serde_json::from_str(&row.get::<_, String>(5)?).map_err(corrupt)?,
        },
        prev_hash: row.get(6)?,
        hash: row.get(7)?,
    })
}

fn load_key(conn: &Connection, id: &str) -> Result<Option<KeyRecord>, StoreError> {
    let sql = format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE id = ?1");
    let mut stmt = conn.prepare_cached(&sql)?;
    let mut rows = stmt.query([id])?;
    match rows.next()? {
        Some(row) => Ok(Some(key_from_row(row)?)),
        None => Ok(None),
    }
}

const SNAPSHOT_SELECT: &str = "SELECT s.version, s.hash, s.source, s.created_at, s.created_by, s.note, \
                               (a.version IS NOT NULL) FROM snapshots s \
                               LEFT JOIN active_snapshot a ON a.version = s.version";

fn snapshot_from_row(row: &Row<'_>) -> Result<SnapshotRecord, StoreError> {
    Ok(SnapshotRecord {
        version: row.get::<_, i64>(0)?.unsigned_abs(),
        hash: row.get(1)?,
        source: row.get(2)?,
        created_at: row.get(3)?,
        created_by: row.get(4)?,
        note: row.get(5)?,
        active: row.get(6)?,
    })
}

fn collect<T>(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
    map: impl Fn(&Row<'_>) -> Result<T, StoreError>,
) -> Result<Vec<T>, StoreError> {
    let mut stmt = conn.prepare_cached(sql)?;
    let mut rows = stmt.query(params)?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        out.push(map(row)?);
    }
    Ok(out)
}

fn load_idempotency(
    conn: &Connection,
    tenant: &str,
    key: &str,
    retained_since: Millis,
) -> Result<Option<IdempotencyRecord>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT job_hash, job_id, status, body, created_at FROM idempotency
         WHERE tenant = ?1 AND key = ?2 AND created_at >= ?3",
    )?;
    let mut rows = stmt.query(params![tenant, key, retained_since])?;
    let Some(row) = rows.next()? else { return Ok(None) };
    Ok(Some(IdempotencyRecord {
        job_hash: row.get(0)?,
        job_id: row.get::<_, String>(1)?.parse().map_err(corrupt)?,
        status: row.get(2)?,
        body: row.get(3)?,
        created_at: row.get(4)?,
    }))
}

/// Refuses a write decided under a snapshot that is no longer active. Publishes go through the
/// same writer thread, so nothing can activate another snapshot between this check and the
/// commit of the write.
fn check_decided_under(conn: &Connection, decided_under: Option<u64>) -> Result<(), StoreError> {
    let Some(version) = decided_under else { return Ok(()) };
    let active: Option<i64> = conn
        .prepare_cached("SELECT version FROM active_snapshot WHERE id = 1")?
        .query_row([], |r| r.get(0))
        .optional()?;
    let active = active.map_or(0, i64::unsigned_abs);
    if active == version { Ok(()) } else { Err(StoreError::Stale { active }) }
}

fn submit(tx: &mut Tx<'_>, s: Submission, retained_since: Millis) -> Reply {
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
        draft.kind = "gate_a.decision".into();
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

fn change_approval(tx: &mut Tx<'_>, c: ApprovalChange) -> Reply {
    let current = load_approval(tx.conn, &c.tenant, &c.id)?.ok_or(StoreError::NotFound)?;
    if current.request.status != c.expected_status || current.request.approvers.len() != c.expected_approvers
    {
        return Err(StoreError::Conflict("the approval request changed; read it again".into()));
    }
    check_decided_under(tx.conn, c.decided_under)?;
    let decided = c.request.status != Status::Pending;
    tx.conn
        .prepare_cached(
            "UPDATE approvals SET status = ?1, approvers = ?2, decided_at = ?3, decided_by = ?4 WHERE id = ?5",
        )?
        .execute(params![
            c.request.status.as_str(),
            json!(c.request.approvers).to_string(),
            decided.then_some(c.at),
            decided.then_some(c.actor.as_str()),
            c.id.as_str(),
        ])?;
    for draft in c.audit {
        tx.append_audit(c.tenant.as_str(), draft)?;
    }
    if let Some(event) = c.job_event {
        tx.transition(
            &c.tenant,
            &current.job_id,
            event,
            c.at,
            &c.actor,
            &format!("approval {}", c.request.status),
        )?;
    }
    if let Some(replacement) = &c.replacement {
        tx.insert_approval(replacement)?;
        tx.conn
            .prepare_cached("UPDATE jobs SET approval_id = ?1, updated_at = ?2 WHERE id = ?3")?
            .execute(params![replacement.id.as_str(), c.at, current.job_id.as_str()])?;
    }
    Ok(Output::Approval(ApprovalRecord {
        request: c.request,
        decided_at: decided.then_some(c.at),
        decided_by: decided.then_some(c.actor),
        ..current
    }))
}

/// Takes every budget or none; `Err(retry_after_ms)` when one refuses.
fn take_budgets(conn: &Connection, budgets: &[Budget], at: Millis) -> Result<Result<(), u64>, StoreError> {
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

const CLEAR_LEASE: &str = "lease_token = NULL, lease_expires_at = NULL, leased_by = NULL";

fn dispatch(tx: &mut Tx<'_>, d: Dispatch) -> Reply {
    let Some(job) = load_job(tx.conn, &d.tenant, &d.job_id)? else { return Err(StoreError::NotFound) };
    if job.state != JobState::Queued {
        return Ok(Output::Dispatch(DispatchOutcome::Gone));
    }
    check_decided_under(tx.conn, d.decided_under)?;
    let id = d.job_id.as_str();
    if let Some(gate_b) = &d.gate_b {
        tx.conn
            .prepare_cached("UPDATE jobs SET gate_b = ?1 WHERE id = ?2")?
            .execute(params![gate_json(gate_b), id])?;
    }
    let actor = d.audit.actor.clone();
    let (event, reason) = match d.action {
        DispatchAction::Lease { lease, budgets } => {
            if let Err(retry_after_ms) = take_budgets(tx.conn, &budgets, d.at)? {
                let not_before = d.at.saturating_add(i64::try_from(retry_after_ms).unwrap_or(i64::MAX));
                tx.conn
                    .prepare_cached("UPDATE jobs SET not_before = ?1, updated_at = ?2 WHERE id = ?3")?
                    .execute(params![not_before, d.at, id])?;
                let mut draft = d.audit;
                draft.kind = "gate_b.throttled".into();
                if let Value::Object(data) = &mut draft.data {
                    data.insert("outcome".into(), json!("throttled"));
                    data.insert("retry_after_ms".into(), json!(retry_after_ms));
                }
                tx.append_audit(d.tenant.as_str(), draft)?;
                return Ok(Output::Dispatch(DispatchOutcome::Throttled { retry_after_ms }));
            }
            tx.conn
                .prepare_cached(
                    "UPDATE jobs SET lease_token = ?1, lease_expires_at = ?2, leased_by = ?3,
                     execution_attempts = execution_attempts + 1 WHERE id = ?4",
                )?
                .execute(params![lease.token, lease.expires_at, lease.worker, id])?;
            (Event::Lease, format!("leased to {}", lease.worker))
        }
        DispatchAction::Deny => (Event::GateBDeny, "denied at gate b".to_owned()),
        DispatchAction::NeedsApproval { replacement } => {
            if let Some(old) = &job.approval_id {
                tx.conn
                    .prepare_cached(
                        "UPDATE approvals SET status = 'stale', decided_at = ?1, decided_by = 'system'
                         WHERE id = ?2 AND status IN ('pending', 'approved')",
                    )?
                    .execute(params![d.at, old.as_str()])?;
            }
            tx.insert_approval(&replacement)?;
            tx.conn
                .prepare_cached("UPDATE jobs SET approval_id = ?1 WHERE id = ?2")?
                .execute(params![replacement.id.as_str(), id])?;
            (Event::NeedsApproval, "gate b needs a fresh approval".to_owned())
        }
        DispatchAction::Requeue { not_before, counted } => {
            tx.conn
                .prepare_cached(
                    "UPDATE jobs SET not_before = ?1, scheduling_attempts = scheduling_attempts + ?2 WHERE id = ?3",
                )?
                .execute(params![not_before, i64::from(counted), id])?;
            (Event::Requeue, "requeued with backoff".to_owned())
        }
        DispatchAction::DeadLetter { reason } => {
            tx.conn
                .prepare_cached(
                    "UPDATE jobs SET dead_letter_reason = ?1, scheduling_attempts = scheduling_attempts + 1 WHERE id = ?2",
                )?
                .execute(params![reason, id])?;
            (Event::DeadLetter, reason)
        }
    };
    tx.append_audit(d.tenant.as_str(), d.audit)?;
    let job = tx.transition(&d.tenant, &d.job_id, event, d.at, &actor, &reason)?;
    Ok(Output::Dispatch(DispatchOutcome::Applied(Box::new(job))))
}

fn leased_under(
    conn: &Connection,
    tenant: &TenantId,
    id: &JobId,
    token: &str,
    live_at: Option<Millis>,
) -> Result<JobRecord, StoreError> {
    let job = load_job(conn, tenant, id)?.ok_or(StoreError::NotFound)?;
    match &job.dispatch.lease {
        Some(lease) if lease.token == token && live_at.is_some_and(|now| now > lease.expires_at) => {
            Err(StoreError::Conflict("the lease lapsed; the job will be retried".into()))
        }
        Some(lease) if lease.token == token => Ok(job),
        _ => Err(StoreError::Conflict("the lease token is not the job's live lease".into())),
    }
}

#[expect(clippy::too_many_arguments, reason = "mirrors Store::finish")]
fn finish(
    tx: &mut Tx<'_>,
    tenant: &TenantId,
    id: &JobId,
    token: &str,
    live_at: Option<Millis>,
    finish: Finish,
    at: Millis,
    actor: &str,
) -> Reply {
    let job = leased_under(tx.conn, tenant, id, token, live_at)?;
    if job.state != JobState::Leased {
        return Err(StoreError::Conflict(format!("the job is `{}`, no longer leased", job.state)));
    }
    let (event, reason) = match finish {
        Finish::Succeeded { result } => {
            tx.conn
                .prepare_cached("UPDATE jobs SET result = ?1 WHERE id = ?2")?
                .execute(params![result.to_string(), id.as_str()])?;
            (Event::Succeed, "succeeded".to_owned())
        }
        Finish::Retry { error } => {
            tx.conn
                .prepare_cached(&format!(
                    "UPDATE jobs SET error = ?1, not_before = ?2, {CLEAR_LEASE} WHERE id = ?3"
                ))?
                .execute(params![error, at, id.as_str()])?;
            (Event::Requeue, format!("attempt failed, retrying: {error}"))
        }
        Finish::Failed { error } => {
            tx.conn
                .prepare_cached("UPDATE jobs SET error = ?1 WHERE id = ?2")?
                .execute(params![error, id.as_str()])?;
            (Event::Fail, format!("failed: {error}"))
        }
        Finish::DeadLetter { reason } => {
            tx.conn
                .prepare_cached(&format!(
                    "UPDATE jobs SET dead_letter_reason = ?1, error = ?1, {CLEAR_LEASE} WHERE id = ?2"
                ))?
                .execute(params![reason, id.as_str()])?;
            (Event::DeadLetter, reason)
        }
    };
    Ok(Output::Job(Box::new(tx.transition(tenant, id, event, at, actor, &reason)?)))
}

fn load_breaker(conn: &Connection) -> Result<BreakerState, StoreError> {
    let row = conn
        .prepare_cached("SELECT kind, value FROM breaker WHERE id = 1")?
        .query_row([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
        .optional()?;
    match row {
        None => Ok(BreakerState::Closed { failures: 0 }),
        Some((kind, value)) => BreakerState::decode(&kind, value).ok_or_else(|| corrupt("breaker state")),
    }
}

fn save_breaker(conn: &Connection, state: BreakerState) -> Result<(), StoreError> {
    let (kind, value) = state.encode();
    conn.prepare_cached(
        "INSERT INTO breaker (id, kind, value) VALUES (1, ?1, ?2)
         ON CONFLICT (id) DO UPDATE SET kind = excluded.kind, value = excluded.value",
    )?
    .execute(params![kind, value])?;
    Ok(())
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
                        kind: "policy.published".into(),
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

    async fn transition(
        &self,
        tenant: &TenantId,
        id: &JobId,
        event: Event,
        at: Millis,
        actor: &str,
        reason: &str,
    ) -> Result<JobRecord, StoreError> {
        let (tenant, id, actor, reason) = (tenant.clone(), id.clone(), actor.to_owned(), reason.to_owned());
        let reply = self
            .write(Box::new(move |tx| {
                Ok(Output::Job(Box::new(tx.transition(&tenant, &id, event, at, &actor, &reason)?)))
            }))
            .await;
        expect_output!(reply, Job).map(|job| *job)
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

    async fn dispatch(&self, dispatch_: Dispatch) -> Result<DispatchOutcome, StoreError> {
        let id = dispatch_.job_id.clone();
        let reply = self.write(Box::new(move |tx| dispatch(tx, dispatch_))).await;
        // The job has moved on (or stays queued with a later `not_before`): its hold is done.
        if let Ok(mut holds) = self.holds.lock() {
            holds.remove(&id);
        }
        expect_output!(reply, Dispatch)
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
        let reply = self
            .write(Box::new(move |tx| {
                let job = leased_under(tx.conn, &tenant, &id, &token, Some(now))?;
                match job.state {
                    JobState::Cancelled => Ok(Output::Heartbeat(Heartbeat::Cancelled)),
                    JobState::Leased => {
                        tx.conn
                            .prepare_cached("UPDATE jobs SET lease_expires_at = ?1 WHERE id = ?2")?
                            .execute(params![expires_at, id.as_str()])?;
                        Ok(Output::Heartbeat(Heartbeat::Extended { expires_at }))
                    }
                    other => Err(StoreError::Conflict(format!("the job is `{other}`, no longer leased"))),
                }
            }))
            .await;
        expect_output!(reply, Heartbeat)
    }

    async fn finish(
        &self,
        tenant: &TenantId,
        id: &JobId,
        token: &str,
        live_at: Option<Millis>,
        finish_: Finish,
        at: Millis,
        actor: &str,
    ) -> Result<JobRecord, StoreError> {
        let (tenant, id, token, actor) = (tenant.clone(), id.clone(), token.to_owned(), actor.to_owned());
        let reply = self
            .write(Box::new(move |tx| finish(tx, &tenant, &id, &token, live_at, finish_, at, &actor)))
            .await;
        expect_output!(reply, Job).map(|job| *job)
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

    async fn retry_dead_letter(
        &self,
        tenant: &TenantId,
        id: &JobId,
        at: Millis,
        actor: &str,
    ) -> Result<JobRecord, StoreError> {
        let (tenant, id, actor) = (tenant.clone(), id.clone(), actor.to_owned());
        let reply = self
            .write(Box::new(move |tx| {
                let job = load_job(tx.conn, &tenant, &id)?.ok_or(StoreError::NotFound)?;
                if job.dispatch.discarded_at.is_some() {
                    return Err(StoreError::Conflict("the job was discarded from the DLQ".into()));
                }
                let to = job.state.next(Event::OperatorRetry)?;
                tx.conn
                    .prepare_cached(&format!(
                        "UPDATE jobs SET scheduling_attempts = 0, execution_attempts = 0, not_before = ?1,
                         dead_letter_reason = NULL, {CLEAR_LEASE} WHERE id = ?2"
                    ))?
                    .execute(params![at, id.as_str()])?;
                let reason = format!(
                    "operator retry from the DLQ (was: {})",
                    job.dispatch.dead_letter_reason.unwrap_or_default()
                );
                let job = tx.transition(&tenant, &id, Event::OperatorRetry, at, &actor, &reason)?;
                debug_assert_eq!(job.state, to);
                Ok(Output::Job(Box::new(job)))
            }))
            .await;
        expect_output!(reply, Job).map(|job| *job)
    }

    async fn discard_dead_letter(
        &self,
        tenant: &TenantId,
        id: &JobId,
        at: Millis,
        actor: &str,
    ) -> Result<JobRecord, StoreError> {
        let (tenant, id, actor) = (tenant.clone(), id.clone(), actor.to_owned());
        let reply = self
            .write(Box::new(move |tx| {
                let job = load_job(tx.conn, &tenant, &id)?.ok_or(StoreError::NotFound)?;
                if job.state != JobState::DeadLettered || job.dispatch.discarded_at.is_some() {
                    return Err(StoreError::Conflict(format!("the job is `{}`, not in the DLQ", job.state)));
                }
                tx.conn
                    .prepare_cached("UPDATE jobs SET discarded_at = ?1, updated_at = ?1 WHERE id = ?2")?
                    .execute(params![at, id.as_str()])?;
                tx.append_audit(
                    tenant.as_str(),
                    Draft {
                        at,
                        kind: "dlq.discarded".into(),
                        subject: id.to_string(),
                        actor: actor.clone(),
                        data: json!({"reason": job.dispatch.dead_letter_reason}),
                    },
                )?;
                Ok(Output::Job(Box::new(load_job(tx.conn, &tenant, &id)?.ok_or(StoreError::NotFound)?)))
            }))
            .await;
        expect_output!(reply, Job).map(|job| *job)
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
                    "SELECT {AUDIT_COLUMNS} FROM audit WHERE tenant = ?1 AND subject = ?2 ORDER BY seq LIMIT ?3"
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
