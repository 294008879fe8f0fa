//! Group commit: the submits, dispatches and finishes that arrive together run pipelined in one
//! transaction with one flush of the write-ahead log; if one fails, each runs again alone.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use airlock_core::Millis;
use airlock_core::ids::TenantId;
use airlock_core::moves::Move;
use tokio::sync::{Semaphore, mpsc, oneshot};

use super::moves::{Floor, apply_move, hold_next, insert_job};
use super::pool::{Fail, Pool, TX_ATTEMPTS, Tx, describe, write_tx};
use crate::codec::Applied;
use crate::{JobRecord, StoreError, Submission};

/// How many groups one store commits at once. One: the writes that arrive while a group commits
/// wait and form the next, so under load each WAL flush carries many writes (two at a time
/// measured slower at 1,000 jobs/s offered: smaller groups). A write waiting for a row lock holds
/// up the store's later writes until it gets it; rows are locked in job order, briefly.
pub(super) const GROUPS_IN_FLIGHT: usize = 1;

/// The most writes in one group.
pub(super) const GROUP_MAX: usize = 64;

/// A write that many callers make at once, committed in a group with others ([`group_commit`]).
pub(super) enum Write {
    /// A submit with no idempotency key and no budget ([`insert_job`]).
    Insert(Box<Submission>),
    /// A claim's hold on the next dispatchable job ([`hold_next`]).
    Hold { tenant: TenantId, now: Millis, until: Millis, from: Option<Floor> },
    /// A dispatch or a finish ([`apply_move`]).
    Move(Box<Move>),
}

/// What a [`Write`] returns.
#[expect(clippy::large_enum_variant, reason = "a hold returns its job unboxed on every claim")]
pub(super) enum Written {
    Inserted,
    Held(Option<JobRecord>),
    Moved(Applied),
}

/// A write waiting for its group, and where its answer goes.
pub(super) type Grouped = (Write, oneshot::Sender<Result<Written, StoreError>>);

impl Write {
    /// The job whose row the write locks, if it names one.
    pub(super) fn job(&self) -> Option<&str> {
        match self {
            Self::Insert(_) | Self::Hold { .. } => None,
            Self::Move(mv) => Some(mv.job_id.as_str()),
        }
    }

    pub(super) async fn run(&self, tx: &Tx<'_>) -> Result<Written, Fail> {
        Ok(match self {
            Self::Insert(s) => {
                insert_job(tx, s).await?;
                Written::Inserted
            }
            Self::Hold { tenant, now, until, from } => {
                Written::Held(hold_next(tx, tenant, *now, *until, from.as_ref()).await?)
            }
            Self::Move(mv) => Written::Moved(apply_move(tx, mv, true).await?),
        })
    }

    /// Runs it in a transaction of its own; an insert or a hold is one statement, atomic
    /// without one.
    pub(super) async fn run_alone(&self, pool: &Pool) -> Result<Written, Fail> {
        match self {
            Self::Insert(_) | Self::Hold { .. } => self.run(&pool.checkout().await?.db()?).await,
            Self::Move(_) => write_tx!(pool, |tx| self.run(&tx)).await,
        }
    }
}

/// Commits the writes sent to a store in groups: one transaction, and one flush of the
/// write-ahead log, for all the writes that arrived while the previous groups were committing.
/// A write that finds a slot free runs at once, alone, so an idle store adds no delay; under load
/// the flushes per job, which bound throughput, fall with the group size.
pub(super) async fn group_commit(pool: Arc<Pool>, mut waiting: mpsc::UnboundedReceiver<Grouped>) {
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
pub(super) async fn commit_group(pool: &Pool, mut group: Vec<Grouped>) {
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
pub(super) async fn commit_together(pool: &Pool, group: &[Grouped]) -> Result<Vec<Written>, Option<String>> {
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
pub(super) fn mismatch() -> StoreError {
    StoreError::Corrupt("a grouped write was answered for another kind of write".into())
}
