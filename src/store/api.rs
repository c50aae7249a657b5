//! The Batch API's tables (contract §10): producer keys, files and their chunks, API batches and
//! the creates seen recently. Every statement of `web::api` and `sheepdog keys` is here.

use super::sql::{query, query_as, query_scalar, Standalone, StandaloneRun};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde_json::Value;
use sqlx::types::Json;
use sqlx::PgPool;

use super::report::EndedJob;
use super::{Priority, StoreError};

// ---- Keys ----------------------------------------------------------------------------------

/// A producer key as `keys list` shows it (never the key, which is not stored).
#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct KeyRow {
    pub name: String,
    pub prefix: String,
    pub max_cost_usd: Option<Decimal>,
    pub period: String,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
    /// What its batches spent (and hold reserved) in the current period of its cap.
    pub spent_usd: Decimal,
}

/// Stores a new key. False when the name is taken (live or revoked: names are not reused, so
/// a name in the ledger always means one key).
pub async fn create_key(
    pool: &PgPool,
    name: &str,
    prefix: &str,
    hash: &[u8],
    max_cost_usd: Option<Decimal>,
    period: &str,
) -> Result<bool, StoreError> {
    let r = query(
        "INSERT INTO sheepdog.api_keys (name, prefix, key_hash, max_cost_usd, period)
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (name) DO NOTHING",
    )
    .bind(name)
    .bind(prefix)
    .bind(hash)
    .bind(max_cost_usd)
    .bind(period)
    .run(pool)
    .await?;
    Ok(r.rows_affected() == 1)
}

pub async fn keys(pool: &PgPool) -> Result<Vec<KeyRow>, StoreError> {
    Ok(query_as(
        "SELECT k.name, k.prefix, k.max_cost_usd, k.period, k.created_at, k.revoked_at,
                coalesce(b.spent + b.reserved, 0) AS spent_usd
           FROM sheepdog.api_keys k
           LEFT JOIN sheepdog.budget b ON b.scope = 'key:' || k.name
                 AND b.period_key = sheepdog.budget_period_key(k.period, now())
          ORDER BY k.created_at, k.name",
    )
    .all(pool)
    .await?)
}

/// Revokes a key: from this commit on, it is refused. False when there is no such live key.
pub async fn revoke_key(pool: &PgPool, name: &str) -> Result<bool, StoreError> {
    let r = query("UPDATE sheepdog.api_keys SET revoked_at = now() WHERE name = $1 AND revoked_at IS NULL")
        .bind(name)
        .run(pool)
        .await?;
    Ok(r.rows_affected() == 1)
}

/// The live keys with this prefix: (name, hash).
pub async fn live_keys_by_prefix(pool: &PgPool, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
    Ok(
        query_as("SELECT name, key_hash FROM sheepdog.api_keys WHERE prefix = $1 AND revoked_at IS NULL")
            .bind(prefix)
            .all(pool)
            .await?,
    )
}

// ---- Files ---------------------------------------------------------------------------------

/// A file as the API shows it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct FileRow {
    pub id: String,
    pub purpose: String,
    pub filename: String,
    pub bytes: i64,
    pub lines: i32,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    /// An output or error file: its batch and which of the two it is.
    pub batch_id: Option<String>,
    pub kind: Option<String>,
}

const FILE_COLUMNS: &str = "id, purpose, filename, bytes, lines, created_at, expires_at, batch_id, kind";

/// Starts an upload: a row nobody sees until [`finish_upload`].
pub async fn begin_upload(pool: &PgPool, id: &str, owner: &str, filename: &str) -> Result<(), StoreError> {
    query(
        "INSERT INTO sheepdog.api_files (id, owner, purpose, filename, state) VALUES ($1, $2, 'batch', $3, 'uploading')",
    )
    .bind(id)
    .bind(owner)
    .bind(filename)
    .run(pool)
    .await?;
    Ok(())
}

/// Stores the `seq`-th chunk of an upload.
pub async fn add_chunk(pool: &PgPool, id: &str, seq: i32, data: &[u8]) -> Result<(), StoreError> {
    query(
        "WITH c AS (INSERT INTO sheepdog.api_file_chunks (file_id, seq, data) VALUES ($1, $2, $3))
         UPDATE sheepdog.api_files SET touched_at = now() WHERE id = $1",
    )
    .bind(id)
    .bind(seq)
    .bind(data)
    .run(pool)
    .await?;
    Ok(())
}

