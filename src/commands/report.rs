//! `sheepdog report`: cost and tokens by day, model and batch.

use std::process::ExitCode;

use clap::Args;
use rust_decimal::Decimal;
use serde_json::json;

use crate::config::DbArgs;
use crate::store::report::CostRow;

#[derive(Args)]
pub struct ReportArgs {
    /// First UTC day (YYYY-MM-DD), included.
    #[arg(long)]
    pub since: Option<chrono::NaiveDate>,
    /// Last UTC day (YYYY-MM-DD), included.
    #[arg(long)]
    pub until: Option<chrono::NaiveDate>,
    #[arg(long)]
    pub batch: Option<String>,
    #[arg(long, value_enum, default_value = "table")]
    pub format: Format,
    #[command(flatten)]
    pub db: DbArgs,
}

pub async fn run(a: ReportArgs) -> anyhow::Result<ExitCode> {
    let pool = super::open_db(&a.db.database_url).await?;
    let rows = crate::store::report::cost_report(&pool, a.since, a.until, a.batch.as_deref()).await?;
    print!("{}", render(&rows, a.format));
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Csv,
    Json,
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// Renders the rows and their total.
pub fn render(rows: &[CostRow], format: Format) -> String {
    let total_cost: Decimal = rows.iter().map(|r| r.cost_usd).sum();
    let total = |f: fn(&CostRow) -> i64| rows.iter().map(f).sum::<i64>();
    let (calls, prompt, completion) = (
        total(|r| r.calls),
        total(|r| r.prompt_tokens),
        total(|r| r.completion_tokens),
    );
    match format {
        Format::Json => {
            let v = json!({"rows": rows, "total": {"calls": calls, "prompt_tokens": prompt,
                "completion_tokens": completion, "cost_usd": total_cost.normalize().to_string()}});
            serde_json::to_string_pretty(&v).unwrap() + "\n"
        }
        Format::Csv => {
            let mut o = String::from("day,model,batch_id,calls,prompt_tokens,completion_tokens,cost_usd\n");
            for r in rows {
                o.push_str(&format!(
                    "{},{},{},{},{},{},{}\n",
                    r.day,
                    csv_field(&r.model),
                    csv_field(&r.batch_id),
                    r.calls,
                    r.prompt_tokens,
                    r.completion_tokens,
                    r.cost_usd.normalize()
                ));
            }
            o
        }
        Format::Table => {
            let mut o = format!(
                "{:<10}  {:<20} {:<28} {:>7} {:>12} {:>12} {:>16}\n",
                "day", "model", "batch", "calls", "prompt", "completion", "cost (USD)"
            );
            for r in rows {
                o.push_str(&format!(
                    "{:<10}  {:<20} {:<28} {:>7} {:>12} {:>12} {:>16}\n",
                    r.day.to_string(),
                    r.model,
                    r.batch_id,
                    r.calls,
                    r.prompt_tokens,
                    r.completion_tokens,
                    r.cost_usd.normalize()
                ));
            }
            o.push_str(&format!(
                "{:<10}  {:<20} {:<28} {:>7} {:>12} {:>12} {:>16}\n",
                "total",
                "",
                "",
                calls,
                prompt,
                completion,
                total_cost.normalize()
            ));
            o
        }
    }
}
