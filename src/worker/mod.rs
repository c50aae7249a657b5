//! One replica: intake → backlog → dispatch → call → settle.
//!
//! - **Intake** (`intake`): consumes `sheepdog.jobs`, validates each message, stores it as a
//!   waiting job (or dead-letters it), then acks. Postgres is the ready set from then on.
//! - **Dispatch** (`dispatcher`): whenever this replica has a free slot, takes the jobs that
//!   fit every limit in one locked transaction (`store::dispatch`), claimed for this replica.
//! - **Execution** (`execute`): calls the upstream, asks `decide` what the answer means and
//!   carries that out: breakers, the upstream's limit, then one settling statement.
//! - **Liveness** (`liveness`): proves this replica alive and takes over the jobs of dead ones.
//! - **Outbox** (`outbox`): publishes what settled statements left to publish.

pub mod decide;
pub mod dispatcher;
pub mod execute;
pub mod intake;
pub mod liveness;
pub mod outbox;

use std::sync::Arc;
use std::time::Duration;

use secrecy::SecretString;
use sqlx::postgres::PgConnectOptions;
use sqlx::PgPool;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::WorkerArgs;
use crate::limits::breaker::Breakers;
use crate::metrics::Metrics;
use crate::prices::PriceTable;
use crate::store::batcher::Batcher;
use crate::store::intake::{Admission, Admitted};
use crate::store::settle::Settlement;
use crate::store::StoreError;
use crate::upstream::Client;
use tokio::sync::OwnedSemaphorePermit;

/// Everything a replica's tasks share.
pub struct Worker {
    pub pool: PgPool,
    pub db_options: PgConnectOptions,
    pub client: Client,
    pub prices: PriceTable,
    pub args: WorkerArgs,
    pub amqp_url: SecretString,
    /// The AMQP channels this replica publishes and reads queue depths on (not the consumer's).
    pub channels: crate::amqp::Channels,
    pub name: String,
    pub metrics: Arc<Metrics>,
    pub breakers: Breakers,
    /// Calls this replica may have in flight.
    slots: Arc<Semaphore>,
    /// Wakes the dispatcher: jobs were admitted, a slot came free, a job was taken over.
    wake: Notify,
    /// The calls (ids) this replica has in hand: granted to it and not yet settled. A grant
    /// Postgres holds for this replica that is not here was lost with a dispatch's answer.
    in_hand: std::sync::Mutex<std::collections::HashSet<i64>>,
    admits: Batcher<Admission, Admitted>,
    /// Calls that came back, waiting for the dispatcher's next round to settle them, each with
    /// its slot (taken until its settlement is written).
    returned: std::sync::Mutex<Vec<Returned>>,
    /// Calls that came back and are not settled yet (queued, or in a round under way).
    unsettled: std::sync::atomic::AtomicUsize,
    /// How long its dispatch rounds took and what they carried.
    pub rounds: std::sync::Mutex<dispatcher::RoundStats>,
    /// Fault injection for the crash tests (`SHEEPDOG_FAULT=exit-after-admit`: the process
    /// exits right after its first admission commits, before the ack).
    fault: Option<String>,
}

/// An admission group of fewer jobs waits for more, until its first job is `ADMIT_LINGER` old.
/// One replica of eight gets an eighth of the deliveries: without the wait it committed about
/// six jobs a statement where one replica alone commits thirty; a job waits for its call far
/// longer than this anyway.
const ADMIT_FILL: usize = 64;
const ADMIT_LINGER: std::time::Duration = std::time::Duration::from_millis(10);