/// Makes an upload a file: from this commit on it is listed and can be read.
pub async fn finish_upload(
    pool: &PgPool,
    id: &str,
    bytes: i64,
    lines: i32,
    ttl: Option<Duration>,
) -> Result<Option<FileRow>, StoreError> {
    Ok(query_as(&format!(
        "UPDATE sheepdog.api_files SET state = 'processed', bytes = $2, lines = $3, created_at = now(),
                expires_at = now() + make_interval(secs => $4)
          WHERE id = $1 AND state = 'uploading'
         RETURNING {FILE_COLUMNS}"
    ))
    .bind(id)
    .bind(bytes)
    .bind(lines)
    .bind(ttl.map(|t| t.as_secs_f64()))
    .maybe(pool)
    .await?)
}

/// Drops an upload that will not finish (its client went away, or it broke a limit).
pub async fn drop_upload(pool: &PgPool, id: &str) -> Result<(), StoreError> {
    query("DELETE FROM sheepdog.api_files WHERE id = $1 AND state = 'uploading'")
        .bind(id)
        .run(pool)
        .await?;
    Ok(())
}

/// One of `owner`'s files.
pub async fn file(pool: &PgPool, owner: &str, id: &str) -> Result<Option<FileRow>, StoreError> {
    Ok(query_as(&format!(
        "SELECT {FILE_COLUMNS} FROM sheepdog.api_files WHERE id = $1 AND owner = $2 AND state = 'processed'"
    ))
    .bind(id)
    .bind(owner)
    .maybe(pool)
    .await?)
}

/// A page of `owner`'s files, newest first (or oldest first), after the file `after`.
pub async fn files(
    pool: &PgPool,
    owner: &str,
    purpose: Option<&str>,
    newest_first: bool,
    after: Option<&str>,
    limit: i64,
) -> Result<Vec<FileRow>, StoreError> {
    let (cmp, order) = if newest_first { ("<", "DESC") } else { (">", "ASC") };
    Ok(query_as(&format!(
        "SELECT {FILE_COLUMNS} FROM sheepdog.api_files f
          WHERE f.owner = $1 AND f.state = 'processed' AND ($2::text IS NULL OR f.purpose = $2)
            AND ($3::text IS NULL OR f.seq {cmp} (SELECT seq FROM sheepdog.api_files WHERE id = $3 AND owner = $1))
          ORDER BY f.seq {order} LIMIT $4"
    ))
    .bind(owner)
    .bind(purpose)
    .bind(after)
    .bind(limit)
    .all(pool)
    .await?)
}

/// The `seq`-th chunk of an uploaded file, if there is one.
pub async fn chunk(pool: &PgPool, id: &str, seq: i32) -> Result<Option<Vec<u8>>, StoreError> {
    Ok(
        query_scalar("SELECT data FROM sheepdog.api_file_chunks WHERE file_id = $1 AND seq = $2")
            .bind(id)
            .bind(seq)
            .maybe(pool)
            .await?,
    )
}

/// Deletes one of `owner`'s files (its chunks with it). False when there is none.
pub async fn delete_file(pool: &PgPool, owner: &str, id: &str) -> Result<bool, StoreError> {
    let r = query("DELETE FROM sheepdog.api_files WHERE id = $1 AND owner = $2 AND state = 'processed'")
        .bind(id)
        .bind(owner)
        .run(pool)
        .await?;
    Ok(r.rows_affected() == 1)
}

/// Deletes up to 100 files past their expiry, and uploads untouched for `stale` (their client
/// or their API process died). Returns how many went.
pub async fn expire_files(pool: &PgPool, stale: Duration) -> Result<u64, StoreError> {
    let r = query(
        "DELETE FROM sheepdog.api_files WHERE id IN (
             SELECT id FROM sheepdog.api_files
              WHERE (state = 'processed' AND expires_at <= now())
                 OR (state = 'uploading' AND touched_at < now() - make_interval(secs => $1))
              LIMIT 100)",
    )
    .bind(stale.as_secs_f64())
    .run(pool)
    .await?;
    // Creates remembered for idempotency are of no use after a day.
    query("DELETE FROM sheepdog.api_batch_requests WHERE created_at < now() - interval '1 day'")
        .run(pool)
        .await?;
    Ok(r.rows_affected())
}

