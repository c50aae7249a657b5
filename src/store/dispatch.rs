//! Dispatch: the one transaction that decides which waiting jobs a replica calls now.
//!
//! It locks the all-models scope row (so dispatches of all replicas take turns and no two can
//! take the last token), reads the database clock, finds the models that have jobs waiting,
//! loads their limits and breakers, lets [`Planner`] pick the jobs that fit in priority and fair
//! order, and writes everything back before it commits: bucket levels, budget reservations,
//! breaker probes, the first call after an upstream pause, the claimed jobs and their `pending`
//! ledger rows. A call is therefore never sent on a decision made from a stale copy of the limits.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::types::Json;
use sqlx::{PgPool, Postgres, Transaction};

use super::StoreError;
use crate::job::JobId;
use crate::plan::{
    slot_of, Blocked, Breaker, BreakerState, Budget, Candidate, KeyCap, Plan, Planner, Scope, HORIZON_SLOTS,
};

/// A job granted to this replica: claimed, its `pending` ledger row written.
#[derive(Debug, Clone)]
pub struct Granted {
    pub id: JobId,
    pub model: String,
    pub call_id: i64,
    pub attempt: i32,
    pub message: Vec<u8>,
    pub reserve_tokens: i64,
    pub reserve_cost_usd: Decimal,
    /// This call is the breaker probe of that scope.
    pub probe: Option<String>,
    /// This call is the first after that scope's upstream pause.
    pub first_after_pause: Option<String>,
}

/// What one dispatch gave.
#[derive(Debug, Clone, Default)]
pub struct Dispatched {
    pub jobs: Vec<Granted>,
    /// Nothing is waiting that is due now.
    pub idle: bool,
    /// Why every model is held, if it is.
    pub blocked: Option<Blocked>,
    /// Models held back by their own limits, breaker or pause.
    pub lanes_blocked: Vec<Blocked>,
    /// When waiting jobs may fit again.
    pub retry_in: Option<Duration>,
}

#[derive(sqlx::FromRow)]
struct ScopeRow {
    scope: String,
    rpm: Option<Decimal>,
    tpm: Option<Decimal>,
    burst_seconds: Decimal,
    budget_usd: Option<Decimal>,
    req_level: Decimal,
    tok_level: Decimal,
    bucket_at: DateTime<Utc>,
    paused_until: Option<DateTime<Utc>>,
    pause_reason: Option<String>,
    pause_streak: i32,
    gate_owner: Option<i64>,
    gate_until: Option<DateTime<Utc>>,
    period_key: Option<String>,
    period_end: Option<DateTime<Utc>>,
    spent: Option<Decimal>,
    reserved: Option<Decimal>,
}

const SCOPE_COLUMNS: &str = "s.scope, s.rpm, s.tpm, s.burst_seconds, s.budget_usd, s.req_level, s.tok_level, \
     s.bucket_at, s.paused_until, s.pause_reason, s.pause_streak, s.gate_owner, s.gate_until, \
     CASE WHEN s.budget_usd IS NULL THEN NULL ELSE sheepdog.budget_period_key(s.budget_period, $1) END AS period_key, \
     sheepdog.budget_period_end(s.budget_period, $1) AS period_end, b.spent, b.reserved";

fn scope_of(r: ScopeRow) -> (Scope, Decimal) {
    let budget = match (r.budget_usd, r.period_key) {
        (Some(limit), Some(period_key)) => Some(Budget {
            limit,
            period_key,
            spent: r.spent.unwrap_or_default(),
            reserved: r.reserved.unwrap_or_default(),
            period_end: r.period_end,
        }),
        _ => None,
    };
    (
        Scope {
            name: r.scope,
            rpm: r.rpm,
            tpm: r.tpm,
            req_level: r.req_level,
            tok_level: r.tok_level,
            bucket_at: Some(r.bucket_at),
            paused_until: r.paused_until,
            pause_reason: r.pause_reason,
            pause_streak: r.pause_streak,
            gate_owner: r.gate_owner,
            gate_until: r.gate_until,
            budget,
            token_slots: Vec::new(),
        },
        r.burst_seconds,
    )
}

/// Whether any job waits that is due now (read without a lock: a cheap check before dispatch).
pub async fn anything_due(pool: &PgPool) -> Result<bool, StoreError> {
    Ok(
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM sheepdog.backlog WHERE run_at <= now())")
            .fetch_one(pool)
            .await?,
    )
}

