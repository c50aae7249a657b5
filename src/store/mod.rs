//! Postgres: connecting, migrations, and every SQL statement of the job path.
//! Each statement is whole, binds every value, and lets a constraint or a
//! conditional `UPDATE … WHERE` decide races.

pub mod batcher;
pub mod jobs;
pub mod report;

use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use secrecy::{ExposeSecret, SecretString};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgPool};

/// The URL with any password replaced by `***`, for messages.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            u.to_string()
        }
        Err(_) => "<unparsable URL>".to_string(),
    }
}

/// Opens a pool to the sheepdog database, creating the database if it is missing.
pub async fn connect(url: &SecretString, max_connections: u32) -> anyhow::Result<PgPool> {
    let shown = redact_url(url.expose_secret());
    let opts = PgConnectOptions::from_str(url.expose_secret())
        .map_err(|e| {
            anyhow::anyhow!(
                "DATABASE_URL {shown} is not a valid Postgres URL: {}",
                scrub(&e.to_string(), url)
            )
        })?
        .log_statements(tracing::log::LevelFilter::Trace)
        .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_secs(5));
    let pool_opts = || {
        PgPoolOptions::new()
            .max_connections(max_connections.max(1))
            .acquire_timeout(Duration::from_secs(30))
    };
    match pool_opts().connect_with(opts.clone()).await {
        Ok(pool) => Ok(pool),
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("3D000") => {
            create_database(&opts, &shown).await?;
            pool_opts()
                .connect_with(opts)
                .await
                .map_err(|e| unreachable_db(&shown, &e, url))
        }
        Err(e) => Err(unreachable_db(&shown, &e, url)),
    }
}

async fn create_database(opts: &PgConnectOptions, shown: &str) -> anyhow::Result<()> {
    let name = opts.get_database().unwrap_or("sheepdog").to_string();
    let admin = opts.clone().database("postgres");
    let mut conn = sqlx::PgConnection::connect_with(&admin).await.with_context(|| {
        format!("database in {shown} is missing and the server's `postgres` database cannot be reached to create it")
    })?;
    let sql = format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\""));
    match sqlx::query(&sql).execute(&mut conn).await {
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
    anyhow::anyhow!(
        "cannot reach Postgres at {shown}: {}. Is it running? `scripts/services` starts it \
         (or set DATABASE_URL).",
        scrub(&e.to_string(), url)
    )
}

/// Removes a secret's password from a message, in case a library echoed it.
pub fn scrub(message: &str, url: &SecretString) -> String {
    match url::Url::parse(url.expose_secret()) {
        Ok(u) => match u.password() {
            Some(p) if !p.is_empty() => message.replace(p, "***"),
            _ => message.to_string(),
        },
        Err(_) => message.to_string(),
    }
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
