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
    let pool = super::open_db(&a.db).await?;
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

/// What the rows were charged, by currency (one entry unless the rate changed to another
/// currency within them).
fn charged_by_currency(rows: &[CostRow]) -> std::collections::BTreeMap<&str, Decimal> {
    let mut by = std::collections::BTreeMap::new();
    for r in rows {
        *by.entry(r.currency.as_str()).or_insert(Decimal::ZERO) += r.cost_charged;
    }
    by
}

/// Renders the rows and their total. The charged columns show in the table only when the
/// account is charged other than USD one for one; CSV and JSON always carry them.
pub fn render(rows: &[CostRow], format: Format) -> String {
    let total_cost: Decimal = rows.iter().map(|r| r.cost_usd).sum();
    let total = |f: fn(&CostRow) -> i64| rows.iter().map(f).sum::<i64>();
    let (calls, prompt, completion) = (
        total(|r| r.calls),
        total(|r| r.prompt_tokens),
        total(|r| r.completion_tokens),
    );
    let charged = charged_by_currency(rows);
    let show_charged = rows.iter().any(|r| r.currency != "USD" || r.cost_charged != r.cost_usd);
    match format {
        Format::Json => {
            let charged: serde_json::Map<String, serde_json::Value> = charged
                .iter()
                .map(|(c, v)| (c.to_string(), json!(v.normalize().to_string())))
                .collect();
            let v = json!({"rows": rows, "total": {"calls": calls, "prompt_tokens": prompt,
                "completion_tokens": completion, "cost_usd": total_cost.normalize().to_string(),
                "charged": charged}});
            serde_json::to_string_pretty(&v).unwrap() + "\n"
        }
        Format::Csv => {
            let mut o = String::from(
                "day,model,batch_id,calls,prompt_tokens,completion_tokens,cost_usd,cost_charged,currency\n",
            );
            for r in rows {
                o.push_str(&format!(
                    "{},{},{},{},{},{},{},{},{}\n",
                    r.day,
                    csv_field(&r.model),
                    csv_field(&r.batch_id),
                    r.calls,
                    r.prompt_tokens,
                    r.completion_tokens,
                    r.cost_usd.normalize(),
                    r.cost_charged.normalize(),
                    r.currency
                ));
            }
            o
        }
        Format::Table => {
            let charged_cell = |amount: Decimal, currency: &str| {
                if show_charged {
                    format!(" {:>20}", format!("{} {currency}", amount.normalize()))
                } else {
                    String::new()
                }
            };
            let mut o = format!(
                "{:<10}  {:<20} {:<28} {:>7} {:>12} {:>12} {:>16}{}\n",
                "day",
                "model",
                "batch",
                "calls",
                "prompt",
                "completion",
                "cost (USD)",
                if show_charged {
                    format!(" {:>20}", "charged")
                } else {
                    String::new()
                }
            );
            for r in rows {
                o.push_str(&format!(
                    "{:<10}  {:<20} {:<28} {:>7} {:>12} {:>12} {:>16}{}\n",
                    r.day.to_string(),
                    r.model,
                    r.batch_id,
                    r.calls,
                    r.prompt_tokens,
                    r.completion_tokens,
                    r.cost_usd.normalize(),
                    charged_cell(r.cost_charged, &r.currency)
                ));
            }
            let mut totals: Vec<(&str, Decimal)> = charged.into_iter().collect();
            if totals.is_empty() {
                totals.push(("USD", Decimal::ZERO));
            }
            for (i, (currency, amount)) in totals.into_iter().enumerate() {
                let first = i == 0;
                o.push_str(&format!(
                    "{:<10}  {:<20} {:<28} {:>7} {:>12} {:>12} {:>16}{}\n",
                    if first { "total" } else { "" },
                    "",
                    "",
                    if first { calls.to_string() } else { String::new() },
                    if first { prompt.to_string() } else { String::new() },
                    if first { completion.to_string() } else { String::new() },
                    if first {
                        total_cost.normalize().to_string()
                    } else {
                        String::new()
                    },
                    charged_cell(amount, currency)
                ));
            }
            o
        }
    }
}
