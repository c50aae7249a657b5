//! Postgres: connecting, migrations, and every SQL statement of sheepdog outside `limits/`.
//! Each statement is whole, binds every value, and lets a constraint or a conditional
//! `UPDATE … WHERE` decide races.

pub mod api;
pub mod batcher;
pub mod batches;
pub mod currency;
pub mod dashboard;
pub mod dispatch;
pub mod estimate;
pub mod intake;
pub mod liveness;
pub mod outbox;
pub mod report;
pub mod settle;
pub mod sql;
pub mod upkeep;

use sql::{query, query_scalar, Standalone, StandaloneRun};
use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use secrecy::{ExposeSecret, SecretString};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgPool};

use crate::redact::{redact_url, scrub};

/// A job's status, as `jobs.status` (and the `job_results` view) stores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::Type, serde::Serialize)]
#[sqlx(type_name = "text", rename_all = "lowercase")]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    /// Recorded by `enqueue`, or waiting in Postgres for its turn, a limit or a retry.
    Queued,
    /// A replica is calling for it.
    Running,
    Succeeded,
    Failed,
    /// Its batch was cancelled before a call for it started.
    Cancelled,
    /// Its batch's deadline passed before a call for it started.
    Expired,
}

impl JobStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
            JobStatus::Expired => "expired",
        }
    }
}

/// A batch's priority: its waiting jobs go before those of lower priorities, wherever jobs wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    High,
    Normal,
    Low,
}

impl Priority {
    /// As stored in `batches.priority`.
    pub fn level(self) -> i16 {
        match self {
            Priority::High => 2,
            Priority::Normal => 1,
            Priority::Low => 0,
        }
    }

    pub fn from_level(level: i16) -> Priority {
        match level {
            l if l >= 2 => Priority::High,
            1 => Priority::Normal,
            _ => Priority::Low,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::High => "high",
            Priority::Normal => "normal",
            Priority::Low => "low",
        }
    }

    /// From its name as batch objects carry it (`high`, `normal`, `low`); `normal` otherwise.
    pub fn from_name(name: &str) -> Priority {
        match name {
            "high" => Priority::High,
            "low" => Priority::Low,
            _ => Priority::Normal,
        }
    }
}

/// A failed statement, told apart by what the caller can do about it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or is restarting: wait and try again.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// The database refused this statement (a bad row, a constraint): retrying will not help.
    #[error("database refused the statement: {0}")]
    Rejected(String),
}

impl StoreError {
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        let unavailable = match &e {
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::Protocol(_) => true,
            // Class 08: connection exceptions; 57P0x: shutting down or starting up;
            // 53300: too many connections; 40001/40P01: serialization failure, deadlock.
            sqlx::Error::Database(d) => d.code().is_some_and(|c| {
                c.starts_with("08") || c.starts_with("57P") || c == "53300" || c == "40001" || c == "40P01"
            }),
            _ => false,
        };
        if unavailable {
            StoreError::Unavailable(e.to_string())
        } else {
            StoreError::Rejected(e.to_string())
        }
    }
}

/// What Postgres says to a new connection, when a pool could only say that it timed out waiting
/// for one (it keeps the reason to itself): too many clients, a role's connection limit, a
/// password. `None` when a new connection opens (the pool's connections are all busy).
async fn why_no_connection(opts: &PgConnectOptions) -> Option<String> {
    use sqlx::Connection;
    match tokio::time::timeout(Duration::from_secs(5), sqlx::PgConnection::connect_with(opts)).await {
        Ok(Ok(c)) => {
            let _ = c.close().await;
            None
        }
        Ok(Err(e)) => Some(e.to_string()),
        Err(_) => Some("no answer within 5 s".into()),
    }
}

/// A failure, with what Postgres says to a new connection where the pool timed out.
pub async fn explain_unavailable(opts: &PgConnectOptions, e: &StoreError) -> StoreError {
    match e {
        StoreError::Unavailable(msg) if msg.contains("pool timed out") => match why_no_connection(opts).await {
            Some(why) => StoreError::Unavailable(format!("{msg}; a new connection gets: {why}")),
            None => StoreError::Unavailable(format!("{msg}: its connections are all busy")),
        },
        other => other.clone(),
    }
}

/// Connections a replica's pool holds at most, whatever its concurrency: admissions (two
/// statements at a time), the outbox, the upkeep and the gauges. With the connection of its
/// rounds ([`round_pool`]) and its life line, a replica holds at most `REPLICA_POOL + 2`.
pub const REPLICA_POOL: u32 = 5;

/// The pool of a replica's rounds of settle and dispatch: one connection (a round at a time),
/// opened on first use by the runtime that uses it (the dispatcher's own).
pub fn round_pool(opts: &PgConnectOptions) -> PgPool {
    pool_options(1).connect_lazy_with(opts.clone())
}

