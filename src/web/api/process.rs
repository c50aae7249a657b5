//! A batch's way from `validating` to running, and its end.
//!
//! No half batch is ever called. A batch is created in the sheepdog control `validating`, which
//! dispatch skips; the process that created it holds a lease on it (`LEASE`, renewed as it goes)
//! and (1) reads the whole input file from Postgres and checks every line; a file with any bad
//! line ends the batch `failed` with each line's error, nothing published; (2) registers and
//! publishes every line to `sheepdog.jobs` with publisher confirms; (3) when every line is
//! confirmed, one statement makes the batch `active` (`store::api::activate`). If the process
//! dies anywhere in this, the lease runs out and any API process's upkeep takes the batch over
//! and does it again from the start: publishing a line twice is harmless (a job is its
//! `(batch_id, custom_id)`). A batch cancelled meanwhile stops being published and is not
//! activated.
//!
//! The upkeep (every second, each API process) also ends running batches whose jobs all ended:
//! their output file (lines answered 2xx) and error file (the others) are made then, their bytes
//! counted once; and it deletes files past `SHEEPDOG_API_FILE_TTL`.

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::validate::{Checker, LineError, Lines};
use super::ApiState;
use crate::publish::{Pending, Publisher};
use crate::store::StoreError;

/// How long a batch being validated and published stays with the process doing it without a
/// word from it; then another API process takes it over.
pub const LEASE: Duration = Duration::from_secs(10);
/// The lease is renewed at least this often.
const RENEW: Duration = Duration::from_secs(2);
/// Errors kept in `errors.data` (the first ones; the message says how many there were).
const MAX_ERRORS: usize = 1000;
/// Lines published per round of confirms.
const PUBLISH_CHUNK: usize = 500;
/// An upload whose client (or API process) went away is deleted after this long untouched.
const STALE_UPLOAD: Duration = Duration::from_secs(600);

/// Validates and publishes a batch this process just created, in the background.
pub fn start(api: ApiState, id: String) {
    tokio::spawn(async move {
        let Ok(_permit) = api.0.processing.clone().acquire_owned().await else {
            return;
        };
        run_logged(&api, &id).await;
    });
}

async fn run_logged(api: &ApiState, id: &str) {
    match run(api, id).await {
        Ok(outcome) => tracing::info!(batch = %id, outcome, "batch validated"),
        Err(e) => {
            tracing::warn!(batch = %id, error = %crate::redact::scrub(&format!("{e:#}"), &api.0.amqp_url), "validating or publishing a batch failed; it is taken up again when its lease runs out");
            let _ = crate::store::api::release(&api.0.pool, id, &api.0.me).await;
        }
    }
}

/// Keeps the lease, or says it is lost.
struct Lease<'a> {
    api: &'a ApiState,
    id: &'a str,
    renewed: Instant,
}

impl Lease<'_> {
    async fn keep(&mut self) -> anyhow::Result<()> {
        if self.renewed.elapsed() >= RENEW {
            anyhow::ensure!(
                crate::store::api::renew(&self.api.0.pool, self.id, &self.api.0.me, LEASE).await?,
                "the lease on the batch was lost to another process"
            );
            self.renewed = Instant::now();
        }
        Ok(())
    }
}

/// Reads an uploaded file's lines a chunk at a time, handing each chunk's lines to `each`.
async fn for_each_line(
    api: &ApiState,
    file_id: &str,
    lease: &mut Lease<'_>,
    mut each: impl FnMut(u64, Result<Vec<u8>, usize>),
) -> anyhow::Result<()> {
    let mut lines = Lines::new(api.0.max_message_bytes);
    for seq in 0.. {
        lease.keep().await?;
        let Some(chunk) = crate::store::api::chunk(&api.0.pool, file_id, seq).await? else {
            break;
        };
        for (n, l) in lines.feed(&chunk) {
            each(n, l);
        }
    }
    for (n, l) in lines.finish() {
        each(n, l);
    }
    Ok(())
}

