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
use std::collections::{HashMap, HashSet, VecDeque};
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

/// A replica's recent calls: per model (when, failed), and all of them (when, the failing model
/// or `*` for an unreachable upstream).
#[derive(Default)]
struct Windows {
    models: HashMap<String, VecDeque<(Instant, bool)>>,
    all: VecDeque<(Instant, Option<String>)>,
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
        let trip = {
            let mut w = self.windows.lock().unwrap();
            let Windows { models, all } = &mut *w;
            let now = Instant::now();
            let horizon = self.cfg.window;
            let failed = health != Health::Answered;
            let mw = models.entry(model.to_string()).or_default();
            mw.push_back((now, failed));
            while mw.front().is_some_and(|(t, _)| now.duration_since(*t) > horizon) {
                mw.pop_front();
            }
            let tag = match health {
                Health::Answered => None,
                Health::ModelFailed => Some(model.to_string()),
                Health::Unreachable => Some(ALL.to_string()),
            };
            all.push_back((now, tag));
            while all.front().is_some_and(|(t, _)| now.duration_since(*t) > horizon) {
                all.pop_front();
            }
            let crossed = |calls: usize, failures: usize| {
                calls >= self.cfg.min_calls && failures as f64 >= self.cfg.failure_rate * calls as f64
            };
            let failing: Vec<&String> = all.iter().filter_map(|(_, t)| t.as_ref()).collect();
            let unreachable = failing.iter().filter(|t| t.as_str() == ALL).count();
            let models_failing: HashSet<&String> = failing.iter().copied().filter(|t| t.as_str() != ALL).collect();
            let model_failures = mw.iter().filter(|(_, f)| *f).count();
            if !failed {
                None
            } else if crossed(all.len(), unreachable) || (models_failing.len() > 1 && crossed(all.len(), failing.len()))
            {
                let why = format!(
                    "{} of the last {} calls failed across {} model(s); last: {what}",
                    failing.len(),
                    all.len(),
                    models_failing.len().max(1)
                );
                all.clear();
                models.clear();
                Some((ALL.to_string(), why))
            } else if health == Health::ModelFailed && crossed(mw.len(), model_failures) {
                let why = format!(
                    "{model_failures} of the last {} calls of {model} failed; last: {what}",
                    mw.len()
                );
                mw.clear();
                all.retain(|(_, t)| t.as_deref() != Some(model));
                Some((model.to_string(), why))
            } else {
                None
            }
        };
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
