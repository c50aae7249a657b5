//! Circuit breakers shared by every replica (contract §5), one per scope: `*` for the account
//! and the upstream as a whole, and one per model. Closed → open when failures cross a
//! threshold → after a growing cooldown, dispatch grants exactly one probe across all replicas
//! (half-open) → closed when the probe succeeds, open again for longer when it fails.
//!
//! The decision to trip is local and fast: each replica keeps a sliding window of its own
//! recent calls, per model and overall. Failures of one model open that model's breaker only.
//! The account-wide breaker opens when the upstream cannot be reached at all, when failures
//! cross the threshold across more than one model, or at once when the account is refused
//! (401/402/403). The state lives in Postgres; dispatch reads it in its own transaction.

use crate::store::sql::{query, query_as, query_scalar, Standalone, StandaloneRun};
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use sqlx::PgPool;

pub use crate::plan::BreakerState;
use crate::plan::ALL;
use crate::store::StoreError;

/// How a breaker trips and cools down.
#[derive(Clone, Debug)]
pub struct BreakerSettings {
    pub window: Duration,
    pub failure_rate: f64,
    pub min_calls: usize,
    pub cooldown_seconds: f64,
    pub max_cooldown_seconds: f64,
}

/// What one call says about the upstream's health.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    /// It answered (2xx, 4xx, 429): the upstream works.
    Answered,
    /// This model failed (5xx, timeout, cut connection).
    ModelFailed,
    /// The upstream could not be reached at all (connection refused, DNS).
    Unreachable,
}

/// A breaker as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct BreakerView {
    pub scope: String,
    pub state: BreakerState,
    pub since: DateTime<Utc>,
    pub reason: Option<String>,
    pub open_until: Option<DateTime<Utc>>,
}

type BreakerRow = (
    String,
    BreakerState,
    DateTime<Utc>,
    Option<String>,
    Option<DateTime<Utc>>,
);

/// Every breaker that is not closed, and `*` whatever its state.
pub async fn read_all(pool: &PgPool) -> Result<Vec<BreakerView>, StoreError> {
    let rows: Vec<BreakerRow> = query_as(
        "SELECT scope, state, since, reason, open_until FROM sheepdog.breakers
          WHERE scope = '*' OR state <> 'closed' ORDER BY scope <> '*', scope",
    )
    .all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| BreakerView {
            scope: r.0,
            state: r.1,
            since: r.2,
            reason: r.3,
            open_until: r.4,
        })
        .collect())
}

/// A replica's recent calls: per model (failed or not), and all of them (marked with the failing
/// model, or `*` for an unreachable upstream).
#[derive(Default)]
struct Windows {
    models: HashMap<String, Window<()>>,
    all: Window<String>,
}

/// The calls of a sliding window, counted as they come and go: a call costs O(1), however many
/// the window holds (it was a scan of the whole window per call: 30 s at thousands of calls a
/// second). Consecutive calls with the same mark less than `GRAIN` apart share one entry, so a
/// window holds at most a few thousand entries at any rate.
struct Window<M> {
    runs: VecDeque<Run<M>>,
    calls: usize,
    /// Marked calls in the window, by mark (a mark whose count falls to 0 is removed).
    marked: HashMap<M, usize>,
}

impl<M> Default for Window<M> {
    fn default() -> Self {
        Window {
            runs: VecDeque::new(),
            calls: 0,
            marked: HashMap::new(),
        }
    }
}

/// `n` consecutive calls with the same mark, the first at `start`, the last at `last`.
struct Run<M> {
    start: Instant,
    last: Instant,
    n: usize,
    mark: Option<M>,
}

/// Calls closer together than this (with the same mark) share an entry of a window.
const GRAIN: Duration = Duration::from_millis(10);

