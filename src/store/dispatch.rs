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
    Blocked, Breaker, BreakerState, Budget, Candidate, KeyCap, Plan, Planner, Scope, HORIZON_SLOTS, SLOTS_PER_SECOND,
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
    /// How long the view took to answer, the wait for the dispatch lock included.
    pub view_took: Duration,
}

/// A scope as `sheepdog.dispatch_view` gives it (numbers as text: exact).
#[derive(serde::Deserialize)]
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
    begin_round(pool, settlements)
        .await?
        .dispatch(replica, slots, probe_lease, look_first)
        .await
}

/// A replica's round, begun: its calls settled, nothing granted yet. [`settle_and_dispatch`] is
/// these steps in one; a replica that waits long for the lock counts its slots only once it has
/// the lock ([`Round::dispatch_counting`]), so that the slots its calls freed while it waited
/// are granted too.
pub struct Round<'s> {
    tx: Transaction<'static, Postgres>,
    pool: PgPool,
    settlements: &'s [Settlement],
}

/// Begins a round and settles `settlements` in it (see [`settle_and_dispatch`]).
pub async fn begin_round<'s>(pool: &PgPool, settlements: &'s [Settlement]) -> Result<Round<'s>, StoreError> {
    Ok(Round {
        tx: settled(pool, settlements).await?,
        pool: pool.clone(),
        settlements,
    })
}

/// A transaction with `settlements` settled in it, the lock taken first when they hold shared
/// reservations.
async fn settled(pool: &PgPool, settlements: &[Settlement]) -> Result<Transaction<'static, Postgres>, StoreError> {
    let mut tx = pool.begin().await?;
    if !settlements.is_empty() {
        if settlements.iter().any(|s| s.shared) {
            lock(&mut tx).await?;
        }
        super::settle::settle(&mut tx, settlements).await?;
    }
    Ok(tx)
}

impl Round<'_> {
    /// Takes up to `slots` jobs for `replica` and commits the round (see
    /// [`settle_and_dispatch`]).
    pub async fn dispatch(
        self,
        replica: i64,
        slots: usize,
        probe_lease: Duration,
        look_first: bool,
    ) -> Result<Dispatched, StoreError> {
        self.dispatch_counting(replica, slots, || slots, probe_lease, look_first)
            .await
    }

    /// As [`Round::dispatch`], with the slots counted by `count` once the lock is held (the view
    /// read, the plan not made), up to `most`; the view reads the candidates for `most`. A
    /// replica whose rounds wait long for the lock grants the slots its calls freed during the
    /// wait, without a round trip of its own to take the lock first (a trip made under the lock
    /// is one every other replica's round waits for).
    pub async fn dispatch_counting(
        self,
        replica: i64,
        most: usize,
        count: impl FnOnce() -> usize,
        probe_lease: Duration,
        look_first: bool,
    ) -> Result<Dispatched, StoreError> {
        let mut tx = self.tx;
        if most == 0 || (look_first && !anything_due(&mut tx).await?) {
            tx.commit().await?;
            return Ok(Dispatched {
                idle: true,
                ..Default::default()
            });
        }
        // `grant` takes the lock (a second time when settling took it: harmless, both are
        // released at commit) and reads everything in statements after the lock's: their
        // snapshots see every dispatch that committed before this one got it.
        let d = grant(&mut tx, replica, most, count, probe_lease).await?;
        match d {
            Some(d) => {
                tx.commit().await?;
                Ok(d)
            }
            None => {
                // A planned job was gone when claimed (its batch expired meanwhile): nothing of
                // this plan is kept; the next round plans again. The settlements went with it,
                // and the caller takes them as recorded (a call left `pending` would be found as
                // a lost grant and made again): they are recorded now, on their own.
                tx.rollback().await?;
                if !self.settlements.is_empty() {
                    settled(&self.pool, self.settlements).await?.commit().await?;
                }
                Ok(Dispatched {
                    retry_in: Some(Duration::from_millis(5)),
                    ..Default::default()
                })
            }
        }
    }
}

