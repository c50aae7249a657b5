//! The dispatcher: settles the calls that came back and fills this replica's free slots with
//! the jobs dispatch grants it, both in one transaction per round. It runs on a thread and a
//! connection of its own ([`spawn`]): a round holds the lock every replica's round waits for.
//!
//! A round takes every call that came back (with its slot) and every slot free at that moment,
//! and asks `store::dispatch::settle_and_dispatch` to settle the first and fill the second: one
//! round trip and one commit for both, and a returned call's slot goes straight to the next job.
//! Each granted job runs in its own task holding one slot. When nothing was granted it sleeps
//! until the soonest moment a limit may have room, or until intake, a returned call or a
//! takeover wakes it, and at most `IDLE` in any case.
//!
//! Settlements are held through a database outage (for an hour at most), not dropped: a call
//! was made and is recorded once the database answers. A call whose settlement could not be
//! written stays in hand: it was made, and is never made again. A grant whose round committed
//! while its answer was lost with the connection is found again and takes the next free slot
//! before any new grant (ARCHITECTURE.md, "Liveness and takeover").

use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio::runtime::Handle;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::{Returned, Worker};
use crate::store::dispatch::Granted;
use crate::store::settle::Settlement;
use crate::store::StoreError;

/// The longest the dispatcher sleeps before it looks again (jobs due from a retry, jobs
/// admitted by other replicas, a limit raised).
const IDLE: Duration = Duration::from_millis(250);
/// The shortest pause between two dispatches that granted nothing.
const MIN_GAP: Duration = Duration::from_millis(5);
/// The most jobs one round asks for.
const MAX_ASK: usize = 256;
/// Idle slots beyond those with a warm connection waiting (see [`Warm`]) are filled at most
/// `MAX_FRESH` a round, and `MAX_FRESH` more for every `CONTENDED` the last round waited for the
/// dispatch lock (eight replicas' rounds wait about 150 ms for it: 8 a round would take a
/// replica seconds to fill its slots). A slot freed by a call that came back has a warm
/// connection to reuse; an idle one beyond the calls of the last minute (at the start, or as
/// concurrency grows) opens a new one. A replica starting with 2,000 idle slots fills them a few
/// at a time, each round's calls sent while the next round runs, instead of granting them all at
/// once while intake takes in the first thousands of deliveries on the same cores: at 2,000 in
/// flight (`bench`, 2 to 4 s calls) 256 a round made the p99 that sheepdog adds to a call 99 to
/// 154 ms, 32 a round 68 to 190 ms and 8 a round 23 to 54 ms (0.96 to 0.98 of a perfect
/// scheduler, against 0.99: the first second is slower to fill).
const MAX_FRESH: usize = 8;
/// About how many connections to the upstream wait warm in the client's pool: the most slots
/// this replica had busy at once within the pool's idle timeout (`upstream::client::IDLE_CONNECTION`).
/// Idle slots up to that many are filled at once (a backlog that ran dry and filled again), only
/// those beyond it as `MAX_FRESH` says.
#[derive(Default)]
struct Warm {
    /// The most slots busy at once, by spans of `Warm::SPAN`, oldest first.
    spans: std::collections::VecDeque<(Instant, usize)>,
}

impl Warm {
    const SPAN: Duration = Duration::from_secs(10);

    fn note(&mut self, busy: usize) {
        let now = Instant::now();
        while self
            .spans
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) >= crate::upstream::client::IDLE_CONNECTION)
        {
            self.spans.pop_front();
        }
        match self.spans.back_mut() {
            Some((at, most)) if now.duration_since(*at) < Self::SPAN => *most = (*most).max(busy),
            _ => self.spans.push_back((now, busy)),
        }
    }

    /// How many idle slots a round may fill while `busy` are taken, the last round having
    /// waited `waited` for the dispatch lock.
    fn fill(&self, busy: usize, waited: Duration) -> usize {
        let most = self.spans.iter().map(|(_, n)| *n).max().unwrap_or(0);
        let waits = (waited.as_micros() / CONTENDED.as_micros()) as usize;
        most.saturating_sub(busy) + (MAX_FRESH * (1 + waits)).min(MAX_ASK)
    }
}

