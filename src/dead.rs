//! Dead letters (`sheepdog.dead`): reading them with their reasons, and moving them back to
//! `sheepdog.jobs` once their cause is fixed. `sheepdog dead` and the dashboard both use these.

use lapin::options::{BasicAckOptions, BasicGetOptions};
use secrecy::SecretString;
use serde::Serialize;
use serde_json::Value;
use sqlx::PgPool;

use crate::amqp::{self, DEAD_QUEUE, ERROR_HEADER};
use crate::job::{JobId, DEFAULT_BATCH};

/// One dead letter, as `dead list` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    pub batch_id: Option<String>,
    pub custom_id: Option<String>,
    pub reason: Option<String>,
    pub bytes: usize,
}

/// The identity in a message body, where it can be read.
fn identity(body: &[u8]) -> Option<JobId> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let custom_id = v.get("custom_id")?.as_str()?.to_string();
    let batch_id = v
        .get("batch_id")
        .and_then(Value::as_str)
        .unwrap_or(DEFAULT_BATCH)
        .to_string();
    Some(JobId { batch_id, custom_id })
}

/// Reads up to `limit` dead letters without removing them: they go back to the
/// queue when the channel closes.
pub async fn list(amqp_url: &SecretString, batch: Option<&str>, limit: usize) -> anyhow::Result<Vec<DeadLetter>> {
    let conn = amqp::connect(amqp_url, "sheepdog dead list").await?;
    let ch = conn.create_channel().await?;
    let mut out = Vec::new();
    let mut seen = 0usize;
    while out.len() < limit {
        let Some(m) = ch
            .basic_get(DEAD_QUEUE.into(), BasicGetOptions { no_ack: false })
            .await?
        else {
            break;
        };
        seen += 1;
        let id = identity(&m.delivery.data);
        if batch.is_some_and(|b| id.as_ref().map(|i| i.batch_id.as_str()) != Some(b)) {
            if seen > 100_000 {
                break;
            }
            continue;
        }
        out.push(DeadLetter {
            batch_id: id.as_ref().map(|i| i.batch_id.clone()),
            custom_id: id.map(|i| i.custom_id),
            reason: amqp::header_str(&m.delivery.properties, ERROR_HEADER),
            bytes: m.delivery.data.len(),
        });
    }
    // Closing the channel returns every message read to the queue.
    let _ = ch.close(200, "listed".into()).await;
    let _ = conn.close(200, "done".into()).await;
    Ok(out)
}

/// Removes the dead letters of `batch` (others stay, in their order); how many went.
pub async fn discard(amqp_url: &SecretString, batch: &str) -> anyhow::Result<u64> {
    let conn = amqp::connect(amqp_url, "sheepdog dead discard").await?;
    let ch = conn.create_channel().await?;
    let mut gone = 0u64;
    let mut seen = 0usize;
    while let Some(m) = ch
        .basic_get(DEAD_QUEUE.into(), BasicGetOptions { no_ack: false })
        .await?
    {
        seen += 1;
        let d = m.delivery;
        if identity(&d.data).is_some_and(|i| i.batch_id == batch) {
            d.ack(BasicAckOptions::default()).await?;
            gone += 1;
        } else if seen > 100_000 {
            break;
        }
        // Others stay unacked: back in the queue when the channel closes.
    }
    let _ = ch.close(200, "discarded".into()).await;
    let _ = conn.close(200, "done".into()).await;
    Ok(gone)
}

/// What `replay` did.
#[derive(Debug, Default, Serialize)]
pub struct Replayed {
    pub replayed: u64,
    pub skipped: u64,
}

/// Moves dead letters (of `batch`, or all) back to `sheepdog.jobs`, making their
/// failed jobs claimable again. Each is published with confirms before its dead
/// copy is acked, so a crash in between leaves a duplicate, never a loss.
pub async fn replay(
    pool: &PgPool,
    amqp_url: &SecretString,
    batch: Option<&str>,
    limit: usize,
) -> anyhow::Result<Replayed> {
    let conn = amqp::connect(amqp_url, "sheepdog dead replay").await?;
    let ch = conn.create_channel().await?;
    let publish = amqp::confirm_channel(&conn).await?;
    let mut r = Replayed::default();
    while (r.replayed as usize) < limit {
        let Some(m) = ch
            .basic_get(DEAD_QUEUE.into(), BasicGetOptions { no_ack: false })
            .await?
        else {
            break;
        };
        let d = m.delivery;
        let id = identity(&d.data);
        if batch.is_some_and(|b| id.as_ref().map(|i| i.batch_id.as_str()) != Some(b)) {
            r.skipped += 1;
            if r.skipped > 100_000 {
                break;
            }
            continue; // left unacked: back in the queue when the channel closes
        }
        if let Some(id) = &id {
            crate::store::intake::reopen_failed(pool, id).await?;
        }
        amqp::replay(&publish, &d).await?;
        d.ack(BasicAckOptions::default()).await?;
        r.replayed += 1;
    }
    let _ = ch.close(200, "replayed".into()).await;
    let _ = conn.close(200, "done".into()).await;
    Ok(r)
}
