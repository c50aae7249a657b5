//! `sheepdog dashboard` (contract §9): its settings; the pages are `web::dashboard`.

use std::process::ExitCode;

use clap::Args;
use secrecy::SecretString;

use crate::config::{AmqpArgs, DbArgs};

#[derive(Args)]
pub struct DashboardArgs {
    /// Address to serve the dashboard on.
    #[arg(long, env = "SHEEPDOG_DASHBOARD_ADDR", default_value = "127.0.0.1:8088")]
    pub addr: String,
    /// Enables the actions (batch cancel, pause, resume, priority; dead-letter replay) for
    /// whoever signs in with it. Without it the dashboard is read-only.
    #[arg(long, env = "SHEEPDOG_DASHBOARD_TOKEN", hide_env_values = true)]
    pub token: Option<SecretString>,
    #[command(flatten)]
    pub db: DbArgs,
    #[command(flatten)]
    pub amqp: AmqpArgs,
}

/// Serves until SIGTERM/SIGINT, then exits 0.
pub async fn run(a: DashboardArgs) -> anyhow::Result<ExitCode> {
    let settings = crate::web::dashboard::Settings {
        addr: a.addr,
        transaction_pooler: a.db.transaction_pooler(),
        database_url: a.db.database_url,
        amqp_url: a.amqp.amqp_url,
        token: a.token,
    };
    crate::web::dashboard::serve(settings, super::shutdown_on_signals()).await?;
    Ok(ExitCode::SUCCESS)
}
