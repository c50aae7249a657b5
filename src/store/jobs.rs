//! The job path's statements: claim an attempt, settle it, release a claim,
//! record a refused message, register an enqueued batch.

use rust_decimal::Decimal;
use serde_json::Value;
use sqlx::types::Json;
use sqlx::PgPool;
use uuid::Uuid;

use crate::job::JobId;

/// What `begin_attempt` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Begin {
    /// The job is ours; its pending ledger row is written.
    Started { call_id: i64, attempt: i32 },
    /// The job already has its result: ack without calling.
    Finished,
    /// Another claim on the job is live (a duplicate message in flight elsewhere).
    Busy,
}

/// A call's worst case, reserved before it is sent.
#[derive(Debug, Clone, Default)]
pub struct Reservation {
    pub tokens: i64,
    pub cost_usd: Decimal,
    /// The budget period the reservation was taken in, if a budget is set.
    pub budget_period: Option<String>,
}

/// Claims the job (or keeps our claim) and writes the attempt's `pending` ledger
/// row, in one statement. A previous claimant's `pending` rows, left by a worker
/// that died after its lease ran out, become `unknown`, charged at their reservation.
pub async fn begin_attempt(
    pool: &PgPool,
    id: &JobId,
    model: &str,
    metadata: Option<&Value>,
    token: Uuid,
    lease_seconds: f64,
    reservation: &Reservation,
) -> sqlx::Result<Begin> {
    let row: Option<(i64, i32)> = sqlx::query_as(
        r#"
        WITH claim AS (
            INSERT INTO sheepdog.jobs AS j
                (batch_id, custom_id, status, model, metadata, attempts, claim_token, lease_until, started_at)
            VALUES ($1, $2, 'running', $3, $4, 1, $5, now() + make_interval(secs => $6), now())
            ON CONFLICT (batch_id, custom_id) DO UPDATE
               SET status = 'running',
                   model = EXCLUDED.model,
                   metadata = coalesce(EXCLUDED.metadata, j.metadata),
                   attempts = j.attempts + 1,
                   claim_token = EXCLUDED.claim_token,
                   lease_until = EXCLUDED.lease_until,
                   started_at = coalesce(j.started_at, now()),
                   cost_usd = j.cost_usd + coalesce((
                       SELECT sum(c.reserved_cost_usd) FROM sheepdog.calls c
                       WHERE c.batch_id = $1 AND c.custom_id = $2
                         AND c.outcome = 'pending' AND c.claim_token <> $5), 0)
             WHERE j.status = 'queued'
                OR (j.status = 'running' AND (j.claim_token = $5 OR j.lease_until < now()))
            RETURNING j.attempts
        ), stale AS (
            UPDATE sheepdog.calls c
               SET outcome = 'unknown', cost_usd = c.reserved_cost_usd, finished_at = now(),
                   error = 'its worker stopped before recording the answer; charged at its reservation'
             WHERE c.batch_id = $1 AND c.custom_id = $2 AND c.outcome = 'pending' AND c.claim_token <> $5
               AND EXISTS (SELECT 1 FROM claim)
            RETURNING c.id
        ), call AS (
            INSERT INTO sheepdog.calls
                (batch_id, custom_id, attempt, model, claim_token, outcome, reserved_tokens, reserved_cost_usd, budget_period)
            SELECT $1, $2, claim.attempts, $3, $5, 'pending', $7, $8, $9 FROM claim
            RETURNING id, attempt
        )
        SELECT id, attempt FROM call, (SELECT count(*) FROM stale) s
        "#,
    )
    .bind(&id.batch_id)
    .bind(&id.custom_id)
    .bind(model)
    .bind(metadata.map(Json))
    .bind(token)
    .bind(lease_seconds)
    .bind(reservation.tokens)
    .bind(reservation.cost_usd)
    .bind(reservation.budget_period.as_deref())
    .fetch_optional(pool)
    .await?;
    if let Some((call_id, attempt)) = row {
        return Ok(Begin::Started { call_id, attempt });
    }
    let status: Option<String> =
        sqlx::query_scalar("SELECT status FROM sheepdog.jobs WHERE batch_id = $1 AND custom_id = $2")
            .bind(&id.batch_id)
            .bind(&id.custom_id)
            .fetch_optional(pool)
            .await?;
    Ok(match status.as_deref() {
        Some("succeeded") | Some("failed") => Begin::Finished,
        _ => Begin::Busy,
    })
}

