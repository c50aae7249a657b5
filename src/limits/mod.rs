//! Global limits shared by every replica: token buckets for requests and
//! tokens, the spend budget, and the shared pause a 429 sets. Their state lives
//! in Postgres (`migrations/0002_global_limits.sql`); each acquisition is one
//! atomic call of `sheepdog.acquire` on the database clock.
//!
//! Waiting is cheap: one task per replica polls the database at a time, sleeping
//! exactly as long as the buckets need to refill; the others queue on a local
//! lock and hold nothing but their delivery. If the limiter's state cannot be
//! read, jobs wait: it fails closed, never open.

pub mod breaker;

use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use rust_decimal::Decimal;
use sqlx::PgPool;
use tokio::sync::watch;
use uuid::Uuid;

use crate::config::LimitArgs;

/// The stored settings and pause, as replicas see them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Settings {
    pub rpm: Option<Decimal>,
    pub tpm: Option<Decimal>,
    pub burst_seconds: Decimal,
    pub budget_usd: Option<Decimal>,
    pub budget_period: String,
    /// Seconds left of a shared pause (a 429's Retry-After), if one is on.
    pub paused_for: Option<f64>,
    /// What the budget has left this period, when there is a budget.
    pub budget_left: Option<Decimal>,
}

impl Settings {
    /// Whether any limit or pause needs the database before a call.
    pub fn active(&self) -> bool {
        self.rpm.is_some() || self.tpm.is_some() || self.budget_usd.is_some() || self.paused_for.is_some()
    }
}

/// What `acquire` gave.
#[derive(Debug, Clone, PartialEq)]
pub enum Acquired {
    /// Go ahead. `period` is the budget period the cost was reserved in.
    Granted { period: Option<String> },
    /// The budget cannot take this job until the period ends or the budget is raised.
    BudgetExhausted { reason: String, retry_in: Duration },
    /// Waited as long as a delivery may be held; hand it back and try later.
    TimedOut,
}

/// A row of `sheepdog.acquire`: granted, wait seconds, kind, reason, budget period.
type AcquireRow = (bool, f64, Option<String>, Option<String>, Option<String>);

pub struct Limiter {
    pool: PgPool,
    settings: watch::Receiver<Settings>,
    gate: tokio::sync::Mutex<()>,
}

pub async fn read_settings(pool: &PgPool) -> sqlx::Result<Settings> {
    #[allow(clippy::type_complexity)]
    let row: (
        Option<Decimal>,
        Option<Decimal>,
        Decimal,
        Option<Decimal>,
        String,
        Option<f64>,
        Option<Decimal>,
    ) = sqlx::query_as(
        "SELECT l.rpm, l.tpm, l.burst_seconds, l.budget_usd, l.budget_period,
                    CASE WHEN l.paused_until > now() THEN extract(epoch FROM l.paused_until - now())::float8 END,
                    l.budget_usd - coalesce(b.spent, 0) - coalesce(b.reserved, 0)
               FROM sheepdog.limits l
               LEFT JOIN sheepdog.budget b ON b.period_key = sheepdog.budget_period_key(l.budget_period, now())
              WHERE l.id = 1",
    )
    .fetch_one(pool)
    .await?;
    Ok(Settings {
        rpm: row.0,
        tpm: row.1,
        burst_seconds: row.2,
        budget_usd: row.3,
        budget_period: row.4,
        paused_for: row.5,
        budget_left: row.6,
    })
}

/// Stores the limits given (0 means unlimited); fields left `None` keep their value.
pub async fn apply(pool: &PgPool, l: &LimitArgs) -> anyhow::Result<()> {
    if let Some(p) = &l.budget_period {
        anyhow::ensure!(
            matches!(p.as_str(), "day" | "month" | "total"),
            "SHEEPDOG_BUDGET_PERIOD must be day, month or total, not {p:?}"
        );
    }
    for (name, v) in [("rpm", &l.rpm), ("tpm", &l.tpm), ("budget", &l.budget_usd)] {
        if let Some(v) = v {
            anyhow::ensure!(*v >= Decimal::ZERO, "{name} must not be negative");
        }
    }
    if let Some(b) = l.burst_seconds {
        anyhow::ensure!(b > Decimal::ZERO, "burst seconds must be positive");
    }
    let unset = |v: &Option<Decimal>| v.map(|v| if v.is_zero() { None } else { Some(v) });
    let (rpm, tpm, budget) = (unset(&l.rpm), unset(&l.tpm), unset(&l.budget_usd));
    sqlx::query(
        "UPDATE sheepdog.limits SET
            rpm = CASE WHEN $1 THEN $2 ELSE rpm END,
            tpm = CASE WHEN $3 THEN $4 ELSE tpm END,
            burst_seconds = coalesce($5, burst_seconds),
            budget_usd = CASE WHEN $6 THEN $7 ELSE budget_usd END,
            budget_period = coalesce($8, budget_period),
            updated_at = now()
          WHERE id = 1",
    )
    .bind(rpm.is_some())
    .bind(rpm.flatten())
    .bind(tpm.is_some())
    .bind(tpm.flatten())
    .bind(l.burst_seconds)
    .bind(budget.is_some())
    .bind(budget.flatten())
    .bind(l.budget_period.as_deref())
    .execute(pool)
    .await?;
    Ok(())
}

