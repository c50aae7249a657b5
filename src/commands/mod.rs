//! The commands of the `sheepdog` binary.

pub mod bench;
pub mod dead;
pub mod demo;
pub mod enqueue;
pub mod report;
pub mod status;

use std::sync::Arc;

use anyhow::Context;
use secrecy::SecretString;
use sqlx::PgPool;

use crate::config::{UpstreamArgs, WorkerArgs};
use crate::metrics::Metrics;
use crate::prices::PriceTable;
use crate::upstream::Client;
use crate::worker::Worker;

/// `sheepdog migrate`: the database (created if missing), its migrations, and the AMQP topology.
pub async fn migrate(database_url: &SecretString, amqp_url: &SecretString) -> anyhow::Result<PgPool> {
    let pool = crate::store::connect(database_url, 4).await?;
    crate::store::migrate(&pool).await?;
    let conn = crate::amqp::connect(amqp_url, "sheepdog migrate").await?;
    let ch = conn.create_channel().await?;
    crate::amqp::declare_topology(&ch)
        .await
        .context("declaring the AMQP topology")?;
    let _ = conn.close(200, "done".into()).await;
    Ok(pool)
}

/// Checks that `migrate` has run against this database.
pub async fn require_schema(pool: &PgPool) -> anyhow::Result<()> {
    let ok: bool = sqlx::query_scalar("SELECT to_regclass('sheepdog.jobs') IS NOT NULL")
        .fetch_one(pool)
        .await?;
    anyhow::ensure!(ok, "the database has no sheepdog schema: run `sheepdog migrate` first");
    Ok(())
}

/// Builds a replica: its own pool, HTTP client and metrics.
pub async fn build_worker(
    database_url: &SecretString,
    amqp_url: &SecretString,
    upstream: &UpstreamArgs,
    args: &WorkerArgs,
    name: String,
) -> anyhow::Result<Arc<Worker>> {
    let pool = crate::store::connect(database_url, (args.concurrency as u32 / 8).clamp(4, 32)).await?;
    require_schema(&pool).await?;
    let prices = PriceTable::load(args.prices.as_deref())?;
    let client = Client::new(upstream, args.concurrency as usize)?;
    let limiter = crate::limits::Limiter::start(pool.clone()).await?;
    let owner = format!("{name}/{}", uuid::Uuid::new_v4().simple());
    let breaker = crate::limits::breaker::Breaker::start(pool.clone(), args.breaker.clone(), owner).await?;
    Ok(Worker::new(
        pool,
        client,
        prices,
        args.clone(),
        amqp_url.clone(),
        name,
        Arc::new(Metrics::default()),
        limiter,
        breaker,
    ))
}

/// A name for this replica: host and pid.
pub fn replica_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "host".into());
    format!("sheepdog@{host}:{}", std::process::id())
}
