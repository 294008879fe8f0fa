//! Operator writes: keys, policy publishes, the shared breaker.

use airlock_core::Millis;
use airlock_core::audit::{Draft, Kind};
use airlock_core::breaker::{Admission, Breaker, BreakerConfig, BreakerState};
use airlock_core::ids::TenantId;
use serde_json::json;

use super::notifications::{KEYS_CHANNEL, POLICY_CHANNEL, notify};
use super::pool::{Fail, Tx};
use super::rows::{KEY_COLUMNS, get, key_from_row, load_key};
use super::sealing::append_audit;
use crate::codec::corrupt;
use crate::{KeyRecord, SnapshotRecord, StoreError};

/// Advisory lock held while publishing, so that versions are numbered without gaps or clashes.
/// Every guarded write holds it shared until its commit ([`guard`]; the key is spelled out in
/// `airlock_decided_under`, migration v10).
pub(super) const PUBLISH_LOCK: (i32, i32) = (0x4169_726c, 2);

pub(super) async fn create_key(tx: &Tx<'_>, key: &KeyRecord, audit: &Draft) -> Result<(), Fail> {
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

pub(super) async fn rehash_key(tx: &Tx<'_>, id: &str, from: &[u8], to: &[u8]) -> Result<(), Fail> {
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

pub(super) async fn revoke_key(tx: &Tx<'_>, id: &str, at: Millis, audit: &Draft) -> Result<KeyRecord, Fail> {
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

pub(super) async fn publish(
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
            kind: Kind::PolicyPublished,
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

/// Locks the shared breaker's row (creating it closed) and reads its state.
pub(super) async fn lock_breaker(tx: &Tx<'_>) -> Result<BreakerState, Fail> {
    tx.execute(
        "INSERT INTO breaker (id, kind, value) VALUES (1, 'closed', 0) ON CONFLICT (id) DO NOTHING",
        &[],
    )
    .await?;
    let row = tx.query_one("SELECT kind, value FROM breaker WHERE id = 1 FOR UPDATE", &[]).await?;
    let (kind, value): (String, i64) = (get(&row, 0)?, get(&row, 1)?);
    Ok(BreakerState::decode(&kind, value).ok_or_else(|| corrupt("breaker state"))?)
}

pub(super) async fn save_breaker(tx: &Tx<'_>, state: BreakerState) -> Result<(), Fail> {
    let (kind, value) = state.encode();
    tx.execute("UPDATE breaker SET kind = $1, value = $2 WHERE id = 1", &[&kind, &value]).await?;
    Ok(())
}

pub(super) async fn breaker_admit(
    tx: &Tx<'_>,
    config: BreakerConfig,
    now: Millis,
) -> Result<Admission, Fail> {
    let mut breaker = Breaker::restore(config, lock_breaker(tx).await?);
    let admission = breaker.admit(now);
    save_breaker(tx, breaker.saved()).await?;
    Ok(admission)
}

pub(super) async fn breaker_report(
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
