-- A dispatch round holds the dispatch lock for fewer round trips (issue: replicas that add up).
--
-- Measured with 8 replicas on two cores, rounds followed each other about 30 ms apart with the
-- lock never free, while on the server their statements ran for a fraction of that: the rest was
-- the round trips between them, each waiting for a turn on a busy CPU while every other replica
-- waited for the lock. This function takes the lock and reads everything the planner needs in
-- one call; each statement in it takes its own snapshot (a volatile function), so it sees every
-- dispatch that committed before the lock was granted, as the separate statements did.

-- One scope as the planner reads it, numbers as text so that they arrive exact.
CREATE FUNCTION sheepdog.dispatch_scope_json(s sheepdog.limit_scopes, spent numeric, reserved numeric,
                                             at timestamptz)
RETURNS jsonb LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'scope', s.scope, 'rpm', s.rpm::text, 'tpm', s.tpm::text,
        'burst_seconds', s.burst_seconds::text, 'budget_usd', s.budget_usd::text,
        'req_level', s.req_level::text, 'tok_level', s.tok_level::text, 'bucket_at', s.bucket_at,
        'paused_until', s.paused_until, 'pause_reason', s.pause_reason, 'pause_streak', s.pause_streak,
        'gate_owner', s.gate_owner, 'gate_until', s.gate_until,
        'period_key', CASE WHEN s.budget_usd IS NULL THEN NULL
                           ELSE sheepdog.budget_period_key(s.budget_period, at) END,
        'period_end', sheepdog.budget_period_end(s.budget_period, at),
        'spent', spent::text, 'reserved', reserved::text)
$$;

-- Takes the dispatch lock (`lock_a`, `lock_b`), then reads, each in a statement after the
-- lock's: the database clock and the virtual clock; the scope `*`; every (model, batch) with jobs
-- waiting that may go, with what is left of its caps; the scopes of those models (locked: a
-- model's row is also written by the upstream's pauses); the token counts of the token-limited
-- scopes from `first_slot_back` slots before now (slots of `micros_per_slot`); the breakers not
-- closed (locked); and the first due jobs of every pair, enough of each to fill `slots` between
-- them and a few more (at least 4 of each, at most `slots`), in the order they wait. Sorts and
-- bitmap scans are off for the rest of the transaction: its statements only ever want the few
-- first entries of an index, in its order.
CREATE FUNCTION sheepdog.dispatch_view(lock_a integer, lock_b integer, micros_per_slot bigint,
                                       first_slot_back bigint, slots bigint)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    t timestamptz;
    vc bigint;
    glob jsonb;
    pair_list jsonb;
    lanes text[];
    model_list jsonb;
    limited text[];
    slot_list jsonb;
    breaker_list jsonb;
    per_pair bigint;
    candidate_list jsonb;
