//! Producing jobs: one validation of a job line and one way to publish lines to
//! `sheepdog.jobs`, shared by `sheepdog enqueue` and the Batch API (`web::api`).
//!
//! A line is checked against contract §1 and rendered as its message (the line with its
//! `batch_id` set). Publishing registers the jobs first (`queued` rows, the batch's size grown by
//! the new ones), then publishes them with publisher confirms, reconnecting and publishing what
//! was not confirmed again. Publishing a line twice is harmless: a job's identity is
//! `(batch_id, custom_id)`, and a second copy is a duplicate wherever it arrives.

use std::time::Duration;

use anyhow::Context;
use secrecy::SecretString;
use serde_json::Value;
use sqlx::PgPool;

use crate::amqp;
use crate::job::Job;

/// A line made ready to publish.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The message: the line with `batch_id` set.
    pub payload: Vec<u8>,
    pub custom_id: String,
    pub model: String,
    pub metadata: Option<Value>,
}

/// Validates a parsed line against contract §1 as a job of `batch_id`, and renders its message.
/// `Err` is the reason, for the producer.
pub fn prepare(value: Value, batch_id: &str, max_message_bytes: usize) -> Result<Prepared, String> {
    prepare_job(value, batch_id, max_message_bytes).map(|(p, _)| p)
}

/// [`prepare`], with the job as a worker will read it (the estimate prices it).
pub fn prepare_job(mut value: Value, batch_id: &str, max_message_bytes: usize) -> Result<(Prepared, Job), String> {
    if let Value::Object(o) = &mut value {
        match o.get("batch_id") {
            None | Some(Value::Null) => {
                o.insert("batch_id".into(), Value::String(batch_id.to_string()));
            }
            Some(Value::String(b)) if b == batch_id => {}
            Some(other) => return Err(format!("batch_id {other} differs from --batch {batch_id:?}")),
        }
    }
    let payload = serde_json::to_vec(&value).map_err(|e| e.to_string())?;
    if payload.len() > max_message_bytes {
        return Err(format!(
            "message is {} bytes, larger than the maximum of {max_message_bytes}",
            payload.len()
        ));
    }
    let job = Job::from_value(value).map_err(|e| e.reason)?;
    let prepared = Prepared {
        payload,
        custom_id: job.id.custom_id.clone(),
        model: job.model.clone(),
        metadata: job.metadata.clone(),
    };
    Ok((prepared, job))
}

/// [`prepare`] of a line as read from a file.
pub fn prepare_line(line: &[u8], batch_id: &str, max_message_bytes: usize) -> Result<Prepared, String> {
    prepare_line_job(line, batch_id, max_message_bytes).map(|(p, _)| p)
}

/// [`prepare_job`] of a line as read from a file.
pub fn prepare_line_job(line: &[u8], batch_id: &str, max_message_bytes: usize) -> Result<(Prepared, Job), String> {
    let value: Value = serde_json::from_slice(line).map_err(|e| format!("not valid JSON: {e}"))?;
    prepare_job(value, batch_id, max_message_bytes)
}

/// A prepared line and where it came from.
#[derive(Debug, Clone)]
pub struct Pending {
    /// Its line in the file (1-based).
    pub line: u64,
    pub job: Prepared,
}

/// What one [`Publisher::flush`] did.
#[derive(Debug, Default)]
pub struct Flushed {
    /// Lines the broker confirmed.
    pub published: u64,
    /// Jobs not known before.
    pub new_jobs: i64,
    /// Lines the broker never confirmed, after retries.
    pub unconfirmed: Vec<u64>,
}

/// Publishes the lines of one batch on pooled confirm channels (`amqp::Channels`): a channel
/// that broke is replaced by the pool, reconnecting when the connection went.
pub struct Publisher<'a> {
    pool: &'a PgPool,
    batch_id: String,
    channels: amqp::Channels,
    /// The channels are this publisher's own (closed with it), not a process's shared ones.
    own: bool,
}

