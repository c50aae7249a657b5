-- Postgres becomes the ready set; RabbitMQ stays the durable intake.
--
-- A worker takes a job message off `sheepdog.jobs`, writes it here (`jobs.message` and a
-- `backlog` row) and acks it. Each replica's dispatcher then takes jobs from `backlog` in one
-- transaction that also takes from every limit that applies (the all-models scope `*` and the
-- job's model), reserves the worst case in every budget, honours breakers and the upstream's own
-- 429 pauses, claims the job for the replica and writes the `pending` ledger row. Nothing is
-- decided from a copy of the limits that may be stale, and a job that cannot go waits here
-- without holding a delivery or an attempt.
--
-- A running job names the replica that runs it (`jobs.owner`). Replicas prove they are alive
-- with a session advisory lock held on a connection of their own and a heartbeat row; a replica
-- whose lock is gone and whose heartbeat is older than the takeover time is dead, and its jobs
-- go back to the backlog (its `pending` calls become `unknown`, charged at their reservation).

-- ------------------------------------------------------------------ replicas
CREATE TABLE sheepdog.replicas (
    id         bigserial PRIMARY KEY,
    name       text NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now(),
    last_seen  timestamptz NOT NULL DEFAULT now()
);

-- ------------------------------------------------------------------ jobs and calls
CREATE SEQUENCE sheepdog.backlog_seq;
ALTER TABLE sheepdog.jobs
    ADD COLUMN message bytea,              -- the job message, kept until the job ends
    ADD COLUMN reserve_tokens bigint,      -- its worst case, reserved before every call
    ADD COLUMN reserve_cost_usd numeric,
    ADD COLUMN owner bigint,               -- the replica running it (status `running`)
    ADD COLUMN seq bigint,                 -- its place in line: kept when it waits again
    DROP COLUMN claim_token,
    DROP COLUMN lease_until;

ALTER TABLE sheepdog.calls
    ADD COLUMN replica_id bigint,
    -- The tenth of a second its tokens were counted in (token limits' sliding windows).
    ADD COLUMN token_slot bigint,
    -- The budgets the reservation is held in, as 'scope|period_key'.
    ADD COLUMN budget_keys text[];
UPDATE sheepdog.calls SET budget_keys = ARRAY['*|' || budget_period] WHERE budget_period IS NOT NULL;
ALTER TABLE sheepdog.calls DROP COLUMN claim_token, DROP COLUMN budget_period;
CREATE INDEX calls_pending ON sheepdog.calls (replica_id) WHERE outcome = 'pending';

-- ------------------------------------------------------------------ the ready set
-- One row per job waiting for a call: new, retrying (run_at in the future) or held back by a
-- limit, a breaker, a pause or its turn. Dispatch takes each model's ("lane's") jobs batch by
-- batch, in arrival order (seq) within a batch, and orders batches by priority and virtual
-- time (see `scheduler`), which interleaves batches fairly.
CREATE TABLE sheepdog.backlog (
    batch_id  text NOT NULL,
    custom_id text NOT NULL,
    model     text NOT NULL,
    seq       bigint NOT NULL DEFAULT nextval('sheepdog.backlog_seq'),
    run_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (batch_id, custom_id)
);
CREATE INDEX backlog_lane ON sheepdog.backlog (model, batch_id, seq);

ALTER TABLE sheepdog.batches
    ADD COLUMN priority smallint NOT NULL DEFAULT 1,   -- 2 high, 1 normal, 0 low
    ADD COLUMN vpass bigint NOT NULL DEFAULT 0;         -- the virtual time its next job starts at

-- The virtual clock: the virtual time of the last job dispatched. A batch's next job starts at
-- its own pass or the clock, whichever is later, so a batch that starts waiting now shares the
-- limit with the batches already waiting instead of queueing behind all of them, and a batch
-- that was idle builds up no credit. Only dispatch (one at a time) moves these.
CREATE TABLE sheepdog.scheduler (
    id     integer PRIMARY KEY CHECK (id = 1),
    vclock bigint NOT NULL DEFAULT 0
);
INSERT INTO sheepdog.scheduler (id) VALUES (1);

-- ------------------------------------------------------------------ limits per scope
-- Scope `*` is every model together; a model's own row adds its own limits. A call must fit
-- both. The same rows carry the upstream's own pause (429s and x-ratelimit headers) and the
-- gate that lets one call go first after such a pause.
CREATE TABLE sheepdog.limit_scopes (
    scope         text PRIMARY KEY,
    rpm           numeric CHECK (rpm > 0),            -- NULL: unlimited
    tpm           numeric CHECK (tpm > 0),            -- NULL: unlimited
    burst_seconds numeric NOT NULL DEFAULT 1 CHECK (burst_seconds > 0),
    budget_usd    numeric CHECK (budget_usd >= 0),    -- NULL: unlimited
    budget_period text NOT NULL DEFAULT 'day' CHECK (budget_period IN ('day', 'month', 'total')),
    req_level     numeric NOT NULL DEFAULT 0,
    tok_level     numeric NOT NULL DEFAULT 0,
    bucket_at     timestamptz NOT NULL DEFAULT now(),
    paused_until  timestamptz,
    pause_reason  text,
    pause_streak  integer NOT NULL DEFAULT 0,         -- 429 rounds in a row
    gate_owner    bigint,                             -- the replica whose call goes first
    gate_until    timestamptz,
    updated_at    timestamptz NOT NULL DEFAULT now()
);
INSERT INTO sheepdog.limit_scopes (scope, rpm, tpm, burst_seconds, budget_usd, budget_period,
                                   req_level, tok_level, bucket_at)
SELECT '*', rpm, tpm, burst_seconds, budget_usd, budget_period, req_level, tok_level, bucket_at
  FROM sheepdog.limits;

-- Tokens per tenth of a second, per scope with a token limit: the sliding windows a call must
-- fit. A call counts its worst case when granted; its answer brings that down to what the
-- upstream counted, in the same tenth, so every window holds by the upstream's own count.
CREATE TABLE sheepdog.token_slots (
    scope  text NOT NULL,
    slot   bigint NOT NULL,              -- floor(epoch seconds × 10)
    tokens numeric NOT NULL DEFAULT 0,
    PRIMARY KEY (scope, slot)
);

ALTER TABLE sheepdog.budget ADD COLUMN scope text NOT NULL DEFAULT '*';
ALTER TABLE sheepdog.budget DROP CONSTRAINT budget_pkey;
ALTER TABLE sheepdog.budget ADD PRIMARY KEY (scope, period_key);

CREATE FUNCTION sheepdog.budget_period_start(period text, at timestamptz) RETURNS timestamptz
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE period
        WHEN 'day' THEN date_trunc('day', at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
        WHEN 'month' THEN date_trunc('month', at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
        ELSE '-infinity'::timestamptz END
$$;

DROP VIEW sheepdog.limit_usage;
DROP FUNCTION sheepdog.acquire(uuid, numeric, numeric);
DROP FUNCTION sheepdog.give_back(uuid, numeric);
DROP TABLE sheepdog.reservations;
DROP TABLE sheepdog.limits;

CREATE VIEW sheepdog.limit_usage AS
SELECT s.scope, s.rpm, s.tpm, g.burst_seconds, s.budget_usd, s.budget_period,
       sheepdog.budget_period_key(s.budget_period, now()) AS budget_period_key,
       coalesce(b.spent, 0) AS budget_spent_usd,
       coalesce(b.reserved, 0) AS budget_reserved_usd,
       CASE WHEN s.budget_usd IS NULL THEN NULL
            ELSE s.budget_usd - coalesce(b.spent, 0) - coalesce(b.reserved, 0) END AS budget_left_usd,
       (SELECT count(*) FROM sheepdog.calls c
         WHERE c.started_at > now() - interval '1 minute' AND (s.scope = '*' OR c.model = s.scope))
           AS requests_last_minute,
       (SELECT coalesce(sum(coalesce(c.prompt_tokens, 0) + coalesce(c.completion_tokens, 0)), 0)
          FROM sheepdog.calls c
         WHERE c.started_at > now() - interval '1 minute' AND (s.scope = '*' OR c.model = s.scope))
           AS tokens_last_minute,
       CASE WHEN s.paused_until > now() THEN s.paused_until END AS paused_until,
       CASE WHEN s.paused_until > now() THEN s.pause_reason END AS pause_reason
FROM sheepdog.limit_scopes s
CROSS JOIN (SELECT burst_seconds FROM sheepdog.limit_scopes WHERE scope = '*') g
LEFT JOIN sheepdog.budget b
       ON b.scope = s.scope AND b.period_key = sheepdog.budget_period_key(s.budget_period, now());
GRANT SELECT ON sheepdog.limit_usage TO sheepdog_analyst;

-- ------------------------------------------------------------------ breakers per scope
CREATE TABLE sheepdog.breakers (
    scope       text PRIMARY KEY,
    state       text NOT NULL DEFAULT 'closed' CHECK (state IN ('closed', 'open', 'half_open')),
    since       timestamptz NOT NULL DEFAULT now(),
    reason      text,
    trips       integer NOT NULL DEFAULT 0,
    open_until  timestamptz,
    probe_owner bigint,
    probe_until timestamptz
);
INSERT INTO sheepdog.breakers (scope, state, since, reason, trips, open_until)
SELECT '*', state, since, reason, trips, open_until FROM sheepdog.breaker;
DROP FUNCTION sheepdog.breaker_trip(text, float8, float8);
DROP FUNCTION sheepdog.breaker_claim_probe(text, float8);
DROP FUNCTION sheepdog.breaker_close(text);
DROP FUNCTION sheepdog.breaker_release_probe(text);
DROP TABLE sheepdog.breaker;

-- ------------------------------------------------------------------ the outbox
-- Messages to publish after a commit (dead letters of jobs out of attempts, result events):
-- written in the same transaction as the state they report, published with confirms by a
-- background task, deleted after the confirm. At least once.
CREATE TABLE sheepdog.outbox (
    id          bigserial PRIMARY KEY,
    exchange    text NOT NULL DEFAULT '',
    routing_key text NOT NULL,
    headers     jsonb NOT NULL DEFAULT '{}',
    body        bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
