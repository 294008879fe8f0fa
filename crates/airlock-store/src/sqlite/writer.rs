//! The writer thread: every write runs there, the commands waiting for it grouped into one
//! transaction (one fsync for many), each inside its own savepoint so that one failure does not
//! undo its neighbours.

use std::collections::HashMap;
use std::sync::mpsc;

use airlock_core::audit::{self, Draft, Record};
use airlock_core::breaker::{Admission, BreakerState};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use serde_json::json;
use tokio::sync::oneshot;

use crate::codec::corrupt;
use crate::{Applied, ApprovalRecord, Heartbeat, KeyRecord, SnapshotRecord, StoreError, SubmitOutcome};

/// Most commands committed in one transaction.
pub(super) const GROUP_COMMIT_MAX: usize = 512;

pub(super) type Reply = Result<Output, StoreError>;
pub(super) type Op = Box<dyn FnOnce(&mut Tx<'_>) -> Reply + Send>;

pub(super) enum Output {
    Unit(()),
    Key(KeyRecord),
    Snapshot(SnapshotRecord),
    Submit(SubmitOutcome),
    Approval(ApprovalRecord),
    Applied(Applied),
    Heartbeat(Heartbeat),
    Admission(Admission),
    Breaker(BreakerState),
}

pub(super) struct Command {
    pub(super) op: Op,
    pub(super) reply: oneshot::Sender<Reply>,
}

/// The writer thread: owns the only read-write connection and the cached audit chain heads.
pub(super) struct Writer {
    pub(super) conn: Connection,
    pub(super) heads: HashMap<String, (u64, String)>,
}

/// What one command sees: the open transaction and the chain heads as of the commands
/// before it in the same batch.
pub(super) struct Tx<'a> {
    pub(super) conn: &'a Connection,
    pub(super) committed: &'a HashMap<String, (u64, String)>,
    pub(super) batch: &'a mut HashMap<String, (u64, String)>,
}

impl Writer {
    pub(super) fn run(mut self, receiver: &mpsc::Receiver<Command>) {
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

    pub(super) fn commit_batch(&mut self, batch: Vec<Command>) {
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

pub(super) fn savepoint(conn: &Connection, f: impl FnOnce(&Connection) -> Reply) -> Reply {
    conn.execute_batch("SAVEPOINT op")?;
    let result = f(conn);
    let cleanup = if result.is_ok() { "RELEASE op" } else { "ROLLBACK TO op; RELEASE op" };
    conn.execute_batch(cleanup)?;
    result
}

impl Tx<'_> {
    pub(super) fn head(&self, tenant: &str) -> Result<Option<(u64, String)>, StoreError> {
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

    pub(super) fn append_audit(&mut self, tenant: &str, draft: Draft) -> Result<Record, StoreError> {
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
                record.draft.kind.as_str(),
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

    pub(super) fn insert_approval(&self, approval: &ApprovalRecord) -> Result<(), StoreError> {
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
