//! Rows to records: the column lists, the codecs and the loaders every write and read shares.

use airlock_core::Millis;
use airlock_core::approval::Request;
use airlock_core::audit::{Draft, Record};
use airlock_core::ids::{ApprovalId, JobId, TenantId};
use airlock_core::role::{Role, Roles};
use tokio_postgres::types::{FromSql, ToSql};
use tokio_postgres::{GenericClient, Row};

use super::pool::{Db, Fail};
use crate::codec::{audit_kind, corrupt, gate_from_json, strings};
use crate::{ApprovalRecord, DispatchState, IdempotencyRecord, JobRecord, KeyRecord, Lease, SnapshotRecord};

pub(super) fn get<'a, T: FromSql<'a>>(row: &'a Row, i: usize) -> Result<T, Fail> {
    row.try_get(i).map_err(|e| Fail::Store(corrupt(e)))
}

pub(super) fn get_u32(row: &Row, i: usize) -> Result<u32, Fail> {
    Ok(u32::try_from(get::<i64>(row, i)?).map_err(corrupt)?)
}

pub(super) fn get_u64(row: &Row, i: usize) -> Result<u64, Fail> {
    Ok(get::<i64>(row, i)?.unsigned_abs())
}

pub(super) fn parsed<T: std::str::FromStr>(row: &Row, i: usize) -> Result<T, Fail>
where
    T::Err: std::fmt::Display,
{
    Ok(get::<&str>(row, i)?.parse().map_err(corrupt)?)
}

pub(super) fn parsed_opt<T: std::str::FromStr>(row: &Row, i: usize) -> Result<Option<T>, Fail>
where
    T::Err: std::fmt::Display,
{
    Ok(get::<Option<&str>>(row, i)?.map(str::parse).transpose().map_err(corrupt)?)
}

pub(super) fn big(n: u32) -> i64 {
    i64::from(n)
}

pub(super) fn big_u64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Every column of a job, in `job_from_row` order.
pub(super) const JOB_COLUMNS: &str = "id, tenant, principal, topic, env, labels, payload, plan_hash, idempotency_key, job_hash, \
                           state, gate_a, approval_id, created_at, updated_at, scheduling_attempts, \
                           execution_attempts, not_before, lease_token, lease_expires_at, leased_by, gate_b, \
                           dead_letter_reason, discarded_at, result, error";

pub(super) fn job_from_row(row: &Row) -> Result<JobRecord, Fail> {
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
pub(super) async fn load_job(
    c: &Db<'_, impl GenericClient + Sync>,
    tenant: &TenantId,
    id: &JobId,
    lock: bool,
) -> Result<Option<JobRecord>, Fail> {
    let sql =
        format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1{}", if lock { " FOR UPDATE" } else { "" });
    tenants_job(c, tenant, &sql, &[&id.as_str()]).await
}

/// The job `sql` selects by id (its first columns [`JOB_COLUMNS`]), if it is `tenant`'s.
async fn tenants_job(
    c: &Db<'_, impl GenericClient + Sync>,
    tenant: &TenantId,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Option<JobRecord>, Fail> {
    let job = c.query_opt(sql, params).await?.as_ref().map(job_from_row).transpose()?;
    Ok(job.filter(|job| job.tenant == *tenant))
}

/// Locks and loads the job, as [`load_job`] does; with `decided_under`, the same statement runs
/// the snapshot guard ([`super::moves::guard`]) on the row, so a move decided under a
/// superseded snapshot fails here, and the transaction writes nothing.
pub(super) async fn lock_job_under(
    c: &Db<'_, impl GenericClient + Sync>,
    tenant: &TenantId,
    id: &JobId,
    decided_under: Option<u64>,
) -> Result<Option<JobRecord>, Fail> {
    let Some(version) = decided_under else { return load_job(c, tenant, id, true).await };
    let sql = format!("SELECT {JOB_COLUMNS}, airlock_decided_under($2) FROM jobs WHERE id = $1 FOR UPDATE");
    tenants_job(c, tenant, &sql, &[&id.as_str(), &big_u64(version)]).await
}

pub(super) const APPROVAL_COLUMNS: &str = "id, tenant, job_id, status, job_hash, snapshot_hash, rule_ids, rule_hashes, \
                                requested_by, created_at, expires_at, quorum, approvers, decided_at, decided_by";

pub(super) fn approval_from_row(row: &Row) -> Result<ApprovalRecord, Fail> {
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

pub(super) async fn load_approval(
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

pub(super) const KEY_COLUMNS: &str =
    "id, tenant, name, roles, secret_hash, created_at, revoked_at, principal";

pub(super) fn key_from_row(row: &Row) -> Result<KeyRecord, Fail> {
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

pub(super) async fn load_key(
    c: &Db<'_, impl GenericClient + Sync>,
    id: &str,
) -> Result<Option<KeyRecord>, Fail> {
    let sql = format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE id = $1");
    c.query_opt(&sql, &[&id]).await?.as_ref().map(key_from_row).transpose()
}

pub(super) const SNAPSHOT_SELECT: &str = "SELECT s.version, s.hash, s.source, s.created_at, s.created_by, s.note, \
                               (a.version IS NOT NULL) FROM snapshots s \
                               LEFT JOIN active_snapshot a ON a.version = s.version";

pub(super) fn snapshot_from_row(row: &Row) -> Result<SnapshotRecord, Fail> {
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

pub(super) async fn load_idempotency(
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

pub(super) fn record_from_row(tenant: &str, row: &Row) -> Result<Record, Fail> {
    Ok(Record {
        tenant: tenant.to_owned(),
        seq: get_u64(row, 0)?,
        draft: Draft {
            at: get(row, 1)?,
            kind: audit_kind(get(row, 2)?)?,
            subject: get(row, 3)?,
            actor: get(row, 4)?,
            data: serde_json::from_str(get(row, 5)?).map_err(corrupt)?,
        },
        prev_hash: get(row, 6)?,
        hash: get(row, 7)?,
    })
}
