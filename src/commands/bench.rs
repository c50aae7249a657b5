//! `sheepdog bench`: end-to-end throughput and latency against the in-process mock.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rust_decimal::Decimal;
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use serde_json::json;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::config::{AmqpArgs, DbArgs, LimitArgs, UpstreamArgs, WorkerArgs};
use crate::limits::{BudgetPeriod, LimitChange};
use crate::upstream::mock::CallRecord;
use crate::upstream::mock::{MockConfig, MockServer};

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Jobs to push through.
    #[arg(long, default_value_t = 20_000)]
    pub jobs: usize,
    /// Worker replicas (each with its own connections).
    #[arg(long, default_value_t = 1)]
    pub replicas: usize,
    /// Mock latency in ms (fixed, or the low end with --latency-ms-max).
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    /// High end of a uniform mock latency range.
    #[arg(long)]
    pub latency_ms_max: Option<u64>,
    /// Global requests-per-minute limit for the run (a limit run).
    #[arg(long = "rpm")]
    pub rpm: Option<Decimal>,
    /// Global tokens-per-minute limit for the run.
    #[arg(long = "tpm")]
    pub tpm: Option<Decimal>,
    /// Spend budget (USD, period `total`) for the run: it ends when the budget does.
    #[arg(long = "budget")]
    pub budget: Option<Decimal>,
    /// Also write the JSON result to this file.
    #[arg(long)]
    pub json_out: Option<std::path::PathBuf>,
}

#[derive(clap::Args)]
pub struct BenchCommand {
    #[command(flatten)]
    pub bench: BenchArgs,
    #[command(flatten)]
    pub db: DbArgs,
    #[command(flatten)]
    pub amqp: AmqpArgs,
    #[command(flatten)]
    pub upstream: UpstreamArgs,
    #[command(flatten)]
    pub worker: WorkerArgs,
}

pub async fn command(c: BenchCommand) -> anyhow::Result<std::process::ExitCode> {
    run(&c.db.database_url, &c.amqp.amqp_url, c.upstream, c.worker, c.bench).await?;
    Ok(std::process::ExitCode::SUCCESS)
}

#[derive(Debug, Serialize)]
pub struct BenchResult {
    pub jobs: usize,
    pub replicas: usize,
    pub concurrency: u16,
    pub mock_latency_ms: String,
    pub wall_seconds: f64,
    pub jobs_per_second: f64,
    pub enqueue_seconds: f64,
    pub e2e_p50_ms: f64,
    pub e2e_p99_ms: f64,
    pub worker_p50_ms: f64,
    pub worker_p99_ms: f64,
    pub upstream_p50_ms: f64,
    pub upstream_p99_ms: f64,
    pub mock_own_p50_ms: f64,
    pub added_p50_ms: f64,
    pub added_p99_ms: f64,
    pub upstream_calls: usize,
    pub peak_rss_mib: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limits: Option<LimitReport>,
}

/// How a limit run used its limits, measured at the mock.
#[derive(Debug, Default, Serialize)]
pub struct LimitReport {
    pub rpm_limit: Option<String>,
    pub achieved_rpm: f64,
    pub rpm_utilisation_pct: Option<f64>,
    pub worst_60s_requests: usize,
    pub worst_60s_requests_bound: Option<f64>,
    pub tpm_limit: Option<String>,
    pub achieved_tpm: f64,
    pub tpm_utilisation_pct: Option<f64>,
    pub worst_60s_tokens: u64,
    pub worst_60s_tokens_bound: Option<f64>,
    pub budget_usd: Option<String>,
    pub spent_usd: Option<String>,
    pub jobs_done_within_budget: Option<i64>,
    pub failed_jobs: i64,
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse::<f64>().ok()))
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

