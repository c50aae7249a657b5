//! The dispatcher: fills this replica's free slots with the jobs dispatch grants it.
//!
//! It waits for a free slot, grabs every slot free at that moment, and asks `store::dispatch`
//! for that many jobs. Each granted job runs in its own task holding one slot. When nothing
//! was granted it sleeps until the soonest moment a limit may have room, or until intake,
//! a finished call or a takeover wakes it, and at most `IDLE` in any case.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::Worker;

/// The longest the dispatcher sleeps before it looks again (jobs due from a retry, jobs
/// admitted by other replicas, a limit raised).
const IDLE: Duration = Duration::from_millis(250);
/// The shortest pause between two dispatches that granted nothing.
const MIN_GAP: Duration = Duration::from_millis(5);
/// The most jobs one dispatch asks for.
const MAX_ASK: usize = 256;

pub async fn run(w: Arc<Worker>, stop: CancellationToken, calls: TaskTracker) {
    let mut failures = 0u32;
    let mut idle = true;
    // A dispatch that failed on a lost connection may have committed: its grants are then this
    // replica's in Postgres (jobs running, calls pending) but in no task. Looked for once the
    // database answers again; no other replica would ever take them (this one is alive).
    let mut maybe_lost = false;
    loop {
        let first = tokio::select! {
            p = w.slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = stop.cancelled() => return,
        };
        let mut permits = vec![first];
        while permits.len() < MAX_ASK {
            match w.slots.clone().try_acquire_owned() {
                Ok(p) => permits.push(p),
                Err(_) => break,
            }
        }
        let asked = permits.len();
        let started = Instant::now();
        let wait = match crate::store::dispatch::dispatch(&w.pool, w.replica(), asked, w.probe_lease(), idle).await {
            Ok(d) => {
                failures = 0;
                idle = d.idle || d.jobs.is_empty();
                w.database_ok();
                if !d.idle {
                    w.metrics.health.set_held(d.blocked.clone(), d.lanes_blocked.clone());
                } else {
                    w.metrics.health.set_held(None, Vec::new());
                }
                let granted = d.jobs.len();
                for job in d.jobs {
                    let permit = permits.pop().expect("no more grants than slots asked for");
                    w.hold(job.call_id);
                    calls.spawn(super::execute::run(w.clone(), job, permit));
                }
                drop(permits);
                if std::mem::take(&mut maybe_lost) {
                    maybe_lost = !recover_lost_grants(&w, &calls).await;
                }
                if granted == asked {
                    None
                } else if d.idle {
                    Some(IDLE)
                } else {
                    Some(d.retry_in.unwrap_or(IDLE).clamp(MIN_GAP, IDLE))
                }
            }
            Err(e) => {
                drop(permits);
                maybe_lost |= e.is_unavailable();
                w.database_failed(&e);
                if !e.is_unavailable() {
                    tracing::error!(error = %e, "dispatch failed");
                }
                failures += 1;
                Some(Duration::from_millis(200 * 2u64.pow(failures.min(4))))
            }
        };
        if let Some(wait) = wait {
            let gap = MIN_GAP.saturating_sub(started.elapsed());
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
                _ = async { tokio::time::sleep(gap).await; w.wake.notified().await } => {}
            }
        }
    }
}

/// Runs the grants this replica holds in Postgres but in no task (see `maybe_lost`), each in
/// a slot of its own like any grant. Returns whether the look succeeded.
async fn recover_lost_grants(w: &Arc<Worker>, calls: &TaskTracker) -> bool {
    let in_hand = w.in_hand();
    let lost = match crate::store::dispatch::lost_grants(&w.pool, w.replica(), &in_hand).await {
        Ok(lost) => lost,
        Err(e) => {
            tracing::debug!(error = %e, "cannot look for grants lost with a connection yet");
            return false;
        }
    };
    for job in lost {
        tracing::warn!(job = %job.id, "a grant's answer was lost with the database connection; running it now");
        let Ok(permit) = w.slots.clone().acquire_owned().await else {
            return true;
        };
        w.hold(job.call_id);
        calls.spawn(super::execute::run(w.clone(), job, permit));
    }
    true
}
