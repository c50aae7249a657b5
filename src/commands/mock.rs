//! `sheepdog mock-upstream`: the stand-in for HolySheep on a socket of its own.

use std::process::ExitCode;

use clap::Args;

use crate::upstream::mock::{MockConfig, MockServer};

#[derive(Args)]
pub struct MockArgs {
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: String,
    #[command(flatten)]
    pub config: MockConfig,
}

pub async fn run(a: MockArgs) -> anyhow::Result<ExitCode> {
    let shutdown = super::shutdown_on_signals();
    let server = MockServer::start(&a.listen, a.config).await?;
    println!("mock upstream listening; set HOLYSHEEP_BASE_URL={}", server.base_url());
    shutdown.cancelled().await;
    Ok(ExitCode::SUCCESS)
}
