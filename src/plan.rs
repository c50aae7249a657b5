//! Which waiting jobs may be called now: the pure heart of dispatch. A leaf module: it uses
//! nothing else of sheepdog, so every other part may use it.
//!
//! `store::dispatch` loads, under a lock on the all-models scope, the state every call must fit
//! (token buckets, budgets, breakers, the upstream's own pauses), asks [`Planner::open_lanes`]
//! which models can take a call at all, loads only those models' waiting jobs, and asks
//! [`Planner::plan`] which of them go, in priority and fair order. It then writes the plan back
//! in the same transaction. Nothing here touches the database or the clock: the time is an
//! input, so tests walk every rule with exact numbers.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rust_decimal::prelude::ToPrimitive;
use rust_decimal::Decimal;

/// The scope every call counts against.
pub const ALL: &str = "*";

/// Token windows are kept in slots of a tenth of a second.
pub const SLOTS_PER_SECOND: i64 = 10;
/// How far back token windows are checked, in slots (a minute).
pub const HORIZON_SLOTS: i64 = 60 * SLOTS_PER_SECOND;
/// Seconds of every burst kept in reserve for the time between a grant and the call's arrival
/// at the upstream, so that windows measured where the calls arrive hold too. Measured on a
/// loaded two-core machine: 3.5 ms at the median, 24 to 73 ms at the 99th percentile.
pub const JITTER_SECONDS: &str = "0.1";

fn jitter() -> Decimal {
    JITTER_SECONDS.parse().unwrap()
}

/// The slot a moment falls in.
pub fn slot_of(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros().div_euclid(1_000_000 / SLOTS_PER_SECOND)
}

/// A budget as one scope sees it for the current period.
#[derive(Clone, Debug, PartialEq)]
pub struct Budget {
    pub limit: Decimal,
    pub period_key: String,
    pub spent: Decimal,
    pub reserved: Decimal,
    /// When the period ends (`None` for `total`).
    pub period_end: Option<DateTime<Utc>>,
}

impl Budget {
    fn left(&self) -> Decimal {
        self.limit - self.spent - self.reserved
    }
}

/// A limit scope: `*` (all models) or one model, as stored.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Scope {
    pub name: String,
    pub rpm: Option<Decimal>,
    pub tpm: Option<Decimal>,
    pub req_level: Decimal,
    pub tok_level: Decimal,
    pub bucket_at: Option<DateTime<Utc>>,
    /// The upstream asked us to hold off this scope until then (429, x-ratelimit headers).
    pub paused_until: Option<DateTime<Utc>>,
    pub pause_reason: Option<String>,
    /// 429 rounds in a row; above zero, one call goes first when the pause ends.
    pub pause_streak: i32,
    pub gate_owner: Option<i64>,
    pub gate_until: Option<DateTime<Utc>>,
    pub budget: Option<Budget>,
    /// Tokens counted per slot over the last minute (only with a token limit).
    pub token_slots: Vec<(i64, Decimal)>,
}

/// The state of a circuit breaker, as stored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, sqlx::Type, serde::Deserialize)]
#[sqlx(type_name = "text", rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    #[default]
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

/// A breaker of one scope, as stored.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Breaker {
    pub state: BreakerState,
    pub since: Option<DateTime<Utc>>,
    pub reason: Option<String>,
    pub open_until: Option<DateTime<Utc>>,
    pub probe_until: Option<DateTime<Utc>>,
}

/// A waiting job that could be called now.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    pub batch_id: String,
    pub custom_id: String,
    pub model: String,
    pub priority: i16,
    pub vtime: i64,
    /// Its reserved worst case.
    pub tokens: i64,
    pub cost: Decimal,
    /// What is left of its batch's spending cap, if the batch has one.
    pub batch_cap_left: Option<Decimal>,
    /// Its producer key's spending cap, if its batch came through the Batch API from a capped key.
    pub key_cap: Option<KeyCap>,
}

/// What is left of a producer key's spending cap (a budget shared by the key's batches).
#[derive(Clone, Debug, PartialEq)]
pub struct KeyCap {
    /// `key:<name>`.
    pub scope: String,
    /// The cap's period key (`2026-11-26`, `2026-11`, `total`).
    pub period_key: String,
    pub left: Decimal,
}