impl<M: Eq + std::hash::Hash + Clone> Window<M> {
    /// Forgets the calls older than `horizon`, then counts one at `now`.
    fn push(&mut self, now: Instant, horizon: Duration, mark: Option<M>) {
        while self.runs.front().is_some_and(|r| now.duration_since(r.last) > horizon) {
            let run = self.runs.pop_front().expect("checked");
            self.forget(&run);
        }
        self.calls += 1;
        if let Some(m) = &mark {
            *self.marked.entry(m.clone()).or_default() += 1;
        }
        match self.runs.back_mut() {
            Some(run) if run.mark == mark && now.duration_since(run.start) < GRAIN => {
                run.n += 1;
                run.last = now;
            }
            _ => self.runs.push_back(Run {
                start: now,
                last: now,
                n: 1,
                mark,
            }),
        }
    }

    fn forget(&mut self, run: &Run<M>) {
        self.calls -= run.n;
        if let Some(m) = &run.mark {
            if let Some(c) = self.marked.get_mut(m) {
                *c -= run.n;
                if *c == 0 {
                    self.marked.remove(m);
                }
            }
        }
    }

    /// Forgets every call marked `mark`.
    fn remove(&mut self, mark: &M) {
        let Some(n) = self.marked.remove(mark) else {
            return;
        };
        self.calls -= n;
        self.runs.retain(|r| r.mark.as_ref() != Some(mark));
    }

    fn marked(&self, mark: &M) -> usize {
        self.marked.get(mark).copied().unwrap_or(0)
    }

    /// Marked calls of every mark (the map holds one entry per failing model, and `*`).
    fn marked_calls(&self) -> usize {
        self.marked.values().sum()
    }
}

impl Windows {
    /// Records one call; says which scope to open, and why, when a window crossed the threshold
    /// (and forgets the calls that opened it).
    fn note(
        &mut self,
        cfg: &BreakerSettings,
        now: Instant,
        model: &str,
        health: Health,
        what: &str,
    ) -> Option<(String, String)> {
        let horizon = cfg.window;
        let failed = health != Health::Answered;
        if !self.models.contains_key(model) {
            self.models.insert(model.to_string(), Window::default());
        }
        let mw = self.models.get_mut(model).expect("inserted");
        mw.push(now, horizon, failed.then_some(()));
        let tag = match health {
            Health::Answered => None,
            Health::ModelFailed => Some(model.to_string()),
            Health::Unreachable => Some(ALL.to_string()),
        };
        self.all.push(now, horizon, tag);
        if !failed {
            return None;
        }
        let crossed = |calls: usize, failures: usize| {
            calls >= cfg.min_calls && failures as f64 >= cfg.failure_rate * calls as f64
        };
        let all = &self.all;
        let unreachable = all.marked(&ALL.to_string());
        let failing = all.marked_calls();
        let models_failing = all.marked.len() - usize::from(unreachable > 0);
        let model_failures = mw.marked_calls();
        if crossed(all.calls, unreachable) || (models_failing > 1 && crossed(all.calls, failing)) {
            let why = format!(
                "{failing} of the last {} calls failed across {} model(s); last: {what}",
                all.calls,
                models_failing.max(1)
            );
            *self = Windows::default();
            Some((ALL.to_string(), why))
        } else if health == Health::ModelFailed && crossed(mw.calls, model_failures) {
            let why = format!(
                "{model_failures} of the last {} calls of {model} failed; last: {what}",
                mw.calls
            );
            *mw = Window::default();
            self.all.remove(&model.to_string());
            Some((model.to_string(), why))
        } else {
            None
        }
    }
}

/// One replica's view of its own calls, and its hands on the shared breakers.
pub struct Breakers {
    pool: PgPool,
    cfg: BreakerSettings,
    windows: Mutex<Windows>,
}

impl Breakers {
    pub fn new(pool: PgPool, cfg: BreakerSettings) -> Breakers {
        Breakers {
            pool,
            cfg,
            windows: Mutex::new(Windows::default()),
        }
    }

    /// Records a call in this replica's windows; opens a shared breaker when its window
    /// crosses the threshold. Returns the scope it opened, if any.
    pub async fn record(&self, model: &str, health: Health, what: &str) -> Option<String> {
        let trip = self
            .windows
            .lock()
            .unwrap()
            .note(&self.cfg, Instant::now(), model, health, what);
        let (scope, reason) = trip?;
        self.trip(&scope, &reason).await;
        Some(scope)
    }