/// What the planner reads under the lock, as `sheepdog.dispatch_view` gives it in one round
/// trip.
#[derive(serde::Deserialize)]
struct View {
    now: DateTime<Utc>,
    vclock: i64,
    global: ScopeRow,
    pairs: Vec<Pair>,
    models: Vec<ScopeRow>,
    /// Token counts: scope, slot, tokens.
    slots: Vec<(String, i64, Decimal)>,
    breakers: Vec<BreakerRow>,
    /// The first due jobs of every pair, as many of each as [`per_pair`] gives for all pairs.
    candidates: Vec<CandidateRow>,
}

/// Takes the dispatch lock and reads, each in a statement after the lock's so that it sees every
/// dispatch that committed before this one got the lock: the clocks, the scopes, the pairs with jobs waiting, the token windows, the
/// breakers, and the first due jobs of every pair for `slots`. One round trip: every round trip
/// made while holding the lock is one every other replica's round waits for.
async fn view(tx: &mut Transaction<'_, Postgres>, slots: usize) -> Result<View, StoreError> {
    let Json(view): Json<View> = query_scalar("SELECT sheepdog.dispatch_view($1, $2, $3, $4, $5)")
        .bind(DISPATCH_LOCK.0)
        .bind(DISPATCH_LOCK.1)
        .bind(1_000_000 / SLOTS_PER_SECOND)
        // One slot more than the windows need: the planner keeps only the slots it counts.
        .bind(HORIZON_SLOTS + 1)
        .bind(slots as i64)
        .fetch_one(&mut **tx)
        .await?;
    Ok(view)
}

/// Plans and writes one dispatch, taking the lock first. `None` when a planned job could not be
/// claimed.
async fn grant(
    tx: &mut Transaction<'_, Postgres>,
    replica: i64,
    most: usize,
    count: impl FnOnce() -> usize,
    probe_lease: Duration,
) -> Result<Option<Dispatched>, StoreError> {
    // The backlog's statistics are seldom right: it swings between empty and millions of rows
    // faster than ANALYZE follows. Planned from "a few rows", a lane's first jobs were read by
    // fetching the whole lane and sorting it (13,000 rows for 124 in the benchmark). The view
    // turns sorts and bitmap scans off for the rest of the transaction.
    let asked_at = std::time::Instant::now();
    let View {
        now,
        vclock,
        global,
        pairs,
        models,
        slots: token_slots,
        breakers,
        candidates: first_jobs,
    } = view(tx, most).await?;
    let view_took = asked_at.elapsed();
    // The view read candidates for `most`; a round that counts its slots now grants fewer.
    let slots = count().min(most);
    let (mut global, burst) = scope_of(global);
    let mut lanes: Vec<String> = pairs.iter().map(|p| p.model.clone()).collect();
    lanes.dedup();
    let mut models: Vec<Scope> = models.into_iter().map(|r| scope_of(r).0).collect();
    for (scope, slot, tokens) in token_slots {
        let s = std::iter::once(&mut global)
            .chain(models.iter_mut())
            .find(|s| s.name == scope && s.tpm.is_some());
        if let Some(s) = s {
            s.token_slots.push((slot, tokens));
        }
    }
    let breakers = breakers_of(breakers);
    // Scopes whose token windows count this round's calls: a call of one of them is settled
    // into its window (its slot is written), a call of none of them writes no shared row then.
    let token_limited: Vec<String> = std::iter::once(&global)
        .chain(models.iter())
        .filter(|s| s.tpm.is_some())
        .map(|s| s.name.clone())
        .collect();
    let planner = Planner::new(now, burst, global, models, &lanes, &breakers);
    let open = planner.open_lanes(&lanes);
    let open_pairs: Vec<&Pair> = pairs.iter().filter(|p| open.contains(&p.model)).collect();
    let (candidates, places) = if open_pairs.is_empty() {
        (Vec::new(), HashMap::new())
    } else if open_pairs.len() == pairs.len() {
        // Every pair may go: the view read as many of each as they get.
        to_candidates(first_jobs, &open_pairs, vclock)
    } else {
        // Fewer pairs share the slots: each gets more than the view read.
        candidates(tx, &open_pairs, vclock, now, slots).await?
    };
    let plan = planner.plan(&lanes, candidates, slots);
    let Some(jobs) = apply(tx, &plan, &places, &token_limited, replica, now, probe_lease).await? else {
        return Ok(None);
    };
    Ok(Some(Dispatched {
        jobs,
        idle: false,
        blocked: plan.blocked,
        lanes_blocked: plan.lanes_blocked,
        retry_in: plan.retry_in,
        view_took,
    }))
}

