//! Which replicas are alive, and taking over the jobs of those that are not.
//!
//! A replica registers a row, then holds a session-level advisory lock on a connection of its
//! own and touches its row every second. When a process dies, even by `kill -9`, the kernel
//! closes its socket, Postgres ends the session and the lock is gone at once. A replica is dead
//! when its lock is gone and its heartbeat is older than the takeover time, counted from no
//! earlier than the database's own start (so a database restart kills nobody). A live replica
//! holds its lock however long its calls run, so its work is never taken over.

use super::sql::{query, query_as, query_scalar, Standalone};
use std::time::Duration;

use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection, PgPool};

use super::StoreError;

/// The first key of every replica's advisory lock (`'shee'`); the second is the replica's id.
const LOCK_CLASS: i32 = 0x7368_6565;

fn lock_key(id: i64) -> i32 {
    (id % i32::MAX as i64) as i32
}

/// Registers a replica; returns its id.
pub async fn register(pool: &PgPool, name: &str, concurrency: u16) -> Result<i64, StoreError> {
    Ok(
        query_scalar("INSERT INTO sheepdog.replicas (name, concurrency) VALUES ($1, $2) RETURNING id")
            .bind(name)
            .bind(i32::from(concurrency))
            .one(pool)
            .await?,
    )
}

/// The connection that proves a replica alive: it holds the replica's advisory lock.
pub struct LifeLine {
    conn: PgConnection,
    id: i64,
}

impl LifeLine {
    /// Connects and takes the replica's lock. The server is told to probe the connection, so a
    /// replica cut off by the network loses its lock within about half a minute too.
    pub async fn open(opts: &PgConnectOptions, id: i64) -> Result<LifeLine, StoreError> {
        let mut conn = PgConnection::connect_with(opts).await?;
        for set in [
            "SET tcp_keepalives_idle = 10",
            "SET tcp_keepalives_interval = 5",
            "SET tcp_keepalives_count = 3",
        ] {
            let _ = query(set).execute(&mut conn).await;
        }
        query("SELECT pg_advisory_lock($1, $2)")
            .bind(LOCK_CLASS)
            .bind(lock_key(id))
            .execute(&mut conn)
            .await?;
        Ok(LifeLine { conn, id })
    }

    /// Touches the replica's row. `Ok(false)`: the row is gone, so other replicas took this
    /// one for dead and took over its jobs.
    pub async fn beat(&mut self) -> Result<bool, StoreError> {
        let r = query("UPDATE sheepdog.replicas SET last_seen = now() WHERE id = $1")
            .bind(self.id)
            .execute(&mut self.conn)
            .await?;
        Ok(r.rows_affected() == 1)
    }

    pub async fn close(self) {
        let _ = self.conn.close().await;
    }
}

/// What a takeover did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TakenOver {
    pub replicas: Vec<String>,
    /// Jobs back in the backlog.
    pub requeued: i64,
    /// Jobs that ended instead: out of attempts, or their batch cancelled or expired.
    pub failed: i64,
    /// `pending` calls turned `unknown`.
    pub unknown_calls: i64,
}

/// Takes over the jobs of dead replicas (see the module doc). Several replicas may run this
/// at once: each dead replica is taken over by one of them.
pub async fn take_over_dead(
    pool: &PgPool,
    takeover_after: Duration,
    max_attempts: u32,
) -> Result<TakenOver, StoreError> {
    let mut tx = pool.begin().await?;
    let dead: Vec<(i64, String)> = query_as(
        "SELECT r.id, r.name FROM sheepdog.replicas r
          WHERE greatest(r.last_seen, pg_postmaster_start_time()) < now() - make_interval(secs => $1)
            AND NOT EXISTS (
                SELECT 1 FROM pg_locks l
                 WHERE l.locktype = 'advisory' AND l.granted AND l.classid::bigint = $2::bigint
                   AND l.objid::bigint = (r.id % 2147483647) AND l.objsubid = 2
                   AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()))
          FOR UPDATE SKIP LOCKED",
    )
    .bind(takeover_after.as_secs_f64())
    .bind(LOCK_CLASS as i64)
    .fetch_all(&mut *tx)
    .await?;
    if dead.is_empty() {
        return Ok(TakenOver::default());
    }
    let ids: Vec<i64> = dead.iter().map(|d| d.0).collect();
    let mut t = release_jobs(&mut tx, &ids, max_attempts).await?;
    tx.commit().await?;
    t.replicas = dead.into_iter().map(|d| format!("{} (#{})", d.1, d.0)).collect();
    Ok(t)
}

/// A replica stopping hands its jobs back itself (those it could not finish in its grace).
pub async fn release_own(pool: &PgPool, id: i64, max_attempts: u32) -> Result<TakenOver, StoreError> {
    let mut tx = pool.begin().await?;
    let t = release_jobs(&mut tx, &[id], max_attempts).await?;
    tx.commit().await?;
    Ok(t)
}

type Counts = (i64, i64, i64);

