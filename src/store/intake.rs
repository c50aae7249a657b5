//! The intake side: jobs arriving from the broker (or registered by `enqueue`) become rows.

use super::sql::{query_as, query_scalar, Standalone};
use rust_decimal::Decimal;
use serde_json::Value;
use sqlx::types::Json;
use sqlx::PgPool;

use super::batcher::Keyed;
use super::StoreError;
use crate::job::JobId;

/// A valid job message to store: once committed, its delivery may be acked.
#[derive(Debug, Clone)]
pub struct Admission {
    pub id: JobId,
    pub model: String,
    pub metadata: Option<Value>,
    /// The request as it goes upstream (JSON), made once: every call sends these bytes.
    pub request: Vec<u8>,
    /// The worst case of one call: reserved from the limits before each attempt.
    pub reserve_tokens: i64,
    pub reserve_cost_usd: Decimal,
}

impl Keyed for Admission {
    fn key(&self) -> &JobId {
        &self.id
    }
}

/// What became of an admission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admitted {
    /// New: it waits in the backlog for a call.
    Waiting,
    /// Seen before (waiting, running or ended): nothing to do.
    Duplicate,
}

/// Stores many jobs in one statement: the job row with its request and worst case, its batch
/// (if new) and its backlog row (which carries what dispatch needs: the attempts made, the worst
/// case). A job that already has its request, or ended, is left alone. Identities must be
/// distinct. Nothing here updates a shared row, so admissions of one batch from many replicas
/// never wait on each other.
pub async fn admit(pool: &PgPool, items: Vec<Admission>) -> Result<Vec<Admitted>, StoreError> {
    let n = items.len();
    let mut batch_ids = Vec::with_capacity(n);
    let mut custom_ids = Vec::with_capacity(n);
    let mut models = Vec::with_capacity(n);
    let mut metadata = Vec::with_capacity(n);
    let mut requests = Vec::with_capacity(n);
    let mut tokens = Vec::with_capacity(n);
    let mut costs = Vec::with_capacity(n);
    for a in &items {
        batch_ids.push(a.id.batch_id.as_str());
        custom_ids.push(a.id.custom_id.as_str());
        models.push(a.model.as_str());
        metadata.push(a.metadata.as_ref().map(Json));
        requests.push(a.request.as_slice());
        tokens.push(a.reserve_tokens);
        costs.push(a.reserve_cost_usd);
    }
    let new: Vec<(String, String)> = query_as(&format!(
        r#"
        WITH input AS (
            -- Places in line in the order the deliveries came (a function scan yields its rows in
            -- order), for new and registered jobs alike.
            SELECT t.*, nextval('sheepdog.backlog_seq') AS seq
              FROM unnest($1::text[], $2::text[], $3::text[], $4::jsonb[], $5::bytea[], $6::bigint[],
                          $7::numeric[]) WITH ORDINALITY
                AS t(batch_id, custom_id, model, metadata, request, tokens, cost, ord)
        ), ctl AS (
            -- A job of a batch that is cancelled, or past its deadline, ends as it arrives.
            SELECT i.batch_id, coalesce(sheepdog.batch_end(b.control, b.expires_at), 'queued') AS status,
                   b.batch_id IS NULL AS missing
              FROM (SELECT DISTINCT batch_id FROM input) i
              LEFT JOIN sheepdog.batches b ON b.batch_id = i.batch_id
        ), job AS (
            -- Each job as it is stored, registered or new: a job that ends as it arrives keeps
            -- no request, and has its error and its end.
            SELECT i.batch_id, i.custom_id, i.model, i.metadata, i.tokens, i.cost, i.seq, i.ord, c.status,
                   CASE WHEN c.status = 'queued' THEN i.request END AS request,
                   sheepdog.batch_end_error(c.status) AS error,
                   CASE WHEN c.status <> 'queued' THEN now() END AS finished_at
              FROM input i JOIN ctl c ON c.batch_id = i.batch_id
        ), stored AS (
            -- A job registered by `enqueue` (or replayed) and not yet stored gets its request. An
            -- update of its own, not an insert that meets the row and updates it: that locks the
            -- row first, one more WAL record a job.
            UPDATE sheepdog.jobs j
               SET model = n.model,
                   metadata = coalesce(n.metadata, j.metadata),
                   request = n.request,
                   reserve_tokens = n.tokens,
                   reserve_cost_usd = n.cost,
                   seq = n.seq,
                   status = n.status,
                   error = n.error,
                   finished_at = n.finished_at
              FROM job n
             WHERE j.batch_id = n.batch_id AND j.custom_id = n.custom_id
               AND j.status = 'queued' AND j.request IS NULL AND j.message IS NULL
            RETURNING j.batch_id, j.custom_id, j.model, j.seq, j.status, j.attempts, j.reserve_tokens,
                      j.reserve_cost_usd
        ), added AS (
            -- A job not seen before. One that is (registered, stored, or a copy arriving twice in
            -- this group) meets its row and is left alone.
            INSERT INTO sheepdog.jobs AS j
                (batch_id, custom_id, status, model, metadata, request, reserve_tokens, reserve_cost_usd, seq,
                 error, finished_at)
            SELECT batch_id, custom_id, status, model, metadata, request, tokens, cost, seq, error, finished_at
              FROM job
             ORDER BY ord
            ON CONFLICT (batch_id, custom_id) DO NOTHING
            RETURNING j.batch_id, j.custom_id, j.model, j.seq, j.status, j.attempts, j.reserve_tokens,
                      j.reserve_cost_usd
        ), ins AS (
            SELECT * FROM stored UNION ALL SELECT * FROM added
        ), bat AS (
            -- Only a batch not seen yet: an insert that meets an existing row would wait for
            -- whatever holds that row (a dispatch moving the batch's pass) to commit.
            INSERT INTO sheepdog.batches (batch_id)
            SELECT batch_id FROM ctl WHERE missing
            ON CONFLICT (batch_id) DO NOTHING
        ), back AS (
            INSERT INTO sheepdog.backlog (model, batch_id, seq, custom_id, attempts, reserve_tokens, reserve_cost_usd)
            SELECT model, batch_id, seq, custom_id, attempts, reserve_tokens, reserve_cost_usd
              FROM ins WHERE status = 'queued'
        ), counted AS (
            INSERT INTO sheepdog.batch_progress (batch_id, admitted, cancelled, expired)
            SELECT batch_id, count(*), count(*) FILTER (WHERE status = 'cancelled'),
                   count(*) FILTER (WHERE status = 'expired')
              FROM ins GROUP BY batch_id
        ), events AS (
            {FINISHED_EVENTS} FROM ins j WHERE j.status <> 'queued' GROUP BY j.batch_id
        )
        SELECT batch_id, custom_id FROM ins
        "#,
        FINISHED_EVENTS = super::batches::FINISHED_EVENTS
    ))
    .bind(&batch_ids)
    .bind(&custom_ids)
    .bind(&models)
    .bind(&metadata)
    .bind(&requests)
    .bind(&tokens)
    .bind(&costs)
    .all(pool)
    .await?;
    let new: std::collections::HashSet<(String, String)> = new.into_iter().collect();
    Ok(items
        .iter()
        .map(|a| {
            if new.contains(&(a.id.batch_id.clone(), a.id.custom_id.clone())) {
                Admitted::Waiting
            } else {
                Admitted::Duplicate
            }
        })
        .collect())
}

/// Fails a job that never got to call the upstream (a refused message, a model without a
/// price). A job that is stored already (waiting, running or ended) is left alone. Returns
/// whether it was failed.
pub async fn fail_without_call(
    pool: &PgPool,
    id: &JobId,
    model: Option<&str>,
    metadata: Option<&Value>,
    error: &Value,
) -> Result<bool, StoreError> {
    let failed: bool = query_scalar(&format!(
        r#"
        WITH failed AS (
            INSERT INTO sheepdog.jobs AS j (batch_id, custom_id, status, model, metadata, error, finished_at)
            VALUES ($1, $2, 'failed', $3, $4, $5, now())
            ON CONFLICT (batch_id, custom_id) DO UPDATE
               SET status = 'failed', error = EXCLUDED.error, finished_at = now(),
                   model = coalesce(EXCLUDED.model, j.model),
                   metadata = coalesce(EXCLUDED.metadata, j.metadata)
             -- Only a job not stored yet (so not waiting and not in flight): a bad copy never
             -- undoes a good one.
             WHERE j.status = 'queued' AND j.request IS NULL AND j.message IS NULL
            RETURNING j.*
        ), bat AS (
            INSERT INTO sheepdog.batches (batch_id) SELECT batch_id FROM failed ON CONFLICT DO NOTHING
        ), counted AS (
            -- A job refused as it arrives is known to its batch from now on.
            INSERT INTO sheepdog.batch_progress (batch_id, admitted, failed, finished_at)
            SELECT batch_id, 1, 1, now() FROM failed
        ), events AS (
            {FINISHED_EVENTS} FROM failed j GROUP BY j.batch_id
        )
        SELECT EXISTS (SELECT 1 FROM failed)
        "#,
        FINISHED_EVENTS = super::batches::FINISHED_EVENTS
    ))
    .bind(&id.batch_id)
    .bind(&id.custom_id)
    .bind(model)
    .bind(metadata.map(Json))
    .bind(Json(error))
    .one(pool)
    .await?;
    Ok(failed)
}

/// Makes a failed job claimable again (`dead replay`): its result and error are cleared; its
/// attempts and cost so far stay, since those calls happened. Its message is stored again when
/// the replayed message arrives.
pub async fn reopen_failed(pool: &PgPool, id: &JobId) -> Result<bool, StoreError> {
    let reopened: bool = query_scalar(
        "WITH reopened AS (
             UPDATE sheepdog.jobs SET status = 'queued', error = NULL, response = NULL, finished_at = NULL,
                    status_code = NULL, owner = NULL, message = NULL, request = NULL
              WHERE batch_id = $1 AND custom_id = $2 AND status = 'failed'
             RETURNING batch_id
         ), counted AS (
             -- Its message arrives again: it is counted as admitted then.
             INSERT INTO sheepdog.batch_progress (batch_id, failed, admitted)
             SELECT batch_id, -1, -1 FROM reopened
         )
         SELECT EXISTS (SELECT 1 FROM reopened)",
    )
    .bind(&id.batch_id)
    .bind(&id.custom_id)
    .one(pool)
    .await?;
    Ok(reopened)
}

/// Registers jobs an `enqueue` run is about to publish: rows in `queued` (a job already known
/// is left as it is) and the batch's size grown by the new ones. Returns how many were new.
pub async fn register_queued(
    pool: &PgPool,
    batch_id: &str,
    custom_ids: &[String],
    models: &[String],
    metadata: &[Option<Value>],
) -> Result<i64, StoreError> {
    let metadata: Vec<Option<Json<&Value>>> = metadata.iter().map(|m| m.as_ref().map(Json)).collect();
    Ok(query_scalar(
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
    .one(pool)
    .await?)
}
