//! The audit chain: records written by a transaction wait in `audit_pending` until the sealer
//! chains them, in batches, after the commit.

use std::collections::BTreeMap;
use std::time::Duration;

use airlock_core::audit::{self, Draft};
use tokio_postgres::{Client, Config};

use crate::pg_tls::PgTls;

use super::notifications::LISTEN_RETRY;
use super::pool::{Fail, Tx};
use super::rows::{get, get_u64};
use crate::StoreError;
use crate::codec::{audit_kind, corrupt};

/// Advisory lock held while sealing pending audit records, so that one sealer at a time (of any
/// replica) moves the chain heads.
pub(super) const SEAL_LOCK: (i32, i32) = (0x4169_726c, 3);

/// Pending audit records chained per sealing transaction.
pub(super) const SEAL_BATCH: usize = 2_000;

/// How often a replica's sealer looks for pending records (a read of the chain seals first, so
/// this is how far behind an unread chain may be, not how stale a read can be).
pub(super) const SEAL_PERIOD: Duration = Duration::from_millis(100);

/// Queues an audit record of a tenant, in the transaction of the change it describes; [`seal`]
/// chains it after commit.
pub(super) async fn append_audit(tx: &Tx<'_>, tenant: &str, draft: Draft) -> Result<(), Fail> {
    tx.execute(
        "INSERT INTO audit_pending (tenant, at, kind, subject, actor, data) VALUES ($1, $2, $3, $4, $5, $6)",
        &[&tenant, &draft.at, &draft.kind.as_str(), &draft.subject, &draft.actor, &draft.data.to_string()],
    )
    .await?;
    Ok(())
}

/// Chains up to [`SEAL_BATCH`] pending audit records, in `id` order, onto their tenants' chains
/// in one transaction, under [`SEAL_LOCK`] so that sealers of different replicas take turns.
/// Returns how many it sealed. A record whose transaction commits while a batch is being sealed
/// is taken by the next batch: its ids may be lower than some already sealed, but a record
/// written after another's commit always has a larger id, so causal order is kept.
pub(super) async fn seal(client: &mut Client) -> Result<usize, Fail> {
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
            kind: audit_kind(get(row, 3)?)?,
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
        kinds.push(record.draft.kind.as_str());
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
pub(super) async fn seal_all(client: &mut Client) -> Result<(), Fail> {
    while seal(client).await? == SEAL_BATCH {}
    Ok(())
}

/// How often each replica vacuums the two queue tables, whose rows live for milliseconds.
pub(super) const TIDY_PERIOD: Duration = Duration::from_secs(1);

/// Vacuums `outbox` and `audit_pending`. Their rows are deleted as fast as they are written, and
/// until a vacuum removes them the dead rows and their index entries sort before the live ones:
/// the relay and the sealer, which read from the start, read them all each time (with
/// autovacuum off, 90 to 300 buffers a pass after 30 s at 1,000 jobs/s). Their live rows are a
/// few hundred, so this takes milliseconds (2.5 ms at 1,000 jobs/s); a table another vacuum
/// holds is skipped, not waited for; no truncation, which would lock out inserts meanwhile.
pub(super) async fn tidy(client: &Client) -> Result<(), Fail> {
    Ok(client.batch_execute("VACUUM (SKIP_LOCKED, TRUNCATE false) outbox, audit_pending").await?)
}

/// A replica's sealer: on its own connection, seals every [`SEAL_PERIOD`], so that each pass
/// chains many records in one transaction, and [tidies](tidy) every [`TIDY_PERIOD`];
/// reconnects when the connection is lost.
pub(super) async fn seal_loop(config: Config, tls: PgTls) {
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
