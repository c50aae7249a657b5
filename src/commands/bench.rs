//! `sheepdog bench`: end-to-end throughput and latency against the in-process mock.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use secrecy::SecretString;
use serde::Serialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::config::{UpstreamArgs, WorkerArgs};
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
    /// Also write the JSON result to this file.
    #[arg(long)]
    pub json_out: Option<std::path::PathBuf>,
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
    let pool = super::migrate(database_url, amqp_url).await?;
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
    for i in 0..b.replicas.max(1) {
        let w = super::build_worker(database_url, amqp_url, &upstream, &worker, format!("bench-worker-{i}")).await?;
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
        worker.max_message_bytes,
    );
    let enqueue = tokio::spawn(async move {
        let t = Instant::now();
        let r = super::enqueue::enqueue_file(&pool2, &url2, &input2, &batch2, max, false).await;
        (r, t.elapsed())
    });
    let mut last_print = Instant::now();
    loop {
        let done: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM sheepdog.jobs WHERE batch_id = $1 AND status IN ('succeeded', 'failed')",
        )
        .bind(&batch_id)
        .fetch_one(&pool)
        .await?;
        if done as usize >= b.jobs {
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

    let row: (f64, f64, f64, f64, f64, f64) = sqlx::query_as(
        r#"SELECT
             percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - created_at) * 1000),
             percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - created_at) * 1000),
             percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - started_at) * 1000),
             percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - started_at) * 1000),
             percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms),
             percentile_cont(0.99) WITHIN GROUP (ORDER BY latency_ms)
           FROM sheepdog.jobs WHERE batch_id = $1"#,
    )
    .bind(&batch_id)
    .fetch_one(&pool)
    .await?;
    let calls = mock.state.calls();
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
    };
    print_result(&result);
    if let Some(p) = &b.json_out {
        std::fs::write(p, serde_json::to_string_pretty(&result)?)?;
    }
    Ok(result)
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
        println!("| {k} | {val} |");
    }
    println!("\n{}", serde_json::to_string(r).unwrap());
}
