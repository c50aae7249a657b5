//! `sheepdog healthcheck`: asks a running replica whether it is alive (`/healthz`) or ready
//! (`/readyz`), for container health checks in an image that has no shell and no curl.

use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

#[derive(Args)]
pub struct HealthcheckArgs {
    /// The replica's health and metrics address (its `SHEEPDOG_METRICS_ADDR`); a replica listening
    /// on every interface (`0.0.0.0`) is asked on 127.0.0.1.
    #[arg(long, env = "SHEEPDOG_METRICS_ADDR", default_value = "127.0.0.1:9090")]
    pub addr: String,
    /// Ask `/readyz` (can it take jobs now) instead of `/healthz` (is it alive).
    #[arg(long)]
    pub ready: bool,
}

/// Exit 0 when the replica answers 200, 1 otherwise (with the reason on stderr).
pub async fn run(a: HealthcheckArgs) -> anyhow::Result<ExitCode> {
    let addr = a
        .addr
        .replacen("0.0.0.0:", "127.0.0.1:", 1)
        .replacen("[::]:", "[::1]:", 1);
    let path = if a.ready { "readyz" } else { "healthz" };
    let url = format!("http://{addr}/{path}");
    let client = reqwest::Client::builder().timeout(Duration::from_secs(5)).build()?;
    match client.get(&url).send().await {
        Ok(r) if r.status().is_success() => Ok(ExitCode::SUCCESS),
        Ok(r) => {
            let status = r.status();
            let body = r.text().await.unwrap_or_default();
            eprintln!("{url}: {status}: {}", body.trim());
            Ok(ExitCode::FAILURE)
        }
        Err(e) => {
            eprintln!("{url}: no answer: {e}");
            Ok(ExitCode::FAILURE)
        }
    }
}
