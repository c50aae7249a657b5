//! Proving this replica alive, and taking over the jobs of replicas that are not
//! (`store::liveness` has the rule). Every second: touch this replica's row over its life line,
//! and look for dead replicas to take over.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Worker;
use crate::store::liveness::{self, LifeLine};

const BEAT: Duration = Duration::from_secs(1);

/// How often the churn tables are looked at.
const VACUUM_EVERY: Duration = Duration::from_secs(5);

pub async fn run(w: Arc<Worker>, stop: CancellationToken) {
    let mut line: Option<LifeLine> = None;
    // Whether the log says why the life line is closed, since it last closed.
    let mut said_why = false;
    loop {
        if line.is_none() {
            match LifeLine::open(&w.db_options, w.replica()).await {
                Ok(l) => {
                    line = Some(l);
                    said_why = false;
                    if !w.metrics.health.set_lifeline(Ok(())) {
                        tracing::info!("life line open: granting calls");
                    }
                    w.wake_dispatcher();
                }
                Err(e) => {
                    w.metrics.health.set_lifeline(Err(e.to_string()));
                    if !std::mem::replace(&mut said_why, true) {
                        tracing::error!(
                            error = %e,
                            "cannot open this replica's life line (the connection whose lock proves it alive); granting no call until it opens"
                        );
                    } else {
                        tracing::debug!(error = %e, "life line still closed; retrying");
                    }
                }
            }
        }
        if let Some(l) = line.as_mut() {
            match l.beat().await {
                Ok(true) => {}
                Ok(false) => {
                    // Taken for dead (cut off from the database for longer than the takeover
                    // time): its jobs are someone else's now. Start over as a new replica.
                    tracing::error!(
                        replica = w.replica(),
                        "this replica was taken for dead and its jobs taken over; registering again"
                    );
                    w.metrics
                        .health
                        .set_lifeline(Err("taken for dead; registering again".into()));
                    if let Some(l) = line.take() {
                        l.close().await;
                    }
                    match liveness::register(&w.pool, &w.name, w.args.concurrency).await {
                        Ok(id) => w.metrics.health.set_replica(id),
                        Err(e) => tracing::warn!(error = %e, "cannot register again; retrying"),
                    }
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "this replica's life line broke; reconnecting");
                    w.metrics.health.set_lifeline(Err(e.to_string()));
                    if let Some(l) = line.take() {
                        l.close().await;
                    }
                    continue;
                }
            }
        }
        match liveness::take_over_dead(&w.pool, w.args.takeover(), w.args.max_attempts).await {
            Ok(t) if !t.replicas.is_empty() => {
                w.metrics
                    .jobs_taken_over
                    .fetch_add((t.requeued + t.failed) as u64, Ordering::Relaxed);
                tracing::warn!(
                    dead = ?t.replicas, requeued = t.requeued, failed = t.failed, unknown_calls = t.unknown_calls,
                    "took over the jobs of dead replicas"
                );
                w.wake_dispatcher();
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "takeover check failed"),
        }
        upkeep(&w).await;
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(BEAT) => {}
        }
    }
    if let Some(l) = line {
        l.close().await;
    }
}

/// Every second: end what is left of batches past their deadline, and fold batches' figures
/// (announcing the batches that ended). One replica at a time folds; any may expire.
async fn upkeep(w: &Worker) {
    match crate::store::batches::expire_due(&w.pool).await {
        Ok(n) if n > 0 => tracing::info!(jobs = n, "completion windows over: jobs expired"),
        Ok(_) => {}
        Err(e) => tracing::debug!(error = %e, "expiry check failed"),
    }
    match crate::store::batches::fold_progress(&w.pool).await {
        Ok(ended) => {
            for b in ended {
                tracing::info!(batch_id = %b, "batch finished");
            }
        }
        Err(e) => tracing::debug!(error = %e, "folding batch figures failed"),
    }
}

/// Every few seconds, one replica vacuums the churn tables that need it (a task of its own: a
/// slow vacuum never holds up this replica's beat).
pub async fn vacuum(w: Arc<Worker>, stop: CancellationToken) {
    loop {
        match crate::store::upkeep::vacuum_churn(&w.pool).await {
            Ok(tables) if !tables.is_empty() => tracing::debug!(?tables, "vacuumed"),
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "vacuuming the churn tables failed"),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(VACUUM_EVERY) => {}
        }
    }
}
