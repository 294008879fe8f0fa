//! The distributed store: PostgreSQL, shared by any number of gateway and scheduler replicas.
//! Every write is one transaction at READ COMMITTED that takes explicit row locks on what it
//! decides from (the job row, the approval row, the throttle buckets), so replicas keep the same
//! invariants the embedded store's single writer keeps; a deadlock or serialization failure is
//! retried a few times. Audit records are written by the same transaction but chained after
//! commit, in batches, by a sealer ([`seal`]): a per-tenant chain head locked by every write
//! would serialize every replica. Connections are plain TCP without
//! TLS: run it on loopback or a private network only.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use airlock_core::Millis;
use airlock_core::approval::{Request, Status};
use airlock_core::audit::{self, Draft, Record};
use airlock_core::breaker::{Admission, Breaker, BreakerConfig, BreakerState};
use airlock_core::ids::{ApprovalId, JobId, KeyId, TenantId};
use airlock_core::role::{Role, Roles};
use airlock_core::state::{Event, JobState};
use airlock_core::throttle::{self, Bucket, Take};
use serde_json::{Value, json};
use tokio::sync::{Semaphore, SemaphorePermit, mpsc, oneshot};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{FromSql, ToSql};
use tokio_postgres::{Client, Config, GenericClient, IsolationLevel, Row, Statement};

use crate::pg_tls::PgTls;

use crate::codec::{corrupt, gate_from_json, gate_json, strings};
use crate::{
    ApprovalChange, ApprovalRecord, AuditPage, Budget, Dispatch, DispatchAction, DispatchOutcome,
    DispatchState, Finish, Heartbeat, IdempotencyRecord, JobFilter, JobRecord, KeyRecord, Lease,
    SnapshotRecord, Store, StoreError, StoreEvent, Submission, SubmitOutcome, Transition,
};

/// The schema migrations, in order; the `airlock_migrations` table records which are applied.
const MIGRATIONS: [&str; 10] = [
    include_str!("postgres_schema.sql"),
    include_str!("postgres_schema_v2.sql"),
    include_str!("postgres_schema_v3.sql"),
    include_str!("postgres_schema_v4.sql"),
    include_str!("postgres_schema_v5.sql"),
    include_str!("postgres_schema_v6.sql"),
    include_str!("postgres_schema_v7.sql"),
    include_str!("postgres_schema_v8.sql"),
    include_str!("postgres_schema_v9.sql"),
    include_str!("postgres_schema_v10.sql"),
];

/// How long a relay has the outbox rows it took to itself before another may take them.
const OUTBOX_TAKE_MS: i64 = 5_000;

/// Connections kept per store (per replica).
const POOL_MAX: usize = 16;

/// Tries of one transaction that hit a deadlock or a serialization failure.
const TX_ATTEMPTS: u32 = 5;

/// How long a new connection may take when the URL does not say.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Advisory lock (two-key space, so no clash with the one-key locks below) held while
/// migrating, so that replicas starting together migrate once.
const MIGRATION_LOCK: (i32, i32) = (0x4169_726c, 1);

/// Advisory lock held while publishing, so that versions are numbered without gaps or clashes.
/// Every guarded write holds it shared until its commit ([`guard`]; the key is spelled out in
/// `airlock_decided_under`, migration v10).
const PUBLISH_LOCK: (i32, i32) = (0x4169_726c, 2);

/// Advisory lock held while sealing pending audit records, so that one sealer at a time (of any
/// replica) moves the chain heads.
const SEAL_LOCK: (i32, i32) = (0x4169_726c, 3);

/// Pending audit records chained per sealing transaction.
const SEAL_BATCH: usize = 2_000;

/// How often a replica's sealer looks for pending records (a read of the chain seals first, so
/// this is how far behind an unread chain may be, not how stale a read can be).
const SEAL_PERIOD: Duration = Duration::from_millis(100);

/// What `airlock_decided_under` (migration v9) raises when a write was decided under a snapshot
/// that is no longer active; the message is the active version.
const STALE_SQLSTATE: &str = "Z9001";

/// Refuses, inside the caller's transaction, a write decided under a snapshot that is no longer
/// active; the publish lock it holds shared keeps a publish out until the commit.
async fn guard(db: &Db<'_, impl GenericClient + Sync>, decided_under: Option<u64>) -> Result<(), Fail> {
    let Some(version) = decided_under else { return Ok(()) };
    db.execute("SELECT airlock_decided_under($1)", &[&big_u64(version)]).await?;
    Ok(())
}

/// Why a transaction failed: retry it, or give up with a store error.
enum Fail {
    /// Deadlock or serialization failure: nothing was committed, run it again.
    Retry(String),
    /// The idempotency key was claimed by a concurrent submit: nothing was committed, read it.
    KeyRaced,
    /// Any other outcome.
    Store(StoreError),
}

impl From<StoreError> for Fail {
    fn from(e: StoreError) -> Self {
        Fail::Store(e)
    }
}

impl From<tokio_postgres::Error> for Fail {
    fn from(e: tokio_postgres::Error) -> Self {
        let message = match e.as_db_error() {
            Some(db) => format!("{}: {}", db.code().code(), db.message()),
            None => describe(&e),
        };
        match e.code() {
            Some(c) if *c == SqlState::T_R_SERIALIZATION_FAILURE || *c == SqlState::T_R_DEADLOCK_DETECTED => {
                Fail::Retry(message)
            }
            Some(c) if *c == SqlState::UNIQUE_VIOLATION => Fail::Store(StoreError::Conflict(message)),
            Some(c) if c.code() == STALE_SQLSTATE => {
                let active = e.as_db_error().and_then(|db| db.message().parse().ok()).unwrap_or(0);
                Fail::Store(StoreError::Stale { active })
            }
            _ => Fail::Store(StoreError::Unavailable(message)),
        }
    }
}

/// The error and its causes: tokio-postgres puts the useful part (refused, timed out) in the
/// source.
fn describe(e: &tokio_postgres::Error) -> String {
    let mut message = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        message.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    message
}

impl From<Fail> for StoreError {
    fn from(f: Fail) -> Self {
        match f {
            Fail::Retry(m) => StoreError::Unavailable(format!("gave up after {TX_ATTEMPTS} tries: {m}")),
            Fail::KeyRaced => StoreError::Conflict("the idempotency key was used concurrently".into()),
            Fail::Store(e) => e,
        }
    }
}

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

/// The connections, shared by the store and its group committer.
struct Pool {
    config: Config,
    /// TLS as the URL's `sslmode` asks.
    tls: PgTls,
    idle: Mutex<Vec<Conn>>,
    permits: Semaphore,
    /// Whether queued jobs are announced with `NOTIFY` (not when the job bus does it).
    notify_work: AtomicBool,
}

impl Drop for PgStore {
    fn drop(&mut self) {
        for task in &self.background {
            task.abort();
        }
    }
}

/// The notification channels: `NOTIFY` is sent inside the writing transaction, so it is
/// delivered only if that transaction commits.
const WORK_CHANNEL: &str = "airlock_work";
const POLICY_CHANNEL: &str = "airlock_policy";
const KEYS_CHANNEL: &str = "airlock_keys";

/// How long the listener waits before reconnecting after losing its connection.
const LISTEN_RETRY: Duration = Duration::from_secs(1);

/// A pooled connection and the statements prepared on it, by SQL text: a statement is parsed
/// and planned once per connection, and each later use is one round trip.
struct Conn {
    client: Client,
    prepared: Prepared,
}

type Prepared = Mutex<HashMap<String, Statement>>;

/// A connection out of the pool; back in on drop unless it broke or was left in a transaction.
struct Pooled<'a> {
    pool: &'a Pool,
    conn: Option<Conn>,
    /// A transaction was begun and not yet ended (the caller was cancelled mid-way, say).
    in_transaction: bool,
    _permit: SemaphorePermit<'a>,
}

impl Pooled<'_> {
    fn conn(&mut self) -> Result<&mut Conn, Fail> {
        self.conn.as_mut().ok_or_else(|| Fail::Store(StoreError::Unavailable("no connection".into())))
    }

    fn client(&mut self) -> Result<&mut Client, Fail> {
        Ok(&mut self.conn()?.client)
    }

    fn db(&mut self) -> Result<Db<'_, Client>, Fail> {
        let notify_work = self.pool.notify_work.load(Ordering::Relaxed);
        let conn = self.conn()?;
        Ok(Db {
            c: &conn.client,
            prepared: &conn.prepared,
            notify_work,
            alone: true,
            committed: AtomicBool::new(false),
        })
    }
}