/// The end state a settled call gives its job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobEnd {
    Succeeded,
    Failed,
    /// The job goes on (a retry follows); the claim stays.
    Continue,
}

/// How one call ended, for the ledger and the job.
#[derive(Debug, Clone)]
pub struct Settlement {
    pub call_id: i64,
    /// `ok`, `error` or `unknown`.
    pub outcome: &'static str,
    pub status_code: Option<i32>,
    pub prompt_tokens: Option<i64>,
    pub completion_tokens: Option<i64>,
    pub cached_tokens: Option<i64>,
    pub cost_usd: Decimal,
    pub error: Option<String>,
    pub upstream_request_id: Option<String>,
    pub latency_ms: Option<i32>,
    pub end: JobEnd,
    /// The upstream body (success) or its error body, stored on the job when it ends.
    pub response: Option<Value>,
    /// `{code, message}` stored on the job when it fails.
    pub job_error: Option<Value>,
}

/// Writes a call's ledger row and its job's totals and result in one statement
/// (one transaction). Returns false when the job had already ended, so this
/// call added only its cost.
pub async fn settle(pool: &PgPool, id: &JobId, s: &Settlement) -> sqlx::Result<bool> {
    let end = match s.end {
        JobEnd::Succeeded => Some("succeeded"),
        JobEnd::Failed => Some("failed"),
        JobEnd::Continue => None,
    };
    let row: Option<(bool,)> = sqlx::query_as(
        r#"
        WITH call AS (
            UPDATE sheepdog.calls
               SET outcome = $4, status_code = $5, prompt_tokens = $6, completion_tokens = $7,
                   cached_tokens = $8, cost_usd = $9, error = $10, upstream_request_id = $11,
                   finished_at = now()
             WHERE id = $3 AND outcome = 'pending'
            RETURNING id
        ), settled AS (SELECT count(*) > 0 AS fresh FROM call),
        prev AS (
            SELECT status IN ('succeeded', 'failed') AS ended FROM sheepdog.jobs
             WHERE batch_id = $1 AND custom_id = $2
        )
        UPDATE sheepdog.jobs j SET
            prompt_tokens = j.prompt_tokens + CASE WHEN s.fresh THEN coalesce($6, 0) ELSE 0 END,
            completion_tokens = j.completion_tokens + CASE WHEN s.fresh THEN coalesce($7, 0) ELSE 0 END,
            cost_usd = j.cost_usd + CASE WHEN s.fresh THEN $9 ELSE 0 END,
            status = CASE WHEN p.ended OR $12::text IS NULL THEN j.status ELSE $12::text END,
            latency_ms = CASE WHEN p.ended OR $12::text IS NULL THEN j.latency_ms ELSE $13 END,
            status_code = CASE WHEN p.ended OR $12::text IS NULL THEN j.status_code ELSE $5 END,
            upstream_request_id = CASE WHEN p.ended OR $12::text IS NULL THEN j.upstream_request_id ELSE $11 END,
            response = CASE WHEN p.ended OR $12::text IS NULL THEN j.response ELSE $14 END,
            error = CASE WHEN p.ended OR $12::text IS NULL THEN j.error ELSE $15 END,
            finished_at = CASE WHEN p.ended OR $12::text IS NULL THEN j.finished_at ELSE now() END,
            claim_token = CASE WHEN p.ended OR $12::text IS NULL THEN j.claim_token ELSE NULL END,
            lease_until = CASE WHEN p.ended OR $12::text IS NULL THEN j.lease_until ELSE NULL END
        FROM settled s, prev p
        WHERE j.batch_id = $1 AND j.custom_id = $2
        RETURNING NOT p.ended
        "#,
    )
    .bind(&id.batch_id)
    .bind(&id.custom_id)
    .bind(s.call_id)
    .bind(s.outcome)
    .bind(s.status_code)
    .bind(s.prompt_tokens)
    .bind(s.completion_tokens)
    .bind(s.cached_tokens)
    .bind(s.cost_usd)
    .bind(s.error.as_deref())
    .bind(s.upstream_request_id.as_deref())
    .bind(end)
    .bind(s.latency_ms)
    .bind(s.response.as_ref().map(Json))
    .bind(s.job_error.as_ref().map(Json))
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|r| r.0).unwrap_or(false))
}

