//! `sheepdog bench`: end-to-end throughput and latency against the in-process mock.

use std::io::Write;
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
use crate::upstream::mock::{MockConfig, MockServer, MockState};

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
    /// What sheepdog added to each call: from the transaction that granted it to the one that
    /// settled it, less the time the mock itself held that very call.
    pub added_p50_ms: f64,
    pub added_p99_ms: f64,
    /// The p99 of the part before the call reached the mock (grant, connection, request).
    pub added_to_arrival_p99_ms: f64,
    /// The p99 of the part after the mock answered (response, settlement).
    pub added_after_answer_p99_ms: f64,
    pub upstream_calls: usize,
    /// Of the replicas' slots, the share busy with a call at the mock, from the first call's
    /// arrival to the last one's answer (runs with a mock latency only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slots_busy: Option<f64>,
    /// The time a perfect scheduler needs for the same call durations on the same slots, over
    /// the time taken (runs with a mock latency only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vs_perfect_scheduler: Option<f64>,
    /// CPU the workers used (the process, less the mock's and the producer's threads).
    pub worker_cpu_ms_per_job: f64,
    pub mock_cpu_ms_per_job: f64,
    pub enqueue_cpu_ms_per_job: f64,
    /// The database's work per job: commits, rows written, and the WAL the server wrote.
    pub db_commits_per_job: f64,
    pub db_rows_inserted_per_job: f64,
    pub db_rows_updated_per_job: f64,
    pub db_rows_deleted_per_job: f64,
    pub db_wal_bytes_per_job: f64,
    /// Dispatch rounds (settle and grant in one transaction, the wait for the dispatch lock
    /// included) over all replicas.
    pub dispatch_rounds: u64,
    pub dispatch_p50_ms: f64,
    pub dispatch_p99_ms: f64,
    pub dispatch_max_ms: f64,
    pub jobs_per_round: f64,
    /// The most Postgres connections the replicas held at once (sampled twice a second).
    pub pg_connections_peak: i64,
    /// Statements of the replicas that failed because the database did not answer (a refused
    /// connection among them).
    pub db_failures: u64,
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
    // Its own database, so limits set for the run touch nothing else. The bench's own
    // connections (setup, watching, the producer) are named apart from the replicas'.
    let workers_url = &bench_database(database_url, None)?;
    let own_url = &bench_database(database_url, Some(BENCH_APP))?;
    let pool = super::migrate(own_url, amqp_url).await?;
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
    // The mock and the producer run on threads of their own, so what the workers cost in CPU
    // can be told apart from what they cost.
    let mock = SideMock::start(MockConfig {
        latency_ms_min: b.latency_ms,
        latency_ms_max: b.latency_ms_max.unwrap_or(b.latency_ms),
        ..Default::default()
    })
    .await?;
    upstream.base_url = mock.base_url.clone();
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

    let work_before = crate::store::report::db_work(&pool).await?;
    let cpu_before = process_cpu();
    let shutdown = CancellationToken::new();
    let mut handles = Vec::new();
    let mut workers = Vec::new();
    for i in 0..b.replicas.max(1) {
        let w = super::build_worker(
            &crate::config::DbArgs::direct(workers_url.clone()),
            amqp_url,
            &upstream,
            &worker,
            &limits,
            format!("bench-worker-{i}"),
        )
        .await?;
        workers.push(w.clone());
        let s = shutdown.clone();
        handles.push(tokio::spawn(async move { w.run(s).await }));
    }
    eprintln!(
        "bench: {} jobs, {} replica(s) x {} in flight, mock latency {} ms",
        b.jobs,
        b.replicas,
        worker.concurrency,
        mock_latency(&b)
    );

    let started = Instant::now();
    let db_started = crate::store::report::clock(&pool).await?;
    let enqueue = side_enqueue(
        own_url.clone(),
        amqp_url.clone(),
        input.clone(),
        batch_id.clone(),
        worker.message.max_message_bytes,
    )?;
    let mut last_print = Instant::now();
    let mut connections_peak = 0i64;
    loop {
        connections_peak = connections_peak.max(crate::store::report::connections_except(&pool, BENCH_APP).await?);
        let done = crate::store::report::ended_jobs(&pool, &batch_id).await?;
        if done as usize >= b.jobs {
            break;
        }
        // A budget run ends when every replica has paused on the budget.
        if b.budget.is_some()
            && workers.iter().all(|w| {
                w.metrics.health.paused().is_some()
                    && w.metrics.in_flight.load(std::sync::atomic::Ordering::Relaxed) == 0
            })
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
    // Timed to the last job's end as the database recorded it (its settling transaction's start),
    // not to the poll that saw it: a poll every 500 ms made the figure jump by an eighth on a
    // 4-second run. A budget run ends when the workers paused, so it is timed by the poll.
    let wall = match crate::store::report::batch_status(&pool, &batch_id).await?.last_at {
        Some(last) if b.budget.is_none() => {
            ((last - db_started).num_microseconds().unwrap_or(0) as f64 / 1e6).max(0.001)
        }
        _ => started.elapsed().as_secs_f64(),
    };
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
    let (report, enqueue_time, enqueue_cpu) = tokio::task::spawn_blocking(move || enqueue.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the producer's thread panicked"))?;
    let report = report?;
    anyhow::ensure!(
        report.refused.is_empty() && report.unconfirmed.is_empty(),
        "enqueue lost lines"
    );
    shutdown.cancel();
    for h in handles {
        h.await??;
    }
    // The replicas' connections closed, so each backend has flushed its statistics.
    for w in &workers {
        w.pool.close().await;
    }
    let gone = Instant::now();
    while crate::store::report::connections_except(&pool, BENCH_APP).await? > 0
        && gone.elapsed() < Duration::from_secs(10)
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let work_after = crate::store::report::db_work(&pool).await?;
    let mock_cpu = mock.stop().await?;
    let worker_cpu = process_cpu()
        .saturating_sub(cpu_before)
        .saturating_sub(mock_cpu)
        .saturating_sub(enqueue_cpu);

    let row = crate::store::report::latency_percentiles(&pool, &batch_id).await?;
    let calls = calls_in_run;
    let added = added_latencies(&calls, &crate::store::report::call_spans(&pool, &batch_id).await?);
    crate::limits::apply(&pool, crate::limits::ALL, &unlimited()).await?;
    let mut own: Vec<u64> = calls.iter().map(|c| c.latency_ms).collect();
    own.sort_unstable();
    let own_p50 = own.get(own.len() / 2).copied().unwrap_or(0) as f64;
    let slots = b.replicas.max(1) * worker.concurrency.max(1) as usize;
    let occupancy = (b.latency_ms_max.unwrap_or(b.latency_ms) > 0).then(|| occupancy(&calls, slots));
    let (mut rounds, mut granted) = (hdrhistogram::Histogram::<u64>::new(2)?, 0);
    for w in &workers {
        let r = w.rounds.lock().unwrap();
        rounds.add(&r.took_us)?;
        granted += r.granted;
    }
    let per_job = |v: i64| round(v as f64 / b.jobs.max(1) as f64);
    let cpu_per_job = |d: Duration| round(d.as_secs_f64() * 1000.0 / b.jobs.max(1) as f64);
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
        added_p50_ms: round(percentile(&added.total, 0.50)),
        added_p99_ms: round(percentile(&added.total, 0.99)),
        added_to_arrival_p99_ms: round(percentile(&added.before, 0.99)),
        added_after_answer_p99_ms: round(percentile(&added.after, 0.99)),
        upstream_calls: calls.len(),
        slots_busy: occupancy.map(|o| round(o.0)),
        vs_perfect_scheduler: occupancy.map(|o| round(o.1)),
        worker_cpu_ms_per_job: cpu_per_job(worker_cpu),
        mock_cpu_ms_per_job: cpu_per_job(mock_cpu),
        enqueue_cpu_ms_per_job: cpu_per_job(enqueue_cpu),
        db_commits_per_job: per_job(work_after.commits - work_before.commits),
        db_rows_inserted_per_job: per_job(work_after.inserted - work_before.inserted),
        db_rows_updated_per_job: per_job(work_after.updated - work_before.updated),
        db_rows_deleted_per_job: per_job(work_after.deleted - work_before.deleted),
        db_wal_bytes_per_job: per_job(work_after.wal_bytes - work_before.wal_bytes),
        dispatch_rounds: rounds.len(),
        dispatch_p50_ms: round(rounds.value_at_quantile(0.50) as f64 / 1000.0),
        dispatch_p99_ms: round(rounds.value_at_quantile(0.99) as f64 / 1000.0),
        dispatch_max_ms: round(rounds.max() as f64 / 1000.0),
        jobs_per_round: round(granted as f64 / rounds.len().max(1) as f64),
        pg_connections_peak: connections_peak,
        db_failures: workers.iter().map(|w| w.metrics.health.db_failures()).sum(),
        peak_rss_mib: round(peak_rss_mib()),
        limits,
    };
    print_result(&result);
    if let Some(p) = &b.json_out {
        std::fs::write(p, serde_json::to_string_pretty(&result)?)?;
    }
    Ok(result)
}