pub async fn run(
    database_url: &SecretString,
    amqp_url: &SecretString,
    mut upstream: UpstreamArgs,
    mut worker: WorkerArgs,
    b: BenchArgs,
) -> anyhow::Result<BenchResult> {
    // Its own database, so limits set for the run touch nothing else.
    let database_url = &bench_database(database_url)?;
    let pool = super::migrate(database_url, amqp_url).await?;
    refuse_if_consumed(amqp_url).await?;
    // Nothing left from an earlier run: no limits until the workers bring this run's.
    crate::limits::apply(&pool, crate::limits::ALL, &unlimited()).await?;
    crate::store::upkeep::vacuum_database(&pool).await?;
    let limit_run = b.rpm.is_some() || b.tpm.is_some() || b.budget.is_some();
    // The run's limits go to the workers, which store them when they start, as users run it.
    let limits = LimitArgs {
        rpm: b.rpm,
        tpm: b.tpm,
        burst_seconds: None,
        budget_usd: b.budget,
        budget_period: b.budget.map(|_| BudgetPeriod::Total),
        limits_file: None,
    };
    let mock = MockServer::start(
        "127.0.0.1:0",
        MockConfig {
            latency_ms_min: b.latency_ms,
            latency_ms_max: b.latency_ms_max.unwrap_or(b.latency_ms),
            ..Default::default()
        },
    )
    .await?;
    upstream.base_url = mock.base_url();
    upstream.api_key = None;
    worker.metrics_addr = "off".into();

    let batch_id = format!("bench-{}", uuid::Uuid::new_v4().simple());
    let dir = std::env::temp_dir().join(format!("sheepdog-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let input = dir.join("batch.jsonl");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&input)?);
        for i in 0..b.jobs {
            let line = json!({"custom_id": format!("j{i:07}"), "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": "gpt-4o-mini", "max_tokens": 64,
                         "messages": [{"role": "user", "content": format!("Benchmark prompt number {i}: say something short.")}]}});
            serde_json::to_writer(&mut f, &line)?;
            f.write_all(b"\n")?;
        }
    }

    let shutdown = CancellationToken::new();
    let mut handles = Vec::new();
    let mut metrics = Vec::new();
    for i in 0..b.replicas.max(1) {
        let w = super::build_worker(
            &crate::config::DbArgs::direct(database_url.clone()),
            amqp_url,
            &upstream,
            &worker,
            &limits,
            format!("bench-worker-{i}"),
        )
        .await?;
        metrics.push(w.metrics.clone());
        let s = shutdown.clone();
        handles.push(tokio::spawn(async move { Arc::clone(&w).run(s).await }));
    }
    eprintln!(
        "bench: {} jobs, {} replica(s) x {} in flight, mock latency {} ms",
        b.jobs,
        b.replicas,
        worker.concurrency,
        mock_latency(&b)
    );

    let started = Instant::now();
    let (pool2, url2, input2, batch2, max) = (
        pool.clone(),
        amqp_url.clone(),
        input.clone(),
        batch_id.clone(),
        worker.message.max_message_bytes,
    );
    let enqueue = tokio::spawn(async move {
        let t = Instant::now();
        let opts = super::enqueue::EnqueueOptions {
            max_message_bytes: max,
            ..super::enqueue::EnqueueOptions::batch(&batch2)
        };
        let r = super::enqueue::enqueue_file(&pool2, &url2, &input2, &opts).await;
        (r, t.elapsed())
    });
    let mut last_print = Instant::now();
    loop {
        let done = crate::store::report::ended_jobs(&pool, &batch_id).await?;
        if done as usize >= b.jobs {
            break;
        }
        // A budget run ends when every replica has paused on the budget.
        if b.budget.is_some()
            && metrics
                .iter()
                .all(|m| m.health.paused().is_some() && m.in_flight.load(std::sync::atomic::Ordering::Relaxed) == 0)
        {
            break;
        }
        if last_print.elapsed() > Duration::from_secs(2) {
            eprintln!(
                "  {done}/{} done, {:.0} jobs/s so far",
                b.jobs,
                done as f64 / started.elapsed().as_secs_f64()
            );
            last_print = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let wall = started.elapsed().as_secs_f64();
    let calls_in_run = mock.state.calls();
    let limits = if limit_run {
        Some(limit_report(&pool, &b, &calls_in_run, &batch_id).await?)
    } else {
        None
    };
    if b.budget.is_some() {
        // Lift the budget so the rest of the batch drains (not measured).
        crate::limits::apply(
            &pool,
            crate::limits::ALL,
            &LimitChange {
                budget_usd: Some(Decimal::ZERO),
                ..Default::default()
            },
        )
        .await?;
        loop {
            let done = crate::store::report::ended_jobs(&pool, &batch_id).await?;
            if done as usize >= b.jobs {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let (report, enqueue_time) = enqueue.await?;
    let report = report?;
    anyhow::ensure!(
        report.refused.is_empty() && report.unconfirmed.is_empty(),
        "enqueue lost lines"
    );
    shutdown.cancel();
    for h in handles {
        h.await??;
    }

    let row = crate::store::report::latency_percentiles(&pool, &batch_id).await?;
    let calls = calls_in_run;
    crate::limits::apply(&pool, crate::limits::ALL, &unlimited()).await?;
    let mut own: Vec<u64> = calls.iter().map(|c| c.latency_ms).collect();
    own.sort_unstable();
    let own_p50 = own.get(own.len() / 2).copied().unwrap_or(0) as f64;
    let _ = std::fs::remove_dir_all(&dir);
    let result = BenchResult {
        jobs: b.jobs,
        replicas: b.replicas,
        concurrency: worker.concurrency,
        mock_latency_ms: mock_latency(&b),
        wall_seconds: round(wall),
        jobs_per_second: round(b.jobs as f64 / wall),
        enqueue_seconds: round(enqueue_time.as_secs_f64()),
        e2e_p50_ms: round(row.0),
        e2e_p99_ms: round(row.1),
        worker_p50_ms: round(row.2),
        worker_p99_ms: round(row.3),
        upstream_p50_ms: round(row.4),
        upstream_p99_ms: round(row.5),
        mock_own_p50_ms: own_p50,
        added_p50_ms: round(row.2 - own_p50),
        added_p99_ms: round(row.3 - own_p50),
        upstream_calls: calls.len(),
        peak_rss_mib: round(peak_rss_mib()),
        limits,
    };
    print_result(&result);
    if let Some(p) = &b.json_out {
        std::fs::write(p, serde_json::to_string_pretty(&result)?)?;
    }
    Ok(result)
}

/// `DATABASE_URL` with `_bench` added to the database name.
fn bench_database(url: &SecretString) -> anyhow::Result<SecretString> {
    let mut u = url::Url::parse(url.expose_secret()).map_err(|_| anyhow::anyhow!("DATABASE_URL is not a URL"))?;
    let name = u.path().trim_start_matches('/').to_string();
    let name = if name.is_empty() { "sheepdog".to_string() } else { name };
    u.set_path(&format!("/{name}_bench"));
    Ok(SecretString::from(u.to_string()))
}

/// The benchmark consumes `sheepdog.jobs`; a live worker on the same broker
/// would take its jobs (and call its upstream), so it refuses to run beside one.
async fn refuse_if_consumed(amqp_url: &SecretString) -> anyhow::Result<()> {
    let conn = crate::amqp::connect(amqp_url, "sheepdog bench").await?;
    let ch = conn.create_channel().await?;
    let q = ch
        .queue_declare(
            crate::amqp::JOBS_QUEUE.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await?;
    let _ = conn.close(200, "".into()).await;
    anyhow::ensure!(
        q.consumer_count() == 0,
        "{} worker(s) consume sheepdog.jobs on this broker; stop them (or use another vhost) before benchmarking",
        q.consumer_count()
    );
    Ok(())
}

fn unlimited() -> LimitChange {
    LimitChange {
        rpm: Some(Decimal::ZERO),
        tpm: Some(Decimal::ZERO),
        burst_seconds: Some(Decimal::ONE),
        budget_usd: Some(Decimal::ZERO),
        budget_period: None,
    }
}

/// The most requests and tokens that arrived at the mock in any window of `secs`.
pub fn worst_window(calls: &[CallRecord], secs: f64) -> (usize, u64) {
    let mut arrivals: Vec<(f64, u64)> = calls
        .iter()
        .map(|c| (c.arrived_ms, c.prompt_tokens + c.completion_tokens))
        .collect();
    arrivals.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (mut best_n, mut best_tokens, mut j, mut tokens) = (0, 0u64, 0, 0u64);
    for i in 0..arrivals.len() {
        while j < arrivals.len() && arrivals[j].0 < arrivals[i].0 + secs * 1000.0 {
            tokens += arrivals[j].1;
            j += 1;
        }
        best_n = best_n.max(j - i);
        best_tokens = best_tokens.max(tokens);
        tokens -= arrivals[i].1;
    }
    (best_n, best_tokens)
}

async fn limit_report(
    pool: &PgPool,
    b: &BenchArgs,
    calls: &[CallRecord],
    batch_id: &str,
) -> anyhow::Result<LimitReport> {
    use rust_decimal::prelude::ToPrimitive;
    let first = calls.iter().map(|c| c.arrived_ms).fold(f64::INFINITY, f64::min);
    let last = calls.iter().map(|c| c.arrived_ms).fold(0.0, f64::max);
    let span_min = ((last - first) / 60_000.0).max(1e-9);
    let n = calls.len() as f64;
    let tokens: u64 = calls.iter().map(|c| c.prompt_tokens + c.completion_tokens).sum();
    let (w_req, w_tok) = worst_window(calls, 60.0);
    // Utilisation after the first burst (one second's worth, which the bucket holds at the start).
    let util = |limit: Option<Decimal>, used: f64| {
        limit
            .and_then(|l| l.to_f64())
            .map(|l| round(100.0 * (used - l / 60.0) / (l * span_min)))
    };
    let (spent, done, failed) = crate::store::report::spend_and_counts(pool, batch_id).await?;
    let bound = |l: Option<Decimal>| l.and_then(|l| l.to_f64()).map(|l| l * 61.0 / 60.0);
    Ok(LimitReport {
        rpm_limit: b.rpm.map(|v| v.to_string()),
        achieved_rpm: round(n / span_min),
        rpm_utilisation_pct: util(b.rpm, n),
        worst_60s_requests: w_req,
        worst_60s_requests_bound: bound(b.rpm),
        tpm_limit: b.tpm.map(|v| v.to_string()),
        achieved_tpm: round(tokens as f64 / span_min),
        tpm_utilisation_pct: util(b.tpm, tokens as f64),
        worst_60s_tokens: w_tok,
        worst_60s_tokens_bound: bound(b.tpm),
        budget_usd: b.budget.map(|v| v.to_string()),
        spent_usd: b.budget.map(|_| spent.normalize().to_string()),
        jobs_done_within_budget: b.budget.map(|_| done),
        failed_jobs: failed,
    })
}

fn mock_latency(b: &BenchArgs) -> String {
    match b.latency_ms_max {
        Some(m) if m > b.latency_ms => format!("{}-{}", b.latency_ms, m),
        _ => b.latency_ms.to_string(),
    }
}

fn round(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

fn print_result(r: &BenchResult) {
    println!("\n| metric | value |\n|---|---|");
    let v = serde_json::to_value(r).unwrap();
    for (k, val) in v.as_object().unwrap() {
        match val.as_object() {
            Some(inner) => {
                for (k2, v2) in inner {
                    println!("| {k}.{k2} | {v2} |");
                }
            }
            None => println!("| {k} | {val} |"),
        }
    }
    println!("\n{}", serde_json::to_string(r).unwrap());
}
