//! The job path's statements: claim an attempt, settle it, release a claim,
//! record a refused message, register an enqueued batch.

use rust_decimal::Decimal;
use serde_json::Value;
use sqlx::types::Json;
use sqlx::PgPool;
use uuid::Uuid;

use std::collections::HashMap;

use crate::job::JobId;
use crate::store::batcher::Keyed;

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

/// A request to start an attempt: claim the job (or keep our claim) and write
/// the attempt's `pending` ledger row.
#[derive(Debug, Clone)]
pub struct AttemptRequest {
    pub id: JobId,
    pub model: String,
    pub metadata: Option<Value>,
    /// Identifies this delivery's claim; the same token keeps the claim across retries.
    pub token: Uuid,
    pub lease_seconds: f64,
    pub reservation: Reservation,
}

impl Keyed for AttemptRequest {
    fn key(&self) -> &JobId {
        &self.id
    }
}

/// A claim's outcome: the call row's id and attempt when claimed, else the job's status.
type ClaimRow = (Option<i64>, Option<i32>, Option<String>);
#[allow(clippy::type_complexity)]
type ClaimRows = Vec<(Uuid, Option<i64>, Option<i32>, Option<String>)>;

/// Starts attempts for many jobs in one statement (one transaction). A previous
/// claimant's `pending` rows, left by a worker that died and whose lease ran
/// out, become `unknown`, charged at their reservation, and count in the job's
/// cost. Job identities must be distinct.
pub async fn begin_attempts(pool: &PgPool, reqs: Vec<AttemptRequest>) -> sqlx::Result<Vec<Begin>> {
    let n = reqs.len();
    let mut batch_ids = Vec::with_capacity(n);
    let mut custom_ids = Vec::with_capacity(n);
    let mut models = Vec::with_capacity(n);
    let mut metadata = Vec::with_capacity(n);
    let mut tokens = Vec::with_capacity(n);
    let mut leases = Vec::with_capacity(n);
    let mut r_tokens = Vec::with_capacity(n);
    let mut r_costs = Vec::with_capacity(n);
    let mut periods = Vec::with_capacity(n);
    for r in &reqs {
        batch_ids.push(r.id.batch_id.as_str());
        custom_ids.push(r.id.custom_id.as_str());
        models.push(r.model.as_str());
        metadata.push(r.metadata.as_ref().map(Json));
        tokens.push(r.token);
        leases.push(r.lease_seconds);
        r_tokens.push(r.reservation.tokens);
        r_costs.push(r.reservation.cost_usd);
        periods.push(r.reservation.budget_period.as_deref());
    }
    let rows: ClaimRows = sqlx::query_as(
        r#"
        WITH input AS (
            SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::jsonb[], $5::uuid[],
                                 $6::float8[], $7::bigint[], $8::numeric[], $9::text[])
                AS t(batch_id, custom_id, model, metadata, token, lease, reserved_tokens, reserved_cost, period)
        ), claim AS (
            INSERT INTO sheepdog.jobs AS j
                (batch_id, custom_id, status, model, metadata, attempts, claim_token, lease_until, started_at)
            SELECT batch_id, custom_id, 'running', model, metadata, 1, token,
                   now() + make_interval(secs => lease), now()
              FROM input
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
                        WHERE c.batch_id = EXCLUDED.batch_id AND c.custom_id = EXCLUDED.custom_id
                          AND c.outcome = 'pending' AND c.claim_token <> EXCLUDED.claim_token), 0)
             WHERE j.status = 'queued'
                OR (j.status = 'running' AND (j.claim_token = EXCLUDED.claim_token OR j.lease_until < now()))
            RETURNING j.batch_id, j.custom_id, j.attempts, j.claim_token
        ), stale AS (
            UPDATE sheepdog.calls c
               SET outcome = 'unknown', cost_usd = c.reserved_cost_usd, finished_at = now(),
                   error = 'its worker stopped before recording the answer; charged at its reservation'
              FROM claim
             WHERE c.batch_id = claim.batch_id AND c.custom_id = claim.custom_id
               AND c.outcome = 'pending' AND c.claim_token <> claim.claim_token
            RETURNING c.reserved_cost_usd, c.budget_period
        ), stale_spend AS (
            -- An unknown call is spent at its reservation.
            UPDATE sheepdog.budget b SET spent = b.spent + x.r, reserved = b.reserved - x.r
              FROM (SELECT budget_period, sum(reserved_cost_usd) AS r FROM stale
                     WHERE budget_period IS NOT NULL GROUP BY 1) x
             WHERE b.period_key = x.budget_period
        ), moved AS (
            -- The reservation `acquire` took now rides on the pending call row.
            DELETE FROM sheepdog.reservations r USING claim WHERE r.token = claim.claim_token
        ), call AS (
            INSERT INTO sheepdog.calls
                (batch_id, custom_id, attempt, model, claim_token, outcome, reserved_tokens, reserved_cost_usd, budget_period)
            SELECT claim.batch_id, claim.custom_id, claim.attempts, i.model, claim.claim_token, 'pending',
                   i.reserved_tokens, i.reserved_cost, i.period
              FROM claim JOIN input i ON i.token = claim.claim_token
            RETURNING id, attempt, claim_token
        )
        SELECT i.token, call.id, call.attempt, j.status
          FROM input i
          LEFT JOIN call ON call.claim_token = i.token
          LEFT JOIN sheepdog.jobs j ON j.batch_id = i.batch_id AND j.custom_id = i.custom_id
        "#,
    )
    .bind(&batch_ids)
    .bind(&custom_ids)
    .bind(&models)
    .bind(&metadata)
    .bind(&tokens)
    .bind(&leases)
    .bind(&r_tokens)
    .bind(&r_costs)
    .bind(&periods)
    .fetch_all(pool)
    .await?;
    let by_token: HashMap<Uuid, ClaimRow> = rows
        .into_iter()
        .map(|(t, id, attempt, status)| (t, (id, attempt, status)))
        .collect();
    Ok(reqs
        .iter()
        .map(|r| match by_token.get(&r.token) {
            Some((Some(call_id), Some(attempt), _)) => Begin::Started {
                call_id: *call_id,
                attempt: *attempt,
            },
            // Not claimed: the status it had (from the statement's snapshot) says why.
            Some((_, _, Some(s))) if s == "succeeded" || s == "failed" => Begin::Finished,
            _ => Begin::Busy,
        })
        .collect())
}