impl Worker {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        pool: PgPool,
        db_options: PgConnectOptions,
        client: Client,
        prices: PriceTable,
        args: WorkerArgs,
        amqp_url: SecretString,
        name: String,
        replica: i64,
    ) -> Arc<Worker> {
        let fault = std::env::var("SHEEPDOG_FAULT").ok().filter(|f| !f.is_empty());
        // Two admitting statements at a time leave the pool's other connections to the rounds,
        // the outbox and the upkeep.
        let parallel = 2;
        let p = pool.clone();
        let admits = Batcher::new(256, parallel, ADMIT_FILL, ADMIT_LINGER, move |items| {
            let p = p.clone();
            async move { crate::store::intake::admit(&p, items).await }
        });
        let metrics = Arc::new(Metrics::default());
        metrics.health.set_replica(replica);
        metrics.health.set_db(true);
        // No call is granted before the life line holds this replica's lock.
        metrics.health.set_lifeline(Err("not opened yet".into()));
        let breakers = Breakers::new(pool.clone(), args.breaker.settings());
        Arc::new(Worker {
            slots: Arc::new(Semaphore::new(args.concurrency.max(1) as usize)),
            pool,
            db_options,
            client,
            prices,
            args,
            channels: crate::amqp::Channels::new(&amqp_url, &name),
            amqp_url,
            name,
            metrics,
            breakers,
            wake: Notify::new(),
            in_hand: Default::default(),
            admits,
            returned: Default::default(),
            unsettled: Default::default(),
            rounds: Default::default(),
            fault,
        })
    }

    /// This replica's id in `sheepdog.replicas`.
    pub fn replica(&self) -> i64 {
        self.metrics.health.replica()
    }

    /// How long a breaker probe or a first call after a pause may stay out.
    pub fn probe_lease(&self) -> Duration {
        self.client.timeout() + Duration::from_secs(10)
    }

    pub fn wake_dispatcher(&self) {
        self.wake.notify_one();
    }

    /// A statement failed: say so once, and let `/readyz` say so until the database answers.
    /// Where the pool only timed out (after waiting its acquire timeout), a new connection is
    /// tried to learn why.
    pub async fn database_failed(&self, e: &StoreError) {
        if !e.is_unavailable() {
            return;
        }
        let e = crate::store::explain_unavailable(&self.db_options, e).await;
        let StoreError::Unavailable(why) = &e else { return };
        if self.metrics.health.db_failed(why) {
            tracing::error!(error = %e, "database unreachable: holding results and taking no jobs until it answers");
        }
    }

    pub fn database_ok(&self) {
        if !self.metrics.health.set_db(true) {
            tracing::info!("database reachable again");
        }
    }

    /// Runs until `shutdown` fires, then stops taking jobs, gives the calls in flight up to
    /// the grace period, hands back what is left and returns.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) -> anyhow::Result<()> {
        crate::tokens::warm_up();
        let stop_intake = shutdown.child_token();
        // Granting stops at the signal; settling goes on until every call in hand is settled.
        let stop_granting = shutdown.child_token();
        let stop_dispatch = CancellationToken::new();
        let stop_background = CancellationToken::new();
        let calls = TaskTracker::new();
        let live = tokio::spawn(liveness::run(self.clone(), stop_background.clone()));
        let gauges = tokio::spawn(self.clone().follow(stop_background.clone()));
        let vacuum = tokio::spawn(liveness::vacuum(self.clone(), stop_background.clone()));
        let intake = tokio::spawn(intake::run(self.clone(), stop_intake.clone()));
        let outbox = tokio::spawn(outbox::run(self.clone(), stop_background.clone()));
        let queues = tokio::spawn(outbox::queue_gauges(self.clone(), stop_background.clone()));
        let dispatch = dispatcher::spawn(
            self.clone(),
            stop_granting.clone(),
            stop_dispatch.clone(),
            calls.clone(),
        );

        shutdown.cancelled().await;
        tracing::info!(
            in_flight = self.metrics.in_flight.load(std::sync::atomic::Ordering::Relaxed),
            "stopping: taking no new jobs; finishing the calls in flight"
        );
        let grace = Duration::from_secs_f64(self.args.grace_seconds.max(0.0));
        let started = tokio::time::Instant::now();
        // Intake bounds its own hand-back (5 s to drain the consumer, 10 s for deliveries being
        // stored, 5 s to close); the calls go on meanwhile.
        stop_step("intake", intake, started + grace.max(INTAKE_STEP)).await;
        calls.close();
        if tokio::time::timeout_at(started + grace, calls.wait()).await.is_err() {
            tracing::warn!("grace period over; handing back the jobs still in flight");
        }
        // The dispatcher settles what came back (within what is left of the grace, and at least a
        // few seconds), then stops.
        let settling = grace.saturating_sub(started.elapsed()).max(Duration::from_secs(5));
        let _ = tokio::time::timeout(settling, async {
            while self.unsettled() > 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        // All that follows shares one bound, whatever the broker or the database does.
        let last = tokio::time::Instant::now() + LAST_STEPS;
        stop_dispatch.cancel();
        // A dispatcher whose settlements the database will not take (it is down) would retry
        // them for an hour; the stop does not wait for that. What it held is then this
        // replica's in Postgres, handed back below or taken over, like a crash's.
        stop_step("settling", dispatch, last).await;
        // What is still out: its calls become `unknown` (charged at their reservation) and its
        // jobs go back to the backlog, for another replica.
        let released = tokio::time::timeout_at(
            last,
            crate::store::liveness::release_own(&self.pool, self.replica(), self.args.max_attempts),
        )
        .await;
        match released {
            Ok(Ok(t)) if t.requeued + t.failed > 0 => {
                tracing::warn!(
                    requeued = t.requeued,
                    unknown_calls = t.unknown_calls,
                    "handed back unfinished jobs"
                )
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "could not hand back jobs; another replica takes them over"),
            Err(_) => tracing::warn!("could not hand back jobs in time; another replica takes them over"),
        }
        stop_background.cancel();
        stop_step("life line", live, last).await;
        stop_step("outbox", outbox, last).await;
        gauges.abort();
        queues.abort();
        if tokio::time::timeout_at(last, self.channels.close()).await.is_err() {
            ran_over("publishing channels");
        }
        // Waited for rather than cut at once: a vacuum cut off mid-way would leave its lock on
        // a pooled connection (this replica may be one of several in a process, as in tests).
        stop_step("vacuum", vacuum, last).await;
        Ok(())
    }

    /// Keeps the gauges current: breakers, backlog, limits and budgets left every 2 s; the
    /// limits' use in the last minute every 10 s, as one replica read it from the calls for all
    /// (`limits::usage_shared`).
    async fn follow(self: Arc<Self>, stop: CancellationToken) {
        for round in 0u64.. {
            if let Ok(b) = crate::limits::breaker::read_all(&self.pool).await {
                self.metrics.set_breakers(b);
            }
            if let Ok(n) = crate::store::report::backlog_depth(&self.pool).await {
                self.metrics.backlog.store(n, std::sync::atomic::Ordering::Relaxed);
            }
            let last_minute = round.is_multiple_of(5);
            let scopes = if last_minute {
                crate::limits::usage_shared(&self.pool).await
            } else {
                crate::limits::usage_without_last_minute(&self.pool).await
            };
            if let Ok(scopes) = scopes {
                self.metrics.set_scopes(scopes, last_minute);
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            }
        }
    }
}

