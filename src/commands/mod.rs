//! The commands of the `sheepdog` binary. Each owns its output and its exit code.

pub mod bench;
pub mod dead;
pub mod demo;
pub mod enqueue;
pub mod limits;
pub mod report;
pub mod status;

use std::sync::Arc;

use anyhow::Context;
use secrecy::SecretString;
use sqlx::PgPool;

use crate::config::{LimitArgs, UpstreamArgs, WorkerArgs};
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

/// Connects to the database and checks that `migrate` has run against it.
pub async fn open_db(database_url: &SecretString) -> anyhow::Result<PgPool> {
    let pool = crate::store::connect(database_url, 2).await?;
    crate::store::require_schema(&pool).await?;
    Ok(pool)
}

/// Builds a replica: its own pool, HTTP client and metrics. Limits given to it (flags or
/// environment) are stored as the shared limits before it exists, so before its first call.
pub async fn build_worker(
    database_url: &SecretString,
    amqp_url: &SecretString,
    upstream: &UpstreamArgs,
    args: &WorkerArgs,
    limits: &LimitArgs,
    name: String,
) -> anyhow::Result<Arc<Worker>> {
    let pool = crate::store::connect(database_url, (args.concurrency as u32 / 8).clamp(4, 32)).await?;
    crate::store::require_schema(&pool).await?;
    let change = limits.change();
    if !change.is_empty() {
        crate::limits::apply(&pool, crate::limits::ALL, &change).await?;
        tracing::info!(?change, "shared limits set from this replica's settings");
    }
    let prices = PriceTable::load(args.prices.as_deref())?;
    let client = Client::new(upstream, args.concurrency as usize)?;
    let replica = crate::store::liveness::register(&pool, &name).await?;
    Ok(Worker::new(
        pool,
        crate::store::connect_options(database_url)?,
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
