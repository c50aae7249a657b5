//! The one HTTP front of sheepdog. Two faces share it: the dashboard (`dashboard/`, server-rendered
//! pages for operators, contract §9) and the OpenAI Batch API (`api/`, JSON for producers, §10).
//! What they share lives here: serving with graceful shutdown, the lazy database pool with its
//! bounded waits, the error type every handler returns (`error.rs`: one classification, each
//! face renders it its own way) and who is asking (`auth.rs`: producer keys; the dashboard's
//! sign-in sits with the dashboard). `commands/` only parses settings and calls in here.

pub mod api;
pub mod auth;
pub mod dashboard;
pub mod error;

use std::net::SocketAddr;

use axum::Router;
use secrecy::SecretString;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

pub use error::{Face, Problem, WebError};

/// Binds `addr`, prints `<what> on http://ADDR/` (the one line of stdout; tests and scripts read
/// the port from it when `addr` asks for port 0) and serves `router` until `shutdown` is
/// cancelled; then stops taking connections and lets the requests in hand finish.
pub async fn serve(addr: &str, what: &str, router: Router, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
    let local = listener.local_addr()?;
    println!("{what} on http://{local}/");
    tracing::info!(addr = %local, "{what} listening");
    axum::serve(listener, router.into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await?;
    Ok(())
}

/// The pool a web face reads through: connections are made on demand (a face starts, and
/// answers 503, while the database is down), waiting for one gives up after 2 s and a
/// statement after 5 s (`store::dashboard::lazy_pool`), so a request never hangs on the database.
pub fn pool(database_url: &SecretString, max_connections: u32, transaction_pooler: bool) -> anyhow::Result<PgPool> {
    let opts = crate::store::connect_options(database_url)?;
    Ok(crate::store::dashboard::lazy_pool(
        opts,
        max_connections,
        transaction_pooler,
    ))
}
