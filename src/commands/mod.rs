//! The commands of the `sheepdog` binary. Each module owns its command's arguments (clap), its
//! output and its exit code; `run` dispatches.

pub mod api;
pub mod batch;
pub mod bench;
pub mod dashboard;
pub mod dead;
pub mod demo;
pub mod enqueue;
pub mod estimate;
pub mod healthcheck;
pub mod keys;
pub mod limits;
pub mod mock;
pub mod report;
pub mod status;
pub mod worker;

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Subcommand};
use secrecy::SecretString;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::config::{AmqpArgs, DbArgs, LimitArgs, UpstreamArgs, WorkerArgs};
use crate::prices::PriceTable;
use crate::upstream::Client;
use crate::worker::Worker;

#[derive(Subcommand)]
pub enum Command {
    /// Apply the Postgres migrations and declare the AMQP topology (idempotent).
    Migrate(MigrateArgs),
    /// Consume jobs until SIGTERM/SIGINT.
    Worker(worker::WorkerCommand),
    /// Show or change the limits shared by every replica (no restart needed).
    Limits {
        #[command(subcommand)]
        action: limits::LimitsAction,
    },
    /// Control batches: list, show, cancel, pause, resume, and their settings.
    Batch {
        #[command(subcommand)]
        action: batch::BatchAction,
    },
    /// The web dashboard: batches, limits, breakers, dead letters; actions with a token.
    Dashboard(dashboard::DashboardArgs),
    /// The OpenAI Batch API over HTTP: files and batches for the official SDKs.
    Api(api::ApiArgs),
    /// Producer keys of the Batch API: create (printed once), list, revoke.
    Keys {
        #[command(subcommand)]
        action: keys::KeysAction,
    },
    /// Inspect and replay dead-lettered jobs.
    Dead {
        #[command(subcommand)]
        action: dead::DeadAction,
    },
    /// Cost and tokens by day, model and batch.
    Report(report::ReportArgs),
    /// Publish an OpenAI Batch input file (JSONL) as jobs.
    Enqueue(enqueue::EnqueueArgs),
    /// Counts by status, tokens, cost and latency of a batch.
    Status(status::StatusArgs),
    /// Write a batch's results as OpenAI Batch output lines.
    Export(status::ExportArgs),
    /// The whole path on this machine, with the mock unless HOLYSHEEP_API_KEY is set.
    Demo(demo::DemoArgs),
    /// End-to-end benchmark against the in-process mock.
    Bench(bench::BenchCommand),
    /// An OpenAI-compatible stand-in for HolySheep.
    MockUpstream(mock::MockArgs),
    /// Exit 0 if the replica at SHEEPDOG_METRICS_ADDR is alive (or, with --ready, ready).
    Healthcheck(healthcheck::HealthcheckArgs),
}

/// Runs a command; its exit code.
pub async fn run(command: Command) -> anyhow::Result<ExitCode> {
    if matches!(
        command,
        Command::Limits { .. }
            | Command::Batch { .. }
            | Command::Keys { .. }
            | Command::Dead { .. }
            | Command::Report(_)
            | Command::Status(_)
            | Command::Export(_)
    ) {
        end_quietly_on_a_closed_pipe();
    }
    match command {
        Command::Migrate(a) => {
            // Migrations hold a session lock: over the session URL.
            migrate(a.db.session_url()?, &a.amqp.amqp_url).await?;
            println!("migrations applied; queues declared");
            Ok(ExitCode::SUCCESS)
        }
        Command::Worker(a) => worker::run(a).await,
        Command::Limits { action } => limits::run(action).await,
        Command::Batch { action } => batch::run(action).await,
        Command::Dead { action } => dead::run(action).await,
        Command::Dashboard(a) => dashboard::run(a).await,
        Command::Api(a) => api::run(a).await,
        Command::Keys { action } => keys::run(action).await,
        Command::Report(a) => report::run(a).await,
        Command::Enqueue(a) => enqueue::run(a).await,
        Command::Status(a) => status::run(a).await,
        Command::Export(a) => status::run_export(a).await,
        Command::Demo(a) => demo::run(a).await,
        Command::Bench(a) => bench::command(a).await,
        Command::MockUpstream(a) => mock::run(a).await,
        Command::Healthcheck(a) => healthcheck::run(a).await,
    }
}

