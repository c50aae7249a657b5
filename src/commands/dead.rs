//! `sheepdog dead list` and `sheepdog dead replay`: inspect and requeue
//! dead-lettered jobs after their cause is fixed.

use std::process::ExitCode;

use clap::Subcommand;

use crate::config::{AmqpArgs, DbArgs};
pub use crate::dead::{list, replay, DeadLetter, Replayed};

#[derive(Subcommand)]
pub enum DeadAction {
    /// Show dead-lettered jobs and why (they stay in the queue).
    List {
        #[arg(long)]
        batch: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        amqp: AmqpArgs,
    },
    /// Move dead-lettered jobs back to sheepdog.jobs (after fixing their cause).
    Replay {
        #[arg(long)]
        batch: Option<String>,
        #[arg(long, default_value_t = usize::MAX)]
        limit: usize,
        #[command(flatten)]
        db: DbArgs,
        #[command(flatten)]
        amqp: AmqpArgs,
    },
}

pub async fn run(action: DeadAction) -> anyhow::Result<ExitCode> {
    match action {
        DeadAction::List {
            batch,
            limit,
            json,
            amqp,
        } => {
            let rows = list(&amqp.amqp_url, batch.as_deref(), limit).await?;
            if json {
                for r in &rows {
                    println!("{}", serde_json::to_string(r)?);
                }
            } else {
                println!("{:<24} {:<28} {:>8}  reason", "batch", "custom_id", "bytes");
                for r in &rows {
                    println!(
                        "{:<24} {:<28} {:>8}  {}",
                        r.batch_id.as_deref().unwrap_or("-"),
                        r.custom_id.as_deref().unwrap_or("-"),
                        r.bytes,
                        r.reason.as_deref().unwrap_or("-")
                    );
                }
                println!("{} dead letter(s) shown", rows.len());
            }
        }
        DeadAction::Replay { batch, limit, db, amqp } => {
            let pool = super::open_db(&db).await?;
            let r = replay(&pool, &amqp.amqp_url, batch.as_deref(), limit).await?;
            println!(
                "{} replayed to sheepdog.jobs, {} left in sheepdog.dead",
                r.replayed, r.skipped
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
