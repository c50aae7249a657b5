//! The global circuit breaker (contract §5): closed → open when failures cross a
//! threshold → after a growing cooldown, half-open with exactly one probe across
//! all replicas → closed when the probe succeeds.
//!
//! The decision to trip is local and fast: each replica keeps a sliding window
//! of its own recent calls. The state is global: it lives in Postgres
//! (`migrations/0003_breaker.sql`) and reaches every replica through
//! LISTEN/NOTIFY, with a poll as a safety net.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use clap::Args;
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::watch;

/// Breaker settings.
#[derive(Args, Clone, Debug)]
pub struct BreakerArgs {
    /// Seconds of calls the failure rate is measured over.
    #[arg(
        long = "breaker-window",
        env = "SHEEPDOG_BREAKER_WINDOW_SECONDS",
        default_value_t = 30.0
    )]
    pub window_seconds: f64,
    /// Share of failed calls (5xx, timeouts, connection errors) that opens the breaker.
    #[arg(
        long = "breaker-failure-rate",
        env = "SHEEPDOG_BREAKER_FAILURE_RATE",
        default_value_t = 0.5
    )]
    pub failure_rate: f64,
    /// Calls the window must hold before the rate counts.
    #[arg(long = "breaker-min-calls", env = "SHEEPDOG_BREAKER_MIN_CALLS", default_value_t = 10)]
    pub min_calls: usize,
    /// First cooldown before a probe, in seconds; doubles on each repeated trip.
    #[arg(
        long = "breaker-cooldown",
        env = "SHEEPDOG_BREAKER_COOLDOWN_SECONDS",
        default_value_t = 5.0
    )]
    pub cooldown_seconds: f64,
    /// Longest cooldown, in seconds.
    #[arg(
        long = "breaker-max-cooldown",
        env = "SHEEPDOG_BREAKER_MAX_COOLDOWN_SECONDS",
        default_value_t = 300.0
    )]
    pub max_cooldown_seconds: f64,
}

impl Default for BreakerArgs {
    fn default() -> Self {
        BreakerArgs {
            window_seconds: 30.0,
            failure_rate: 0.5,
            min_calls: 10,
            cooldown_seconds: 5.0,
            max_cooldown_seconds: 300.0,
        }
    }
}

/// The shared breaker as a replica last saw it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BreakerView {
    pub state: String,
    pub since: Option<DateTime<Utc>>,
    pub reason: Option<String>,
    pub open_until: Option<DateTime<Utc>>,
}

impl BreakerView {
    pub fn closed(&self) -> bool {
        self.state == "closed" || self.state.is_empty()
    }
}

pub struct Breaker {
    pool: PgPool,
    cfg: BreakerArgs,
    /// Who this replica is, as a probe owner.
    owner: String,
    window: Mutex<VecDeque<(Instant, bool)>>,
    view: watch::Sender<BreakerView>,
}

pub async fn read(pool: &PgPool) -> sqlx::Result<BreakerView> {
    let r: (String, DateTime<Utc>, Option<String>, Option<DateTime<Utc>>) =
        sqlx::query_as("SELECT state, since, reason, open_until FROM sheepdog.breaker WHERE id = 1")
            .fetch_one(pool)
            .await?;
    Ok(BreakerView {
        state: r.0,
        since: Some(r.1),
        reason: r.2,
        open_until: r.3,
    })
}

