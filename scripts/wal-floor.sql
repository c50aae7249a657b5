-- The least WAL a job costs when it is durable from its ack (its row with its request) and its
-- call is in the ledger before it is sent (a `pending` row, settled after), contract §4 and §5:
-- two tables, one key each, nothing else (no place in line, no registration at enqueue, no
-- results outbox, no batch progress). See ARCHITECTURE.md, "The floor, measured".
--
-- Run in the database of a finished `sheepdog bench --jobs 20000` (it takes that run's answers):
--   psql -X -q postgres://postgres@127.0.0.1:5432/sdb_bench -f scripts/wal-floor.sql
-- It writes 20,000 jobs into a schema `floor` (dropped first) the way sheepdog's statements do,
-- 100 jobs a statement, and prints the WAL they cost: the whole cluster's WAL, so run it on a
-- quiet server.
\set ON_ERROR_STOP 1
CREATE TEMP TABLE src AS
  SELECT row_number() OVER (ORDER BY custom_id) AS n, batch_id, custom_id, model, response,
    -- the body as it goes upstream (sheepdog drops the stored request once a job is answered)
    convert_to('{"model":"gpt-4o-mini","max_tokens":64,"messages":[{"role":"user","content":"Benchmark prompt number '
      || ltrim(substr(custom_id, 2), '0') || ': say something short."}],"stream":false}', 'UTF8') AS request
  FROM sheepdog.jobs
  -- one run's jobs: the latest batch of 20,000 answered
  WHERE batch_id = (SELECT batch_id FROM sheepdog.jobs WHERE response IS NOT NULL GROUP BY batch_id
                     HAVING count(*) = 20000 ORDER BY max(finished_at) DESC LIMIT 1);
DO $$ BEGIN
  IF NOT EXISTS (SELECT 1 FROM src) THEN
    RAISE EXCEPTION 'no finished run of 20,000 jobs in this database: run `sheepdog bench --jobs 20000` against it first';
  END IF;
END $$;
DROP SCHEMA IF EXISTS floor CASCADE;
CREATE SCHEMA floor;
CREATE TABLE floor.jobs (
  id bigint NOT NULL,
  batch_id text NOT NULL, custom_id text NOT NULL,
  model text NOT NULL, status smallint NOT NULL, attempts smallint NOT NULL DEFAULT 0,
  prompt_tokens int, completion_tokens int, cost_usd numeric,
  created_at timestamptz NOT NULL DEFAULT now(), finished_at timestamptz,
  request bytea, response text
) WITH (fillfactor = 30);
CREATE UNIQUE INDEX ON floor.jobs (batch_id, custom_id);
CREATE TABLE floor.calls (
  id bigint PRIMARY KEY, job_id bigint NOT NULL, attempt smallint NOT NULL, model text NOT NULL,
  outcome smallint NOT NULL, status_code smallint, prompt_tokens int, completion_tokens int,
  cost_usd numeric, started_at timestamptz NOT NULL DEFAULT now(), finished_at timestamptz
) WITH (fillfactor = 40);
CHECKPOINT;
SELECT pg_current_wal_lsn() AS start \gset
DO $$
DECLARE b int;
BEGIN
  FOR b IN 0..199 LOOP
    -- admission: the job stored with its request (one statement for 100 jobs)
    INSERT INTO floor.jobs (id, batch_id, custom_id, model, status, request)
      SELECT n, batch_id, custom_id, model, 0, request FROM src WHERE n > b*100 AND n <= b*100+100;
    COMMIT;
    -- a round grants: the pending ledger row
    INSERT INTO floor.calls (id, job_id, attempt, model, outcome)
      SELECT n, n, 1, model, 0 FROM src WHERE n > b*100 AND n <= b*100+100;
    COMMIT;
    -- the next round settles: the ledger row, then the job with its answer
    UPDATE floor.calls c SET outcome = 1, status_code = 200, prompt_tokens = 40, completion_tokens = 120,
      cost_usd = 0.0000786, finished_at = now() WHERE c.id > b*100 AND c.id <= b*100+100;
    UPDATE floor.jobs j SET status = 2, attempts = 1, prompt_tokens = 40, completion_tokens = 120,
      cost_usd = 0.0000786, finished_at = now(), response = s.response, request = NULL
      FROM src s WHERE (j.batch_id, j.custom_id) = (s.batch_id, s.custom_id) AND s.n > b*100 AND s.n <= b*100+100;
    COMMIT;
  END LOOP;
END $$;
SELECT pg_current_wal_lsn() AS stop \gset
SELECT count(*) AS jobs, round(avg(octet_length(request)))  AS request_bytes FROM src;
SELECT round(avg(octet_length(response))) AS response_bytes FROM floor.jobs;
SELECT pg_wal_lsn_diff(:'stop', :'start') AS wal_bytes, round(pg_wal_lsn_diff(:'stop', :'start') / 20000.0) AS wal_bytes_per_job;
SELECT :'start' AS start_lsn, :'stop' AS stop_lsn;
DROP SCHEMA floor CASCADE;
