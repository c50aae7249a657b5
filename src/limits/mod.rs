//! Limits shared by every replica: token buckets for requests and tokens, spend budgets, the
//! upstream's own pauses and the circuit breakers, per scope (`*` for all models together, or
//! one model). Their state lives in Postgres; dispatch (`store::dispatch`) reads and takes from
//! it in one locked transaction on the database clock, so no replica ever calls on a decision
//! made from a copy that may be stale.

pub mod breaker;
pub mod throttle;

use crate::store::sql::{query, query_as, Standalone};
use rust_decimal::Decimal;
use sqlx::PgPool;

pub use crate::plan::ALL;
use crate::store::StoreError;

/// A budget's period (UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::Type, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[sqlx(type_name = "text", rename_all = "lowercase")]
#[serde(rename_all = "lowercase")]
pub enum BudgetPeriod {
    Day,
    Month,
    Total,
}

impl BudgetPeriod {
    pub fn as_str(self) -> &'static str {
        match self {
            BudgetPeriod::Day => "day",
            BudgetPeriod::Month => "month",
            BudgetPeriod::Total => "total",
        }
    }
}

/// A change to a scope's limits: `None` keeps a value, zero means unlimited.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LimitChange {
    pub rpm: Option<Decimal>,
    pub tpm: Option<Decimal>,
    /// Seconds of a rate that may go at once (all scopes share the `*` scope's value).
    pub burst_seconds: Option<Decimal>,
    pub budget_usd: Option<Decimal>,
    pub budget_period: Option<BudgetPeriod>,
}

impl LimitChange {
    pub fn is_empty(&self) -> bool {
        *self == LimitChange::default()
    }
}

/// Reads a limits file (`SHEEPDOG_LIMITS_FILE`, contract §6): a JSON object keyed by scope
/// (`*` for all models together, or a model name), each with any of `rpm`, `tpm`, `budget_usd`,
/// `budget_period` (and `burst_seconds` for `*`). Amounts are read exactly, never through floats.
/// Returns the scopes in the order to apply them: `*` first, then the models by name.
pub fn parse_limits_file(text: &str) -> anyhow::Result<Vec<(String, LimitChange)>> {
    use anyhow::Context;
    let value: serde_json::Value = serde_json::from_str(text).context("the limits file is not valid JSON")?;
    let obj = value
        .as_object()
        .context("the limits file must be a JSON object keyed by scope (\"*\" or a model name)")?;
    let mut out = Vec::with_capacity(obj.len());
    for (scope, entry) in obj {
        let fields = entry
            .as_object()
            .with_context(|| format!("limits file: {scope:?} must be an object of limits"))?;
        let mut change = LimitChange::default();
        for (key, v) in fields {
            let what = format!("limits file: {scope}.{key}");
            match key.as_str() {
                "rpm" => change.rpm = Some(crate::money::non_negative(v, &what)?),
                "tpm" => change.tpm = Some(crate::money::non_negative(v, &what)?),
                "budget_usd" => change.budget_usd = Some(crate::money::non_negative(v, &what)?),
                "burst_seconds" if scope == ALL => change.burst_seconds = Some(crate::money::non_negative(v, &what)?),
                "burst_seconds" => {
                    anyhow::bail!("{what}: burst seconds are set for \"*\" only; every scope shares them")
                }
                "budget_period" => {
                    change.budget_period = Some(match v.as_str() {
                        Some("day") => BudgetPeriod::Day,
                        Some("month") => BudgetPeriod::Month,
                        Some("total") => BudgetPeriod::Total,
                        _ => anyhow::bail!("{what} must be \"day\", \"month\" or \"total\""),
                    })
                }
                other => anyhow::bail!(
                    "limits file: {scope}.{other} is not a limit (rpm, tpm, budget_usd, budget_period, burst_seconds)"
                ),
            }
        }
        out.push((scope.clone(), change));
    }
    out.sort_by(|a, b| (a.0 != ALL, &a.0).cmp(&(b.0 != ALL, &b.0)));
    Ok(out)
}

/// Stores several scopes' limits (a limits file, a worker's settings), then waits once for the
/// calls granted under the old limits to leave.
pub async fn apply_all(pool: &PgPool, changes: &[(String, LimitChange)]) -> anyhow::Result<()> {
    for (scope, change) in changes {
        store_limits(pool, scope, change).await?;
    }
    tokio::time::sleep(SETTLE_TIME).await;
    Ok(())
}

