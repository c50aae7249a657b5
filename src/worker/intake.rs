//! Intake: `sheepdog.jobs` → Postgres.
//!
//! A supervisor owns the AMQP connection and rebuilds connection, channels, qos and consumer
//! after any error. Each delivery is validated and then settled exactly once, through its own
//! acker: acked after its job is stored (or recorded failed and dead-lettered), or nacked back
//! to the queue when the database or the broker failed under it. While the database is down,
//! intake takes nothing. Dead letters go out on the worker's shared channels (`amqp::Channels`);
//! the consumer's channel is its own.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::Channel;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use super::Worker;
use crate::amqp::{self, JOBS_QUEUE};
use crate::job::Job;
use crate::store::intake::{Admission, Admitted};
use crate::store::StoreError;

/// Deliveries a replica holds unacked at most: intake acks within milliseconds, so this
/// bounds memory, not throughput.
fn prefetch(concurrency: u16) -> u16 {
    (concurrency.saturating_mul(2)).clamp(64, 1024)
}

/// What became of a delivery; decided first, then carried out once by `settle_delivery`.
enum Fate {
    Ack,
    /// Back to the queue (the database or broker failed): after a pause, so a lasting fault
    /// is not a hot loop.
    Requeue,
}

pub async fn run(w: Arc<Worker>, stop: CancellationToken) {
    let tracker = TaskTracker::new();
    let mut delays = crate::retry::reconnect();
    while !stop.is_cancelled() {
        match session(&w, &stop, &tracker, &mut delays).await {
            Ok(()) => break,
            Err(e) => {
                w.metrics.health.set_amqp(false);
                let wait = delays.next().unwrap_or(Duration::from_secs(30));
                tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "AMQP session ended; reconnecting");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.cancelled() => {}
                }
            }
        }
    }
    tracker.close();
    let _ = tokio::time::timeout(Duration::from_secs(10), tracker.wait()).await;
    w.metrics.health.set_amqp(false);
}

/// One connection's life. Ok after a clean stop, Err when the connection or channel broke.
async fn session(
    w: &Arc<Worker>,
    stop: &CancellationToken,
    tracker: &TaskTracker,
    delays: &mut crate::retry::Backoff,
) -> anyhow::Result<()> {
    let conn = amqp::connect(&w.amqp_url, &w.name).await?;
    let consume_ch = conn.create_channel().await?;
    consume_ch
        .basic_qos(prefetch(w.args.concurrency), BasicQosOptions::default())
        .await?;
    w.metrics.health.set_amqp(true);
    delays.reset();
    let result = consume(w, stop, tracker, &consume_ch).await;
    if result.is_ok() {
        tracker.close();
        let _ = tokio::time::timeout(Duration::from_secs(10), tracker.wait()).await;
        let _ = tokio::time::timeout(Duration::from_secs(5), conn.close(200, "shutdown".into())).await;
    }
    result
}

async fn consume(
    w: &Arc<Worker>,
    stop: &CancellationToken,
    tracker: &TaskTracker,
    consume_ch: &Channel,
) -> anyhow::Result<()> {
    loop {
        // With the database down there is nowhere to put a job: take none until it answers.
        let mut delays = crate::retry::database();
        while !w.metrics.health.db() {
            let wait = delays.next().unwrap_or(Duration::from_millis(500));
            tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                _ = tokio::time::sleep(wait) => {
                    if crate::store::ping(&w.pool).await.is_ok() {
                        w.database_ok();
                    }
                }
            }
        }
        let tag = format!("{}-{}", w.name, Uuid::new_v4().simple());
        let mut consumer = consume_ch
            .basic_consume(
                JOBS_QUEUE.into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        tracing::info!(worker = %w.name, "consuming {JOBS_QUEUE}");
        let stopping = loop {
            tokio::select! {
                biased;
                _ = stop.cancelled() => break true,
                _ = tokio::time::sleep(Duration::from_millis(500)), if !w.metrics.health.db() => {
                    tracing::warn!("database unreachable: handing back the deliveries not yet stored");
                    break false;
                }
                next = consumer.next() => match next {
                    Some(Ok(delivery)) => {
                        let w = w.clone();
                        tracker.spawn(async move { take_delivery(w, delivery).await });
                    }
                    Some(Err(e)) => return Err(e.into()),
                    None => anyhow::bail!("the broker cancelled the consumer"),
                }
            }
        };
        // Take nothing new; hand back what was prefetched but not yet taken in.
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            consume_ch.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()),
        )
        .await;
        // Read the stream to its end (the cancel-ok): a delivery left unread would stay
        // unacked on this channel for good.
        let drained = tokio::time::timeout(Duration::from_secs(5), async {
            while let Some(d) = consumer.next().await {
                if let Ok(d) = d {
                    let _ = d.nack(requeue()).await;
                }
            }
        })
        .await;
        if drained.is_err() {
            anyhow::bail!("the consumer did not end after basic.cancel; reconnecting so nothing stays unacked");
        }
        if stopping {
            return Ok(());
        }
    }
}

