//! Batches as producers control them (contract §7): their settings, pause, resume, cancel and
//! deadline; their figures, kept on the batch row by folding `batch_progress`; and their end,
//! announced on the results stream (§8).

use super::sql::{query, query_as, query_scalar, Standalone};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Serialize;
use sqlx::PgPool;

use super::{Priority, StoreError};

/// The outbox rows of the `job.finished` events of jobs in a CTE of job rows: one row per batch
/// with its jobs' custom ids; a use reads `{FINISHED_EVENTS} FROM cte j [WHERE …] GROUP BY
/// j.batch_id`. Only the jobs are recorded: the events' bodies are built when they are published.
pub(super) const FINISHED_EVENTS: &str =
    "INSERT INTO sheepdog.outbox (exchange, routing_key, headers, body, job_custom_ids)
     SELECT 'sheepdog.results', j.batch_id, '{\"x-sheepdog-event\": \"job.finished\"}'::jsonb, '',
            array_agg(j.custom_id)";

/// What a producer may change of a batch; `None` leaves a setting as it is.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BatchSettings {
    pub priority: Option<Priority>,
    /// Its spend never passes this (worst cases reserved); zero removes the cap.
    pub max_cost_usd: Option<Decimal>,
    /// No call starts later than this after the batch was created; its unfinished jobs expire.
    pub completion_window: Option<std::time::Duration>,
}

impl BatchSettings {
    pub fn is_empty(&self) -> bool {
        *self == BatchSettings::default()
    }
}

