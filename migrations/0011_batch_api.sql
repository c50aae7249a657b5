-- The OpenAI Batch API over HTTP (contract §10): producer keys, files, API batches.
--
-- An API batch is a sheepdog batch (`batches`, same id) plus its API side (`api_batches`). It is
-- created in the control state `validating`, which dispatch never grants (it grants `active`
-- batches only): its whole input file is validated and every line published with confirms
-- before one statement makes it `active`. A file that breaks the rules ends it `failed`: nothing
-- of it is ever called.

-- Producer keys: stored as the SHA-256 of the key; `prefix` (not secret) names and finds the row.
CREATE TABLE sheepdog.api_keys (
    name         text PRIMARY KEY,
    prefix       text NOT NULL,
    key_hash     bytea NOT NULL UNIQUE,
    -- The key's own spending cap over its batches together, a budget of scope `key:<name>`.
    max_cost_usd numeric CHECK (max_cost_usd > 0),
    period       text NOT NULL DEFAULT 'total' CHECK (period IN ('day', 'month', 'total')),
    created_at   timestamptz NOT NULL DEFAULT now(),
    revoked_at   timestamptz
);
CREATE INDEX api_keys_prefix ON sheepdog.api_keys (prefix) WHERE revoked_at IS NULL;

-- Files. An uploaded file's bytes are in `api_file_chunks` (about 1 MiB each, in order); its row
-- is `uploading` until the last chunk is stored, and invisible until then. An output or error
-- file of a batch has no chunks: it is made from the batch's jobs when it is read.
CREATE TABLE sheepdog.api_files (
    id          text PRIMARY KEY,
    seq         bigserial UNIQUE,                 -- list order and cursor
    owner       text NOT NULL REFERENCES sheepdog.api_keys (name),
    purpose     text NOT NULL CHECK (purpose IN ('batch', 'batch_output')),
    filename    text NOT NULL,
    state       text NOT NULL CHECK (state IN ('uploading', 'processed')),
    bytes       bigint NOT NULL DEFAULT 0,
    lines       integer NOT NULL DEFAULT 0,
    -- For an output file: its batch, and whether it holds the answered lines or the others.
    batch_id    text,
    kind        text CHECK (kind IN ('output', 'error')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    touched_at  timestamptz NOT NULL DEFAULT now(),  -- an upload's last chunk
    expires_at  timestamptz
);
CREATE INDEX api_files_owner ON sheepdog.api_files (owner, seq);
CREATE INDEX api_files_expiry ON sheepdog.api_files (expires_at) WHERE expires_at IS NOT NULL;

CREATE TABLE sheepdog.api_file_chunks (
    file_id text NOT NULL REFERENCES sheepdog.api_files (id) ON DELETE CASCADE,
    seq     integer NOT NULL,
    data    bytea NOT NULL,
    PRIMARY KEY (file_id, seq)
);

CREATE TABLE sheepdog.api_batches (
    id                text PRIMARY KEY REFERENCES sheepdog.batches (batch_id),
    seq               bigserial UNIQUE,
    owner             text NOT NULL REFERENCES sheepdog.api_keys (name),
    input_file_id     text NOT NULL,
    endpoint          text NOT NULL,
    completion_window text NOT NULL,
    metadata          jsonb,
    -- `validating` until every line is published (or the file failed); then the sheepdog batch
    -- decides; `ended` once its output and error files are made.
    phase             text NOT NULL CHECK (phase IN ('validating', 'failed', 'running', 'ended')),
    errors            jsonb,
    -- Who is validating and publishing it, until when (renewed as it goes; another API process
    -- takes over a batch whose lease ran out).
    lease_owner       text,
    lease_until       timestamptz,
    in_progress_at    timestamptz,
    failed_at         timestamptz,
    finalizing_at     timestamptz,
    ended_at          timestamptz,
    output_file_id    text,
    error_file_id     text,
    created_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX api_batches_owner ON sheepdog.api_batches (owner, seq);
CREATE INDEX api_batches_open ON sheepdog.api_batches (phase) WHERE phase IN ('validating', 'running');

-- Creates seen recently: the same request of the same key within the window returns the batch
-- it made (the SDKs retry a create on a timeout or a 5xx and send no idempotency key). The
-- primary key decides, not a look first: a second insert meets the first one's row.
CREATE TABLE sheepdog.api_batch_requests (
    owner       text NOT NULL,
    fingerprint text NOT NULL,
    batch_id    text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (owner, fingerprint)
);

-- Two more controls: `validating` (an API batch being checked and published: dispatch skips it)
-- and `failed` (its file broke the rules: nothing of it is called; a job of it that arrives
-- anyway ends `cancelled`).
ALTER TABLE sheepdog.batches DROP CONSTRAINT batches_control_check;
ALTER TABLE sheepdog.batches ADD CONSTRAINT batches_control_check
    CHECK (control IN ('active', 'paused', 'cancelled', 'validating', 'failed'));

CREATE OR REPLACE FUNCTION sheepdog.batch_end(control text, expires_at timestamptz)
RETURNS text LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN control IN ('cancelled', 'failed') THEN 'cancelled'
                WHEN expires_at <= now() THEN 'expired' END
$$;

CREATE OR REPLACE FUNCTION sheepdog.batch_status(control text, total bigint, ended bigint, expired bigint,
                                                 expires_at timestamptz, started boolean, in_flight bigint)
RETURNS text LANGUAGE sql STABLE AS $$
    SELECT CASE
        WHEN control = 'validating' THEN 'validating'
        WHEN control = 'failed' THEN 'failed'
        WHEN control = 'cancelled' AND in_flight > 0 THEN 'cancelling'
        WHEN control = 'cancelled' THEN 'cancelled'
        WHEN total > 0 AND ended >= total AND in_flight = 0
            THEN CASE WHEN expired > 0 THEN 'expired' ELSE 'completed' END
        WHEN expires_at IS NOT NULL AND expires_at <= now() THEN 'expired'
        WHEN control = 'paused' THEN 'paused'
        WHEN started OR in_flight > 0 THEN 'in_progress'
        ELSE 'queued' END
$$;
