//! Read-side queries: batch status, export lines, cost by model.

use super::sql::{query_as, query_scalar, Standalone};
use chrono::{DateTime, Utc};
use futures::stream::BoxStream;
use rust_decimal::Decimal;
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::Value;
use sqlx::PgPool;

/// Where a batch stands: its figures (as `batch show` and `sheepdog.batch_summary` have them)
/// and its latency percentiles.
#[derive(Debug, Clone, Serialize)]
pub struct BatchStatus {
    pub batch_id: String,
    pub status: String,
    pub total: i64,
    pub queued: i64,
    pub running: i64,
    pub succeeded: i64,
    pub failed: i64,
    pub cancelled: i64,
    pub expired: i64,
    pub pending: i64,
    pub attempts: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub cost_usd: Decimal,
    /// What the account was charged, in `currency` (the cost in USD, where it is charged in USD).
    pub cost_charged: Decimal,
    pub currency: String,
    pub p50_latency_ms: Option<f64>,
    pub p95_latency_ms: Option<f64>,
    pub p99_latency_ms: Option<f64>,
    pub first_at: Option<DateTime<Utc>>,
    pub last_at: Option<DateTime<Utc>>,
}

impl BatchStatus {
    /// Every job known for the batch has ended, and none of its calls is in flight.
    pub fn done(&self) -> bool {
        self.total > 0 && self.pending == 0 && self.running == 0
    }
}

type Latencies = (Option<f64>, Option<f64>, Option<f64>, Option<DateTime<Utc>>);

pub async fn batch_status(pool: &PgPool, batch_id: &str) -> Result<BatchStatus, super::StoreError> {
    let o = super::batches::show(pool, batch_id).await?;
    let (p50, p95, p99, last_at): Latencies = query_as(
        "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms) FILTER (WHERE status = 'succeeded'),
                percentile_cont(0.95) WITHIN GROUP (ORDER BY latency_ms) FILTER (WHERE status = 'succeeded'),
                percentile_cont(0.99) WITHIN GROUP (ORDER BY latency_ms) FILTER (WHERE status = 'succeeded'),
                max(finished_at)
           FROM sheepdog.jobs WHERE batch_id = $1",
    )
    .bind(batch_id)
    .one(pool)
    .await?;
    let Some(o) = o else {
        return Ok(BatchStatus {
            batch_id: batch_id.to_string(),
            status: "unknown".into(),
            total: 0,
            queued: 0,
            running: 0,
            succeeded: 0,
            failed: 0,
            cancelled: 0,
            expired: 0,
            pending: 0,
            attempts: 0,
            prompt_tokens: 0,
            completion_tokens: 0,
            cost_usd: Decimal::ZERO,
            cost_charged: Decimal::ZERO,
            currency: "USD".into(),
            p50_latency_ms: None,
            p95_latency_ms: None,
            p99_latency_ms: None,
            first_at: None,
            last_at: None,
        });
    };
    let c = &o.request_counts;
    let pending = c.total - c.completed - c.failed - o.cancelled - o.expired;
    Ok(BatchStatus {
        batch_id: o.id.clone(),
        status: o.status.clone(),
        total: c.total,
        queued: (pending - o.in_flight).max(0),
        running: o.in_flight,
        succeeded: c.completed,
        failed: c.failed,
        cancelled: o.cancelled,
        expired: o.expired,
        pending,
        attempts: o.calls,
        prompt_tokens: o.prompt_tokens,
        completion_tokens: o.completion_tokens,
        cost_usd: o.cost_usd,
        cost_charged: o.cost_charged.unwrap_or(o.cost_usd),
        currency: o.currency.clone().unwrap_or_else(|| "USD".into()),
        p50_latency_ms: p50,
        p95_latency_ms: p95,
        p99_latency_ms: p99,
        first_at: chrono::DateTime::from_timestamp(o.created_at, 0),
        last_at,
    })
}

/// How many jobs of a batch have ended.
pub async fn ended_jobs(pool: &PgPool, batch_id: &str) -> Result<i64, super::StoreError> {
    Ok(super::batches::show(pool, batch_id).await?.map_or(0, |o| {
        o.request_counts.completed + o.request_counts.failed + o.cancelled + o.expired
    }))
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
    query_as(
        r#"SELECT model, count(*) AS calls,
                  coalesce(sum(prompt_tokens), 0)::bigint AS prompt_tokens,
                  coalesce(sum(completion_tokens), 0)::bigint AS completion_tokens,
                  coalesce(sum(cost_usd), 0) AS cost_usd
             FROM sheepdog.llm_calls WHERE batch_id = $1
            GROUP BY model ORDER BY model"#,
    )
    .bind(batch_id)
    .all(pool)
    .await
}

