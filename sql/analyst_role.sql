-- Give an analyst a login that can read sheepdog's views and nothing else.
--
-- `sheepdog migrate` creates the role `sheepdog_analyst` (NOLOGIN) and grants it
-- SELECT on the five views of schema `sheepdog` (job_results, llm_calls,
-- cost_daily, batch_summary, limit_usage) — not on the tables behind them.
-- Run this as a superuser, with your own name and password:
--
--   psql "$DATABASE_URL" -v name=alice -v password="'choose-one'" -f sql/analyst_role.sql

CREATE ROLE :name LOGIN PASSWORD :password IN ROLE sheepdog_analyst;

-- The views read through their owner; the analyst needs no table privileges.
-- Check: this must fail with "permission denied for table jobs":
--   SET ROLE :name; SELECT * FROM sheepdog.jobs LIMIT 1;