/// A command that prints for the reader, piped into `head` or `less` that quits early: ends as
/// other Unix tools do (by SIGPIPE, silently) instead of failing on its next line of output. Rust
/// ignores SIGPIPE by default; the long-running commands (worker, api, dashboard) keep that, so a
/// socket closed under them is an error they handle, never their end.
fn end_quietly_on_a_closed_pipe() {
    // SAFETY: sets the disposition of one signal to its default before any thread of ours
    // writes; no handler is installed.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

#[derive(Args)]
pub struct MigrateArgs {
    #[command(flatten)]
    pub db: DbArgs,
    #[command(flatten)]
    pub amqp: AmqpArgs,
}

/// Logs to stderr: `RUST_LOG` filters, `SHEEPDOG_LOG_FORMAT=json` makes JSON lines.
pub fn init_logging(command: &Command) {
    use tracing_subscriber::EnvFilter;
    let default = match command {
        // The demo draws progress bars and tells what happens, its refused line included:
        // only an error may interrupt it.
        Command::Demo(_) => "error",
        Command::Bench(_) => "warn,sqlx=error,lapin=error",
        _ => "info,sqlx=warn,lapin=warn",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let json = std::env::var("SHEEPDOG_LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    // Colours only on a terminal: a log file or a collector gets plain text.
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if json {
        b.json().flatten_event(true).init();
    } else {
        b.init();
    }
}

/// Cancels on the first SIGTERM/SIGINT; exits at once (130) on the second.
pub fn shutdown_on_signals() -> CancellationToken {
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
                tracing::info!("signal received: finishing the calls in flight (again to stop at once)");
                t.cancel();
            } else {
                tracing::warn!("second signal: stopping now; another replica takes over the jobs in hand");
                std::process::exit(130);
            }
        }
    });
    token
}

/// `sheepdog migrate`: the database (created if missing), its migrations, and the AMQP topology.
pub async fn migrate(database_url: &SecretString, amqp_url: &SecretString) -> anyhow::Result<PgPool> {
    let pool = crate::store::connect(database_url, 4, false).await?;
    crate::store::migrate(&pool).await?;
    let conn = crate::amqp::connect(amqp_url, "sheepdog migrate").await?;
    let ch = conn.create_channel().await?;
    crate::amqp::declare_topology(&ch)
        .await
        .context("declaring the AMQP topology")?;
    let _ = conn.close(200, "done".into()).await;
    Ok(pool)
}

/// Connects to the database and checks that `migrate` has run against it.
pub async fn open_db(db: &DbArgs) -> anyhow::Result<PgPool> {
    let pool = crate::store::connect(&db.database_url, 2, db.transaction_pooler()).await?;
    crate::store::require_schema(&pool).await?;
    Ok(pool)
}

/// Builds a replica: its own pool, HTTP client and metrics. Limits given to it (flags or
/// environment) are stored as the shared limits before it exists, so before its first call.
pub async fn build_worker(
    db: &DbArgs,
    amqp_url: &SecretString,
    upstream: &UpstreamArgs,
    args: &WorkerArgs,
    limits: &LimitArgs,
    name: String,
) -> anyhow::Result<Arc<Worker>> {
    let pool = crate::store::connect(&db.database_url, crate::store::REPLICA_POOL, db.transaction_pooler()).await?;
    let session = crate::store::connect_options(db.session_url()?)?;
    match start_replica(pool, session, amqp_url, upstream, args, limits, name).await {
        // A pool that timed out is explained as a running replica's is: by a new connection.
        Err(e) => match e.downcast::<crate::store::StoreError>() {
            Ok(failed) => {
                let opts = crate::store::connect_options(&db.database_url)?;
                Err(crate::store::explain_unavailable(&opts, &failed).await.into())
            }
            Err(e) => Err(e),
        },
        ok => ok,
    }
}

async fn start_replica(
    pool: sqlx::PgPool,
    session: sqlx::postgres::PgConnectOptions,
    amqp_url: &SecretString,
    upstream: &UpstreamArgs,
    args: &WorkerArgs,
    limits: &LimitArgs,
    name: String,
) -> anyhow::Result<Arc<Worker>> {
    crate::store::require_schema(&pool).await?;
    let changes = limits.changes()?;
    if !changes.is_empty() {
        crate::limits::apply_all(&pool, &changes).await?;
        tracing::info!(?changes, "shared limits set from this replica's settings");
    }
    let prices = PriceTable::load(args.pricing.prices.as_deref())?;
    let currency = prices.currency();
    if crate::store::currency::record(&pool, &currency.code, currency.per_usd).await? {
        tracing::info!(currency = %currency.code, per_usd = %currency.per_usd, "the account's currency from this replica's price file");
    }
    let client = Client::new(upstream, args.concurrency as usize)?;
    let replica = crate::store::liveness::register(&pool, &name, args.concurrency).await?;
    Ok(Worker::new(
        pool,
        // The life line needs a session of its own.
        session,
        client,
        prices,
        args.clone(),
        amqp_url.clone(),
        name,
        replica,
    ))
}

/// A name for this replica: host and pid.
pub fn replica_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "host".into());
    format!("sheepdog@{host}:{}", std::process::id())
}
