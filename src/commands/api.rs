//! `sheepdog api` (contract §10): its settings; the endpoints are `web::api`.

use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

use crate::config::{AmqpArgs, DbArgs, MessageArgs};
use crate::prices::PriceTable;

#[derive(Args)]
pub struct ApiArgs {
    /// Address to serve the OpenAI Batch API on (`/v1/files`, `/v1/batches`, `/healthz`).
    #[arg(long, env = "SHEEPDOG_API_ADDR", default_value = "127.0.0.1:8080")]
    pub addr: String,
    /// Files, uploaded and made (output, error), are deleted this long after they were made
    /// (`90s`, `30m`, `24h`, `30d`); `off` keeps them until `DELETE /v1/files/{id}`.
    #[arg(long = "file-ttl", env = "SHEEPDOG_API_FILE_TTL", default_value = "30d", value_parser = parse_ttl)]
    pub file_ttl: Ttl,
    /// A create equal to an earlier one of the same key within this window (same input file,
    /// endpoint, window, metadata and sheepdog fields) returns that batch instead of a second.
    #[arg(
        long = "same-create-window",
        env = "SHEEPDOG_API_SAME_CREATE_WINDOW",
        default_value = "10m",
        value_parser = crate::store::batches::parse_window
    )]
    pub same_create_window: Duration,
    /// Price file in LiteLLM's field names (a line whose model has no price is refused).
    #[arg(long = "prices", env = "SHEEPDOG_PRICES")]
    pub prices: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub message: MessageArgs,
    #[command(flatten)]
    pub db: DbArgs,
    #[command(flatten)]
    pub amqp: AmqpArgs,
}

/// A file lifetime, or none.
#[derive(Clone, Copy, Debug)]
pub struct Ttl(pub Option<Duration>);

fn parse_ttl(s: &str) -> Result<Ttl, String> {
    if s.eq_ignore_ascii_case("off") {
        return Ok(Ttl(None));
    }
    crate::store::batches::parse_window(s).map(|d| Ttl(Some(d)))
}

/// Serves until SIGTERM/SIGINT, then exits 0.
pub async fn run(a: ApiArgs) -> anyhow::Result<ExitCode> {
    let pool = super::open_db(&a.db).await?;
    pool.close().await;
    let settings = crate::web::api::Settings {
        addr: a.addr,
        transaction_pooler: a.db.transaction_pooler(),
        database_url: a.db.database_url,
        amqp_url: a.amqp.amqp_url,
        prices: PriceTable::load(a.prices.as_deref())?,
        max_message_bytes: a.message.max_message_bytes,
        file_ttl: a.file_ttl.0,
        same_create_within: a.same_create_window,
    };
    crate::web::api::serve(settings, super::shutdown_on_signals()).await?;
    Ok(ExitCode::SUCCESS)
}