/// The most common failure reasons of a batch.
pub async fn failure_reasons(pool: &PgPool, batch_id: &str, limit: i64) -> sqlx::Result<Vec<(String, i64)>> {
    query_as(
        r#"SELECT coalesce(error->>'message', error::text, 'unknown') AS reason, count(*)
             FROM sheepdog.jobs WHERE batch_id = $1 AND status = 'failed'
            GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT $2"#,
    )
    .bind(batch_id)
    .bind(limit)
    .all(pool)
    .await
}

/// The columns of `sheepdog.jobs j` an [`EndedJob`] is read from.
pub(super) const ENDED_JOB: &str = "'batch_req_' || md5(j.batch_id || chr(31) || j.custom_id) AS line_id,
     j.batch_id, j.custom_id, j.status, j.status_code, j.upstream_request_id, j.response, j.error";

/// An ended job, as its OpenAI Batch output line (contract §2, `export`) and its `job.finished`
/// event (§8) are made from it. Export and the results stream both build here, so they match.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct EndedJob {
    /// `batch_req_` and the md5 of the batch and custom ids: stable across exports.
    pub line_id: String,
    pub batch_id: String,
    pub custom_id: String,
    pub status: super::JobStatus,
    pub status_code: Option<i32>,
    pub upstream_request_id: Option<String>,
    /// The upstream body, as stored (its JSON text as it came).
    pub response: Option<String>,
    pub error: Option<sqlx::types::Json<Value>>,
}

#[derive(Serialize)]
struct Line<'a> {
    id: &'a str,
    custom_id: &'a str,
    response: Option<LineResponse<'a>>,
    error: Option<std::borrow::Cow<'a, Value>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    batch_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<&'a str>,
}

#[derive(Serialize)]
struct LineResponse<'a> {
    status_code: i32,
    request_id: Option<&'a str>,
    body: &'a RawValue,
}

impl EndedJob {
    fn line(&self, event: bool) -> Line<'_> {
        let error = match (&self.status, &self.error) {
            (super::JobStatus::Succeeded, _) => None,
            (_, Some(e)) => Some(std::borrow::Cow::Borrowed(&e.0)),
            (_, None) => Some(std::borrow::Cow::Owned(
                serde_json::json!({"code": "failed", "message": "the job failed"}),
            )),
        };
        Line {
            id: &self.line_id,
            custom_id: &self.custom_id,
            response: match (&self.response, self.status_code) {
                // Stored as it came from the upstream, which answered JSON (read without a copy).
                (Some(body), Some(status_code)) => {
                    serde_json::from_str::<&RawValue>(body).ok().map(|body| LineResponse {
                        status_code,
                        request_id: self.upstream_request_id.as_deref(),
                        body,
                    })
                }
                _ => None,
            },
            error,
            batch_id: event.then_some(self.batch_id.as_str()),
            status: event.then_some(self.status.as_str()),
        }
    }

    /// Writes its OpenAI Batch output line (no newline).
    pub fn write_line(&self, w: impl std::io::Write) -> serde_json::Result<()> {
        serde_json::to_writer(w, &self.line(false))
    }

    /// Its `job.finished` event: the export line plus `batch_id` and `status`.
    pub fn finished_event(&self) -> Vec<u8> {
        serde_json::to_vec(&self.line(true)).unwrap_or_default()
    }
}

/// Rows read per statement by [`ended_rows`].
const PAGE: i64 = 1000;

/// Ended jobs of a batch, streamed in `custom_id` order.
pub fn export_rows<'a>(pool: &'a PgPool, batch_id: &'a str) -> BoxStream<'a, sqlx::Result<EndedJob>> {
    ended_rows(pool, batch_id, None)
}

/// Ended jobs of a batch in `custom_id` order (`only_succeeded`: only those, or only the others),
/// streamed a page at a time: a statement each, read along the primary key from where the last
/// one ended. No statement stays open while the reader writes (and each is a transaction of its
/// own behind a pooler in transaction mode).
pub(super) fn ended_rows<'a>(
    pool: &'a PgPool,
    batch_id: &'a str,
    only_succeeded: Option<bool>,
) -> BoxStream<'a, sqlx::Result<EndedJob>> {
    use futures::{StreamExt, TryStreamExt};
    static QUERY: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!(
            "SELECT {ENDED_JOB} FROM sheepdog.jobs j
              WHERE j.batch_id = $1 AND j.custom_id > $2
                AND j.status IN ('succeeded', 'failed', 'cancelled', 'expired')
                AND ($3::boolean IS NULL OR (j.status = 'succeeded') = $3)
              ORDER BY j.custom_id LIMIT $4"
        )
    });
    futures::stream::try_unfold(Some(String::new()), move |after| async move {
        let Some(after) = after else {
            return Ok::<_, sqlx::Error>(None);
        };
        let page: Vec<EndedJob> = query_as(QUERY.as_str())
            .bind(batch_id)
            .bind(&after)
            .bind(only_succeeded)
            .bind(PAGE)
            .all(pool)
            .await?;
        let next = (page.len() as i64 == PAGE).then(|| page.last().map(|j| j.custom_id.clone()));
        Ok(Some((futures::stream::iter(page).map(Ok), next.flatten())))
    })
    .try_flatten()
    .boxed()
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
    /// What the account was charged, in `currency` (contract §3).
    pub cost_charged: Decimal,
    pub currency: String,
}