impl<'a> Publisher<'a> {
    /// A publisher with channels of its own, on a connection named `name`; fails at once when
    /// the broker cannot be reached.
    pub async fn connect(
        pool: &'a PgPool,
        amqp_url: &'a SecretString,
        batch_id: &str,
        name: &'static str,
    ) -> anyhow::Result<Publisher<'a>> {
        let channels = amqp::Channels::new(amqp_url, name);
        drop(channels.get().await?);
        Ok(Publisher {
            pool,
            batch_id: batch_id.to_string(),
            channels,
            own: true,
        })
    }

    /// A publisher on a process's shared channels.
    pub fn on(pool: &'a PgPool, channels: &amqp::Channels, batch_id: &str) -> Publisher<'a> {
        Publisher {
            pool,
            batch_id: batch_id.to_string(),
            channels: channels.clone(),
            own: false,
        }
    }

    /// Registers a chunk's jobs, then publishes it with confirms, publishing the unconfirmed
    /// lines again on a fresh channel after the retry policy's reconnect delay, up to four
    /// rounds. The chunk is emptied.
    pub async fn flush(&mut self, chunk: &mut Vec<Pending>) -> anyhow::Result<Flushed> {
        let mut out = Flushed::default();
        if chunk.is_empty() {
            return Ok(out);
        }
        // Rows first: a job is `queued` before any worker can see its message.
        let ids: Vec<String> = chunk.iter().map(|p| p.job.custom_id.clone()).collect();
        let models: Vec<String> = chunk.iter().map(|p| p.job.model.clone()).collect();
        let metadata: Vec<Option<Value>> = chunk.iter().map(|p| p.job.metadata.clone()).collect();
        out.new_jobs = crate::store::intake::register_queued(self.pool, &self.batch_id, &ids, &models, &metadata)
            .await
            .context("recording the batch in Postgres")?;

        let mut todo: Vec<&Pending> = chunk.iter().collect();
        let mut delays = crate::retry::reconnect();
        for round in 0..4 {
            if round > 0 {
                // The broker went away or refused some: publish those again.
                tokio::time::sleep(delays.next().unwrap_or(Duration::from_secs(1))).await;
            }
            let channel = match self.channels.get().await {
                Ok(ch) => ch,
                Err(e) => {
                    tracing::warn!(error = %e, "broker unreachable; retrying");
                    continue;
                }
            };
            let payloads: Vec<&[u8]> = todo.iter().map(|p| p.job.payload.as_slice()).collect();
            let results = amqp::publish_jobs(&channel, &payloads).await;
            drop(channel);
            let mut failed: Vec<&Pending> = Vec::new();
            for (p, r) in todo.iter().zip(results) {
                match r {
                    Ok(()) => out.published += 1,
                    Err(amqp::PublishError::Unroutable(q)) => {
                        anyhow::bail!("no queue {q} on the broker: run `sheepdog migrate` first")
                    }
                    Err(_) => failed.push(p),
                }
            }
            if failed.is_empty() {
                chunk.clear();
                return Ok(out);
            }
            tracing::warn!(lines = failed.len(), "publishes not confirmed; trying again");
            todo = failed;
        }
        out.unconfirmed.extend(todo.iter().map(|p| p.line));
        chunk.clear();
        Ok(out)
    }

    /// Closes the connection, when it is this publisher's own.
    pub async fn close(self) {
        if self.own {
            self.channels.close().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_gets_its_batch_and_keeps_its_rules() {
        let line = br#"{"custom_id":"a","body":{"model":"m","messages":[{"role":"user","content":"hi"}]}}"#;
        let p = prepare_line(line, "b1", 1 << 20).unwrap();
        let v: Value = serde_json::from_slice(&p.payload).unwrap();
        assert_eq!(v["batch_id"], "b1");
        assert_eq!((p.custom_id.as_str(), p.model.as_str()), ("a", "m"));
        assert!(prepare_line(b"{", "b1", 1 << 20)
            .unwrap_err()
            .contains("not valid JSON"));
        let other = br#"{"custom_id":"a","batch_id":"x","body":{"model":"m","messages":[{"role":"user"}]}}"#;
        assert!(prepare_line(other, "b1", 1 << 20).unwrap_err().contains("differs"));
        assert!(prepare_line(line, "b1", 20)
            .unwrap_err()
            .contains("larger than the maximum"));
    }
}
