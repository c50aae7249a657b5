//! The outbox: messages written in the same transaction as the state they report, handed to
//! the broker after the commit. A publisher claims a batch of rows in one short statement (so
//! replicas publish different rows), publishes them with confirms, and deletes them in another:
//! a crash in between leaves the rows, published again once the claim lapses (at least once).
//!
//! No transaction stays open through the publish. One that did (rows locked `FOR UPDATE` until
//! the broker confirmed) held a transaction id for up to a second, and while any is open no row
//! version older than it can be pruned anywhere in the database (migration 0015).

use super::sql::{query, query_as, query_scalar, Standalone, StandaloneRun};
use serde_json::Value;
use sqlx::PgPool;

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

/// Rows claimed for publishing; `done` deletes them.
pub struct Taken {
    /// The replica that claimed them.
    replica: i64,
    /// Every row taken, by id.
    pub rows: Vec<i64>,
    pub messages: Vec<OutboxMessage>,
}

/// How long a claim holds at most, even while its replica lives: a publish that takes longer
/// (a broker that stopped confirming) is taken over by another publisher.
pub const CLAIM: std::time::Duration = std::time::Duration::from_secs(60);

/// Claims the oldest rows no publisher holds: up to `limit` rows, and no more rows than make
/// `max_messages` messages (at least one row). A claim holds while the replica that made it
/// is registered and for at most [`CLAIM`].
pub async fn take(pool: &PgPool, replica: i64, limit: i64, max_messages: usize) -> Result<Option<Taken>, StoreError> {
    // A look along the primary key first, so an empty outbox writes nothing. (Not `EXISTS`:
    // that scans the table, dead rows of published messages included.)
    let first: Option<i64> = query_scalar("SELECT id FROM sheepdog.outbox ORDER BY id LIMIT 1")
        .maybe(pool)
        .await?;
    if first.is_none() {
        return Ok(None);
    }
    // Rows locked by another claim being made now are skipped; rows past the message limit are
    // left unclaimed for the next round.
    let mut rows: Vec<Row> = query_as(
        "WITH free AS (
             SELECT o.id, coalesce(cardinality(o.job_custom_ids), 1) AS n FROM sheepdog.outbox o
              WHERE o.claimed_by IS NULL OR o.claimed_at < now() - make_interval(secs => $4)
                 OR NOT EXISTS (SELECT 1 FROM sheepdog.replicas r WHERE r.id = o.claimed_by)
              ORDER BY o.id LIMIT $2 FOR UPDATE OF o SKIP LOCKED
         ), upto AS (
             SELECT id, sum(n) OVER (ORDER BY id) - n AS before FROM free
         )
         UPDATE sheepdog.outbox o SET claimed_by = $1, claimed_at = now()
           FROM upto WHERE o.id = upto.id AND (upto.before < $3 OR upto.before = 0)
         RETURNING o.id, o.exchange, o.routing_key, o.headers, o.body, o.job_custom_id, o.job_custom_ids",
    )
    .bind(replica)
    .bind(limit)
    .bind(max_messages as i64)
    .bind(CLAIM.as_secs_f64())
    .all(pool)
    .await?;
    if rows.is_empty() {
        return Ok(None);
    }
    rows.sort_unstable_by_key(|r| r.0);
    let mut taken = Taken {
        replica,
        rows: rows.iter().map(|r| r.0).collect(),
        messages: Vec::new(),
    };
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
        let read = query_as(JOBS.as_str()).bind(&batches).bind(&customs).all(pool).await;
        let jobs: Vec<super::report::EndedJob> = match read {
            Ok(jobs) => jobs,
            Err(e) => {
                // Nothing goes out this round: the rows are given back at once rather than
                // held until the claim lapses (a failed release leaves that to the lapse).
                let _ = taken.done(pool, &[]).await;
                return Err(e.into());
            }
        };
        for j in jobs {
            let body = j.finished_event();
            events.insert((j.batch_id, j.custom_id), body);
        }
    }
    let messages = &mut taken.messages;
    messages.reserve(customs.len().max(rows.len()));
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
    Ok(Some(taken))
}

impl Taken {
    /// Deletes the rows whose messages were all published (by id) and gives up the claim on the
    /// rest, for the next round, in one statement.
    pub async fn done(self, pool: &PgPool, published: &[i64]) -> Result<(), StoreError> {
        let kept: Vec<i64> = self.rows.iter().copied().filter(|id| !published.contains(id)).collect();
        query(
            "WITH gone AS (DELETE FROM sheepdog.outbox WHERE id = ANY($1))
             UPDATE sheepdog.outbox SET claimed_by = NULL, claimed_at = NULL
              WHERE id = ANY($2) AND claimed_by = $3",
        )
        .bind(published)
        .bind(&kept)
        .bind(self.replica)
        .run(pool)
        .await?;
        Ok(())
    }
}

/// Messages waiting to be published.
pub async fn depth(pool: &PgPool) -> Result<i64, StoreError> {
    Ok(query_scalar("SELECT count(*) FROM sheepdog.outbox").one(pool).await?)
}
