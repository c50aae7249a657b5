//! The pipeline of one replica: deliver → parse → claim → call → record → ack.
//!
//! A supervisor owns the AMQP connection and rebuilds connection, channels, qos
//! and consumer after any error. Each delivery is handled by its own task and
//! settled exactly once — acked after its result (or failure, or dead letter, or
//! hand-back through a retry queue) is durable, or left unacked for the broker
//! to redeliver. A delivery is only ever acked through its own acker, i.e. on
//! the channel it came from.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::Channel;
use rand::Rng;
use secrecy::SecretString;
use serde_json::{json, Value};
use sqlx::PgPool;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::amqp::{self, DEAD_QUEUE, ERROR_HEADER, JOBS_QUEUE, RETRIES_HEADER};
use crate::config::WorkerArgs;
use crate::job::{Job, JobId};
use crate::limits::breaker::Breaker;
use crate::limits::{Acquired, Limiter};
use crate::metrics::Metrics;
use crate::prices::{PriceTable, Usage};
use crate::store::batcher::Batcher;
use crate::store::jobs::{self as store, AttemptRequest, Begin, JobEnd, Reservation, Settlement};
use crate::upstream::{Attempt, Client, Verdict};

/// Everything a replica's tasks share.
pub struct Worker {
    pub pool: PgPool,
    pub client: Client,
    pub prices: PriceTable,
    pub args: WorkerArgs,
    pub amqp_url: SecretString,
    pub name: String,
    pub metrics: Arc<Metrics>,
    /// Claims held by this replica's tasks, released if shutdown cuts them short.
    in_hand: Mutex<HashMap<Uuid, JobId>>,
    /// Fault injection for the crash tests (`SHEEPDOG_FAULT=exit-after-commit`:
    /// the process exits right after its first result commits, before the ack).
    fault: Option<String>,
    /// Claims and settlements of concurrent jobs, written many per statement.
    claims: Batcher<AttemptRequest, Begin>,
    settles: Batcher<Settlement, ()>,
    /// The global limits.
    pub limiter: Arc<Limiter>,
    /// Why this replica takes no jobs, while it takes none.
    pause: watch::Sender<Option<Pause>>,
    /// The circuit breaker shared by every replica.
    pub breaker: Arc<Breaker>,
}

/// Why a replica stopped taking jobs, and what ends it.
#[derive(Debug, Clone, PartialEq)]
pub struct Pause {
    pub reason: String,
    pub cause: PauseCause,
}

#[derive(Debug, Clone, PartialEq)]
pub enum PauseCause {
    /// The budget is spent: resume once it has room for this much (the refused
    /// job's worst case).
    Budget(rust_decimal::Decimal),
    /// The shared circuit breaker is not closed: resume when it closes (or probe it).
    Breaker,
    /// The database cannot be reached: resume when it answers.
    Database,
}

/// How a delivery ends.
enum Settle {
    Ack,
    /// Hand it back to the queue unacked (a pause): no attempt used.
    Requeue,
}

fn requeue() -> BasicNackOptions {
    BasicNackOptions {
        requeue: true,
        ..Default::default()
    }
}

