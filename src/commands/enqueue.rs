//! `sheepdog enqueue FILE.jsonl --batch ID`: streams an OpenAI Batch input file
//! to `sheepdog.jobs` with publisher confirms (`publish`: the validation and the publishing
//! path it shares with the Batch API).

use std::collections::HashSet;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use secrecy::SecretString;
use sqlx::PgPool;

use crate::config::{AmqpArgs, DbArgs, MessageArgs, PricingArgs};
use crate::job::{Job, MAX_BATCH_ID_BYTES};
use crate::publish::{prepare_line_job, Flushed, Pending, Publisher};
use crate::store::batches::BatchSettings;

#[derive(Args)]
pub struct EnqueueArgs {
    /// The JSONL file, one request per line.
    pub file: PathBuf,
    /// The batch these jobs belong to.
    #[arg(long)]
    pub batch: String,
    /// Hide the progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// The batch's priority, spending cap and completion window.
    #[command(flatten)]
    pub settings: super::batch::SettingsArgs,
    /// Check every line and print what the batch would cost and when it would be done, at the
    /// limits in force now; publish nothing, record nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// With --dry-run: print the estimate as one JSON object on one line.
    #[arg(long, requires = "dry_run")]
    pub json: bool,
    /// The price file and default bound, as the workers have them (the estimate prices with them).
    #[command(flatten)]
    pub pricing: PricingArgs,
    #[command(flatten)]
    pub message: MessageArgs,
    #[command(flatten)]
    pub db: DbArgs,
    #[command(flatten)]
    pub amqp: AmqpArgs,
}

/// Publishes the file; exit code 3 when lines were refused, 4 when some were not confirmed.
/// With `--dry-run`, only the estimate (contract §11).
pub async fn run(a: EnqueueArgs) -> anyhow::Result<ExitCode> {
    if a.dry_run {
        return super::estimate::dry_run(&a).await;
    }
    let pool = super::open_db(&a.db).await?;
    let r = enqueue_file(
        &pool,
        &a.amqp.amqp_url,
        &a.file,
        &EnqueueOptions {
            batch_id: &a.batch,
            max_message_bytes: a.message.max_message_bytes,
            settings: a.settings.settings(),
            show_progress: !a.quiet,
        },
    )
    .await?;
    for x in &r.refused {
        eprintln!("line {}: refused: {}", x.line, x.reason);
    }
    if !r.unconfirmed.is_empty() {
        eprintln!(
            "lines not confirmed by the broker (run enqueue again to publish them): {:?}",
            r.unconfirmed
        );
    }
    println!(
        "batch {}: {} published ({} new jobs), {} refused, {} unconfirmed",
        a.batch,
        r.published,
        r.new_jobs,
        r.refused.len(),
        r.unconfirmed.len()
    );
    Ok(if !r.unconfirmed.is_empty() {
        ExitCode::from(4)
    } else if !r.refused.is_empty() {
        ExitCode::from(3)
    } else {
        ExitCode::SUCCESS
    })
}

/// Lines published per round of confirms.
const CHUNK: usize = 2000;

/// A line that was not published, and why.
#[derive(Debug, Clone)]
pub struct Refused {
    pub line: u64,
    pub reason: String,
}

#[derive(Debug, Default)]
pub struct EnqueueReport {
    pub published: u64,
    pub new_jobs: i64,
    pub refused: Vec<Refused>,
    /// Lines the broker never confirmed, after retries.
    pub unconfirmed: Vec<u64>,
}

impl EnqueueReport {
    fn add(&mut self, f: Flushed) {
        self.published += f.published;
        self.new_jobs += f.new_jobs;
        self.unconfirmed.extend(f.unconfirmed);
    }
}

/// How to enqueue a file.
#[derive(Debug, Clone)]
pub struct EnqueueOptions<'a> {
    pub batch_id: &'a str,
    pub max_message_bytes: usize,
    /// The batch's settings, when given (kept as they are otherwise).
    pub settings: BatchSettings,
    pub show_progress: bool,
}

impl<'a> EnqueueOptions<'a> {
    /// A batch with the defaults and no progress bar (tests, demo, bench).
    pub fn batch(batch_id: &'a str) -> Self {
        EnqueueOptions {
            batch_id,
            max_message_bytes: crate::config::defaults::<MessageArgs>().max_message_bytes,
            settings: BatchSettings::default(),
            show_progress: false,
        }
    }
}

