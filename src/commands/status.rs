//! `sheepdog status` and `sheepdog export`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use futures::TryStreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use sqlx::PgPool;

use crate::config::DbArgs;
use crate::store::report::{self, BatchStatus};

#[derive(Args)]
pub struct StatusArgs {
    #[arg(long)]
    pub batch: String,
    /// Block with a progress bar until every job has ended.
    #[arg(long)]
    pub wait: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub db: DbArgs,
}

pub async fn run(a: StatusArgs) -> anyhow::Result<ExitCode> {
    let pool = super::open_db(&a.db).await?;
    let s = if a.wait {
        wait_for_batch(&pool, &a.batch, !a.json).await?
    } else {
        report::batch_status(&pool, &a.batch).await?
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        print!("{}", render_status(&pool, &s).await?);
        print!("\n{}", super::limits::render(&pool).await?);
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
pub struct ExportArgs {
    #[arg(long)]
    pub batch: String,
    #[arg(long)]
    pub out: PathBuf,
    /// Also write the lines of jobs that did not succeed here (OpenAI's error file).
    #[arg(long)]
    pub errors: Option<PathBuf>,
    #[command(flatten)]
    pub db: DbArgs,
}

pub async fn run_export(a: ExportArgs) -> anyhow::Result<ExitCode> {
    let pool = super::open_db(&a.db).await?;
    let (n, n_err) = export(&pool, &a.batch, &a.out, a.errors.as_deref()).await?;
    println!("wrote {n} lines to {}", a.out.display());
    if let Some(e) = &a.errors {
        println!("wrote {n_err} lines of jobs that did not succeed to {}", e.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// Waits until every job of the batch has ended, showing a progress bar.
pub async fn wait_for_batch(pool: &PgPool, batch_id: &str, show_progress: bool) -> anyhow::Result<BatchStatus> {
    let bar = if show_progress {
        ProgressBar::new(0)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{spinner} {prefix} [{bar:40}] {pos}/{len} done {msg} ({eta})")
            .unwrap()
            .progress_chars("=> "),
    );
    bar.set_prefix(batch_id.to_string());
    loop {
        let s = report::batch_status(pool, batch_id).await?;
        bar.set_length(s.total as u64);
        bar.set_position((s.total - s.pending) as u64);
        bar.set_message(format!("{} failed, ${}", s.failed, s.cost_usd.round_dp(6)));
        if s.done() {
            bar.finish_and_clear();
            return Ok(s);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn ms(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.0} ms")).unwrap_or_else(|| "-".into())
}

/// Renders a batch's status and its cost by model as text tables.
pub async fn render_status(pool: &PgPool, s: &BatchStatus) -> anyhow::Result<String> {
    let mut o = String::new();
    use std::fmt::Write;
    writeln!(o, "batch {}", s.batch_id)?;
    let rows = [
        ("status", s.status.clone()),
        ("total", s.total.to_string()),
        ("succeeded", s.succeeded.to_string()),
        ("failed", s.failed.to_string()),
        ("cancelled", s.cancelled.to_string()),
        ("expired", s.expired.to_string()),
        ("running", s.running.to_string()),
        ("queued", s.queued.to_string()),
        ("upstream calls", s.attempts.to_string()),
        ("prompt tokens", s.prompt_tokens.to_string()),
        ("completion tokens", s.completion_tokens.to_string()),
        ("cost (USD)", s.cost_usd.normalize().to_string()),
    ];
    for (k, v) in rows {
        writeln!(o, "  {k:<18} {v:>16}")?;
    }
    if s.currency != "USD" || s.cost_charged != s.cost_usd {
        let k = format!("charged ({})", s.currency);
        writeln!(o, "  {k:<18} {:>16}", s.cost_charged.normalize())?;
    }
    let rows = [
        ("latency p50", ms(s.p50_latency_ms)),
        ("latency p95", ms(s.p95_latency_ms)),
        ("latency p99", ms(s.p99_latency_ms)),
    ];
    for (k, v) in rows {
        writeln!(o, "  {k:<18} {v:>16}")?;
    }
    let costs = report::batch_cost_by_model(pool, &s.batch_id).await?;
    if !costs.is_empty() {
        writeln!(
            o,
            "\n  {:<20} {:>7} {:>12} {:>12} {:>16}",
            "model", "calls", "prompt", "completion", "cost (USD)"
        )?;
        for c in &costs {
            writeln!(
                o,
                "  {:<20} {:>7} {:>12} {:>12} {:>16}",
                c.model,
                c.calls,
                c.prompt_tokens,
                c.completion_tokens,
                c.cost_usd.normalize()
            )?;
        }
    }
    let reasons = report::failure_reasons(pool, &s.batch_id, 5).await?;
    if !reasons.is_empty() {
        writeln!(o, "\n  failures:")?;
        for (r, n) in reasons {
            writeln!(o, "  {n:>7}  {}", crate::upstream::error::truncate(&r, 120))?;
        }
    }
    Ok(o)
}

/// `sheepdog export`: OpenAI Batch output lines for the batch's ended jobs; with `errors`, the
/// lines of jobs that did not succeed also go to that file (OpenAI's error file). Returns how
/// many lines were written to `out`, and to `errors`.
pub async fn export(pool: &PgPool, batch_id: &str, out: &Path, errors: Option<&Path>) -> anyhow::Result<(u64, u64)> {
    let open = |path: &Path| -> anyhow::Result<(std::path::PathBuf, std::io::BufWriter<std::fs::File>)> {
        let tmp = path.with_extension("jsonl.partial");
        let file = std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        Ok((tmp, std::io::BufWriter::new(file)))
    };
    let (tmp, mut w) = open(out)?;
    let mut err = errors.map(open).transpose()?;
    let mut rows = report::export_rows(pool, batch_id);
    let (mut n, mut n_err) = (0u64, 0u64);
    while let Some(r) = rows.try_next().await? {
        r.write_line(&mut w)?;
        w.write_all(b"\n")?;
        n += 1;
        if let (Some((_, e)), false) = (err.as_mut(), r.status == crate::store::JobStatus::Succeeded) {
            r.write_line(&mut *e)?;
            e.write_all(b"\n")?;
            n_err += 1;
        }
    }
    w.flush()?;
    drop(w);
    std::fs::rename(&tmp, out).with_context(|| format!("writing {}", out.display()))?;
    if let (Some((tmp, mut e)), Some(path)) = (err, errors) {
        e.flush()?;
        drop(e);
        std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok((n, n_err))
}