impl Drop for Pooled<'_> {
    fn drop(&mut self) {
        // A connection still in a transaction is closed (the server rolls it back), never reused.
        if let Some(conn) = self.conn.take()
            && !self.in_transaction
            && !conn.client.is_closed()
            && let Ok(mut idle) = self.pool.idle.lock()
        {
            idle.push(conn);
        }
    }
}

/// A connection, or a transaction on one, that runs statements prepared once per connection.
/// Statements whose futures are polled together (`tokio::try_join!`) are pipelined: sent
/// without waiting for each other's answers, in the order first polled, except that one not yet
/// prepared on this connection goes out after its prepare. Hence `BEGIN` (never prepared) goes
/// out ahead of a transaction's first statement, and `COMMIT` behind its last only when that
/// one is already prepared ([`Composed::run_last`]).
struct Db<'a, C> {
    c: &'a C,
    prepared: &'a Prepared,
    /// Whether a job made queued is announced with `NOTIFY` ([`PgStore::bus_wakes`]).
    notify_work: bool,
    /// The transaction holds one write only, so its last statement may carry the `COMMIT`
    /// ([`Composed::run_last`]); not in a group commit.
    alone: bool,
    /// The transaction was committed with its last statement ([`Composed::run_last`]).
    committed: AtomicBool,
}

/// A connection in a transaction that [`write_tx!`] began and ends.
type Tx<'a> = Db<'a, Client>;

