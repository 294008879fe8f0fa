//! The connection pool: statements prepared once per connection, transactions retried on
//! deadlock or serialization failure, and the error type the store's functions share.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::{Semaphore, SemaphorePermit};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Config, GenericClient, Row, Statement};

use crate::pg_tls::PgTls;

use crate::StoreError;

/// Connections kept per store (per replica).
pub(super) const POOL_MAX: usize = 16;

/// Tries of one transaction that hit a deadlock or a serialization failure.
pub(super) const TX_ATTEMPTS: u32 = 5;

/// How long a new connection may take when the URL does not say.
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What `airlock_decided_under` (migration v9) raises when a write was decided under a snapshot
/// that is no longer active; the message is the active version.
pub(super) const STALE_SQLSTATE: &str = "Z9001";

/// Why a transaction failed: retry it, or give up with a store error.
pub(super) enum Fail {
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
pub(super) fn describe(e: &tokio_postgres::Error) -> String {
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

/// The connections, shared by the store and its group committer.
pub(super) struct Pool {
    pub(super) config: Config,
    /// TLS as the URL's `sslmode` asks.
    pub(super) tls: PgTls,
    pub(super) idle: Mutex<Vec<Conn>>,
    pub(super) permits: Semaphore,
    /// Whether queued jobs are announced with `NOTIFY` (not when the job bus does it).
    pub(super) notify_work: AtomicBool,
}

/// A pooled connection and the statements prepared on it, by SQL text: a statement is parsed
/// and planned once per connection, and each later use is one round trip.
pub(super) struct Conn {
    pub(super) client: Client,
    pub(super) prepared: Prepared,
}

pub(super) type Prepared = Mutex<HashMap<String, Statement>>;

/// A connection out of the pool; back in on drop unless it broke or was left in a transaction.
pub(super) struct Pooled<'a> {
    pub(super) pool: &'a Pool,
    pub(super) conn: Option<Conn>,
    /// A transaction was begun and not yet ended (the caller was cancelled mid-way, say).
    pub(super) in_transaction: bool,
    pub(super) _permit: SemaphorePermit<'a>,
}

impl Pooled<'_> {
    pub(super) fn conn(&mut self) -> Result<&mut Conn, Fail> {
        self.conn.as_mut().ok_or_else(|| Fail::Store(StoreError::Unavailable("no connection".into())))
    }

    pub(super) fn client(&mut self) -> Result<&mut Client, Fail> {
        Ok(&mut self.conn()?.client)
    }

    pub(super) fn db(&mut self) -> Result<Db<'_, Client>, Fail> {
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
pub(super) struct Db<'a, C> {
    pub(super) c: &'a C,
    pub(super) prepared: &'a Prepared,
    /// Whether a job made queued is announced with `NOTIFY` ([`PgStore::bus_wakes`]).
    pub(super) notify_work: bool,
    /// The transaction holds one write only, so its last statement may carry the `COMMIT`
    /// ([`Composed::run_last`]); not in a group commit.
    pub(super) alone: bool,
    /// The transaction was committed with its last statement ([`Composed::run_last`]).
    pub(super) committed: AtomicBool,
}

/// A connection in a transaction that [`write_tx!`] began and ends.
pub(super) type Tx<'a> = Db<'a, Client>;

impl<C: GenericClient + Sync> Db<'_, C> {
    pub(super) fn is_prepared(&self, sql: &str) -> bool {
        self.prepared.lock().is_ok_and(|p| p.contains_key(sql))
    }

    pub(super) async fn statement(&self, sql: &str) -> Result<Statement, Fail> {
        if let Some(statement) = self.prepared.lock().ok().and_then(|p| p.get(sql).cloned()) {
            return Ok(statement);
        }
        let statement = self.c.prepare(sql).await?;
        if let Ok(mut prepared) = self.prepared.lock() {
            prepared.insert(sql.to_owned(), statement.clone());
        }
        Ok(statement)
    }

    pub(super) async fn execute(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64, Fail> {
        let statement = self.statement(sql).await?;
        Ok(self.c.execute(&statement, params).await?)
    }

    pub(super) async fn query(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>, Fail> {
        let statement = self.statement(sql).await?;
        Ok(self.c.query(&statement, params).await?)
    }

    pub(super) async fn query_one(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Row, Fail> {
        let statement = self.statement(sql).await?;
        Ok(self.c.query_one(&statement, params).await?)
    }

    pub(super) async fn query_opt(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, Fail> {
        let statement = self.statement(sql).await?;
        Ok(self.c.query_opt(&statement, params).await?)
    }

    /// A statement without parameters, such as `BEGIN`.
    pub(super) async fn simple(&self, sql: &str) -> Result<(), Fail> {
        Ok(self.c.batch_execute(sql).await?)
    }
}

impl Pool {
    pub(super) async fn checkout(&self) -> Result<Pooled<'_>, Fail> {
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
pub(super) use write_tx;
