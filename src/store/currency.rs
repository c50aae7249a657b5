//! The account's currency (contract §3): what HolySheep charges per USD of list price, with the
//! time it took effect. Costs stay in USD everywhere; these rates turn them into what the account
//! is charged, for `report`, `status`, `batch show`, the estimate and the dashboard.

use super::sql::{query_as, query_scalar, Standalone};
use rust_decimal::Decimal;
use sqlx::PgPool;

use super::StoreError;

/// Records a rate from now on, unless it is the one in force already. Returns whether it was new.
pub async fn record(pool: &PgPool, currency: &str, per_usd: Decimal) -> Result<bool, StoreError> {
    let added: Option<bool> = query_scalar(
        "INSERT INTO sheepdog.account_currency (currency, per_usd)
         SELECT $1, $2
          WHERE NOT EXISTS (
                SELECT 1 FROM (SELECT currency, per_usd FROM sheepdog.account_currency
                                ORDER BY since DESC LIMIT 1) l
                 WHERE l.currency = $1 AND l.per_usd = $2)
            AND NOT ($1 = 'USD' AND $2 = 1 AND NOT EXISTS (SELECT 1 FROM sheepdog.account_currency))
         RETURNING true",
    )
    .bind(currency)
    .bind(per_usd)
    .maybe(pool)
    .await?;
    Ok(added.is_some())
}

/// The rate in force now: (currency, per USD). USD one for one when none was ever recorded.
pub async fn current(pool: &PgPool) -> Result<(String, Decimal), StoreError> {
    let row: Option<(String, Decimal)> =
        query_as("SELECT currency, per_usd FROM sheepdog.account_currency ORDER BY since DESC LIMIT 1")
            .maybe(pool)
            .await?;
    Ok(row.unwrap_or_else(|| ("USD".into(), Decimal::ONE)))
}

/// What a batch's settled calls were charged, each at the rate in force when it started:
/// (currency, amount). `None` when no rate other than USD was ever recorded.
pub async fn batch_charged(pool: &PgPool, batch_id: &str) -> Result<Option<(String, Decimal)>, StoreError> {
    let row: Option<(Option<String>, Option<Decimal>)> = query_as(
        "SELECT (SELECT currency FROM sheepdog.account_currency ORDER BY since DESC LIMIT 1),
                (SELECT coalesce(sum(coalesce(c.cost_usd, 0) * coalesce(r.per_usd, 1)), 0)
                   FROM sheepdog.calls c
                   LEFT JOIN LATERAL (SELECT a.per_usd FROM sheepdog.account_currency a
                                       WHERE a.since <= c.started_at ORDER BY a.since DESC LIMIT 1) r ON true
                  WHERE c.batch_id = $1 AND c.outcome <> 'pending')
          WHERE EXISTS (SELECT 1 FROM sheepdog.account_currency WHERE currency <> 'USD' OR per_usd <> 1)",
    )
    .bind(batch_id)
    .maybe(pool)
    .await?;
    Ok(row.and_then(|(c, a)| Some((c?, a.unwrap_or_default().normalize()))))
}