fn requeue() -> BasicNackOptions {
    BasicNackOptions {
        requeue: true,
        ..Default::default()
    }
}

async fn take_delivery(w: Arc<Worker>, delivery: Delivery) {
    let fate = match take_in(&w, &delivery).await {
        Ok(()) => Fate::Ack,
        Err(e) => {
            if let Some(db) = e.downcast_ref::<StoreError>() {
                w.database_failed(db).await;
            }
            tracing::warn!(
                error = format!("{e:#}"),
                "could not take in a delivery; it goes back to the queue"
            );
            Fate::Requeue
        }
    };
    settle_delivery(delivery, fate).await;
}

/// Carries out a delivery's fate, once, on the channel it came from.
async fn settle_delivery(delivery: Delivery, fate: Fate) {
    let settled = match fate {
        Fate::Ack => delivery.ack(BasicAckOptions::default()).await,
        Fate::Requeue => {
            tokio::time::sleep(crate::retry::redelivery_pause()).await;
            delivery.nack(requeue()).await
        }
    };
    match settled {
        Ok(true) => {}
        Ok(false) | Err(_) => {
            tracing::debug!(
                "delivery could not be settled on its channel (connection lost); the broker will redeliver it"
            )
        }
    }
}

/// Validates one message and stores it: as a waiting job, or as a failure with a dead letter.
async fn take_in(w: &Worker, delivery: &Delivery) -> anyhow::Result<()> {
    let job = match Job::parse(&delivery.data, w.args.message.max_message_bytes) {
        Ok(j) => j,
        Err(invalid) => {
            amqp::dead_letter(&*w.channels.get().await?, delivery, &invalid.reason).await?;
            w.metrics
                .jobs_dead_lettered
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if let Some(id) = &invalid.id {
                let err = json!({"code": "invalid_message", "message": invalid.reason});
                crate::store::intake::fail_without_call(&w.pool, id, None, None, &err).await?;
            }
            tracing::warn!(job = invalid.id.as_ref().map(|i| i.to_string()), reason = %invalid.reason, "dead-lettered an invalid message");
            return Ok(());
        }
    };
    let Some(price) = w.prices.get(&job.model) else {
        let reason = format!(
            "model {:?} has no price in the price table; add it to SHEEPDOG_PRICES",
            job.model
        );
        amqp::dead_letter(&*w.channels.get().await?, delivery, &reason).await?;
        w.metrics
            .jobs_dead_lettered
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let err = json!({"code": "unknown_model", "message": reason});
        crate::store::intake::fail_without_call(&w.pool, &job.id, Some(&job.model), job.metadata.as_ref(), &err)
            .await?;
        tracing::warn!(job = %job.id, %reason, "failed before any upstream call");
        return Ok(());
    };
    // The worst case of one call: reserved from every limit before each attempt.
    let request = job.upstream_request(w.args.pricing.default_max_tokens, price.reasoning);
    let prompt = crate::tokens::prompt_reservation(&job.model, crate::tokens::prompt_tokens(&request.body));
    let completion = u64::from(request.max_completion_tokens);
    let reserve_cost_usd = price.worst_case(prompt, completion);
    // Made once, here: every call of the job sends these bytes as they are.
    let request = serde_json::to_vec(&request.body)?;
    let admission = Admission {
        id: job.id.clone(),
        model: job.model.clone(),
        metadata: job.metadata.clone(),
        request,
        reserve_tokens: (prompt + completion) as i64,
        reserve_cost_usd,
    };
    match w.admits.call(admission).await? {
        Admitted::Waiting => w.wake_dispatcher(),
        Admitted::Duplicate => {
            w.metrics
                .jobs_duplicate
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::debug!(job = %job.id, "seen before; acking the duplicate");
        }
    }
    w.database_ok();
    if w.fault.as_deref() == Some("exit-after-admit") {
        tracing::warn!(job = %job.id, "SHEEPDOG_FAULT: exiting after the admission, before the ack");
        std::process::exit(137);
    }
    Ok(())
}