/// The most calls one round settles.
const MAX_SETTLE: usize = 512;
/// How many of a replica's calls must have come back during a round that waited for the lock
/// (see `CONTENDED`) for the next rounds to count their slots under the lock.
const PILED: usize = 32;
/// A round whose view waited this long for the dispatch lock (other replicas' rounds hold it in
/// turn), while at least `PILED` of its replica's calls came back, makes the next rounds count
/// their free slots only once their view has the lock (the view reads candidates for `MAX_ASK`):
/// the calls that came back during the wait give their slots to that round's grants (they are
/// settled in the next round). Otherwise a round asks for the few slots freed before it began
/// and waits behind seven replicas for them: rounds of 8 replicas carried ~88 jobs where they
/// can carry 256, and the lock's turns, not the work, bounded them.
const CONTENDED: Duration = Duration::from_millis(20);
/// A round in that mode whose view took less than this goes back to counting its slots first.
const UNCONTENDED: Duration = Duration::from_millis(5);
/// How long a settlement is held through a database outage before it is given up on (its
/// replica's takeover then charges the call at its reservation).
const HOLD: Duration = Duration::from_secs(3600);
/// How often a replica looks for grants of its own that no task holds, with no failed round to
/// prompt it (one indexed read).
const LOST_SWEEP: Duration = Duration::from_secs(60);

/// How long this replica's rounds took, from the statement's start to its answer (the wait for
/// the dispatch lock included), and what they carried.
pub struct RoundStats {
    /// Round durations in microseconds.
    pub took_us: hdrhistogram::Histogram<u64>,
    pub granted: u64,
    pub settled: u64,
}

impl Default for RoundStats {
    fn default() -> Self {
        RoundStats {
            took_us: hdrhistogram::Histogram::new_with_bounds(1, 600_000_000, 2).expect("valid bounds"),
            granted: 0,
            settled: 0,
        }
    }
}

impl RoundStats {
    fn record(&mut self, took: Duration, granted: usize, settled: usize) {
        self.took_us.saturating_record(took.as_micros().max(1) as u64);
        self.granted += granted as u64;
        self.settled += settled as u64;
    }
}

/// Starts the dispatcher on a thread of its own, with a runtime and a connection of its own
/// (`store::round_pool`). Its rounds hold the dispatch lock every replica waits for; a round's
/// next step must not wait for its turn behind this replica's calls (thousands of tasks on two
/// cores) while the lock is held. The calls it grants run on `calls`'s runtime, the caller's.
/// The returned task ends when the dispatcher does; aborting it stops the dispatcher.
pub fn spawn(
    w: Arc<Worker>,
    stop_granting: CancellationToken,
    stop: CancellationToken,
    calls: TaskTracker,
) -> tokio::task::JoinHandle<()> {
    let main = tokio::runtime::Handle::current();
    let span = tracing::Span::current();
    let own = tokio::runtime::Builder::new_current_thread().enable_all().build();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let (abort_tx, abort_rx) = tokio::sync::oneshot::channel::<()>();
    let opts = w.db_options.clone();
    let shared = w.pool.clone();
    let rounds = move |pool: PgPool| run(w, pool, main, stop_granting, stop, calls).instrument(span);
    // Kept for the worker's own runtime, should no thread be had.
    let fallback = rounds.clone();
    let thread = match own {
        Ok(own) => std::thread::Builder::new()
            .name("sheepdog-dispatch".into())
            .spawn(move || {
                own.block_on(async move {
                    // Made here, so that its connection's socket is this runtime's.
                    let pool = crate::store::round_pool(&opts);
                    tokio::select! {
                        _ = rounds(pool.clone()) => {}
                        _ = abort_rx => {}
                    }
                    // Its connection says goodbye rather than vanishing (bounded: the server may be gone).
                    let _ = tokio::time::timeout(Duration::from_secs(2), pool.close()).await;
                });
                let _ = done_tx.send(());
            })
            .map_err(anyhow::Error::from),
        Err(e) => Err(anyhow::Error::from(e)),
    };
    match thread {
        Ok(_) => tokio::spawn(async move {
            // Dropped when this task is aborted: the dispatcher's thread then ends.
            let _abort = abort_tx;
            let _ = done_rx.await;
        }),
        Err(e) => {
            tracing::warn!(error = %e, "cannot give the dispatcher a thread of its own; it shares the worker's");
            tokio::spawn(fallback(shared))
        }
    }
}

