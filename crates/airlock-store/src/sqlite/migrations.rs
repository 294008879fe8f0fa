//! The schema migrations; `PRAGMA user_version` counts how many are applied.

use rusqlite::Connection;

use crate::StoreError;
use crate::codec::corrupt;

/// The schema migrations, in order; `PRAGMA user_version` counts how many are applied.
pub(super) const MIGRATIONS: [&str; 6] = [
    include_str!("schema.sql"),
    include_str!("schema_v2.sql"),
    include_str!("schema_v3.sql"),
    include_str!("schema_v4.sql"),
    include_str!("schema_v5.sql"),
    include_str!("schema_v6.sql"),
];

pub(super) fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
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
