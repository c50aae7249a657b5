//! The dashboard's reads (`sheepdog dashboard`). Each is bounded: figures come from the batch
//! rows and the ledger's `started_at` index, never from a scan of the whole jobs table (which
//! has no index on `finished_at` on purpose: its updates stay HOT). Per-batch reads use the
//! primary key's `batch_id` prefix.

use super::sql::{query_as, query_scalar, Standalone};
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Serialize;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;
use std::time::Duration;

use super::StoreError;

/// A pool that never blocks a page for long: connections are made on demand (the dashboard
/// starts with the database down), waiting for one gives up after 2 s, and a statement after 5 s.
pub fn lazy_pool(opts: PgConnectOptions, max_connections: u32, transaction_pooler: bool) -> PgPool {
    super::sql::set_transaction_pooler(transaction_pooler);
    PgPoolOptions::new()
        .max_connections(max_connections.max(1))
        .acquire_timeout(Duration::from_secs(2))
        .connect_lazy_with(opts.options([("statement_timeout", "5000")]))
}

/// Calls ended per minute over the last hour: (minute, ok, error). The ledger's `started_at`
/// index bounds the scan; a call ends within the HTTP timeout of its start.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct MinuteCount {
    pub minute: DateTime<Utc>,
    pub ok: i64,
    pub error: i64,
}

pub async fn calls_per_minute(
    pool: &PgPool,
    minutes: i32,
    model: Option<&str>,
) -> Result<Vec<MinuteCount>, StoreError> {
    Ok(query_as(
        "WITH m AS (
             SELECT generate_series(date_trunc('minute', now()) - make_interval(mins => $1 - 1),
                                    date_trunc('minute', now()), interval '1 minute') AS minute
         ), c AS (
             SELECT date_trunc('minute', finished_at) AS minute,
                    count(*) FILTER (WHERE outcome = 'ok') AS ok,
                    count(*) FILTER (WHERE outcome <> 'ok') AS error
               FROM sheepdog.calls
              WHERE started_at > now() - make_interval(mins => $1 + 10)
                AND finished_at >= date_trunc('minute', now()) - make_interval(mins => $1 - 1)
                AND outcome <> 'pending' AND ($2::text IS NULL OR model = $2)
              GROUP BY 1
         )
         SELECT m.minute, coalesce(c.ok, 0) AS ok, coalesce(c.error, 0) AS error
           FROM m LEFT JOIN c ON c.minute = m.minute ORDER BY m.minute",
    )
    .bind(minutes)
    .bind(model)
    .all(pool)
    .await?)
}

/// What the overview shows besides the chart.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Overview {
    pub ok_last_10s: i64,
    pub in_flight: i64,
    pub backlog: i64,
    pub spent_today_usd: Decimal,
    pub batches_active: i64,
    /// The account's currency now, where one was set (`None`: USD, one for one), and what today's
    /// calls were charged in it.
    pub currency: Option<String>,
    pub charged_today: Decimal,
}

pub async fn overview(pool: &PgPool) -> Result<Overview, StoreError> {
    Ok(query_as(
        "SELECT (SELECT count(*) FROM sheepdog.calls
                  WHERE started_at > now() - interval '5 minutes' AND outcome = 'ok'
                    AND finished_at > now() - interval '10 seconds') AS ok_last_10s,
                (SELECT count(*) FROM sheepdog.calls WHERE outcome = 'pending') AS in_flight,
                (SELECT count(*) FROM sheepdog.backlog) AS backlog,
                (SELECT coalesce(sum(CASE WHEN outcome = 'pending' THEN reserved_cost_usd
                                          ELSE coalesce(cost_usd, 0) END), 0)
                   FROM sheepdog.calls WHERE started_at >= date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC')
                    AS spent_today_usd,
                (SELECT count(*) FROM sheepdog.batches WHERE finished_at IS NULL AND control <> 'cancelled')
                    AS batches_active,
                cur.currency,
                (SELECT coalesce(sum(d.cost_charged), 0) FROM sheepdog.cost_daily d
                  WHERE d.day = (now() AT TIME ZONE 'UTC')::date AND d.currency = cur.currency) AS charged_today
           FROM (SELECT (SELECT currency FROM sheepdog.account_currency ORDER BY since DESC LIMIT 1) AS currency) cur",
    )
    .one(pool)
    .await?)
}