impl Breaker {
    /// Reads the shared state and follows it (NOTIFY, and a poll every second).
    pub async fn start(pool: PgPool, cfg: BreakerArgs, owner: String) -> anyhow::Result<Arc<Breaker>> {
        let (view, _) = watch::channel(read(&pool).await?);
        let b = Arc::new(Breaker {
            pool: pool.clone(),
            cfg,
            owner,
            window: Mutex::new(VecDeque::new()),
            view,
        });
        let weak = Arc::downgrade(&b);
        tokio::spawn(async move {
            let mut listener = None;
            loop {
                let Some(b) = weak.upgrade() else { return };
                if listener.is_none() {
                    if let Ok(mut l) = PgListener::connect_with(&pool).await {
                        if l.listen("sheepdog_breaker").await.is_ok() {
                            listener = Some(l);
                        }
                    }
                }
                b.refresh().await;
                drop(b);
                match listener.as_mut() {
                    Some(l) => match tokio::time::timeout(Duration::from_secs(1), l.try_recv()).await {
                        Ok(Ok(Some(_))) | Err(_) => {}
                        // The connection dropped: reconnect on the next turn.
                        Ok(Ok(None)) | Ok(Err(_)) => listener = None,
                    },
                    None => tokio::time::sleep(Duration::from_secs(1)).await,
                }
            }
        });
        Ok(b)
    }

    async fn refresh(&self) {
        if let Ok(v) = read(&self.pool).await {
            self.view.send_if_modified(|cur| {
                let changed = *cur != v;
                *cur = v;
                changed
            });
        }
    }

    pub fn view(&self) -> BreakerView {
        self.view.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<BreakerView> {
        self.view.subscribe()
    }

    /// Records a call's outcome in this replica's window; opens the shared
    /// breaker when the failure rate crosses the threshold.
    pub async fn record(&self, failed: bool, what: &str) {
        let trip = {
            let mut w = self.window.lock().unwrap();
            let now = Instant::now();
            w.push_back((now, failed));
            let horizon = Duration::from_secs_f64(self.cfg.window_seconds.max(0.1));
            while w.front().is_some_and(|(t, _)| now.duration_since(*t) > horizon) {
                w.pop_front();
            }
            let failures = w.iter().filter(|(_, f)| *f).count();
            let trip = failed
                && w.len() >= self.cfg.min_calls.max(1)
                && failures as f64 >= self.cfg.failure_rate * w.len() as f64;
            if trip {
                let calls = w.len();
                w.clear();
                Some(format!("{failures} of the last {calls} calls failed; last: {what}"))
            } else {
                None
            }
        };
        if let Some(reason) = trip {
            self.trip(&reason).await;
        }
    }

    /// Opens the shared breaker now (a failed probe, or the account refused).
    pub async fn trip(&self, reason: &str) {
        let r: sqlx::Result<String> = sqlx::query_scalar("SELECT sheepdog.breaker_trip($1, $2, $3)")
            .bind(reason)
            .bind(self.cfg.cooldown_seconds)
            .bind(self.cfg.max_cooldown_seconds)
            .fetch_one(&self.pool)
            .await;
        match r {
            Ok(s) if s == "opened" => tracing::error!(%reason, "circuit breaker opened for every replica"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "could not open the shared breaker"),
        }
        self.refresh().await;
    }

    /// Tries to become the one replica that probes; `lease` bounds how long.
    pub async fn claim_probe(&self, lease: Duration) -> bool {
        let r: sqlx::Result<bool> = sqlx::query_scalar("SELECT sheepdog.breaker_claim_probe($1, $2)")
            .bind(&self.owner)
            .bind(lease.as_secs_f64())
            .fetch_one(&self.pool)
            .await;
        let won = r.unwrap_or(false);
        if won {
            tracing::info!("breaker half-open: this replica sends the one probe");
            self.refresh().await;
        }
        won
    }

    /// The probe's outcome: close the breaker, or open it again for longer.
    pub async fn probe_result(&self, ok: bool, what: &str) {
        if ok {
            let _ = sqlx::query("SELECT sheepdog.breaker_close($1)")
                .bind(&self.owner)
                .execute(&self.pool)
                .await;
            self.window.lock().unwrap().clear();
            tracing::info!("probe succeeded: circuit breaker closed for every replica");
            self.refresh().await;
        } else {
            self.trip(&format!("probe failed: {what}")).await;
        }
    }

    /// The prober found nothing to probe with.
    pub async fn release_probe(&self) {
        let _ = sqlx::query("SELECT sheepdog.breaker_release_probe($1)")
            .bind(&self.owner)
            .execute(&self.pool)
            .await;
        self.refresh().await;
    }
}
