//! Rows to records: the column lists, the codecs and the loaders every write and read shares.

use std::collections::BTreeMap;

use airlock_core::Millis;
use airlock_core::approval::Request;
use airlock_core::audit::{Draft, Record};
use airlock_core::ids::{ApprovalId, JobId, TenantId};
use airlock_core::role::{Role, Roles};
use rusqlite::{Connection, OptionalExtension as _, Row, params};

use crate::codec::{audit_kind, corrupt, gate_from_json, strings};
use crate::{
    ApprovalRecord, DispatchState, IdempotencyRecord, JobRecord, KeyRecord, Lease, SnapshotRecord, StoreError,
};

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

/// The columns a submit writes.
pub(super) const JOB_INSERT_COLUMNS: &str = "id, tenant, principal, topic, env, labels, payload, plan_hash, idempotency_key, \
                                  job_hash, state, gate_a, approval_id, created_at, updated_at";

/// Every column of a job, in `job_from_row` order.
pub(super) const JOB_COLUMNS: &str = "id, tenant, principal, topic, env, labels, payload, plan_hash, idempotency_key, job_hash, \
                           state, gate_a, approval_id, created_at, updated_at, scheduling_attempts, \
                           execution_attempts, not_before, lease_token, lease_expires_at, leased_by, gate_b, \
                           dead_letter_reason, discarded_at, result, error";

pub(super) fn job_from_row(row: &Row<'_>) -> Result<JobRecord, StoreError> {
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

pub(super) fn load_job(
    conn: &Connection,
    tenant: &TenantId,
    id: &JobId,
) -> Result<Option<JobRecord>, StoreError> {
    let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1 AND tenant = ?2");
    let mut stmt = conn.prepare_cached(&sql)?;
    let mut rows = stmt.query(params![id.as_str(), tenant.as_str()])?;
    match rows.next()? {
        Some(row) => Ok(Some(job_from_row(row)?)),
        None => Ok(None),
    }
}

pub(super) const APPROVAL_COLUMNS: &str = "id, tenant, job_id, status, job_hash, snapshot_hash, rule_ids, rule_hashes, \
                                requested_by, created_at, expires_at, quorum, approvers, decided_at, decided_by";

pub(super) fn approval_from_row(row: &Row<'_>) -> Result<ApprovalRecord, StoreError> {
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

pub(super) fn load_approval(
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

pub(super) fn key_from_row(row: &Row<'_>) -> Result<KeyRecord, StoreError> {
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

pub(super) const KEY_COLUMNS: &str =
    "id, tenant, name, roles, secret_hash, created_at, revoked_at, principal";

pub(super) const AUDIT_COLUMNS: &str = "seq, at, kind, subject, actor, data, prev_hash, hash";

pub(super) fn record_from_row(tenant: &str, row: &Row<'_>) -> Result<Record, StoreError> {
    Ok(Record {
        tenant: tenant.to_owned(),
        seq: row.get::<_, i64>(0)?.unsigned_abs(),
        draft: Draft {
            at: row.get(1)?,
            kind: audit_kind(&row.get::<_, String>(2)?)?,
            subject: row.get(3)?,
            actor: row.get(4)?,
            data: serde_json::from_str(&row.get::<_, String>(5)?).map_err(corrupt)?,
        },
        prev_hash: row.get(6)?,
        hash: row.get(7)?,
    })
}

pub(super) fn load_key(conn: &Connection, id: &str) -> Result<Option<KeyRecord>, StoreError> {
    let sql = format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE id = ?1");
    let mut stmt = conn.prepare_cached(&sql)?;
    let mut rows = stmt.query([id])?;
    match rows.next()? {
        Some(row) => Ok(Some(key_from_row(row)?)),
        None => Ok(None),
    }
}

pub(super) const SNAPSHOT_SELECT: &str = "SELECT s.version, s.hash, s.source, s.created_at, s.created_by, s.note, \
                               (a.version IS NOT NULL) FROM snapshots s \
                               LEFT JOIN active_snapshot a ON a.version = s.version";

pub(super) fn snapshot_from_row(row: &Row<'_>) -> Result<SnapshotRecord, StoreError> {
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

/// The first audit sequence number of `tenant` stamped at or after `since`, by binary search
/// over the chain (records are appended in time order, within [`crate::AUDIT_ORDER_SLACK_MS`]):
/// counting a recent window then reads that window, not the whole history.
pub(super) fn first_seq_since(conn: &Connection, tenant: &str, since: Millis) -> rusqlite::Result<i64> {
    let max: Option<i64> = conn
        .prepare_cached("SELECT MAX(seq) FROM audit WHERE tenant = ?1")?
        .query_row(params![tenant], |r| r.get(0))?;
    let mut next = conn
        .prepare_cached("SELECT seq, at FROM audit WHERE tenant = ?1 AND seq >= ?2 ORDER BY seq LIMIT 1")?;
    let (mut lo, mut hi) = (0, max.unwrap_or(0) + 1);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        let found: Option<(i64, i64)> =
            next.query_row(params![tenant, mid], |r| Ok((r.get(0)?, r.get(1)?))).optional()?;
        match found {
            Some((seq, at)) if at < since => lo = seq + 1,
            _ => hi = mid,
        }
    }
    Ok(lo)
}

pub(super) fn collect<T>(
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

pub(super) fn load_idempotency(
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