/// Takes up to `slots` jobs for `replica`. `probe_lease` bounds how long a breaker probe or a
/// first call after a pause may stay out before another replica may send one. `look_first`:
/// check cheaply whether anything is due before taking the lock (when the last dispatch found
/// nothing).
pub async fn dispatch(
    pool: &PgPool,
    replica: i64,
    slots: usize,
    probe_lease: Duration,
    look_first: bool,
) -> Result<Dispatched, StoreError> {
    if look_first && !anything_due(pool).await? {
        return Ok(Dispatched {
            idle: true,
            ..Default::default()
        });
    }
    let mut tx = pool.begin().await?;
    // The all-models row's lock makes dispatches of all replicas take turns. It is taken on its
    // own: everything else is read by later statements, whose snapshots see every dispatch that
    // committed before this one got the lock (a row read in the locking statement itself would
    // be as old as that statement, however long it waited).
    //
    // The backlog's statistics are seldom right: it swings between empty and millions of rows
    // faster than ANALYZE follows. Planned from "a few rows", a lane's first jobs were read by
    // fetching the whole lane and sorting it (13,000 rows for 124 in the benchmark). This
    // transaction's statements only ever want the few first entries of an index, in its order.
    sqlx::query(
        "SELECT set_config('enable_sort', 'off', true), set_config('enable_bitmapscan', 'off', true)
           FROM sheepdog.limit_scopes WHERE scope = '*' FOR UPDATE",
    )
    .execute(&mut *tx)
    .await?;
    let (now, vclock): (DateTime<Utc>, i64) =
        sqlx::query_as("SELECT clock_timestamp(), vclock FROM sheepdog.scheduler WHERE id = 1")
            .fetch_one(&mut *tx)
            .await?;
    let global_row: ScopeRow = sqlx::query_as(&format!(
        "SELECT {SCOPE_COLUMNS} FROM sheepdog.limit_scopes s
           LEFT JOIN sheepdog.budget b ON b.scope = s.scope
                 AND b.period_key = sheepdog.budget_period_key(s.budget_period, $1)
          WHERE s.scope = '*'"
    ))
    .bind(now)
    .fetch_one(&mut *tx)
    .await?;
    let (mut global, burst) = scope_of(global_row);
    let pairs = pairs(&mut tx, now).await?;
    let mut lanes: Vec<String> = pairs.iter().map(|p| p.model.clone()).collect();
    lanes.dedup();
    sqlx::query("SELECT 1 FROM sheepdog.limit_scopes WHERE scope = ANY($1) AND scope <> '*' ORDER BY scope FOR UPDATE")
        .bind(&lanes)
        .execute(&mut *tx)
        .await?;
    let model_rows: Vec<ScopeRow> = sqlx::query_as(&format!(
        "SELECT {SCOPE_COLUMNS} FROM sheepdog.limit_scopes s
           LEFT JOIN sheepdog.budget b ON b.scope = s.scope
                 AND b.period_key = sheepdog.budget_period_key(s.budget_period, $1)
          WHERE s.scope = ANY($2) AND s.scope <> '*'"
    ))
    .bind(now)
    .bind(&lanes)
    .fetch_all(&mut *tx)
    .await?;
    let mut models: Vec<Scope> = model_rows.into_iter().map(|r| scope_of(r).0).collect();
    token_windows(&mut tx, now, std::iter::once(&mut global).chain(models.iter_mut())).await?;
    let breakers = breakers(&mut tx, &lanes).await?;
    let planner = Planner::new(now, burst, global, models, &lanes, &breakers);
    let open = planner.open_lanes(&lanes);
    let open_pairs: Vec<&Pair> = pairs.iter().filter(|p| open.contains(&p.model)).collect();
    let candidates = if open_pairs.is_empty() {
        Vec::new()
    } else {
        candidates(&mut tx, &open_pairs, vclock, now, slots).await?
    };
    let plan = planner.plan(&lanes, candidates, slots);
    let jobs = apply(&mut tx, &plan, replica, now, probe_lease).await?;
    tx.commit().await?;
    Ok(Dispatched {
        jobs,
        idle: false,
        blocked: plan.blocked,
        lanes_blocked: plan.lanes_blocked,
        retry_in: plan.retry_in,
    })
}

