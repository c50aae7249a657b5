//! Intake: `sheepdog.jobs` → Postgres.
//!
//! A supervisor owns the AMQP connection and rebuilds connection, channels, qos and consumer
//! after any error. Each delivery is validated and then settled exactly once: acked after its
//! job is stored (or recorded failed and dead-lettered), many deliveries in one ack (`Acks`), or
//! nacked back to the queue, on its own, when the database or the broker failed under it. While
//! the database is down, intake takes nothing. Dead letters go out on the worker's shared
//! channels (`amqp::Channels`); the consumer's channel is its own.

use std::collections::BTreeSet;
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
    let acks = Arc::new(Acks::new(consume_ch.clone()));
    let result = consume(w, stop, tracker, &consume_ch, &acks).await;
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
    acks: &Arc<Acks>,
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
                        let (w, acks) = (w.clone(), acks.clone());
                        acks.taken(delivery.delivery_tag);
                        tracker.spawn(async move { take_delivery(w, delivery, acks).await });
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

async fn take_delivery(w: Arc<Worker>, delivery: Delivery, acks: Arc<Acks>) {
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
    settle_delivery(delivery, fate, &acks).await;
}

/// Carries out a delivery's fate, once, on the channel it came from.
async fn settle_delivery(delivery: Delivery, fate: Fate, acks: &Acks) {
    match fate {
        Fate::Ack => acks.ack(delivery.delivery_tag).await,
        Fate::Requeue => {
            tokio::time::sleep(crate::retry::redelivery_pause()).await;
            let nacked = delivery.nack(requeue()).await;
            if !matches!(nacked, Ok(true)) {
                lost_on_channel();
            }
            acks.settled_alone(delivery.delivery_tag).await;
        }
    }
}

fn lost_on_channel() {
    tracing::debug!("delivery could not be settled on its channel (connection lost); the broker will redeliver it");
}

/// A consuming channel's acks, many in one frame. An ack with `multiple` set covers every
/// delivery of the channel up to its tag, so a delivery whose job is stored is acked together
/// with those before it once none of them is still undecided: an admission group's deliveries
/// go in one ack, where each took a frame of its own, a wake-up of the connection's I/O thread
/// and a write (and the broker a method to handle). A delivery behind an undecided one (its
/// group still committing, or one going back to the queue after a pause) waits for it.
struct Acks {
    ch: Channel,
    state: std::sync::Mutex<AckState>,
}

#[derive(Default)]
struct AckState {
    /// Tags taken from the consumer whose fate is not carried out yet.
    open: BTreeSet<u64>,
    /// Tags to ack, not sent yet.
    ready: BTreeSet<u64>,
    /// A task is sending acks: others leave theirs to it.
    sending: bool,
}

impl Acks {
    fn new(ch: Channel) -> Acks {
        Acks {
            ch,
            state: Default::default(),
        }
    }

    fn taken(&self, tag: u64) {
        self.state.lock().unwrap().open.insert(tag);
    }

    /// Acks `tag`: sent before this returns, or by the task sending at the time (which does not
    /// stop while an ack it may send is left), or by the task of the undecided delivery before
    /// it, when that one is settled.
    async fn ack(&self, tag: u64) {
        {
            let mut s = self.state.lock().unwrap();
            s.open.remove(&tag);
            s.ready.insert(tag);
            if s.sending {
                return;
            }
            s.sending = true;
        }
        // The rest of this delivery's admission group is being woken too: let them add theirs.
        tokio::task::yield_now().await;
        self.send().await;
    }

    /// `tag` was settled on its own (nacked): the acks that waited for it may go.
    async fn settled_alone(&self, tag: u64) {
        {
            let mut s = self.state.lock().unwrap();
            s.open.remove(&tag);
            if s.sending || s.ready.is_empty() {
                return;
            }
            s.sending = true;
        }
        self.send().await;
    }

    /// Sends what can go (every ready tag below the first open one, in one ack) until nothing
    /// can; then hands the sending back.
    async fn send(&self) {
        loop {
            let upto = {
                let mut s = self.state.lock().unwrap();
                let first_open = s.open.first().copied().unwrap_or(u64::MAX);
                match s.ready.range(..first_open).next_back().copied() {
                    Some(t) => {
                        s.ready = s.ready.split_off(&(t + 1));
                        t
                    }
                    None => {
                        s.sending = false;
                        return;
                    }
                }
            };
            let multiple = BasicAckOptions { multiple: true };
            if self.ch.basic_ack(upto, multiple).await.is_err() {
                lost_on_channel();
            }
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