/// A completion window: `90s`, `30m`, `24h`, `2d`, or a number of seconds.
pub fn parse_window(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 90s, 30m, 24h or 2d"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86_400.0,
        _ => return Err(format!("{s:?}: the unit is s, m, h or d")),
    };
    if !(secs.is_finite() && secs > 0.0) {
        return Err(format!("{s:?} must be longer than zero"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Sets a batch's priority (the batch need not have jobs yet: a producer may set it before
/// publishing). Its waiting jobs take it at the next dispatch.
pub async fn set_priority(pool: &PgPool, batch_id: &str, priority: Priority) -> Result<(), StoreError> {
    set(
        pool,
        batch_id,
        &BatchSettings {
            priority: Some(priority),
            ..Default::default()
        },
    )
    .await
}

/// Applies settings to a batch, creating its row if needed. A cap switched on counts what the
/// batch's calls already spent (calls in flight at their reservation).
pub async fn set(pool: &PgPool, batch_id: &str, s: &BatchSettings) -> Result<(), StoreError> {
    let mut tx = pool.begin().await?;
    query(
        "INSERT INTO sheepdog.batches AS b (batch_id, priority, max_cost_usd, expires_at)
         VALUES ($1, coalesce($2, 1::smallint), CASE WHEN $3 = 0 THEN NULL ELSE $3 END,
                 now() + make_interval(secs => $4))
         ON CONFLICT (batch_id) DO UPDATE SET
             priority = coalesce($2, b.priority),
             max_cost_usd = CASE WHEN $3 IS NULL THEN b.max_cost_usd WHEN $3 = 0 THEN NULL ELSE $3 END,
             expires_at = CASE WHEN $4 IS NULL THEN b.expires_at
                               ELSE b.created_at + make_interval(secs => $4) END,
             updated_at = now()",
    )
    .bind(batch_id)
    .bind(s.priority.map(|p| p.level()))
    .bind(s.max_cost_usd)
    .bind(s.completion_window.map(|w| w.as_secs_f64()))
    .execute(&mut *tx)
    .await?;
    if s.max_cost_usd.is_some_and(|c| !c.is_zero()) {
        // The cap's own budget, scope `batch:<id>`, period `total`: what the batch's calls spent,
        // and what those in flight reserved under it.
        query(
            r#"
            INSERT INTO sheepdog.budget AS b (scope, period_key, spent, reserved)
            SELECT 'batch:' || $1, 'total',
                   coalesce(sum(c.cost_usd) FILTER (WHERE c.outcome <> 'pending'), 0)
                 + coalesce(sum(c.reserved_cost_usd) FILTER (
                       WHERE c.outcome = 'pending' AND NOT ('batch:' || $1 || '|total') = ANY(coalesce(c.budget_keys, '{}'))), 0),
                   coalesce(sum(c.reserved_cost_usd) FILTER (
                       WHERE c.outcome = 'pending' AND ('batch:' || $1 || '|total') = ANY(coalesce(c.budget_keys, '{}'))), 0)
              FROM sheepdog.calls c WHERE c.batch_id = $1
            ON CONFLICT (scope, period_key) DO UPDATE SET spent = EXCLUDED.spent, reserved = EXCLUDED.reserved
            "#,
        )
        .bind(batch_id)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Pauses or resumes a batch: paused, its jobs wait without a call or an attempt. Returns false
/// when there is no such batch, or it is cancelled, or an API batch still validating or failed.
pub async fn set_paused(pool: &PgPool, batch_id: &str, paused: bool) -> Result<bool, StoreError> {
    let mut tx = pool.begin().await?;
    // The lock every dispatch takes first: once this commits, no grant races it.
    super::dispatch::lock(&mut tx).await?;
    let r = query(
        "UPDATE sheepdog.batches SET control = $2, updated_at = now()
          WHERE batch_id = $1 AND control IN ('active', 'paused')",
    )
    .bind(batch_id)
    .bind(if paused { "paused" } else { "active" })
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(r.rows_affected() > 0)
}

/// What `cancel` did.
#[derive(Debug, Clone, Default)]
pub struct Cancelled {
    /// False when there is no such batch.
    pub found: bool,
    /// Jobs that ended `cancelled` now (waiting, or not yet arrived from the broker).
    pub jobs: i64,
    /// Calls in flight: their jobs end as their answers say (the batch is `cancelling` meanwhile).
    pub in_flight: i64,
}

/// Cancels a batch. It takes the lock every dispatch takes first, so once that commits no
/// replica is granted a call for the batch. Then its waiting jobs end `cancelled` with an event
/// each, a chunk per transaction so that a batch of a million jobs never holds dispatch up (the
/// upkeep of every worker finishes the job if this is interrupted); a job of it that arrives
/// later, or comes back from a call, ends `cancelled` too. Cancelling twice is fine.
pub async fn cancel(pool: &PgPool, batch_id: &str) -> Result<Cancelled, StoreError> {
    let mut tx = pool.begin().await?;
    super::dispatch::lock(&mut tx).await?;
    let found: Option<bool> = query_scalar(
        "UPDATE sheepdog.batches SET updated_at = now(),
                -- An API batch whose file failed validation stays `failed`: nothing of it runs.
                control = CASE WHEN control = 'failed' THEN control ELSE 'cancelled' END,
                cancelled_at = CASE WHEN control = 'failed' THEN cancelled_at ELSE coalesce(cancelled_at, now()) END
          WHERE batch_id = $1 RETURNING true",
    )
    .bind(batch_id)
    .fetch_optional(&mut *tx)
    .await?;
    if found.is_none() {
        return Ok(Cancelled::default());
    }
    tx.commit().await?;
    let jobs = end_all_waiting(pool, &[batch_id.to_string()], "cancelled").await?;
    let in_flight: i64 =
        query_scalar("SELECT count(*) FROM sheepdog.calls WHERE batch_id = $1 AND outcome = 'pending'")
            .bind(batch_id)
            .one(pool)
            .await?;
    Ok(Cancelled {
        found: true,
        jobs,
        in_flight,
    })
}

/// Jobs ended per transaction by `end_all_waiting`.
const END_CHUNK: i64 = 5_000;

/// Ends every waiting job of batches as `cancelled` or `expired`, a chunk per transaction.
async fn end_all_waiting(pool: &PgPool, batches: &[String], status: &str) -> Result<i64, StoreError> {
    let mut total = 0;
    loop {
        let n = end_waiting(pool, batches, status).await?;
        total += n;
        if n < END_CHUNK {
            return Ok(total);
        }
    }
}

/// Ends up to `END_CHUNK` waiting jobs of batches as `cancelled` or `expired`, and as many
/// registered by `enqueue` whose messages have not arrived. A waiting job is one in the backlog
/// (found through the backlog's key, model by model); a job in flight has no backlog row and is
/// left alone (its answer ends it). Each gets its error, its event and its count. Returns how
/// many ended.
async fn end_waiting(pool: &PgPool, batches: &[String], status: &str) -> Result<i64, StoreError> {
    let n: i64 = query_scalar(&format!(
        r#"
        WITH RECURSIVE lanes AS (
            (SELECT model, batch_id FROM sheepdog.backlog ORDER BY model, batch_id LIMIT 1)
            UNION ALL
            SELECT n.model, n.batch_id FROM lanes p CROSS JOIN LATERAL (
                SELECT b.model, b.batch_id FROM sheepdog.backlog b
                 WHERE (b.model, b.batch_id) > (p.model, p.batch_id)
                 ORDER BY b.model, b.batch_id LIMIT 1) n
        ), waiting AS (
            SELECT x.model, x.batch_id, x.seq
              FROM lanes l CROSS JOIN LATERAL (
                   SELECT b.model, b.batch_id, b.seq FROM sheepdog.backlog b
                    WHERE b.model = l.model AND b.batch_id = l.batch_id LIMIT $3) x
             WHERE l.batch_id = ANY($1)
             LIMIT $3
        ), gone AS (
            DELETE FROM sheepdog.backlog b USING waiting w
             WHERE b.model = w.model AND b.batch_id = w.batch_id AND b.seq = w.seq
            RETURNING b.batch_id, b.custom_id
        ), registered AS (
            SELECT batch_id, custom_id FROM sheepdog.jobs
             WHERE batch_id = ANY($1) AND status = 'queued' AND request IS NULL AND message IS NULL
             LIMIT $3 FOR UPDATE SKIP LOCKED
        ), ended AS (
            UPDATE sheepdog.jobs j SET status = $2, finished_at = now(), message = NULL, request = NULL,
                   error = sheepdog.batch_end_error($2)
             WHERE (j.batch_id, j.custom_id) IN (SELECT batch_id, custom_id FROM gone
                                                 UNION ALL SELECT batch_id, custom_id FROM registered)
               AND j.status = 'queued'
            RETURNING j.*
        ), counted AS (
            INSERT INTO sheepdog.batch_progress (batch_id, cancelled, expired, finished_at)
            SELECT batch_id, CASE $2 WHEN 'cancelled' THEN count(*) ELSE 0 END,
                   CASE $2 WHEN 'expired' THEN count(*) ELSE 0 END, now()
              FROM ended GROUP BY batch_id
        ), events AS (
            {FINISHED_EVENTS} FROM ended j GROUP BY j.batch_id
        )
        SELECT count(*) FROM ended
        "#
    ))
    .bind(batches)
    .bind(status)
    .bind(END_CHUNK)
    .one(pool)
    .await?;
    Ok(n)
}

/// Ends the waiting jobs of batches whose completion window is over as `expired`, and of
/// cancelled batches whose `cancel` was interrupted as `cancelled`. Dispatch grants nothing for
/// such a batch already; this settles what was left. Returns how many.
pub async fn expire_due(pool: &PgPool) -> Result<i64, StoreError> {
    let due: Vec<(String, bool)> = query_as(
        "SELECT batch_id, control IN ('cancelled', 'failed') FROM sheepdog.batches
          WHERE (expires_at <= now() OR control IN ('cancelled', 'failed')) AND finished_at IS NULL",
    )
    .all(pool)
    .await?;
    let (cancelled, expired): (Vec<_>, Vec<_>) = due.into_iter().partition(|(_, c)| *c);
    let ids = |v: Vec<(String, bool)>| v.into_iter().map(|(b, _)| b).collect::<Vec<_>>();
    let mut n = 0;
    for (batches, status) in [(ids(cancelled), "cancelled"), (ids(expired), "expired")] {
        if !batches.is_empty() {
            n += end_all_waiting(pool, &batches, status).await?;
        }
    }
    Ok(n)
}

/// Folds the figures that statements appended into the batch rows, and announces batches that
/// ended (`batch.finished`). One replica at a time does it (others skip while one holds the
/// lock). Returns the batches that ended now.
pub async fn fold_progress(pool: &PgPool) -> Result<Vec<String>, StoreError> {
    let mut tx = pool.begin().await?;
    let ours: bool = query_scalar("SELECT pg_try_advisory_xact_lock(1936221541, 0)")
        .fetch_one(&mut *tx)
        .await?;
    if !ours {
        return Ok(Vec::new());
    }
    query(
        r#"
        WITH d AS (
            DELETE FROM sheepdog.batch_progress RETURNING *
        ), sums AS (
            SELECT batch_id, sum(admitted) AS admitted, sum(succeeded) AS succeeded, sum(failed) AS failed,
                   sum(cancelled) AS cancelled, sum(expired) AS expired, sum(calls) AS calls,
                   sum(prompt_tokens) AS prompt_tokens, sum(completion_tokens) AS completion_tokens,
                   sum(cost_usd) AS cost_usd, max(finished_at) AS finished_at
              FROM d GROUP BY batch_id
        )
        UPDATE sheepdog.batches b SET
            admitted = b.admitted + s.admitted, succeeded = b.succeeded + s.succeeded,
            failed = b.failed + s.failed, cancelled = b.cancelled + s.cancelled,
            expired = b.expired + s.expired, calls = b.calls + s.calls,
            prompt_tokens = b.prompt_tokens + s.prompt_tokens,
            completion_tokens = b.completion_tokens + s.completion_tokens,
            cost_usd = b.cost_usd + s.cost_usd,
            last_finished_at = greatest(b.last_finished_at, s.finished_at),
            -- More jobs arrived for a batch that had ended: it is open again.
            finished_at = CASE WHEN b.succeeded + s.succeeded + b.failed + s.failed + b.cancelled + s.cancelled
                                    + b.expired + s.expired < greatest(b.size, b.admitted + s.admitted)
                               THEN NULL ELSE b.finished_at END
          FROM sums s WHERE b.batch_id = s.batch_id
        "#,
    )
    .execute(&mut *tx)
    .await?;
    // A batch ends when every job known for it has ended, none of its calls is in flight, and
    // every one of its job events has been published (so `batch.finished` comes after them).
    let ended: Vec<String> = query_scalar(
        "UPDATE sheepdog.batches b SET finished_at = now()
          WHERE b.finished_at IS NULL
            AND greatest(b.size, b.admitted) > 0
            AND b.succeeded + b.failed + b.cancelled + b.expired >= greatest(b.size, b.admitted)
            AND NOT EXISTS (SELECT 1 FROM sheepdog.calls c WHERE c.batch_id = b.batch_id AND c.outcome = 'pending')
            AND NOT EXISTS (SELECT 1 FROM sheepdog.outbox o
                             WHERE o.exchange = 'sheepdog.results' AND o.routing_key = b.batch_id)
         RETURNING b.batch_id",
    )
    .fetch_all(&mut *tx)
    .await?;
    if !ended.is_empty() {
        let objects = objects(&mut tx, &ended).await?;
        for o in objects {
            query(
                "INSERT INTO sheepdog.outbox (exchange, routing_key, headers, body)
                 VALUES ('sheepdog.results', $1, '{\"x-sheepdog-event\": \"batch.finished\"}', $2)",
            )
            .bind(&o.id)
            .bind(serde_json::to_vec(&o).unwrap_or_default())
            .execute(&mut *tx)
            .await?;
        }
    }
    tx.commit().await?;
    Ok(ended)
}

/// A batch in the OpenAI Batch object's vocabulary, plus what sheepdog adds.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct BatchObject {
    pub id: String,
    pub object: String,
    pub status: String,
    #[sqlx(flatten)]
    pub request_counts: RequestCounts,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub cancelled_at: Option<i64>,
    pub completed_at: Option<i64>,
    pub priority: String,
    pub max_cost_usd: Option<Decimal>,
    pub cost_usd: Decimal,
    pub cancelled: i64,
    pub expired: i64,
    pub in_flight: i64,
    pub calls: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    /// What the account was charged for the settled calls, in `currency` (contract §3): filled
    /// by [`show`] where the account is charged other than USD one for one.
    #[sqlx(skip)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost_charged: Option<Decimal>,
    #[sqlx(skip)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub currency: Option<String>,
}

/// `request_counts` as the OpenAI Batch object has it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct RequestCounts {
    pub total: i64,
    pub completed: i64,
    pub failed: i64,
}

const OBJECT_QUERY: &str = r#"
    WITH p AS (
        SELECT batch_id, sum(admitted) AS admitted, sum(succeeded) AS succeeded, sum(failed) AS failed,
               sum(cancelled) AS cancelled, sum(expired) AS expired, sum(calls) AS calls,
               sum(prompt_tokens)::bigint AS prompt_tokens,
               sum(completion_tokens)::bigint AS completion_tokens, sum(cost_usd) AS cost_usd
          FROM sheepdog.batch_progress WHERE batch_id = ANY($1) GROUP BY batch_id
    ), f AS (
        SELECT batch_id, count(*) AS in_flight FROM sheepdog.calls
         WHERE outcome = 'pending' AND batch_id = ANY($1) GROUP BY batch_id
    ), x AS (
        SELECT b.*, b.admitted + coalesce(p.admitted, 0) AS adm,
               b.succeeded + coalesce(p.succeeded, 0) AS ok,
               b.failed + coalesce(p.failed, 0) AS bad,
               b.cancelled + coalesce(p.cancelled, 0) AS canc,
               b.expired + coalesce(p.expired, 0) AS exp,
               b.calls + coalesce(p.calls, 0) AS n_calls,
               b.prompt_tokens + coalesce(p.prompt_tokens, 0) AS pt,
               b.completion_tokens + coalesce(p.completion_tokens, 0) AS ct,
               b.cost_usd + coalesce(p.cost_usd, 0) AS cost,
               coalesce(f.in_flight, 0) AS flying
          FROM sheepdog.batches b
          LEFT JOIN p ON p.batch_id = b.batch_id
          LEFT JOIN f ON f.batch_id = b.batch_id
         WHERE b.batch_id = ANY($1)
    )
    SELECT batch_id AS id, 'batch' AS object,
           sheepdog.batch_status(control, greatest(size, adm), ok + bad + canc + exp, exp, expires_at,
                                 n_calls > 0 OR ok + bad > 0, flying) AS status,
           greatest(size, adm) AS total, ok AS completed, bad AS failed,
           extract(epoch FROM created_at)::bigint AS created_at,
           extract(epoch FROM expires_at)::bigint AS expires_at,
           extract(epoch FROM cancelled_at)::bigint AS cancelled_at,
           extract(epoch FROM finished_at)::bigint AS completed_at,
           CASE priority WHEN 2 THEN 'high' WHEN 0 THEN 'low' ELSE 'normal' END AS priority,
           max_cost_usd, cost AS cost_usd, canc AS cancelled, exp AS expired, flying AS in_flight,
           n_calls AS calls, pt AS prompt_tokens, ct AS completion_tokens
      FROM x ORDER BY created_at DESC, batch_id
"#;

async fn objects(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    ids: &[String],
) -> Result<Vec<BatchObject>, StoreError> {
    Ok(query_as(OBJECT_QUERY).bind(ids).fetch_all(&mut **tx).await?)
}

/// One batch, or none; with what it was charged where the account's currency is not USD.
pub async fn show(pool: &PgPool, batch_id: &str) -> Result<Option<BatchObject>, StoreError> {
    let found: Option<BatchObject> = query_as(OBJECT_QUERY)
        .bind(vec![batch_id.to_string()])
        .maybe(pool)
        .await?;
    let Some(mut o) = found else {
        return Ok(None);
    };
    if let Some((currency, charged)) = super::currency::batch_charged(pool, batch_id).await? {
        o.cost_charged = Some(charged);
        o.currency = Some(currency);
    }
    Ok(Some(o))
}

/// Several batches, newest first (unknown ids are left out).
pub async fn show_many(pool: &PgPool, ids: &[String]) -> Result<Vec<BatchObject>, StoreError> {
    Ok(query_as(OBJECT_QUERY).bind(ids).all(pool).await?)
}

/// Batches, newest first: `limit` of them from `offset`, those with `status` if given. Reads
/// the batch rows and the figures not yet folded, never the jobs table.
pub async fn list(
    pool: &PgPool,
    status: Option<&str>,
    limit: i64,
    offset: i64,
) -> Result<Vec<BatchObject>, StoreError> {
    let ids: Vec<String> = query_scalar("SELECT batch_id FROM sheepdog.batches ORDER BY created_at DESC, batch_id")
        .all(pool)
        .await?;
    let all: Vec<BatchObject> = query_as(OBJECT_QUERY).bind(&ids).all(pool).await?;
    Ok(all
        .into_iter()
        .filter(|o| status.is_none_or(|s| o.status == s))
        .skip(offset.max(0) as usize)
        .take(limit.max(0) as usize)
        .collect())
}

/// When a batch was created and its deadline, for messages.
pub async fn times(
    pool: &PgPool,
    batch_id: &str,
) -> Result<Option<(DateTime<Utc>, Option<DateTime<Utc>>)>, StoreError> {
    Ok(
        query_as("SELECT created_at, expires_at FROM sheepdog.batches WHERE batch_id = $1")
            .bind(batch_id)
            .maybe(pool)
            .await?,
    )
}