BEGIN
    PERFORM pg_advisory_xact_lock(lock_a, lock_b);
    PERFORM set_config('enable_sort', 'off', true), set_config('enable_bitmapscan', 'off', true);
    SELECT clock_timestamp(), sc.vclock INTO t, vc FROM sheepdog.scheduler sc WHERE sc.id = 1;

    SELECT sheepdog.dispatch_scope_json(s, b.spent, b.reserved, t) INTO glob
      FROM sheepdog.limit_scopes s
      LEFT JOIN sheepdog.budget b ON b.scope = s.scope
            AND b.period_key = sheepdog.budget_period_key(s.budget_period, t)
     WHERE s.scope = '*';

    -- A loose index scan of the backlog's key: one probe per pair however many jobs each has.
    WITH RECURSIVE p AS (
        (SELECT model, batch_id FROM sheepdog.backlog ORDER BY model, batch_id LIMIT 1)
        UNION ALL
        SELECT n.model, n.batch_id FROM p CROSS JOIN LATERAL (
            SELECT b.model, b.batch_id FROM sheepdog.backlog b
             WHERE (b.model, b.batch_id) > (p.model, p.batch_id)
             ORDER BY b.model, b.batch_id LIMIT 1) n)
    SELECT coalesce(jsonb_agg(jsonb_build_object(
               'model', p.model, 'batch_id', p.batch_id,
               'priority', coalesce(bt.priority, 1::smallint), 'vpass', coalesce(bt.vpass, 0),
               'cap_left', (bt.max_cost_usd - coalesce(cap.spent, 0) - coalesce(cap.reserved, 0))::text,
               'key_scope', 'key:' || k.name, 'key_period', k.period_key,
               'key_left', (k.max_cost_usd - coalesce(kb.spent, 0) - coalesce(kb.reserved, 0))::text)
             ORDER BY p.model, p.batch_id), '[]'::jsonb),
           coalesce(array_agg(DISTINCT p.model), '{}')
      INTO pair_list, lanes
      FROM p
      LEFT JOIN sheepdog.batches bt ON bt.batch_id = p.batch_id
      LEFT JOIN sheepdog.budget cap ON cap.scope = 'batch:' || p.batch_id AND cap.period_key = 'total'
      LEFT JOIN sheepdog.api_batches ab ON ab.id = p.batch_id
      LEFT JOIN LATERAL (SELECT name, max_cost_usd, sheepdog.budget_period_key(period, t) AS period_key
                           FROM sheepdog.api_keys WHERE name = ab.owner AND max_cost_usd IS NOT NULL) k ON true
      LEFT JOIN sheepdog.budget kb ON kb.scope = 'key:' || k.name AND kb.period_key = k.period_key
     WHERE coalesce(bt.control, 'active') = 'active' AND (bt.expires_at IS NULL OR bt.expires_at > now());

    SELECT coalesce(jsonb_agg(m.j ORDER BY m.scope), '[]'::jsonb),
           coalesce(array_agg(m.scope) FILTER (WHERE m.tpm IS NOT NULL), '{}')
      INTO model_list, limited
      FROM (SELECT s.scope, s.tpm, sheepdog.dispatch_scope_json(s, b.spent, b.reserved, t) AS j
              FROM sheepdog.limit_scopes s
              LEFT JOIN sheepdog.budget b ON b.scope = s.scope
                    AND b.period_key = sheepdog.budget_period_key(s.budget_period, t)
             WHERE s.scope = ANY(lanes) AND s.scope <> '*'
             ORDER BY s.scope FOR UPDATE OF s) m;

    IF glob->>'tpm' IS NOT NULL THEN
        limited := limited || '*'::text;
    END IF;
    SELECT coalesce(jsonb_agg(jsonb_build_array(ts.scope, ts.slot, ts.tokens::text)), '[]'::jsonb)
      INTO slot_list
      FROM sheepdog.token_slots ts
     WHERE cardinality(limited) > 0 AND ts.scope = ANY(limited)
       AND ts.slot >= div((extract(epoch FROM t) * 1000000)::numeric, micros_per_slot)::bigint - first_slot_back;

    SELECT coalesce(jsonb_agg(jsonb_build_object(
               'scope', br.scope, 'state', br.state, 'since', br.since, 'reason', br.reason,
               'open_until', br.open_until, 'probe_until', br.probe_until) ORDER BY br.scope), '[]'::jsonb)
      INTO breaker_list
      FROM (SELECT * FROM sheepdog.breakers
             WHERE (scope = '*' OR scope = ANY(lanes)) AND state <> 'closed'
             ORDER BY scope FOR UPDATE) br;

    -- The same count a pair gets as `store::dispatch::candidates` asks for.
    per_pair := least(greatest((slots + jsonb_array_length(pair_list) - 1)
                               / greatest(jsonb_array_length(pair_list), 1), 4),
                      greatest(slots, 1));
    SELECT coalesce(jsonb_agg(jsonb_build_array(c.batch_id, c.custom_id, c.model, c.seq, c.reserve_tokens,
                                                c.reserve_cost_usd::text) ORDER BY l.ord, c.seq), '[]'::jsonb)
      INTO candidate_list
      FROM jsonb_array_elements(pair_list) WITH ORDINALITY AS l(pair, ord)
     CROSS JOIN LATERAL (
           SELECT b.batch_id, b.custom_id, b.model, b.seq, b.reserve_tokens, b.reserve_cost_usd
             FROM sheepdog.backlog b
            WHERE b.model = l.pair->>'model' AND b.batch_id = l.pair->>'batch_id' AND b.run_at <= t
            ORDER BY b.seq
            LIMIT per_pair) c;

    RETURN jsonb_build_object('now', t, 'vclock', vc, 'global', glob, 'pairs', pair_list,
                              'models', model_list, 'slots', slot_list, 'breakers', breaker_list,
                              'candidates', candidate_list);
END
$$;