// ---- Batches -------------------------------------------------------------------------------

/// A batch to create.
#[derive(Debug, Clone)]
pub struct NewBatch<'a> {
    pub id: &'a str,
    pub owner: &'a str,
    pub input_file_id: &'a str,
    pub endpoint: &'a str,
    pub completion_window: &'a str,
    pub window: Duration,
    pub metadata: Option<&'a Value>,
    pub priority: Option<Priority>,
    pub max_cost_usd: Option<Decimal>,
    /// What makes two creates the same one, and for how long.
    pub fingerprint: &'a str,
    pub same_within: Duration,
    /// This process, which validates and publishes it; for how long before another may.
    pub lease_owner: &'a str,
    pub lease: Duration,
}

/// What `create_batch` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Created {
    /// The batch is new (its id as given).
    New,
    /// The same create came within the window: its batch.
    Existing(String),
}

/// Creates an API batch, or finds the one the same create made within its window. In one
/// transaction: the create's fingerprint (its primary key decides between two at once: the
/// second waits for the first and then sees its row), the sheepdog batch in control
/// `validating` (which dispatch skips), and the API row, leased to this process.
pub async fn create_batch(pool: &PgPool, b: &NewBatch<'_>) -> Result<Created, StoreError> {
    let mut tx = pool.begin().await?;
    let mine: Option<String> = query_scalar(
        "INSERT INTO sheepdog.api_batch_requests AS r (owner, fingerprint, batch_id) VALUES ($1, $2, $3)
         ON CONFLICT (owner, fingerprint) DO UPDATE SET batch_id = EXCLUDED.batch_id, created_at = now()
          WHERE r.created_at < now() - make_interval(secs => $4)
         RETURNING batch_id",
    )
    .bind(b.owner)
    .bind(b.fingerprint)
    .bind(b.id)
    .bind(b.same_within.as_secs_f64())
    .fetch_optional(&mut *tx)
    .await?;
    if mine.is_none() {
        let existing: String =
            query_scalar("SELECT batch_id FROM sheepdog.api_batch_requests WHERE owner = $1 AND fingerprint = $2")
                .bind(b.owner)
                .bind(b.fingerprint)
                .fetch_one(&mut *tx)
                .await?;
        tx.commit().await?;
        return Ok(Created::Existing(existing));
    }
    query(
        "INSERT INTO sheepdog.batches (batch_id, priority, max_cost_usd, expires_at, control)
         VALUES ($1, coalesce($2, 1::smallint), $3, now() + make_interval(secs => $4), 'validating')",
    )
    .bind(b.id)
    .bind(b.priority.map(|p| p.level()))
    .bind(b.max_cost_usd.filter(|c| !c.is_zero()))
    .bind(b.window.as_secs_f64())
    .execute(&mut *tx)
    .await?;
    query(
        "INSERT INTO sheepdog.api_batches (id, owner, input_file_id, endpoint, completion_window, metadata, phase,
                                           lease_owner, lease_until)
         VALUES ($1, $2, $3, $4, $5, $6, 'validating', $7, now() + make_interval(secs => $8))",
    )
    .bind(b.id)
    .bind(b.owner)
    .bind(b.input_file_id)
    .bind(b.endpoint)
    .bind(b.completion_window)
    .bind(b.metadata.map(Json))
    .bind(b.lease_owner)
    .bind(b.lease.as_secs_f64())
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Created::New)
}

/// The API side of a batch.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ApiBatch {
    pub id: String,
    pub owner: String,
    pub input_file_id: String,
    pub endpoint: String,
    pub completion_window: String,
    pub metadata: Option<Json<Value>>,
    pub phase: String,
    pub errors: Option<Json<Value>>,
    pub in_progress_at: Option<DateTime<Utc>>,
    pub failed_at: Option<DateTime<Utc>>,
    pub finalizing_at: Option<DateTime<Utc>>,
    pub ended_at: Option<DateTime<Utc>>,
    pub output_file_id: Option<String>,
    pub error_file_id: Option<String>,
    pub created_at: DateTime<Utc>,
}