/// `sheepdog.cost_daily` between two UTC days (both included), optionally for one batch.
pub async fn cost_report(
    pool: &PgPool,
    since: Option<chrono::NaiveDate>,
    until: Option<chrono::NaiveDate>,
    batch: Option<&str>,
) -> sqlx::Result<Vec<CostRow>> {
    query_as(
        r#"SELECT day, model, batch_id, calls, prompt_tokens, completion_tokens, cost_usd, cost_charged, currency
             FROM sheepdog.cost_daily
            WHERE ($1::date IS NULL OR day >= $1) AND ($2::date IS NULL OR day <= $2)
              AND ($3::text IS NULL OR batch_id = $3)
            ORDER BY day, model, batch_id, currency"#,
    )
    .bind(since)
    .bind(until)
    .bind(batch)
    .all(pool)
    .await
}

/// Jobs waiting in Postgres for a call.
pub async fn backlog_depth(pool: &PgPool) -> Result<i64, super::StoreError> {
    Ok(query_scalar("SELECT count(*) FROM sheepdog.backlog").one(pool).await?)
}

/// End-to-end and worker latency percentiles of a batch, in milliseconds: (e2e p50, e2e p99,
/// worker p50, worker p99, upstream p50, upstream p99).
pub async fn latency_percentiles(
    pool: &PgPool,
    batch_id: &str,
) -> Result<(f64, f64, f64, f64, f64, f64), super::StoreError> {
    Ok(query_as(
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
    .one(pool)
    .await?)
}

/// A batch's spend by the ledger, and its succeeded and failed job counts.
pub async fn spend_and_counts(pool: &PgPool, batch_id: &str) -> Result<(Decimal, i64, i64), super::StoreError> {
    Ok(query_as(
        "SELECT (SELECT coalesce(sum(cost_usd), 0) FROM sheepdog.llm_calls WHERE batch_id = $1),
                count(*) FILTER (WHERE status = 'succeeded'), count(*) FILTER (WHERE status = 'failed')
           FROM sheepdog.jobs WHERE batch_id = $1",
    )
    .bind(batch_id)
    .one(pool)
    .await?)
}

/// What the database has done since its statistics were reset: commits, rows written, and the
/// WAL the whole server has written.
#[derive(Debug, Clone, Copy, Default, sqlx::FromRow)]
pub struct DbWork {
    pub commits: i64,
    pub inserted: i64,
    pub updated: i64,
    pub deleted: i64,
    pub wal_bytes: i64,
}

pub async fn db_work(pool: &PgPool) -> Result<DbWork, super::StoreError> {
    Ok(query_as(
        "SELECT xact_commit AS commits, tup_inserted AS inserted, tup_updated AS updated,
                tup_deleted AS deleted, (pg_current_wal_lsn() - '0/0')::bigint AS wal_bytes
           FROM pg_stat_database WHERE datname = current_database()",
    )
    .one(pool)
    .await?)
}

/// The database's clock now.
pub async fn clock(pool: &PgPool) -> Result<chrono::DateTime<chrono::Utc>, super::StoreError> {
    Ok(query_scalar("SELECT clock_timestamp()").one(pool).await?)
}

/// Client connections to this database whose `application_name` is not `except`.
pub async fn connections_except(pool: &PgPool, except: &str) -> Result<i64, super::StoreError> {
    Ok(query_scalar(
        "SELECT count(*) FROM pg_stat_activity
          WHERE datname = current_database() AND backend_type = 'client backend'
            AND application_name IS DISTINCT FROM $1",
    )
    .bind(except)
    .one(pool)
    .await?)
}

/// Each call of a batch that reached the upstream: its request id, and the times (milliseconds
/// since the Unix epoch) of the transaction that granted it and of the one that settled it.
pub async fn call_spans(pool: &PgPool, batch_id: &str) -> Result<Vec<(String, f64, f64)>, super::StoreError> {
    Ok(query_as(
        "SELECT upstream_request_id, (extract(epoch FROM started_at) * 1000)::float8,
                (extract(epoch FROM finished_at) * 1000)::float8
           FROM sheepdog.calls
          WHERE batch_id = $1 AND upstream_request_id IS NOT NULL AND finished_at IS NOT NULL",
    )
    .bind(batch_id)
    .all(pool)
    .await?)
}