impl Worker {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        pool: PgPool,
        client: Client,
        prices: PriceTable,
        args: WorkerArgs,
        amqp_url: SecretString,
        name: String,
        metrics: Arc<Metrics>,
        limiter: Arc<Limiter>,
        breaker: Arc<Breaker>,
    ) -> Arc<Worker> {
        let fault = std::env::var("SHEEPDOG_FAULT").ok().filter(|f| !f.is_empty());
        let parallel = (pool.options().get_max_connections() as usize / 3).max(2);
        let p = pool.clone();
        let claims = Batcher::new(128, parallel, move |reqs| {
            let p = p.clone();
            async move { store::begin_attempts(&p, reqs).await }
        });
        let p = pool.clone();
        let settles = Batcher::new(128, parallel, move |items| {
            let p = p.clone();
            async move { store::settle_many(&p, items).await }
        });
        Arc::new(Worker {
            pool,
            client,
            prices,
            args,
            amqp_url,
            name,
            metrics,
            in_hand: Mutex::new(HashMap::new()),
            fault,
            claims,
            settles,
            limiter,
            pause: watch::channel(None).0,
            breaker,
        })
    }

    /// Consumes until `shutdown` fires, then finishes the jobs in hand (within the
    /// grace period) and returns.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) -> anyhow::Result<()> {
        crate::tokens::warm_up();
        self.metrics.db_ok.store(true, Ordering::Relaxed);
        let watcher = tokio::spawn(self.clone().follow_breaker());
        let tracker = TaskTracker::new();
        let mut backoff = Duration::from_millis(200);
        while !shutdown.is_cancelled() {
            match self.clone().session(&shutdown, &tracker, &mut backoff).await {
                Ok(()) => break,
                Err(e) => {
                    self.metrics.amqp_connected.store(false, Ordering::Relaxed);
                    let wait = backoff.mul_f64(0.5 + rand::rng().random::<f64>() * 0.5);
                    tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "AMQP session ended; reconnecting");
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = shutdown.cancelled() => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
        tracker.close();
        watcher.abort();
        self.metrics.amqp_connected.store(false, Ordering::Relaxed);
        Ok(())
    }

    fn pause_for_breaker(&self, view: &crate::limits::breaker::BreakerView) {
        let reason = format!(
            "circuit breaker {} since {}: {}",
            view.state.replace('_', "-"),
            view.since.map(|s| s.to_rfc3339()).unwrap_or_default(),
            view.reason.clone().unwrap_or_default()
        );
        self.pause.send_if_modified(|p| match p {
            Some(p) if p.cause == PauseCause::Breaker => {
                let changed = p.reason != reason;
                p.reason = reason.clone();
                changed
            }
            Some(_) => false,
            None => {
                *p = Some(Pause {
                    reason: reason.clone(),
                    cause: PauseCause::Breaker,
                });
                true
            }
        });
    }

    /// Whether this replica is paused now, counting a breaker that opened since
    /// the last notification (it becomes this replica's pause).
    fn paused_now(&self) -> bool {
        let view = self.breaker.view();
        if !view.closed() {
            self.pause_for_breaker(&view);
        }
        self.pause.borrow().is_some()
    }

    /// Pauses this replica while the shared breaker is not closed, and resumes
    /// it when the breaker closes.
    async fn follow_breaker(self: Arc<Self>) {
        let mut rx = self.breaker.subscribe();
        loop {
            let view = rx.borrow_and_update().clone();
            self.metrics.set_breaker(&view);
            if view.closed() {
                self.pause.send_if_modified(|p| {
                    let ours = p.as_ref().is_some_and(|p| p.cause == PauseCause::Breaker);
                    if ours {
                        tracing::info!("circuit breaker closed: resuming");
                        *p = None;
                    }
                    ours
                });
            } else {
                self.pause_for_breaker(&view);
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// One connection's life. Returns Ok after a clean shutdown, Err when the
    /// connection or channel broke.
    async fn session(
        self: Arc<Self>,
        shutdown: &CancellationToken,
        tracker: &TaskTracker,
        backoff: &mut Duration,
    ) -> anyhow::Result<()> {
        let conn = amqp::connect(&self.amqp_url, &self.name).await?;
        let consume_ch = conn.create_channel().await?;
        consume_ch
            .basic_qos(self.args.concurrency.max(1), BasicQosOptions::default())
            .await?;
        let publish_ch = amqp::confirm_channel(&conn).await?;
        self.metrics.amqp_connected.store(true, Ordering::Relaxed);
        *backoff = Duration::from_millis(200);
        let mut pause_rx = self.pause.subscribe();
        let gauges = tokio::spawn(self.clone().gauges(conn.create_channel().await?));

        'consume: loop {
            // Paused (budget, breaker, account, database): take nothing until resumed.
            loop {
                self.paused_now();
                let Some(pause) = pause_rx.borrow_and_update().clone() else {
                    break;
                };
                self.metrics.set_paused(Some(pause.reason.clone()));
                tokio::select! {
                    _ = shutdown.cancelled() => break 'consume,
                    _ = pause_rx.changed() => {}
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {
                        self.clone().try_resume(&pause, &consume_ch, &publish_ch).await
                    }
                }
            }
            self.metrics.set_paused(None);

            let tag = format!("{}-{}", self.name, Uuid::new_v4().simple());
            let mut consumer = consume_ch
                .basic_consume(
                    JOBS_QUEUE.into(),
                    tag.as_str().into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            tracing::info!(worker = %self.name, prefetch = self.args.concurrency, "consuming {JOBS_QUEUE}");
            let stop_shutdown = loop {
                tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => break true,
                    _ = pause_rx.changed() => {
                        if let Some(p) = pause_rx.borrow().clone() {
                            tracing::warn!(reason = %p.reason, "pausing: taking no jobs and handing back the ones not started");
                            break false;
                        }
                    }
                    next = consumer.next() => match next {
                        Some(Ok(delivery)) => {
                            let w = self.clone();
                            let ch = publish_ch.clone();
                            tracker.spawn(async move { w.handle(delivery, ch, false).await });
                        }
                        Some(Err(e)) => return Err(e.into()),
                        None => anyhow::bail!("the broker cancelled the consumer"),
                    }
                }
            };
            // Take nothing new; hand back what was prefetched but not started.
            let _ = consume_ch
                .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
                .await;
            // Read the stream to its end (the cancel-ok): a delivery left unread
            // would stay unacked on this channel for good.
            let drained = tokio::time::timeout(Duration::from_secs(5), async {
                while let Some(d) = consumer.next().await {
                    if let Ok(d) = d {
                        let _ = d.nack(requeue()).await;
                    }
                }
            })
            .await;
            if drained.is_err() && !stop_shutdown {
                anyhow::bail!("the consumer did not end after basic.cancel; reconnecting so nothing stays unacked");
            }
            if stop_shutdown {
                break;
            }
        }

        // Shutdown: finish what is in hand, then close.
        tracing::info!(
            in_flight = self.metrics.in_flight.load(Ordering::Relaxed),
            "stopping: no new jobs; finishing the ones in hand"
        );
        tracker.close();
        let grace = Duration::from_secs_f64(self.args.grace_seconds.max(0.0));
        if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
            let held: Vec<(Uuid, JobId)> = self.in_hand.lock().unwrap().drain().collect();
            tracing::warn!(
                jobs = held.len(),
                "grace period over; handing back the jobs still in hand"
            );
            for (token, id) in held {
                let _ = store::release(&self.pool, &id, token).await;
            }
        }
        gauges.abort();
        let _ = conn.close(200, "shutdown".into()).await;
        Ok(())
    }

    /// Keeps the queue-depth and budget gauges current for `/metrics`.
    async fn gauges(self: Arc<Self>, ch: Channel) {
        loop {
            for q in [JOBS_QUEUE, DEAD_QUEUE] {
                let passive = lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                };
                if let Ok(info) = ch.queue_declare(q.into(), passive, FieldTable::default()).await {
                    self.metrics
                        .queue_depth
                        .lock()
                        .unwrap()
                        .insert(q.to_string(), info.message_count());
                }
            }
            *self.metrics.budget_left_usd.lock().unwrap() = self.limiter.settings().budget_left;
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
    }

    /// Ends a pause once its cause has gone: the budget has room again (the
    /// period rolled over or the budget was raised). For the breaker, when its
    /// cooldown is over, this replica may win the one probe: it takes a single
    /// job with `basic.get` and calls with it.
    async fn try_resume(self: Arc<Self>, pause: &Pause, consume_ch: &Channel, publish_ch: &Channel) {
        if pause.cause == PauseCause::Database {
            if sqlx::query("SELECT 1").execute(&self.pool).await.is_ok() {
                tracing::info!("database reachable again: resuming");
                self.metrics.db_ok.store(true, Ordering::Relaxed);
                self.pause.send_if_modified(|p| p.take().is_some());
            }
            return;
        }
        if pause.cause == PauseCause::Breaker {
            let view = self.breaker.view();
            if view.closed() {
                self.pause.send_if_modified(|p| p.take().is_some());
                return;
            }
            let cooled = view.open_until.is_none_or(|u| u <= chrono::Utc::now());
            // Half-open with a prober that died: the database hands the probe on
            // once its lease is over.
            if (view.state == "open" && cooled) || view.state == "half_open" {
                let lease = self.client.timeout() + Duration::from_secs(10);
                if self.breaker.claim_probe(lease).await {
                    if let Ok(Some(m)) = consume_ch
                        .basic_get(JOBS_QUEUE.into(), lapin::options::BasicGetOptions { no_ack: false })
                        .await
                    {
                        self.clone().handle(m.delivery, publish_ch.clone(), true).await;
                    }
                    // A probe that reached no verdict (no job, or the job went back)
                    // hands the breaker back to `open`; after a verdict this does nothing.
                    self.breaker.release_probe().await;
                }
            }
            return;
        }
        if let PauseCause::Budget(cost) = pause.cause {
            match self.limiter.budget_has_room(cost).await {
                Ok(true) => {
                    tracing::info!("budget has room again; resuming");
                    self.pause.send_if_modified(|p| p.take().is_some());
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "cannot read the budget; staying paused"),
            }
        }
    }

    async fn handle(self: Arc<Self>, delivery: Delivery, publish_ch: Channel, probe: bool) {
        self.metrics.in_flight.fetch_add(1, Ordering::Relaxed);
        let result = self.process(&delivery, &publish_ch, probe).await;
        let settled = match result {
            Ok(Settle::Ack) => delivery.ack(BasicAckOptions::default()).await,
            Ok(Settle::Requeue) => delivery.nack(requeue()).await,
            Err(e) => {
                // The database or broker failed under us: leave the job to the
                // broker, after a pause so a persistent fault is not a hot loop.
                tracing::warn!(
                    error = format!("{e:#}"),
                    "could not finish a delivery; it will be redelivered"
                );
                let pause = Duration::from_millis(500 + rand::rng().random_range(0..1500));
                tokio::time::sleep(pause).await;
                delivery.nack(requeue()).await
            }
        };
        match settled {
            Ok(true) => {}
            Ok(false) | Err(_) => tracing::debug!(
                "delivery could not be settled on its channel (connection lost); the broker will redeliver it"
            ),
        }
        self.metrics.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    async fn process(&self, delivery: &Delivery, publish_ch: &Channel, probe: bool) -> anyhow::Result<Settle> {
        let job = match Job::parse(&delivery.data, self.args.max_message_bytes) {
            Ok(j) => j,
            Err(invalid) => {
                let err = json!({"code": "invalid_message", "message": invalid.reason});
                self.dead_letter(publish_ch, delivery, &invalid.reason).await?;
                if let Some(id) = &invalid.id {
                    store::fail_without_call(&self.pool, id, None, None, &err, None).await?;
                }
                tracing::warn!(job = invalid.id.as_ref().map(|i| i.to_string()), reason = %invalid.reason, "dead-lettered an invalid message");
                return Ok(Settle::Ack);
            }
        };
        let Some(price) = self.prices.get(&job.model).cloned() else {
            let reason = format!(
                "model {:?} has no price in the price table; add it to SHEEPDOG_PRICES",
                job.model
            );
            self.dead_letter(publish_ch, delivery, &reason).await?;
            let err = json!({"code": "unknown_model", "message": reason});
            store::fail_without_call(&self.pool, &job.id, Some(&job.model), job.metadata.as_ref(), &err, None).await?;
            tracing::warn!(job = %job.id, %reason, "failed before any upstream call");
            return Ok(Settle::Ack);
        };

        let body = job.upstream_body(self.args.default_max_tokens);
        let prompt_estimate = crate::tokens::prompt_reservation(&job.model, crate::tokens::prompt_tokens(&body));
        let max_completion = job.max_tokens().unwrap_or(self.args.default_max_tokens) as u64;
        let reservation = Reservation {
            tokens: (prompt_estimate + max_completion) as i64,
            cost_usd: price.worst_case(prompt_estimate, max_completion),
            budget_period: None,
        };
        let token = Uuid::new_v4();
        self.in_hand.lock().unwrap().insert(token, job.id.clone());
        let result = self
            .attempts(&job, &body, &price, &reservation, token, delivery, publish_ch, probe)
            .await;
        self.in_hand.lock().unwrap().remove(&token);
        result
    }

    /// Calls the upstream until the job ends or must wait in a retry queue.
    #[allow(clippy::too_many_arguments)]
    async fn attempts(
        &self,
        job: &Job,
        body: &serde_json::Map<String, Value>,
        price: &crate::prices::Price,
        reservation: &Reservation,
        token: Uuid,
        delivery: &Delivery,
        publish_ch: &Channel,
        probe: bool,
    ) -> anyhow::Result<Settle> {
        // Quick in-process retries for blips; longer waits go through RabbitMQ.
        let mut quick = tokio_retry::strategy::ExponentialBackoff::from_millis(5)
            .factor(10)
            .map(tokio_retry::strategy::jitter)
            .take(2);
        let mut claimed = false;
        loop {
            // Paused (breaker open, budget spent, account refused): hand the job
            // back without using an attempt. Only the breaker's probe goes on.
            // The probe's first call is the one call allowed while paused.
            let probing = probe && !claimed;
            if !probing && self.paused_now() {
                if claimed {
                    store::release(&self.pool, &job.id, token).await?;
                }
                return Ok(Settle::Requeue);
            }
            // The global limits: one request, the worst-case tokens and cost.
            let max_wait = Duration::from_secs_f64(self.args.max_wait_seconds.max(1.0));
            let waiting = std::time::Instant::now();
            let acquired = self
                .limiter
                .acquire(token, reservation.tokens, reservation.cost_usd, max_wait)
                .await;
            *self.metrics.limiter_wait_seconds.lock().unwrap() += waiting.elapsed().as_secs_f64();
            let period = match acquired {
                Acquired::Granted { period } => {
                    // The breaker may have opened while this job waited its turn.
                    if !probing && self.paused_now() {
                        self.limiter.give_back(token, reservation.tokens).await;
                        if claimed {
                            store::release(&self.pool, &job.id, token).await?;
                        }
                        return Ok(Settle::Requeue);
                    }
                    period
                }
                Acquired::BudgetExhausted { reason, retry_in } => {
                    tracing::warn!(%reason, retry_in_s = retry_in.as_secs(), "budget exhausted: pausing this replica");
                    self.pause.send_if_modified(|p| {
                        let was = p.is_some();
                        *p = Some(Pause {
                            reason: reason.clone(),
                            cause: PauseCause::Budget(reservation.cost_usd),
                        });
                        !was
                    });
                    return Ok(Settle::Requeue);
                }
                Acquired::TimedOut => {
                    // Never hold a delivery for long: it goes round again.
                    self.requeue_later(publish_ch, delivery, Duration::from_secs(5), false)
                        .await?;
                    return Ok(Settle::Ack);
                }
            };
            let (call_id, attempt) = match self
                .claims
                .call(AttemptRequest {
                    id: job.id.clone(),
                    model: job.model.clone(),
                    metadata: job.metadata.clone(),
                    token,
                    lease_seconds: self.args.lease_seconds,
                    reservation: Reservation {
                        budget_period: period,
                        ..reservation.clone()
                    },
                })
                .await
                .inspect_err(|e| self.database_failed(e))?
            {
                Begin::Started { call_id, attempt } => {
                    claimed = true;
                    (call_id, attempt)
                }
                Begin::Finished => {
                    self.limiter.give_back(token, reservation.tokens).await;
                    self.metrics.jobs_duplicate.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(job = %job.id, "already finished; acking the duplicate without a call");
                    return Ok(Settle::Ack);
                }
                Begin::Busy => {
                    self.limiter.give_back(token, reservation.tokens).await;
                    // Another claim is live. Check again later: either that worker
                    // finishes, or its lease runs out and this copy takes over.
                    self.requeue_later(publish_ch, delivery, Duration::from_secs(5), false)
                        .await?;
                    return Ok(Settle::Ack);
                }
            };

            let a = self.client.call(body).await;
            // The breaker counts what says the upstream is failing: 5xx, timeouts,
            // connection errors. A 429 is its own pause; a 4xx is the job's fault.
            let upstream_failing =
                matches!(a.verdict, Verdict::Transient { .. }) && a.response.as_ref().is_none_or(|r| r.status >= 500);
            if probe {
                let ok = matches!(a.verdict, Verdict::Ok | Verdict::Permanent { .. });
                self.breaker.probe_result(ok, a.verdict.reason()).await;
            } else if !matches!(a.verdict, Verdict::Paused { .. }) {
                self.breaker.record(upstream_failing, a.verdict.reason()).await;
            }
            let settlement = settlement_for(&job.id, &a, call_id, price, reservation);
            let (outcome, prompt, completion, cost) = (
                settlement.outcome,
                settlement.prompt_tokens.unwrap_or(0) as u64,
                settlement.completion_tokens.unwrap_or(0) as u64,
                settlement.cost_usd,
            );
            self.metrics
                .call(outcome, &job.model, a.latency, prompt, completion, cost);
            let log_done = |status: &str| {
                tracing::info!(
                    batch_id = %job.id.batch_id, custom_id = %job.id.custom_id, status, attempt,
                    prompt_tokens = prompt, completion_tokens = completion, cost_usd = %cost,
                    latency_ms = a.latency.as_millis() as u64, "job finished"
                );
            };
            match &a.verdict {
                Verdict::Ok => {
                    let s = Settlement {
                        end: JobEnd::Succeeded,
                        ..settlement
                    };
                    self.settle(s).await?;
                    if self.fault.as_deref() == Some("exit-after-commit") {
                        tracing::warn!(job = %job.id, "SHEEPDOG_FAULT: exiting after the commit, before the ack");
                        std::process::exit(137);
                    }
                    self.metrics.jobs_succeeded.fetch_add(1, Ordering::Relaxed);
                    log_done("succeeded");
                    return Ok(Settle::Ack);
                }
                Verdict::Permanent { reason } => {
                    let s = Settlement {
                        end: JobEnd::Failed,
                        job_error: Some(json!({"code": "upstream_rejected", "message": reason})),
                        ..settlement
                    };
                    self.settle(s).await?;
                    self.metrics.jobs_failed.fetch_add(1, Ordering::Relaxed);
                    log_done("failed");
                    return Ok(Settle::Ack);
                }
                Verdict::Transient { reason, retry_after } => {
                    let status = a.response.as_ref().map(|r| r.status);
                    if let (Some(429), Some(d)) = (status, retry_after) {
                        // The account's limit is everyone's: every replica waits it out.
                        self.limiter
                            .pause_all(*d, "the upstream answered 429 (Retry-After)")
                            .await;
                    }
                    if attempt as u32 >= self.args.max_attempts {
                        let why = format!("gave up after {attempt} attempts; last: {reason}");
                        let s = Settlement {
                            end: JobEnd::Failed,
                            job_error: Some(json!({"code": "attempts_exhausted", "message": why})),
                            ..settlement
                        };
                        self.settle(s).await?;
                        self.dead_letter(publish_ch, delivery, &why).await?;
                        self.metrics.jobs_failed.fetch_add(1, Ordering::Relaxed);
                        log_done("failed");
                        return Ok(Settle::Ack);
                    }
                    self.settle(Settlement {
                        end: JobEnd::Continue,
                        ..settlement
                    })
                    .await?;
                    let short_wait = retry_after.is_none_or(|d| d <= Duration::from_secs(1));
                    match quick.next() {
                        Some(d) if short_wait => {
                            tokio::time::sleep(d.max(retry_after.unwrap_or_default())).await;
                            continue;
                        }
                        _ => {
                            let delay = backoff_for(attempt as u32).max(retry_after.unwrap_or_default());
                            tracing::info!(job = %job.id, attempt, %reason, delay_s = delay.as_secs_f64(), "retrying later");
                            store::release(&self.pool, &job.id, token).await?;
                            self.requeue_later(publish_ch, delivery, delay, true).await?;
                            self.metrics.jobs_retried.fetch_add(1, Ordering::Relaxed);
                            return Ok(Settle::Ack);
                        }
                    }
                }
                Verdict::Paused { reason } => {
                    // The key or the balance: no job fails. Every replica pauses
                    // (through the shared breaker) until a probe passes.
                    self.settle(Settlement {
                        end: JobEnd::Continue,
                        ..settlement
                    })
                    .await?;
                    tracing::error!(%reason, "the upstream refused the account: pausing every replica");
                    if !probe {
                        self.breaker.trip(&format!("account refused: {reason}")).await;
                    }
                    store::release(&self.pool, &job.id, token).await?;
                    return Ok(Settle::Requeue);
                }
            }
        }
    }

    /// Writes a settlement, holding on to it through a database outage (for as
    /// long as the claim's lease) rather than losing a call that was made.
    async fn settle(&self, s: Settlement) -> anyhow::Result<()> {
        let deadline = std::time::Instant::now() + Duration::from_secs_f64(self.args.lease_seconds.max(1.0));
        let mut delay = Duration::from_millis(200);
        loop {
            match self.settles.call(s.clone()).await {
                Ok(()) => return Ok(()),
                Err(e) if std::time::Instant::now() < deadline => {
                    self.database_failed(&e);
                    tracing::warn!(job = %s.id, error = %e, "cannot record a result yet; holding it");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The database failed: take no new jobs until it answers again.
    fn database_failed(&self, e: &anyhow::Error) {
        if self.metrics.db_ok.swap(false, Ordering::Relaxed) {
            tracing::error!(error = %e, "database unreachable: pausing this replica");
        }
        self.pause.send_if_modified(|p| {
            if p.is_some() {
                return false;
            }
            *p = Some(Pause {
                reason: "database unreachable".into(),
                cause: PauseCause::Database,
            });
            true
        });
    }

    /// Publishes the message, body and headers unchanged, to `sheepdog.dead` with
    /// its reason, and waits for the confirm.
    async fn dead_letter(&self, ch: &Channel, delivery: &Delivery, reason: &str) -> anyhow::Result<()> {
        let headers = amqp::headers_with(&delivery.properties, &[(ERROR_HEADER, amqp::string_value(reason))]);
        let props = delivery.properties.clone().with_headers(headers).with_delivery_mode(2);
        amqp::publish_confirmed(ch, DEAD_QUEUE, &delivery.data, props).await?;
        self.metrics.jobs_dead_lettered.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Puts the message in the retry tier that brings it back after `delay`.
    async fn requeue_later(
        &self,
        ch: &Channel,
        delivery: &Delivery,
        delay: Duration,
        counts: bool,
    ) -> anyhow::Result<()> {
        let retries = amqp::header_u32(&delivery.properties, RETRIES_HEADER).unwrap_or(0) + u32::from(counts);
        let headers: FieldTable = amqp::headers_with(
            &delivery.properties,
            &[(RETRIES_HEADER, AMQPValue::LongLongInt(retries as i64))],
        );
        let props = delivery.properties.clone().with_headers(headers).with_delivery_mode(2);
        let tier = amqp::retry_tier_for(delay);
        amqp::publish_confirmed(ch, &amqp::retry_queue(tier), &delivery.data, props).await?;
        Ok(())
    }
}

/// Exponential backoff with equal jitter: 2s, 4s, 8s … up to 10 minutes.
fn backoff_for(attempt: u32) -> Duration {
    let base = 2f64.powi(attempt.min(10) as i32).min(600.0);
    Duration::from_secs_f64(base / 2.0 + rand::rng().random::<f64>() * base / 2.0)
}

/// The ledger entry an attempt makes.
fn settlement_for(id: &JobId, a: &Attempt, call_id: i64, price: &crate::prices::Price, r: &Reservation) -> Settlement {
    let resp = a.response.as_ref();
    let usage: Option<Usage> = resp.and_then(|r| r.usage);
    let (outcome, cost) = match (&a.verdict, usage) {
        (Verdict::Ok, Some(u)) => ("ok", price.cost(&u)),
        (_, Some(u)) => ("error", price.cost(&u)),
        (_, None) if a.maybe_billed => ("unknown", r.cost_usd),
        (_, None) => ("error", rust_decimal::Decimal::ZERO),
    };
    let status_code = resp.map(|r| r.status as i32);
    let error = match &a.verdict {
        Verdict::Ok => None,
        v => Some(v.reason().to_string()),
    };
    Settlement {
        id: id.clone(),
        call_id,
        outcome,
        status_code,
        prompt_tokens: usage.map(|u| u.prompt_tokens as i64),
        completion_tokens: usage.map(|u| u.completion_tokens as i64),
        cached_tokens: usage.map(|u| u.cached_tokens as i64),
        cost_usd: cost,
        error,
        upstream_request_id: resp.and_then(|r| r.request_id.clone()),
        latency_ms: Some(a.latency.as_millis().min(i32::MAX as u128) as i32),
        end: JobEnd::Continue,
        response: resp.map(|r| r.body.clone()),
        job_error: None,
    }
}
