//! Publishes the outbox (dead letters of jobs that ran out of attempts, result events) with
//! confirms: claims a batch of rows, publishes it, then deletes what the broker confirmed and
//! gives up the claim on the rest.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Worker;

/// How often an empty outbox is looked at.
const IDLE: Duration = Duration::from_millis(250);

pub async fn run(w: Arc<Worker>, stop: CancellationToken) {
    // After a read or publish that failed: the retry policy's outbox schedule.
    let mut failures = crate::retry::outbox();
    loop {
        let mut failed_now = false;
        let ch = match w.channels.get().await {
            Ok(ch) => ch,
            Err(e) => {
                tracing::warn!(error = %e, "no AMQP channel for the outbox; it stays for later");
                if !failures_wait(&mut failures, &stop).await {
                    return;
                }
                continue;
            }
        };
        let published = match crate::store::outbox::take(&w.pool, w.replica(), 200, 1000).await {
            Ok(Some(taken)) => {
                // The event of a job that no longer exists has nothing to say: it is cleared.
                let sendable: Vec<_> = taken.messages.iter().filter(|m| m.body.is_some()).collect();
                let outgoing: Vec<crate::amqp::Outgoing> = sendable
                    .iter()
                    .map(|m| crate::amqp::Outgoing {
                        exchange: &m.exchange,
                        routing_key: &m.routing_key,
                        headers: &m.headers.0,
                        body: m.body.as_deref().unwrap_or_default(),
                    })
                    .collect();
                let results = crate::amqp::publish_all(&ch, &outgoing).await;
                // A row goes once every message of it is confirmed; else it stays, all of it.
                let mut failed = std::collections::HashSet::new();
                for (m, r) in sendable.iter().zip(results) {
                    if let Err(e) = r {
                        failed_now = true;
                        tracing::warn!(error = %e, routing_key = %m.routing_key, "outbox publish failed; it stays for later");
                        failed.insert(m.id);
                    }
                }
                let ok: Vec<i64> = taken.rows.iter().copied().filter(|id| !failed.contains(id)).collect();
                let n = ok.len();
                if let Err(e) = taken.done(&w.pool, &ok).await {
                    tracing::warn!(error = %e, "could not clear the outbox; its messages go again (at least once)");
                }
                n
            }
            Ok(None) => 0,
            Err(e) => {
                failed_now = true;
                tracing::debug!(error = %e, "cannot read the outbox");
                0
            }
        };
        drop(ch);
        if failed_now {
            if !failures_wait(&mut failures, &stop).await {
                return;
            }
            continue;
        }
        failures.reset();
        if published == 0 {
            // Nothing was waiting: look again in a moment.
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(IDLE) => {}
            }
        } else if stop.is_cancelled() {
            return;
        }
    }
}

/// Waits the policy's next delay; false when `stop` came first.
async fn failures_wait(failures: &mut crate::retry::Backoff, stop: &CancellationToken) -> bool {
    let wait = failures.next().unwrap_or(Duration::from_secs(5));
    tokio::select! {
        _ = stop.cancelled() => false,
        _ = tokio::time::sleep(wait) => true,
    }
}

/// Keeps the queue-depth gauges current for `/metrics`, reading on the shared channels.
pub async fn queue_gauges(w: Arc<Worker>, stop: CancellationToken) {
    loop {
        if let Ok(ch) = w.channels.get().await {
            for q in [crate::amqp::JOBS_QUEUE, crate::amqp::DEAD_QUEUE] {
                if let Ok(n) = crate::amqp::queue_depth(&ch, q).await {
                    w.metrics.queue_depth.lock().unwrap().insert(q.to_string(), n);
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
}
