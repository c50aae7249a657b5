//! Counters a replica keeps, served as Prometheus text on `/metrics` together
//! with `/healthz` and `/readyz`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::health::Health;
use crate::limits::breaker::BreakerView;

use rust_decimal::Decimal;

/// Upper bounds (seconds) of the upstream latency histogram.
const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

#[derive(Default)]
pub struct Metrics {
    pub jobs_succeeded: AtomicU64,
    pub jobs_failed: AtomicU64,
    pub jobs_dead_lettered: AtomicU64,
    pub jobs_retried: AtomicU64,
    pub jobs_duplicate: AtomicU64,
    pub jobs_taken_over: AtomicU64,
    pub in_flight: AtomicI64,
    /// What the replica can do now, and why not.
    pub health: Arc<Health>,
    /// Every scope's limits and their use (`sheepdog.limit_usage`), as last read.
    scopes: Mutex<Vec<crate::limits::ScopeUsage>>,
    /// Messages ready in sheepdog's queues, by queue.
    pub queue_depth: Mutex<BTreeMap<String, u32>>,
    /// Jobs waiting in Postgres for a call.
    pub backlog: AtomicI64,
    breakers: Mutex<Vec<BreakerView>>,
    calls: Mutex<BTreeMap<String, u64>>,
    by_model: Mutex<BTreeMap<String, ModelTotals>>,
    latency: Mutex<Histogram>,
}

#[derive(Default, Clone)]
struct ModelTotals {
    prompt_tokens: u64,
    completion_tokens: u64,
    cost_usd: Decimal,
}

#[derive(Default)]
struct Histogram {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Metrics {
    pub fn call(&self, outcome: &str, model: &str, latency: Duration, prompt: u64, completion: u64, cost: Decimal) {
        *self.calls.lock().unwrap().entry(outcome.to_string()).or_default() += 1;
        {
            let mut m = self.by_model.lock().unwrap();
            let t = m.entry(model.to_string()).or_default();
            t.prompt_tokens += prompt;
            t.completion_tokens += completion;
            t.cost_usd += cost;
        }
        let s = latency.as_secs_f64();
        let mut h = self.latency.lock().unwrap();
        if h.counts.is_empty() {
            h.counts = vec![0; LATENCY_BUCKETS.len()];
        }
        for (i, b) in LATENCY_BUCKETS.iter().enumerate() {
            if s <= *b {
                h.counts[i] += 1;
            }
        }
        h.sum += s;
        h.count += 1;
    }

    /// The scopes' limits and use; without `last_minute`, each scope keeps the use of the
    /// last minute it had.
    pub fn set_scopes(&self, mut v: Vec<crate::limits::ScopeUsage>, last_minute: bool) {
        let mut scopes = self.scopes.lock().unwrap();
        if !last_minute {
            for u in v.iter_mut() {
                if let Some(old) = scopes.iter().find(|o| o.scope == u.scope) {
                    u.requests_last_minute = old.requests_last_minute;
                    u.tokens_last_minute = old.tokens_last_minute;
                }
            }
        }
        *scopes = v;
    }

    pub fn set_breakers(&self, v: Vec<BreakerView>) {
        *self.breakers.lock().unwrap() = v;
    }

