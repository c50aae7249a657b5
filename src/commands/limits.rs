//! `sheepdog limits set` and `sheepdog limits show`.

use std::fmt::Write;
use std::process::ExitCode;

use clap::Subcommand;
use rust_decimal::Decimal;
use sqlx::PgPool;

use crate::config::{DbArgs, LimitArgs};
use crate::limits::breaker::BreakerState;

#[derive(Subcommand)]
pub enum LimitsAction {
    /// Change limits; 0 means unlimited, an omitted flag keeps its value.
    Set {
        /// This model's own limits, instead of the all-models ones.
        #[arg(long)]
        model: Option<String>,
        #[command(flatten)]
        limits: LimitArgs,
        #[command(flatten)]
        db: DbArgs,
    },
    /// Current limits and their use.
    Show {
        #[command(flatten)]
        db: DbArgs,
    },
}

pub async fn run(action: LimitsAction) -> anyhow::Result<ExitCode> {
    match action {
        LimitsAction::Set { model, limits, db } => {
            let pool = super::open_db(&db).await?;
            match model {
                Some(model) => {
                    anyhow::ensure!(
                        limits.limits_file.is_none(),
                        "--model sets one model's limits; a limits file names its own scopes"
                    );
                    crate::limits::apply(&pool, &model, &limits.change()).await?;
                }
                None => crate::limits::apply_all(&pool, &limits.changes()?).await?,
            }
            print!("{}", render(&pool).await?);
        }
        LimitsAction::Show { db } => {
            let pool = super::open_db(&db).await?;
            print!("{}", render(&pool).await?);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Every scope's limits, their use in the last minute, budgets, pauses and breakers.
pub async fn render(pool: &PgPool) -> anyhow::Result<String> {
    let scopes = crate::limits::usage(pool).await?;
    let breakers = crate::limits::breaker::read_all(pool).await?;
    let lim = |v: &Option<Decimal>| v.map(|v| v.normalize().to_string()).unwrap_or("unlimited".into());
    let mut o = String::new();
    writeln!(
        o,
        "{:<22} {:>12} {:>14} {:>12} {:>12} {:>14} {:>14}",
        "scope", "requests/min", "tokens/min", "req last min", "tok last min", "budget (USD)", "left (USD)"
    )?;
    for s in &scopes {
        let budget = match s.budget_usd {
            Some(b) => format!("{} /{}", b.normalize(), s.budget_period),
            None => "unlimited".into(),
        };
        let name = if s.scope == "*" {
            "* (all models)"
        } else {
            s.scope.as_str()
        };
        writeln!(
            o,
            "{:<22} {:>12} {:>14} {:>12} {:>12} {:>14} {:>14}",
            name,
            lim(&s.rpm),
            lim(&s.tpm),
            s.requests_last_minute,
            s.tokens_last_minute.normalize(),
            budget,
            s.budget_left_usd
                .map(|l| l.normalize().to_string())
                .unwrap_or_else(|| "-".into()),
        )?;
    }
    if let Some(g) = scopes.iter().find(|s| s.scope == "*") {
        writeln!(o, "burst seconds: {}", g.burst_seconds.normalize())?;
    }
    for s in &scopes {
        if s.budget_usd.is_some() {
            writeln!(
                o,
                "budget {} ({}): spent {} USD, reserved in flight {} USD{}",
                s.scope,
                s.budget_period_key,
                s.budget_spent_usd.normalize(),
                s.budget_reserved_usd.normalize(),
                if s.budget_left_usd.is_some_and(|l| l <= Decimal::ZERO) {
                    ", budget exhausted"
                } else {
                    ""
                }
            )?;
        }
        if let (Some(until), Some(why)) = (s.paused_until, &s.pause_reason) {
            writeln!(o, "{} paused until {}: {why}", s.scope, until.to_rfc3339())?;
        }
    }
    for b in &breakers {
        let since = b.since.to_rfc3339();
        match b.state {
            BreakerState::Closed => writeln!(o, "circuit breaker {}: closed since {since}", b.scope)?,
            state => writeln!(
                o,
                "circuit breaker {}: {} since {since}{}: {}",
                b.scope,
                state.as_str().replace('_', "-"),
                b.open_until
                    .map(|u| format!(", next probe after {}", u.to_rfc3339()))
                    .unwrap_or_default(),
                b.reason.clone().unwrap_or_default()
            )?,
        }
    }
    Ok(o)
}