/// The token counts of the last minute, for each scope with a token limit.
async fn token_windows(
    tx: &mut Transaction<'_, Postgres>,
    now: DateTime<Utc>,
    scopes: impl Iterator<Item = &mut Scope>,
) -> Result<(), StoreError> {
    let mut limited: Vec<&mut Scope> = scopes.filter(|s| s.tpm.is_some()).collect();
    if limited.is_empty() {
        return Ok(());
    }
    let names: Vec<String> = limited.iter().map(|s| s.name.clone()).collect();
    let rows: Vec<(String, i64, Decimal)> =
        sqlx::query_as("SELECT scope, slot, tokens FROM sheepdog.token_slots WHERE scope = ANY($1) AND slot >= $2")
            .bind(&names)
            .bind(slot_of(now) - HORIZON_SLOTS)
            .fetch_all(&mut **tx)
            .await?;
    for (scope, slot, tokens) in rows {
        if let Some(s) = limited.iter_mut().find(|s| s.name == scope) {
            s.token_slots.push((slot, tokens));
        }
    }
    Ok(())
}

/// A batch with jobs of a model waiting.
#[derive(Debug, Clone, sqlx::FromRow)]
struct Pair {
    model: String,
    batch_id: String,
    priority: i16,
    vpass: i64,
    /// What is left of the batch's spending cap, if it has one.
    cap_left: Option<Decimal>,
    /// Its producer key's cap (Batch API batches of a capped key): scope, period key, left.
    key_scope: Option<String>,
    key_period: Option<String>,
    key_left: Option<Decimal>,
}

/// Every (model, batch) with jobs waiting that may go: a loose index scan of `backlog_lane`, one
/// probe per pair however many jobs each has; then only batches that are active and within their
/// deadline, with what is left of their spending caps (the batch's, and its producer key's).
async fn pairs(tx: &mut Transaction<'_, Postgres>, now: DateTime<Utc>) -> Result<Vec<Pair>, StoreError> {
    Ok(sqlx::query_as(
        "WITH RECURSIVE p AS (
             (SELECT model, batch_id FROM sheepdog.backlog ORDER BY model, batch_id LIMIT 1)
             UNION ALL
             SELECT n.model, n.batch_id FROM p CROSS JOIN LATERAL (
                 SELECT b.model, b.batch_id FROM sheepdog.backlog b
                  WHERE (b.model, b.batch_id) > (p.model, p.batch_id)
                  ORDER BY b.model, b.batch_id LIMIT 1) n)
         SELECT p.model, p.batch_id, coalesce(bt.priority, 1::smallint) AS priority,
                coalesce(bt.vpass, 0) AS vpass,
                bt.max_cost_usd - coalesce(cap.spent, 0) - coalesce(cap.reserved, 0) AS cap_left,
                'key:' || k.name AS key_scope, k.period_key AS key_period,
                k.max_cost_usd - coalesce(kb.spent, 0) - coalesce(kb.reserved, 0) AS key_left
           FROM p
           LEFT JOIN sheepdog.batches bt ON bt.batch_id = p.batch_id
           LEFT JOIN sheepdog.budget cap ON cap.scope = 'batch:' || p.batch_id AND cap.period_key = 'total'
           LEFT JOIN sheepdog.api_batches ab ON ab.id = p.batch_id
           LEFT JOIN LATERAL (SELECT name, max_cost_usd, sheepdog.budget_period_key(period, $1) AS period_key
                                FROM sheepdog.api_keys WHERE name = ab.owner AND max_cost_usd IS NOT NULL) k ON true
           LEFT JOIN sheepdog.budget kb ON kb.scope = 'key:' || k.name AND kb.period_key = k.period_key
          WHERE coalesce(bt.control, 'active') = 'active' AND (bt.expires_at IS NULL OR bt.expires_at > now())",
    )
    .bind(now)
    .fetch_all(&mut **tx)
    .await?)
}

type BreakerRow = (
    String,
    BreakerState,
    DateTime<Utc>,
    Option<String>,
    Option<DateTime<Utc>>,
    Option<DateTime<Utc>>,
);

