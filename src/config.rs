//! Settings from flags and the environment (contract §2). Every default is stated here, once,
//! in the clap definitions. Secrets are kept as `SecretString` so they never reach a log line
//! through `Debug`.

use std::time::Duration;

use clap::Args;
use rust_decimal::Decimal;
use secrecy::SecretString;

use crate::limits::breaker::BreakerSettings;
use crate::limits::{BudgetPeriod, LimitChange};

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
    /// How DATABASE_URL reaches Postgres: `session` (directly, or a pooler in session mode) or
    /// `transaction` (a pooler in transaction mode, such as PgBouncer's `pool_mode =
    /// transaction`: statements are then sent unprepared, each inside a transaction).
    #[arg(
        long = "database-pool-mode",
        env = "SHEEPDOG_DATABASE_POOL_MODE",
        value_enum,
        default_value = "session"
    )]
    pub pool_mode: PoolMode,
    /// Postgres URL of what needs a session of its own: a replica's life line (its liveness
    /// lock) and `migrate`. Defaults to DATABASE_URL; required with the `transaction` pool mode
    /// (point it at Postgres itself, or at a pool in session mode).
    #[arg(
        long = "session-database-url",
        env = "SHEEPDOG_SESSION_DATABASE_URL",
        hide_env_values = true
    )]
    pub session_database_url: Option<SecretString>,
}

/// How `DATABASE_URL` reaches Postgres.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PoolMode {
    /// Directly, or through a pooler in session mode: one server session per connection.
    Session,
    /// Through a pooler in transaction mode: a connection may reach another server after each
    /// transaction.
    Transaction,
}

impl DbArgs {
    /// A direct connection to `url` (tests, benchmarks).
    pub fn direct(url: SecretString) -> DbArgs {
        DbArgs {
            database_url: url,
            pool_mode: PoolMode::Session,
            session_database_url: None,
        }
    }

    pub fn transaction_pooler(&self) -> bool {
        self.pool_mode == PoolMode::Transaction
    }

    /// The URL for what needs a session of its own. Behind a pooler in transaction mode it must
    /// be given: a session's lock taken through such a pooler stays on a server other clients
    /// then use.
    pub fn session_url(&self) -> anyhow::Result<&SecretString> {
        match (&self.session_database_url, self.pool_mode) {
            (Some(url), _) => Ok(url),
            (None, PoolMode::Session) => Ok(&self.database_url),
            (None, PoolMode::Transaction) => anyhow::bail!(
                "SHEEPDOG_SESSION_DATABASE_URL is required with SHEEPDOG_DATABASE_POOL_MODE=transaction: \
                 a replica's life line holds a session lock (point it at Postgres itself, or at a pool in session mode)"
            ),
        }
    }
}

/// Where the broker lives.
#[derive(Args, Clone, Debug)]
pub struct AmqpArgs {
    /// AMQP URL (amqp:// or amqps://); several, comma-separated, for a cluster.
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

/// Largest job message accepted, in bytes (the worker and `enqueue` share it).
#[derive(Args, Clone, Debug)]
pub struct MessageArgs {
    #[arg(long = "max-message-bytes", env = "SHEEPDOG_MAX_MESSAGE_BYTES", default_value_t = 1024 * 1024)]
    pub max_message_bytes: usize,
}

/// What a job's worst case and cost are computed from (the worker, and `enqueue --dry-run`,
/// which must price as the workers do).
#[derive(Args, Clone, Debug)]
pub struct PricingArgs {
    /// `max_tokens` (`max_completion_tokens` for reasoning models) sent when a job sets none.
    #[arg(
        long = "default-max-tokens",
        env = "SHEEPDOG_DEFAULT_MAX_TOKENS",
        default_value_t = 4096
    )]
    pub default_max_tokens: u32,
    /// Price file in LiteLLM's field names; the built-in table when unset.
    #[arg(long = "prices", env = "SHEEPDOG_PRICES")]
    pub prices: Option<std::path::PathBuf>,
}

/// Settings of one worker replica.
#[derive(Args, Clone, Debug)]
pub struct WorkerArgs {
    /// Upstream calls in flight on this replica.
    #[arg(long = "concurrency", env = "SHEEPDOG_CONCURRENCY", default_value_t = 32)]
    pub concurrency: u16,
    #[command(flatten)]
    pub pricing: PricingArgs,
    #[command(flatten)]
    pub message: MessageArgs,
    /// Upstream calls a job may make before it fails.
    #[arg(long = "max-attempts", env = "SHEEPDOG_MAX_ATTEMPTS", default_value_t = 8)]
    pub max_attempts: u32,
    /// Seconds after a replica dies (its database session gone, no heartbeat) before another
    /// replica takes over its jobs. A live replica's jobs are never taken over.
    #[arg(long = "takeover", env = "SHEEPDOG_TAKEOVER_SECONDS", default_value_t = 5.0)]
    pub takeover_seconds: f64,
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
    pub breaker: BreakerArgs,
}