/// Stores the limits of `scope` (`*` or a model). `0` means unlimited; a field left `None`
/// keeps its value. A rate limit switched on starts with its burst used and one changed keeps
/// its level; token limits are sliding windows over what calls used; a budget switched on counts
/// what the ledger already spent in its period. From the moment this returns, every call of
/// every replica is held to the new values.
pub async fn apply(pool: &PgPool, scope: &str, l: &LimitChange) -> anyhow::Result<()> {
    store_limits(pool, scope, l).await?;
    // Dispatch takes the all-models row's lock, so no call is granted under the old limits
    // once this committed. Calls granted just before reach the upstream within milliseconds;
    // returning after they have keeps "from the moment this returns" true at the upstream.
    tokio::time::sleep(SETTLE_TIME).await;
    Ok(())
}

async fn store_limits(pool: &PgPool, scope: &str, l: &LimitChange) -> anyhow::Result<()> {
    anyhow::ensure!(!scope.is_empty(), "a scope is \"*\" or a model name, not empty");
    for (name, v) in [("rpm", &l.rpm), ("tpm", &l.tpm), ("budget", &l.budget_usd)] {
        if let Some(v) = v {
            anyhow::ensure!(*v >= Decimal::ZERO, "{name} must not be negative");
        }
    }
    if let Some(b) = l.burst_seconds {
        anyhow::ensure!(b > Decimal::ZERO, "burst seconds must be positive");
        anyhow::ensure!(
            scope == ALL,
            "burst seconds apply to every scope; set them without --model"
        );
    }
    let unset = |v: &Option<Decimal>| v.map(|v| if v.is_zero() { None } else { Some(v) });
    let (rpm, tpm, budget) = (unset(&l.rpm), unset(&l.tpm), unset(&l.budget_usd));
    let mut tx = pool.begin().await.map_err(StoreError::from)?;
    // The lock every dispatch takes first: once this commits, every dispatch reads the new values.
    crate::store::dispatch::lock(&mut tx).await?;
    query("INSERT INTO sheepdog.limit_scopes (scope) VALUES ($1) ON CONFLICT DO NOTHING")
        .bind(scope)
        .execute(&mut *tx)
        .await?;
    // Which budget to recount: switched on, or moved to another period.
    let (had_budget, old_period, had_tpm): (bool, BudgetPeriod, bool) = query_as(
        "SELECT budget_usd IS NOT NULL, budget_period, tpm IS NOT NULL FROM sheepdog.limit_scopes
          WHERE scope = $1 FOR UPDATE",
    )
    .bind(scope)
    .fetch_one(&mut *tx)
    .await?;
    query(
        r#"
        WITH old AS (
            SELECT s.*, greatest(extract(epoch FROM now() - s.bucket_at), 0) AS dt
              FROM sheepdog.limit_scopes s WHERE s.scope = $1
        ), g AS (
            SELECT coalesce($6, burst_seconds) AS burst FROM sheepdog.limit_scopes WHERE scope = '*'
        ), new AS (
            SELECT CASE WHEN $2 THEN $3 ELSE old.rpm END AS rpm,
                   CASE WHEN $4 THEN $5 ELSE old.tpm END AS tpm,
                   greatest(g.burst - $10, $10) AS usable
              FROM old, g
        )
        UPDATE sheepdog.limit_scopes s SET
            rpm = new.rpm,
            tpm = new.tpm,
            -- A request limit switched on starts with its burst used (the moment a limit goes on,
            -- often as workers start, is when calls reach the upstream least evenly); one
            -- changed keeps its level.
            req_level = CASE
                WHEN new.rpm IS NULL THEN 0
                WHEN old.rpm IS NULL THEN 0
                ELSE least(new.rpm * new.usable / 60, old.req_level + old.dt * old.rpm / 60) END,
            bucket_at = now(),
            burst_seconds = CASE WHEN $1 = '*' THEN g.burst ELSE s.burst_seconds END,
            budget_usd = CASE WHEN $7 THEN $8 ELSE s.budget_usd END,
            budget_period = coalesce($9, s.budget_period),
            updated_at = now()
          FROM old, g, new
         WHERE s.scope = $1
        "#,
    )
    .bind(scope)
    .bind(rpm.is_some())
    .bind(rpm.flatten())
    .bind(tpm.is_some())
    .bind(tpm.flatten())
    .bind(l.burst_seconds)
    .bind(budget.is_some())
    .bind(budget.flatten())
    // As text: an enum bound as itself has its type looked up by name, in a prepared statement
    // of sqlx's own that a pooler in transaction mode cannot keep.
    .bind(l.budget_period.map(BudgetPeriod::as_str))
    .bind(crate::plan::JITTER_SECONDS.parse::<Decimal>().unwrap())
    .execute(&mut *tx)
    .await?;
    // A token limit switched on, likewise, starts with its burst used: a burst's worth counted
    // in the current tenth of a second.
    query(
        "INSERT INTO sheepdog.token_slots AS t (scope, slot, tokens)
         SELECT s.scope, floor(extract(epoch FROM now()) * 10)::bigint,
                s.tpm * greatest(g.burst_seconds - $3, $3) / 60
           FROM sheepdog.limit_scopes s, (SELECT burst_seconds FROM sheepdog.limit_scopes WHERE scope = '*') g
          WHERE s.scope = $1 AND s.tpm IS NOT NULL AND $2
         ON CONFLICT (scope, slot) DO UPDATE SET tokens = t.tokens + EXCLUDED.tokens",
    )
    .bind(scope)
    .bind(!had_tpm)
    .bind(crate::plan::JITTER_SECONDS.parse::<Decimal>().unwrap())
    .execute(&mut *tx)
    .await?;
    let has_budget = budget.map_or(had_budget, |b| b.is_some());
    let period_moved = l.budget_period.is_some_and(|p| p != old_period);
    if has_budget && (!had_budget || period_moved) {
        recount_budget(&mut tx, scope).await?;
    }
    tx.commit().await?;
    Ok(())
}

