//! The outbox: messages written in the same transaction as the state they report, handed to
//! the broker after the commit. A batch is taken under row locks (so replicas publish different
//! rows), published with confirms, and deleted in the same transaction: a crash in between
//! leaves the rows, to be published again (at least once).

use super::sql::{query, query_as, query_scalar, Standalone};
use serde_json::Value;
use sqlx::{PgPool, Postgres, Transaction};

use super::StoreError;

/// One message to publish.
#[derive(Debug, Clone)]
pub struct OutboxMessage {
    /// The outbox row it comes from (a row of `job.finished` events holds many).
    pub id: i64,
    pub exchange: String,
    pub routing_key: String,
    pub headers: sqlx::types::Json<Value>,
    /// `None` for the event of a job that no longer exists: nothing to publish.
    pub body: Option<Vec<u8>>,
}

/// An outbox row: id, exchange, routing key, headers, body, and the jobs of `job.finished`
/// events (`job_custom_id` in rows of earlier versions, one job each).
type Row = (
    i64,
    String,
    String,
    sqlx::types::Json<Value>,
    Vec<u8>,
    Option<String>,
    Option<Vec<String>>,
);

/// Rows taken for publishing; `done` deletes them and commits.
pub struct Taken {
    tx: Transaction<'static, Postgres>,
    /// Every row taken, by id.
    pub rows: Vec<i64>,
    pub messages: Vec<OutboxMessage>,
}

/// Takes the oldest rows that no other replica is publishing: up to `limit` rows, and no more
/// rows than make `max_messages` messages (at least one row).
pub async fn take(pool: &PgPool, limit: i64, max_messages: usize) -> Result<Option<Taken>, StoreError> {
    // A look along the primary key first, so an empty outbox costs no transaction. (Not
    // `EXISTS`: that scans the table, dead rows of published messages included.)
    let first: Option<i64> = query_scalar("SELECT id FROM sheepdog.outbox ORDER BY id LIMIT 1")
        .maybe(pool)
        .await?;
    if first.is_none() {
        return Ok(None);
    }
    let mut tx = pool.begin().await?;
    let mut rows: Vec<Row> = query_as(
        "SELECT id, exchange, routing_key, headers, body, job_custom_id, job_custom_ids FROM sheepdog.outbox
          ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
    )
    .bind(limit)
    .fetch_all(&mut *tx)
    .await?;
    // Rows past the message limit stay as they are (unlocked at the commit) for the next round.
    let mut count = 0;
    let keep = rows
        .iter()
        .position(|r| {
            count += r.6.as_ref().map_or(1, Vec::len);
            count > max_messages
        })
        .unwrap_or(rows.len())
        .max(1);
    rows.truncate(keep);
    if rows.is_empty() {
        return Ok(None);
    }
    // The bodies of `job.finished` events, built from their jobs as they are now (ended).
    let mut batches: Vec<&str> = Vec::new();
    let mut customs: Vec<&str> = Vec::new();
    for r in &rows {
        for c in r.5.iter().chain(r.6.iter().flatten()) {
            batches.push(r.2.as_str());
            customs.push(c.as_str());
        }
    }
    let mut events = std::collections::HashMap::new();
    if !customs.is_empty() {
        static JOBS: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
            format!(
                "SELECT {} FROM unnest($1::text[], $2::text[]) AS e(batch_id, custom_id)
                   JOIN sheepdog.jobs j ON j.batch_id = e.batch_id AND j.custom_id = e.custom_id",
                super::report::ENDED_JOB
            )
        });
        let jobs: Vec<super::report::EndedJob> = query_as(JOBS.as_str())
            .bind(&batches)
            .bind(&customs)
            .fetch_all(&mut *tx)
            .await?;
        for j in jobs {
            let body = j.finished_event();
            events.insert((j.batch_id, j.custom_id), body);
        }
    }
    let ids = rows.iter().map(|r| r.0).collect();
    let mut messages = Vec::with_capacity(customs.len().max(rows.len()));
    for (id, exchange, routing_key, headers, body, job, jobs) in rows {
        if job.is_none() && jobs.is_none() {
            messages.push(OutboxMessage {
                id,
                exchange,
                routing_key,
                headers,
                body: Some(body),
            });
            continue;
        }
        for custom_id in job.into_iter().chain(jobs.into_iter().flatten()) {
            messages.push(OutboxMessage {
                id,
                exchange: exchange.clone(),
                routing_key: routing_key.clone(),
                headers: headers.clone(),
                body: events.remove(&(routing_key.clone(), custom_id)),
            });
        }
    }
    Ok(Some(Taken {
        tx,
        rows: ids,
        messages,
    }))
}

impl Taken {
    /// Deletes the rows whose messages were all published (by id) and commits.
    pub async fn done(mut self, published: &[i64]) -> Result<(), StoreError> {
        query("DELETE FROM sheepdog.outbox WHERE id = ANY($1)")
            .bind(published)
            .execute(&mut *self.tx)
            .await?;
        self.tx.commit().await?;
        Ok(())
    }
}

/// Messages waiting to be published.
pub async fn depth(pool: &PgPool) -> Result<i64, StoreError> {
    Ok(query_scalar("SELECT count(*) FROM sheepdog.outbox").one(pool).await?)
}