/// A batch with jobs of a model waiting.
#[derive(Debug, Clone, serde::Deserialize)]
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

/// A breaker that is not closed, as the view gives it.
#[derive(serde::Deserialize)]
struct BreakerRow {
    scope: String,
    state: BreakerState,
    since: DateTime<Utc>,
    reason: Option<String>,
    open_until: Option<DateTime<Utc>>,
    probe_until: Option<DateTime<Utc>>,
}

fn breakers_of(rows: Vec<BreakerRow>) -> HashMap<String, Breaker> {
    rows.into_iter()
        .map(|r| {
            (
                r.scope,
                Breaker {
                    state: r.state,
                    since: Some(r.since),
                    reason: r.reason,
                    open_until: r.open_until,
                    probe_until: r.probe_until,
                },
            )
        })
        .collect()
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
    let per_batch = per_pair(slots, pairs.len());
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
    Ok(to_candidates(rows, pairs, vclock))
}

/// How many of each pair's first jobs a round reads when `pairs` share `slots`: enough to fill
/// the slots between them, and a few more in case some do not fit (a batch's cap, a model's
/// bucket). `sheepdog.dispatch_view` counts the same.
fn per_pair(slots: usize, pairs: usize) -> usize {
    slots.div_ceil(pairs.max(1)).max(4).min(slots.max(1))
}

