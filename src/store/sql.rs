//! How every statement reaches Postgres, directly or through a pooler in transaction mode.
//!
//! Directly (or through a pooler in session mode), a statement is prepared once per connection
//! and run as it is. Behind a pooler in transaction mode (PgBouncer `pool_mode = transaction`,
//! `SHEEPDOG_DATABASE_POOL_MODE=transaction`), a connection may reach another server after each
//! transaction, and after each protocol `Sync` outside one (sqlx prepares a statement and then
//! runs it, a `Sync` apart). So there every statement is unnamed (nothing to find again on the
//! next server) and one outside the caller's transaction runs inside one of its own.
//!
//! Every statement of `store/` and `limits/` is made with [`query`], [`query_as`] or
//! [`query_scalar`], and one that is not part of a caller's transaction is run on the pool with
//! [`Standalone`]'s `one`, `all`, `maybe` or `run` (never the pool as an executor directly).

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};

use sqlx::postgres::{PgArguments, PgQueryResult, PgRow};
use sqlx::query::{Query, QueryAs, QueryScalar};
use sqlx::{FromRow, PgPool, Postgres};

static TRANSACTION_POOLER: AtomicBool = AtomicBool::new(false);

/// Whether `DATABASE_URL` is a pooler in transaction mode (set once, where the pool is made).
pub fn transaction_pooler() -> bool {
    TRANSACTION_POOLER.load(Ordering::Relaxed)
}

pub(super) fn set_transaction_pooler(on: bool) {
    TRANSACTION_POOLER.store(on, Ordering::Relaxed);
}

/// A statement, prepared as the connection allows.
pub fn query(sql: &str) -> Query<'_, Postgres, PgArguments> {
    sqlx::query(sql).persistent(!transaction_pooler())
}

/// A statement whose rows map to `O`, prepared as the connection allows.
pub fn query_as<'q, O>(sql: &'q str) -> QueryAs<'q, Postgres, O, PgArguments>
where
    O: for<'r> FromRow<'r, PgRow>,
{
    sqlx::query_as(sql).persistent(!transaction_pooler())
}

/// A statement of one column, prepared as the connection allows.
pub fn query_scalar<'q, O>(sql: &'q str) -> QueryScalar<'q, Postgres, O, PgArguments>
where
    (O,): for<'r> FromRow<'r, PgRow>,
{
    sqlx::query_scalar(sql).persistent(!transaction_pooler())
}

/// Runs a statement on the pool by itself: as it is on a direct connection, inside a
/// transaction of its own behind a pooler in transaction mode.
pub trait Standalone<O>: Sized {
    fn one(self, pool: &PgPool) -> impl Future<Output = Result<O, sqlx::Error>> + Send;
    fn all(self, pool: &PgPool) -> impl Future<Output = Result<Vec<O>, sqlx::Error>> + Send;
    fn maybe(self, pool: &PgPool) -> impl Future<Output = Result<Option<O>, sqlx::Error>> + Send;
}

/// Runs `f` on a connection of the pool, inside a transaction when a pooler in transaction
/// mode sits in front.
macro_rules! alone {
    ($pool:expr, |$c:ident| $body:expr) => {{
        if transaction_pooler() {
            let mut tx = $pool.begin().await?;
            let r = {
                let $c = &mut *tx;
                $body.await?
            };
            tx.commit().await?;
            Ok(r)
        } else {
            let $c = $pool;
            $body.await
        }
    }};
}

impl<'q, O> Standalone<O> for QueryAs<'q, Postgres, O, PgArguments>
where
    O: Send + Unpin + for<'r> FromRow<'r, PgRow> + 'q,
{
    async fn one(self, pool: &PgPool) -> Result<O, sqlx::Error> {
        alone!(pool, |c| self.fetch_one(c))
    }
    async fn all(self, pool: &PgPool) -> Result<Vec<O>, sqlx::Error> {
        alone!(pool, |c| self.fetch_all(c))
    }
    async fn maybe(self, pool: &PgPool) -> Result<Option<O>, sqlx::Error> {
        alone!(pool, |c| self.fetch_optional(c))
    }
}

impl<'q, O> Standalone<O> for QueryScalar<'q, Postgres, O, PgArguments>
where
    O: Send + Unpin + 'q,
    (O,): for<'r> FromRow<'r, PgRow>,
{
    async fn one(self, pool: &PgPool) -> Result<O, sqlx::Error> {
        alone!(pool, |c| self.fetch_one(c))
    }
    async fn all(self, pool: &PgPool) -> Result<Vec<O>, sqlx::Error> {
        alone!(pool, |c| self.fetch_all(c))
    }
    async fn maybe(self, pool: &PgPool) -> Result<Option<O>, sqlx::Error> {
        alone!(pool, |c| self.fetch_optional(c))
    }
}

/// A statement whose rows are not read.
pub trait StandaloneRun: Sized {
    fn run(self, pool: &PgPool) -> impl Future<Output = Result<PgQueryResult, sqlx::Error>> + Send;
}

impl StandaloneRun for Query<'_, Postgres, PgArguments> {
    async fn run(self, pool: &PgPool) -> Result<PgQueryResult, sqlx::Error> {
        alone!(pool, |c| self.execute(c))
    }
}