impl WorkerArgs {
    pub fn takeover(&self) -> Duration {
        Duration::from_secs_f64(self.takeover_seconds.max(1.0))
    }
}

/// Breaker settings (each replica measures its own calls; the breakers are shared).
#[derive(Args, Clone, Debug)]
pub struct BreakerArgs {
    /// Seconds of calls the failure rate is measured over.
    #[arg(
        long = "breaker-window",
        env = "SHEEPDOG_BREAKER_WINDOW_SECONDS",
        default_value_t = 30.0
    )]
    pub window_seconds: f64,
    /// Share of failed calls (5xx, timeouts, connection errors) that opens a breaker.
    #[arg(
        long = "breaker-failure-rate",
        env = "SHEEPDOG_BREAKER_FAILURE_RATE",
        default_value_t = 0.5
    )]
    pub failure_rate: f64,
    /// Calls the window must hold before the rate counts.
    #[arg(long = "breaker-min-calls", env = "SHEEPDOG_BREAKER_MIN_CALLS", default_value_t = 10)]
    pub min_calls: usize,
    /// First cooldown before a probe, in seconds; doubles on each repeated trip.
    #[arg(
        long = "breaker-cooldown",
        env = "SHEEPDOG_BREAKER_COOLDOWN_SECONDS",
        default_value_t = 5.0
    )]
    pub cooldown_seconds: f64,
    /// Longest cooldown, in seconds.
    #[arg(
        long = "breaker-max-cooldown",
        env = "SHEEPDOG_BREAKER_MAX_COOLDOWN_SECONDS",
        default_value_t = 300.0
    )]
    pub max_cooldown_seconds: f64,
}

impl BreakerArgs {
    pub fn settings(&self) -> BreakerSettings {
        BreakerSettings {
            window: Duration::from_secs_f64(self.window_seconds.max(0.1)),
            failure_rate: self.failure_rate,
            min_calls: self.min_calls.max(1),
            cooldown_seconds: self.cooldown_seconds,
            max_cooldown_seconds: self.max_cooldown_seconds,
        }
    }
}

/// Limits shared by every replica (contract §2, §5). Unset means "leave the stored setting as
/// it is"; `0` means unlimited.
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
    /// Budget period (UTC).
    #[arg(long = "budget-period", env = "SHEEPDOG_BUDGET_PERIOD", value_enum)]
    pub budget_period: Option<BudgetPeriod>,
    /// A JSON file of limits per scope (`*` and models), contract §6.
    #[arg(long = "limits-file", env = "SHEEPDOG_LIMITS_FILE")]
    pub limits_file: Option<std::path::PathBuf>,
}

impl LimitArgs {
    /// The all-models limits given as flags or environment variables.
    pub fn change(&self) -> LimitChange {
        LimitChange {
            rpm: self.rpm,
            tpm: self.tpm,
            burst_seconds: self.burst_seconds,
            budget_usd: self.budget_usd,
            budget_period: self.budget_period,
        }
    }

    /// Every scope's limits given: the limits file's, then the flags' and environment's for `*`
    /// over the file's `*`.
    pub fn changes(&self) -> anyhow::Result<Vec<(String, LimitChange)>> {
        let mut all = match &self.limits_file {
            None => Vec::new(),
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| anyhow::anyhow!("reading the limits file {}: {e}", path.display()))?;
                crate::limits::parse_limits_file(&text).map_err(|e| anyhow::anyhow!("{}: {e:#}", path.display()))?
            }
        };
        let own = self.change();
        if !own.is_empty() {
            match all.iter_mut().find(|(s, _)| s == crate::limits::ALL) {
                Some((_, file)) => {
                    file.rpm = own.rpm.or(file.rpm);
                    file.tpm = own.tpm.or(file.tpm);
                    file.burst_seconds = own.burst_seconds.or(file.burst_seconds);
                    file.budget_usd = own.budget_usd.or(file.budget_usd);
                    file.budget_period = own.budget_period.or(file.budget_period);
                }
                None => all.insert(0, (crate::limits::ALL.to_string(), own)),
            }
        }
        Ok(all)
    }
}

/// The settings group `T` as the command line would give it with no flags: the clap
/// definitions are the one place defaults are stated (environment variables still apply).
pub fn defaults<T: Args>() -> T {
    #[derive(clap::Parser)]
    struct Only<T: Args> {
        #[command(flatten)]
        inner: T,
    }
    <Only<T> as clap::Parser>::parse_from(["sheepdog"]).inner
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_come_from_the_clap_definitions() {
        let w: WorkerArgs = defaults();
        assert_eq!(w.concurrency, 32);
        assert_eq!(w.takeover_seconds, 5.0);
        assert_eq!(w.breaker.min_calls, 10);
        let u: UpstreamArgs = defaults();
        assert_eq!(u.http_timeout_seconds, 120.0);
    }
}
