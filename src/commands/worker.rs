//! `sheepdog worker`: one replica, until SIGTERM/SIGINT.

use std::process::ExitCode;

use clap::Args;

use crate::config::{AmqpArgs, DbArgs, LimitArgs, UpstreamArgs, WorkerArgs};

#[derive(Args)]
pub struct WorkerCommand {
    #[command(flatten)]
    pub db: DbArgs,
    #[command(flatten)]
    pub amqp: AmqpArgs,
    #[command(flatten)]
    pub upstream: UpstreamArgs,
    #[command(flatten)]
    pub worker: WorkerArgs,
    #[command(flatten)]
    pub limits: LimitArgs,
}

pub async fn run(a: WorkerCommand) -> anyhow::Result<ExitCode> {
    let shutdown = super::shutdown_on_signals();
    let w = super::build_worker(
        &a.db,
        &a.amqp.amqp_url,
        &a.upstream,
        &a.worker,
        &a.limits,
        super::replica_name(),
    )
    .await?;
    if a.worker.metrics_addr != "off" {
        match crate::metrics::serve(&a.worker.metrics_addr, w.metrics.clone()).await {
            Ok((_, addr)) => tracing::info!(%addr, "serving /healthz, /readyz, /metrics"),
            Err(e) => tracing::warn!(addr = %a.worker.metrics_addr, error = %e, "cannot serve metrics"),
        }
    }
    tracing::info!(upstream = %w.client.url(), concurrency = a.worker.concurrency, replica = w.replica(), "worker starting");
    w.run(shutdown).await?;
    tracing::info!("worker stopped");
    Ok(ExitCode::SUCCESS)
}
