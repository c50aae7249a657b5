//! What the estimate (contract §11) reads: the ledger's recent history per model, what waits in
//! the backlog, the replicas alive, and what is left of a running batch.

use super::sql::{query_as, query_scalar, Standalone};
use rust_decimal::Decimal;
use sqlx::PgPool;

use super::StoreError;

/// Recent answers of a model: (model, calls, mean completion tokens, share of prompt tokens read
/// from the cache, mean prompt + completion tokens).
pub type ModelHistory = (String, i64, f64, f64, f64);

/// The last thousand successful calls of each model within a week.
pub async fn history(pool: &PgPool, models: &[String]) -> Result<Vec<ModelHistory>, StoreError> {
    Ok(query_as(
        "SELECT m.model, count(*),
                coalesce(avg(x.completion_tokens), 0)::float8,
                coalesce(sum(x.cached)::float8 / nullif(sum(x.prompt_tokens), 0), 0)::float8,
                coalesce(avg(x.prompt_tokens + x.completion_tokens), 0)::float8
           FROM unnest($1::text[]) AS m(model)
           CROSS JOIN LATERAL (
               SELECT coalesce(c.prompt_tokens, 0) AS prompt_tokens, coalesce(c.completion_tokens, 0) AS completion_tokens,
                      coalesce(c.cached_tokens, 0) AS cached
                 FROM sheepdog.calls c
                WHERE c.model = m.model AND c.outcome = 'ok' AND c.started_at > now() - interval '7 days'
                ORDER BY c.started_at DESC LIMIT 1000) x
          GROUP BY m.model",
    )
    .bind(models)
    .all(pool)
    .await?)
}

/// Mean length of the last thousand successful calls (grant to settlement), in seconds.
pub async fn call_seconds(pool: &PgPool) -> Result<Option<f64>, StoreError> {
    Ok(query_scalar(
        "SELECT avg(extract(epoch FROM finished_at - started_at))::float8
           FROM (SELECT started_at, finished_at FROM sheepdog.calls
                  WHERE outcome = 'ok' AND finished_at IS NOT NULL
                  ORDER BY started_at DESC LIMIT 1000) c",
    )
    .one(pool)
    .await?)
}

/// Jobs waiting in Postgres that may go, by model and batch: (model, batch, priority, jobs).
/// Paused, cancelled and expired batches' jobs wait behind nobody.
pub async fn waiting(pool: &PgPool) -> Result<Vec<(String, String, i16, i64)>, StoreError> {
    Ok(query_as(
        "SELECT b.model, b.batch_id, coalesce(bt.priority, 1::smallint), count(*)
           FROM sheepdog.backlog b
           LEFT JOIN sheepdog.batches bt ON bt.batch_id = b.batch_id
          WHERE coalesce(bt.control, 'active') = 'active' AND (bt.expires_at IS NULL OR bt.expires_at > now())
          GROUP BY 1, 2, 3",
    )
    .all(pool)
    .await?)
}

/// The replicas alive (a heartbeat in the last 10 s) and the calls they keep in flight together.
pub async fn replicas(pool: &PgPool) -> Result<(i64, i64), StoreError> {
    Ok(query_as(
        "SELECT count(*), coalesce(sum(coalesce(concurrency, 32)), 0)::bigint
           FROM sheepdog.replicas WHERE last_seen > now() - interval '10 seconds'",
    )
    .one(pool)
    .await?)
}

/// What is left of a batch, by model: (model, jobs not ended, their mean worst case in USD and
/// tokens, the mean cost and tokens of the batch's own successful calls so far, and how many).
pub type Remaining = (String, i64, Decimal, f64, Option<Decimal>, Option<f64>, i64);

pub async fn remaining(pool: &PgPool, batch_id: &str) -> Result<Vec<Remaining>, StoreError> {
    Ok(query_as(
        "WITH open AS (
             SELECT coalesce(model, '') AS model, count(*) AS jobs,
                    coalesce(avg(reserve_cost_usd), 0) AS worst_usd,
                    coalesce(avg(reserve_tokens), 0)::float8 AS worst_tokens
               FROM sheepdog.jobs WHERE batch_id = $1 AND status IN ('queued', 'running')
              GROUP BY 1
         ), done AS (
             SELECT model, avg(cost_usd) AS usd, avg(prompt_tokens + completion_tokens)::float8 AS tokens,
                    count(*) AS calls
               FROM sheepdog.calls WHERE batch_id = $1 AND outcome = 'ok' GROUP BY model
         )
         SELECT open.model, open.jobs, open.worst_usd, open.worst_tokens, done.usd, done.tokens,
                coalesce(done.calls, 0)
           FROM open LEFT JOIN done ON done.model = open.model
          ORDER BY open.model",
    )
    .bind(batch_id)
    .all(pool)
    .await?)
}