/// How long `apply` waits after its commit for calls granted under the old limits to leave.
const SETTLE_TIME: std::time::Duration = std::time::Duration::from_millis(100);

/// Counts a budget's current period from the ledger: what calls spent, and what calls in
/// flight reserved under this budget (those reserved elsewhere count at their reservation).
async fn recount_budget(tx: &mut sqlx::Transaction<'_, sqlx::Postgres>, scope: &str) -> Result<(), StoreError> {
    query(
        r#"
        WITH s AS (
            SELECT scope, budget_period,
                   sheepdog.budget_period_key(budget_period, now()) AS pk,
                   sheepdog.budget_period_start(budget_period, now()) AS since
              FROM sheepdog.limit_scopes WHERE scope = $1
        ), c AS (
            SELECT coalesce(sum(c.cost_usd) FILTER (WHERE c.outcome <> 'pending'), 0)
                 + coalesce(sum(c.reserved_cost_usd) FILTER (
                       WHERE c.outcome = 'pending' AND NOT (s.scope || '|' || s.pk) = ANY(coalesce(c.budget_keys, '{}'))), 0)
                   AS spent,
                   coalesce(sum(c.reserved_cost_usd) FILTER (
                       WHERE c.outcome = 'pending' AND (s.scope || '|' || s.pk) = ANY(coalesce(c.budget_keys, '{}'))), 0)
                   AS reserved
              FROM s LEFT JOIN sheepdog.calls c
                ON c.started_at >= s.since AND (s.scope = '*' OR c.model = s.scope)
        )
        INSERT INTO sheepdog.budget AS b (scope, period_key, spent, reserved)
        SELECT s.scope, s.pk, c.spent, c.reserved FROM s, c
        ON CONFLICT (scope, period_key) DO UPDATE SET spent = EXCLUDED.spent, reserved = EXCLUDED.reserved
        "#,
    )
    .bind(scope)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// One row of `sheepdog.limit_usage`: a scope's limits and their use.
#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct ScopeUsage {
    pub scope: String,
    pub rpm: Option<Decimal>,
    pub tpm: Option<Decimal>,
    pub burst_seconds: Decimal,
    pub budget_usd: Option<Decimal>,
    pub budget_period: String,
    pub budget_period_key: String,
    pub budget_spent_usd: Decimal,
    pub budget_reserved_usd: Decimal,
    pub budget_left_usd: Option<Decimal>,
    pub requests_last_minute: i64,
    pub tokens_last_minute: Decimal,
    pub paused_until: Option<chrono::DateTime<chrono::Utc>>,
    pub pause_reason: Option<String>,
}

/// Every scope's limits and use, `*` first.
pub async fn usage(pool: &PgPool) -> Result<Vec<ScopeUsage>, StoreError> {
    usage_reading(pool, "requests_last_minute, tokens_last_minute::numeric").await
}

/// Every scope's limits and budgets as [`usage`] gives them, without the use of the last minute
/// (zero here): that part reads the last minute of calls, the rest a few rows.
pub async fn usage_without_last_minute(pool: &PgPool) -> Result<Vec<ScopeUsage>, StoreError> {
    // Columns of the view left unread are not computed, the calls they read not read.
    usage_reading(
        pool,
        "0::bigint AS requests_last_minute, 0::numeric AS tokens_last_minute",
    )
    .await
}