/// Runs rounds on `pool` until `stop` (granting ends at `stop_granting`; settling goes on until
/// `stop`); the calls granted run on `main`.
async fn run(
    w: Arc<Worker>,
    pool: PgPool,
    main: Handle,
    stop_granting: CancellationToken,
    stop: CancellationToken,
    calls: TaskTracker,
) {
    // Waits after a failed round: the retry policy's database schedule, reset by a round that went.
    let mut failures = crate::retry::database();
    let mut idle = true;
    // A round that failed on a lost connection may have committed: its grants are then this
    // replica's in Postgres (calls pending) but in no task. Looked for once the database answers
    // again; no other replica would ever take them (this one is alive).
    let mut maybe_lost = false;
    // When this replica last looked for lost grants without a failure to prompt it.
    let mut swept = Instant::now();
    // Grants found lost, waiting for a slot: each runs before any new grant takes one. They
    // never wait on the dispatcher itself (it frees the slots of the calls it settles).
    let mut lost: Vec<Granted> = Vec::new();
    // Calls that came back and are not settled yet, carried from round to round while the
    // database does not answer.
    let mut held: Vec<Returned> = Vec::new();
    // Whether rounds count their slots once they hold the dispatch lock (see `CONTENDED`).
    let mut contended = false;
    let mut warm = Warm::default();
    // How long the last round's view took, the wait for the dispatch lock included.
    let mut waited = Duration::ZERO;
    // Slots taken: by calls in flight, by calls back but not settled, and by this round's grants.
    let concurrency = w.args.concurrency.max(1) as usize;
    let taken = || concurrency.saturating_sub(w.slots.available_permits());
    // Whether the last turn waited for a call to come back instead of a round settling only.
    let mut deferred = false;
    loop {
        if held.len() < MAX_SETTLE {
            held.extend(w.take_returned(MAX_SETTLE - held.len()));
        }
        // No call without the life line: a replica not proven alive may be taken for dead.
        let alive = w.metrics.health.lifeline();
        let granting = !stop_granting.is_cancelled() && alive;
        if alive {
            // Lost grants are granted already: they run in idle slots first, even while stopping.
            while !lost.is_empty() {
                let Ok(permit) = w.slots.clone().try_acquire_owned() else {
                    break;
                };
                run_lost(&w, &calls, &main, &mut lost, permit);
            }
        }
        // Free slots: those of the returned calls (free once they are settled) and idle ones.
        let mut free: Vec<OwnedSemaphorePermit> = Vec::new();
        // Held calls whose slots a round took already are settled without freeing one.
        let held_slots = held.iter().filter(|r| r.slot.is_some()).count();
        if granting && lost.is_empty() {
            let fill = warm.fill(taken(), waited);
            while held_slots + free.len() < MAX_ASK && free.len() < fill {
                match w.slots.clone().try_acquire_owned() {
                    Ok(p) => free.push(p),
                    Err(_) => break,
                }
            }
        }
        if held.is_empty() && free.is_empty() {
            // Nothing to settle and no slot free: every slot is out on a call, whose return wakes us.
            if stop.is_cancelled() && w.unsettled() == 0 {
                return;
            }
            tokio::select! {
                _ = stop.cancelled(), if !stop.is_cancelled() => {}
                _ = tokio::time::sleep(IDLE) => {}
                _ = w.wake.notified() => {}
            }
            continue;
        }
        // Only calls whose slots went to the last round's grants: they are settled with the next
        // round that grants, once a call comes back (or after `IDLE`), instead of in a commit of
        // their own.
        let defer = contended && granting && held_slots == 0 && free.is_empty() && !deferred;
        deferred = defer;
        if defer {
            let until = tokio::time::Instant::now() + IDLE;
            // Woken by intake too: waits on until a call is back.
            while w.unsettled() <= held.len() && !stop.is_cancelled() {
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = tokio::time::sleep_until(until) => break,
                    _ = w.wake.notified() => {}
                }
            }
            continue;
        }
        // The slots the settled calls free go to the lost grants first.
        let ask = |free: usize| (held_slots + free).saturating_sub(lost.len()).min(MAX_ASK);
        let mut asked = if granting { ask(free.len()) } else { 0 };
        let settlements: Vec<Settlement> = held.iter().map(|r| r.settlement.clone()).collect();
        let started = Instant::now();
        // Calls that came back while this round waited for the lock: their slots are this
        // round's, their settlements the next round's.
        let mut late: Vec<Returned> = Vec::new();
        let round = async {
            let round = crate::store::dispatch::begin_round(&pool, &settlements).await?;
            if contended && asked > 0 {
                // Slots are counted once the lock is held: the calls back by then give theirs.
                let count = || {
                    late = w.take_returned(MAX_SETTLE.saturating_sub(held.len()));
                    free.extend(late.iter_mut().filter_map(|r| r.slot.take()));
                    asked = ask(free.len());
                    asked
                };
                round
                    .dispatch_counting(w.replica(), MAX_ASK, count, w.probe_lease(), idle)
                    .await
            } else {
                round.dispatch(w.replica(), asked, w.probe_lease(), idle).await
            }
        }
        .await;
        let wait = match round {
            Ok(d) => {
                waited = d.view_took;
                if contended && d.view_took < UNCONTENDED {
                    contended = false;
                }
                w.rounds
                    .lock()
                    .unwrap()
                    .record(started.elapsed(), d.jobs.len(), held.len());
                failures.reset();
                w.database_ok();
                // Settled: their slots are free for the grants.
                let n = held.len();
                for r in held.drain(..) {
                    w.release(r.settlement.call_id);
                    super::execute::log_and_count(&w, &r.settlement);
                    free.extend(r.slot);
                }
                w.settled(n);
                held.append(&mut late);
                idle = d.idle || d.jobs.is_empty();
                // Calls that came back during this round, waiting for the next.
                let piled = w.unsettled().saturating_sub(held.len());
                if asked > 0 && d.idle {
                    contended = false;
                } else if d.view_took >= CONTENDED && piled >= PILED {
                    contended = true;
                }
                if asked > 0 {
                    if !d.idle {
                        w.metrics.health.set_held(d.blocked.clone(), d.lanes_blocked.clone());
                    } else {
                        w.metrics.health.set_held(None, Vec::new());
                    }
                }
                if alive {
                    while !lost.is_empty() {
                        let Some(permit) = free.pop() else { break };
                        run_lost(&w, &calls, &main, &mut lost, permit);
                    }
                }
                let granted = d.jobs.len();
                for job in d.jobs {
                    let permit = free.pop().expect("no more grants than slots asked for");
                    w.hold(job.call_id);
                    calls.spawn_on(super::execute::run(w.clone(), job, permit), &main);
                }
                drop(free);
                warm.note(taken());
                // Now and then without a failure too: a commit that reached the server only after
                // the last look would otherwise leave its grants pending for good.
                if swept.elapsed() >= LOST_SWEEP {
                    maybe_lost = true;
                }
                if std::mem::take(&mut maybe_lost) {
                    swept = Instant::now();
                    maybe_lost = !find_lost_grants(&w, &pool, &mut lost).await;
                    if !lost.is_empty() {
                        // Back to the top at once, where idle slots run them.
                        continue;
                    }
                }
                if asked > 0 && granted == asked {
                    None
                } else if asked == 0 || d.idle {
                    Some(IDLE)
                } else {
                    Some(d.retry_in.unwrap_or(IDLE).clamp(MIN_GAP, IDLE))
                }
            }
            Err(e) => {
                drop(free);
                held.append(&mut late);
                maybe_lost |= e.is_unavailable();
                w.database_failed(&e).await;
                if !e.is_unavailable() {
                    tracing::error!(error = %e, "dispatch failed");
                    if !held.is_empty() {
                        // A statement refused: settle the calls one at a time, so one bad row
                        // cannot hold the others back.
                        settle_one_by_one(&w, &pool, &mut held).await;
                    }
                } else if !held.is_empty() {
                    tracing::warn!(calls = held.len(), error = %e, "cannot record results yet; holding them");
                }
                give_up_on_old(&w, &mut held);
                Some(failures.next().unwrap_or(IDLE))
            }
        };
        if let Some(wait) = wait {
            if stop.is_cancelled() && held.is_empty() && w.unsettled() == 0 {
                return;
            }
            let gap = MIN_GAP.saturating_sub(started.elapsed());
            tokio::select! {
                _ = stop.cancelled(), if !stop.is_cancelled() => {}
                _ = tokio::time::sleep(wait) => {}
                _ = async { tokio::time::sleep(gap).await; w.wake.notified().await } => {}
            }
        }
    }
}

