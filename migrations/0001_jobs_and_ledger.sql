-- sheepdog's tables. Analysts read the views (the public interface, contract §4);
-- the tables behind them may change.
CREATE SCHEMA IF NOT EXISTS sheepdog;

-- A batch as the producer named it; `size` counts the distinct jobs `enqueue` published.
CREATE TABLE sheepdog.batches (
    batch_id   text PRIMARY KEY,
    size       bigint NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- One row per job, keyed by its identity: the primary key, not a check-then-insert,
-- decides that a job has one result.
CREATE TABLE sheepdog.jobs (
    batch_id            text NOT NULL,
    custom_id           text NOT NULL,
    status              text NOT NULL CHECK (status IN ('queued', 'running', 'succeeded', 'failed')),
    model               text,
    attempts            integer NOT NULL DEFAULT 0,
    prompt_tokens       bigint NOT NULL DEFAULT 0,
    completion_tokens   bigint NOT NULL DEFAULT 0,
    cost_usd            numeric NOT NULL DEFAULT 0,
    latency_ms          integer,
    status_code         integer,
    upstream_request_id text,
    response            jsonb,
    error               jsonb,
    metadata            jsonb,
    -- The claim: who works on the job and until when.
    claim_token         uuid,
    lease_until         timestamptz,
    created_at          timestamptz NOT NULL DEFAULT now(),
    started_at          timestamptz,
    finished_at         timestamptz,
    PRIMARY KEY (batch_id, custom_id)
) WITH (fillfactor = 70);
-- Deliberately no index on status or finished_at: a job row is updated three
-- times in its life, and with only the primary key indexed those updates stay
-- HOT (no index writes). Per-batch queries use the primary key's batch_id prefix.

-- The cost ledger: one row per upstream call attempt, written `pending` before the
-- request is sent, so a worker that dies mid-call leaves a trace that is later
-- charged at its reservation (`unknown`).
CREATE TABLE sheepdog.calls (
    id                  bigserial PRIMARY KEY,
    batch_id            text NOT NULL,
    custom_id           text NOT NULL,
    attempt             integer NOT NULL,
    model               text NOT NULL,
    claim_token         uuid NOT NULL,
    outcome             text NOT NULL CHECK (outcome IN ('pending', 'ok', 'error', 'unknown')),
    status_code         integer,
    prompt_tokens       bigint,
    completion_tokens   bigint,
    cached_tokens       bigint,
    cost_usd            numeric,
    reserved_tokens     bigint NOT NULL,
    reserved_cost_usd   numeric NOT NULL,
    budget_period       text,
    error               text,
    upstream_request_id text,
    started_at          timestamptz NOT NULL DEFAULT now(),
    finished_at         timestamptz,
    UNIQUE (batch_id, custom_id, attempt)
) WITH (fillfactor = 80);
-- started_at never changes after insert, so settling a call stays a HOT update.
CREATE INDEX calls_started_at ON sheepdog.calls (started_at);

-- ---------------------------------------------------------------- analyst views
CREATE VIEW sheepdog.job_results AS
SELECT batch_id, custom_id, status, model, attempts, prompt_tokens, completion_tokens, cost_usd,
       latency_ms, response, error, metadata, created_at, finished_at
FROM sheepdog.jobs;

-- A `pending` call is in flight (or its worker died and its job was not claimed
-- again yet); it shows its reserved worst case so totals stay conservative.
CREATE VIEW sheepdog.llm_calls AS
SELECT batch_id, custom_id, attempt, model, status_code, outcome, prompt_tokens, completion_tokens,
       CASE WHEN outcome = 'pending' THEN reserved_cost_usd ELSE cost_usd END AS cost_usd,
       started_at, finished_at, upstream_request_id, cached_tokens, error
FROM sheepdog.calls;

CREATE VIEW sheepdog.cost_daily AS
SELECT (started_at AT TIME ZONE 'UTC')::date AS day, model, batch_id,
       count(*) AS calls,
       coalesce(sum(prompt_tokens), 0)::bigint AS prompt_tokens,
       coalesce(sum(completion_tokens), 0)::bigint AS completion_tokens,
       sum(CASE WHEN outcome = 'pending' THEN reserved_cost_usd ELSE coalesce(cost_usd, 0) END) AS cost_usd
FROM sheepdog.calls
GROUP BY 1, 2, 3;

CREATE VIEW sheepdog.batch_summary AS
WITH j AS (
    SELECT batch_id,
           count(*) AS jobs,
           count(*) FILTER (WHERE status = 'succeeded') AS succeeded,
           count(*) FILTER (WHERE status = 'failed') AS failed,
           sum(cost_usd) AS cost_usd,
           min(created_at) AS first_at,
           max(finished_at) AS last_at,
           percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms) FILTER (WHERE status = 'succeeded') AS p50,
           percentile_cont(0.95) WITHIN GROUP (ORDER BY latency_ms) FILTER (WHERE status = 'succeeded') AS p95
    FROM sheepdog.jobs
    GROUP BY batch_id
)
SELECT coalesce(j.batch_id, b.batch_id) AS batch_id,
       greatest(coalesce(b.size, 0), coalesce(j.jobs, 0)) AS total,
       coalesce(j.succeeded, 0) AS succeeded,
       coalesce(j.failed, 0) AS failed,
       greatest(coalesce(b.size, 0), coalesce(j.jobs, 0)) - coalesce(j.succeeded, 0) - coalesce(j.failed, 0) AS pending,
       coalesce(j.cost_usd, 0) AS cost_usd,
       least(j.first_at, b.created_at) AS first_at,
       j.last_at,
       j.p50 AS p50_latency_ms,
       j.p95 AS p95_latency_ms
FROM j FULL JOIN sheepdog.batches b ON b.batch_id = j.batch_id;