/// Publishes every valid line of `path` as a job of the batch.
pub async fn enqueue_file(
    pool: &PgPool,
    amqp_url: &SecretString,
    path: &Path,
    opts: &EnqueueOptions<'_>,
) -> anyhow::Result<EnqueueReport> {
    let batch_id = opts.batch_id;
    let bar = progress_bar(path, opts.show_progress, "enqueue");
    let lines = Lines::open(path, batch_id, opts.max_message_bytes, &bar)?;
    if !opts.settings.is_empty() {
        crate::store::batches::set(pool, batch_id, &opts.settings)
            .await
            .context("setting the batch's priority, cap or deadline")?;
    }
    let mut publisher = Publisher::connect(pool, amqp_url, batch_id, "sheepdog enqueue").await?;
    let mut report = EnqueueReport::default();
    let mut chunk: Vec<Pending> = Vec::with_capacity(CHUNK);
    for line in lines {
        match line? {
            Line::Refused(r) => report.refused.push(r),
            Line::Valid(v) => chunk.push(v.0),
        }
        if chunk.len() >= CHUNK {
            report.add(publisher.flush(&mut chunk).await?);
            bar.set_message(format!("{} published", report.published));
        }
    }
    report.add(publisher.flush(&mut chunk).await?);
    bar.finish_and_clear();
    publisher.close().await;
    Ok(report)
}

/// A bar over the file's bytes (hidden unless `show`).
pub(crate) fn progress_bar(path: &Path, show: bool, what: &str) -> ProgressBar {
    let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    let bar = if show {
        ProgressBar::new(size)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{{spinner}} {what} [{{bar:40}}] {{bytes}}/{{total_bytes}} {{msg}} ({{eta}})"
        ))
        .unwrap()
        .progress_chars("=> "),
    );
    bar
}

/// One line of an input file, checked as `enqueue` checks it.
pub enum Line {
    /// Ready to publish, with its job as the worker will read it.
    Valid(Box<(Pending, Job)>),
    Refused(Refused),
}

/// The lines of an input file, each checked against contract §1 and `--batch` (blank lines
/// skipped, a `custom_id` seen earlier in the file refused), read without holding the file.
pub struct Lines<'a> {
    lines: std::iter::Enumerate<std::io::Split<std::io::BufReader<std::fs::File>>>,
    path: &'a Path,
    batch_id: &'a str,
    max_message_bytes: usize,
    seen: HashSet<String>,
    bar: &'a ProgressBar,
}

impl<'a> Lines<'a> {
    pub fn open(
        path: &'a Path,
        batch_id: &'a str,
        max_message_bytes: usize,
        bar: &'a ProgressBar,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(
            !batch_id.is_empty() && batch_id.len() <= MAX_BATCH_ID_BYTES,
            "--batch must be 1 to {MAX_BATCH_ID_BYTES} bytes"
        );
        let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        Ok(Lines {
            lines: std::io::BufReader::with_capacity(1 << 20, file)
                .split(b'\n')
                .enumerate(),
            path,
            batch_id,
            max_message_bytes,
            seen: HashSet::new(),
            bar,
        })
    }
}

impl Iterator for Lines<'_> {
    type Item = anyhow::Result<Line>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let (i, bytes) = self.lines.next()?;
            let n = i as u64 + 1;
            let bytes = match bytes.with_context(|| format!("reading {}", self.path.display())) {
                Ok(b) => b,
                Err(e) => return Some(Err(e)),
            };
            self.bar.inc(bytes.len() as u64 + 1);
            let trimmed = bytes.trim_ascii();
            if trimmed.is_empty() {
                continue;
            }
            let line = match prepare_line_job(trimmed, self.batch_id, self.max_message_bytes) {
                Err(reason) => Line::Refused(Refused { line: n, reason }),
                Ok((p, _)) if !self.seen.insert(p.custom_id.clone()) => Line::Refused(Refused {
                    line: n,
                    reason: format!("custom_id {:?} appears earlier in the file", p.custom_id),
                }),
                Ok((job, parsed)) => Line::Valid(Box::new((Pending { line: n, job }, parsed))),
            };
            return Some(Ok(line));
        }
    }
}
