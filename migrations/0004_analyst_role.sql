-- A read-only role for analysts: it sees the sheepdog views and nothing else
-- (no table behind them, no other schema's data). Roles are cluster-wide; the
-- grants are per database, so every sheepdog database grants its own views.
DO $$
BEGIN
    CREATE ROLE sheepdog_analyst NOLOGIN;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    NULL; -- another database (or replica) created it first
END
$$;

GRANT USAGE ON SCHEMA sheepdog TO sheepdog_analyst;
GRANT SELECT ON sheepdog.job_results, sheepdog.llm_calls, sheepdog.cost_daily, sheepdog.batch_summary,
                sheepdog.limit_usage
   TO sheepdog_analyst;