const BATCH_COLUMNS: &str = "id, owner, input_file_id, endpoint, completion_window, metadata, phase, errors,
     in_progress_at, failed_at, finalizing_at, ended_at, output_file_id, error_file_id, created_at";

/// One of `owner`'s batches.
pub async fn batch(pool: &PgPool, owner: &str, id: &str) -> Result<Option<ApiBatch>, StoreError> {
    Ok(query_as(&format!(
        "SELECT {BATCH_COLUMNS} FROM sheepdog.api_batches WHERE id = $1 AND owner = $2"
    ))
    .bind(id)
    .bind(owner)
    .maybe(pool)
    .await?)
}

/// A page of `owner`'s batches, newest first, after the batch `after`.
pub async fn batches(pool: &PgPool, owner: &str, after: Option<&str>, limit: i64) -> Result<Vec<ApiBatch>, StoreError> {
    Ok(query_as(&format!(
        "SELECT {BATCH_COLUMNS} FROM sheepdog.api_batches
          WHERE owner = $1
            AND ($2::text IS NULL OR seq < (SELECT seq FROM sheepdog.api_batches WHERE id = $2 AND owner = $1))
          ORDER BY seq DESC LIMIT $3"
    ))
    .bind(owner)
    .bind(after)
    .bind(limit)
    .all(pool)
    .await?)
}

/// Takes over a batch left validating by a process that died (its lease ran out). Returns it.
pub async fn claim_orphan(pool: &PgPool, me: &str, lease: Duration) -> Result<Option<String>, StoreError> {
    Ok(query_scalar(
        "UPDATE sheepdog.api_batches SET lease_owner = $1, lease_until = now() + make_interval(secs => $2)
          WHERE id = (SELECT id FROM sheepdog.api_batches
                       WHERE phase = 'validating' AND (lease_until IS NULL OR lease_until < now())
                       ORDER BY seq LIMIT 1 FOR UPDATE SKIP LOCKED)
         RETURNING id",
    )
    .bind(me)
    .bind(lease.as_secs_f64())
    .maybe(pool)
    .await?)
}

/// Extends this process's lease on a batch it validates. False when it lost it.
pub async fn renew(pool: &PgPool, id: &str, me: &str, lease: Duration) -> Result<bool, StoreError> {
    let r = query(
        "UPDATE sheepdog.api_batches SET lease_until = now() + make_interval(secs => $3)
          WHERE id = $1 AND lease_owner = $2 AND phase = 'validating'",
    )
    .bind(id)
    .bind(me)
    .bind(lease.as_secs_f64())
    .run(pool)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// Lets another process (or this one, later) take the batch up again at once.
pub async fn release(pool: &PgPool, id: &str, me: &str) -> Result<(), StoreError> {
    query("UPDATE sheepdog.api_batches SET lease_until = now() WHERE id = $1 AND lease_owner = $2")
        .bind(id)
        .bind(me)
        .run(pool)
        .await?;
    Ok(())
}

/// The control of a sheepdog batch (`validating`, `active`, `cancelled`, …).
pub async fn control(pool: &PgPool, id: &str) -> Result<Option<String>, StoreError> {
    Ok(query_scalar("SELECT control FROM sheepdog.batches WHERE batch_id = $1")
        .bind(id)
        .maybe(pool)
        .await?)
}

/// Ends a batch whose file broke the rules: `failed` with its errors, on both sides, so that
/// nothing of it is ever called.
pub async fn fail(pool: &PgPool, id: &str, errors: &Value) -> Result<bool, StoreError> {
    let mut tx = pool.begin().await?;
    let r = query(
        "UPDATE sheepdog.api_batches SET phase = 'failed', errors = $2, failed_at = now(), lease_until = NULL
          WHERE id = $1 AND phase = 'validating'",
    )
    .bind(id)
    .bind(Json(errors))
    .execute(&mut *tx)
    .await?;
    query(
        "UPDATE sheepdog.batches SET control = 'failed', finished_at = coalesce(finished_at, now()), updated_at = now()
          WHERE batch_id = $1 AND control IN ('validating', 'cancelled')",
    )
    .bind(id)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(r.rows_affected() == 1)
}

/// Every line is published and confirmed: in one statement, the sheepdog batch may be called
/// (unless it was cancelled meanwhile) and the API batch is running.
pub async fn activate(pool: &PgPool, id: &str) -> Result<bool, StoreError> {
    Ok(query_scalar(
        "WITH b AS (
             UPDATE sheepdog.batches SET control = 'active', updated_at = now()
              WHERE batch_id = $1 AND control = 'validating'
         )
         UPDATE sheepdog.api_batches SET phase = 'running', in_progress_at = now(), lease_until = NULL
          WHERE id = $1 AND phase = 'validating'
         RETURNING true",
    )
    .bind(id)
    .maybe(pool)
    .await?
    .unwrap_or(false))
}

