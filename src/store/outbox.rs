//! The outbox: messages written in the same transaction as the state they report, handed to
//! the broker after the commit. A batch is taken under row locks (so replicas publish different
//! rows), published with confirms, and deleted in the same transaction: a crash in between
//! leaves the rows, to be published again (at least once).

use serde_json::Value;
use sqlx::{PgPool, Postgres, Transaction};

use super::StoreError;

/// One message to publish.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct OutboxMessage {
    pub id: i64,
    pub exchange: String,
    pub routing_key: String,
    pub headers: sqlx::types::Json<Value>,
    pub body: Vec<u8>,
}

/// Rows taken for publishing; `done` deletes them and commits.
pub struct Taken {
    tx: Transaction<'static, Postgres>,
    pub messages: Vec<OutboxMessage>,
}

/// Takes up to `limit` messages, oldest first, that no other replica is publishing.
pub async fn take(pool: &PgPool, limit: i64) -> Result<Option<Taken>, StoreError> {
    let waiting: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM sheepdog.outbox)")
        .fetch_one(pool)
        .await?;
    if !waiting {
        return Ok(None);
    }
    let mut tx = pool.begin().await?;
    let messages: Vec<OutboxMessage> = sqlx::query_as(
        "SELECT id, exchange, routing_key, headers, body FROM sheepdog.outbox
          ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
    )
    .bind(limit)
    .fetch_all(&mut *tx)
    .await?;
    if messages.is_empty() {
        return Ok(None);
    }
    Ok(Some(Taken { tx, messages }))
}

impl Taken {
    /// Deletes the messages that were published (by id) and commits.
    pub async fn done(mut self, published: &[i64]) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM sheepdog.outbox WHERE id = ANY($1)")
            .bind(published)
            .execute(&mut *self.tx)
            .await?;
        self.tx.commit().await?;
        Ok(())
    }
}

/// Messages waiting to be published.
pub async fn depth(pool: &PgPool) -> Result<i64, StoreError> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM sheepdog.outbox")
        .fetch_one(pool)
        .await?)
}
