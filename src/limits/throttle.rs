//! The upstream's own limit, shared by every replica, per model scope.
//!
//! A 429 pauses the scope for every replica: for its `Retry-After` the first time, then twice as
//! long for each 429 round in a row (with jitter, up to a cap), never shorter than the upstream
//! asked: the retry policy's `too_many_requests` schedule, from which the statement picks by the
//! round count the replicas share. When a pause ends, dispatch lets one call go first (the scope's "gate") and the rest
//! follow only once it has come back without a 429. `x-ratelimit-remaining-*` at zero holds the
//! scope until the matching `x-ratelimit-reset-*`, so replicas stop before the 429s start.

use crate::store::sql::{query, query_scalar, Standalone, StandaloneRun};
use std::time::Duration;

use sqlx::PgPool;

use crate::store::StoreError;

/// What the upstream said about its limit in one answer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum UpstreamLimit {
    /// A 429: hold off at least `retry_after` (1 s when it gave none), and at least until
    /// `reset` when its rate-limit headers said when room comes back.
    TooMany {
        retry_after: Option<Duration>,
        reset: Option<Duration>,
    },
    /// Answered, but the limit is used up until `reset`.
    Exhausted { reset: Duration },
}

async fn ensure_scope(pool: &PgPool, scope: &str) -> Result<(), StoreError> {
    query("INSERT INTO sheepdog.limit_scopes (scope) VALUES ($1) ON CONFLICT DO NOTHING")
        .bind(scope)
        .run(pool)
        .await?;
    Ok(())
}

/// Records a 429 for `scope`. Returns how long every replica now holds off.
pub async fn too_many(
    pool: &PgPool,
    scope: &str,
    retry_after: Option<Duration>,
    reset: Option<Duration>,
) -> Result<Duration, StoreError> {
    ensure_scope(pool, scope).await?;
    let base = retry_after
        .unwrap_or(Duration::from_secs(1))
        .max(Duration::from_millis(50));
    let schedule: Vec<f64> = crate::retry::too_many_requests(base)
        .iter()
        .map(Duration::as_secs_f64)
        .collect();
    let secs: f64 = query_scalar(
        r#"
        UPDATE sheepdog.limit_scopes s SET
            -- A 429 while already paused came from a call sent before the pause: same round.
            pause_streak = CASE WHEN s.paused_until > now() THEN s.pause_streak ELSE s.pause_streak + 1 END,
            paused_until = greatest(
                CASE WHEN s.paused_until > now() THEN s.paused_until
                     ELSE now() + make_interval(secs => $2[least(s.pause_streak, array_length($2, 1) - 1) + 1])
                END,
                now() + make_interval(secs => coalesce($3, 0))),
            pause_reason = format('the upstream answered 429 (%s in a row); holding off', 
                                  CASE WHEN s.paused_until > now() THEN s.pause_streak ELSE s.pause_streak + 1 END),
            gate_owner = NULL, gate_until = NULL
         WHERE s.scope = $1
        RETURNING extract(epoch FROM s.paused_until - now())::float8
        "#,
    )
    .bind(scope)
    .bind(&schedule)
    .bind(reset.map(|r| r.as_secs_f64()))
    .one(pool)
    .await?;
    Ok(Duration::from_secs_f64(secs.max(0.0)))
}

/// The upstream's headers say its limit is used up: hold `scope` until `reset`.
pub async fn exhausted(pool: &PgPool, scope: &str, reset: Duration, what: &str) -> Result<(), StoreError> {
    ensure_scope(pool, scope).await?;
    query(
        "UPDATE sheepdog.limit_scopes SET
            paused_until = greatest(coalesce(paused_until, now()), now() + make_interval(secs => $2)),
            pause_reason = $3
          WHERE scope = $1",
    )
    .bind(scope)
    .bind(reset.as_secs_f64())
    .bind(format!("the upstream's {what} limit is used up until its reset"))
    .run(pool)
    .await?;
    Ok(())
}

/// The first call after a pause came back without a 429: the others may go.
pub async fn first_passed(pool: &PgPool, scope: &str, replica: i64) -> Result<(), StoreError> {
    query(
        "UPDATE sheepdog.limit_scopes SET pause_streak = 0, gate_owner = NULL, gate_until = NULL,
                pause_reason = NULL
          WHERE scope = $1 AND gate_owner = $2",
    )
    .bind(scope)
    .bind(replica)
    .run(pool)
    .await?;
    Ok(())
}

/// The first call after a pause reached no answer (its job went back): let another go first.
pub async fn first_abandoned(pool: &PgPool, scope: &str, replica: i64) -> Result<(), StoreError> {
    query("UPDATE sheepdog.limit_scopes SET gate_owner = NULL, gate_until = NULL WHERE scope = $1 AND gate_owner = $2")
        .bind(scope)
        .bind(replica)
        .run(pool)
        .await?;
    Ok(())
}