/// Why calls of a scope cannot go now.
#[derive(Clone, Debug, PartialEq)]
pub struct Blocked {
    pub scope: String,
    pub kind: BlockKind,
    pub reason: String,
    /// When it may clear by itself, if known.
    pub until: Option<DateTime<Utc>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockKind {
    /// A rate bucket is empty: it refills within seconds. Not a pause.
    Rate,
    /// The budget has no room for the next job's worst case.
    Budget,
    /// The circuit breaker is open (or its one probe is out).
    Breaker,
    /// The upstream asked us to hold off (429, x-ratelimit headers), or its first call after
    /// such a pause is still out.
    Upstream,
}

/// How a scope may take calls right now.
#[derive(Clone, Debug, PartialEq)]
enum Gate {
    Open,
    /// One call only: the breaker's probe.
    Probe,
    /// One call only: the first after an upstream pause.
    First,
    Shut(Blocked),
}

/// One job granted a call.
#[derive(Clone, Debug, PartialEq)]
pub struct Grant {
    pub batch_id: String,
    pub custom_id: String,
    pub model: String,
    pub vtime: i64,
    /// `Some(scope)` when this call is that scope's breaker probe.
    pub probe: Option<String>,
    /// `Some(scope)` when this call is the first after that scope's upstream pause.
    pub first_after_pause: Option<String>,
    /// Budgets the reservation is held in, as `scope|period_key`.
    pub budget_keys: Vec<String>,
    pub tokens: i64,
    pub cost: Decimal,
}

/// The request bucket's level to store for a scope, measured at the plan's time.
#[derive(Clone, Debug, PartialEq)]
pub struct Levels {
    pub scope: String,
    pub req_level: Decimal,
}

/// What dispatch writes back.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    pub grants: Vec<Grant>,
    pub levels: Vec<Levels>,
    /// Tokens granted per token-limited scope, counted in the plan's slot.
    pub slot_tokens: Vec<(String, Decimal)>,
    /// The plan's slot.
    pub slot: i64,
    /// Cost reserved per budget (`scope`, `period_key`).
    pub reserved: Vec<(String, String, Decimal)>,
    /// Scopes whose breaker probe this plan sends.
    pub probes: Vec<String>,
    /// Scopes whose first call after an upstream pause this plan sends.
    pub firsts: Vec<String>,
    /// When to ask again if jobs were left waiting on a limit (None: when woken).
    pub retry_in: Option<Duration>,
    /// Why calls of every model are held, if they are.
    pub blocked: Option<Blocked>,
    /// Models whose own limits hold their jobs back now, and why.
    pub lanes_blocked: Vec<Blocked>,
}

fn secs(d: chrono::TimeDelta) -> Decimal {
    Decimal::from(d.num_microseconds().unwrap_or(i64::MAX).max(0)) / Decimal::from(1_000_000)
}

fn duration(seconds: Decimal) -> Duration {
    Duration::from_secs_f64(seconds.to_f64().unwrap_or(0.0).clamp(0.0, 86_400.0))
}

/// A scope's limits as they stand at the plan's time.
#[derive(Clone, Debug)]
struct Live {
    scope: Scope,
    /// Requests in the bucket.
    req: Option<Decimal>,
    /// Tokens every window still has room for.
    tok: Option<Decimal>,
    /// Tokens granted by this plan.
    tok_granted: Decimal,
    gate: Gate,
    /// Granted its one call (probe or first), or ran out: takes no more in this plan.
    done: bool,
    waiting: Option<Blocked>,
    /// Cost reserved in its budget by this plan.
    reserved: Decimal,
}

pub struct Planner {
    now: DateTime<Utc>,
    burst: Decimal,
    global: Live,
    models: HashMap<String, Live>,
    /// Cost reserved under each capped batch's cap by this plan.
    caps: HashMap<String, Decimal>,
    /// Cost reserved under each capped key's cap by this plan: (period key, amount).
    key_caps: HashMap<String, (String, Decimal)>,
}

impl Planner {
    /// `burst` is the all-models scope's burst seconds, which every scope shares. `models` are
    /// the stored scopes of the models that have jobs waiting (`lanes`); a lane without a
    /// stored scope has no limits of its own, but may still have a breaker.
    pub fn new(
        now: DateTime<Utc>,
        burst: Decimal,
        global: Scope,
        mut models: Vec<Scope>,
        lanes: &[String],
        breakers: &HashMap<String, Breaker>,
    ) -> Planner {
        for lane in lanes {
            if !models.iter().any(|m| &m.name == lane) {
                models.push(Scope {
                    name: lane.clone(),
                    ..Default::default()
                });
            }
        }
        let live = |s: Scope| {
            let gate = gate_of(now, &s, breakers.get(&s.name));
            let req = requests_at(now, &s, burst);
            let tok = s.tpm.map(|tpm| token_room(now, tpm, burst, &s.token_slots));
            Live {
                scope: s,
                req,
                tok,
                tok_granted: Decimal::ZERO,
                gate,
                done: false,
                waiting: None,
                reserved: Decimal::ZERO,
            }
        };
        let global = live(global);
        let models = models.into_iter().map(|s| (s.name.clone(), live(s))).collect();
        Planner {
            now,
            burst,
            global,
            models,
            caps: HashMap::new(),
            key_caps: HashMap::new(),
        }
    }

