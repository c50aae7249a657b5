-- Fewer, smaller writes per job (issue: twice the work per core).
--
-- A job's row is written when it arrives and once more when it ends. In between nothing of it
-- changes: waiting is a `backlog` row, running is its `pending` ledger row (`calls`), and the
-- replica that runs it is that row's `replica_id`. `jobs.status` no longer says `running` (the
-- view `job_results` derives it from the ledger), `jobs.owner` is no longer written, and a job's
-- `attempts` and `started_at` are written when its call settles.

-- The request as it goes upstream, made once when the job arrives: the call sends these bytes
-- as they are. (`message`, the delivery as it arrived, is no longer stored; rows of earlier
-- versions keep theirs, and a worker still reads it when `request` is missing.)
ALTER TABLE sheepdog.jobs ADD COLUMN request bytea;

-- The answer is kept as the upstream's own JSON text (the view `job_results` still gives it as
-- jsonb): it is written as it came, neither parsed nor re-encoded, and 20% smaller than jsonb.
DROP VIEW sheepdog.job_results;
ALTER TABLE sheepdog.jobs ALTER COLUMN response TYPE text USING response::text;
DO $$
BEGIN
    -- A row past ~2 kB is compressed: with LZ4 where the server has it (faster than pglz).
    ALTER TABLE sheepdog.jobs ALTER COLUMN request SET COMPRESSION lz4;
    ALTER TABLE sheepdog.jobs ALTER COLUMN response SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported OR invalid_parameter_value THEN
    NULL;
END
$$;
-- A job's row grows about threefold when it ends (its answer): pages start a third full, so
-- that its one update stays on its page (a heap-only tuple: no index entry written).
ALTER TABLE sheepdog.jobs SET (fillfactor = 30);

-- The ready set carries what dispatch needs, so it reads no job row: the attempts made so far
-- and the worst case of one call. Its one index is its key, in the order dispatch reads a lane.
ALTER TABLE sheepdog.backlog
    ADD COLUMN attempts integer NOT NULL DEFAULT 0,
    ADD COLUMN reserve_tokens bigint NOT NULL DEFAULT 0,
    ADD COLUMN reserve_cost_usd numeric NOT NULL DEFAULT 0;
UPDATE sheepdog.backlog b
   SET attempts = j.attempts, reserve_tokens = coalesce(j.reserve_tokens, 0),
       reserve_cost_usd = coalesce(j.reserve_cost_usd, 0)
  FROM sheepdog.jobs j
 WHERE j.batch_id = b.batch_id AND j.custom_id = b.custom_id;
ALTER TABLE sheepdog.backlog DROP CONSTRAINT backlog_pkey;
DROP INDEX sheepdog.backlog_lane;
ALTER TABLE sheepdog.backlog ADD PRIMARY KEY (model, batch_id, seq);

-- The ledger's time indexes become block-range indexes: calls are appended in the order they
-- start, so a range of pages covers a range of time, and a new call writes no index entry.
DROP INDEX sheepdog.calls_started_at;
DROP INDEX sheepdog.calls_day_model;
CREATE INDEX calls_started_brin ON sheepdog.calls USING brin (started_at);
CREATE INDEX calls_day_brin ON sheepdog.calls USING brin (((started_at AT TIME ZONE 'UTC')::date));

-- A job is `running` while a call of it is in flight.
CREATE VIEW sheepdog.job_results AS
SELECT j.batch_id, j.custom_id,
       CASE WHEN j.status = 'queued' AND EXISTS (
                SELECT 1 FROM sheepdog.calls c
                 WHERE c.batch_id = j.batch_id AND c.custom_id = j.custom_id AND c.outcome = 'pending')
            THEN 'running' ELSE j.status END AS status,
       j.model, j.attempts, j.prompt_tokens, j.completion_tokens, j.cost_usd,
       j.latency_ms, j.response::jsonb AS response, j.error, j.metadata, j.created_at, j.finished_at
FROM sheepdog.jobs j;
GRANT SELECT ON sheepdog.job_results TO sheepdog_analyst;

-- A call is found by its key (job, attempt); its id only names it to its replica. Ids are handed
-- out in blocks per session: fewer writes to the sequence. (The backlog's sequence is a job's
-- place in line: it stays in arrival order.)
ALTER TABLE sheepdog.calls DROP CONSTRAINT calls_pkey;
ALTER SEQUENCE sheepdog.calls_id_seq CACHE 100;

-- A job's message as a producer would publish it again (the dead letter of a job out of
-- attempts): the delivery as it arrived, where a row of an earlier version kept it; otherwise
-- made from the request it was called with, its identity and its metadata.
CREATE FUNCTION sheepdog.job_message(batch_id text, custom_id text, request bytea, metadata jsonb, message bytea)
RETURNS bytea LANGUAGE sql IMMUTABLE AS $$
    SELECT coalesce(message, convert_to(
        (jsonb_build_object('custom_id', custom_id, 'batch_id', batch_id, 'method', 'POST',
                            'url', '/v1/chat/completions', 'body', convert_from(request, 'UTF8')::jsonb)
         || CASE WHEN metadata IS NULL THEN '{}'::jsonb ELSE jsonb_build_object('metadata', metadata) END)::text,
        'UTF8'))
$$;

-- Short statements only: JIT compiling one costs more than running it. Set for the database, so
-- it holds behind a pooler that drops the connection's startup options.
DO $$
BEGIN
    EXECUTE format('ALTER DATABASE %I SET jit = off', current_database());
EXCEPTION WHEN insufficient_privilege THEN
    NULL;
END
$$;