    /// Opens a shared breaker now (a failed probe, a refused account, a window crossed).
    pub async fn trip(&self, scope: &str, reason: &str) {
        match trip(&self.pool, scope, reason, &self.cfg).await {
            Ok(true) => tracing::error!(scope, %reason, "circuit breaker opened for every replica"),
            Ok(false) => {}
            Err(e) => tracing::warn!(scope, error = %e, "could not open the shared breaker"),
        }
    }

    /// The probe's outcome: close the breaker, or open it again for longer.
    pub async fn probe_result(&self, scope: &str, replica: i64, ok: bool, what: &str) {
        if ok {
            match close(&self.pool, scope, replica).await {
                Ok(true) => {
                    let mut w = self.windows.lock().unwrap();
                    if scope == ALL {
                        *w = Windows::default();
                    } else {
                        w.models.remove(scope);
                    }
                    tracing::info!(scope, "probe succeeded: circuit breaker closed for every replica");
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(scope, error = %e, "could not close the breaker"),
            }
        } else {
            self.trip(scope, &format!("probe failed: {what}")).await;
        }
    }

    /// A probe that reached no verdict (its replica stopped): another may be sent soon.
    pub async fn probe_abandoned(&self, scope: &str, replica: i64) {
        let _ = query(
            "UPDATE sheepdog.breakers SET state = 'open', open_until = now() + interval '1 second',
                    probe_owner = NULL, probe_until = NULL
              WHERE scope = $1 AND state = 'half_open' AND probe_owner = $2",
        )
        .bind(scope)
        .bind(replica)
        .run(&self.pool)
        .await;
    }
}

/// Opens `scope`'s breaker with a cooldown that doubles with each trip since it last closed.
/// Returns whether this call opened it (false: it was open already).
pub async fn trip(pool: &PgPool, scope: &str, reason: &str, cfg: &BreakerSettings) -> Result<bool, StoreError> {
    let opened: Option<bool> = query_scalar(
        r#"
        INSERT INTO sheepdog.breakers AS b (scope, state, since, reason, trips, open_until)
        VALUES ($1, 'open', now(), $2, 1, now() + make_interval(secs => least($4, $3)))
        ON CONFLICT (scope) DO UPDATE SET
            state = 'open', since = now(), reason = EXCLUDED.reason, trips = b.trips + 1,
            open_until = now() + make_interval(secs => least($4, $3 * power(2, least(b.trips, 20)))),
            probe_owner = NULL, probe_until = NULL
         WHERE b.state <> 'open'
        RETURNING true
        "#,
    )
    .bind(scope)
    .bind(reason)
    .bind(cfg.cooldown_seconds)
    .bind(cfg.max_cooldown_seconds)
    .maybe(pool)
    .await?;
    Ok(opened.unwrap_or(false))
}

/// Closes `scope`'s breaker if `replica` holds its probe.
pub async fn close(pool: &PgPool, scope: &str, replica: i64) -> Result<bool, StoreError> {
    let r = query(
        "UPDATE sheepdog.breakers SET state = 'closed', since = now(), reason = NULL, trips = 0,
                open_until = NULL, probe_owner = NULL, probe_until = NULL
          WHERE scope = $1 AND state = 'half_open' AND probe_owner = $2",
    )
    .bind(scope)
    .bind(replica)
    .run(pool)
    .await?;
    Ok(r.rows_affected() > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(window_ms: u64) -> BreakerSettings {
        BreakerSettings {
            window: Duration::from_millis(window_ms),
            failure_rate: 0.5,
            min_calls: 10,
            cooldown_seconds: 5.0,
            max_cooldown_seconds: 300.0,
        }
    }

    /// The rule of the README, one call at a time, the way it was first written: every call
    /// kept, the window scanned whole on each call.
    #[derive(Default)]
    struct Scan {
        models: HashMap<String, VecDeque<(Instant, bool)>>,
        all: VecDeque<(Instant, Option<String>)>,
    }

    impl Scan {
        fn note(&mut self, cfg: &BreakerSettings, now: Instant, model: &str, health: Health) -> Option<String> {
            let h = cfg.window;
            let failed = health != Health::Answered;
            let mw = self.models.entry(model.to_string()).or_default();
            mw.push_back((now, failed));
            mw.retain(|(t, _)| now.duration_since(*t) <= h);
            let tag = match health {
                Health::Answered => None,
                Health::ModelFailed => Some(model.to_string()),
                Health::Unreachable => Some(ALL.to_string()),
            };
            self.all.push_back((now, tag));
            self.all.retain(|(t, _)| now.duration_since(*t) <= h);
            let crossed = |c: usize, f: usize| c >= cfg.min_calls && f as f64 >= cfg.failure_rate * c as f64;
            let failing: Vec<&String> = self.all.iter().filter_map(|(_, t)| t.as_ref()).collect();
            let unreachable = failing.iter().filter(|t| t.as_str() == ALL).count();
            let models: std::collections::HashSet<&String> =
                failing.iter().copied().filter(|t| t.as_str() != ALL).collect();
            let model_failures = mw.iter().filter(|(_, f)| *f).count();
            if !failed {
                None
            } else if crossed(self.all.len(), unreachable)
                || (models.len() > 1 && crossed(self.all.len(), failing.len()))
            {
                *self = Scan::default();
                Some(ALL.to_string())
            } else if health == Health::ModelFailed && crossed(mw.len(), model_failures) {
                mw.clear();
                self.all.retain(|(_, t)| t.as_deref() != Some(model));
                Some(model.to_string())
            } else {
                None
            }
        }
    }

    fn health(h: u8) -> Health {
        match h % 6 {
            0..=2 => Health::Answered,
            3 | 4 => Health::ModelFailed,
            _ => Health::Unreachable,
        }
    }

    proptest::proptest! {
        /// Calls at least a grain apart each have an entry of their own: the counted window opens
        /// exactly the breakers the full scan opens, on the same calls.
        #[test]
        fn counted_windows_open_what_a_full_scan_opens(
            calls in proptest::collection::vec((1u64..400, 0u8..3, 0u8..6), 1..600),
        ) {
            let cfg = cfg(2_000);
            let (mut counted, mut scan) = (Windows::default(), Scan::default());
            let mut now = Instant::now();
            for (i, (gap_ms, model, h)) in calls.into_iter().enumerate() {
                now += Duration::from_millis(gap_ms).max(GRAIN);
                let model = ["a", "b", "c"][model as usize];
                let got = counted.note(&cfg, now, model, health(h), "x").map(|(scope, _)| scope);
                let want = scan.note(&cfg, now, model, health(h));
                proptest::prop_assert_eq!(got, want, "call {}", i);
            }
        }
    }

    #[test]
    fn a_window_at_thousands_of_calls_a_second_stays_small_and_still_trips() {
        let cfg = cfg(30_000);
        let mut w = Windows::default();
        let start = Instant::now();
        // 60 s of answered calls, one every 200 µs (5,000 a second).
        for i in 0..300_000u64 {
            let now = start + Duration::from_micros(200 * i);
            assert_eq!(w.note(&cfg, now, "m", Health::Answered, "ok"), None);
        }
        // 30 s of calls, and at most a grain (50 calls) more: a run goes when its last call does.
        assert!((150_000..=150_050).contains(&w.all.calls), "{} calls", w.all.calls);
        assert!(w.all.runs.len() <= 3_001, "{} entries", w.all.runs.len());
        assert!(w.models["m"].runs.len() <= 3_001);
        // Then only failures: the model's breaker opens once they are half the window.
        let t = start + Duration::from_secs(60);
        let opened = (1..=400_000u64).find_map(|i| {
            let now = t + Duration::from_micros(200 * i);
            w.note(&cfg, now, "m", Health::ModelFailed, "503").map(|o| (i, o))
        });
        let (i, (scope, why)) = opened.expect("the breaker opens");
        assert_eq!(scope, "m");
        // After i failures, the answered calls still in the window are 150,000 − i (to a grain).
        assert!((74_900..=75_100).contains(&i), "opened after {i} failures: {why}");
        assert_eq!(w.models["m"].calls, 0, "the calls that opened it are forgotten");
        assert_eq!(w.all.marked_calls(), 0);
    }
}