    /// Why every model is held, if it is (breaker, upstream pause).
    pub fn global_blocked(&self) -> Option<&Blocked> {
        match &self.global.gate {
            Gate::Shut(b) => Some(b),
            _ => None,
        }
    }

    /// Which of these models can take a call now (their own breaker, pause and buckets allow
    /// one). The others' jobs are not even loaded, so they never stand in anyone's way.
    pub fn open_lanes(&self, lanes: &[String]) -> Vec<String> {
        if matches!(self.global.gate, Gate::Shut(_)) {
            return Vec::new();
        }
        lanes
            .iter()
            .filter(|m| match self.models.get(*m) {
                None => true,
                Some(l) => !matches!(l.gate, Gate::Shut(_)) && l.req.is_none_or(|r| r >= Decimal::ONE),
            })
            .cloned()
            .collect()
    }

    /// Chooses, in priority and fair order, the candidates that fit every limit, up to `slots`.
    pub fn plan(mut self, lanes: &[String], mut candidates: Vec<Candidate>, slots: usize) -> Plan {
        candidates.sort_by(|a, b| {
            b.priority
                .cmp(&a.priority)
                .then(a.vtime.cmp(&b.vtime))
                .then_with(|| a.batch_id.cmp(&b.batch_id))
                .then_with(|| a.custom_id.cmp(&b.custom_id))
        });
        let mut plan = Plan {
            slot: slot_of(self.now),
            ..Default::default()
        };
        if let Gate::Shut(b) = &self.global.gate {
            plan.blocked = Some(b.clone());
        }
        // Lanes shut by their own state before any candidate was looked at.
        for m in lanes {
            if let Some(Gate::Shut(b)) = self.models.get(m).map(|l| &l.gate) {
                plan.lanes_blocked.push(b.clone());
            }
        }
        if plan.blocked.is_none() {
            for c in &candidates {
                if plan.grants.len() >= slots || self.global.done {
                    break;
                }
                match self.try_grant(c) {
                    Ok(g) => plan.grants.push(g),
                    Err(Stop::Global) => break,
                    Err(Stop::Lane) | Err(Stop::Job) => continue,
                }
            }
        }
        // Request buckets of every limited scope, brought to now; tokens granted per scope.
        for l in std::iter::once(&self.global).chain(self.models.values()) {
            if let Some(req) = l.req {
                plan.levels.push(Levels {
                    scope: l.scope.name.clone(),
                    req_level: req,
                });
            }
            if l.scope.tpm.is_some() && !l.tok_granted.is_zero() {
                plan.slot_tokens.push((l.scope.name.clone(), l.tok_granted));
            }
            if let (Some(b), false) = (&l.scope.budget, l.reserved.is_zero()) {
                plan.reserved
                    .push((l.scope.name.clone(), b.period_key.clone(), l.reserved));
            }
        }
        for (batch, taken) in &self.caps {
            if !taken.is_zero() {
                plan.reserved.push((batch_cap_scope(batch), "total".into(), *taken));
            }
        }
        for (scope, (period_key, taken)) in &self.key_caps {
            if !taken.is_zero() {
                plan.reserved.push((scope.clone(), period_key.clone(), *taken));
            }
        }
        plan.levels.sort_by(|a, b| a.scope.cmp(&b.scope));
        plan.slot_tokens.sort();
        plan.reserved.sort();
        for g in &plan.grants {
            if let Some(p) = &g.probe {
                plan.probes.push(p.clone());
            }
            if let Some(f) = &g.first_after_pause {
                plan.firsts.push(f.clone());
            }
        }
        // A job left waiting on a limit: ask again when the soonest one may have room.
        let global_wait = self.global.waiting.clone();
        if plan.blocked.is_none() {
            if let Some(w) = &global_wait {
                if w.kind != BlockKind::Rate {
                    plan.blocked = Some(w.clone());
                }
            }
        }
        let mut waits: Vec<&Blocked> = global_wait.iter().collect();
        waits.extend(plan.blocked.iter());
        let lane_waits: Vec<Blocked> = self.models.values().filter_map(|l| l.waiting.clone()).collect();
        for b in &lane_waits {
            if !plan.lanes_blocked.iter().any(|x| x.scope == b.scope) && b.kind != BlockKind::Rate {
                plan.lanes_blocked.push(b.clone());
            }
        }
        waits.extend(lane_waits.iter());
        waits.extend(plan.lanes_blocked.iter());
        plan.retry_in = waits
            .iter()
            .filter_map(|b| b.until)
            .map(|u| (u - self.now).to_std().unwrap_or(Duration::ZERO))
            .min();
        plan.lanes_blocked.sort_by(|a, b| a.scope.cmp(&b.scope));
        plan
    }

