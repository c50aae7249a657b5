//! Settling a call: the ledger row, the money, the tokens, and what becomes of the job, in one
//! statement for many calls at once. It runs in the transaction of its replica's next dispatch
//! (`store::dispatch::settle_and_dispatch`): one round trip and one commit for both.

use super::sql::query;
use rust_decimal::Decimal;
use serde_json::Value;
use sqlx::types::Json;
use sqlx::PgConnection;

use super::{JobStatus, StoreError};
use crate::job::JobId;

/// How a call ended in the ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::Type)]
#[sqlx(type_name = "text", rename_all = "lowercase")]
pub enum CallOutcome {
    /// In flight: written before the request is sent.
    Pending,
    /// Answered with usage.
    Ok,
    /// Answered with an error (charged what its usage says, usually nothing).
    Error,
    /// May have been billed but the answer was never read: charged at its reservation.
    Unknown,
}

impl CallOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            CallOutcome::Pending => "pending",
            CallOutcome::Ok => "ok",
            CallOutcome::Error => "error",
            CallOutcome::Unknown => "unknown",
        }
    }
}

/// What becomes of the job after this call.
#[derive(Debug, Clone, PartialEq)]
pub enum JobFate {
    /// It ends with the upstream's answer as its result.
    Succeeded,
    /// It ends failed with this `{code, message}`; `dead_letter` publishes its message to
    /// `sheepdog.dead` with that reason.
    Failed { error: Value, dead_letter: Option<String> },
    /// It waits in the backlog again, for at least this many milliseconds.
    Retry { after_ms: i64 },
}

/// One settled call.
#[derive(Debug, Clone)]
pub struct Settlement {
    pub id: JobId,
    pub model: String,
    pub call_id: i64,
    /// The call's attempt: with the job, its key in the ledger.
    pub attempt: i32,
    /// Its reservation is held in budgets or token windows other replicas share (see
    /// `store::dispatch::settle_and_dispatch`).
    pub shared: bool,
    pub outcome: CallOutcome,
    pub status_code: Option<i32>,
    pub prompt_tokens: Option<i64>,
    pub completion_tokens: Option<i64>,
    pub cached_tokens: Option<i64>,
    pub cache_write_tokens: Option<i64>,
    pub reasoning_tokens: Option<i64>,
    pub cost_usd: Decimal,
    pub error: Option<String>,
    pub upstream_request_id: Option<String>,
    pub latency_ms: Option<i32>,
    /// The upstream body (success) or its error body, as JSON text, stored on the job when it ends.
    pub response: Option<String>,
    pub fate: JobFate,
}

