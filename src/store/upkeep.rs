//! Keeping the churn tables small. `backlog`, `outbox`, `batch_progress` and `token_slots` get
//! and lose rows by the thousand a second; every lost row stays behind as a dead tuple, in the
//! table and in its indexes, until a vacuum. Autovacuum looks at most once a minute (and may be
//! off): meanwhile each dispatch walks the dead entries at the head of `backlog_lane` again, and
//! the scans of the others slow down run after run. So one replica at a time vacuums those of
//! them that have gathered dead rows, a few seconds apart.

use sqlx::{PgConnection, PgPool};

use super::StoreError;

/// The tables whose rows come and go all the time.
const CHURN_TABLES: [&str; 4] = ["backlog", "outbox", "batch_progress", "token_slots"];

/// The advisory lock one replica holds while it vacuums (`'sdvc'`; not the class of the
/// replicas' own locks, whose second key is a replica's id).
const VACUUM_LOCK: (i32, i32) = (0x7364_7663, 0);

/// A table is vacuumed once it has this many dead rows.
const DEAD_ROWS: i64 = 2_000;

/// Vacuums the churn tables that have gathered [`DEAD_ROWS`] dead rows, unless another replica
/// is doing it now. Returns the tables vacuumed.
pub async fn vacuum_churn(pool: &PgPool) -> Result<Vec<String>, StoreError> {
    let mut conn = pool.acquire().await?;
    // A session lock, not a transaction's: VACUUM cannot run inside a transaction.
    let ours: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, $2)")
        .bind(VACUUM_LOCK.0)
        .bind(VACUUM_LOCK.1)
        .fetch_one(&mut *conn)
        .await?;
    if !ours {
        return Ok(Vec::new());
    }
    let result = vacuum_due(&mut conn).await;
    let _ = sqlx::query("SELECT pg_advisory_unlock($1, $2)")
        .bind(VACUUM_LOCK.0)
        .bind(VACUUM_LOCK.1)
        .execute(&mut *conn)
        .await;
    result
}

async fn vacuum_due(conn: &mut PgConnection) -> Result<Vec<String>, StoreError> {
    let due: Vec<String> = sqlx::query_scalar(
        "SELECT relname::text FROM pg_stat_user_tables
          WHERE schemaname = 'sheepdog' AND relname = ANY($1) AND n_dead_tup >= $2
          ORDER BY relname",
    )
    .bind(&CHURN_TABLES[..])
    .bind(DEAD_ROWS)
    .fetch_all(&mut *conn)
    .await?;
    for table in &due {
        // The name is one of CHURN_TABLES, not input.
        let vacuum = format!("VACUUM sheepdog.{table}");
        sqlx::query(&vacuum).persistent(false).execute(&mut *conn).await?;
    }
    Ok(due)
}

/// Vacuums every table of the database (`bench`, before a run in its own database, so each run
/// starts from the same clean state rather than from the dead rows of the runs before it).
pub async fn vacuum_database(pool: &PgPool) -> Result<(), StoreError> {
    sqlx::query("VACUUM").persistent(false).execute(pool).await?;
    Ok(())
}
