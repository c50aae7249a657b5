//! Settings from flags and the environment (contract §2). Secrets are kept as
//! `SecretString` so they never reach a log line through `Debug`.

use std::time::Duration;

use clap::Args;
use rust_decimal::Decimal;
use secrecy::SecretString;

/// Where the database lives.
#[derive(Args, Clone, Debug)]
pub struct DbArgs {
    /// Postgres URL; the database is created if it does not exist.
    #[arg(
        long = "database-url",
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/sheepdog",
        hide_env_values = true
    )]
    pub database_url: SecretString,
}

/// Where the broker lives.
#[derive(Args, Clone, Debug)]
pub struct AmqpArgs {
    /// AMQP URL (amqp:// or amqps://).
    #[arg(
        long = "amqp-url",
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        hide_env_values = true
    )]
    pub amqp_url: SecretString,
}

/// The upstream chat-completions API.
#[derive(Args, Clone, Debug)]
pub struct UpstreamArgs {
    /// Base URL of the OpenAI-compatible API; `/chat/completions` is appended.
    #[arg(
        long = "base-url",
        env = "HOLYSHEEP_BASE_URL",
        default_value = "https://api.holysheep.ai/v1"
    )]
    pub base_url: String,
    /// Bearer key. Never logged, never stored.
    #[arg(long = "api-key", env = "HOLYSHEEP_API_KEY", hide_env_values = true)]
    pub api_key: Option<SecretString>,
    /// Seconds before an upstream call is abandoned as a timeout.
    #[arg(
        long = "http-timeout",
        env = "SHEEPDOG_HTTP_TIMEOUT_SECONDS",
        default_value_t = 120.0
    )]
    pub http_timeout_seconds: f64,
    /// Largest upstream response body accepted, in bytes.
    #[arg(long = "max-response-bytes", env = "SHEEPDOG_MAX_RESPONSE_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub max_response_bytes: usize,
}

impl UpstreamArgs {
    pub fn http_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.http_timeout_seconds.max(0.001))
    }
}

/// Settings of one worker replica.
#[derive(Args, Clone, Debug)]
pub struct WorkerArgs {
    /// Jobs in flight on this replica (also the AMQP prefetch).
    #[arg(long = "concurrency", env = "SHEEPDOG_CONCURRENCY", default_value_t = 32)]
    pub concurrency: u16,
    /// `max_tokens` sent when a job sets none.
    #[arg(
        long = "default-max-tokens",
        env = "SHEEPDOG_DEFAULT_MAX_TOKENS",
        default_value_t = 4096
    )]
    pub default_max_tokens: u32,
    /// Price file in LiteLLM's field names; the built-in table when unset.
    #[arg(long = "prices", env = "SHEEPDOG_PRICES")]
    pub prices: Option<std::path::PathBuf>,
    /// Largest job message accepted, in bytes.
    #[arg(long = "max-message-bytes", env = "SHEEPDOG_MAX_MESSAGE_BYTES", default_value_t = 1024 * 1024)]
    pub max_message_bytes: usize,
    /// Upstream calls a job may make before it fails.
    #[arg(long = "max-attempts", env = "SHEEPDOG_MAX_ATTEMPTS", default_value_t = 8)]
    pub max_attempts: u32,
    /// Seconds a claim on a job lasts; longer than the HTTP timeout, shorter than the
    /// broker's consumer timeout.
    #[arg(long = "lease", env = "SHEEPDOG_LEASE_SECONDS", default_value_t = 300.0)]
    pub lease_seconds: f64,
    /// Longest a job waits in-process for the global limits before it goes back
    /// through a retry queue (so no delivery nears the broker's consumer timeout).
    #[arg(long = "max-wait", env = "SHEEPDOG_MAX_WAIT_SECONDS", default_value_t = 300.0)]
    pub max_wait_seconds: f64,
    /// Seconds given to jobs in hand after SIGTERM before the worker exits anyway.
    #[arg(long = "grace", env = "SHEEPDOG_SHUTDOWN_GRACE_SECONDS", default_value_t = 60.0)]
    pub grace_seconds: f64,
    /// Health and metrics listen address; `off` disables it.
    #[arg(
        long = "metrics-addr",
        env = "SHEEPDOG_METRICS_ADDR",
        default_value = "127.0.0.1:9090"
    )]
    pub metrics_addr: String,
    #[command(flatten)]
    pub breaker: crate::limits::breaker::BreakerArgs,
}

/// Global limits shared by every replica (contract §2, §5). Unset means "leave
/// the stored setting as it is"; `0` means unlimited.
#[derive(Args, Clone, Debug, Default)]
pub struct LimitArgs {
    /// Requests per minute, all replicas together.
    #[arg(long = "rpm", env = "SHEEPDOG_RPM")]
    pub rpm: Option<Decimal>,
    /// Tokens per minute (prompt + completion), all replicas together.
    #[arg(long = "tpm", env = "SHEEPDOG_TPM")]
    pub tpm: Option<Decimal>,
    /// Seconds of a limit that may go at once.
    #[arg(long = "burst-seconds", env = "SHEEPDOG_BURST_SECONDS")]
    pub burst_seconds: Option<Decimal>,
    /// Spend budget in USD, all replicas together (0: unlimited).
    #[arg(long = "budget-usd", env = "SHEEPDOG_BUDGET_USD")]
    pub budget_usd: Option<Decimal>,
    /// Budget period: day, month or total (UTC).
    #[arg(long = "budget-period", env = "SHEEPDOG_BUDGET_PERIOD")]
    pub budget_period: Option<String>,
}

impl LimitArgs {
    /// Whether any limit was given.
    pub fn any(&self) -> bool {
        self.rpm.is_some()
            || self.tpm.is_some()
            || self.burst_seconds.is_some()
            || self.budget_usd.is_some()
            || self.budget_period.is_some()
    }
}
