-- Global limits shared by every replica (contract §2, §5): token buckets for
-- requests and tokens, a spend budget per period, and a shared pause (a 429's
-- Retry-After). One row holds the buckets; `sheepdog.acquire` takes from them in
-- one atomic statement on the database clock.

CREATE TABLE sheepdog.limits (
    id            integer PRIMARY KEY CHECK (id = 1),
    rpm           numeric CHECK (rpm > 0),            -- NULL: unlimited
    tpm           numeric CHECK (tpm > 0),            -- NULL: unlimited
    burst_seconds numeric NOT NULL DEFAULT 1 CHECK (burst_seconds > 0),
    budget_usd    numeric CHECK (budget_usd >= 0),    -- NULL: unlimited
    budget_period text NOT NULL DEFAULT 'day' CHECK (budget_period IN ('day', 'month', 'total')),
    -- Bucket levels at `bucket_at`; they refill continuously up to rate × burst.
    req_level     numeric NOT NULL DEFAULT 0,
    tok_level     numeric NOT NULL DEFAULT 0,
    bucket_at     timestamptz NOT NULL DEFAULT now(),
    -- Every replica waits until then (an upstream 429's Retry-After).
    paused_until  timestamptz,
    pause_reason  text,
    updated_at    timestamptz NOT NULL DEFAULT now()
);
INSERT INTO sheepdog.limits (id) VALUES (1);

-- Spend per budget period: settled calls and reservations of calls in flight.
CREATE TABLE sheepdog.budget (
    period_key text PRIMARY KEY,
    spent      numeric NOT NULL DEFAULT 0,
    reserved   numeric NOT NULL DEFAULT 0
);

-- Budget taken by `acquire` and not yet carried by a `pending` ledger row. The
-- claim moves it onto the call row; a worker that dies in between leaves it
-- here, and `acquire` gives it back after two minutes.
CREATE TABLE sheepdog.reservations (
    token      uuid PRIMARY KEY,
    period_key text NOT NULL,
    cost_usd   numeric NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE FUNCTION sheepdog.budget_period_key(period text, at timestamptz) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE period
        WHEN 'day' THEN to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD')
        WHEN 'month' THEN to_char(at AT TIME ZONE 'UTC', 'YYYY-MM')
        ELSE 'total' END
$$;

CREATE FUNCTION sheepdog.budget_period_end(period text, at timestamptz) RETURNS timestamptz
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE period
        WHEN 'day' THEN (date_trunc('day', at AT TIME ZONE 'UTC') + interval '1 day') AT TIME ZONE 'UTC'
        WHEN 'month' THEN (date_trunc('month', at AT TIME ZONE 'UTC') + interval '1 month') AT TIME ZONE 'UTC'
        ELSE NULL END
$$;

-- Takes 1 request and `tokens` tokens from the buckets and reserves `cost` of
-- the budget, all or nothing. When something does not fit it takes nothing and
-- says how long to wait and why (`kind`: rate, paused or budget).
CREATE FUNCTION sheepdog.acquire(p_token uuid, p_tokens numeric, p_cost numeric)
RETURNS TABLE (granted boolean, wait_seconds double precision, kind text, reason text, period_key text)
LANGUAGE plpgsql AS $$
DECLARE
    l sheepdog.limits%ROWTYPE;
    t timestamptz := clock_timestamp();
    dt numeric;
    req numeric;
    tok numeric;
    need numeric;
    cap numeric;
    k text;
    b sheepdog.budget%ROWTYPE;
    freed record;
BEGIN
    SELECT * INTO l FROM sheepdog.limits WHERE id = 1 FOR UPDATE;
    IF l.paused_until IS NOT NULL AND l.paused_until > t THEN
        RETURN QUERY SELECT false, extract(epoch FROM l.paused_until - t)::float8, 'paused'::text,
            coalesce(l.pause_reason, 'paused'), NULL::text;
        RETURN;
    END IF;
    dt := greatest(extract(epoch FROM t - l.bucket_at), 0);
    req := CASE WHEN l.rpm IS NULL THEN NULL ELSE least(l.rpm * l.burst_seconds / 60, l.req_level + dt * l.rpm / 60) END;
    tok := CASE WHEN l.tpm IS NULL THEN NULL ELSE least(l.tpm * l.burst_seconds / 60, l.tok_level + dt * l.tpm / 60) END;

    IF req IS NOT NULL AND req < 1 THEN
        RETURN QUERY SELECT false, ((1 - req) * 60 / l.rpm)::float8, 'rate'::text,
            format('requests per minute: %s', l.rpm), NULL::text;
        RETURN;
    END IF;
    IF tok IS NOT NULL THEN
        -- A job larger than the bucket waits for a full bucket, then borrows.
        cap := l.tpm * l.burst_seconds / 60;
        need := least(p_tokens, cap);
        IF tok < need THEN
            RETURN QUERY SELECT false, ((need - tok) * 60 / l.tpm)::float8, 'rate'::text,
                format('tokens per minute: %s', l.tpm), NULL::text;
            RETURN;
        END IF;
    END IF;

    IF l.budget_usd IS NOT NULL THEN
        k := sheepdog.budget_period_key(l.budget_period, t);
        INSERT INTO sheepdog.budget (period_key) VALUES (k) ON CONFLICT DO NOTHING;
        -- Give back reservations whose worker died before claiming its job.
        FOR freed IN
            DELETE FROM sheepdog.reservations r WHERE r.created_at < t - interval '2 minutes'
            RETURNING r.period_key AS pk, r.cost_usd AS c
        LOOP
            UPDATE sheepdog.budget SET reserved = reserved - freed.c WHERE budget.period_key = freed.pk;
        END LOOP;
        SELECT * INTO b FROM sheepdog.budget WHERE budget.period_key = k FOR UPDATE;
        IF b.spent + b.reserved + p_cost > l.budget_usd THEN
            RETURN QUERY SELECT false,
                coalesce(extract(epoch FROM sheepdog.budget_period_end(l.budget_period, t) - t)::float8, 3600),
                'budget'::text,
                CASE WHEN l.budget_period = 'total'
                     THEN format('budget exhausted: %s of %s USD spent or reserved', b.spent + b.reserved, l.budget_usd)
                     ELSE format('budget exhausted until %s: %s of %s USD spent or reserved',
                                 to_char(sheepdog.budget_period_end(l.budget_period, t) AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI "UTC"'),
                                 b.spent + b.reserved, l.budget_usd) END,
                k;
            RETURN;
        END IF;
        UPDATE sheepdog.budget SET reserved = reserved + p_cost WHERE budget.period_key = k;
        INSERT INTO sheepdog.reservations (token, period_key, cost_usd) VALUES (p_token, k, p_cost)
        ON CONFLICT (token) DO UPDATE SET cost_usd = sheepdog.reservations.cost_usd + EXCLUDED.cost_usd;
    END IF;

    UPDATE sheepdog.limits SET
        req_level = CASE WHEN req IS NULL THEN req_level ELSE req - 1 END,
        tok_level = CASE WHEN tok IS NULL THEN tok_level ELSE tok - p_tokens END,
        bucket_at = t
    WHERE id = 1;
    RETURN QUERY SELECT true, 0::float8, NULL::text, NULL::text, k;
END
$$;

-- Gives back what `acquire` took for a job that was not called after all (it
-- was already finished, or busy elsewhere).
CREATE FUNCTION sheepdog.give_back(p_token uuid, p_tokens numeric) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    r record;
BEGIN
    DELETE FROM sheepdog.reservations WHERE token = p_token RETURNING period_key, cost_usd INTO r;
    IF FOUND THEN
        UPDATE sheepdog.budget SET reserved = reserved - r.cost_usd WHERE period_key = r.period_key;
    END IF;
    UPDATE sheepdog.limits SET
        req_level = CASE WHEN rpm IS NULL THEN req_level ELSE least(rpm * burst_seconds / 60, req_level + 1) END,
        tok_level = CASE WHEN tpm IS NULL THEN tok_level ELSE least(tpm * burst_seconds / 60, tok_level + p_tokens) END
    WHERE id = 1 AND (rpm IS NOT NULL OR tpm IS NOT NULL);
END
$$;

CREATE VIEW sheepdog.limit_usage AS
SELECT l.rpm, l.tpm, l.burst_seconds, l.budget_usd, l.budget_period,
       sheepdog.budget_period_key(l.budget_period, now()) AS budget_period_key,
       coalesce(b.spent, 0) AS budget_spent_usd,
       coalesce(b.reserved, 0) AS budget_reserved_usd,
       CASE WHEN l.budget_usd IS NULL THEN NULL
            ELSE l.budget_usd - coalesce(b.spent, 0) - coalesce(b.reserved, 0) END AS budget_left_usd,
       (SELECT count(*) FROM sheepdog.calls c WHERE c.started_at > now() - interval '1 minute') AS requests_last_minute,
       (SELECT coalesce(sum(coalesce(c.prompt_tokens, 0) + coalesce(c.completion_tokens, 0)), 0) FROM sheepdog.calls c
         WHERE c.started_at > now() - interval '1 minute') AS tokens_last_minute,
       CASE WHEN l.paused_until > now() THEN l.paused_until END AS paused_until,
       CASE WHEN l.paused_until > now() THEN l.pause_reason END AS pause_reason
FROM sheepdog.limits l
LEFT JOIN sheepdog.budget b ON b.period_key = sheepdog.budget_period_key(l.budget_period, now());