impl<C: GenericClient + Sync> Db<'_, C> {
    fn is_prepared(&self, sql: &str) -> bool {
        self.prepared.lock().is_ok_and(|p| p.contains_key(sql))
    }

    async fn statement(&self, sql: &str) -> Result<Statement, Fail> {
        if let Some(statement) = self.prepared.lock().ok().and_then(|p| p.get(sql).cloned()) {
            return Ok(statement);
        }
        let statement = self.c.prepare(sql).await?;
        if let Ok(mut prepared) = self.prepared.lock() {
            prepared.insert(sql.to_owned(), statement.clone());
        }
        Ok(statement)
    }

    async fn execute(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64, Fail> {
        let statement = self.statement(sql).await?;
        Ok(self.c.execute(&statement, params).await?)
    }

    async fn query(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>, Fail> {
        let statement = self.statement(sql).await?;
        Ok(self.c.query(&statement, params).await?)
    }

    async fn query_one(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Row, Fail> {
        let statement = self.statement(sql).await?;
        Ok(self.c.query_one(&statement, params).await?)
    }

    async fn query_opt(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Option<Row>, Fail> {
        let statement = self.statement(sql).await?;
        Ok(self.c.query_opt(&statement, params).await?)
    }

    /// A statement without parameters, such as `BEGIN`.
    async fn simple(&self, sql: &str) -> Result<(), Fail> {
        Ok(self.c.batch_execute(sql).await?)
    }
}

/// Runs `$body` (a future using the transaction `$tx`) in a transaction, committing on `Ok`
/// unless the body's last statement did ([`Composed::run_last`]), and runs it again on a
/// deadlock or serialization failure. `BEGIN` is sent together with the
/// body's first statement (pipelined), which saves a round trip per transaction.
macro_rules! write_tx {
    ($store:expr, |$tx:ident| $body:expr) => {
        async {
            let mut attempt = 1;
            loop {
                let mut pooled = $store.checkout().await?;
                pooled.in_transaction = true;
                let result: Result<_, Fail> = async {
                    let $tx = pooled.db()?;
                    let ((), value) = tokio::try_join!($tx.simple("BEGIN"), $body)?;
                    if !$tx.committed.load(Ordering::Relaxed) {
                        $tx.simple("COMMIT").await?;
                    }
                    Ok(value)
                }
                .await;
                let ended = match &result {
                    Ok(_) => true,
                    Err(_) => pooled.db()?.simple("ROLLBACK").await.is_ok(),
                };
                pooled.in_transaction = !ended;
                match result {
                    Err(Fail::Retry(_)) if attempt < TX_ATTEMPTS => attempt += 1,
                    other => break other,
                }
            }
        }
    };
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

impl Pool {
    async fn checkout(&self) -> Result<Pooled<'_>, Fail> {
        let permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| StoreError::Unavailable("the connection pool is closed".into()))?;
        let reused = loop {
            let next = self.idle.lock().ok().and_then(|mut idle| idle.pop());
            match next {
                Some(conn) if conn.client.is_closed() => {}
                other => break other,
            }
        };
        let conn = match reused {
            Some(conn) => conn,
            None => {
                let (client, connection) = self.config.connect(self.tls.clone()).await.map_err(|e| {
                    StoreError::Unavailable(format!("cannot connect to postgres: {}", describe(&e)))
                })?;
                tokio::spawn(async move {
                    // The connection ends when its client is dropped or the server goes away;
                    // the client then reports closed and is not pooled again.
                    let _ = connection.await;
                });
                Conn { client, prepared: Mutex::new(HashMap::new()) }
            }
        };
        Ok(Pooled { pool: self, conn: Some(conn), in_transaction: false, _permit: permit })
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let mut pooled = self.checkout().await?;
        let tx = pooled.client()?.transaction().await.map_err(Fail::from)?;
        let result: Result<(), Fail> = async {
            tx.execute("SELECT pg_advisory_xact_lock($1, $2)", &[&MIGRATION_LOCK.0, &MIGRATION_LOCK.1])
                .await?;
            tx.batch_execute(
                "CREATE TABLE IF NOT EXISTS airlock_migrations (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)",
            )
            .await?;
            let applied: i64 =
                get(&tx.query_one("SELECT COALESCE(MAX(version), 0) FROM airlock_migrations", &[]).await?, 0)?;
            let applied = usize::try_from(applied).map_err(corrupt)?;
            if applied > MIGRATIONS.len() {
                return Err(corrupt(format!(
                    "the database has schema version {applied}, newer than this Airlock ({})",
                    MIGRATIONS.len()
                ))
                .into());
            }
            for (i, sql) in MIGRATIONS.iter().enumerate().skip(applied) {
                tx.batch_execute(sql).await?;
                let version = i64::try_from(i + 1).map_err(corrupt)?;
                tx.execute(
                    "INSERT INTO airlock_migrations (version, applied_at)
                     VALUES ($1, (EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT)",
                    &[&version],
                )
                .await?;
            }
            Ok(())
        }
        .await;
        result?;
        tx.commit().await.map_err(Fail::from)?;
        Ok(())
    }
}

/// How many groups one store commits at once. One: the writes that arrive while a group commits
/// wait and form the next, so under load each WAL flush carries many writes (two at a time
/// measured slower at 1,000 jobs/s offered: smaller groups). A write waiting for a row lock holds
/// up the store's later writes until it gets it; rows are locked in job order, briefly.
const GROUPS_IN_FLIGHT: usize = 1;

/// The most writes in one group.
const GROUP_MAX: usize = 64;

/// A write that many callers make at once, committed in a group with others ([`group_commit`]).
enum Write {
    /// A submit with no idempotency key and no budget ([`insert_job`]).
    Insert(Box<Submission>),
    /// A claim's hold on the next dispatchable job ([`hold_next`]).
    Hold {
        tenant: TenantId,
        now: Millis,
        until: Millis,
        from: Option<Floor>,
    },
    Dispatch(Box<Dispatch>),
    Finish(Box<FinishWrite>),
}

/// The arguments of [`finish`].
struct FinishWrite {
    tenant: TenantId,
    id: JobId,
    token: String,
    live_at: Option<Millis>,
    finish: Finish,
    at: Millis,
    actor: String,
}

/// What a [`Write`] returns.
enum Written {
    Inserted,
    Held(Option<JobRecord>),
    Dispatched(DispatchOutcome),
    Finished(JobRecord),
}

/// A write waiting for its group, and where its answer goes.
type Grouped = (Write, oneshot::Sender<Result<Written, StoreError>>);

impl Write {
    /// The job whose row the write locks, if it names one.
    fn job(&self) -> Option<&str> {
        match self {
            Self::Insert(_) | Self::Hold { .. } => None,
            Self::Dispatch(d) => Some(d.job_id.as_str()),
            Self::Finish(f) => Some(f.id.as_str()),
        }
    }

    async fn run(&self, tx: &Tx<'_>) -> Result<Written, Fail> {
        Ok(match self {
            Self::Insert(s) => {
                insert_job(tx, s).await?;
                Written::Inserted
            }
            Self::Hold { tenant, now, until, from } => {
                Written::Held(hold_next(tx, tenant, *now, *until, from.as_ref()).await?)
            }
            Self::Dispatch(d) => Written::Dispatched(dispatch(tx, d).await?),
            Self::Finish(f) => Written::Finished(
                finish(tx, &f.tenant, &f.id, &f.token, f.live_at, &f.finish, f.at, &f.actor).await?,
            ),
        })
    }

    /// Runs it in a transaction of its own; an insert or a hold is one statement, atomic
    /// without one.
    async fn run_alone(&self, pool: &Pool) -> Result<Written, Fail> {
        match self {
            Self::Insert(_) | Self::Hold { .. } => self.run(&pool.checkout().await?.db()?).await,
            Self::Dispatch(_) | Self::Finish(_) => write_tx!(pool, |tx| self.run(&tx)).await,
        }
    }
}

/// Commits the writes sent to a store in groups: one transaction, and one flush of the
/// write-ahead log, for all the writes that arrived while the previous groups were committing.
/// A write that finds a slot free runs at once, alone, so an idle store adds no delay; under load
/// the flushes per job, which bound throughput, fall with the group size.
async fn group_commit(pool: Arc<Pool>, mut waiting: mpsc::UnboundedReceiver<Grouped>) {
    let slots = Arc::new(Semaphore::new(GROUPS_IN_FLIGHT));
    while let Some(first) = waiting.recv().await {
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else { return };
        let mut group = vec![first];
        while group.len() < GROUP_MAX
            && let Ok(next) = waiting.try_recv()
        {
            group.push(next);
        }
        let pool = Arc::clone(&pool);
        tokio::spawn(async move {
            commit_group(&pool, group).await;
            drop(slot);
        });
    }
}

/// Commits one group and answers its writes. The writes run pipelined in one transaction,
/// sorted by job so that two groups lock their rows in the same order and never deadlock; a
/// second write to the same job waits for the group to end (each write reads its row before
/// writing it). If any write fails, the group is rolled back and each write runs again alone,
/// so that a failure is only its own write's.
async fn commit_group(pool: &Pool, mut group: Vec<Grouped>) {
    group.sort_by(|a, b| a.0.job().cmp(&b.0.job()));
    let (mut together, mut repeats): (Vec<Grouped>, Vec<Grouped>) = (Vec::new(), Vec::new());
    for write in group {
        let repeat =
            write.0.job().is_some() && together.last().is_some_and(|last| last.0.job() == write.0.job());
        if repeat { repeats.push(write) } else { together.push(write) }
    }
    if together.len() > 1 {
        match commit_together(pool, &together).await {
            Ok(written) => {
                for ((_, reply), written) in together.drain(..).zip(written) {
                    let _ = reply.send(Ok(written));
                }
            }
            Err(Some(unknown)) => {
                for (_, reply) in together.drain(..) {
                    let _ = reply.send(Err(StoreError::Unavailable(unknown.clone())));
                }
            }
            Err(None) => {}
        }
    }
    let alone = together.into_iter().map(|(write, reply)| async move {
        let _ = reply.send(write.run_alone(pool).await.map_err(StoreError::from));
    });
    futures_util::future::join_all(alone).await;
    for (write, reply) in repeats {
        let _ = reply.send(write.run_alone(pool).await.map_err(StoreError::from));
    }
}

/// Runs a group in one transaction: what each write returned, once committed; `Err(None)` when
/// the group was rolled back (nothing of it written), `Err(Some(why))` when the connection
/// failed while committing, so that whether it was written is unknown.
async fn commit_together(pool: &Pool, group: &[Grouped]) -> Result<Vec<Written>, Option<String>> {
    let mut pooled = pool.checkout().await.map_err(|_| None)?;
    pooled.in_transaction = true;
    let ran = match pooled.db() {
        Ok(mut tx) => {
            tx.alone = false;
            let writes = futures_util::future::join_all(group.iter().map(|(write, _)| write.run(&tx)));
            match tokio::join!(tx.simple("BEGIN"), writes) {
                (Ok(()), written) => written.into_iter().collect::<Result<Vec<_>, _>>().ok(),
                // Without a transaction, each statement would have committed by itself.
                (Err(e), _) => return Err(Some(StoreError::from(e).to_string())),
            }
        }
        Err(_) => None,
    };
    let Ok(db) = pooled.db() else { return Err(None) };
    let Some(written) = ran else {
        let rolled_back = db.simple("ROLLBACK").await.is_ok();
        pooled.in_transaction = !rolled_back;
        return Err(None);
    };
    match db.c.batch_execute("COMMIT").await {
        Ok(()) => {
            pooled.in_transaction = false;
            Ok(written)
        }
        // The server refused the commit: it rolled the transaction back.
        Err(e) if e.as_db_error().is_some() => {
            pooled.in_transaction = false;
            Err(None)
        }
        Err(e) => Err(Some(format!("the connection failed while committing: {}", describe(&e)))),
    }
}

/// A grouped write answered with another kind of write's result (a bug, not stored data).
fn mismatch() -> StoreError {
    StoreError::Corrupt("a grouped write was answered for another kind of write".into())
}

fn get<'a, T: FromSql<'a>>(row: &'a Row, i: usize) -> Result<T, Fail> {
    row.try_get(i).map_err(|e| Fail::Store(corrupt(e)))
}

fn get_u32(row: &Row, i: usize) -> Result<u32, Fail> {
    Ok(u32::try_from(get::<i64>(row, i)?).map_err(corrupt)?)
}

fn get_u64(row: &Row, i: usize) -> Result<u64, Fail> {
    Ok(get::<i64>(row, i)?.unsigned_abs())
}

fn parsed<T: std::str::FromStr>(row: &Row, i: usize) -> Result<T, Fail>
where
    T::Err: std::fmt::Display,
{
    Ok(get::<&str>(row, i)?.parse().map_err(corrupt)?)
}

fn parsed_opt<T: std::str::FromStr>(row: &Row, i: usize) -> Result<Option<T>, Fail>
where
    T::Err: std::fmt::Display,
{
    Ok(get::<Option<&str>>(row, i)?.map(str::parse).transpose().map_err(corrupt)?)
}

fn big(n: u32) -> i64 {
    i64::from(n)
}

fn big_u64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Every column of a job, in `job_from_row` order.
const JOB_COLUMNS: &str = "id, tenant, principal, topic, env, labels, payload, plan_hash, idempotency_key, job_hash, \
                           state, gate_a, approval_id, created_at, updated_at, scheduling_attempts, \
                           execution_attempts, not_before, lease_token, lease_expires_at, leased_by, gate_b, \
                           dead_letter_reason, discarded_at, result, error";

fn job_from_row(row: &Row) -> Result<JobRecord, Fail> {
    Ok(JobRecord {
        id: parsed(row, 0)?,
        tenant: parsed(row, 1)?,
        principal: get(row, 2)?,
        topic: get(row, 3)?,
        env: get(row, 4)?,
        labels: serde_json::from_str(get(row, 5)?).map_err(corrupt)?,
        payload: serde_json::from_str(get(row, 6)?).map_err(corrupt)?,
        plan_hash: get(row, 7)?,
        idempotency_key: get(row, 8)?,
        job_hash: get(row, 9)?,
        state: parsed(row, 10)?,
        gate_a: gate_from_json(get(row, 11)?)?,
        approval_id: parsed_opt(row, 12)?,
        created_at: get(row, 13)?,
        updated_at: get(row, 14)?,
        dispatch: DispatchState {
            scheduling_attempts: get_u32(row, 15)?,
            execution_attempts: get_u32(row, 16)?,
            not_before: get(row, 17)?,
            lease: match (get(row, 18)?, get(row, 19)?, get(row, 20)?) {
                (Some(token), Some(expires_at), Some(worker)) => Some(Lease { token, expires_at, worker }),
                _ => None,
            },
            gate_b: get::<Option<&str>>(row, 21)?.map(gate_from_json).transpose()?,
            dead_letter_reason: get(row, 22)?,
            discarded_at: get(row, 23)?,
            result: get::<Option<&str>>(row, 24)?.map(serde_json::from_str).transpose().map_err(corrupt)?,
            error: get(row, 25)?,
        },
    })
}

/// A job of a tenant; with `lock`, its row stays locked until the transaction ends.
///
/// Looked up by id alone, the tenant checked here: with `tenant = $2` in the query, a plan made
/// while the table was small (generic plans are kept per connection, and are not remade until
/// statistics exist) may walk `(tenant, state, id)` over every job of the tenant.
async fn load_job(
    c: &Db<'_, impl GenericClient + Sync>,
    tenant: &TenantId,
    id: &JobId,
    lock: bool,
) -> Result<Option<JobRecord>, Fail> {
    let sql =
        format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1{}", if lock { " FOR UPDATE" } else { "" });
    let job = c.query_opt(&sql, &[&id.as_str()]).await?.as_ref().map(job_from_row).transpose()?;
    Ok(job.filter(|job| job.tenant == *tenant))
}

const APPROVAL_COLUMNS: &str = "id, tenant, job_id, status, job_hash, snapshot_hash, rule_ids, rule_hashes, \
                                requested_by, created_at, expires_at, quorum, approvers, decided_at, decided_by";

fn approval_from_row(row: &Row) -> Result<ApprovalRecord, Fail> {
    Ok(ApprovalRecord {
        id: parsed(row, 0)?,
        tenant: parsed(row, 1)?,
        job_id: parsed(row, 2)?,
        request: Request {
            status: parsed(row, 3)?,
            job_hash: get(row, 4)?,
            snapshot_hash: get(row, 5)?,
            rule_ids: strings(get(row, 6)?)?,
            rule_hashes: strings(get(row, 7)?)?,
            requested_by: get(row, 8)?,
            created_at: get(row, 9)?,
            expires_at: get(row, 10)?,
            quorum: get_u32(row, 11)?,
            approvers: strings(get(row, 12)?)?,
        },
        decided_at: get(row, 13)?,
        decided_by: get(row, 14)?,
    })
}

async fn load_approval(
    c: &Db<'_, impl GenericClient + Sync>,
    tenant: &TenantId,
    id: &ApprovalId,
    lock: bool,
) -> Result<Option<ApprovalRecord>, Fail> {
    // By id alone, as in `load_job`.
    let sql = format!(
        "SELECT {APPROVAL_COLUMNS} FROM approvals WHERE id = $1{}",
        if lock { " FOR UPDATE" } else { "" }
    );
    let approval = c.query_opt(&sql, &[&id.as_str()]).await?.as_ref().map(approval_from_row).transpose()?;
    Ok(approval.filter(|approval| approval.tenant == *tenant))
}

const KEY_COLUMNS: &str = "id, tenant, name, roles, secret_hash, created_at, revoked_at, principal";

fn key_from_row(row: &Row) -> Result<KeyRecord, Fail> {
    let roles: Roles = get::<&str>(row, 3)?
        .split(',')
        .filter(|r| !r.is_empty())
        .map(str::parse::<Role>)
        .collect::<Result<_, _>>()
        .map_err(corrupt)?;
    let hash: &[u8] = get(row, 4)?;
    Ok(KeyRecord {
        id: parsed(row, 0)?,
        tenant: parsed(row, 1)?,
        name: get(row, 2)?,
        roles,
        secret_hash: hash.try_into().map_err(|_| corrupt("key hash length"))?,
        created_at: get(row, 5)?,
        revoked_at: get(row, 6)?,
        principal: get(row, 7)?,
    })
}

async fn load_key(c: &Db<'_, impl GenericClient + Sync>, id: &str) -> Result<Option<KeyRecord>, Fail> {
    let sql = format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE id = $1");
    c.query_opt(&sql, &[&id]).await?.as_ref().map(key_from_row).transpose()
}

const SNAPSHOT_SELECT: &str = "SELECT s.version, s.hash, s.source, s.created_at, s.created_by, s.note, \
                               (a.version IS NOT NULL) FROM snapshots s \
                               LEFT JOIN active_snapshot a ON a.version = s.version";

fn snapshot_from_row(row: &Row) -> Result<SnapshotRecord, Fail> {
    Ok(SnapshotRecord {
        version: get_u64(row, 0)?,
        hash: get(row, 1)?,
        source: get(row, 2)?,
        created_at: get(row, 3)?,
        created_by: get(row, 4)?,
        note: get(row, 5)?,
        active: get(row, 6)?,
    })
}

async fn load_idempotency(
    c: &Db<'_, impl GenericClient + Sync>,
    tenant: &str,
    key: &str,
    retained_since: Millis,
) -> Result<Option<IdempotencyRecord>, Fail> {
    let row = c
        .query_opt(
            "SELECT job_hash, job_id, status, body, created_at FROM idempotency
             WHERE tenant = $1 AND key = $2 AND created_at >= $3",
            &[&tenant, &key, &retained_since],
        )
        .await?;
    let Some(row) = row else { return Ok(None) };
    Ok(Some(IdempotencyRecord {
        job_hash: get(&row, 0)?,
        job_id: parsed(&row, 1)?,
        status: u16::try_from(get::<i32>(&row, 2)?).map_err(corrupt)?,
        body: get(&row, 3)?,
        created_at: get(&row, 4)?,
    }))
}

fn record_from_row(tenant: &str, row: &Row) -> Result<Record, Fail> {
    Ok(Record {
        tenant: tenant.to_owned(),
        seq: get_u64(row, 0)?,
        draft: Draft {
            at: get(row, 1)?,
            kind: get(row, 2)?,
            subject: get(row, 3)?,
            actor: get(row, 4)?,
            data: serde_json::from_str(get(row, 5)?).map_err(corrupt)?,
        },
        prev_hash: get(row, 6)?,
        hash: get(row, 7)?,
    })
}

/// Queues an audit record of a tenant, in the transaction of the change it describes; [`seal`]
/// chains it after commit.
async fn append_audit(tx: &Tx<'_>, tenant: &str, draft: Draft) -> Result<(), Fail> {
    tx.execute(
        "INSERT INTO audit_pending (tenant, at, kind, subject, actor, data) VALUES ($1, $2, $3, $4, $5, $6)",
        &[&tenant, &draft.at, &draft.kind, &draft.subject, &draft.actor, &draft.data.to_string()],
    )
    .await?;
    Ok(())
}

/// Chains up to [`SEAL_BATCH`] pending audit records, in `id` order, onto their tenants' chains
/// in one transaction, under [`SEAL_LOCK`] so that sealers of different replicas take turns.
/// Returns how many it sealed. A record whose transaction commits while a batch is being sealed
/// is taken by the next batch: its ids may be lower than some already sealed, but a record
/// written after another's commit always has a larger id, so causal order is kept.
async fn seal(client: &mut Client) -> Result<usize, Fail> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1, $2)", &[&SEAL_LOCK.0, &SEAL_LOCK.1]).await?;
    let batch = i64::try_from(SEAL_BATCH).map_err(corrupt)?;
    let pending = tx
        .query(
            "SELECT id, tenant, at, kind, subject, actor, data FROM audit_pending ORDER BY id LIMIT $1",
            &[&batch],
        )
        .await?;
    if pending.is_empty() {
        tx.commit().await?;
        return Ok(0);
    }
    let mut tenants: Vec<&str> = pending.iter().map(|r| get(r, 1)).collect::<Result<_, _>>()?;
    tenants.sort_unstable();
    tenants.dedup();
    let mut heads: BTreeMap<String, (u64, String)> = BTreeMap::new();
    for row in tx
        .query("SELECT tenant, seq, hash FROM audit_heads WHERE tenant = ANY($1) AND seq > 0", &[&tenants])
        .await?
    {
        heads.insert(get(&row, 0)?, (get_u64(&row, 1)?, get(&row, 2)?));
    }
    let (mut ids, mut tenant_col, mut seqs, mut ats, mut kinds) = (vec![], vec![], vec![], vec![], vec![]);
    let (mut subjects, mut actors, mut datas, mut prevs, mut hashes) =
        (vec![], vec![], vec![], vec![], vec![]);
    for row in &pending {
        let tenant: String = get(row, 1)?;
        let data: String = get(row, 6)?;
        let draft = Draft {
            at: get(row, 2)?,
            kind: get(row, 3)?,
            subject: get(row, 4)?,
            actor: get(row, 5)?,
            data: serde_json::from_str(&data).map_err(corrupt)?,
        };
        let head = heads.get(&tenant).map(|(seq, hash)| (*seq, hash.as_str()));
        let record = audit::seal(&tenant, head, draft);
        heads.insert(tenant.clone(), (record.seq, record.hash.clone()));
        ids.push(get::<i64>(row, 0)?);
        seqs.push(i64::try_from(record.seq).map_err(corrupt)?);
        ats.push(record.draft.at);
        kinds.push(record.draft.kind);
        subjects.push(record.draft.subject);
        actors.push(record.draft.actor);
        datas.push(data);
        prevs.push(record.prev_hash);
        hashes.push(record.hash);
        tenant_col.push(tenant);
    }
    tx.execute(
        "INSERT INTO audit (tenant, seq, at, kind, subject, actor, data, prev_hash, hash)
         SELECT * FROM UNNEST($1::text[], $2::int8[], $3::int8[], $4::text[], $5::text[], $6::text[],
                              $7::text[], $8::text[], $9::text[])",
        &[&tenant_col, &seqs, &ats, &kinds, &subjects, &actors, &datas, &prevs, &hashes],
    )
    .await?;
    let (mut head_tenants, mut head_seqs, mut head_hashes) = (vec![], vec![], vec![]);
    for (tenant, (seq, hash)) in &heads {
        head_tenants.push(tenant.as_str());
        head_seqs.push(i64::try_from(*seq).map_err(corrupt)?);
        head_hashes.push(hash.as_str());
    }
    tx.execute(
        "INSERT INTO audit_heads (tenant, seq, hash) SELECT * FROM UNNEST($1::text[], $2::int8[], $3::text[])
         ON CONFLICT (tenant) DO UPDATE SET seq = excluded.seq, hash = excluded.hash",
        &[&head_tenants, &head_seqs, &head_hashes],
    )
    .await?;
    tx.execute("DELETE FROM audit_pending WHERE id = ANY($1)", &[&ids]).await?;
    tx.commit().await?;
    Ok(pending.len())
}

/// Seals until nothing is pending.
async fn seal_all(client: &mut Client) -> Result<(), Fail> {
    while seal(client).await? == SEAL_BATCH {}
    Ok(())
}

/// How often each replica vacuums the two queue tables, whose rows live for milliseconds.
const TIDY_PERIOD: Duration = Duration::from_secs(1);

/// Vacuums `outbox` and `audit_pending`. Their rows are deleted as fast as they are written, and
/// until a vacuum removes them the dead rows and their index entries sort before the live ones:
/// the relay and the sealer, which read from the start, read them all each time (with
/// autovacuum off, 90 to 300 buffers a pass after 30 s at 1,000 jobs/s). Their live rows are a
/// few hundred, so this takes milliseconds (2.5 ms at 1,000 jobs/s); a table another vacuum
/// holds is skipped, not waited for; no truncation, which would lock out inserts meanwhile.
async fn tidy(client: &Client) -> Result<(), Fail> {
    Ok(client.batch_execute("VACUUM (SKIP_LOCKED, TRUNCATE false) outbox, audit_pending").await?)
}

/// A replica's sealer: on its own connection, seals every [`SEAL_PERIOD`], so that each pass
/// chains many records in one transaction, and [tidies](tidy) every [`TIDY_PERIOD`];
/// reconnects when the connection is lost.
async fn seal_loop(config: Config, tls: PgTls) {
    loop {
        if let Ok((mut client, connection)) = config.connect(tls.clone()).await {
            let driver = tokio::spawn(connection);
            let mut tidied = tokio::time::Instant::now();
            while seal_all(&mut client).await.is_ok() {
                if tidied.elapsed() >= TIDY_PERIOD {
                    if let Err(e) = tidy(&client).await {
                        tracing::warn!(error = %StoreError::from(e), "vacuuming the queue tables failed");
                    }
                    tidied = tokio::time::Instant::now();
                }
                tokio::time::sleep(SEAL_PERIOD).await;
            }
            driver.abort();
        }
        tokio::time::sleep(LISTEN_RETRY).await;
    }
}

/// A column of `jobs` and its new value, written by the UPDATE that moves the job.
type Change<'a> = (&'static str, &'a (dyn ToSql + Sync));

/// Loads a job locked and moves it by `event` ([`apply_transition`]).
async fn transition(
    tx: &Tx<'_>,
    tenant: &TenantId,
    id: &JobId,
    event: Event,
    at: Millis,
    actor: &str,
    reason: &str,
) -> Result<JobRecord, Fail> {
    let job = load_job(tx, tenant, id, true).await?.ok_or(StoreError::NotFound)?;
    apply_transition(tx, job, event, Moved { at, actor, reason, changes: &[], decision: None, last: false })
        .await
}

/// How a job is moved: when, by whom, why, the columns written with the new state, and the
/// decision record that follows the transition's in the chain.
struct Moved<'a> {
    at: Millis,
    actor: &'a str,
    reason: &'a str,
    changes: &'a [Change<'a>],
    decision: Option<&'a Draft>,
    /// The transaction ends with this move ([`Composed::run_last`]).
    last: bool,
}

