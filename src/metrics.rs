//! Counters a replica keeps, served on `/metrics` by prometheus-client (typed families, its
//! histogram, and a collector for the state read at each scrape), together with `/healthz` and
//! `/readyz`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use rust_decimal::prelude::ToPrimitive;
use rust_decimal::Decimal;

use crate::health::Health;
use crate::limits::breaker::BreakerView;

/// Upper bounds (seconds) of the upstream latency histogram.
const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// The content type of `/metrics`: the OpenMetrics text that prometheus-client writes, which
/// Prometheus scrapes as such.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

type Labels = Vec<(&'static str, String)>;

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
    /// Upstream call attempts by ledger outcome (`sheepdog_upstream_calls_total`).
    calls: Family<Labels, Counter>,
    /// Tokens by model and kind (`sheepdog_tokens_total`).
    tokens: Family<Labels, Counter>,
    /// Spend in USD by model (`sheepdog_cost_usd_total`).
    cost_usd: Family<Labels, Counter<f64, AtomicU64>>,
    /// `sheepdog_upstream_latency_seconds`.
    latency: Histogram,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics {
            jobs_succeeded: Default::default(),
            jobs_failed: Default::default(),
            jobs_dead_lettered: Default::default(),
            jobs_retried: Default::default(),
            jobs_duplicate: Default::default(),
            jobs_taken_over: Default::default(),
            in_flight: Default::default(),
            health: Default::default(),
            scopes: Default::default(),
            queue_depth: Default::default(),
            backlog: Default::default(),
            breakers: Default::default(),
            calls: Default::default(),
            tokens: Default::default(),
            cost_usd: Default::default(),
            latency: Histogram::new(LATENCY_BUCKETS.iter().copied()),
        }
    }
}

impl Metrics {
    pub fn call(&self, outcome: &str, model: &str, latency: Duration, prompt: u64, completion: u64, cost: Decimal) {
        self.calls.get_or_create(&vec![("outcome", outcome.to_string())]).inc();
        let m = label(model);
        self.tokens
            .get_or_create(&vec![("model", m.clone()), ("kind", "prompt".into())])
            .inc_by(prompt);
        self.tokens
            .get_or_create(&vec![("model", m.clone()), ("kind", "completion".into())])
            .inc_by(completion);
        self.cost_usd
            .get_or_create(&vec![("model", m)])
            .inc_by(cost.to_f64().unwrap_or_default());
        self.latency.observe(latency.as_secs_f64());
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

    /// `/metrics`: the typed families kept as calls come back, and the replica's state as it is
    /// now (a collector), in prometheus-client's text encoding. (`register` ends each help text
    /// with a full stop itself; a family without a sample yet is left out.)
    pub fn render(&self) -> String {
        let mut registry = Registry::default();
        registry.register(
            "sheepdog_upstream_calls",
            "Upstream call attempts, by ledger outcome",
            self.calls.clone(),
        );
        registry.register("sheepdog_tokens", "Tokens used, by model and kind", self.tokens.clone());
        registry.register("sheepdog_cost_usd", "Spend in USD, by model", self.cost_usd.clone());
        registry.register(
            "sheepdog_upstream_latency_seconds",
            "Upstream call latency",
            self.latency.clone(),
        );
        registry.register_collector(Box::new(self.snapshot()));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).expect("writing to a String");
        out
    }

    fn snapshot(&self) -> Snapshot {
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let held = self.health.held();
        Snapshot {
            jobs: [
                ("succeeded", n(&self.jobs_succeeded)),
                ("failed", n(&self.jobs_failed)),
                ("dead_lettered", n(&self.jobs_dead_lettered)),
                ("retried", n(&self.jobs_retried)),
                ("duplicate", n(&self.jobs_duplicate)),
                ("taken_over", n(&self.jobs_taken_over)),
            ],
            in_flight: self.in_flight.load(Ordering::Relaxed),
            backlog: self.backlog.load(Ordering::Relaxed),
            breakers: self
                .breakers
                .lock()
                .unwrap()
                .iter()
                .map(|b| (label(&b.scope), b.state.as_str().to_string()))
                .collect(),
            held: held
                .iter()
                .chain(self.health.lanes().iter())
                .map(|b| (label(&b.scope), format!("{:?}", b.kind)))
                .collect(),
            scopes: self.scopes.lock().unwrap().clone(),
            queues: self.queue_depth.lock().unwrap().clone(),
            paused: self.health.paused().is_some(),
            amqp_up: self.health.amqp(),
            db_up: self.health.db(),
        }
    }
}