/// Settles the held calls each in a round of its own (asking for no job). A settlement the
/// database refuses is given up on: its call stays in hand (it was made; it is never made again)
/// and its replica's takeover charges it at its reservation.
async fn settle_one_by_one(w: &Arc<Worker>, pool: &PgPool, held: &mut Vec<Returned>) {
    let mut kept = Vec::new();
    for r in held.drain(..) {
        let one = std::slice::from_ref(&r.settlement);
        match crate::store::dispatch::settle_and_dispatch(pool, one, w.replica(), 0, w.probe_lease(), true).await {
            Ok(_) => {
                w.release(r.settlement.call_id);
                super::execute::log_and_count(w, &r.settlement);
                w.settled(1);
            }
            Err(StoreError::Rejected(e)) => {
                tracing::error!(job = %r.settlement.id, error = %e, "could not record a call; its replica's takeover will charge it");
                w.settled(1);
            }
            Err(_) => kept.push(r),
        }
    }
    *held = kept;
}

/// Gives up on settlements held longer than `HOLD` (the database has been gone for an hour).
fn give_up_on_old(w: &Arc<Worker>, held: &mut Vec<Returned>) {
    let before = held.len();
    held.retain(|r| {
        let keep = r.since.elapsed() < HOLD;
        if !keep {
            tracing::error!(job = %r.settlement.id, "could not record a call for an hour; its replica's takeover will charge it");
        }
        keep
    });
    w.settled(before - held.len());
}