/// How old the last minute's use that [`usage_shared`] gives may be: one replica reads it from
/// the calls at most this often, for all replicas (`sheepdog.last_minute_use`).
pub const SHARED_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Every scope's limits and budgets now, as [`usage`] gives them, with the use of the last minute
/// as a replica read it from the calls at most [`SHARED_EVERY`] ago: for the replicas' gauges.
/// Each replica read the last minute of calls itself, so N replicas read the same rows N times;
/// now the one replica that finds the shared row due and locks it first reads them, and the
/// others take the row as it is.
pub async fn usage_shared(pool: &PgPool) -> Result<Vec<ScopeUsage>, StoreError> {
    let mut scopes = usage_without_last_minute(pool).await?;
    let recent: Vec<(String, i64, Decimal)> = query_as(
        "WITH mine AS (
             SELECT one FROM sheepdog.last_minute_use
              WHERE read_at <= now() - make_interval(secs => $1)
                FOR UPDATE SKIP LOCKED
         ), fresh AS (
             -- The calls are read only when this statement holds the row (a subquery of the
             -- row's new values: never run when no row is updated).
             UPDATE sheepdog.last_minute_use u
                SET read_at = now(),
                    (scopes, requests, tokens) = (
                        SELECT coalesce(array_agg(scope), '{}'), coalesce(array_agg(requests_last_minute), '{}'),
                               coalesce(array_agg(tokens_last_minute::numeric), '{}')
                          FROM sheepdog.limit_usage)
               FROM mine
              WHERE u.one = mine.one
             RETURNING u.scopes, u.requests, u.tokens
         ), known AS (
             SELECT scopes, requests, tokens FROM fresh
             UNION ALL
             SELECT scopes, requests, tokens FROM sheepdog.last_minute_use
              WHERE NOT EXISTS (SELECT FROM fresh)
         )
         SELECT x.scope, x.requests, x.tokens
           FROM (SELECT * FROM known LIMIT 1) k,
                unnest(k.scopes, k.requests, k.tokens) AS x(scope, requests, tokens)",
    )
    .bind(SHARED_EVERY.as_secs_f64())
    .all(pool)
    .await?;
    for s in scopes.iter_mut() {
        if let Some((_, requests, tokens)) = recent.iter().find(|(scope, ..)| *scope == s.scope) {
            s.requests_last_minute = *requests;
            s.tokens_last_minute = *tokens;
        }
    }
    Ok(scopes)
}

/// `limit_usage` with `last_minute` as its two columns of the last minute's use.
async fn usage_reading(pool: &PgPool, last_minute: &str) -> Result<Vec<ScopeUsage>, StoreError> {
    let sql = format!(
        "SELECT scope, rpm, tpm, burst_seconds, budget_usd, budget_period, budget_period_key, budget_spent_usd,
                budget_reserved_usd, budget_left_usd, {last_minute}, paused_until, pause_reason
           FROM sheepdog.limit_usage ORDER BY scope <> '*', scope"
    );
    Ok(query_as(&sql).all(pool).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_contracts_limits_file_reads_exactly() {
        let text = r#"{"*": {"rpm": 3000, "tpm": 2000000, "budget_usd": 200, "budget_period": "day"},
                       "gpt-4.1": {"rpm": 500, "tpm": 300000}, "claude-sonnet-4.5": {"rpm": 50, "budget_usd": 0.0092}}"#;
        let c = parse_limits_file(text).unwrap();
        let scopes: Vec<&str> = c.iter().map(|(s, _)| s.as_str()).collect();
        assert_eq!(scopes, vec!["*", "claude-sonnet-4.5", "gpt-4.1"]);
        assert_eq!(c[0].1.budget_period, Some(BudgetPeriod::Day));
        assert_eq!(c[1].1.budget_usd, Some("0.0092".parse().unwrap()));
        assert_eq!(c[2].1.rpm, Some(Decimal::from(500)));
        for bad in [
            r#"{"gpt-4.1": {"rpn": 5}}"#,
            r#"{"gpt-4.1": {"burst_seconds": 2}}"#,
            r#"{"*": {"budget_period": "week"}}"#,
            r#"{"*": {"rpm": -1}}"#,
            r#"[1]"#,
        ] {
            assert!(parse_limits_file(bad).is_err(), "{bad}");
        }
    }
}