/// A breaker that is not closed.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Breaker {
    pub scope: String,
    pub state: String,
    pub reason: Option<String>,
    pub trips: i32,
    pub open_until: Option<DateTime<Utc>>,
}

pub async fn breakers(pool: &PgPool) -> Result<Vec<Breaker>, StoreError> {
    Ok(
        query_as("SELECT scope, state, reason, trips, open_until FROM sheepdog.breakers ORDER BY scope <> '*', scope")
            .all(pool)
            .await?,
    )
}

/// Requests and tokens per minute of a scope (`*` = every model) over the last minutes.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct ScopeMinute {
    pub scope: String,
    pub minute: DateTime<Utc>,
    pub requests: i64,
    pub tokens: i64,
}

pub async fn scope_use(pool: &PgPool, minutes: i32) -> Result<Vec<ScopeMinute>, StoreError> {
    Ok(query_as(
        "WITH c AS (
             SELECT date_trunc('minute', started_at) AS minute, model,
                    count(*) AS requests,
                    coalesce(sum(coalesce(prompt_tokens, 0) + coalesce(completion_tokens, 0)), 0)::bigint AS tokens
               FROM sheepdog.calls
              WHERE started_at >= date_trunc('minute', now()) - make_interval(mins => $1 - 1)
              GROUP BY 1, 2
         )
         SELECT '*' AS scope, minute, sum(requests)::bigint AS requests, sum(tokens)::bigint AS tokens
           FROM c GROUP BY minute
         UNION ALL
         SELECT model, minute, requests, tokens FROM c
         ORDER BY 1, 2",
    )
    .bind(minutes)
    .all(pool)
    .await?)
}

/// Latency percentiles of a batch's succeeded jobs, in ms: p50, p95, p99.
pub async fn latency(pool: &PgPool, batch_id: &str) -> Result<(Option<f64>, Option<f64>, Option<f64>), StoreError> {
    Ok(query_as(
        "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms),
                percentile_cont(0.95) WITHIN GROUP (ORDER BY latency_ms),
                percentile_cont(0.99) WITHIN GROUP (ORDER BY latency_ms)
           FROM sheepdog.jobs WHERE batch_id = $1 AND status = 'succeeded'",
    )
    .bind(batch_id)
    .one(pool)
    .await?)
}

/// A failure reason of a batch, how many jobs ended with it and one of them.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Failure {
    pub reason: String,
    pub jobs: i64,
    pub example: String,
}

pub async fn failures(pool: &PgPool, batch_id: &str, limit: i64) -> Result<Vec<Failure>, StoreError> {
    Ok(query_as(
        "SELECT coalesce(error->>'message', error::text, 'unknown') AS reason, count(*) AS jobs,
                min(custom_id) AS example
           FROM sheepdog.jobs WHERE batch_id = $1 AND status IN ('failed', 'expired', 'cancelled')
          GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT $2",
    )
    .bind(batch_id)
    .bind(limit)
    .all(pool)
    .await?)
}

/// A recently ended job of a batch.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct RecentJob {
    pub custom_id: String,
    pub status: String,
    pub model: Option<String>,
    pub latency_ms: Option<i32>,
    pub cost_usd: Decimal,
    pub finished_at: Option<DateTime<Utc>>,
    pub summary: Option<String>,
}

pub async fn recent(pool: &PgPool, batch_id: &str, limit: i64) -> Result<Vec<RecentJob>, StoreError> {
    Ok(query_as(
        "SELECT custom_id, status, model, latency_ms, cost_usd, finished_at,
                left(coalesce(response::jsonb #>> '{choices,0,message,content}', error->>'message'), 120) AS summary
           FROM sheepdog.jobs WHERE batch_id = $1 AND finished_at IS NOT NULL
          ORDER BY finished_at DESC LIMIT $2",
    )
    .bind(batch_id)
    .bind(limit)
    .all(pool)
    .await?)
}

/// How many batches there are in all (for paging).
pub async fn batch_count(pool: &PgPool) -> Result<i64, StoreError> {
    Ok(query_scalar("SELECT count(*) FROM sheepdog.batches").one(pool).await?)
}
