//! The `sheepdog` binary: parse the command line, dispatch to a command.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sheepdog::commands::{self, bench::BenchArgs};
use sheepdog::config::{AmqpArgs, DbArgs, LimitArgs, MessageArgs, UpstreamArgs, WorkerArgs};
use sheepdog::upstream::mock::{MockConfig, MockServer};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "sheepdog",
    version,
    about = "Queue-driven worker for batch LLM chat-completion jobs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum DeadAction {
    /// Show dead-lettered jobs and why (they stay in the queue).
    List {
        #[arg(long)]
        batch: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        amqp: AmqpArgs,
    },
    /// Move dead-lettered jobs back to sheepdog.jobs (after fixing their cause).
    Replay {
        #[arg(long)]
        batch: Option<String>,
        #[arg(long, default_value_t = usize::MAX)]
        limit: usize,
        #[command(flatten)]
        db: DbArgs,
        #[command(flatten)]
        amqp: AmqpArgs,
    },
}

#[derive(Subcommand)]
enum LimitsAction {
    /// Change limits; 0 means unlimited, an omitted flag keeps its value.
    Set {
        #[command(flatten)]
        limits: LimitArgs,
        #[command(flatten)]
        db: DbArgs,
    },
    /// Current limits and their use.
    Show {
        #[command(flatten)]
        db: DbArgs,
    },
}

#[derive(Subcommand)]
enum Command {
    /// Apply the Postgres migrations and declare the AMQP topology (idempotent).
    Migrate {
        #[command(flatten)]
        db: DbArgs,
        #[command(flatten)]
        amqp: AmqpArgs,
    },
    /// Consume jobs until SIGTERM/SIGINT.
    Worker {
        #[command(flatten)]
        db: DbArgs,
        #[command(flatten)]
        amqp: AmqpArgs,
        #[command(flatten)]
        upstream: UpstreamArgs,
        #[command(flatten)]
        worker: WorkerArgs,
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// Show or change the global limits shared by every replica (no restart needed).
    Limits {
        #[command(subcommand)]
        action: LimitsAction,
    },
    /// Inspect and replay dead-lettered jobs.
    Dead {
        #[command(subcommand)]
        action: DeadAction,
    },
    /// Cost and tokens by day, model and batch.
    Report {
        /// First UTC day (YYYY-MM-DD), included.
        #[arg(long)]
        since: Option<chrono::NaiveDate>,
        /// Last UTC day (YYYY-MM-DD), included.
        #[arg(long)]
        until: Option<chrono::NaiveDate>,
        #[arg(long)]
        batch: Option<String>,
        #[arg(long, value_enum, default_value = "table")]
        format: commands::report::Format,
        #[command(flatten)]
        db: DbArgs,
    },
    /// Publish an OpenAI Batch input file (JSONL) as jobs.
    Enqueue {
        /// The JSONL file, one request per line.
        file: PathBuf,
        /// The batch these jobs belong to.
        #[arg(long)]
        batch: String,
        /// Hide the progress bar.
        #[arg(long)]
        quiet: bool,
        #[command(flatten)]
        message: MessageArgs,
        #[command(flatten)]
        db: DbArgs,
        #[command(flatten)]
        amqp: AmqpArgs,
    },
    /// Counts by status, tokens, cost and latency of a batch.
    Status {
        #[arg(long)]
        batch: String,
        /// Block with a progress bar until every job has ended.
        #[arg(long)]
        wait: bool,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        db: DbArgs,
    },
    /// Write a batch's results as OpenAI Batch output lines.
    Export {
        #[arg(long)]
        batch: String,
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        db: DbArgs,
    },
    /// The whole path on this machine, with the mock unless HOLYSHEEP_API_KEY is set.
    Demo {
        /// Worker replicas to run.
        #[arg(long, default_value_t = 2)]
        replicas: usize,
        #[command(flatten)]
        db: DbArgs,
        #[command(flatten)]
        amqp: AmqpArgs,
        #[command(flatten)]
        upstream: UpstreamArgs,
        #[command(flatten)]
        worker: WorkerArgs,
    },
    /// End-to-end benchmark against the in-process mock.
    Bench {
        #[command(flatten)]
        bench: BenchArgs,
        #[command(flatten)]
        db: DbArgs,
        #[command(flatten)]
        amqp: AmqpArgs,
        #[command(flatten)]
        upstream: UpstreamArgs,
        #[command(flatten)]
        worker: WorkerArgs,
    },
    /// An OpenAI-compatible stand-in for HolySheep.
    MockUpstream {
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: String,
        /// Added latency in ms (fixed, or the low end with --latency-ms-max).
        #[arg(long, default_value_t = 0)]
        latency_ms: u64,
        #[arg(long)]
        latency_ms_max: Option<u64>,
        /// Share of calls answered 500.
        #[arg(long, default_value_t = 0.0)]
        error_rate: f64,
        /// Share of calls answered 429.
        #[arg(long, default_value_t = 0.0)]
        rate_429: f64,
        /// Retry-After sent with 429s, seconds.
        #[arg(long, default_value_t = 1.0)]
        retry_after: f64,
        /// How every call is answered.
        #[arg(long, value_enum, default_value = "ok")]
        mode: sheepdog::upstream::mock::MockMode,
        /// Percent of prompt tokens reported as cached.
        #[arg(long, default_value_t = 0)]
        cached_percent: u64,
        /// Requests answered per sliding minute, like an account's limit; the rest get 429.
        #[arg(long)]
        rpm_limit: Option<u64>,
    },
}

fn init_logging(quiet: bool) {
    use tracing_subscriber::EnvFilter;
    let default = if quiet {
        "warn,sqlx=error,lapin=error"
    } else {
        "info,sqlx=warn,lapin=warn"
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let json = std::env::var("SHEEPDOG_LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        b.json().flatten_event(true).init();
    } else {
        b.init();
    }
}

/// Cancels on the first SIGTERM/SIGINT; exits at once on the second.
fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
            return;
        };
        for n in 0..2 {
            tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
            if n == 0 {
                tracing::info!("signal received: finishing the jobs in hand (again to stop at once)");
                t.cancel();
            } else {
                tracing::warn!("second signal: stopping now; unacked jobs go back to the queue");
                std::process::exit(130);
            }
        }
    });
    token
}

