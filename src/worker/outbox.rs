//! Publishes the outbox (dead letters of jobs that ran out of attempts, result events) with
//! confirms, then deletes what the broker confirmed, in the transaction that locked it.

use std::sync::Arc;
use std::time::Duration;

use lapin::Channel;
use tokio_util::sync::CancellationToken;

use super::Worker;

pub async fn run(w: Arc<Worker>, ch: Channel, stop: CancellationToken) {
    loop {
        let published = match crate::store::outbox::take(&w.pool, 200).await {
            Ok(Some(taken)) => {
                // The event of a job that no longer exists has nothing to say: it is cleared.
                let (sendable, gone): (Vec<_>, Vec<_>) = taken.messages.iter().partition(|m| m.body.is_some());
                let mut ok: Vec<i64> = gone.iter().map(|m| m.id).collect();
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
                for (m, r) in sendable.iter().zip(results) {
                    match r {
                        Ok(()) => ok.push(m.id),
                        Err(e) => {
                            tracing::warn!(error = %e, routing_key = %m.routing_key, "outbox publish failed; it stays for later")
                        }
                    }
                }
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