/// The `application_name` of the bench's own connections.
const BENCH_APP: &str = "sheepdog bench";

/// The mock upstream, serving on a thread of its own.
struct SideMock {
    base_url: String,
    state: MockState,
    stop: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<Duration>,
}

impl SideMock {
    async fn start(config: MockConfig) -> anyhow::Result<SideMock> {
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new().name("bench-mock".into()).spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(anyhow::Error::from(e)));
                    return Duration::ZERO;
                }
            };
            rt.block_on(async move {
                match MockServer::start("127.0.0.1:0", config).await {
                    Ok(m) => {
                        let _ = ready_tx.send(Ok((m.base_url(), m.state.clone())));
                        let _ = stop_rx.await;
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            });
            drop(rt);
            thread_cpu()
        })?;
        let (base_url, state) = ready_rx.await??;
        Ok(SideMock {
            base_url,
            state,
            stop,
            thread,
        })
    }

    /// Stops it; returns the CPU its thread used.
    async fn stop(self) -> anyhow::Result<Duration> {
        let _ = self.stop.send(());
        let thread = self.thread;
        tokio::task::spawn_blocking(move || thread.join())
            .await?
            .map_err(|_| anyhow::anyhow!("the mock's thread panicked"))
    }
}

type EnqueueOutcome = (anyhow::Result<super::enqueue::EnqueueReport>, Duration, Duration);