#[tokio::main]
async fn main() -> ExitCode {
    sheepdog::install_crypto_provider();
    let cli = Cli::parse();
    // The demo and the benchmark print their own story; per-job lines would drown it.
    init_logging(matches!(cli.command, Command::Demo { .. } | Command::Bench { .. }));
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Migrate { db, amqp } => {
            commands::migrate(&db.database_url, &amqp.amqp_url).await?;
            println!("migrations applied; queues declared");
        }
        Command::Worker {
            db,
            amqp,
            upstream,
            worker,
            limits,
        } => {
            let shutdown = shutdown_on_signals();
            let w = commands::build_worker(
                &db.database_url,
                &amqp.amqp_url,
                &upstream,
                &worker,
                &limits,
                commands::replica_name(),
            )
            .await?;
            if worker.metrics_addr != "off" {
                match sheepdog::metrics::serve(&worker.metrics_addr, w.metrics.clone()).await {
                    Ok(_) => tracing::info!(addr = %worker.metrics_addr, "serving /healthz, /readyz, /metrics"),
                    Err(e) => tracing::warn!(addr = %worker.metrics_addr, error = %e, "cannot serve metrics"),
                }
            }
            tracing::info!(upstream = %w.client.url(), concurrency = worker.concurrency, "worker starting");
            w.run(shutdown).await?;
            tracing::info!("worker stopped");
        }
        Command::Dead { action } => match action {
            DeadAction::List {
                batch,
                limit,
                json,
                amqp,
            } => {
                let rows = commands::dead::list(&amqp.amqp_url, batch.as_deref(), limit).await?;
                if json {
                    for r in &rows {
                        println!("{}", serde_json::to_string(r)?);
                    }
                } else {
                    println!("{:<24} {:<28} {:>8}  reason", "batch", "custom_id", "bytes");
                    for r in &rows {
                        println!(
                            "{:<24} {:<28} {:>8}  {}",
                            r.batch_id.as_deref().unwrap_or("-"),
                            r.custom_id.as_deref().unwrap_or("-"),
                            r.bytes,
                            r.reason.as_deref().unwrap_or("-")
                        );
                    }
                    println!("{} dead letter(s) shown", rows.len());
                }
            }
            DeadAction::Replay { batch, limit, db, amqp } => {
                let pool = commands::open_db(&db.database_url).await?;
                let r = commands::dead::replay(&pool, &amqp.amqp_url, batch.as_deref(), limit).await?;
                println!(
                    "{} replayed to sheepdog.jobs, {} left in sheepdog.dead",
                    r.replayed, r.skipped
                );
            }
        },
        Command::Report {
            since,
            until,
            batch,
            format,
            db,
        } => {
            let pool = commands::open_db(&db.database_url).await?;
            let rows = sheepdog::store::report::cost_report(&pool, since, until, batch.as_deref()).await?;
            print!("{}", commands::report::render(&rows, format));
        }
        Command::Limits { action } => match action {
            LimitsAction::Set { limits, db } => {
                let pool = commands::open_db(&db.database_url).await?;
                sheepdog::limits::apply(&pool, sheepdog::limits::ALL, &limits.change()).await?;
                print!("{}", commands::limits::render(&pool).await?);
            }
            LimitsAction::Show { db } => {
                let pool = commands::open_db(&db.database_url).await?;
                print!("{}", commands::limits::render(&pool).await?);
            }
        },
        Command::Enqueue {
            file,
            batch,
            quiet,
            message,
            db,
            amqp,
        } => {
            let pool = commands::open_db(&db.database_url).await?;
            let r = commands::enqueue::enqueue_file(
                &pool,
                &amqp.amqp_url,
                &file,
                &batch,
                message.max_message_bytes,
                !quiet,
            )
            .await?;
            for x in &r.refused {
                eprintln!("line {}: refused: {}", x.line, x.reason);
            }
            if !r.unconfirmed.is_empty() {
                eprintln!(
                    "lines not confirmed by the broker (run enqueue again to publish them): {:?}",
                    r.unconfirmed
                );
            }
            println!(
                "batch {batch}: {} published ({} new jobs), {} refused, {} unconfirmed",
                r.published,
                r.new_jobs,
                r.refused.len(),
                r.unconfirmed.len()
            );
            if !r.unconfirmed.is_empty() {
                return Ok(ExitCode::from(4));
            }
            if !r.refused.is_empty() {
                return Ok(ExitCode::from(3));
            }
        }
        Command::Status { batch, wait, json, db } => {
            let pool = commands::open_db(&db.database_url).await?;
            let s = if wait {
                commands::status::wait_for_batch(&pool, &batch, !json).await?
            } else {
                sheepdog::store::report::batch_status(&pool, &batch).await?
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print!("{}", commands::status::render_status(&pool, &s).await?);
                print!("\n{}", commands::limits::render(&pool).await?);
            }
        }
        Command::Export { batch, out, db } => {
            let pool = commands::open_db(&db.database_url).await?;
            let n = commands::status::export(&pool, &batch, &out).await?;
            println!("wrote {n} lines to {}", out.display());
        }
        Command::Demo {
            replicas,
            db,
            amqp,
            upstream,
            worker,
        } => {
            commands::demo::run(&db.database_url, &amqp.amqp_url, upstream, worker, replicas).await?;
        }
        Command::Bench {
            bench,
            db,
            amqp,
            upstream,
            worker,
        } => {
            commands::bench::run(&db.database_url, &amqp.amqp_url, upstream, worker, bench).await?;
        }
        Command::MockUpstream {
            listen,
            latency_ms,
            latency_ms_max,
            error_rate,
            rate_429,
            retry_after,
            mode,
            cached_percent,
            rpm_limit,
        } => {
            let shutdown = shutdown_on_signals();
            let config = MockConfig {
                latency_ms_min: latency_ms,
                latency_ms_max: latency_ms_max.unwrap_or(latency_ms),
                mode,
                error_rate,
                rate_429,
                retry_after_seconds: retry_after,
                cached_percent,
                rpm_limit,
                ..Default::default()
            };
            let server = MockServer::start(&listen, config).await?;
            println!("mock upstream listening; set HOLYSHEEP_BASE_URL={}", server.base_url());
            shutdown.cancelled().await;
        }
    }
    Ok(ExitCode::SUCCESS)
}