/// The end state a settled call gives its job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobEnd {
    Succeeded,
    Failed,
    /// The job goes on (a retry follows); the claim stays.
    Continue,
}

impl JobEnd {
    fn status(self) -> Option<&'static str> {
        match self {
            JobEnd::Succeeded => Some("succeeded"),
            JobEnd::Failed => Some("failed"),
            JobEnd::Continue => None,
        }
    }
}

/// How one call ended, for the ledger and the job.
#[derive(Debug, Clone)]
pub struct Settlement {
    pub id: JobId,
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

impl Keyed for Settlement {
    fn key(&self) -> &JobId {
        &self.id
    }
}

/// Writes calls' ledger rows and their jobs' totals and results in one
/// statement (one transaction). A call that is no longer `pending` (another
/// worker already charged it as `unknown`) adds nothing twice; a job that
/// already ended keeps its result and only gains the call's cost. Job
/// identities must be distinct.
pub async fn settle_many(pool: &PgPool, items: Vec<Settlement>) -> sqlx::Result<Vec<()>> {
    let n = items.len();
    let mut call_ids = Vec::with_capacity(n);
    let mut batch_ids = Vec::with_capacity(n);
    let mut custom_ids = Vec::with_capacity(n);
    let mut outcomes = Vec::with_capacity(n);
    let mut codes = Vec::with_capacity(n);
    let mut prompts = Vec::with_capacity(n);
    let mut completions = Vec::with_capacity(n);
    let mut cached = Vec::with_capacity(n);
    let mut costs = Vec::with_capacity(n);
    let mut errors = Vec::with_capacity(n);
    let mut request_ids = Vec::with_capacity(n);
    let mut ends = Vec::with_capacity(n);
    let mut latencies = Vec::with_capacity(n);
    let mut responses = Vec::with_capacity(n);
    let mut job_errors = Vec::with_capacity(n);
    for s in &items {
        call_ids.push(s.call_id);
        batch_ids.push(s.id.batch_id.as_str());
        custom_ids.push(s.id.custom_id.as_str());
        outcomes.push(s.outcome);
        codes.push(s.status_code);
        prompts.push(s.prompt_tokens);
        completions.push(s.completion_tokens);
        cached.push(s.cached_tokens);
        costs.push(s.cost_usd);
        errors.push(s.error.as_deref());
        request_ids.push(s.upstream_request_id.as_deref());
        ends.push(s.end.status());
        latencies.push(s.latency_ms);
        responses.push(s.response.as_ref().map(Json));
        job_errors.push(s.job_error.as_ref().map(Json));
    }
    sqlx::query(
        r#"
        WITH s AS (
            SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::int[], $6::bigint[],
                                 $7::bigint[], $8::bigint[], $9::numeric[], $10::text[], $11::text[], $12::text[],
                                 $13::int[], $14::jsonb[], $15::jsonb[])
                AS t(call_id, batch_id, custom_id, outcome, status_code, prompt_tokens, completion_tokens,
                     cached_tokens, cost_usd, error, request_id, job_end, latency_ms, response, job_error)
        ), call AS (
            UPDATE sheepdog.calls c
               SET outcome = s.outcome, status_code = s.status_code, prompt_tokens = s.prompt_tokens,
                   completion_tokens = s.completion_tokens, cached_tokens = s.cached_tokens,
                   cost_usd = s.cost_usd, error = s.error, upstream_request_id = s.request_id,
                   finished_at = now()
              FROM s
             WHERE c.id = s.call_id AND c.outcome = 'pending'
            RETURNING c.id, c.budget_period, c.reserved_cost_usd, c.reserved_tokens
        ), u AS (
            SELECT s.*, call.id IS NOT NULL AS fresh, call.budget_period, call.reserved_cost_usd, call.reserved_tokens
              FROM s LEFT JOIN call ON call.id = s.call_id
        ), spend AS (
            -- The budget: the reservation becomes the real cost.
            UPDATE sheepdog.budget b SET spent = b.spent + x.cost, reserved = b.reserved - x.reserved
              FROM (SELECT budget_period, sum(cost_usd) AS cost, sum(reserved_cost_usd) AS reserved FROM u
                     WHERE fresh AND budget_period IS NOT NULL GROUP BY 1) x
             WHERE b.period_key = x.budget_period
        ), refund AS (
            -- The token bucket gets back what the calls did not use (an unknown
            -- call keeps its whole reservation).
            UPDATE sheepdog.limits l SET tok_level = least(l.tpm * l.burst_seconds / 60, l.tok_level + x.back)
              FROM (SELECT sum(reserved_tokens - coalesce(prompt_tokens, 0) - coalesce(completion_tokens, 0)) AS back
                      FROM u WHERE fresh AND outcome <> 'unknown') x
             WHERE l.id = 1 AND l.tpm IS NOT NULL AND x.back IS NOT NULL AND x.back <> 0
        )
        UPDATE sheepdog.jobs j SET
            prompt_tokens = j.prompt_tokens + CASE WHEN u.fresh THEN coalesce(u.prompt_tokens, 0) ELSE 0 END,
            completion_tokens = j.completion_tokens + CASE WHEN u.fresh THEN coalesce(u.completion_tokens, 0) ELSE 0 END,
            cost_usd = j.cost_usd + CASE WHEN u.fresh THEN u.cost_usd ELSE 0 END,
            status = CASE WHEN j.status IN ('succeeded', 'failed') OR u.job_end IS NULL THEN j.status ELSE u.job_end END,
            latency_ms = CASE WHEN j.status IN ('succeeded', 'failed') OR u.job_end IS NULL THEN j.latency_ms ELSE u.latency_ms END,
            status_code = CASE WHEN j.status IN ('succeeded', 'failed') OR u.job_end IS NULL THEN j.status_code ELSE u.status_code END,
            upstream_request_id = CASE WHEN j.status IN ('succeeded', 'failed') OR u.job_end IS NULL THEN j.upstream_request_id ELSE u.request_id END,
            response = CASE WHEN j.status IN ('succeeded', 'failed') OR u.job_end IS NULL THEN j.response ELSE u.response END,
            error = CASE WHEN j.status IN ('succeeded', 'failed') OR u.job_end IS NULL THEN j.error ELSE u.job_error END,
            finished_at = CASE WHEN j.status IN ('succeeded', 'failed') OR u.job_end IS NULL THEN j.finished_at ELSE now() END,
            claim_token = CASE WHEN j.status IN ('succeeded', 'failed') OR u.job_end IS NULL THEN j.claim_token ELSE NULL END,
            lease_until = CASE WHEN j.status IN ('succeeded', 'failed') OR u.job_end IS NULL THEN j.lease_until ELSE NULL END
          FROM u
         WHERE j.batch_id = u.batch_id AND j.custom_id = u.custom_id
        "#,
    )
    .bind(&call_ids)
    .bind(&batch_ids)
    .bind(&custom_ids)
    .bind(&outcomes)
    .bind(&codes)
    .bind(&prompts)
    .bind(&completions)
    .bind(&cached)
    .bind(&costs)
    .bind(&errors)
    .bind(&request_ids)
    .bind(&ends)
    .bind(&latencies)
    .bind(&responses)
    .bind(&job_errors)
    .execute(pool)
    .await?;
    Ok(vec![(); n])
}

/// Makes a failed job claimable again (`dead replay`): its result and error are
/// cleared; its attempts and cost so far stay, since those calls happened.
pub async fn reopen_failed(pool: &PgPool, id: &JobId) -> sqlx::Result<bool> {
    let r = sqlx::query(
        "UPDATE sheepdog.jobs SET status = 'queued', error = NULL, response = NULL, finished_at = NULL,
                status_code = NULL, claim_token = NULL, lease_until = NULL
          WHERE batch_id = $1 AND custom_id = $2 AND status = 'failed'",
    )
    .bind(&id.batch_id)
    .bind(&id.custom_id)
    .execute(pool)
    .await?;
    Ok(r.rows_affected() > 0)
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