/// sheepdog's pools: at most `max_connections`, and a wait for one bounded at 30 s.
fn pool_options(max_connections: u32) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(max_connections.max(1))
        .acquire_timeout(Duration::from_secs(30))
}

/// Opens a pool to the sheepdog database, creating the database if it is missing. A process
/// talks to Postgres one way: `transaction_pooler` (a pooler in transaction mode in front) holds
/// for every statement it sends (see [`sql`]).
pub async fn connect(url: &SecretString, max_connections: u32, transaction_pooler: bool) -> anyhow::Result<PgPool> {
    sql::set_transaction_pooler(transaction_pooler);
    let shown = redact_url(url.expose_secret());
    let opts = connect_options(url)?;
    // One connection first: a pool retries a refused connection until its timeout and then
    // says only that it timed out, where this says what Postgres answered.
    let first = match tokio::time::timeout(Duration::from_secs(30), sqlx::PgConnection::connect_with(&opts)).await {
        Ok(r) => r,
        Err(_) => Err(sqlx::Error::PoolTimedOut),
    };
    match first {
        Ok(c) => {
            use sqlx::Connection;
            let _ = c.close().await;
        }
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("3D000") => {
            create_database(&opts, &shown).await?;
        }
        Err(e) => return Err(unreachable_db(&shown, &e, url)),
    }
    pool_options(max_connections)
        .connect_with(opts)
        .await
        .map_err(|e| unreachable_db(&shown, &e, url))
}

/// The options a `DATABASE_URL` stands for, with statement logging kept at trace.
pub fn connect_options(url: &SecretString) -> anyhow::Result<PgConnectOptions> {
    let shown = redact_url(url.expose_secret());
    Ok(PgConnectOptions::from_str(url.expose_secret())
        .map_err(|e| {
            anyhow::anyhow!(
                "DATABASE_URL {shown} is not a valid Postgres URL: {}",
                scrub(&e.to_string(), url)
            )
        })?
        // Short statements only: JIT compiling one costs more than running it (300 ms of
        // compilation for a 30 ms read was measured on `limit_usage`).
        .options([("jit", "off")])
        // Named in `pg_stat_activity`, unless the URL names it.
        .application_name(&application_name(url))
        .log_statements(tracing::log::LevelFilter::Trace)
        .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_secs(5)))
}

/// `application_name` from the URL's query, or `sheepdog`.
fn application_name(url: &SecretString) -> String {
    url::Url::parse(url.expose_secret())
        .ok()
        .and_then(|u| {
            u.query_pairs()
                .find(|(k, _)| k == "application_name")
                .map(|(_, v)| v.into_owned())
        })
        .unwrap_or_else(|| "sheepdog".into())
}

async fn create_database(opts: &PgConnectOptions, shown: &str) -> anyhow::Result<()> {
    let name = opts.get_database().unwrap_or("sheepdog").to_string();
    let admin = opts.clone().database("postgres");
    let mut conn = sqlx::PgConnection::connect_with(&admin).await.with_context(|| {
        format!("database in {shown} is missing and the server's `postgres` database cannot be reached to create it")
    })?;
    let sql = format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\""));
    match query(&sql).execute(&mut conn).await {
        Ok(_) => {
            tracing::info!(database = %name, "created the database");
            Ok(())
        }
        // Another replica created it at the same moment.
        Err(sqlx::Error::Database(e)) if matches!(e.code().as_deref(), Some("42P04") | Some("23505")) => Ok(()),
        Err(e) => Err(anyhow::anyhow!("creating database {name}: {e}")),
    }
}

fn unreachable_db(shown: &str, e: &sqlx::Error, url: &SecretString) -> anyhow::Error {
    if let sqlx::Error::Database(d) = e {
        // It answered, and said no (too many clients, a role's limit, a password).
        return anyhow::anyhow!("Postgres at {shown} refuses: {}", scrub(&d.to_string(), url));
    }
    anyhow::anyhow!(
        "cannot reach Postgres at {shown}: {}. Is it running? `scripts/services` starts it \
         (or set DATABASE_URL).",
        scrub(&e.to_string(), url)
    )
}

/// Applies the embedded migrations. sqlx holds an advisory lock meanwhile, so
/// several replicas may run this at once.
pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    sqlx::migrate!("./migrations")
        .run(pool)
        .await
        .context("applying migrations")?;
    Ok(())
}

/// Checks that `migrate` has run against this database.
pub async fn require_schema(pool: &PgPool) -> anyhow::Result<()> {
    let ok: bool = query_scalar("SELECT to_regclass('sheepdog.backlog') IS NOT NULL")
        .one(pool)
        .await?;
    anyhow::ensure!(
        ok,
        "the database has no sheepdog schema, or an old one: run `sheepdog migrate` first"
    );
    Ok(())
}

/// Answers when the database does.
pub async fn ping(pool: &PgPool) -> Result<(), StoreError> {
    query("SELECT 1").run(pool).await?;
    Ok(())
}