/// Settles calls in one statement, in the caller's transaction. For each call still `pending`
/// (a call taken over meanwhile is not: its replica was taken for dead, and the takeover charged
/// it): the ledger row; the budgets it was reserved in (the reservation becomes the real cost);
/// the token windows it took from (they get back what it did not use; an `unknown` call keeps its
/// whole reservation); and its job: its tokens, cost and attempts, and its end, or its return to
/// the backlog (keeping its place in line), with a dead letter in the outbox when it ran out of
/// attempts. Job identities must be distinct.
pub async fn settle(conn: &mut PgConnection, items: &[Settlement]) -> Result<(), StoreError> {
    let n = items.len();
    let mut attempts = Vec::with_capacity(n);
    let mut batch_ids = Vec::with_capacity(n);
    let mut custom_ids = Vec::with_capacity(n);
    let mut models = Vec::with_capacity(n);
    let mut outcomes = Vec::with_capacity(n);
    let mut codes = Vec::with_capacity(n);
    let mut prompts = Vec::with_capacity(n);
    let mut completions = Vec::with_capacity(n);
    let mut cached = Vec::with_capacity(n);
    let mut written = Vec::with_capacity(n);
    let mut reasoning = Vec::with_capacity(n);
    let mut costs = Vec::with_capacity(n);
    let mut errors = Vec::with_capacity(n);
    let mut request_ids = Vec::with_capacity(n);
    let mut fates = Vec::with_capacity(n);
    let mut latencies = Vec::with_capacity(n);
    let mut responses = Vec::with_capacity(n);
    let mut job_errors = Vec::with_capacity(n);
    let mut retry_ms = Vec::with_capacity(n);
    let mut dead = Vec::with_capacity(n);
    for s in items {
        attempts.push(s.attempt);
        batch_ids.push(s.id.batch_id.as_str());
        custom_ids.push(s.id.custom_id.as_str());
        models.push(s.model.as_str());
        outcomes.push(s.outcome.as_str());
        codes.push(s.status_code);
        prompts.push(s.prompt_tokens);
        completions.push(s.completion_tokens);
        cached.push(s.cached_tokens);
        written.push(s.cache_write_tokens);
        reasoning.push(s.reasoning_tokens);
        costs.push(s.cost_usd);
        errors.push(s.error.as_deref());
        request_ids.push(s.upstream_request_id.as_deref());
        latencies.push(s.latency_ms);
        responses.push(s.response.as_deref());
        let (fate, job_error, after, dead_reason) = match &s.fate {
            JobFate::Succeeded => (JobStatus::Succeeded, None, None, None),
            JobFate::Failed { error, dead_letter } => {
                (JobStatus::Failed, Some(Json(error)), None, dead_letter.as_deref())
            }
            JobFate::Retry { after_ms } => (JobStatus::Queued, None, Some(*after_ms), None),
        };
        fates.push(fate.as_str());
        job_errors.push(job_error);
        retry_ms.push(after);
        dead.push(dead_reason);
    }
    static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!(
            r#"
        WITH s AS (
            SELECT * FROM unnest($1::int[], $2::text[], $3::text[], $4::text[], $5::text[], $6::int[],
                                 $7::bigint[], $8::bigint[], $9::bigint[], $10::bigint[], $11::bigint[],
                                 $12::numeric[], $13::text[], $14::text[], $15::text[], $16::int[], $17::text[],
                                 $18::jsonb[], $19::bigint[], $20::text[])
                AS t(attempt, batch_id, custom_id, model, outcome, status_code, prompt_tokens,
                     completion_tokens, cached_tokens, cache_write_tokens, reasoning_tokens, cost_usd, error,
                     request_id, fate, latency_ms, response, job_error, retry_ms, dead_reason)
        ), call AS (
            UPDATE sheepdog.calls c
               SET outcome = s.outcome, status_code = s.status_code, prompt_tokens = s.prompt_tokens,
                   completion_tokens = s.completion_tokens, cached_tokens = s.cached_tokens,
                   cache_write_tokens = s.cache_write_tokens, reasoning_tokens = s.reasoning_tokens,
                   cost_usd = s.cost_usd, error = s.error, upstream_request_id = s.request_id,
                   finished_at = now()
              FROM s
             WHERE c.batch_id = s.batch_id AND c.custom_id = s.custom_id AND c.attempt = s.attempt
               -- Still pending (every call that is not has its end). Not `outcome = 'pending'`:
               -- that let the planner walk the partial index of pending calls, every replica's,
               -- against every settlement, where statistics said it held a row; eight replicas'
               -- settling statements took 1.7 s each.
               AND c.finished_at IS NULL
            RETURNING c.batch_id, c.custom_id, c.started_at, c.budget_keys, c.reserved_cost_usd,
                      c.reserved_tokens, c.token_slot
        ), u AS (
            -- Only calls still pending: a call settled twice (an answer lost with a connection)
            -- or taken over meanwhile changes nothing more.
            SELECT s.*, call.started_at AS call_started, call.budget_keys,
                   call.reserved_cost_usd, call.reserved_tokens, call.token_slot
              FROM s JOIN call ON call.batch_id = s.batch_id AND call.custom_id = s.custom_id
        ), spend AS (
            -- Each budget the call was reserved in: the reservation becomes the real cost.
            UPDATE sheepdog.budget b SET spent = b.spent + x.cost, reserved = b.reserved - x.reserved
              FROM (SELECT regexp_replace(k, '\|[^|]*$', '') AS scope, regexp_replace(k, '^.*\|', '') AS pk,
                           sum(u.cost_usd) AS cost, sum(u.reserved_cost_usd) AS reserved
                      FROM u CROSS JOIN LATERAL unnest(u.budget_keys) AS k
                     GROUP BY 1, 2) x
             WHERE b.scope = x.scope AND b.period_key = x.pk
        ), refund AS (
            -- Token windows count what the upstream counted instead of the worst case, in the
            -- tenth of a second the call was granted (an unknown call keeps its worst case).
            UPDATE sheepdog.token_slots t SET tokens = t.tokens - x.back
              FROM (SELECT scope, token_slot, sum(back) AS back FROM (
                        SELECT unnest(ARRAY['*', u.model]) AS scope, u.token_slot,
                               u.reserved_tokens - coalesce(u.prompt_tokens, 0) - coalesce(u.completion_tokens, 0) AS back
                          FROM u WHERE u.outcome <> 'unknown' AND u.token_slot IS NOT NULL) y
                     GROUP BY scope, token_slot) x
             WHERE t.scope = x.scope AND t.slot = x.token_slot AND x.back IS NOT NULL AND x.back <> 0
        ), v AS (
            -- A job that would wait again ends instead when its batch was cancelled meanwhile,
            -- or its completion window is over.
            SELECT u.*,
                   CASE WHEN u.fate <> 'queued' THEN u.fate
                        ELSE coalesce(sheepdog.batch_end(bt.control, bt.expires_at), 'queued') END AS status
              FROM u LEFT JOIN sheepdog.batches bt ON bt.batch_id = u.batch_id
        ), before AS (
            -- What a dead letter is made of (read before the job row forgets it).
            SELECT j.batch_id, j.custom_id,
                   sheepdog.job_message(j.batch_id, j.custom_id, j.request, j.metadata, j.message) AS message
              FROM sheepdog.jobs j JOIN v ON j.batch_id = v.batch_id AND j.custom_id = v.custom_id
             WHERE v.dead_reason IS NOT NULL
        ), job AS (
            UPDATE sheepdog.jobs j SET
                prompt_tokens = j.prompt_tokens + coalesce(v.prompt_tokens, 0),
                completion_tokens = j.completion_tokens + coalesce(v.completion_tokens, 0),
                cost_usd = j.cost_usd + v.cost_usd,
                attempts = greatest(j.attempts, v.attempt),
                started_at = coalesce(j.started_at, v.call_started),
                status = v.status,
                owner = NULL,
                latency_ms = CASE WHEN v.fate = 'queued' THEN j.latency_ms ELSE v.latency_ms END,
                status_code = CASE WHEN v.fate = 'queued' THEN NULL ELSE v.status_code END,
                upstream_request_id = CASE WHEN v.fate = 'queued' THEN NULL ELSE v.request_id END,
                response = CASE WHEN v.fate = 'queued' THEN NULL ELSE v.response END,
                error = CASE v.status
                    WHEN 'queued' THEN j.error
                    WHEN 'cancelled' THEN sheepdog.batch_end_error(v.status)
                    WHEN 'expired' THEN sheepdog.batch_end_error(v.status)
                    ELSE v.job_error END,
                finished_at = CASE WHEN v.status = 'queued' THEN NULL ELSE now() END,
                request = CASE WHEN v.status = 'queued' THEN j.request END,
                message = CASE WHEN v.status = 'queued' THEN j.message END
              FROM v
             WHERE j.batch_id = v.batch_id AND j.custom_id = v.custom_id AND j.status IN ('queued', 'running')
            RETURNING j.batch_id, j.custom_id, j.model, j.seq, j.status, j.finished_at, j.attempts,
                      j.reserve_tokens, j.reserve_cost_usd, v.retry_ms, v.dead_reason
        ), back AS (
            -- A retry keeps its place in line; only its time is later.
            INSERT INTO sheepdog.backlog (model, batch_id, seq, custom_id, attempts, reserve_tokens,
                                          reserve_cost_usd, run_at)
            SELECT job.model, job.batch_id, coalesce(job.seq, nextval('sheepdog.backlog_seq')), job.custom_id,
                   job.attempts, coalesce(job.reserve_tokens, 0), coalesce(job.reserve_cost_usd, 0),
                   now() + make_interval(secs => coalesce(job.retry_ms, 0) / 1000.0)
              FROM job
             WHERE job.status = 'queued'
        ), counted AS (
            -- The batch's figures: calls, tokens and cost of every call recorded now; jobs that ended.
            INSERT INTO sheepdog.batch_progress
                (batch_id, succeeded, failed, cancelled, expired, calls, prompt_tokens, completion_tokens,
                 cost_usd, finished_at)
            SELECT batch_id, sum(ok), sum(bad), sum(canc), sum(exp), sum(calls), sum(pt), sum(ct), sum(cost),
                   max(fin)
              FROM (SELECT batch_id, 0 AS ok, 0 AS bad, 0 AS canc, 0 AS exp, 1 AS calls,
                           coalesce(prompt_tokens, 0) AS pt, coalesce(completion_tokens, 0) AS ct,
                           cost_usd AS cost, NULL::timestamptz AS fin
                      FROM u
                    UNION ALL
                    SELECT batch_id, (status = 'succeeded')::int, (status = 'failed')::int,
                           (status = 'cancelled')::int, (status = 'expired')::int, 0, 0, 0, 0, finished_at
                      FROM job WHERE status <> 'queued') x
             GROUP BY batch_id
        ), events AS (
            {FINISHED_EVENTS} FROM job j WHERE j.status <> 'queued' GROUP BY j.batch_id
        )
        INSERT INTO sheepdog.outbox (routing_key, headers, body)
        SELECT 'sheepdog.dead', jsonb_build_object('x-sheepdog-error', job.dead_reason), before.message
          FROM job JOIN before ON before.batch_id = job.batch_id AND before.custom_id = job.custom_id
         WHERE job.dead_reason IS NOT NULL AND before.message IS NOT NULL
        "#,
            FINISHED_EVENTS = super::batches::FINISHED_EVENTS
        )
    });
    query(SQL.as_str())
        .bind(&attempts)
        .bind(&batch_ids)
        .bind(&custom_ids)
        .bind(&models)
        .bind(&outcomes)
        .bind(&codes)
        .bind(&prompts)
        .bind(&completions)
        .bind(&cached)
        .bind(&written)
        .bind(&reasoning)
        .bind(&costs)
        .bind(&errors)
        .bind(&request_ids)
        .bind(&fates)
        .bind(&latencies)
        .bind(&responses)
        .bind(&job_errors)
        .bind(&retry_ms)
        .bind(&dead)
        .execute(conn)
        .await?;
    Ok(())
}