fn errors_list(errors: &[LineError], more: usize) -> Value {
    let mut data: Vec<Value> = errors
        .iter()
        .map(|e| serde_json::to_value(e).unwrap_or_default())
        .collect();
    if more > 0 {
        data.push(json!({"code": "too_many_errors", "line": null, "param": null,
                         "message": format!("{more} more lines have errors; fix the ones above and look again.")}));
    }
    json!({"object": "list", "data": data})
}

fn batch_error(message: String, param: &str) -> Value {
    json!({"object": "list", "data": [{"code": "invalid_request", "line": null, "message": message, "param": param}]})
}

/// Validates and publishes one batch under this process's lease. Returns what became of it.
async fn run(api: &ApiState, id: &str) -> anyhow::Result<&'static str> {
    let pool = &api.0.pool;
    let mut lease = Lease {
        api,
        id,
        renewed: Instant::now() - RENEW,
    };
    lease.keep().await?;
    let Some(batch) = crate::store::api::batch_any(pool, id).await? else {
        return Ok("gone");
    };
    if batch.phase != "validating" {
        return Ok("already done");
    }
    if crate::store::api::control(pool, id).await?.as_deref() == Some("cancelled") {
        crate::store::api::activate(pool, id).await?;
        return Ok("cancelled while validating");
    }
    let file = match crate::store::api::file(pool, &batch.owner, &batch.input_file_id).await? {
        Some(f) if f.purpose == "batch" => f,
        Some(f) => {
            let msg = format!(
                "File {} has purpose '{}'; a batch's input file has purpose 'batch'.",
                f.id, f.purpose
            );
            crate::store::api::fail(pool, id, &batch_error(msg, "input_file_id")).await?;
            return Ok("failed");
        }
        None => {
            let msg = format!(
                "Cannot find file {}, or this key does not have access to it.",
                batch.input_file_id
            );
            crate::store::api::fail(pool, id, &batch_error(msg, "input_file_id")).await?;
            return Ok("failed");
        }
    };

    // (1) Every line checked before any is published.
    let prices = &api.0.prices;
    let mut checker = Checker::new(&batch.endpoint, id, api.0.max_message_bytes, prices);
    let (mut errors, mut more, mut good) = (Vec::new(), 0usize, 0u64);
    for_each_line(api, &file.id, &mut lease, |n, l| match checker.check(n, &l) {
        Ok(_) => good += 1,
        Err(e) if errors.len() < MAX_ERRORS => errors.push(e),
        Err(_) => more += 1,
    })
    .await?;
    if !errors.is_empty() {
        crate::store::api::fail(pool, id, &errors_list(&errors, more)).await?;
        return Ok("failed");
    }
    if good == 0 {
        crate::store::api::fail(
            pool,
            id,
            &batch_error("The input file has no requests.".into(), "input_file_id"),
        )
        .await?;
        return Ok("failed");
    }

    // (2) Every line published with confirms, a chunk at a time.
    let mut publisher = Publisher::on(pool, &api.0.channels, id);
    let mut checker = Checker::new(&batch.endpoint, id, api.0.max_message_bytes, prices);
    let mut lines = Lines::new(api.0.max_message_bytes);
    let mut chunk: Vec<Pending> = Vec::with_capacity(PUBLISH_CHUNK);
    let mut unconfirmed = 0usize;
    let mut seq = 0;
    loop {
        lease.keep().await?;
        let data = crate::store::api::chunk(pool, &file.id, seq).await?;
        seq += 1;
        let ready = match &data {
            Some(d) => lines.feed(d),
            None => lines.finish(),
        };
        for (n, l) in ready {
            // Checked whole above: a line failing now means the file changed under us.
            let job = checker
                .check(n, &l)
                .map_err(|e| anyhow::anyhow!("line {n}: {}", e.message))?;
            chunk.push(Pending { line: n, job });
            if chunk.len() >= PUBLISH_CHUNK {
                unconfirmed += publisher.flush(&mut chunk).await?.unconfirmed.len();
                lease.keep().await?;
                if crate::store::api::control(pool, id).await?.as_deref() == Some("cancelled") {
                    publisher.close().await;
                    crate::store::api::activate(pool, id).await?;
                    return Ok("cancelled while publishing");
                }
            }
        }
        if data.is_none() {
            break;
        }
    }
    unconfirmed += publisher.flush(&mut chunk).await?.unconfirmed.len();
    publisher.close().await;
    anyhow::ensure!(unconfirmed == 0, "{unconfirmed} lines were not confirmed by the broker");

    // (3) All confirmed: the batch may be called.
    crate::store::api::activate(pool, id).await?;
    Ok("in progress")
}

