-- Exact cost as real providers answer (contract §3): cache writes and reasoning tokens in the
-- ledger, the account's currency, and what each replica can carry (for the estimate, §11).

-- Prompt tokens written to the vendor's cache (Anthropic's `cache_creation_input_tokens`), priced
-- at the model's `cache_creation_input_token_cost`; output tokens spent on reasoning (already
-- inside `completion_tokens`, recorded so analysts can see them, never priced twice).
ALTER TABLE sheepdog.calls
    ADD COLUMN cache_write_tokens bigint,
    ADD COLUMN reasoning_tokens bigint;

CREATE OR REPLACE VIEW sheepdog.llm_calls AS
SELECT batch_id, custom_id, attempt, model, status_code, outcome, prompt_tokens, completion_tokens,
       CASE WHEN outcome = 'pending' THEN reserved_cost_usd ELSE cost_usd END AS cost_usd,
       started_at, finished_at, upstream_request_id, cached_tokens, error,
       cache_write_tokens, reasoning_tokens
FROM sheepdog.calls;

-- What the account is charged per USD of list price, from when (the price file's "sheepdog"
-- entry; HolySheep bills in CNY). A worker adds a row when it starts with a rate that differs
-- from the latest. A call is charged at the rate in force when it started; calls before any
-- row are USD, one for one. Every `*_usd` column stays in USD.
CREATE TABLE sheepdog.account_currency (
    since    timestamptz PRIMARY KEY DEFAULT clock_timestamp(),
    currency text NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    per_usd  numeric NOT NULL CHECK (per_usd > 0)
);

CREATE OR REPLACE VIEW sheepdog.cost_daily AS
SELECT (c.started_at AT TIME ZONE 'UTC')::date AS day, c.model, c.batch_id,
       count(*) AS calls,
       coalesce(sum(c.prompt_tokens), 0)::bigint AS prompt_tokens,
       coalesce(sum(c.completion_tokens), 0)::bigint AS completion_tokens,
       sum(CASE WHEN c.outcome = 'pending' THEN c.reserved_cost_usd ELSE coalesce(c.cost_usd, 0) END) AS cost_usd,
       sum((CASE WHEN c.outcome = 'pending' THEN c.reserved_cost_usd ELSE coalesce(c.cost_usd, 0) END)
           * coalesce(r.per_usd, 1)) AS cost_charged,
       coalesce(r.currency, 'USD') AS currency
FROM sheepdog.calls c
LEFT JOIN LATERAL (
    SELECT a.currency, a.per_usd FROM sheepdog.account_currency a
     WHERE a.since <= c.started_at ORDER BY a.since DESC LIMIT 1
) r ON true
GROUP BY 1, 2, 3, coalesce(r.currency, 'USD');

-- Calls a replica keeps in flight: the estimate's time to finish counts the replicas alive.
ALTER TABLE sheepdog.replicas ADD COLUMN concurrency integer;