/// Looks for the grants this replica holds in Postgres but in no task (see `maybe_lost`) and
/// queues them in `lost`, each noted in hand. Returns whether the look succeeded.
async fn find_lost_grants(w: &Arc<Worker>, pool: &PgPool, lost: &mut Vec<Granted>) -> bool {
    let in_hand = w.in_hand();
    match crate::store::dispatch::lost_grants(pool, w.replica(), &in_hand).await {
        Ok(found) => {
            for job in found {
                tracing::warn!(job = %job.id, "a grant's answer was lost with the database connection; running it");
                w.hold(job.call_id);
                lost.push(job);
            }
            true
        }
        Err(e) => {
            tracing::debug!(error = %e, "cannot look for grants lost with a connection yet");
            false
        }
    }
}

/// Runs the next lost grant in `permit`'s slot.
fn run_lost(
    w: &Arc<Worker>,
    calls: &TaskTracker,
    main: &Handle,
    lost: &mut Vec<Granted>,
    permit: OwnedSemaphorePermit,
) {
    if let Some(job) = lost.pop() {
        calls.spawn_on(super::execute::run(w.clone(), job, permit), main);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_slots_with_warm_connections_fill_at_once_and_new_ones_at_a_pace() {
        let mut warm = Warm::default();
        // A replica starting: a few new connections a round, more when its rounds wait for the
        // lock behind other replicas' (they come seldom).
        assert_eq!(warm.fill(0, Duration::ZERO), MAX_FRESH);
        assert_eq!(warm.fill(0, Duration::from_millis(15)), MAX_FRESH);
        assert_eq!(warm.fill(0, Duration::from_millis(150)), MAX_FRESH * 8);
        assert_eq!(warm.fill(0, Duration::from_secs(1)), MAX_ASK);
        // 2,000 were busy; now 500 are: 1,500 connections wait warm in the pool.
        warm.note(2000);
        warm.note(500);
        assert_eq!(warm.fill(500, Duration::from_millis(2)), 1500 + MAX_FRESH);
        assert_eq!(warm.fill(2000, Duration::from_millis(2)), MAX_FRESH);
    }
}
