//! The schema migrations, applied in order under an advisory lock so replicas may start together.

use super::pool::{Fail, Pool};
use super::rows::get;
use crate::StoreError;
use crate::codec::corrupt;

/// The schema migrations, in order; the `airlock_migrations` table records which are applied.
pub(super) const MIGRATIONS: [&str; 11] = [
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
    include_str!("postgres_schema_v11.sql"),
];

/// Advisory lock (two-key space, so no clash with the one-key locks below) held while
/// migrating, so that replicas starting together migrate once.
pub(super) const MIGRATION_LOCK: (i32, i32) = (0x4169_726c, 1);

impl Pool {
    /// Applies the migrations the database lacks, under [`MIGRATION_LOCK`].
    pub(super) async fn migrate(&self) -> Result<(), StoreError> {
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