/// The API process's background work, every second until shutdown.
pub async fn upkeep(api: ApiState, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut files_swept = Instant::now() - Duration::from_secs(60);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = take_over_orphans(&api).await {
            tracing::warn!(error = %e, "looking for batches left validating failed");
        }
        if let Err(e) = end_finished(&api).await {
            tracing::warn!(error = %e, "ending finished batches failed");
        }
        if files_swept.elapsed() >= Duration::from_secs(60) {
            files_swept = Instant::now();
            match crate::store::api::expire_files(&api.0.pool, STALE_UPLOAD).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(files = n, "expired files deleted"),
                Err(e) => tracing::warn!(error = %e, "deleting expired files failed"),
            }
        }
    }
}

/// Takes over batches whose validating process stopped renewing its lease.
async fn take_over_orphans(api: &ApiState) -> Result<(), StoreError> {
    while let Ok(permit) = api.0.processing.clone().try_acquire_owned() {
        let Some(id) = crate::store::api::claim_orphan(&api.0.pool, &api.0.me, LEASE).await? else {
            return Ok(());
        };
        tracing::info!(batch = %id, "taking over a batch left validating");
        let api = api.clone();
        tokio::spawn(async move {
            let _permit = permit;
            run_logged(&api, &id).await;
        });
    }
    Ok(())
}

/// Ends running batches whose every job ended and no call is in flight: makes their output
/// and error files (bytes counted once, here).
async fn end_finished(api: &ApiState) -> Result<(), StoreError> {
    let pool = &api.0.pool;
    let running = crate::store::api::running(pool).await?;
    if running.is_empty() {
        return Ok(());
    }
    for o in crate::store::batches::show_many(pool, &running).await? {
        let c = &o.request_counts;
        let all_ended = c.completed + c.failed + o.cancelled + o.expired >= c.total && o.in_flight == 0;
        if !(all_ended && matches!(o.status.as_str(), "completed" | "expired" | "cancelled")) {
            continue;
        }
        if o.status != "cancelled" {
            crate::store::api::mark_finalizing(pool, &o.id).await?;
        }
        let output = made_file(api, &o.id, true).await?;
        let error = made_file(api, &o.id, false).await?;
        if crate::store::api::finalize(pool, &o.id, output, error, api.0.file_ttl).await? {
            tracing::info!(batch = %o.id, status = %o.status, "batch ended; its output and error files are made");
        }
    }
    Ok(())
}

/// Counts an output (or error) file's lines and bytes, as `files::content` will send them.
async fn made_file(
    api: &ApiState,
    batch: &str,
    output: bool,
) -> Result<Option<crate::store::api::MadeFile>, StoreError> {
    let mut rows = crate::store::api::result_rows(&api.0.pool, batch, output);
    let (mut bytes, mut lines) = (0i64, 0i32);
    let mut buf = Vec::with_capacity(4096);
    while let Some(row) = rows.next().await {
        buf.clear();
        let _ = row?.write_line(&mut buf);
        bytes += buf.len() as i64 + 1;
        lines += 1;
    }
    Ok((lines > 0).then(|| (super::files::new_id("file-"), bytes, lines)))
}
