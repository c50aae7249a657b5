//! Publishes the outbox (dead letters of jobs that ran out of attempts, result events) with
//! confirms, then deletes what the broker confirmed, in the transaction that locked it.

use std::sync::Arc;
use std::time::Duration;

use lapin::Channel;
use tokio_util::sync::CancellationToken;

use super::Worker;

pub async fn run(w: Arc<Worker>, ch: Channel, stop: CancellationToken) {
    loop {
        let published = match crate::store::outbox::take(&w.pool, 200, 1000).await {
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
                        tracing::warn!(error = %e, routing_key = %m.routing_key, "outbox publish failed; it stays for later");
                        failed.insert(m.id);
                    }
                }
                let ok: Vec<i64> = taken.rows.iter().copied().filter(|id| !failed.contains(id)).collect();
                let n = ok.len();
                if let Err(e) = taken.done(&ok).await {
                    tracing::warn!(error = %e, "could not clear the outbox; its messages go again (at least once)");
                }
                n
            }
            Ok(None) => 0,
            Err(e) => {
                tracing::debug!(error = %e, "cannot read the outbox");
                0
            }
        };
        if published == 0 {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
        } else if stop.is_cancelled() {
            return;
        }
    }
}
