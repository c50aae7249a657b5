//! `sheepdog keys create|list|revoke` (contract §10): producer keys of the Batch API.

use std::process::ExitCode;

use clap::Subcommand;
use rust_decimal::Decimal;

use crate::config::DbArgs;
use crate::limits::BudgetPeriod;

#[derive(Subcommand)]
pub enum KeysAction {
    /// Make a key; it is printed once, as the last line (only its hash is stored).
    Create {
        /// The key's name: it owns the key's files and batches; never reused.
        name: String,
        /// The key's batches together never spend more than this in a period (worst cases
        /// reserved first, like a batch's cap); their jobs then wait.
        #[arg(long = "max-cost-usd")]
        max_cost_usd: Option<Decimal>,
        /// The cap's period (UTC).
        #[arg(long, value_enum, default_value = "total", requires = "max_cost_usd")]
        period: BudgetPeriod,
        #[command(flatten)]
        db: DbArgs,
    },
    /// Every key: name, prefix, cap and its spend, when made, when revoked.
    List {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        db: DbArgs,
    },
    /// Refuse a key from now on (401); its batches already running go on.
    Revoke {
        name: String,
        #[command(flatten)]
        db: DbArgs,
    },
}

pub async fn run(action: KeysAction) -> anyhow::Result<ExitCode> {
    match action {
        KeysAction::Create {
            name,
            max_cost_usd,
            period,
            db,
        } => {
            anyhow::ensure!(
                !name.is_empty() && name.len() <= 64 && !name.contains(char::is_whitespace),
                "a key's name is 1 to 64 characters, without spaces"
            );
            anyhow::ensure!(
                max_cost_usd.is_none_or(|c| c > Decimal::ZERO),
                "--max-cost-usd must be above 0"
            );
            let pool = super::open_db(&db).await?;
            let k = crate::web::auth::new_key();
            let period = period.as_str();
            if !crate::store::api::create_key(&pool, &name, &k.prefix, &k.hash, max_cost_usd, period).await? {
                eprintln!("a key named {name:?} exists already (names are never reused)");
                return Ok(ExitCode::from(2));
            }
            match max_cost_usd {
                Some(c) => println!(
                    "key {name} created, capped at {} USD per {period}; it is shown once:",
                    c.normalize()
                ),
                None => println!("key {name} created; it is shown once:"),
            }
            println!("{}", k.key);
        }
        KeysAction::List { json, db } => {
            let pool = super::open_db(&db).await?;
            let rows = crate::store::api::keys(&pool).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!(
                    "{:<24} {:<14} {:>12} {:<6} {:>14} {:<19} {:<19}",
                    "name", "key", "cap (USD)", "period", "spent (USD)", "created (UTC)", "revoked (UTC)"
                );
                let when = |t: Option<chrono::DateTime<chrono::Utc>>| {
                    t.map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
                        .unwrap_or_else(|| "-".into())
                };
                for k in &rows {
                    println!(
                        "{:<24} {:<14} {:>12} {:<6} {:>14} {:<19} {:<19}",
                        k.name,
                        format!("sd-{}…", k.prefix),
                        k.max_cost_usd
                            .map(|c| c.normalize().to_string())
                            .unwrap_or_else(|| "-".into()),
                        k.period,
                        k.spent_usd.normalize(),
                        when(Some(k.created_at)),
                        when(k.revoked_at),
                    );
                }
            }
        }
        KeysAction::Revoke { name, db } => {
            let pool = super::open_db(&db).await?;
            if !crate::store::api::revoke_key(&pool, &name).await? {
                eprintln!("no live key named {name:?}");
                return Ok(ExitCode::from(2));
            }
            println!("key {name} revoked: it is refused from now on");
        }
    }
    Ok(ExitCode::SUCCESS)
}