    fn try_grant(&mut self, c: &Candidate) -> Result<Grant, Stop> {
        let now = self.now;
        let burst = self.burst;
        if let Some(lane) = self.models.get(&c.model) {
            if lane.done || matches!(lane.gate, Gate::Shut(_)) {
                return Err(Stop::Lane);
            }
        }
        // Buckets: all models first (a miss stops everything), then the job's model.
        if let Err(b) = fits_buckets(now, burst, &self.global, c.tokens) {
            self.global.waiting = Some(b);
            return Err(Stop::Global);
        }
        if let Some(lane) = self.models.get_mut(&c.model) {
            if let Err(b) = fits_buckets(now, burst, lane, c.tokens) {
                lane.waiting = Some(b);
                lane.done = true;
                return Err(Stop::Lane);
            }
        }
        // Budgets: the same order; the batch's cap holds only that batch back.
        if let Err(b) = fits_budget(&self.global, c.cost) {
            self.global.waiting = Some(b);
            return Err(Stop::Global);
        }
        if let Some(lane) = self.models.get_mut(&c.model) {
            if let Err(b) = fits_budget(lane, c.cost) {
                lane.waiting = Some(b);
                lane.done = true;
                return Err(Stop::Lane);
            }
        }
        if let Some(left) = c.batch_cap_left {
            let used = self.caps.get(&c.batch_id).copied().unwrap_or_default();
            if used + c.cost > left {
                return Err(Stop::Job);
            }
        }
        if let Some(k) = &c.key_cap {
            let used = self.key_caps.get(&k.scope).map(|u| u.1).unwrap_or_default();
            if used + c.cost > k.left {
                return Err(Stop::Job);
            }
        }
        let mut grant = Grant {
            batch_id: c.batch_id.clone(),
            custom_id: c.custom_id.clone(),
            model: c.model.clone(),
            vtime: c.vtime,
            probe: None,
            first_after_pause: None,
            budget_keys: Vec::new(),
            tokens: c.tokens,
            cost: c.cost,
        };
        take(&mut self.global, c, &mut grant);
        if let Some(lane) = self.models.get_mut(&c.model) {
            take(lane, c, &mut grant);
        }
        if c.batch_cap_left.is_some() {
            *self.caps.entry(c.batch_id.clone()).or_default() += c.cost;
            grant
                .budget_keys
                .push(format!("{}|total", batch_cap_scope(&c.batch_id)));
        }
        if let Some(k) = &c.key_cap {
            let used = self
                .key_caps
                .entry(k.scope.clone())
                .or_insert_with(|| (k.period_key.clone(), Decimal::ZERO));
            used.1 += c.cost;
            grant.budget_keys.push(format!("{}|{}", k.scope, k.period_key));
        }
        Ok(grant)
    }
}

enum Stop {
    /// Nothing more can go in this plan.
    Global,
    /// Nothing more of this model.
    Lane,
    /// Not this job (its batch's or its key's cap); others may go.
    Job,
}

/// The budget scope a batch's spending cap is kept under.
pub fn batch_cap_scope(batch_id: &str) -> String {
    format!("batch:{batch_id}")
}

/// Budget key as stored on a call: `scope|period_key`.
pub fn budget_key(scope: &str, b: &Budget) -> String {
    format!("{scope}|{}", b.period_key)
}

/// What may go at once of a per-minute rate: its burst, less the jitter reserve.
pub fn capacity(per_minute: Decimal, burst: Decimal) -> Decimal {
    per_minute * (burst - jitter()).max(jitter()) / Decimal::from(60)
}

/// What may go at once of a requests-per-minute limit: its capacity, but never less than one
/// request (at `RPM × burst / 60` under 1 no request could ever go; one at a time is the least a
/// limit can allow).
pub fn request_capacity(rpm: Decimal, burst: Decimal) -> Decimal {
    capacity(rpm, burst).max(Decimal::ONE)
}

/// The request bucket's level at `now`: refilled continuously since `bucket_at`, up to its
/// capacity.
fn requests_at(now: DateTime<Utc>, s: &Scope, burst: Decimal) -> Option<Decimal> {
    let dt = s.bucket_at.map(|at| secs(now - at)).unwrap_or(Decimal::ZERO);
    s.rpm
        .map(|r| (s.req_level + dt * r / Decimal::from(60)).min(request_capacity(r, burst)))
}