/// A call that came back: its settlement and its slot.
pub(crate) struct Returned {
    pub settlement: Settlement,
    /// Its slot, until the dispatcher gives it to a grant: when the settling round is done, or
    /// earlier when a round that waited for the dispatch lock takes it (the call is settled in
    /// the next round then).
    pub slot: Option<OwnedSemaphorePermit>,
    /// When it came back (a settlement is held through a database outage for an hour at most).
    pub since: std::time::Instant,
}

impl Worker {
    /// Hands a call's settlement to the dispatcher, with its slot, and wakes it.
    pub(crate) fn returned(&self, settlement: Settlement, slot: OwnedSemaphorePermit) {
        self.unsettled.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.returned.lock().unwrap_or_else(|e| e.into_inner()).push(Returned {
            settlement,
            slot: Some(slot),
            since: std::time::Instant::now(),
        });
        self.wake_dispatcher();
    }

    /// Takes up to `n` calls that came back, oldest first.
    pub(crate) fn take_returned(&self, n: usize) -> Vec<Returned> {
        let mut q = self.returned.lock().unwrap_or_else(|e| e.into_inner());
        let n = n.min(q.len());
        q.drain(..n).collect()
    }

    /// Calls that came back and are not settled yet.
    pub(crate) fn unsettled(&self) -> usize {
        self.unsettled.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Notes `n` calls as settled (or given up on).
    pub(crate) fn settled(&self, n: usize) {
        self.unsettled.fetch_sub(n, std::sync::atomic::Ordering::SeqCst);
    }

    /// Notes a granted call as in hand (until it is settled).
    pub(crate) fn hold(&self, call_id: i64) {
        self.in_hand.lock().unwrap_or_else(|e| e.into_inner()).insert(call_id);
    }

    /// Notes a call as settled: no longer in hand.
    pub(crate) fn release(&self, call_id: i64) {
        self.in_hand.lock().unwrap_or_else(|e| e.into_inner()).remove(&call_id);
    }

    /// The calls in hand now.
    pub(crate) fn in_hand(&self) -> Vec<i64> {
        self.in_hand
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .copied()
            .collect()
    }
}

/// The longest intake's hand-back may take when the grace is shorter.
const INTAKE_STEP: Duration = Duration::from_secs(20);

/// What a stop may take after the grace and the settling of the calls that came back: ending
/// the dispatcher, handing back what is still out, the life line, the outbox, the publishing
/// channels and a vacuum, all together. A worker thus exits within
/// `SHEEPDOG_SHUTDOWN_GRACE_SECONDS` plus 5 s of settling plus these 8 s.
const LAST_STEPS: Duration = Duration::from_secs(8);

/// Waits for a task to end, until `deadline` at the latest; past that it is cut off, and the log
/// says which step ran over.
async fn stop_step(step: &str, mut task: tokio::task::JoinHandle<()>, deadline: tokio::time::Instant) {
    let started = std::time::Instant::now();
    if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
        task.abort();
        ran_over(step);
    } else if started.elapsed() > Duration::from_secs(2) {
        tracing::info!(
            step,
            took_ms = started.elapsed().as_millis() as u64,
            "stopping: a slow step"
        );
    }
}

fn ran_over(step: &str) {
    tracing::warn!(
        step,
        "stopping: this step ran over the stop's time; going on without it"
    );
}