/// Candidates from the first jobs of `pairs` (in each pair's order), each with its virtual time.
fn to_candidates(rows: Vec<CandidateRow>, pairs: &[&Pair], vclock: i64) -> (Vec<Candidate>, Places) {
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
    (candidates, places)
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

/// Writes a plan back: probes and gates (seldom), then in one statement the bucket levels, the
/// tokens counted, the budget reservations, the claims with their ledger rows, and the batches'
/// passes and the virtual clock.
async fn apply(
    tx: &mut Transaction<'_, Postgres>,
    plan: &Plan,
    places: &Places,
    token_limited: &[String],
    replica: i64,
    now: DateTime<Utc>,
    lease: Duration,
) -> Result<Option<Vec<Granted>>, StoreError> {
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
    if plan.grants.is_empty() && plan.levels.is_empty() && plan.slot_tokens.is_empty() && plan.reserved.is_empty() {
        return Ok(Some(Vec::new()));
    }
    let level_scopes: Vec<&str> = plan.levels.iter().map(|l| l.scope.as_str()).collect();
    let level_values: Vec<Decimal> = plan.levels.iter().map(|l| l.req_level).collect();
    let token_scopes: Vec<&str> = plan.slot_tokens.iter().map(|t| t.0.as_str()).collect();
    let token_counts: Vec<Decimal> = plan.slot_tokens.iter().map(|t| t.1).collect();
    // Slots older than any window checked are of no more use (now and then is enough).
    let drop_old_slots = !plan.slot_tokens.is_empty() && plan.slot % 50 == 0;
    let budget_scopes: Vec<&str> = plan.reserved.iter().map(|r| r.0.as_str()).collect();
    let budget_keys: Vec<&str> = plan.reserved.iter().map(|r| r.1.as_str()).collect();
    let budget_amounts: Vec<Decimal> = plan.reserved.iter().map(|r| r.2).collect();
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
    // The slot a call's tokens were counted in, when a token window applies to it.
    let token_slots: Vec<Option<i64>> = plan
        .grants
        .iter()
        .map(|g| {
            token_limited
                .iter()
                .any(|s| s == "*" || *s == g.model)
                .then_some(plan.slot)
        })
        .collect();
    // Each granted batch's pass moves past its last granted job; the clock, past the last of all.
    let mut passes: HashMap<&str, i64> = HashMap::new();
    for g in &plan.grants {
        let p = passes.entry(g.batch_id.as_str()).or_insert(0);
        *p = (*p).max(g.vtime + 1);
    }
    let pass_batches: Vec<&str> = passes.keys().copied().collect();
    let pass_values: Vec<i64> = passes.values().copied().collect();
    let max_vtime = plan.grants.iter().map(|g| g.vtime).max().unwrap_or(0);
    let rows: Vec<GrantedRow> = query_as(
        "WITH levels AS (
             UPDATE sheepdog.limit_scopes s SET req_level = v.r, bucket_at = $6
               FROM unnest($8::text[], $9::numeric[]) AS v(scope, r)
              WHERE s.scope = v.scope
         ), counted AS (
             INSERT INTO sheepdog.token_slots AS t (scope, slot, tokens)
             SELECT v.scope, $7, v.tokens FROM unnest($10::text[], $11::numeric[]) AS v(scope, tokens)
             ON CONFLICT (scope, slot) DO UPDATE SET tokens = t.tokens + EXCLUDED.tokens
         ), old_slots AS (
             DELETE FROM sheepdog.token_slots WHERE $12 AND slot < $13
         ), reserved AS (
             INSERT INTO sheepdog.budget AS b (scope, period_key, reserved)
             SELECT * FROM unnest($14::text[], $15::text[], $16::numeric[])
             ON CONFLICT (scope, period_key) DO UPDATE SET reserved = b.reserved + EXCLUDED.reserved
         ), g AS (
             SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::jsonb[], $20::bigint[])
                 AS g(model, batch_id, seq, keys, token_slot)
         ), gone AS (
             DELETE FROM sheepdog.backlog b USING g
              WHERE b.model = g.model AND b.batch_id = g.batch_id AND b.seq = g.seq
             RETURNING b.model, b.batch_id, b.seq, b.custom_id, b.attempts, b.reserve_tokens, b.reserve_cost_usd
         ), call AS (
             INSERT INTO sheepdog.calls (batch_id, custom_id, attempt, model, outcome, reserved_tokens,
                                         reserved_cost_usd, budget_keys, replica_id, started_at, token_slot)
             SELECT gone.batch_id, gone.custom_id, gone.attempts + 1, gone.model, 'pending',
                    gone.reserve_tokens, gone.reserve_cost_usd,
                    ARRAY(SELECT jsonb_array_elements_text(g.keys)), $5, $6, g.token_slot
               FROM gone JOIN g ON g.model = gone.model AND g.batch_id = gone.batch_id AND g.seq = gone.seq
             RETURNING id, batch_id, custom_id, attempt, model, reserved_tokens, reserved_cost_usd,
                       cardinality(budget_keys) > 0 OR token_slot IS NOT NULL AS shared
         ), pass AS (
             UPDATE sheepdog.batches b SET vpass = greatest(b.vpass, v.pass)
               FROM unnest($17::text[], $18::bigint[]) AS v(batch_id, pass)
              WHERE b.batch_id = v.batch_id
         ), clock AS (
             UPDATE sheepdog.scheduler SET vclock = greatest(vclock, $19)
              WHERE id = 1 AND cardinality($17::text[]) > 0
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
    .bind(&level_scopes)
    .bind(&level_values)
    .bind(&token_scopes)
    .bind(&token_counts)
    .bind(drop_old_slots)
    .bind(plan.slot - 2 * HORIZON_SLOTS)
    .bind(&budget_scopes)
    .bind(&budget_keys)
    .bind(&budget_amounts)
    .bind(&pass_batches)
    .bind(&pass_values)
    .bind(max_vtime)
    .bind(&token_slots)
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
