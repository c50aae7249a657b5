-- Batch control (contract §7) and the results stream (§8).
--
-- A batch can be paused, resumed and cancelled, capped in spend and given a deadline. Its
-- figures (jobs by status, calls, tokens, cost) are kept on its `batches` row so that listing
-- batches never scans the jobs table. Statements that change them do not update that row (a
-- hot row every statement of a batch would wait on): they append a `batch_progress` row, and
-- one replica at a time folds those into `batches` every second. The fold is also where a
-- batch's end is seen and announced (`batch.finished`).

ALTER TABLE sheepdog.jobs DROP CONSTRAINT jobs_status_check;
ALTER TABLE sheepdog.jobs ADD CONSTRAINT jobs_status_check
    CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled', 'expired'));

ALTER TABLE sheepdog.batches
    ADD COLUMN control text NOT NULL DEFAULT 'active' CHECK (control IN ('active', 'paused', 'cancelled')),
    ADD COLUMN max_cost_usd numeric CHECK (max_cost_usd >= 0),   -- its spend never passes it
    ADD COLUMN expires_at timestamptz,                          -- no call starts after it
    ADD COLUMN cancelled_at timestamptz,
    ADD COLUMN finished_at timestamptz,                         -- every job known for it ended
    ADD COLUMN admitted bigint NOT NULL DEFAULT 0,              -- jobs stored (whoever published them)
    ADD COLUMN succeeded bigint NOT NULL DEFAULT 0,
    ADD COLUMN failed bigint NOT NULL DEFAULT 0,
    ADD COLUMN cancelled bigint NOT NULL DEFAULT 0,
    ADD COLUMN expired bigint NOT NULL DEFAULT 0,
    ADD COLUMN calls bigint NOT NULL DEFAULT 0,
    ADD COLUMN prompt_tokens bigint NOT NULL DEFAULT 0,
    ADD COLUMN completion_tokens bigint NOT NULL DEFAULT 0,
    ADD COLUMN cost_usd numeric NOT NULL DEFAULT 0,
    ADD COLUMN last_finished_at timestamptz;

-- Changes to batches' figures, not yet folded into `batches`.
CREATE TABLE sheepdog.batch_progress (
    id                bigserial PRIMARY KEY,
    batch_id          text NOT NULL,
    admitted          integer NOT NULL DEFAULT 0,
    succeeded         integer NOT NULL DEFAULT 0,
    failed            integer NOT NULL DEFAULT 0,
    cancelled         integer NOT NULL DEFAULT 0,
    expired           integer NOT NULL DEFAULT 0,
    calls             integer NOT NULL DEFAULT 0,
    prompt_tokens     bigint NOT NULL DEFAULT 0,
    completion_tokens bigint NOT NULL DEFAULT 0,
    cost_usd          numeric NOT NULL DEFAULT 0,
    finished_at       timestamptz
);

-- Tables whose rows come and go by the thousand a second: vacuum them after a thousand dead
-- rows, not after a fifth of the table, so their scans stay short.
ALTER TABLE sheepdog.batch_progress SET (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 1000);
ALTER TABLE sheepdog.outbox SET (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 1000);

-- A `job.finished` event is stored as the job it reports (`routing_key` is its batch): its body,
-- the job's export line plus `batch_id` and `status`, is built when it is published, off the path
-- that settles calls.
ALTER TABLE sheepdog.outbox ADD COLUMN job_custom_id text;
ALTER TABLE sheepdog.backlog SET (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 1000);

-- Batches that only had jobs (published without `enqueue`) get their row.
INSERT INTO sheepdog.batches (batch_id)
SELECT DISTINCT batch_id FROM sheepdog.jobs ON CONFLICT (batch_id) DO NOTHING;

-- Figures of the batches that exist, counted once here.
UPDATE sheepdog.batches b SET
    admitted = x.admitted, succeeded = x.succeeded, failed = x.failed,
    calls = x.calls, prompt_tokens = x.prompt_tokens, completion_tokens = x.completion_tokens,
    cost_usd = x.cost_usd, last_finished_at = x.last_finished_at,
    finished_at = CASE WHEN x.open = 0 THEN x.last_finished_at END
  FROM (SELECT batch_id,
               count(*) FILTER (WHERE message IS NOT NULL OR status <> 'queued') AS admitted,
               count(*) FILTER (WHERE status = 'succeeded') AS succeeded,
               count(*) FILTER (WHERE status = 'failed') AS failed,
               count(*) FILTER (WHERE status IN ('queued', 'running')) AS open,
               coalesce(sum(attempts), 0) AS calls,
               coalesce(sum(prompt_tokens), 0) AS prompt_tokens,
               coalesce(sum(completion_tokens), 0) AS completion_tokens,
               coalesce(sum(cost_usd), 0) AS cost_usd,
               max(finished_at) AS last_finished_at
          FROM sheepdog.jobs GROUP BY batch_id) x
 WHERE b.batch_id = x.batch_id;