/// Enqueues the batch file from a thread of its own (a producer beside the workers): its
/// report, how long it took and the CPU its thread used.
fn side_enqueue(
    url: SecretString,
    amqp_url: SecretString,
    input: std::path::PathBuf,
    batch_id: String,
    max_message_bytes: usize,
) -> anyhow::Result<std::thread::JoinHandle<EnqueueOutcome>> {
    Ok(std::thread::Builder::new()
        .name("bench-enqueue".into())
        .spawn(move || {
            let t = Instant::now();
            let report = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|rt| {
                    rt.block_on(async {
                        let pool = crate::store::connect(&url, 4, false).await?;
                        let opts = super::enqueue::EnqueueOptions {
                            max_message_bytes,
                            ..super::enqueue::EnqueueOptions::batch(&batch_id)
                        };
                        let r = super::enqueue::enqueue_file(&pool, &amqp_url, &input, &opts).await;
                        pool.close().await;
                        r
                    })
                });
            (report, t.elapsed(), thread_cpu())
        })?)
}

/// CPU time the calling thread has used, from the kernel's scheduler statistics.
fn thread_cpu() -> Duration {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()))
        .map(Duration::from_nanos)
        .unwrap_or_default()
}

/// CPU time the whole process has used (user and system, ended threads included).
fn process_cpu() -> Duration {
    // utime and stime are the 14th and 15th fields, in clock ticks (USER_HZ, 100 on Linux).
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(") ")?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .map(|ticks| Duration::from_millis(ticks * 10))
        .unwrap_or_default()
}