/// Tokens that can go now without any window passing `capacity + rate × length`:
/// - for every slot k of the last minute, the tokens counted from k on, plus these, must fit the
///   window that starts at k (a window starting inside slot k is judged as if it started at the
///   slot's end: the safe side, by at most one slot);
/// - the whole minute, plus these, must fit in a minute of the rate, with no burst. Any window
///   longer than a minute splits into such minutes and a remainder that fits its own bound, so
///   windows of every length hold.
pub fn token_room(now: DateTime<Utc>, tpm: Decimal, burst: Decimal, slots: &[(i64, Decimal)]) -> Decimal {
    let per_second = tpm / Decimal::from(60);
    let cap = capacity(tpm, burst);
    let now_s = Decimal::from(now.timestamp_micros()) / Decimal::from(1_000_000);
    let now_slot = slot_of(now);
    let slot_len = Decimal::ONE / Decimal::from(SLOTS_PER_SECOND);
    // A window starting inside slot k is judged as if it started at the slot's end (or now,
    // for the current slot): the latest start, the least room.
    let window_room = |k: i64, counted: Decimal| {
        let start = (Decimal::from(k + 1) * slot_len).min(now_s);
        cap + per_second * (now_s - start) - counted
    };
    let mut recent: Vec<&(i64, Decimal)> = slots
        .iter()
        .filter(|(k, _)| *k <= now_slot && *k >= now_slot - HORIZON_SLOTS)
        .collect();
    recent.sort_by_key(|s| std::cmp::Reverse(s.0));
    let mut counted = Decimal::ZERO;
    let mut room = window_room(now_slot, Decimal::ZERO);
    for (k, tokens) in recent {
        counted += *tokens;
        room = room.min(window_room(*k, counted));
    }
    let minute = per_second * Decimal::from(HORIZON_SLOTS / SLOTS_PER_SECOND);
    room.min(minute - counted)
}

fn gate_of(now: DateTime<Utc>, s: &Scope, breaker: Option<&Breaker>) -> Gate {
    if let Some(b) = breaker {
        match b.state {
            BreakerState::Closed => {}
            BreakerState::Open if b.open_until.is_some_and(|u| u <= now) => return Gate::Probe,
            BreakerState::HalfOpen if b.probe_until.is_none_or(|u| u < now) => return Gate::Probe,
            state => {
                let until = if state == BreakerState::Open {
                    b.open_until
                } else {
                    b.probe_until
                };
                let since = b.since.map(|s| s.to_rfc3339()).unwrap_or_default();
                return Gate::Shut(Blocked {
                    scope: s.name.clone(),
                    kind: BlockKind::Breaker,
                    reason: format!(
                        "circuit breaker {} since {since}: {}",
                        state.as_str().replace('_', "-"),
                        b.reason.clone().unwrap_or_default()
                    ),
                    until,
                });
            }
        }
    }
    if let Some(until) = s.paused_until.filter(|u| *u > now) {
        return Gate::Shut(Blocked {
            scope: s.name.clone(),
            kind: BlockKind::Upstream,
            reason: s
                .pause_reason
                .clone()
                .unwrap_or_else(|| "the upstream asked us to hold off".into()),
            until: Some(until),
        });
    }
    if s.pause_streak > 0 {
        return match s.gate_until.filter(|u| *u > now) {
            Some(until) => Gate::Shut(Blocked {
                scope: s.name.clone(),
                kind: BlockKind::Upstream,
                reason: "waiting for the first call after the upstream's pause to succeed".into(),
                until: Some(until),
            }),
            None => Gate::First,
        };
    }
    Gate::Open
}

fn fits_buckets(now: DateTime<Utc>, burst: Decimal, l: &Live, tokens: i64) -> Result<(), Blocked> {
    if let (Some(rpm), Some(req)) = (l.scope.rpm, l.req) {
        if req < Decimal::ONE {
            let wait = (Decimal::ONE - req) * Decimal::from(60) / rpm;
            return Err(Blocked {
                scope: l.scope.name.clone(),
                kind: BlockKind::Rate,
                reason: format!("requests per minute: {}", rpm.normalize()),
                until: Some(now + chrono::TimeDelta::from_std(duration(wait)).unwrap_or_default()),
            });
        }
    }
    if let (Some(tpm), Some(tok)) = (l.scope.tpm, l.tok) {
        // A job larger than a burst waits for a whole burst's room, then borrows.
        let need = Decimal::from(tokens).min(capacity(tpm, burst));
        if tok < need {
            let wait = (need - tok) * Decimal::from(60) / tpm;
            return Err(Blocked {
                scope: l.scope.name.clone(),
                kind: BlockKind::Rate,
                reason: format!("tokens per minute: {}", tpm.normalize()),
                until: Some(now + chrono::TimeDelta::from_std(duration(wait)).unwrap_or_default()),
            });
        }
    }
    Ok(())
}

