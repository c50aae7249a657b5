//! `sheepdog batch list|show|cancel|pause|resume|set` (contract §7).

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use rust_decimal::Decimal;

use crate::config::DbArgs;
pub use crate::store::batches::parse_window;
use crate::store::batches::{self, BatchObject, BatchSettings};
use crate::store::Priority;

/// A batch's settings, as `enqueue` and `batch set` take them.
#[derive(Args, Clone, Debug, Default)]
pub struct SettingsArgs {
    /// Its waiting jobs go before those of lower priorities, wherever jobs wait.
    #[arg(long, value_enum)]
    pub priority: Option<Priority>,
    /// Its spend never passes this (each call's worst case is reserved first); its jobs then
    /// wait, they do not fail. 0 removes the cap.
    #[arg(long = "max-cost-usd")]
    pub max_cost_usd: Option<Decimal>,
    /// No call for it starts later than this after it was created (`90s`, `30m`, `24h`, `2d`);
    /// its unfinished jobs then end `expired`.
    #[arg(long = "completion-window", value_parser = parse_window)]
    pub completion_window: Option<Duration>,
}

impl SettingsArgs {
    pub fn settings(&self) -> BatchSettings {
        BatchSettings {
            priority: self.priority,
            max_cost_usd: self.max_cost_usd,
            completion_window: self.completion_window,
        }
    }
}

#[derive(Subcommand)]
pub enum BatchAction {
    /// Every batch: status, counts, cost, priority, cap, deadline.
    List {
        /// Only batches in this status.
        #[arg(long, value_parser = ["validating", "queued", "in_progress", "paused", "cancelling", "cancelled", "expired", "completed", "failed"])]
        status: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: i64,
        #[arg(long, default_value_t = 0)]
        offset: i64,
        /// Print JSON (an array of batch objects).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        db: DbArgs,
    },
    /// One batch, as an OpenAI Batch object (status, request_counts) plus its cost.
    Show {
        id: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        db: DbArgs,
    },
    /// Stop a batch: within seconds no call for it starts; what waits ends `cancelled`.
    Cancel {
        id: String,
        #[command(flatten)]
        db: DbArgs,
    },
    /// Hold a batch's jobs (no call, no attempt used) until it is resumed.
    Pause {
        id: String,
        #[command(flatten)]
        db: DbArgs,
    },
    /// Let a paused batch go on where it stopped.
    Resume {
        id: String,
        #[command(flatten)]
        db: DbArgs,
    },
    /// Change a batch's settings.
    Set {
        id: String,
        #[command(flatten)]
        settings: SettingsArgs,
        #[command(flatten)]
        db: DbArgs,
    },
}