    pub fn ready(&self) -> Result<(), String> {
        self.health.ready()
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut o = String::new();
        let c = |o: &mut String, name: &str, help: &str, kind: &str| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        c(
            &mut o,
            "sheepdog_jobs_total",
            "Jobs this replica finished, by outcome.",
            "counter",
        );
        for (k, v) in [
            ("succeeded", &self.jobs_succeeded),
            ("failed", &self.jobs_failed),
            ("dead_lettered", &self.jobs_dead_lettered),
            ("retried", &self.jobs_retried),
            ("duplicate", &self.jobs_duplicate),
            ("taken_over", &self.jobs_taken_over),
        ] {
            let _ = writeln!(
                o,
                "sheepdog_jobs_total{{outcome=\"{k}\"}} {}",
                v.load(Ordering::Relaxed)
            );
        }
        c(
            &mut o,
            "sheepdog_jobs_in_flight",
            "Deliveries this replica holds.",
            "gauge",
        );
        let _ = writeln!(o, "sheepdog_jobs_in_flight {}", self.in_flight.load(Ordering::Relaxed));
        c(
            &mut o,
            "sheepdog_upstream_calls_total",
            "Upstream call attempts, by ledger outcome.",
            "counter",
        );
        for (k, v) in self.calls.lock().unwrap().iter() {
            let _ = writeln!(o, "sheepdog_upstream_calls_total{{outcome=\"{k}\"}} {v}");
        }
        c(
            &mut o,
            "sheepdog_tokens_total",
            "Tokens used, by model and kind.",
            "counter",
        );
        c(&mut o, "sheepdog_cost_usd_total", "Spend in USD, by model.", "counter");
        for (m, t) in self.by_model.lock().unwrap().iter() {
            let m = label(m);
            let _ = writeln!(
                o,
                "sheepdog_tokens_total{{model=\"{m}\",kind=\"prompt\"}} {}",
                t.prompt_tokens
            );
            let _ = writeln!(
                o,
                "sheepdog_tokens_total{{model=\"{m}\",kind=\"completion\"}} {}",
                t.completion_tokens
            );
            let _ = writeln!(o, "sheepdog_cost_usd_total{{model=\"{m}\"}} {}", t.cost_usd);
        }
        c(
            &mut o,
            "sheepdog_upstream_latency_seconds",
            "Upstream call latency.",
            "histogram",
        );
        {
            let h = self.latency.lock().unwrap();
            for (i, b) in LATENCY_BUCKETS.iter().enumerate() {
                let _ = writeln!(
                    o,
                    "sheepdog_upstream_latency_seconds_bucket{{le=\"{b}\"}} {}",
                    h.counts.get(i).copied().unwrap_or(0)
                );
            }
            let _ = writeln!(o, "sheepdog_upstream_latency_seconds_bucket{{le=\"+Inf\"}} {}", h.count);
            let _ = writeln!(o, "sheepdog_upstream_latency_seconds_sum {}", h.sum);
            let _ = writeln!(o, "sheepdog_upstream_latency_seconds_count {}", h.count);
        }
        c(
            &mut o,
            "sheepdog_backlog_jobs",
            "Jobs waiting in Postgres for a call (their limit, breaker, turn or retry time).",
            "gauge",
        );
        let _ = writeln!(o, "sheepdog_backlog_jobs {}", self.backlog.load(Ordering::Relaxed));
        c(
            &mut o,
            "sheepdog_breaker_state",
            "Shared circuit breakers by scope (`*` or a model): 1 for the current state.",
            "gauge",
        );
        {
            let breakers = self.breakers.lock().unwrap();
            for b in breakers.iter() {
                let scope = label(&b.scope);
                for st in ["closed", "open", "half_open"] {
                    let _ = writeln!(
                        o,
                        "sheepdog_breaker_state{{scope=\"{scope}\",state=\"{st}\"}} {}",
                        u8::from(b.state.as_str() == st)
                    );
                }
            }
        }
        c(
            &mut o,
            "sheepdog_scope_held",
            "1 while a scope's calls are held by its limits, breaker or the upstream's pause, by kind.",
            "gauge",
        );
        {
            let held = self.health.held();
            for b in held.iter().chain(self.health.lanes().iter()) {
                let _ = writeln!(
                    o,
                    "sheepdog_scope_held{{scope=\"{}\",kind=\"{:?}\"}} 1",
                    label(&b.scope),
                    b.kind
                );
            }
        }
        {
            let scopes = self.scopes.lock().unwrap();
            c(
                &mut o,
                "sheepdog_limit",
                "Limits shared by all replicas, by scope (`*` or a model) and kind (rpm, tpm, budget_usd).",
                "gauge",
            );
            for u in scopes.iter() {
                let scope = label(&u.scope);
                for (kind, v) in [("rpm", u.rpm), ("tpm", u.tpm), ("budget_usd", u.budget_usd)] {
                    if let Some(v) = v {
                        let _ = writeln!(o, "sheepdog_limit{{scope=\"{scope}\",kind=\"{kind}\"}} {v}");
                    }
                }
            }
            c(
                &mut o,
                "sheepdog_limit_used_last_minute",
                "Requests and tokens of the last minute, all replicas, by scope.",
                "gauge",
            );
            for u in scopes.iter() {
                let scope = label(&u.scope);
                let _ = writeln!(
                    o,
                    "sheepdog_limit_used_last_minute{{scope=\"{scope}\",kind=\"requests\"}} {}",
                    u.requests_last_minute
                );
                let _ = writeln!(
                    o,
                    "sheepdog_limit_used_last_minute{{scope=\"{scope}\",kind=\"tokens\"}} {}",
                    u.tokens_last_minute
                );
            }
            c(
                &mut o,
                "sheepdog_budget_left_usd",
                "Spend budget left this period, all replicas together, by scope (absent without a budget).",
                "gauge",
            );
            for u in scopes.iter() {
                if let Some(left) = u.budget_left_usd {
                    let _ = writeln!(o, "sheepdog_budget_left_usd{{scope=\"{}\"}} {left}", label(&u.scope));
                }
            }
        }
        c(
            &mut o,
            "sheepdog_queue_depth",
            "Messages ready in sheepdog's queues.",
            "gauge",
        );
        for (q, n) in self.queue_depth.lock().unwrap().iter() {
            let _ = writeln!(o, "sheepdog_queue_depth{{queue=\"{q}\"}} {n}");
        }
        c(
            &mut o,
            "sheepdog_paused",
            "1 while this replica takes no jobs (breaker, budget, auth).",
            "gauge",
        );
        let _ = writeln!(o, "sheepdog_paused {}", u8::from(self.health.paused().is_some()));
        c(
            &mut o,
            "sheepdog_up",
            "Connections this replica needs, 1 when up.",
            "gauge",
        );
        let _ = writeln!(o, "sheepdog_up{{part=\"amqp\"}} {}", u8::from(self.health.amqp()));
        let _ = writeln!(o, "sheepdog_up{{part=\"postgres\"}} {}", u8::from(self.health.db()));
        o
    }
}

/// Serves `/healthz`, `/readyz` and `/metrics` in the background; returns the
/// task and the address it listens on (port 0 picks a free one).
pub async fn serve(
    addr: &str,
    metrics: std::sync::Arc<Metrics>,
) -> anyhow::Result<(tokio::task::JoinHandle<()>, std::net::SocketAddr)> {
    use axum::http::StatusCode;
    use axum::routing::get;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let m1 = metrics.clone();
    let m2 = metrics;
    let app = axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let m = m1.clone();
                async move {
                    match m.ready() {
                        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
                        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")),
                    }
                }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let m = m2.clone();
                async move {
                    (
                        [(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                        m.render(),
                    )
                }
            }),
        );
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((task, local))
}

/// A Prometheus label value: quotes, backslashes and newlines replaced.
fn label(v: &str) -> String {
    v.replace(['"', '\\', '\n'], "_")
}