fn fits_budget(l: &Live, cost: Decimal) -> Result<(), Blocked> {
    let Some(b) = &l.scope.budget else { return Ok(()) };
    if b.left() >= cost {
        return Ok(());
    }
    let used = b.spent + b.reserved;
    let reason = match b.period_end {
        None => format!(
            "budget exhausted: {} of {} USD spent or reserved",
            used.normalize(),
            b.limit.normalize()
        ),
        Some(end) => format!(
            "budget exhausted until {}: {} of {} USD spent or reserved",
            end.format("%Y-%m-%d %H:%M UTC"),
            used.normalize(),
            b.limit.normalize()
        ),
    };
    let scope = if l.scope.name == ALL {
        reason
    } else {
        format!("{}: {reason}", l.scope.name)
    };
    Err(Blocked {
        scope: l.scope.name.clone(),
        kind: BlockKind::Budget,
        reason: scope,
        until: b.period_end,
    })
}

/// Takes one request, the job's tokens and its cost from a scope.
fn take(l: &mut Live, c: &Candidate, g: &mut Grant) {
    if let Some(r) = l.req.as_mut() {
        *r -= Decimal::ONE;
    }
    if let Some(t) = l.tok.as_mut() {
        *t -= Decimal::from(c.tokens);
        l.tok_granted += Decimal::from(c.tokens);
    }
    if let Some(b) = l.scope.budget.as_mut() {
        b.reserved += c.cost;
        l.reserved += c.cost;
        g.budget_keys.push(budget_key(&l.scope.name, b));
    }
    match l.gate {
        Gate::Probe => {
            g.probe = Some(l.scope.name.clone());
            l.done = true;
        }
        Gate::First => {
            g.first_after_pause = Some(l.scope.name.clone());
            l.done = true;
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn t(s: f64) -> DateTime<Utc> {
        Utc.timestamp_micros((1_800_000_000.0 * 1e6 + s * 1e6) as i64).unwrap()
    }

    fn d(s: &str) -> Decimal {
        s.parse().unwrap()
    }

    fn scope(name: &str) -> Scope {
        Scope {
            name: name.into(),
            bucket_at: Some(t(0.0)),
            ..Default::default()
        }
    }

    fn job(batch: &str, i: i64, model: &str, tokens: i64) -> Candidate {
        Candidate {
            batch_id: batch.into(),
            custom_id: format!("{batch}-{i}"),
            model: model.into(),
            priority: 1,
            vtime: i,
            tokens,
            cost: d("0.01"),
            batch_cap_left: None,
            key_cap: None,
        }
    }

    fn plan(
        now: f64,
        global: Scope,
        models: Vec<Scope>,
        breakers: &[(&str, Breaker)],
        jobs: Vec<Candidate>,
        slots: usize,
    ) -> Plan {
        let lanes: Vec<String> = {
            let mut l: Vec<String> = jobs.iter().map(|j| j.model.clone()).collect();
            l.sort();
            l.dedup();
            l
        };
        let b: HashMap<String, Breaker> = breakers.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
        let p = Planner::new(t(now), Decimal::ONE, global, models, &lanes, &b);
        let open = p.open_lanes(&lanes);
        let jobs = jobs.into_iter().filter(|j| open.contains(&j.model)).collect();
        p.plan(&lanes, jobs, slots)
    }

    #[test]
    fn a_full_request_bucket_holds_a_burst_less_the_jitter_reserve() {
        let mut g = scope(ALL);
        g.rpm = Some(d("600"));
        g.req_level = request_capacity(d("600"), Decimal::ONE);
        let jobs = (0..30).map(|i| job("a", i, "m", 10)).collect();
        let p = plan(0.0, g, vec![], &[], jobs, 100);
        assert_eq!(p.grants.len(), 9, "9 requests of room: 10 per second, 100 ms kept back");
        assert!(p.retry_in.is_some_and(|w| w <= Duration::from_millis(100)));
        assert!(p.blocked.is_none(), "a rate limit is a wait, not a pause");
    }

    #[test]
    fn a_limit_under_one_request_per_burst_still_lets_one_request_go_at_a_time() {
        // 60 rpm with a 1 s burst: 0.9 of room less the reserve, so never a whole request
        // without a floor of one.
        let mut a = scope("a");
        a.rpm = Some(d("60"));
        a.req_level = Decimal::ZERO;
        let jobs = || (0..10).map(|i| job("x", i, "a", 10)).collect::<Vec<_>>();
        let p = plan(0.5, scope(ALL), vec![a.clone()], &[], jobs(), 10);
        assert!(p.grants.is_empty(), "half a second: half a request");
        let p = plan(1.0, scope(ALL), vec![a.clone()], &[], jobs(), 10);
        assert_eq!(p.grants.len(), 1, "a second: one request");
        let p = plan(5.0, scope(ALL), vec![a], &[], jobs(), 10);
        assert_eq!(p.grants.len(), 1, "a full bucket holds one request, not five");
    }

    #[test]
    fn token_windows_count_what_calls_used_and_every_window_of_the_last_minute() {
        let tpm = d("24000"); // 400 a second; 360 of room at once
        let now = t(10.0);
        assert_eq!(token_room(now, tpm, Decimal::ONE, &[]), d("360"));
        // 300 tokens counted 0.45 s ago: the window starting there has 360 + 0.4 × 400 − 300.
        let k = slot_of(t(9.55));
        let room = token_room(now, tpm, Decimal::ONE, &[(k, d("300"))]);
        assert_eq!(room, d("220"));
        // Older than a minute: forgotten.
        let old = slot_of(t(-55.0));
        assert_eq!(token_room(now, tpm, Decimal::ONE, &[(old, d("1000000"))]), d("360"));
        // A minute of steady use at the full rate leaves nothing: no minute holds more than a
        // minute of the rate, burst or not.
        let steady: Vec<(i64, Decimal)> = (0..600)
            .map(|i| (slot_of(t(10.0 - 60.0 + i as f64 / 10.0)), d("40")))
            .collect();
        assert!(token_room(now, tpm, Decimal::ONE, &steady) <= Decimal::ZERO);
    }

    #[test]
    fn a_model_without_room_never_holds_back_another_model() {
        let g = scope(ALL);
        let mut a = scope("a");
        a.rpm = Some(d("60"));
        a.req_level = Decimal::ZERO;
        let mut jobs: Vec<Candidate> = (0..50).map(|i| job("big", i, "a", 10)).collect();
        jobs.extend((0..5).map(|i| job("small", 100 + i, "b", 10)));
        let p = plan(0.0, g, vec![a], &[], jobs, 10);
        assert_eq!(p.grants.len(), 5);
        assert!(p.grants.iter().all(|g| g.model == "b"));
    }

    #[test]
    fn an_open_breaker_holds_its_model_and_lets_one_probe_through_after_its_cooldown() {
        let open = |until: f64| Breaker {
            state: BreakerState::Open,
            since: Some(t(-5.0)),
            reason: Some("5 of 10 failed".into()),
            open_until: Some(t(until)),
            probe_until: None,
        };
        let jobs = || {
            (0..10)
                .map(|i| job("x", i, "a", 10))
                .chain((0..3).map(|i| job("y", 20 + i, "b", 10)))
                .collect::<Vec<_>>()
        };
        let p = plan(0.0, scope(ALL), vec![], &[("a", open(5.0))], jobs(), 10);
        assert_eq!(p.grants.len(), 3, "only b's jobs");
        assert!(p
            .lanes_blocked
            .iter()
            .any(|b| b.scope == "a" && b.kind == BlockKind::Breaker));
        let p = plan(6.0, scope(ALL), vec![], &[("a", open(5.0))], jobs(), 10);
        let probes: Vec<_> = p.grants.iter().filter(|g| g.model == "a").collect();
        assert_eq!(probes.len(), 1, "one probe");
        assert_eq!(probes[0].probe.as_deref(), Some("a"));
        assert_eq!(p.probes, vec!["a".to_string()]);
        // The account's breaker holds every model.
        let p = plan(0.0, scope(ALL), vec![], &[(ALL, open(5.0))], jobs(), 10);
        assert!(p.grants.is_empty());
        assert_eq!(p.blocked.unwrap().kind, BlockKind::Breaker);
    }

    #[test]
    fn budgets_reserve_the_worst_case_and_hold_jobs_that_do_not_fit() {
        let mut g = scope(ALL);
        g.budget = Some(Budget {
            limit: d("0.035"),
            period_key: "total".into(),
            spent: d("0.01"),
            reserved: Decimal::ZERO,
            period_end: None,
        });
        let jobs = (0..5).map(|i| job("x", i, "a", 10)).collect();
        let p = plan(0.0, g, vec![], &[], jobs, 10);
        assert_eq!(p.grants.len(), 2, "0.025 left holds two 0.01 worst cases");
        assert_eq!(p.reserved, vec![("*".into(), "total".into(), d("0.02"))]);
        assert_eq!(p.grants[0].budget_keys, vec!["*|total".to_string()]);
        let b = p.blocked.unwrap();
        assert_eq!(b.kind, BlockKind::Budget);
        assert!(b.reason.starts_with("budget exhausted"), "{}", b.reason);
    }

    #[test]
    fn after_an_upstream_pause_one_call_goes_first() {
        let mut a = scope("a");
        a.pause_streak = 2;
        a.paused_until = Some(t(5.0));
        let jobs = || (0..5).map(|i| job("x", i, "a", 10)).collect::<Vec<_>>();
        let p = plan(1.0, scope(ALL), vec![a.clone()], &[], jobs(), 5);
        assert!(p.grants.is_empty(), "paused");
        let p = plan(6.0, scope(ALL), vec![a.clone()], &[], jobs(), 5);
        assert_eq!(p.grants.len(), 1);
        assert_eq!(p.firsts, vec!["a".to_string()]);
        a.gate_owner = Some(7);
        a.gate_until = Some(t(30.0));
        let p = plan(7.0, scope(ALL), vec![a], &[], jobs(), 5);
        assert!(p.grants.is_empty(), "the rest wait for the first call's answer");
    }

    #[test]
    fn priority_first_then_batches_interleave_by_virtual_time() {
        let mut jobs: Vec<Candidate> = (0..6).map(|i| job("big", i, "a", 10)).collect();
        jobs.extend((0..3).map(|i| job("small", i, "a", 10)));
        let mut high = job("urgent", 50, "a", 10);
        high.priority = 2;
        jobs.push(high);
        let p = plan(0.0, scope(ALL), vec![], &[], jobs, 5);
        let order: Vec<&str> = p.grants.iter().map(|g| g.batch_id.as_str()).collect();
        assert_eq!(order, vec!["urgent", "big", "small", "big", "small"]);
    }

    #[test]
    fn a_batch_at_its_cap_waits_and_others_go_on() {
        let mut jobs: Vec<Candidate> = (0..5)
            .map(|i| Candidate {
                batch_cap_left: Some(d("0.025")),
                ..job("capped", i, "a", 10)
            })
            .collect();
        jobs.extend((0..3).map(|i| job("free", 10 + i, "a", 10)));
        let p = plan(0.0, scope(ALL), vec![], &[], jobs, 10);
        let capped = p.grants.iter().filter(|g| g.batch_id == "capped").count();
        assert_eq!(capped, 2, "0.025 of cap holds two 0.01 worst cases");
        assert_eq!(p.grants.iter().filter(|g| g.batch_id == "free").count(), 3);
        assert!(p.reserved.contains(&("batch:capped".into(), "total".into(), d("0.02"))));
        let g = p.grants.iter().find(|g| g.batch_id == "capped").unwrap();
        assert_eq!(g.budget_keys, vec!["batch:capped|total".to_string()]);
    }

    #[test]
    fn a_keys_batches_together_stay_within_the_keys_cap() {
        let cap = |left: &str| {
            Some(KeyCap {
                scope: "key:alice".into(),
                period_key: "2026-11-26".into(),
                left: d(left),
            })
        };
        // Two batches of one key, a third key-less batch: 0.035 left fits three 0.01 worst cases
        // between the key's two batches, whichever they are.
        let mut jobs: Vec<Candidate> = Vec::new();
        for b in ["a1", "a2"] {
            jobs.extend((0..4).map(|i| Candidate {
                key_cap: cap("0.035"),
                ..job(b, i, "m", 10)
            }));
        }
        jobs.extend((0..2).map(|i| job("other", i, "m", 10)));
        let p = plan(0.0, scope(ALL), vec![], &[], jobs, 20);
        let of_key = p.grants.iter().filter(|g| g.batch_id != "other").count();
        assert_eq!(of_key, 3);
        assert_eq!(p.grants.iter().filter(|g| g.batch_id == "other").count(), 2);
        assert!(p
            .reserved
            .contains(&("key:alice".into(), "2026-11-26".into(), d("0.03"))));
        let g = p.grants.iter().find(|g| g.batch_id == "a1").unwrap();
        assert_eq!(g.budget_keys, vec!["key:alice|2026-11-26".to_string()]);
        // A batch cap and a key cap both hold: the tighter one decides.
        let jobs: Vec<Candidate> = (0..4)
            .map(|i| Candidate {
                key_cap: cap("1"),
                batch_cap_left: Some(d("0.015")),
                ..job("a3", i, "m", 10)
            })
            .collect();
        let p = plan(0.0, scope(ALL), vec![], &[], jobs, 20);
        assert_eq!(p.grants.len(), 1);
        assert_eq!(
            p.grants[0].budget_keys,
            vec!["batch:a3|total".to_string(), "key:alice|2026-11-26".to_string()]
        );
    }
}