/// Hands the job back (its message goes back to the queue): the claim ends
/// without a result, so any replica may take it.
pub async fn release(pool: &PgPool, id: &JobId, token: Uuid) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE sheepdog.jobs SET status = 'queued', claim_token = NULL, lease_until = NULL
          WHERE batch_id = $1 AND custom_id = $2 AND claim_token = $3 AND status = 'running'",
    )
    .bind(&id.batch_id)
    .bind(&id.custom_id)
    .bind(token)
    .execute(pool)
    .await?;
    Ok(())
}

/// Fails a job that never got to call the upstream (a refused message, a model
/// without a price, too many attempts). A job already ended or claimed by a
/// live worker is left alone.
pub async fn fail_without_call(
    pool: &PgPool,
    id: &JobId,
    model: Option<&str>,
    metadata: Option<&Value>,
    error: &Value,
    token: Option<Uuid>,
) -> sqlx::Result<bool> {
    let r = sqlx::query(
        r#"
        INSERT INTO sheepdog.jobs AS j (batch_id, custom_id, status, model, metadata, error, finished_at)
        VALUES ($1, $2, 'failed', $3, $4, $5, now())
        ON CONFLICT (batch_id, custom_id) DO UPDATE
           SET status = 'failed', error = EXCLUDED.error, finished_at = now(),
               model = coalesce(EXCLUDED.model, j.model),
               metadata = coalesce(EXCLUDED.metadata, j.metadata),
               claim_token = NULL, lease_until = NULL
         WHERE j.status = 'queued'
            OR (j.status = 'running' AND (j.claim_token = $6 OR j.lease_until < now()))
        "#,
    )
    .bind(&id.batch_id)
    .bind(&id.custom_id)
    .bind(model)
    .bind(metadata.map(Json))
    .bind(Json(error))
    .bind(token)
    .execute(pool)
    .await?;
    Ok(r.rows_affected() > 0)
}

/// Registers jobs an `enqueue` run is about to publish: rows in `queued` (a job
/// already known is left as it is) and the batch's size grown by the new ones.
/// Returns how many were new.
pub async fn register_queued(
    pool: &PgPool,
    batch_id: &str,
    custom_ids: &[String],
    models: &[String],
    metadata: &[Option<Value>],
) -> sqlx::Result<i64> {
    let metadata: Vec<Option<Json<&Value>>> = metadata.iter().map(|m| m.as_ref().map(Json)).collect();
    sqlx::query_scalar(
        r#"
        WITH ins AS (
            INSERT INTO sheepdog.jobs (batch_id, custom_id, status, model, metadata)
            SELECT $1, u.custom_id, 'queued', u.model, u.metadata
              FROM unnest($2::text[], $3::text[], $4::jsonb[]) AS u(custom_id, model, metadata)
            ON CONFLICT (batch_id, custom_id) DO NOTHING
            RETURNING 1
        ), n AS (SELECT count(*) AS new FROM ins)
        INSERT INTO sheepdog.batches AS b (batch_id, size)
        SELECT $1, n.new FROM n
        ON CONFLICT (batch_id) DO UPDATE SET size = b.size + EXCLUDED.size, updated_at = now()
        RETURNING (SELECT new FROM n)
        "#,
    )
    .bind(batch_id)
    .bind(custom_ids)
    .bind(models)
    .bind(metadata)
    .fetch_one(pool)
    .await
}