/// The replica's state at a scrape, encoded by prometheus-client as gauges (and the job
/// counters, which the worker keeps as plain atomics).
#[derive(Debug)]
struct Snapshot {
    jobs: [(&'static str, u64); 6],
    in_flight: i64,
    backlog: i64,
    /// (scope, state) of each shared breaker.
    breakers: Vec<(String, String)>,
    /// (scope, kind) of each scope held.
    held: Vec<(String, String)>,
    scopes: Vec<crate::limits::ScopeUsage>,
    queues: BTreeMap<String, u32>,
    paused: bool,
    amqp_up: bool,
    db_up: bool,
}

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, value: i64) -> Result<(), std::fmt::Error> {
    ConstGauge::new(value).encode(e.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

fn decimal(v: Decimal) -> f64 {
    v.to_f64().unwrap_or_default()
}

impl Collector for Snapshot {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut f = e.encode_descriptor(
            "sheepdog_jobs",
            "Jobs this replica finished, by outcome.",
            None,
            MetricType::Counter,
        )?;
        for (outcome, v) in self.jobs {
            ConstCounter::new(v).encode(f.encode_family(&[("outcome", outcome)])?)?;
        }
        gauge(
            &mut e,
            "sheepdog_jobs_in_flight",
            "Deliveries this replica holds.",
            self.in_flight,
        )?;
        gauge(
            &mut e,
            "sheepdog_backlog_jobs",
            "Jobs waiting in Postgres for a call (their limit, breaker, turn or retry time).",
            self.backlog,
        )?;
        let mut f = e.encode_descriptor(
            "sheepdog_breaker_state",
            "Shared circuit breakers by scope (`*` or a model): 1 for the current state.",
            None,
            MetricType::Gauge,
        )?;
        for (scope, state) in &self.breakers {
            for st in ["closed", "open", "half_open"] {
                let labels = [("scope", scope.as_str()), ("state", st)];
                ConstGauge::new(i64::from(state == st)).encode(f.encode_family(&labels)?)?;
            }
        }
        let mut f = e.encode_descriptor(
            "sheepdog_scope_held",
            "1 while a scope's calls are held by its limits, breaker or the upstream's pause, by kind.",
            None,
            MetricType::Gauge,
        )?;
        for (scope, kind) in &self.held {
            let labels = [("scope", scope.as_str()), ("kind", kind.as_str())];
            ConstGauge::new(1i64).encode(f.encode_family(&labels)?)?;
        }
        let mut f = e.encode_descriptor(
            "sheepdog_limit",
            "Limits shared by all replicas, by scope (`*` or a model) and kind (rpm, tpm, budget_usd).",
            None,
            MetricType::Gauge,
        )?;
        for u in &self.scopes {
            let scope = label(&u.scope);
            for (kind, v) in [("rpm", u.rpm), ("tpm", u.tpm), ("budget_usd", u.budget_usd)] {
                if let Some(v) = v {
                    let labels = [("scope", scope.as_str()), ("kind", kind)];
                    ConstGauge::new(decimal(v)).encode(f.encode_family(&labels)?)?;
                }
            }
        }
        let mut f = e.encode_descriptor(
            "sheepdog_limit_used_last_minute",
            "Requests and tokens of the last minute, all replicas, by scope.",
            None,
            MetricType::Gauge,
        )?;
        for u in &self.scopes {
            let scope = label(&u.scope);
            let labels = [("scope", scope.as_str()), ("kind", "requests")];
            ConstGauge::new(u.requests_last_minute).encode(f.encode_family(&labels)?)?;
            let labels = [("scope", scope.as_str()), ("kind", "tokens")];
            ConstGauge::new(decimal(u.tokens_last_minute)).encode(f.encode_family(&labels)?)?;
        }
        let mut f = e.encode_descriptor(
            "sheepdog_budget_left_usd",
            "Spend budget left this period, all replicas together, by scope (absent without a budget).",
            None,
            MetricType::Gauge,
        )?;
        for u in &self.scopes {
            if let Some(left) = u.budget_left_usd {
                let scope = label(&u.scope);
                ConstGauge::new(decimal(left)).encode(f.encode_family(&[("scope", scope.as_str())])?)?;
            }
        }
        let mut f = e.encode_descriptor(
            "sheepdog_queue_depth",
            "Messages ready in sheepdog's queues.",
            None,
            MetricType::Gauge,
        )?;
        for (q, n) in &self.queues {
            ConstGauge::new(i64::from(*n)).encode(f.encode_family(&[("queue", q.as_str())])?)?;
        }
        gauge(
            &mut e,
            "sheepdog_paused",
            "1 while this replica takes no jobs (breaker, budget, auth).",
            i64::from(self.paused),
        )?;
        let mut f = e.encode_descriptor(
            "sheepdog_up",
            "Connections this replica needs, 1 when up.",
            None,
            MetricType::Gauge,
        )?;
        for (part, up) in [("amqp", self.amqp_up), ("postgres", self.db_up)] {
            ConstGauge::new(i64::from(up)).encode(f.encode_family(&[("part", part)])?)?;
        }
        Ok(())
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
                async move { ([(axum::http::header::CONTENT_TYPE, CONTENT_TYPE)], m.render()) }
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
