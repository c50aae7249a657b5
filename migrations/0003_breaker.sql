-- One circuit breaker for all replicas (contract §5). Each replica watches the
-- failure rate of its own recent calls; the first to see it cross the threshold
-- opens this shared breaker, and every replica learns of it through NOTIFY on
-- `sheepdog_breaker` within milliseconds. After a cooldown that doubles on each
-- repeated trip, exactly one replica holds the probe (half-open); its call
-- closes the breaker or opens it again.

CREATE TABLE sheepdog.breaker (
    id           integer PRIMARY KEY CHECK (id = 1),
    state        text NOT NULL DEFAULT 'closed' CHECK (state IN ('closed', 'open', 'half_open')),
    since        timestamptz NOT NULL DEFAULT now(),
    reason       text,
    -- Trips since the breaker last closed: the cooldown doubles with each.
    trips        integer NOT NULL DEFAULT 0,
    open_until   timestamptz,
    probe_owner  text,
    probe_until  timestamptz
);
INSERT INTO sheepdog.breaker (id) VALUES (1);

CREATE FUNCTION sheepdog.breaker_trip(p_reason text, p_base_seconds float8, p_max_seconds float8)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    b sheepdog.breaker%ROWTYPE;
BEGIN
    SELECT * INTO b FROM sheepdog.breaker WHERE id = 1 FOR UPDATE;
    IF b.state = 'open' THEN
        RETURN 'open';
    END IF;
    UPDATE sheepdog.breaker SET
        state = 'open', since = now(), reason = p_reason, trips = b.trips + 1,
        open_until = now() + make_interval(secs => least(p_max_seconds, p_base_seconds * power(2, least(b.trips, 20)))),
        probe_owner = NULL, probe_until = NULL
    WHERE id = 1;
    PERFORM pg_notify('sheepdog_breaker', 'open');
    RETURN 'opened';
END
$$;

-- The one probe: granted when the cooldown is over, or when the previous
-- prober's lease ran out (it died).
CREATE FUNCTION sheepdog.breaker_claim_probe(p_owner text, p_lease_seconds float8)
RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    UPDATE sheepdog.breaker SET
        state = 'half_open', since = CASE WHEN state = 'half_open' THEN since ELSE now() END,
        probe_owner = p_owner, probe_until = now() + make_interval(secs => p_lease_seconds)
    WHERE id = 1
      AND ((state = 'open' AND open_until <= now()) OR (state = 'half_open' AND probe_until < now()));
    IF FOUND THEN
        PERFORM pg_notify('sheepdog_breaker', 'half_open');
    END IF;
    RETURN FOUND;
END
$$;

CREATE FUNCTION sheepdog.breaker_close(p_owner text)
RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    UPDATE sheepdog.breaker SET state = 'closed', since = now(), reason = NULL, trips = 0,
           open_until = NULL, probe_owner = NULL, probe_until = NULL
     WHERE id = 1 AND state = 'half_open' AND probe_owner = p_owner;
    IF FOUND THEN
        PERFORM pg_notify('sheepdog_breaker', 'closed');
    END IF;
    RETURN FOUND;
END
$$;

-- The prober found no job to probe with: back to open, probe again soon.
CREATE FUNCTION sheepdog.breaker_release_probe(p_owner text)
RETURNS void LANGUAGE sql AS $$
    UPDATE sheepdog.breaker SET state = 'open', open_until = now() + interval '1 second',
           probe_owner = NULL, probe_until = NULL
     WHERE id = 1 AND state = 'half_open' AND probe_owner = p_owner;
$$;