async fn breakers(
    tx: &mut Transaction<'_, Postgres>,
    lanes: &[String],
) -> Result<HashMap<String, Breaker>, StoreError> {
    let rows: Vec<BreakerRow> = sqlx::query_as(
        "SELECT scope, state, since, reason, open_until, probe_until FROM sheepdog.breakers
          WHERE (scope = '*' OR scope = ANY($1)) AND state <> 'closed'
          ORDER BY scope FOR UPDATE",
    )
    .bind(lanes)
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            (
                r.0,
                Breaker {
                    state: r.1,
                    since: Some(r.2),
                    reason: r.3,
                    open_until: r.4,
                    probe_until: r.5,
                },
            )
        })
        .collect())
}

type CandidateRow = (String, String, String, Option<i64>, Option<Decimal>);

/// The first due jobs of each open (model, batch), in arrival order, each with its virtual
/// time: its batch's pass (or the clock, if later) plus its place in the batch.
async fn candidates(
    tx: &mut Transaction<'_, Postgres>,
    pairs: &[&Pair],
    vclock: i64,
    now: DateTime<Utc>,
    slots: usize,
) -> Result<Vec<Candidate>, StoreError> {
    // Enough of each batch to fill the slots between them, and a few more in case some do not
    // fit (a batch's cap, a model's bucket).
    let per_batch = slots.div_ceil(pairs.len()).max(4).min(slots.max(1));
    let models: Vec<&str> = pairs.iter().map(|p| p.model.as_str()).collect();
    let batches: Vec<&str> = pairs.iter().map(|p| p.batch_id.as_str()).collect();
    let rows: Vec<CandidateRow> = sqlx::query_as(
        "SELECT c.batch_id, c.custom_id, c.model, j.reserve_tokens, j.reserve_cost_usd
           FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS l(model, batch_id, ord)
           CROSS JOIN LATERAL (
               SELECT b.batch_id, b.custom_id, b.model, b.seq
                 FROM sheepdog.backlog b
                WHERE b.model = l.model AND b.batch_id = l.batch_id AND b.run_at <= $3
                ORDER BY b.seq
                LIMIT $4
                FOR UPDATE SKIP LOCKED) c
           JOIN sheepdog.jobs j ON j.batch_id = c.batch_id AND j.custom_id = c.custom_id
          ORDER BY l.ord, c.seq",
    )
    .bind(&models)
    .bind(&batches)
    .bind(now)
    .bind(per_batch as i64)
    .fetch_all(&mut **tx)
    .await?;
    let by_pair: HashMap<(&str, &str), &&Pair> = pairs
        .iter()
        .map(|p| ((p.model.as_str(), p.batch_id.as_str()), p))
        .collect();
    let mut rank: HashMap<(String, String), i64> = HashMap::new();
    Ok(rows
        .into_iter()
        .filter_map(|r| {
            let pair = *by_pair.get(&(r.2.as_str(), r.0.as_str()))?;
            let i = rank.entry((r.2.clone(), r.0.clone())).or_insert(0);
            let vtime = pair.vpass.max(vclock) + *i;
            *i += 1;
            Some(Candidate {
                priority: pair.priority,
                vtime,
                batch_id: r.0,
                custom_id: r.1,
                model: r.2,
                tokens: r.3.unwrap_or(0),
                cost: r.4.unwrap_or_default(),
                batch_cap_left: pair.cap_left,
                key_cap: match (&pair.key_scope, &pair.key_period, pair.key_left) {
                    (Some(scope), Some(period_key), Some(left)) => Some(KeyCap {
                        scope: scope.clone(),
                        period_key: period_key.clone(),
                        left,
                    }),
                    _ => None,
                },
            })
        })
        .collect())
}

type GrantedRow = (
    i64,
    String,
    String,
    i32,
    String,
    Option<Vec<u8>>,
    Option<i64>,
    Option<Decimal>,
);

/// A grant from its row (call id, batch, custom id, attempt, model, message, worst case).
fn granted(r: GrantedRow, probe: Option<String>, first_after_pause: Option<String>) -> Granted {
    Granted {
        id: JobId {
            batch_id: r.1,
            custom_id: r.2,
        },
        call_id: r.0,
        attempt: r.3,
        model: r.4,
        message: r.5.unwrap_or_default(),
        reserve_tokens: r.6.unwrap_or(0),
        reserve_cost_usd: r.7.unwrap_or_default(),
        probe,
        first_after_pause,
    }
}

