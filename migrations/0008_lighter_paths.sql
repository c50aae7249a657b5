-- Lighter hot paths (issue: many models, many batches; bench not slower).

-- `limit_usage` read the last minute of calls twice for each scope (`/metrics` reads it every
-- 2 s on every replica): now once, grouped by model, for all scopes.
DROP VIEW sheepdog.limit_usage;
CREATE VIEW sheepdog.limit_usage AS
WITH recent AS (
    SELECT c.model, count(*) AS requests,
           sum(coalesce(c.prompt_tokens, 0) + coalesce(c.completion_tokens, 0)) AS tokens
      FROM sheepdog.calls c
     WHERE c.started_at > now() - interval '1 minute'
     GROUP BY c.model
)
SELECT s.scope, s.rpm, s.tpm, g.burst_seconds, s.budget_usd, s.budget_period,
       sheepdog.budget_period_key(s.budget_period, now()) AS budget_period_key,
       coalesce(b.spent, 0) AS budget_spent_usd,
       coalesce(b.reserved, 0) AS budget_reserved_usd,
       CASE WHEN s.budget_usd IS NULL THEN NULL
            ELSE s.budget_usd - coalesce(b.spent, 0) - coalesce(b.reserved, 0) END AS budget_left_usd,
       (SELECT coalesce(sum(r.requests), 0)::bigint FROM recent r WHERE s.scope = '*' OR r.model = s.scope)
           AS requests_last_minute,
       (SELECT coalesce(sum(r.tokens), 0)::numeric FROM recent r WHERE s.scope = '*' OR r.model = s.scope)
           AS tokens_last_minute,
       CASE WHEN s.paused_until > now() THEN s.paused_until END AS paused_until,
       CASE WHEN s.paused_until > now() THEN s.pause_reason END AS pause_reason
FROM sheepdog.limit_scopes s
CROSS JOIN (SELECT burst_seconds FROM sheepdog.limit_scopes WHERE scope = '*') g
LEFT JOIN sheepdog.budget b
       ON b.scope = s.scope AND b.period_key = sheepdog.budget_period_key(s.budget_period, now());
GRANT SELECT ON sheepdog.limit_usage TO sheepdog_analyst;

-- `job.finished` events are stored as one row per batch per statement that ended jobs, with
-- their jobs' custom ids, instead of a row per job (rows of `job_custom_id` are still read).
ALTER TABLE sheepdog.outbox ADD COLUMN job_custom_ids text[];
