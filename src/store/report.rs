//! Read-side queries: batch status, export lines, cost by model.

use chrono::{DateTime, Utc};
use futures::Stream;
use rust_decimal::Decimal;
use serde::Serialize;
use serde_json::Value;
use sqlx::PgPool;

/// Where a batch stands.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct BatchStatus {
    pub batch_id: String,
    pub total: i64,
    pub queued: i64,
    pub running: i64,
    pub succeeded: i64,
    pub failed: i64,
    pub pending: i64,
    pub attempts: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub cost_usd: Decimal,
    pub p50_latency_ms: Option<f64>,
    pub p95_latency_ms: Option<f64>,
    pub p99_latency_ms: Option<f64>,
    pub first_at: Option<DateTime<Utc>>,
    pub last_at: Option<DateTime<Utc>>,
}

impl BatchStatus {
    pub fn done(&self) -> bool {
        self.total > 0 && self.pending == 0
    }
}

pub async fn batch_status(pool: &PgPool, batch_id: &str) -> sqlx::Result<BatchStatus> {
    sqlx::query_as(
        r#"
        WITH j AS (
            SELECT count(*) AS jobs,
                   count(*) FILTER (WHERE status = 'queued') AS queued,
                   count(*) FILTER (WHERE status = 'running') AS running,
                   count(*) FILTER (WHERE status = 'succeeded') AS succeeded,
                   count(*) FILTER (WHERE status = 'failed') AS failed,
                   coalesce(sum(attempts), 0)::bigint AS attempts,
                   coalesce(sum(prompt_tokens), 0)::bigint AS prompt_tokens,
                   coalesce(sum(completion_tokens), 0)::bigint AS completion_tokens,
                   coalesce(sum(cost_usd), 0) AS cost_usd,
                   percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms) FILTER (WHERE status = 'succeeded') AS p50,
                   percentile_cont(0.95) WITHIN GROUP (ORDER BY latency_ms) FILTER (WHERE status = 'succeeded') AS p95,
                   percentile_cont(0.99) WITHIN GROUP (ORDER BY latency_ms) FILTER (WHERE status = 'succeeded') AS p99,
                   min(created_at) AS first_at,
                   max(finished_at) AS last_at
              FROM sheepdog.jobs WHERE batch_id = $1
        ), b AS (SELECT coalesce((SELECT size FROM sheepdog.batches WHERE batch_id = $1), 0) AS size)
        SELECT $1 AS batch_id,
               greatest(b.size, j.jobs) AS total,
               j.queued + greatest(b.size - j.jobs, 0) AS queued,
               j.running, j.succeeded, j.failed,
               greatest(b.size, j.jobs) - j.succeeded - j.failed AS pending,
               j.attempts, j.prompt_tokens, j.completion_tokens, j.cost_usd,
               j.p50 AS p50_latency_ms, j.p95 AS p95_latency_ms, j.p99 AS p99_latency_ms,
               j.first_at, j.last_at
          FROM j, b
        "#,
    )
    .bind(batch_id)
    .fetch_one(pool)
    .await
}

/// How many jobs of a batch have ended (succeeded or failed).
pub async fn ended_jobs(pool: &PgPool, batch_id: &str) -> sqlx::Result<i64> {
    sqlx::query_scalar("SELECT count(*) FROM sheepdog.jobs WHERE batch_id = $1 AND status IN ('succeeded', 'failed')")
        .bind(batch_id)
        .fetch_one(pool)
        .await
}

/// Cost and tokens of a batch's calls by model, from the ledger.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct ModelCost {
    pub model: String,
    pub calls: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub cost_usd: Decimal,
}

pub async fn batch_cost_by_model(pool: &PgPool, batch_id: &str) -> sqlx::Result<Vec<ModelCost>> {
    sqlx::query_as(
        r#"SELECT model, count(*) AS calls,
                  coalesce(sum(prompt_tokens), 0)::bigint AS prompt_tokens,
                  coalesce(sum(completion_tokens), 0)::bigint AS completion_tokens,
                  coalesce(sum(cost_usd), 0) AS cost_usd
             FROM sheepdog.llm_calls WHERE batch_id = $1
            GROUP BY model ORDER BY model"#,
    )
    .bind(batch_id)
    .fetch_all(pool)
    .await
}