pub async fn run(action: BatchAction) -> anyhow::Result<ExitCode> {
    match action {
        BatchAction::List {
            status,
            limit,
            offset,
            json,
            db,
        } => {
            let pool = super::open_db(&db).await?;
            let rows = batches::list(&pool, status.as_deref(), limit, offset).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                print!("{}", table(&rows));
            }
        }
        BatchAction::Show { id, json, db } => {
            let pool = super::open_db(&db).await?;
            let Some(b) = batches::show(&pool, &id).await? else {
                eprintln!("no batch {id:?}");
                return Ok(ExitCode::from(2));
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&b)?);
            } else {
                print!("{}", details(&b));
            }
        }
        BatchAction::Cancel { id, db } => {
            let pool = super::open_db(&db).await?;
            let c = batches::cancel(&pool, &id).await?;
            if !c.found {
                eprintln!("no batch {id:?}");
                return Ok(ExitCode::from(2));
            }
            // A call granted just before the cancel reaches the upstream within milliseconds:
            // return once it has, so that "no call starts after this returned" holds there.
            tokio::time::sleep(Duration::from_millis(100)).await;
            println!(
                "batch {id}: cancelled; {} waiting job(s) ended cancelled, {} call(s) in flight finish and are recorded",
                c.jobs, c.in_flight
            );
        }
        BatchAction::Pause { id, db } => {
            let pool = super::open_db(&db).await?;
            if !batches::set_paused(&pool, &id, true).await? {
                eprintln!("no batch {id:?} to pause (or it is cancelled)");
                return Ok(ExitCode::from(2));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            println!("batch {id}: paused; its jobs wait without a call until `sheepdog batch resume {id}`");
        }
        BatchAction::Resume { id, db } => {
            let pool = super::open_db(&db).await?;
            if !batches::set_paused(&pool, &id, false).await? {
                eprintln!("no batch {id:?} to resume (or it is cancelled)");
                return Ok(ExitCode::from(2));
            }
            println!("batch {id}: resumed");
        }
        BatchAction::Set { id, settings, db } => {
            let pool = super::open_db(&db).await?;
            let s = settings.settings();
            anyhow::ensure!(
                !s.is_empty(),
                "nothing to set: give --priority, --max-cost-usd or --completion-window"
            );
            batches::set(&pool, &id, &s).await?;
            if let Some(b) = batches::show(&pool, &id).await? {
                print!("{}", table(std::slice::from_ref(&b)));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn when(t: Option<i64>) -> String {
    t.and_then(|t| chrono::DateTime::from_timestamp(t, 0))
        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_else(|| "-".into())
}

/// One batch, a line per figure.
pub fn details(b: &BatchObject) -> String {
    let money = |d: Option<rust_decimal::Decimal>| d.map(|c| c.normalize().to_string()).unwrap_or_else(|| "-".into());
    let rows: [(&str, String); 16] = [
        ("status", b.status.clone()),
        ("total", b.request_counts.total.to_string()),
        ("succeeded", b.request_counts.completed.to_string()),
        ("failed", b.request_counts.failed.to_string()),
        ("cancelled", b.cancelled.to_string()),
        ("expired", b.expired.to_string()),
        ("calls in flight", b.in_flight.to_string()),
        ("upstream calls", b.calls.to_string()),
        ("prompt tokens", b.prompt_tokens.to_string()),
        ("completion tokens", b.completion_tokens.to_string()),
        ("cost (USD)", b.cost_usd.normalize().to_string()),
        ("priority", b.priority.clone()),
        ("cap (USD)", money(b.max_cost_usd)),
        ("created (UTC)", when(Some(b.created_at))),
        ("deadline (UTC)", when(b.expires_at)),
        ("cancelled at (UTC)", when(b.cancelled_at)),
    ];
    let mut o = format!("batch {}\n", b.id);
    for (k, v) in rows {
        o.push_str(&format!("  {k:<20} {v:>19}\n"));
        if k == "cost (USD)" {
            if let (Some(charged), Some(currency)) = (b.cost_charged, &b.currency) {
                let k = format!("charged ({currency})");
                o.push_str(&format!("  {k:<20} {:>19}\n", charged.normalize()));
            }
        }
    }
    if let Some(t) = b.completed_at {
        o.push_str(&format!("  {:<20} {:>19}\n", "ended (UTC)", when(Some(t))));
    }
    o
}

/// Batches as a text table.
pub fn table(rows: &[BatchObject]) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{:<28} {:<11} {:>7} {:>9} {:>6} {:>9} {:>8} {:>14} {:<8} {:>10} {:<19}",
        "batch",
        "status",
        "total",
        "succeeded",
        "failed",
        "cancelled",
        "expired",
        "cost (USD)",
        "priority",
        "cap (USD)",
        "deadline (UTC)"
    );
    for b in rows {
        let _ = writeln!(
            o,
            "{:<28} {:<11} {:>7} {:>9} {:>6} {:>9} {:>8} {:>14} {:<8} {:>10} {:<19}",
            b.id,
            b.status,
            b.request_counts.total,
            b.request_counts.completed,
            b.request_counts.failed,
            b.cancelled,
            b.expired,
            b.cost_usd.normalize(),
            b.priority,
            b.max_cost_usd
                .map(|c| c.normalize().to_string())
                .unwrap_or_else(|| "-".into()),
            when(b.expires_at),
        );
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completion_windows() {
        assert_eq!(parse_window("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_window("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_window("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_window("2d"), Ok(Duration::from_secs(172_800)));
        assert_eq!(parse_window("8"), Ok(Duration::from_secs(8)));
        assert!(parse_window("soon").is_err());
        assert!(parse_window("0s").is_err());
        assert!(parse_window("5w").is_err());
    }
}