/// The takeover itself, for replicas whose rows the caller has locked: their `pending` calls
/// become `unknown`, charged at their reservation (the budgets spend it, the jobs cost it);
/// their jobs go back to the backlog, or fail when out of attempts; their rows go.
async fn release_jobs(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    ids: &[i64],
    max_attempts: u32,
) -> Result<TakenOver, StoreError> {
    let (requeued, failed, unknown): Counts = query_as(&format!(
        r#"
        WITH stale AS (
            UPDATE sheepdog.calls c
               SET outcome = 'unknown', cost_usd = c.reserved_cost_usd, finished_at = now(),
                   error = 'its worker stopped before recording the answer; charged at its reservation'
             WHERE c.replica_id = ANY($1) AND c.outcome = 'pending'
            RETURNING c.batch_id, c.custom_id, c.attempt, c.started_at, c.reserved_cost_usd, c.budget_keys
        ), spend AS (
            UPDATE sheepdog.budget b SET spent = b.spent + x.r, reserved = b.reserved - x.r
              FROM (SELECT regexp_replace(k, '\|[^|]*$', '') AS scope, regexp_replace(k, '^.*\|', '') AS pk,
                           sum(stale.reserved_cost_usd) AS r
                      FROM stale CROSS JOIN LATERAL unnest(stale.budget_keys) AS k GROUP BY 1, 2) x
             WHERE b.scope = x.scope AND b.period_key = x.pk
        ), fate AS (
            -- Out of attempts: failed. A batch cancelled or past its deadline: so ends its job.
            SELECT stale.batch_id, stale.custom_id, stale.attempt, stale.started_at,
                   stale.reserved_cost_usd AS cost,
                   coalesce(sheepdog.batch_end(bt.control, bt.expires_at),
                            CASE WHEN stale.attempt >= $2 THEN 'failed' ELSE 'queued' END) AS status
              FROM stale LEFT JOIN sheepdog.batches bt ON bt.batch_id = stale.batch_id
        ), before AS (
            SELECT j.batch_id, j.custom_id,
                   sheepdog.job_message(j.batch_id, j.custom_id, j.request, j.metadata, j.message) AS message
              FROM sheepdog.jobs j JOIN fate f ON f.batch_id = j.batch_id AND f.custom_id = j.custom_id
             WHERE f.status = 'failed'
        ), job AS (
            UPDATE sheepdog.jobs j SET
                status = f.status,
                owner = NULL,
                attempts = greatest(j.attempts, f.attempt),
                started_at = coalesce(j.started_at, f.started_at),
                cost_usd = j.cost_usd + f.cost,
                error = CASE f.status
                    WHEN 'failed' THEN jsonb_build_object('code', 'attempts_exhausted', 'message',
                         format('gave up after %s attempts; last: its worker stopped mid-call', f.attempt))
                    WHEN 'cancelled' THEN sheepdog.batch_end_error(f.status)
                    WHEN 'expired' THEN sheepdog.batch_end_error(f.status)
                    ELSE j.error END,
                finished_at = CASE WHEN f.status = 'queued' THEN NULL ELSE now() END,
                request = CASE WHEN f.status = 'queued' THEN j.request END,
                message = CASE WHEN f.status = 'queued' THEN j.message END
              FROM fate f
             WHERE j.batch_id = f.batch_id AND j.custom_id = f.custom_id AND j.status IN ('queued', 'running')
            RETURNING j.*
        ), back AS (
            -- Taken over, a job keeps its place in line: it goes before those that came later.
            INSERT INTO sheepdog.backlog (model, batch_id, seq, custom_id, attempts, reserve_tokens, reserve_cost_usd)
            SELECT job.model, job.batch_id, coalesce(job.seq, nextval('sheepdog.backlog_seq')), job.custom_id,
                   job.attempts, coalesce(job.reserve_tokens, 0), coalesce(job.reserve_cost_usd, 0)
              FROM job WHERE job.status = 'queued'
        ), dead AS (
            INSERT INTO sheepdog.outbox (routing_key, headers, body)
            SELECT 'sheepdog.dead',
                   jsonb_build_object('x-sheepdog-error',
                       format('gave up after %s attempts; last: its worker stopped mid-call', job.attempts)),
                   before.message
              FROM job JOIN before ON before.batch_id = job.batch_id AND before.custom_id = job.custom_id
             WHERE job.status = 'failed' AND before.message IS NOT NULL
        ), counted AS (
            INSERT INTO sheepdog.batch_progress (batch_id, failed, cancelled, expired, calls, cost_usd, finished_at)
            SELECT batch_id, sum(bad), sum(canc), sum(exp), sum(calls), sum(cost), max(fin)
              FROM (SELECT batch_id, 0 AS bad, 0 AS canc, 0 AS exp, 1 AS calls, reserved_cost_usd AS cost,
                           NULL::timestamptz AS fin FROM stale
                    UNION ALL
                    SELECT batch_id, (status = 'failed')::int, (status = 'cancelled')::int,
                           (status = 'expired')::int, 0, 0, finished_at
                      FROM job WHERE status <> 'queued') x
             GROUP BY batch_id
        ), events AS (
            {FINISHED_EVENTS} FROM job j WHERE j.status <> 'queued' GROUP BY j.batch_id
        ), gone AS (
            DELETE FROM sheepdog.replicas WHERE id = ANY($1)
        )
        SELECT (SELECT count(*) FROM job WHERE status = 'queued'),
               (SELECT count(*) FROM job WHERE status <> 'queued'),
               (SELECT count(*) FROM stale)
        "#,
        FINISHED_EVENTS = super::batches::FINISHED_EVENTS
    ))
    .bind(ids)
    .bind(max_attempts as i32)
    .fetch_one(&mut **tx)
    .await?;
    Ok(TakenOver {
        replicas: Vec::new(),
        requeued,
        failed,
        unknown_calls: unknown,
    })
}