/// Running API batches (their sheepdog batches decide when they end).
pub async fn running(pool: &PgPool) -> Result<Vec<String>, StoreError> {
    Ok(
        query_scalar("SELECT id FROM sheepdog.api_batches WHERE phase = 'running' ORDER BY seq")
            .all(pool)
            .await?,
    )
}

/// Notes when a batch's results started being made.
pub async fn mark_finalizing(pool: &PgPool, id: &str) -> Result<(), StoreError> {
    query("UPDATE sheepdog.api_batches SET finalizing_at = coalesce(finalizing_at, now()) WHERE id = $1")
        .bind(id)
        .run(pool)
        .await?;
    Ok(())
}

/// An output or error file of a batch: (id, bytes, lines).
pub type MadeFile = (String, i64, i32);

/// Ends a running batch with its output and error files (a file with no line is none). Once.
pub async fn finalize(
    pool: &PgPool,
    id: &str,
    output: Option<MadeFile>,
    error: Option<MadeFile>,
    ttl: Option<Duration>,
) -> Result<bool, StoreError> {
    let mut tx = pool.begin().await?;
    let owner: Option<String> = query_scalar(
        "UPDATE sheepdog.api_batches SET phase = 'ended', ended_at = now(), output_file_id = $2, error_file_id = $3
          WHERE id = $1 AND phase = 'running' RETURNING owner",
    )
    .bind(id)
    .bind(output.as_ref().map(|f| f.0.as_str()))
    .bind(error.as_ref().map(|f| f.0.as_str()))
    .fetch_optional(&mut *tx)
    .await?;
    let Some(owner) = owner else {
        return Ok(false);
    };
    for (f, kind) in [(output, "output"), (error, "error")] {
        let Some((file_id, bytes, lines)) = f else { continue };
        query(
            "INSERT INTO sheepdog.api_files (id, owner, purpose, filename, state, bytes, lines, batch_id, kind, expires_at)
             VALUES ($1, $2, 'batch_output', $3, 'processed', $4, $5, $6, $7, now() + make_interval(secs => $8))",
        )
        .bind(&file_id)
        .bind(&owner)
        .bind(format!("{id}_{kind}.jsonl"))
        .bind(bytes)
        .bind(lines)
        .bind(id)
        .bind(kind)
        .bind(ttl.map(|t| t.as_secs_f64()))
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(true)
}

/// The ended jobs of a batch that go to its output file (answered 2xx: `succeeded`) or to its
/// error file (the others), in `custom_id` order.
pub fn result_rows<'a>(
    pool: &'a PgPool,
    batch_id: &'a str,
    output: bool,
) -> futures::stream::BoxStream<'a, sqlx::Result<EndedJob>> {
    super::report::ended_rows(pool, batch_id, Some(output))
}

/// A batch, whoever owns it (the API's own background work).
pub async fn batch_any(pool: &PgPool, id: &str) -> Result<Option<ApiBatch>, StoreError> {
    Ok(query_as(&format!(
        "SELECT {BATCH_COLUMNS} FROM sheepdog.api_batches WHERE id = $1"
    ))
    .bind(id)
    .maybe(pool)
    .await?)
}
