//! Keeping the churn tables small. `backlog`, `outbox`, `batch_progress` and `token_slots` get
//! and lose rows by the thousand a second; every lost row stays behind as a dead tuple, in the
//! table and in its indexes, until a vacuum. Autovacuum looks at most once a minute (and may be
//! off): meanwhile each dispatch walks the dead entries at the head of the backlog's key again,
//! and the scans of the others slow down run after run. So the replicas vacuum those of them that
//! have gathered dead rows, a few seconds apart; a table another replica is vacuuming is skipped
//! (`SKIP_LOCKED`), which also works behind a pooler in transaction mode (no session lock).

use super::sql::{query_scalar, Standalone};
use sqlx::PgPool;

use super::StoreError;

/// The tables whose rows come and go all the time.
const CHURN_TABLES: [&str; 4] = ["backlog", "outbox", "batch_progress", "token_slots"];

/// A table is vacuumed once it has this many dead rows.
const DEAD_ROWS: i64 = 2_000;

/// Vacuums the churn tables that have gathered [`DEAD_ROWS`] dead rows, skipping one another
/// replica is vacuuming now. Returns the tables vacuumed.
pub async fn vacuum_churn(pool: &PgPool) -> Result<Vec<String>, StoreError> {
    let due: Vec<String> = query_scalar(
        "SELECT relname::text FROM pg_stat_user_tables
          WHERE schemaname = 'sheepdog' AND relname = ANY($1) AND n_dead_tup >= $2
          ORDER BY relname",
    )
    .bind(&CHURN_TABLES[..])
    .bind(DEAD_ROWS)
    .all(pool)
    .await?;
    for table in &due {
        // The name is one of CHURN_TABLES, not input. VACUUM runs outside any transaction: a
        // statement by itself (the simple protocol: one round trip, no prepared statement).
        let vacuum = format!("VACUUM (SKIP_LOCKED) sheepdog.{table}");
        sqlx::raw_sql(&vacuum).execute(pool).await?;
    }
    Ok(due)
}

/// Vacuums every table of the database (`bench`, before a run in its own database, so each run
/// starts from the same clean state rather than from the dead rows of the runs before it).
pub async fn vacuum_database(pool: &PgPool) -> Result<(), StoreError> {
    sqlx::raw_sql("VACUUM").execute(pool).await?;
    Ok(())
}