/// One statement built from parts: data-modifying CTEs, which PostgreSQL runs together,
/// atomically even outside a transaction, in one round trip and (its text being cached per
/// connection) without parsing it again. Parameters are numbered as they are added.
#[derive(Default)]
struct Composed<'a> {
    parts: Vec<String>,
    params: Vec<&'a (dyn ToSql + Sync)>,
    /// The placeholder of the snapshot version the write was decided under ([`guard`]).
    guard: Option<String>,
}

impl<'a> Composed<'a> {
    /// Adds a parameter; its placeholder.
    fn param(&mut self, value: &'a (dyn ToSql + Sync)) -> String {
        self.params.push(value);
        format!("${}", self.params.len())
    }

    /// Makes the statement fail, writing nothing, unless `decided_under` is still the active
    /// snapshot at its commit ([`guard`]).
    fn guard(&mut self, decided_under: &'a Option<i64>) {
        if decided_under.is_some() {
            self.guard = Some(self.param(decided_under));
        }
    }

    /// Adds a data-modifying statement.
    fn with(&mut self, sql: String) {
        self.parts.push(sql);
    }

    /// Inserts an approval request.
    fn approval(&mut self, row: &'a ApprovalRow<'a>) {
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

    /// Queues audit records, in order (one multi-row INSERT keeps their ids in that order).
    fn audit(&mut self, tenant: &'a &'a str, drafts: &'a [Draft], data: &'a [String]) {
        let rows: Vec<String> = drafts
            .iter()
            .zip(data)
            .map(|(d, data)| {
                let t = self.param(tenant);
                let (at, kind, subject) = (self.param(&d.at), self.param(&d.kind), self.param(&d.subject));
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
    fn sql(&mut self, notify: Option<&'a &'a str>) -> String {
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
    async fn run(
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
    async fn run_last(mut self, tx: &Tx<'_>, notify: Option<&'a &'a str>) -> Result<(), Fail> {
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

/// Moves `job` (locked by the caller, and already holding the `changes` in memory) by `event`:
/// one statement updates its row with the new state and the changes, adds its history step and
/// its audit records and, when it becomes queued, the wake-ups.
async fn apply_transition(
    tx: &Tx<'_>,
    job: JobRecord,
    event: Event,
    m: Moved<'_>,
) -> Result<JobRecord, Fail> {
    let to = job.state.next(event).map_err(StoreError::from)?;
    let (tenant, id, from, to_name) = (job.tenant.as_str(), job.id.as_str(), job.state.as_str(), to.as_str());
    let mut drafts = vec![Draft {
        at: m.at,
        kind: "job.transition".into(),
        subject: id.to_owned(),
        actor: m.actor.to_owned(),
        data: json!({"from": from, "to": to_name, "reason": m.reason}),
    }];
    drafts.extend(m.decision.cloned());
    let data: Vec<String> = drafts.iter().map(|d| d.data.to_string()).collect();
    let queued = to == JobState::Queued;
    let mut c = Composed::default();
    let (p_to, p_at, p_id) = (c.param(&to_name), c.param(&m.at), c.param(&id));
    // A job that moves is no longer held by the claim that dispatched it.
    let mut set = format!("state = {p_to}, updated_at = {p_at}, held_until = 0");
    for (column, value) in m.changes {
        set.push_str(&format!(", {column} = {}", c.param(*value)));
    }
    c.with(format!("UPDATE jobs SET {set} WHERE id = {p_id}"));
    let (p_from, p_actor, p_reason) = (c.param(&from), c.param(&m.actor), c.param(&m.reason));
    c.with(format!(
        "INSERT INTO job_transitions (job_id, seq, from_state, to_state, at, actor, reason)
         SELECT {p_id}, COALESCE(MAX(seq), 0) + 1, {p_from}, {p_to}, {p_at}, {p_actor}, {p_reason}
         FROM job_transitions WHERE job_id = {p_id}"
    ));
    c.audit(&tenant, &drafts, &data);
    if queued {
        let p_tenant = c.param(&tenant);
        c.with(format!(
            "INSERT INTO outbox (tenant, job_id, created_at) VALUES ({p_tenant}, {p_id}, {p_at})"
        ));
    }
    let notify = (queued && tx.notify_work).then_some(&WORK_CHANNEL);
    if m.last {
        c.run_last(tx, notify).await?;
    } else {
        c.run(tx, notify).await?;
    }
    Ok(JobRecord { state: to, updated_at: m.at, ..job })
}

/// An approval request as the values of its row.
struct ApprovalRow<'a> {
    approval: &'a ApprovalRecord,
    keys: [&'a str; 4],
    lists: [String; 3],
    quorum: i64,
}

impl<'a> ApprovalRow<'a> {
    fn new(approval: &'a ApprovalRecord) -> Self {
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

async fn insert_approval(tx: &Tx<'_>, approval: &ApprovalRecord) -> Result<(), Fail> {
    let row = ApprovalRow::new(approval);
    let mut c = Composed::default();
    c.approval(&row);
    c.run(tx, None).await
}

/// Takes every budget or none; `Err(retry_after_ms)` when one refuses. The buckets stay
/// locked, in key order (so two takers never deadlock), until the transaction ends.
async fn take_budgets(tx: &Tx<'_>, budgets: &[Budget], at: Millis) -> Result<Result<(), u64>, Fail> {
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

async fn submit(tx: &Tx<'_>, s: &Submission, retained_since: Millis) -> Result<SubmitOutcome, Fail> {
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
        draft.kind = "gate_a.decision".into();
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
async fn insert_job(db: &Db<'_, impl GenericClient + Sync>, s: &Submission) -> Result<(), Fail> {
    let j = &s.job;
    let (tenant, id, state) = (j.tenant.as_str(), j.id.as_str(), j.state.as_str());
    let labels = serde_json::to_string(&j.labels).map_err(corrupt)?;
    let (payload, gate_a) = (j.payload.to_string(), gate_json(&j.gate_a));
    let approval_id = j.approval_id.as_ref().map(ApprovalId::as_str);
    let drafts = [s.audit.clone()];
    let data = [s.audit.data.to_string()];
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

async fn change_approval(tx: &Tx<'_>, c: &ApprovalChange) -> Result<ApprovalRecord, Fail> {
    let current = load_approval(tx, &c.tenant, &c.id, true).await?.ok_or(StoreError::NotFound)?;
    if current.request.status != c.expected_status || current.request.approvers.len() != c.expected_approvers
    {
        return Err(StoreError::Conflict("the approval request changed; read it again".into()).into());
    }
    // The job is locked too: the change may move it.
    load_job(tx, &c.tenant, &current.job_id, true).await?;
    guard(tx, c.decided_under).await?;
    let decided = c.request.status != Status::Pending;
    tx.execute(
        "UPDATE approvals SET status = $1, approvers = $2, decided_at = $3, decided_by = $4 WHERE id = $5",
        &[
            &c.request.status.as_str(),
            &json!(c.request.approvers).to_string(),
            &decided.then_some(c.at),
            &decided.then_some(c.actor.as_str()),
            &c.id.as_str(),
        ],
    )
    .await?;
    for draft in &c.audit {
        append_audit(tx, c.tenant.as_str(), draft.clone()).await?;
    }
    if let Some(event) = c.job_event {
        let reason = format!("approval {}", c.request.status);
        transition(tx, &c.tenant, &current.job_id, event, c.at, &c.actor, &reason).await?;
    }
    if let Some(replacement) = &c.replacement {
        insert_approval(tx, replacement).await?;
        tx.execute(
            "UPDATE jobs SET approval_id = $1, updated_at = $2 WHERE id = $3",
            &[&replacement.id.as_str(), &c.at, &current.job_id.as_str()],
        )
        .await?;
    }
    Ok(ApprovalRecord {
        request: c.request.clone(),
        decided_at: decided.then_some(c.at),
        decided_by: decided.then(|| c.actor.clone()),
        ..current
    })
}

/// Holds the next dispatchable job of `tenant` until `until` for the claim that asked, from
/// `from` on when given. The classic queue pattern: rows another claim is holding (locked by
/// this statement or dispatching) are skipped, not waited for; `held_until` is not indexed, so
/// the hold is usually a HOT update.
async fn hold_next(
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
struct Floor {
    set: std::time::Instant,
    not_before: Millis,
    id: String,
}

/// How long a [`Floor`] is used.
const FLOOR_TTL: Duration = Duration::from_secs(1);

impl Floor {
    fn at(job: &JobRecord) -> Self {
        Self {
            set: std::time::Instant::now(),
            not_before: job.dispatch.not_before,
            id: job.id.as_str().to_owned(),
        }
    }

    fn fresh(&self) -> bool {
        self.set.elapsed() < FLOOR_TTL
    }
}

async fn dispatch(tx: &Tx<'_>, d: &Dispatch) -> Result<DispatchOutcome, Fail> {
    // Waits for the row rather than skipping it: a claim that holds the job must not give it up
    // because another claim's `hold_next` (or a dispatch of a page claim) has it locked for an
    // instant; a job dispatched meanwhile is no longer queued below.
    // The guard goes out with the load (pipelined): a dispatch decided under a superseded
    // snapshot fails here, and the transaction writes nothing. Its error comes first: the load
    // may run after it and then fail only because the transaction was aborted.
    let (job, guarded) = tokio::join!(load_job(tx, &d.tenant, &d.job_id, true), guard(tx, d.decided_under));
    guarded?;
    let mut job = job?.ok_or(StoreError::NotFound)?;
    if job.state != JobState::Queued {
        return Ok(DispatchOutcome::Gone);
    }
    let id = d.job_id.as_str();
    // A move without a decision (a job no pool takes) keeps the last one.
    job.dispatch.gate_b = d.gate_b.clone().or(job.dispatch.gate_b);
    let gate_b = job.dispatch.gate_b.as_ref().map(gate_json);
    let moved = |reason: &'static str, changes| Moved {
        at: d.at,
        actor: &d.audit.actor,
        reason,
        changes,
        decision: Some(&d.audit),
        last: true,
    };
    let job = match &d.action {
        DispatchAction::Lease { lease, budgets } => {
            if let Err(retry_after_ms) = take_budgets(tx, budgets, d.at).await? {
                let not_before = d.at.saturating_add(i64::try_from(retry_after_ms).unwrap_or(i64::MAX));
                let mut draft = d.audit.clone();
                draft.kind = "gate_b.throttled".into();
                if let Value::Object(data) = &mut draft.data {
                    data.insert("outcome".into(), json!("throttled"));
                    data.insert("retry_after_ms".into(), json!(retry_after_ms));
                }
                let (tenant, drafts) = (d.tenant.as_str(), [draft]);
                let data = [drafts[0].data.to_string()];
                let mut c = Composed::default();
                let (p_gate, p_not_before, p_at, p_id) =
                    (c.param(&gate_b), c.param(&not_before), c.param(&d.at), c.param(&id));
                c.with(format!(
                    "UPDATE jobs SET gate_b = {p_gate}, not_before = {p_not_before}, updated_at = {p_at},
                     held_until = 0 WHERE id = {p_id}"
                ));
                c.audit(&tenant, &drafts, &data);
                c.run_last(tx, None).await?;
                return Ok(DispatchOutcome::Throttled { retry_after_ms });
            }
            job.dispatch.execution_attempts += 1;
            job.dispatch.lease = Some(lease.clone());
            let attempts = i64::from(job.dispatch.execution_attempts);
            let reason = format!("leased to {}", lease.worker);
            let changes: [Change<'_>; 5] = [
                ("gate_b", &gate_b),
                ("lease_token", &lease.token),
                ("lease_expires_at", &lease.expires_at),
                ("leased_by", &lease.worker),
                ("execution_attempts", &attempts),
            ];
            apply_transition(tx, job, Event::Lease, Moved { reason: &reason, ..moved("", &changes) }).await?
        }
        DispatchAction::Deny => {
            apply_transition(tx, job, Event::GateBDeny, moved("denied at gate b", &[("gate_b", &gate_b)]))
                .await?
        }
        DispatchAction::NeedsApproval { replacement } => {
            // The fresh request, and the old one recorded as stale.
            let row = ApprovalRow::new(replacement);
            let old = job.approval_id.as_ref().map(ApprovalId::as_str);
            let mut c = Composed::default();
            c.approval(&row);
            let (p_at, p_old) = (c.param(&d.at), c.param(&old));
            c.with(format!(
                "UPDATE approvals SET status = 'stale', decided_at = {p_at}, decided_by = 'system'
                 WHERE id = {p_old} AND status IN ('pending', 'approved')"
            ));
            c.run(tx, None).await?;
            job.approval_id = Some(replacement.id.clone());
            let changes: [Change<'_>; 2] = [("gate_b", &gate_b), ("approval_id", &replacement.id.as_str())];
            apply_transition(tx, job, Event::NeedsApproval, moved("gate b needs a fresh approval", &changes))
                .await?
        }
        DispatchAction::Requeue { not_before, counted } => {
            job.dispatch.not_before = *not_before;
            job.dispatch.scheduling_attempts += u32::from(*counted);
            let attempts = i64::from(job.dispatch.scheduling_attempts);
            let changes: [Change<'_>; 3] =
                [("gate_b", &gate_b), ("not_before", not_before), ("scheduling_attempts", &attempts)];
            apply_transition(tx, job, Event::Requeue, moved("requeued with backoff", &changes)).await?
        }
        DispatchAction::DeadLetter { reason } => {
            job.dispatch.dead_letter_reason = Some(reason.clone());
            job.dispatch.scheduling_attempts += 1;
            let attempts = i64::from(job.dispatch.scheduling_attempts);
            let changes: [Change<'_>; 3] =
                [("gate_b", &gate_b), ("dead_letter_reason", reason), ("scheduling_attempts", &attempts)];
            apply_transition(tx, job, Event::DeadLetter, Moved { reason, ..moved("", &changes) }).await?
        }
    };
    Ok(DispatchOutcome::Applied(Box::new(job)))
}

/// The job, locked, if `token` is its live lease's.
async fn leased_under(
    tx: &Tx<'_>,
    tenant: &TenantId,
    id: &JobId,
    token: &str,
    live_at: Option<Millis>,
) -> Result<JobRecord, Fail> {
    let job = load_job(tx, tenant, id, true).await?.ok_or(StoreError::NotFound)?;
    match &job.dispatch.lease {
        Some(lease) if lease.token == token && live_at.is_some_and(|now| now > lease.expires_at) => {
            Err(StoreError::Conflict("the lease lapsed; the job will be retried".into()).into())
        }
        Some(lease) if lease.token == token => Ok(job),
        _ => Err(StoreError::Conflict("the lease token is not the job's live lease".into()).into()),
    }
}

async fn heartbeat(
    tx: &Tx<'_>,
    tenant: &TenantId,
    id: &JobId,
    token: &str,
    now: Millis,
    expires_at: Millis,
) -> Result<Heartbeat, Fail> {
    let job = leased_under(tx, tenant, id, token, Some(now)).await?;
    match job.state {
        JobState::Cancelled => Ok(Heartbeat::Cancelled),
        JobState::Leased => {
            tx.execute("UPDATE jobs SET lease_expires_at = $1 WHERE id = $2", &[&expires_at, &id.as_str()])
                .await?;
            Ok(Heartbeat::Extended { expires_at })
        }
        other => Err(StoreError::Conflict(format!("the job is `{other}`, no longer leased")).into()),
    }
}

#[expect(clippy::too_many_arguments, reason = "mirrors Store::finish")]
async fn finish(
    tx: &Tx<'_>,
    tenant: &TenantId,
    id: &JobId,
    token: &str,
    live_at: Option<Millis>,
    finish: &Finish,
    at: Millis,
    actor: &str,
) -> Result<JobRecord, Fail> {
    let mut job = leased_under(tx, tenant, id, token, live_at).await?;
    if job.state != JobState::Leased {
        return Err(StoreError::Conflict(format!("the job is `{}`, no longer leased", job.state)).into());
    }
    let moved = |reason, changes| Moved { at, actor, reason, changes, decision: None, last: true };
    let no_lease: (Option<String>, Option<Millis>) = (None, None);
    match finish {
        Finish::Succeeded { result } => {
            job.dispatch.result = Some(result.clone());
            let result = result.to_string();
            apply_transition(tx, job, Event::Succeed, moved("succeeded", &[("result", &result)])).await
        }
        Finish::Retry { error } => {
            job.dispatch.error = Some(error.clone());
            job.dispatch.not_before = at;
            job.dispatch.lease = None;
            let reason = format!("attempt failed, retrying: {error}");
            let changes: [Change<'_>; 5] = [
                ("error", error),
                ("not_before", &at),
                ("lease_token", &no_lease.0),
                ("lease_expires_at", &no_lease.1),
                ("leased_by", &no_lease.0),
            ];
            apply_transition(tx, job, Event::Requeue, moved(&reason, &changes)).await
        }
        Finish::Failed { error } => {
            job.dispatch.error = Some(error.clone());
            let reason = format!("failed: {error}");
            apply_transition(tx, job, Event::Fail, moved(&reason, &[("error", error)])).await
        }
        Finish::DeadLetter { reason } => {
            job.dispatch.dead_letter_reason = Some(reason.clone());
            job.dispatch.error = Some(reason.clone());
            job.dispatch.lease = None;
            let changes: [Change<'_>; 5] = [
                ("dead_letter_reason", reason),
                ("error", reason),
                ("lease_token", &no_lease.0),
                ("lease_expires_at", &no_lease.1),
                ("leased_by", &no_lease.0),
            ];
            apply_transition(tx, job, Event::DeadLetter, moved(reason, &changes)).await
        }
    }
}

async fn create_key(tx: &Tx<'_>, key: &KeyRecord, audit: &Draft) -> Result<(), Fail> {
    let inserted = tx
        .execute(
            "INSERT INTO api_keys (id, tenant, name, roles, secret_hash, created_at, revoked_at, principal)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            &[
                &key.id.as_str(),
                &key.tenant.as_str(),
                &key.name,
                &key.roles.to_string(),
                &key.secret_hash.as_slice(),
                &key.created_at,
                &key.revoked_at,
                &key.principal,
            ],
        )
        .await;
    if let Err(Fail::Store(StoreError::Conflict(_))) = inserted {
        return Err(StoreError::Conflict(format!(
            "a key named `{}` already exists in tenant `{}`",
            key.name, key.tenant
        ))
        .into());
    }
    inserted?;
    append_audit(tx, key.tenant.as_str(), audit.clone()).await?;
    Ok(())
}

async fn rehash_key(tx: &Tx<'_>, id: &str, from: &[u8], to: &[u8]) -> Result<(), Fail> {
    let changed = tx
        .execute(
            "UPDATE api_keys SET secret_hash = $1 WHERE id = $2 AND secret_hash = $3",
            &[&to, &id, &from],
        )
        .await?;
    if changed == 0 {
        return Err(StoreError::NotFound.into());
    }
    notify(tx, KEYS_CHANNEL).await?;
    Ok(())
}

async fn revoke_key(tx: &Tx<'_>, id: &str, at: Millis, audit: &Draft) -> Result<KeyRecord, Fail> {
    // Row locks on every live platform key: a concurrent revocation waits here, then sees this
    // one's result, so two revocations of the last two admins cannot both pass.
    let sql =
        format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE tenant = $1 AND revoked_at IS NULL FOR UPDATE");
    let platform: Vec<KeyRecord> =
        tx.query(&sql, &[&TenantId::PLATFORM]).await?.iter().map(key_from_row).collect::<Result<_, _>>()?;
    let admins: Vec<&KeyRecord> = platform.iter().filter(|k| k.is_live_platform_admin()).collect();
    if admins.iter().any(|k| k.id.as_str() == id) && admins.len() == 1 {
        return Err(StoreError::Conflict(crate::LAST_PLATFORM_ADMIN.into()).into());
    }
    let changed = tx
        .execute("UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL", &[&at, &id])
        .await?;
    if changed == 0 {
        return Err(StoreError::NotFound.into());
    }
    let key = load_key(tx, id).await?.ok_or(StoreError::NotFound)?;
    append_audit(tx, key.tenant.as_str(), audit.clone()).await?;
    notify(tx, KEYS_CHANNEL).await?;
    Ok(key)
}

async fn publish(
    tx: &Tx<'_>,
    hash: &str,
    source: &str,
    note: Option<&str>,
    at: Millis,
    actor: &str,
) -> Result<SnapshotRecord, Fail> {
    // Waits for every write holding the lock shared under the old version ([`guard`]) to
    // commit; every later one reads the new version.
    tx.execute("SELECT pg_advisory_xact_lock($1, $2)", &[&PUBLISH_LOCK.0, &PUBLISH_LOCK.1]).await?;
    let version: i64 =
        get(&tx.query_one("SELECT COALESCE(MAX(version), 0) + 1 FROM snapshots", &[]).await?, 0)?;
    tx.execute(
        "INSERT INTO snapshots (version, hash, source, created_at, created_by, note) VALUES ($1, $2, $3, $4, $5, $6)",
        &[&version, &hash, &source, &at, &actor, &note],
    )
    .await?;
    tx.execute(
        "INSERT INTO active_snapshot (id, version) VALUES (1, $1)
         ON CONFLICT (id) DO UPDATE SET version = excluded.version",
        &[&version],
    )
    .await?;
    append_audit(
        tx,
        TenantId::PLATFORM,
        Draft {
            at,
            kind: "policy.published".into(),
            subject: format!("snapshot:{version}"),
            actor: actor.to_owned(),
            data: json!({"version": version, "hash": hash, "note": note}),
        },
    )
    .await?;
    notify(tx, POLICY_CHANNEL).await?;
    Ok(SnapshotRecord {
        version: version.unsigned_abs(),
        hash: hash.to_owned(),
        source: source.to_owned(),
        created_at: at,
        created_by: actor.to_owned(),
        note: note.map(str::to_owned),
        active: true,
    })
}

async fn retry_dead_letter(
    tx: &Tx<'_>,
    tenant: &TenantId,
    id: &JobId,
    at: Millis,
    actor: &str,
) -> Result<JobRecord, Fail> {
    let job = load_job(tx, tenant, id, true).await?.ok_or(StoreError::NotFound)?;
    if job.dispatch.discarded_at.is_some() {
        return Err(StoreError::Conflict("the job was discarded from the DLQ".into()).into());
    }
    let reason =
        format!("operator retry from the DLQ (was: {})", job.dispatch.dead_letter_reason.unwrap_or_default());
    let job = JobRecord {
        dispatch: DispatchState {
            scheduling_attempts: 0,
            execution_attempts: 0,
            not_before: at,
            lease: None,
            dead_letter_reason: None,
            ..job.dispatch
        },
        ..job
    };
    let (zero, no_lease): (i64, (Option<String>, Option<Millis>)) = (0, (None, None));
    let changes: [Change<'_>; 7] = [
        ("scheduling_attempts", &zero),
        ("execution_attempts", &zero),
        ("not_before", &at),
        ("dead_letter_reason", &no_lease.0),
        ("lease_token", &no_lease.0),
        ("lease_expires_at", &no_lease.1),
        ("leased_by", &no_lease.0),
    ];
    let moved = Moved { at, actor, reason: &reason, changes: &changes, decision: None, last: true };
    apply_transition(tx, job, Event::OperatorRetry, moved).await
}

async fn discard_dead_letter(
    tx: &Tx<'_>,
    tenant: &TenantId,
    id: &JobId,
    at: Millis,
    actor: &str,
) -> Result<JobRecord, Fail> {
    let job = load_job(tx, tenant, id, true).await?.ok_or(StoreError::NotFound)?;
    if job.state != JobState::DeadLettered || job.dispatch.discarded_at.is_some() {
        return Err(StoreError::Conflict(format!("the job is `{}`, not in the DLQ", job.state)).into());
    }
    tx.execute("UPDATE jobs SET discarded_at = $1, updated_at = $1 WHERE id = $2", &[&at, &id.as_str()])
        .await?;
    append_audit(
        tx,
        tenant.as_str(),
        Draft {
            at,
            kind: "dlq.discarded".into(),
            subject: id.to_string(),
            actor: actor.to_owned(),
            data: json!({"reason": job.dispatch.dead_letter_reason}),
        },
    )
    .await?;
    Ok(load_job(tx, tenant, id, false).await?.ok_or(StoreError::NotFound)?)
}

/// Forwards `NOTIFY` on the Airlock channels to `events` for the life of the process,
/// reconnecting whenever the connection is lost.
async fn listen(config: Config, tls: PgTls, events: tokio::sync::broadcast::Sender<StoreEvent>) {
    use tokio_postgres::AsyncMessage;
    loop {
        if let Ok((client, mut connection)) = config.connect(tls.clone()).await {
            let forward = events.clone();
            let driver = tokio::spawn(async move {
                while let Some(Ok(message)) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                    if let AsyncMessage::Notification(n) = message {
                        let event = match n.channel() {
                            POLICY_CHANNEL => StoreEvent::Policy,
                            KEYS_CHANNEL => StoreEvent::Keys,
                            _ => StoreEvent::Work,
                        };
                        let _ = forward.send(event);
                    }
                }
            });
            let channels = format!("LISTEN {WORK_CHANNEL}; LISTEN {POLICY_CHANNEL}; LISTEN {KEYS_CHANNEL}");
            if client.batch_execute(&channels).await.is_ok() {
                // Whatever happened while this process was not listening is picked up now.
                let _ = events.send(StoreEvent::Keys);
                let _ = events.send(StoreEvent::Policy);
                let _ = events.send(StoreEvent::Work);
            }
            let _ = driver.await;
            drop(client);
        }
        tokio::time::sleep(LISTEN_RETRY).await;
    }
}

async fn notify(tx: &Tx<'_>, channel: &str) -> Result<(), Fail> {
    tx.execute("SELECT pg_notify($1, '')", &[&channel]).await?;
    Ok(())
}

/// Locks the shared breaker's row (creating it closed) and reads its state.
async fn lock_breaker(tx: &Tx<'_>) -> Result<BreakerState, Fail> {
    tx.execute(
        "INSERT INTO breaker (id, kind, value) VALUES (1, 'closed', 0) ON CONFLICT (id) DO NOTHING",
        &[],
    )
    .await?;
    let row = tx.query_one("SELECT kind, value FROM breaker WHERE id = 1 FOR UPDATE", &[]).await?;
    let (kind, value): (String, i64) = (get(&row, 0)?, get(&row, 1)?);
    Ok(BreakerState::decode(&kind, value).ok_or_else(|| corrupt("breaker state"))?)
}

async fn save_breaker(tx: &Tx<'_>, state: BreakerState) -> Result<(), Fail> {
    let (kind, value) = state.encode();
    tx.execute("UPDATE breaker SET kind = $1, value = $2 WHERE id = 1", &[&kind, &value]).await?;
    Ok(())
}

async fn breaker_admit(tx: &Tx<'_>, config: BreakerConfig, now: Millis) -> Result<Admission, Fail> {
    let mut breaker = Breaker::restore(config, lock_breaker(tx).await?);
    let admission = breaker.admit(now);
    save_breaker(tx, breaker.saved()).await?;
    Ok(admission)
}

async fn breaker_report(
    tx: &Tx<'_>,
    config: BreakerConfig,
    now: Millis,
    success: bool,
) -> Result<BreakerState, Fail> {
    let mut breaker = Breaker::restore(config, lock_breaker(tx).await?);
    if success {
        breaker.success(now);
    } else {
        breaker.failure(now);
    }
    save_breaker(tx, breaker.saved()).await?;
    Ok(breaker.state(now))
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

    async fn transition(
        &self,
        tenant: &TenantId,
        id: &JobId,
        event: Event,
        at: Millis,
        actor: &str,
        reason: &str,
    ) -> Result<JobRecord, StoreError> {
        Ok(write_tx!(self, |tx| transition(&tx, tenant, id, event, at, actor, reason)).await?)
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

    async fn dispatch(&self, dispatch: Dispatch) -> Result<DispatchOutcome, StoreError> {
        let Written::Dispatched(outcome) = self.grouped(Write::Dispatch(Box::new(dispatch))).await? else {
            return Err(mismatch());
        };
        Ok(outcome)
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

    async fn finish(
        &self,
        tenant: &TenantId,
        id: &JobId,
        token: &str,
        live_at: Option<Millis>,
        finish: Finish,
        at: Millis,
        actor: &str,
    ) -> Result<JobRecord, StoreError> {
        let (tenant, id, token, actor) = (tenant.clone(), id.clone(), token.to_owned(), actor.to_owned());
        let write = FinishWrite { tenant, id, token, live_at, finish, at, actor };
        let Written::Finished(job) = self.grouped(Write::Finish(Box::new(write))).await? else {
            return Err(mismatch());
        };
        Ok(job)
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

    async fn retry_dead_letter(
        &self,
        tenant: &TenantId,
        id: &JobId,
        at: Millis,
        actor: &str,
    ) -> Result<JobRecord, StoreError> {
        Ok(write_tx!(self, |tx| retry_dead_letter(&tx, tenant, id, at, actor)).await?)
    }

    async fn discard_dead_letter(
        &self,
        tenant: &TenantId,
        id: &JobId,
        at: Millis,
        actor: &str,
    ) -> Result<JobRecord, StoreError> {
        Ok(write_tx!(self, |tx| discard_dead_letter(&tx, tenant, id, at, actor)).await?)
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
                 WHERE tenant = $1 AND subject = $2 ORDER BY seq LIMIT $3",
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