/// The most common failure reasons of a batch.
pub async fn failure_reasons(pool: &PgPool, batch_id: &str, limit: i64) -> sqlx::Result<Vec<(String, i64)>> {
    sqlx::query_as(
        r#"SELECT coalesce(error->>'message', error::text, 'unknown') AS reason, count(*)
             FROM sheepdog.jobs WHERE batch_id = $1 AND status = 'failed'
            GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT $2"#,
    )
    .bind(batch_id)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// One finished job, as the export needs it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ExportRow {
    pub custom_id: String,
    pub status: super::JobStatus,
    pub status_code: Option<i32>,
    pub upstream_request_id: Option<String>,
    pub response: Option<sqlx::types::Json<Value>>,
    pub error: Option<sqlx::types::Json<Value>>,
}

/// Finished jobs of a batch, streamed in `custom_id` order.
pub fn export_rows<'a>(pool: &'a PgPool, batch_id: &'a str) -> impl Stream<Item = sqlx::Result<ExportRow>> + 'a {
    sqlx::query_as(
        r#"SELECT custom_id, status, status_code, upstream_request_id, response, error
             FROM sheepdog.jobs
            WHERE batch_id = $1 AND status IN ('succeeded', 'failed')
            ORDER BY custom_id"#,
    )
    .bind(batch_id)
    .fetch(pool)
}

/// One row of `sheepdog report`: cost and tokens of a day, model and batch.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct CostRow {
    pub day: chrono::NaiveDate,
    pub model: String,
    pub batch_id: String,
    pub calls: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub cost_usd: Decimal,
}

/// `sheepdog.cost_daily` between two UTC days (both included), optionally for one batch.
pub async fn cost_report(
    pool: &PgPool,
    since: Option<chrono::NaiveDate>,
    until: Option<chrono::NaiveDate>,
    batch: Option<&str>,
) -> sqlx::Result<Vec<CostRow>> {
    sqlx::query_as(
        r#"SELECT day, model, batch_id, calls, prompt_tokens, completion_tokens, cost_usd
             FROM sheepdog.cost_daily
            WHERE ($1::date IS NULL OR day >= $1) AND ($2::date IS NULL OR day <= $2)
              AND ($3::text IS NULL OR batch_id = $3)
            ORDER BY day, model, batch_id"#,
    )
    .bind(since)
    .bind(until)
    .bind(batch)
    .fetch_all(pool)
    .await
}

/// Jobs waiting in Postgres for a call.
pub async fn backlog_depth(pool: &PgPool) -> Result<i64, super::StoreError> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM sheepdog.backlog")
        .fetch_one(pool)
        .await?)
}

/// End-to-end and worker latency percentiles of a batch, in milliseconds: (e2e p50, e2e p99,
/// worker p50, worker p99, upstream p50, upstream p99).
pub async fn latency_percentiles(
    pool: &PgPool,
    batch_id: &str,
) -> Result<(f64, f64, f64, f64, f64, f64), super::StoreError> {
    Ok(sqlx::query_as(
        r#"SELECT
             coalesce(percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - created_at) * 1000), 0),
             coalesce(percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - created_at) * 1000), 0),
             coalesce(percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - started_at) * 1000), 0),
             coalesce(percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - started_at) * 1000), 0),
             coalesce(percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms), 0),
             coalesce(percentile_cont(0.99) WITHIN GROUP (ORDER BY latency_ms), 0)
           FROM sheepdog.jobs WHERE batch_id = $1"#,
    )
    .bind(batch_id)
    .fetch_one(pool)
    .await?)
}

/// A batch's spend by the ledger, and its succeeded and failed job counts.
pub async fn spend_and_counts(pool: &PgPool, batch_id: &str) -> Result<(Decimal, i64, i64), super::StoreError> {
    Ok(sqlx::query_as(
        "SELECT (SELECT coalesce(sum(cost_usd), 0) FROM sheepdog.llm_calls WHERE batch_id = $1),
                count(*) FILTER (WHERE status = 'succeeded'), count(*) FILTER (WHERE status = 'failed')
           FROM sheepdog.jobs WHERE batch_id = $1",
    )
    .bind(batch_id)
    .fetch_one(pool)
    .await?)
}