-- How a job of a batch ends without a call: 'cancelled' when its batch is, 'expired' when the
-- batch's completion window is over, NULL while the batch may still call.
CREATE FUNCTION sheepdog.batch_end(control text, expires_at timestamptz)
RETURNS text LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN control = 'cancelled' THEN 'cancelled'
                WHEN expires_at <= now() THEN 'expired' END
$$;

-- The error of a job that so ended (contract §7), for export and `job_results`.
CREATE FUNCTION sheepdog.batch_end_error(status text)
RETURNS jsonb LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE status
        WHEN 'cancelled' THEN jsonb_build_object('code', 'batch_cancelled', 'message', 'the batch was cancelled')
        WHEN 'expired' THEN jsonb_build_object('code', 'batch_expired',
                                               'message', 'the batch''s completion window ended before this job did')
    END
$$;

-- A batch's status (contract §7), from its control, its figures and what is in flight.
CREATE FUNCTION sheepdog.batch_status(control text, total bigint, ended bigint, expired bigint,
                                      expires_at timestamptz, started boolean, in_flight bigint)
RETURNS text LANGUAGE sql STABLE AS $$
    SELECT CASE
        WHEN control = 'cancelled' AND in_flight > 0 THEN 'cancelling'
        WHEN control = 'cancelled' THEN 'cancelled'
        WHEN total > 0 AND ended >= total AND in_flight = 0
            THEN CASE WHEN expired > 0 THEN 'expired' ELSE 'completed' END
        WHEN expires_at IS NOT NULL AND expires_at <= now() THEN 'expired'
        WHEN control = 'paused' THEN 'paused'
        WHEN started OR in_flight > 0 THEN 'in_progress'
        ELSE 'queued' END
$$;

DROP VIEW sheepdog.batch_summary;
CREATE VIEW sheepdog.batch_summary AS
WITH p AS (
    SELECT batch_id, sum(admitted) AS admitted, sum(succeeded) AS succeeded, sum(failed) AS failed,
           sum(cancelled) AS cancelled, sum(expired) AS expired, sum(cost_usd) AS cost_usd,
           max(finished_at) AS finished_at
      FROM sheepdog.batch_progress GROUP BY batch_id
), f AS (
    SELECT batch_id, count(*) AS in_flight FROM sheepdog.calls WHERE outcome = 'pending' GROUP BY batch_id
), b AS (
    SELECT bt.batch_id, bt.size, bt.priority, bt.max_cost_usd, bt.expires_at, bt.created_at,
           bt.control, bt.cancelled_at,
           bt.admitted + coalesce(p.admitted, 0) AS admitted,
           bt.succeeded + coalesce(p.succeeded, 0) AS succeeded,
           bt.failed + coalesce(p.failed, 0) AS failed,
           bt.cancelled + coalesce(p.cancelled, 0) AS cancelled,
           bt.expired + coalesce(p.expired, 0) AS expired,
           bt.cost_usd + coalesce(p.cost_usd, 0) AS cost_usd,
           greatest(bt.last_finished_at, p.finished_at) AS last_at,
           coalesce(f.in_flight, 0) AS in_flight,
           bt.calls
      FROM sheepdog.batches bt
      LEFT JOIN p ON p.batch_id = bt.batch_id
      LEFT JOIN f ON f.batch_id = bt.batch_id
)
SELECT b.batch_id,
       greatest(b.size, b.admitted) AS total,
       b.succeeded, b.failed,
       greatest(b.size, b.admitted) - b.succeeded - b.failed - b.cancelled - b.expired AS pending,
       b.cost_usd,
       b.created_at AS first_at,
       b.last_at,
       (SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY j.latency_ms) FROM sheepdog.jobs j
         WHERE j.batch_id = b.batch_id AND j.status = 'succeeded') AS p50_latency_ms,
       (SELECT percentile_cont(0.95) WITHIN GROUP (ORDER BY j.latency_ms) FROM sheepdog.jobs j
         WHERE j.batch_id = b.batch_id AND j.status = 'succeeded') AS p95_latency_ms,
       sheepdog.batch_status(b.control, greatest(b.size, b.admitted),
                             b.succeeded + b.failed + b.cancelled + b.expired, b.expired, b.expires_at,
                             b.calls > 0 OR b.succeeded + b.failed > 0, b.in_flight) AS status,
       b.cancelled, b.expired,
       CASE b.priority WHEN 2 THEN 'high' WHEN 0 THEN 'low' ELSE 'normal' END AS priority,
       b.max_cost_usd, b.expires_at
  FROM b;
GRANT SELECT ON sheepdog.batch_summary TO sheepdog_analyst;
