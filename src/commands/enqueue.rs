//! `sheepdog enqueue FILE.jsonl --batch ID`: streams an OpenAI Batch input file
//! to `sheepdog.jobs` with publisher confirms.

use std::collections::HashSet;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use lapin::Channel;
use secrecy::SecretString;
use serde_json::Value;
use sqlx::PgPool;

use crate::amqp;
use crate::config::{AmqpArgs, DbArgs, MessageArgs, PricingArgs};
use crate::job::{Job, MAX_BATCH_ID_BYTES};
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
    let pool = super::open_db(&a.db.database_url).await?;
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

/// A valid line, rendered as the message to publish.
pub struct Pending {
    line: u64,
    custom_id: String,
    model: String,
    metadata: Option<Value>,
    payload: Vec<u8>,
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

/// Where a run of `enqueue` publishes: its connection, rebuilt when it breaks.
struct Publisher<'a> {
    pool: &'a PgPool,
    amqp_url: &'a SecretString,
    conn: Option<lapin::Connection>,
    channel: Channel,
    opts: &'a EnqueueOptions<'a>,
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
    let conn = amqp::connect(amqp_url, "sheepdog enqueue").await?;
    let channel = amqp::confirm_channel(&conn).await?;
    let mut publisher = Publisher {
        pool,
        amqp_url,
        conn: Some(conn),
        channel,
        opts,
    };
    let mut report = EnqueueReport::default();
    let mut chunk: Vec<Pending> = Vec::with_capacity(CHUNK);
    for line in lines {
        match line? {
            Line::Refused(r) => report.refused.push(r),
            Line::Valid(v) => chunk.push(v.0),
        }
        if chunk.len() >= CHUNK {
            publisher.flush(&mut chunk, &mut report).await?;
            bar.set_message(format!("{} published", report.published));
        }
    }
    publisher.flush(&mut chunk, &mut report).await?;
    bar.finish_and_clear();
    if let Some(c) = publisher.conn {
        let _ = c.close(200, "done".into()).await;
    }
    Ok(report)
}

impl Pending {
    /// Its line number in the file (1-based).
    pub fn line(&self) -> u64 {
        self.line
    }
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
            let line = match prepare(trimmed, self.batch_id, self.max_message_bytes) {
                Err(reason) => Line::Refused(Refused { line: n, reason }),
                Ok((_, job)) if !self.seen.insert(job.id.custom_id.clone()) => Line::Refused(Refused {
                    line: n,
                    reason: format!("custom_id {:?} appears earlier in the file", job.id.custom_id),
                }),
                Ok((payload, job)) => Line::Valid(Box::new((
                    Pending {
                        line: n,
                        custom_id: job.id.custom_id.clone(),
                        model: job.model.clone(),
                        metadata: job.metadata.clone(),
                        payload,
                    },
                    job,
                ))),
            };
            return Some(Ok(line));
        }
    }
}

/// Validates a line and renders the message: the line with `batch_id` set.
fn prepare(line: &[u8], batch_id: &str, max: usize) -> Result<(Vec<u8>, Job), String> {
    let mut value: Value = serde_json::from_slice(line).map_err(|e| format!("not valid JSON: {e}"))?;
    if let Value::Object(o) = &mut value {
        match o.get("batch_id") {
            None | Some(Value::Null) => {
                o.insert("batch_id".into(), Value::String(batch_id.to_string()));
            }
            Some(Value::String(b)) if b == batch_id => {}
            Some(other) => return Err(format!("batch_id {other} differs from --batch {batch_id:?}")),
        }
    }
    let job = Job::from_value(value.clone()).map_err(|e| e.reason)?;
    let payload = serde_json::to_vec(&value).map_err(|e| e.to_string())?;
    if payload.len() > max {
        return Err(format!(
            "message is {} bytes, larger than the maximum of {max}",
            payload.len()
        ));
    }
    Ok((payload, job))
}

impl Publisher<'_> {
    /// Records a chunk's jobs, then publishes it with confirms, reconnecting and publishing the
    /// unconfirmed lines again up to four rounds.
    async fn flush(&mut self, chunk: &mut Vec<Pending>, report: &mut EnqueueReport) -> anyhow::Result<()> {
        if chunk.is_empty() {
            return Ok(());
        }
        // Rows first: a job is `queued` before any worker can see its message.
        let ids: Vec<String> = chunk.iter().map(|p| p.custom_id.clone()).collect();
        let models: Vec<String> = chunk.iter().map(|p| p.model.clone()).collect();
        let metadata: Vec<Option<Value>> = chunk.iter().map(|p| p.metadata.clone()).collect();
        report.new_jobs +=
            crate::store::intake::register_queued(self.pool, self.opts.batch_id, &ids, &models, &metadata)
                .await
                .context("recording the batch in Postgres")?;

        let mut todo: Vec<&Pending> = chunk.iter().collect();
        for round in 0..4 {
            if round > 0 {
                // The broker went away or refused some: reconnect and publish those again.
                tokio::time::sleep(Duration::from_millis(500 * round)).await;
                match amqp::connect(self.amqp_url, "sheepdog enqueue").await {
                    Ok(c) => match amqp::confirm_channel(&c).await {
                        Ok(ch) => {
                            self.channel = ch;
                            self.conn = Some(c);
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot open a channel; retrying");
                            continue;
                        }
                    },
                    Err(e) => {
                        tracing::warn!(error = %e, "broker unreachable; retrying");
                        continue;
                    }
                }
            }
            let payloads: Vec<&[u8]> = todo.iter().map(|p| p.payload.as_slice()).collect();
            let results = amqp::publish_jobs(&self.channel, &payloads).await;
            let mut failed: Vec<&Pending> = Vec::new();
            for (p, r) in todo.iter().zip(results) {
                match r {
                    Ok(()) => report.published += 1,
                    Err(amqp::PublishError::Unroutable(q)) => {
                        anyhow::bail!("no queue {q} on the broker: run `sheepdog migrate` first")
                    }
                    Err(_) => failed.push(p),
                }
            }
            if failed.is_empty() {
                chunk.clear();
                return Ok(());
            }
            tracing::warn!(lines = failed.len(), "publishes not confirmed; trying again");
            todo = failed;
        }
        report.unconfirmed.extend(todo.iter().map(|p| p.line));
        chunk.clear();
        Ok(())
    }
}