/// Writes a plan back: levels, reservations, probes, gates, claims and ledger rows.
async fn apply(
    tx: &mut Transaction<'_, Postgres>,
    plan: &Plan,
    replica: i64,
    now: DateTime<Utc>,
    lease: Duration,
) -> Result<Vec<Granted>, StoreError> {
    if !plan.levels.is_empty() {
        let scopes: Vec<&str> = plan.levels.iter().map(|l| l.scope.as_str()).collect();
        let req: Vec<Decimal> = plan.levels.iter().map(|l| l.req_level).collect();
        sqlx::query(
            "UPDATE sheepdog.limit_scopes s SET req_level = v.r, bucket_at = $3
               FROM unnest($1::text[], $2::numeric[]) AS v(scope, r)
              WHERE s.scope = v.scope",
        )
        .bind(&scopes)
        .bind(&req)
        .bind(now)
        .execute(&mut **tx)
        .await?;
    }
    if !plan.slot_tokens.is_empty() {
        let scopes: Vec<&str> = plan.slot_tokens.iter().map(|t| t.0.as_str()).collect();
        let tokens: Vec<Decimal> = plan.slot_tokens.iter().map(|t| t.1).collect();
        sqlx::query(
            "INSERT INTO sheepdog.token_slots AS t (scope, slot, tokens)
             SELECT v.scope, $3, v.tokens FROM unnest($1::text[], $2::numeric[]) AS v(scope, tokens)
             ON CONFLICT (scope, slot) DO UPDATE SET tokens = t.tokens + EXCLUDED.tokens",
        )
        .bind(&scopes)
        .bind(&tokens)
        .bind(plan.slot)
        .execute(&mut **tx)
        .await?;
        // Slots older than any window checked are of no more use (now and then is enough).
        if plan.slot % 50 == 0 {
            sqlx::query("DELETE FROM sheepdog.token_slots WHERE slot < $1")
                .bind(plan.slot - 2 * HORIZON_SLOTS)
                .execute(&mut **tx)
                .await?;
        }
    }
    if !plan.reserved.is_empty() {
        let scopes: Vec<&str> = plan.reserved.iter().map(|r| r.0.as_str()).collect();
        let keys: Vec<&str> = plan.reserved.iter().map(|r| r.1.as_str()).collect();
        let amounts: Vec<Decimal> = plan.reserved.iter().map(|r| r.2).collect();
        sqlx::query(
            "INSERT INTO sheepdog.budget AS b (scope, period_key, reserved)
             SELECT * FROM unnest($1::text[], $2::text[], $3::numeric[])
             ON CONFLICT (scope, period_key) DO UPDATE SET reserved = b.reserved + EXCLUDED.reserved",
        )
        .bind(&scopes)
        .bind(&keys)
        .bind(&amounts)
        .execute(&mut **tx)
        .await?;
    }
    let lease_s = lease.as_secs_f64();
    if !plan.probes.is_empty() {
        sqlx::query(
            "UPDATE sheepdog.breakers SET state = 'half_open',
                    since = CASE WHEN state = 'half_open' THEN since ELSE $3 END,
                    probe_owner = $2, probe_until = $3 + make_interval(secs => $4)
              WHERE scope = ANY($1)",
        )
        .bind(&plan.probes)
        .bind(replica)
        .bind(now)
        .bind(lease_s)
        .execute(&mut **tx)
        .await?;
    }
    if !plan.firsts.is_empty() {
        sqlx::query(
            "UPDATE sheepdog.limit_scopes SET gate_owner = $2, gate_until = $3 + make_interval(secs => $4)
              WHERE scope = ANY($1)",
        )
        .bind(&plan.firsts)
        .bind(replica)
        .bind(now)
        .bind(lease_s)
        .execute(&mut **tx)
        .await?;
    }
    if plan.grants.is_empty() {
        return Ok(Vec::new());
    }
    let batch_ids: Vec<&str> = plan.grants.iter().map(|g| g.batch_id.as_str()).collect();
    let custom_ids: Vec<&str> = plan.grants.iter().map(|g| g.custom_id.as_str()).collect();
    let keys: Vec<Json<&Vec<String>>> = plan.grants.iter().map(|g| Json(&g.budget_keys)).collect();
    let rows: Vec<GrantedRow> = sqlx::query_as(
        "WITH g AS (
             SELECT * FROM unnest($1::text[], $2::text[], $3::jsonb[]) AS g(batch_id, custom_id, keys)
         ), gone AS (
             DELETE FROM sheepdog.backlog bl USING g
              WHERE bl.batch_id = g.batch_id AND bl.custom_id = g.custom_id
         ), run AS (
             UPDATE sheepdog.jobs j
                SET status = 'running', owner = $4, attempts = j.attempts + 1,
                    started_at = coalesce(j.started_at, $5)
               FROM g
              WHERE j.batch_id = g.batch_id AND j.custom_id = g.custom_id
             RETURNING j.batch_id, j.custom_id, j.model, j.attempts, j.message, j.reserve_tokens,
                       j.reserve_cost_usd
         ), call AS (
             INSERT INTO sheepdog.calls (batch_id, custom_id, attempt, model, outcome, reserved_tokens,
                                         reserved_cost_usd, budget_keys, replica_id, started_at, token_slot)
             SELECT run.batch_id, run.custom_id, run.attempts, run.model, 'pending',
                    coalesce(run.reserve_tokens, 0), coalesce(run.reserve_cost_usd, 0),
                    ARRAY(SELECT jsonb_array_elements_text(g.keys)), $4, $5, $6
               FROM run JOIN g ON g.batch_id = run.batch_id AND g.custom_id = run.custom_id
             RETURNING id, batch_id, custom_id, attempt
         )
         SELECT call.id, call.batch_id, call.custom_id, call.attempt, run.model, run.message,
                run.reserve_tokens, run.reserve_cost_usd
           FROM call JOIN run ON run.batch_id = call.batch_id AND run.custom_id = call.custom_id",
    )
    .bind(&batch_ids)
    .bind(&custom_ids)
    .bind(&keys)
    .bind(replica)
    .bind(now)
    .bind(plan.slot)
    .fetch_all(&mut **tx)
    .await?;
    // Each granted batch's pass moves past its last granted job; the clock, past the last of all.
    let mut passes: HashMap<&str, i64> = HashMap::new();
    for g in &plan.grants {
        let p = passes.entry(g.batch_id.as_str()).or_insert(0);
        *p = (*p).max(g.vtime + 1);
    }
    let pass_batches: Vec<&str> = passes.keys().copied().collect();
    let pass_values: Vec<i64> = passes.values().copied().collect();
    let max_vtime = plan.grants.iter().map(|g| g.vtime).max().unwrap_or(0);
    sqlx::query(
        "WITH v AS (SELECT * FROM unnest($1::text[], $2::bigint[]) AS v(batch_id, pass)),
              b AS (UPDATE sheepdog.batches b SET vpass = greatest(b.vpass, v.pass)
                      FROM v WHERE b.batch_id = v.batch_id)
         UPDATE sheepdog.scheduler SET vclock = greatest(vclock, $3) WHERE id = 1",
    )
    .bind(&pass_batches)
    .bind(&pass_values)
    .bind(max_vtime)
    .execute(&mut **tx)
    .await?;
    let by_id: HashMap<(String, String), &crate::plan::Grant> = plan
        .grants
        .iter()
        .map(|g| ((g.batch_id.clone(), g.custom_id.clone()), g))
        .collect();
    Ok(rows
        .into_iter()
        .map(|r| {
            let g = by_id.get(&(r.1.clone(), r.2.clone()));
            granted(
                r,
                g.and_then(|g| g.probe.clone()),
                g.and_then(|g| g.first_after_pause.clone()),
            )
        })
        .collect())
}

/// Grants Postgres holds for `replica` that are not in `in_hand` (the calls it is working on):
/// jobs running as its, with their call pending. A dispatch whose COMMIT went through while
/// its answer was lost with the connection leaves such grants; the replica runs them.
pub async fn lost_grants(pool: &PgPool, replica: i64, in_hand: &[i64]) -> Result<Vec<Granted>, StoreError> {
    let rows: Vec<GrantedRow> = sqlx::query_as(
        "SELECT c.id, c.batch_id, c.custom_id, c.attempt, c.model, j.message, j.reserve_tokens,
                j.reserve_cost_usd
           FROM sheepdog.calls c
           JOIN sheepdog.jobs j ON j.batch_id = c.batch_id AND j.custom_id = c.custom_id
          WHERE c.replica_id = $1 AND c.outcome = 'pending' AND NOT (c.id = ANY($2))
            AND j.status = 'running' AND j.owner = $1 AND j.attempts = c.attempt",
    )
    .bind(replica)
    .bind(in_hand)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(|r| granted(r, None, None)).collect())
}
