//! Dispatch: the one transaction that settles a replica's calls that came back and decides which
//! waiting jobs it calls now.
//!
//! It takes the dispatch lock (so dispatches of all replicas take turns and no two can take the
//! last token), reads the database clock, finds the models that have jobs waiting, loads their
//! limits and breakers, lets [`Planner`] pick the jobs that fit in priority and fair order, and
//! writes everything back before it commits: bucket levels, budget reservations, breaker
//! probes, the first call after an upstream pause, the claimed jobs (their backlog rows gone)
//! and their `pending` ledger rows. A call is therefore never sent on a decision made from a
//! stale copy of the limits.

use super::sql::{query, query_as, query_scalar, Standalone};
use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::types::Json;
use sqlx::{PgConnection, PgPool, Postgres, Transaction};

use super::settle::Settlement;
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
    /// What to send.
    pub payload: Payload,
    pub reserve_tokens: i64,
    pub reserve_cost_usd: Decimal,
    /// Its reservation is held in budgets or token windows other replicas share: settling it
    /// writes rows a dispatch writes too.
    pub shared: bool,
    /// This call is the breaker probe of that scope.
    pub probe: Option<String>,
    /// This call is the first after that scope's upstream pause.
    pub first_after_pause: Option<String>,
}

/// What a granted call sends.
#[derive(Debug, Clone)]
pub enum Payload {
    /// The request as it goes upstream, made when the job arrived.
    Request(Vec<u8>),
    /// The message as it arrived, stored by a version before requests were (made into the
    /// request when called).
    Message(Vec<u8>),
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

/// The advisory lock every dispatch takes first, and every change that must not race a grant
/// (`limits set`, batch pause and cancel): dispatches of all replicas take turns under it. A
/// transaction-level advisory lock writes nothing (a row lock writes a WAL record each time) and
/// works behind a pooler in transaction mode.
pub const DISPATCH_LOCK: (i32, i32) = (0x7364_6470, 0);

/// Takes the dispatch lock for the rest of the transaction.
pub async fn lock(conn: &mut PgConnection) -> Result<(), StoreError> {
    query("SELECT pg_advisory_xact_lock($1, $2)")
        .bind(DISPATCH_LOCK.0)
        .bind(DISPATCH_LOCK.1)
        .execute(conn)
        .await?;
    Ok(())
}

/// Whether any job waits that is due now (read without the lock: a cheap check before it).
async fn anything_due(conn: &mut PgConnection) -> Result<bool, StoreError> {
    Ok(
        query_scalar("SELECT EXISTS (SELECT 1 FROM sheepdog.backlog WHERE run_at <= now())")
            .fetch_one(conn)
            .await?,
    )
}

/// One round of a replica, in one transaction: settles the calls that came back (see
/// [`crate::store::settle`]), then takes up to `slots` jobs for `replica`, and commits once.
/// `probe_lease` bounds how long a breaker probe or a first call after a pause may stay out
/// before another replica may send one. `look_first`: check cheaply whether anything is due
/// before taking the lock (when the last dispatch found nothing).
///
/// Settling touches no row another replica's dispatch writes, unless its calls reserved budgets
/// or tokens: then the lock is taken before settling, so that no two rounds can wait on each
/// other (one holding a budget row and waiting for the lock, the other the reverse).
pub async fn settle_and_dispatch(
    pool: &PgPool,
    settlements: &[Settlement],
    replica: i64,
    slots: usize,
    probe_lease: Duration,
    look_first: bool,
) -> Result<Dispatched, StoreError> {
    let mut tx = pool.begin().await?;
    let mut locked = false;
    if !settlements.is_empty() {
        if settlements.iter().any(|s| s.shared) {
            lock(&mut tx).await?;
            locked = true;
        }
        super::settle::settle(&mut tx, settlements).await?;
    }
    if slots == 0 || (look_first && !anything_due(&mut tx).await?) {
        tx.commit().await?;
        return Ok(Dispatched {
            idle: true,
            ..Default::default()
        });
    }
    if !locked {
        lock(&mut tx).await?;
    }
    // Everything below is read by statements after the lock's: their snapshots see every
    // dispatch that committed before this one got it.
    let d = grant(&mut tx, replica, slots, probe_lease).await?;
    match d {
        Some(d) => {
            tx.commit().await?;
            Ok(d)
        }
        None => {
            // A planned job was gone when claimed (its batch expired meanwhile): nothing of this
            // plan is kept; the next round plans again.
            tx.rollback().await?;
            Ok(Dispatched {
                retry_in: Some(Duration::from_millis(5)),
                ..Default::default()
            })
        }
    }
}

/// Plans and writes one dispatch, under the lock. `None` when a planned job could not be claimed.
async fn grant(
    tx: &mut Transaction<'_, Postgres>,
    replica: i64,
    slots: usize,
    probe_lease: Duration,
) -> Result<Option<Dispatched>, StoreError> {
    // The backlog's statistics are seldom right: it swings between empty and millions of rows
    // faster than ANALYZE follows. Planned from "a few rows", a lane's first jobs were read by
    // fetching the whole lane and sorting it (13,000 rows for 124 in the benchmark). This
    // transaction's statements only ever want the few first entries of an index, in its order,
    // so sorts and bitmap scans are off for it.
    let (now, vclock): (DateTime<Utc>, i64) = query_as(
        "SELECT clock_timestamp(), vclock, set_config('enable_sort', 'off', true),
                set_config('enable_bitmapscan', 'off', true)
           FROM sheepdog.scheduler WHERE id = 1",
    )
    .fetch_one(&mut **tx)
    .await
    .map(|r: (DateTime<Utc>, i64, String, String)| (r.0, r.1))?;
    let global_row: ScopeRow = query_as(&format!(
        "SELECT {SCOPE_COLUMNS} FROM sheepdog.limit_scopes s
           LEFT JOIN sheepdog.budget b ON b.scope = s.scope
                 AND b.period_key = sheepdog.budget_period_key(s.budget_period, $1)
          WHERE s.scope = '*'"
    ))
    .bind(now)
    .fetch_one(&mut **tx)
    .await?;
    let (mut global, burst) = scope_of(global_row);
    let pairs = pairs(tx, now).await?;
    let mut lanes: Vec<String> = pairs.iter().map(|p| p.model.clone()).collect();
    lanes.dedup();
    let mut models: Vec<Scope> = Vec::new();
    if !lanes.is_empty() {
        // A model's row is also written by the upstream's pauses (`limits::throttle`): wait for
        // any such change to commit, then read it.
        let model_rows: Vec<ScopeRow> = query_as(&format!(
            "SELECT {SCOPE_COLUMNS} FROM sheepdog.limit_scopes s
               LEFT JOIN sheepdog.budget b ON b.scope = s.scope
                     AND b.period_key = sheepdog.budget_period_key(s.budget_period, $1)
              WHERE s.scope = ANY($2) AND s.scope <> '*'
              ORDER BY s.scope FOR UPDATE OF s"
        ))
        .bind(now)
        .bind(&lanes)
        .fetch_all(&mut **tx)
        .await?;
        models = model_rows.into_iter().map(|r| scope_of(r).0).collect();
    }
    token_windows(tx, now, std::iter::once(&mut global).chain(models.iter_mut())).await?;
    let breakers = breakers(tx, &lanes).await?;
    let planner = Planner::new(now, burst, global, models, &lanes, &breakers);
    let open = planner.open_lanes(&lanes);
    let open_pairs: Vec<&Pair> = pairs.iter().filter(|p| open.contains(&p.model)).collect();
    let (candidates, places) = if open_pairs.is_empty() {
        (Vec::new(), HashMap::new())
    } else {
        candidates(tx, &open_pairs, vclock, now, slots).await?
    };
    let plan = planner.plan(&lanes, candidates, slots);
    let Some(jobs) = apply(tx, &plan, &places, replica, now, probe_lease).await? else {
        return Ok(None);
    };
    Ok(Some(Dispatched {
        jobs,
        idle: false,
        blocked: plan.blocked,
        lanes_blocked: plan.lanes_blocked,
        retry_in: plan.retry_in,
    }))
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
        query_as("SELECT scope, slot, tokens FROM sheepdog.token_slots WHERE scope = ANY($1) AND slot >= $2")
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

/// Every (model, batch) with jobs waiting that may go: a loose index scan of the backlog's key, one
/// probe per pair however many jobs each has; then only batches that are active and within their
/// deadline, with what is left of their spending caps (the batch's, and its producer key's).
async fn pairs(tx: &mut Transaction<'_, Postgres>, now: DateTime<Utc>) -> Result<Vec<Pair>, StoreError> {
    Ok(query_as(
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
    let rows: Vec<BreakerRow> = query_as(
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

type CandidateRow = (String, String, String, i64, i64, Decimal);

/// Where each candidate waits in the backlog: its place in line, which with its model and batch
/// is its key there.
type Places = HashMap<(String, String), i64>;

/// The first due jobs of each open (model, batch), in arrival order, each with its virtual
/// time: its batch's pass (or the clock, if later) plus its place in the batch. Read from the
/// backlog alone (it carries each job's worst case), without locking rows: only a dispatch
/// removes a waiting job that may go, and dispatches hold the lock.
async fn candidates(
    tx: &mut Transaction<'_, Postgres>,
    pairs: &[&Pair],
    vclock: i64,
    now: DateTime<Utc>,
    slots: usize,
) -> Result<(Vec<Candidate>, Places), StoreError> {
    // Enough of each batch to fill the slots between them, and a few more in case some do not
    // fit (a batch's cap, a model's bucket).
    let per_batch = slots.div_ceil(pairs.len()).max(4).min(slots.max(1));
    let models: Vec<&str> = pairs.iter().map(|p| p.model.as_str()).collect();
    let batches: Vec<&str> = pairs.iter().map(|p| p.batch_id.as_str()).collect();
    let rows: Vec<CandidateRow> = query_as(
        "SELECT c.batch_id, c.custom_id, c.model, c.seq, c.reserve_tokens, c.reserve_cost_usd
           FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS l(model, batch_id, ord)
           CROSS JOIN LATERAL (
               SELECT b.batch_id, b.custom_id, b.model, b.seq, b.reserve_tokens, b.reserve_cost_usd
                 FROM sheepdog.backlog b
                WHERE b.model = l.model AND b.batch_id = l.batch_id AND b.run_at <= $3
                ORDER BY b.seq
                LIMIT $4) c
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
    let mut places = Places::with_capacity(rows.len());
    let candidates = rows
        .into_iter()
        .filter_map(|r| {
            let pair = *by_pair.get(&(r.2.as_str(), r.0.as_str()))?;
            let i = rank.entry((r.2.clone(), r.0.clone())).or_insert(0);
            let vtime = pair.vpass.max(vclock) + *i;
            *i += 1;
            places.insert((r.0.clone(), r.1.clone()), r.3);
            Some(Candidate {
                priority: pair.priority,
                vtime,
                batch_id: r.0,
                custom_id: r.1,
                model: r.2,
                tokens: r.4,
                cost: r.5,
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
        .collect();
    Ok((candidates, places))
}

type GrantedRow = (
    i64,
    String,
    String,
    i32,
    String,
    Option<Vec<u8>>,
    Option<Vec<u8>>,
    i64,
    Decimal,
    bool,
);

/// A grant from its row (call id, batch, custom id, attempt, model, request, message of an
/// earlier version, worst case, whether it reserved shared budgets or tokens).
fn granted(r: GrantedRow, probe: Option<String>, first_after_pause: Option<String>) -> Granted {
    Granted {
        id: JobId {
            batch_id: r.1,
            custom_id: r.2,
        },
        call_id: r.0,
        attempt: r.3,
        model: r.4,
        payload: match (r.5, r.6) {
            (Some(request), _) => Payload::Request(request),
            (None, message) => Payload::Message(message.unwrap_or_default()),
        },
        reserve_tokens: r.7,
        reserve_cost_usd: r.8,
        shared: r.9,
        probe,
        first_after_pause,
    }
}

/// Writes a plan back: levels, reservations, probes, gates, claims and ledger rows.
async fn apply(
    tx: &mut Transaction<'_, Postgres>,
    plan: &Plan,
    places: &Places,
    replica: i64,
    now: DateTime<Utc>,
    lease: Duration,
) -> Result<Option<Vec<Granted>>, StoreError> {
    if !plan.levels.is_empty() {
        let scopes: Vec<&str> = plan.levels.iter().map(|l| l.scope.as_str()).collect();
        let req: Vec<Decimal> = plan.levels.iter().map(|l| l.req_level).collect();
        query(
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
        query(
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
            query("DELETE FROM sheepdog.token_slots WHERE slot < $1")
                .bind(plan.slot - 2 * HORIZON_SLOTS)
                .execute(&mut **tx)
                .await?;
        }
    }
    if !plan.reserved.is_empty() {
        let scopes: Vec<&str> = plan.reserved.iter().map(|r| r.0.as_str()).collect();
        let keys: Vec<&str> = plan.reserved.iter().map(|r| r.1.as_str()).collect();
        let amounts: Vec<Decimal> = plan.reserved.iter().map(|r| r.2).collect();
        query(
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
        query(
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
        query(
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
        return Ok(Some(Vec::new()));
    }
    // Claiming is deleting the job's backlog row; the call's ledger row, `pending`, is written in
    // the same statement (before any request is sent). The job's row is only read (its request).
    let models: Vec<&str> = plan.grants.iter().map(|g| g.model.as_str()).collect();
    let batch_ids: Vec<&str> = plan.grants.iter().map(|g| g.batch_id.as_str()).collect();
    let mut seqs: Vec<i64> = Vec::with_capacity(plan.grants.len());
    for g in &plan.grants {
        let Some(seq) = places.get(&(g.batch_id.clone(), g.custom_id.clone())) else {
            return Err(StoreError::Rejected(format!(
                "{}/{}: granted but never a candidate",
                g.batch_id, g.custom_id
            )));
        };
        seqs.push(*seq);
    }
    let keys: Vec<Json<&Vec<String>>> = plan.grants.iter().map(|g| Json(&g.budget_keys)).collect();
    let rows: Vec<GrantedRow> = query_as(
        "WITH g AS (
             SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::jsonb[]) AS g(model, batch_id, seq, keys)
         ), gone AS (
             DELETE FROM sheepdog.backlog b USING g
              WHERE b.model = g.model AND b.batch_id = g.batch_id AND b.seq = g.seq
             RETURNING b.model, b.batch_id, b.seq, b.custom_id, b.attempts, b.reserve_tokens, b.reserve_cost_usd
         ), call AS (
             INSERT INTO sheepdog.calls (batch_id, custom_id, attempt, model, outcome, reserved_tokens,
                                         reserved_cost_usd, budget_keys, replica_id, started_at, token_slot)
             SELECT gone.batch_id, gone.custom_id, gone.attempts + 1, gone.model, 'pending',
                    gone.reserve_tokens, gone.reserve_cost_usd,
                    ARRAY(SELECT jsonb_array_elements_text(g.keys)), $5, $6, $7
               FROM gone JOIN g ON g.model = gone.model AND g.batch_id = gone.batch_id AND g.seq = gone.seq
             RETURNING id, batch_id, custom_id, attempt, model, reserved_tokens, reserved_cost_usd,
                       cardinality(budget_keys) > 0 OR token_slot IS NOT NULL AS shared
         )
         SELECT call.id, call.batch_id, call.custom_id, call.attempt, call.model, j.request, j.message,
                call.reserved_tokens, call.reserved_cost_usd, call.shared
           FROM call JOIN sheepdog.jobs j ON j.batch_id = call.batch_id AND j.custom_id = call.custom_id",
    )
    .bind(&models)
    .bind(&batch_ids)
    .bind(&seqs)
    .bind(&keys)
    .bind(replica)
    .bind(now)
    .bind(plan.slot)
    .fetch_all(&mut **tx)
    .await?;
    if rows.len() != plan.grants.len() {
        tracing::debug!(
            planned = plan.grants.len(),
            claimed = rows.len(),
            "a planned job was gone when claimed; planning again"
        );
        return Ok(None);
    }
    // Each granted batch's pass moves past its last granted job; the clock, past the last of all.
    let mut passes: HashMap<&str, i64> = HashMap::new();
    for g in &plan.grants {
        let p = passes.entry(g.batch_id.as_str()).or_insert(0);
        *p = (*p).max(g.vtime + 1);
    }
    let pass_batches: Vec<&str> = passes.keys().copied().collect();
    let pass_values: Vec<i64> = passes.values().copied().collect();
    let max_vtime = plan.grants.iter().map(|g| g.vtime).max().unwrap_or(0);
    query(
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
    Ok(Some(
        rows.into_iter()
            .map(|r| {
                let g = by_id.get(&(r.1.clone(), r.2.clone()));
                granted(
                    r,
                    g.and_then(|g| g.probe.clone()),
                    g.and_then(|g| g.first_after_pause.clone()),
                )
            })
            .collect(),
    ))
}

/// Grants Postgres holds for `replica` that are not in `in_hand` (the calls it is working on):
/// its calls still pending. A round whose COMMIT went through while its answer was lost with
/// the connection leaves such grants; the replica runs them.
pub async fn lost_grants(pool: &PgPool, replica: i64, in_hand: &[i64]) -> Result<Vec<Granted>, StoreError> {
    let rows: Vec<GrantedRow> = query_as(
        "SELECT c.id, c.batch_id, c.custom_id, c.attempt, c.model, j.request, j.message, c.reserved_tokens,
                c.reserved_cost_usd, cardinality(c.budget_keys) > 0 OR c.token_slot IS NOT NULL
           FROM sheepdog.calls c
           JOIN sheepdog.jobs j ON j.batch_id = c.batch_id AND j.custom_id = c.custom_id
          WHERE c.replica_id = $1 AND c.outcome = 'pending' AND NOT (c.id = ANY($2))",
    )
    .bind(replica)
    .bind(in_hand)
    .all(pool)
    .await?;
    Ok(rows.into_iter().map(|r| granted(r, None, None)).collect())
}
