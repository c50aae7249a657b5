//! `sheepdog demo`: the whole path on this machine.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Args;
use tokio_util::sync::CancellationToken;

use crate::config::{AmqpArgs, DbArgs, UpstreamArgs, WorkerArgs};
use crate::upstream::mock::{MockConfig, MockServer};

/// The bundled example batch.
pub const DEMO_BATCH: &str = include_str!("../../examples/demo-batch.jsonl");

#[derive(Args)]
pub struct DemoArgs {
    /// Worker replicas to run.
    #[arg(long, default_value_t = 2)]
    pub replicas: usize,
    #[command(flatten)]
    pub db: DbArgs,
    #[command(flatten)]
    pub amqp: AmqpArgs,
    #[command(flatten)]
    pub upstream: UpstreamArgs,
    #[command(flatten)]
    pub worker: WorkerArgs,
}

pub async fn run(a: DemoArgs) -> anyhow::Result<ExitCode> {
    let (database_url, amqp_url) = (&a.db.database_url, &a.amqp.amqp_url);
    let (mut upstream, mut worker, replicas) = (a.upstream, a.worker, a.replicas);
    println!("1/5 migrate: database and queues");
    let pool = super::migrate(database_url, amqp_url).await?;

    upstream.api_key = upstream
        .api_key
        .filter(|k| !secrecy::ExposeSecret::expose_secret(k).is_empty());
    let _mock = if upstream.api_key.is_none() {
        let mock = MockServer::start(
            "127.0.0.1:0",
            MockConfig {
                latency_ms_min: 40,
                latency_ms_max: 250,
                error_rate: 0.03,
                ..Default::default()
            },
        )
        .await?;
        upstream.base_url = mock.base_url();
        println!(
            "2/5 upstream: no HOLYSHEEP_API_KEY, so the built-in mock at {} (40-250 ms, 3% errors)",
            upstream.base_url
        );
        Some(mock)
    } else {
        println!("2/5 upstream: {} with your HOLYSHEEP_API_KEY", upstream.base_url);
        None
    };

    let batch_id = format!("demo-{}", chrono::Utc::now().format("%Y%m%d-%H%M%S"));
    let dir = std::env::temp_dir().join(format!("sheepdog-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let input = dir.join("batch.jsonl");
    std::fs::write(&input, DEMO_BATCH)?;
    let opts = super::enqueue::EnqueueOptions {
        max_message_bytes: worker.message.max_message_bytes,
        show_progress: true,
        ..super::enqueue::EnqueueOptions::batch(&batch_id)
    };
    let report = super::enqueue::enqueue_file(&pool, amqp_url, &input, &opts).await?;
    println!(
        "3/5 enqueue: {} jobs published to sheepdog.jobs as batch {batch_id}",
        report.published
    );

    worker.metrics_addr = "off".into();
    worker.concurrency = worker.concurrency.min(16);
    let shutdown = CancellationToken::new();
    let mut handles = Vec::new();
    for i in 0..replicas.max(1) {
        let w = super::build_worker(
            &crate::config::DbArgs::direct(database_url.clone()),
            amqp_url,
            &upstream,
            &worker,
            &Default::default(),
            format!("demo-worker-{i}"),
        )
        .await?;
        let s = shutdown.clone();
        handles.push(tokio::spawn(async move { Arc::clone(&w).run(s).await }));
    }
    println!(
        "4/5 workers: {} replicas, {} jobs in flight each",
        replicas.max(1),
        worker.concurrency
    );

    let status = super::status::wait_for_batch(&pool, &batch_id, true).await?;
    shutdown.cancel();
    for h in handles {
        h.await??;
    }
    // The demo's refused line is recorded `failed` with its reason; its dead letter is the
    // demo's own, so it does not stay in the queue operators watch.
    if let Err(e) = crate::dead::discard(amqp_url, &batch_id).await {
        tracing::debug!(error = %e, "could not clear the demo's dead letters");
    }
    println!("5/5 done\n");
    print!("{}", super::status::render_status(&pool, &status).await?);
    println!(
        "\nThe results are in Postgres; try:\n  psql {} -c \"SELECT custom_id, status, model, cost_usd FROM sheepdog.job_results WHERE batch_id = '{batch_id}' ORDER BY custom_id LIMIT 5\"",
        crate::redact::redact_url(secrecy::ExposeSecret::expose_secret(database_url))
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(ExitCode::SUCCESS)
}