impl Limiter {
    /// Starts following the stored settings (re-read every half second, so
    /// `sheepdog limits set` takes effect without a restart).
    pub async fn start(pool: PgPool) -> anyhow::Result<Arc<Limiter>> {
        let first = read_settings(&pool).await?;
        let (tx, rx) = watch::channel(first);
        let p = pool.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                if tx.is_closed() {
                    return;
                }
                if let Ok(s) = read_settings(&p).await {
                    tx.send_if_modified(|cur| {
                        let changed = *cur != s;
                        *cur = s;
                        changed
                    });
                }
            }
        });
        Ok(Arc::new(Limiter {
            pool,
            settings: rx,
            gate: tokio::sync::Mutex::new(()),
        }))
    }

    pub fn settings(&self) -> Settings {
        self.settings.borrow().clone()
    }

    /// Takes a request, `tokens` and `cost` from the global limits, waiting for
    /// them as long as `max_wait` allows.
    pub async fn acquire(&self, token: Uuid, tokens: i64, cost: Decimal, max_wait: Duration) -> Acquired {
        if !self.settings.borrow().active() {
            return Acquired::Granted { period: None };
        }
        let started = Instant::now();
        let _turn = self.gate.lock().await;
        let result = loop {
            let row: sqlx::Result<AcquireRow> = sqlx::query_as(
                "SELECT granted, wait_seconds, kind, reason, period_key FROM sheepdog.acquire($1, $2, $3)",
            )
            .bind(token)
            .bind(Decimal::from(tokens))
            .bind(cost)
            .fetch_one(&self.pool)
            .await;
            let wait = match row {
                Ok((true, _, _, _, period)) => break Acquired::Granted { period },
                Ok((false, wait, Some(kind), reason, _)) if kind == "budget" => {
                    break Acquired::BudgetExhausted {
                        reason: reason.unwrap_or_else(|| "budget exhausted".into()),
                        retry_in: Duration::from_secs_f64(wait.clamp(0.0, 86_400.0 * 31.0)),
                    }
                }
                Ok((false, wait, _, _, _)) => Duration::from_secs_f64(wait.clamp(0.0005, 2.0)),
                Err(e) => {
                    // Fail closed: without the limiter's state nobody calls.
                    tracing::warn!(error = %e, "cannot read the global limits; waiting");
                    Duration::from_secs(1)
                }
            };
            if started.elapsed() + wait > max_wait {
                break Acquired::TimedOut;
            }
            let jitter = Duration::from_micros(rand::rng().random_range(0..2000));
            tokio::time::sleep(wait + jitter).await;
        };
        result
    }

    /// Returns what `acquire` took for a job that was not called after all.
    pub async fn give_back(&self, token: Uuid, tokens: i64) {
        if !self.settings.borrow().active() {
            return;
        }
        if let Err(e) = sqlx::query("SELECT sheepdog.give_back($1, $2)")
            .bind(token)
            .bind(Decimal::from(tokens))
            .execute(&self.pool)
            .await
        {
            tracing::warn!(error = %e, "could not give back a reservation; it is freed within two minutes");
        }
    }

    /// Pauses every replica's calls for `d` (an upstream 429's Retry-After).
    pub async fn pause_all(&self, d: Duration, reason: &str) {
        let r = sqlx::query(
            "UPDATE sheepdog.limits
                SET paused_until = greatest(coalesce(paused_until, now()), now() + make_interval(secs => $1)),
                    pause_reason = $2
              WHERE id = 1",
        )
        .bind(d.as_secs_f64())
        .bind(reason)
        .execute(&self.pool)
        .await;
        if let Err(e) = r {
            tracing::warn!(error = %e, "could not record the upstream's pause");
        }
    }

    /// Whether the budget has room for at least `cost` now (the period rolled
    /// over or the budget was raised).
    pub async fn budget_has_room(&self, cost: Decimal) -> sqlx::Result<bool> {
        sqlx::query_scalar(
            "SELECT l.budget_usd IS NULL OR l.budget_usd - coalesce(b.spent, 0) - coalesce(b.reserved, 0) >= $1
               FROM sheepdog.limits l
               LEFT JOIN sheepdog.budget b ON b.period_key = sheepdog.budget_period_key(l.budget_period, now())
              WHERE l.id = 1",
        )
        .bind(cost)
        .fetch_one(&self.pool)
        .await
    }
}