/// For each call the mock answered: the time sheepdog held it (`spans`, by request id) less
/// the time the mock itself held it.
/// Also split in two: from the grant to the call's arrival at the mock, and from the mock's
/// answer to the settlement. Each list is sorted.
fn added_latencies(calls: &[CallRecord], spans: &[(String, f64, f64)]) -> Added {
    let own: std::collections::HashMap<&str, &CallRecord> = calls.iter().map(|c| (c.request_id.as_str(), c)).collect();
    let mut a = Added::default();
    for (id, started, finished) in spans {
        let Some(c) = own.get(id.as_str()) else { continue };
        let answered = c.arrived_ms + c.latency_ms as f64;
        a.total.push((finished - started - c.latency_ms as f64).max(0.0));
        a.before.push((c.arrived_ms - started).max(0.0));
        a.after.push((finished - answered).max(0.0));
    }
    for v in [&mut a.total, &mut a.before, &mut a.after] {
        v.sort_by(f64::total_cmp);
    }
    a
}

#[derive(Default)]
struct Added {
    total: Vec<f64>,
    before: Vec<f64>,
    after: Vec<f64>,
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// How busy `slots` slots were with calls at the mock, from the first arrival to the last
/// answer; and the time a perfect scheduler needs for the same durations on the same slots
/// (each call, in order, on the slot free first), over that span.
fn occupancy(calls: &[CallRecord], slots: usize) -> (f64, f64) {
    if calls.is_empty() {
        return (0.0, 0.0);
    }
    let first = calls.iter().map(|c| c.arrived_ms).fold(f64::INFINITY, f64::min);
    let last = calls
        .iter()
        .map(|c| c.arrived_ms + c.latency_ms as f64)
        .fold(0.0, f64::max);
    let span = (last - first).max(1.0);
    let busy: f64 = calls.iter().map(|c| c.latency_ms as f64).sum();
    let mut free: std::collections::BinaryHeap<std::cmp::Reverse<u64>> =
        (0..slots).map(|_| std::cmp::Reverse(0)).collect();
    let mut makespan = 0u64;
    let mut ordered: Vec<&CallRecord> = calls.iter().collect();
    ordered.sort_by(|a, b| a.arrived_ms.total_cmp(&b.arrived_ms));
    for c in ordered {
        let std::cmp::Reverse(t) = free.pop().unwrap_or(std::cmp::Reverse(0));
        let end = t + c.latency_ms;
        makespan = makespan.max(end);
        free.push(std::cmp::Reverse(end));
    }
    (busy / (slots as f64 * span), makespan as f64 / span)
}

/// `DATABASE_URL` with `_bench` added to the database name (and `application_name` set, if given).
fn bench_database(url: &SecretString, application_name: Option<&str>) -> anyhow::Result<SecretString> {
    let mut u = url::Url::parse(url.expose_secret()).map_err(|_| anyhow::anyhow!("DATABASE_URL is not a URL"))?;
    let name = u.path().trim_start_matches('/').to_string();
    let name = if name.is_empty() { "sheepdog".to_string() } else { name };
    u.set_path(&format!("/{name}_bench"));
    if let Some(app) = application_name {
        let kept: Vec<(String, String)> = u
            .query_pairs()
            .filter(|(k, _)| k != "application_name")
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        u.query_pairs_mut()
            .clear()
            .extend_pairs(kept)
            .append_pair("application_name", app);
    }
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
