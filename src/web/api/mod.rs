//! `sheepdog api` (contract §10): the OpenAI Files and Batches endpoints the official SDKs call,
//! so a producer moves to sheepdog with a `base_url` and a key.
//!
//! - `files.rs`: uploads streamed into Postgres in chunks of about 1 MiB (any replica serves any
//!   file), listed, read back, deleted; output and error files made from a batch's jobs.
//! - `batches.rs`: create (idempotent), retrieve, cancel, list; the Batch object.
//! - `process.rs`: what happens to a batch between create and `in_progress` (its file validated
//!   whole, every line published with confirms, then one statement lets it run), taken over by
//!   another API process when the one that started it dies; its end (output and error files);
//!   files' expiry.
//! - `validate.rs`: OpenAI's rules for input lines, with their codes.
//!
//! Every request carries a producer key (`web::auth::Producer`); a key sees only its own files
//! and batches, others' are 404. Errors are OpenAI's error object with the status codes the SDKs
//! map to their exception classes.

mod batches;
mod files;
mod process;
pub mod validate;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{FromRef, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use secrecy::SecretString;
use serde_json::json;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::{Face, Problem, WebError};
use crate::prices::PriceTable;

/// What the API needs to run (`commands::api` fills it from flags and the environment).
pub struct Settings {
    pub addr: String,
    pub database_url: SecretString,
    /// `DATABASE_URL` is a pooler in transaction mode (see `store::sql`).
    pub transaction_pooler: bool,
    pub amqp_url: SecretString,
    /// Validation refuses a model without a price (contract §3).
    pub prices: PriceTable,
    /// A line whose job message would be larger is refused (contract §1).
    pub max_message_bytes: usize,
    /// Files (uploaded and made) are deleted this long after they were made; `None`: kept.
    pub file_ttl: Option<Duration>,
    /// A create equal to one of the same key within this window returns that one's batch.
    pub same_create_within: Duration,
}

/// The shared state of every handler.
#[derive(Clone)]
pub struct ApiState(Arc<Api>);

pub struct Api {
    pool: PgPool,
    amqp_url: SecretString,
    /// The AMQP channels every batch is published on.
    channels: crate::amqp::Channels,
    prices: PriceTable,
    max_message_bytes: usize,
    file_ttl: Option<Duration>,
    same_create_within: Duration,
    /// This process, as the owner of the leases on batches it validates and publishes.
    me: String,
    /// Batches validated and published at once by this process.
    processing: Arc<tokio::sync::Semaphore>,
}

impl FromRef<ApiState> for PgPool {
    fn from_ref(s: &ApiState) -> PgPool {
        s.0.pool.clone()
    }
}

/// Batches one API process validates and publishes at once; more wait their turn (a lease of
/// a batch not yet taken up is left to run out, and any API process takes it then).
const PROCESSING: usize = 4;

/// Serves the API until `shutdown` is cancelled. Its background task (`process::upkeep`) takes
/// over batches left validating, ends finished batches with their files and expires files.
pub async fn serve(s: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    let state = ApiState(Arc::new(Api {
        pool: super::pool(&s.database_url, 16, s.transaction_pooler)?,
        channels: crate::amqp::Channels::new(&s.amqp_url, "sheepdog api"),
        amqp_url: s.amqp_url,
        prices: s.prices,
        max_message_bytes: s.max_message_bytes,
        file_ttl: s.file_ttl,
        same_create_within: s.same_create_within,
        me: format!("api-{}", uuid::Uuid::new_v4().simple()),
        processing: Arc::new(tokio::sync::Semaphore::new(PROCESSING)),
    }));
    let upkeep = tokio::spawn(process::upkeep(state.clone(), shutdown.clone()));
    let served = super::serve(&s.addr, "api", router(state), shutdown.clone()).await;
    shutdown.cancel();
    let _ = upkeep.await;
    served
}

pub fn router(state: ApiState) -> Router {
    let v1 = Router::new()
        .route("/files", post(files::upload).get(files::list))
        .route("/files/{id}", get(files::retrieve).delete(files::delete))
        .route("/files/{id}/content", get(files::content))
        .route("/batches", post(batches::create).get(batches::list))
        .route("/batches/{id}", get(batches::retrieve))
        .route("/batches/{id}/cancel", post(batches::cancel))
        // Uploads are counted and bounded as they stream (200 MB), not by axum's default limit.
        .layer(axum::extract::DefaultBodyLimit::disable());
    Router::new()
        .route("/healthz", get(healthz))
        .nest("/v1", v1)
        .fallback(unknown)
        .with_state(state)
}

async fn healthz() -> &'static str {
    "ok"
}

async fn unknown(req: Request) -> ApiError {
    Problem::NotFound(format!("Invalid URL ({} {})", req.method(), req.uri().path())).into()
}

/// The API shows a problem as OpenAI's error object.
pub struct OpenAi;

impl Face for OpenAi {
    fn render(p: &Problem) -> Response {
        let (message, param, code, kind) = match p {
            Problem::Invalid { message, param, code } => {
                (message.clone(), param.clone(), code.clone(), "invalid_request_error")
            }
            Problem::Unauthorized(m) => (m.clone(), None, Some("invalid_api_key".into()), "invalid_request_error"),
            Problem::NotFound(m) | Problem::Forbidden(m) | Problem::Conflict(m) => {
                (m.clone(), None, None, "invalid_request_error")
            }
            Problem::DbDown => (
                "The database is unreachable; try again.".into(),
                None,
                None,
                "server_error",
            ),
            Problem::AmqpDown => ("RabbitMQ is unreachable; try again.".into(), None, None, "server_error"),
            Problem::Internal(_) => (
                "The server had an error while processing your request; its log says why.".into(),
                None,
                None,
                "server_error",
            ),
        };
        let body = json!({"error": {"message": message, "type": kind, "param": param, "code": code}});
        let status = p.status();
        let mut r = (status, Json(body)).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            r.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static("1"),
            );
        }
        r
    }
}

/// The error an API handler returns.
pub type ApiError = WebError<OpenAi>;

/// A `list` page as the SDKs' cursor pages read it.
fn page<T: serde::Serialize>(data: Vec<T>, has_more: bool, id: impl Fn(&T) -> String) -> Json<serde_json::Value> {
    let first = data.first().map(&id);
    let last = data.last().map(&id);
    Json(json!({"object": "list", "data": data, "first_id": first, "last_id": last, "has_more": has_more}))
}

/// A `limit` query parameter: 1 to 100 (OpenAI's bounds), 20 when not given.
fn limit_of(limit: Option<i64>) -> Result<i64, ApiError> {
    match limit {
        None => Ok(20),
        Some(n) if (1..=10_000).contains(&n) => Ok(n.min(100)),
        Some(_) => Err(Problem::invalid(
            "Invalid 'limit': integer below minimum value. Expected a value >= 1.",
            Some("limit"),
            Some("integer_below_min_value"),
        )
        .into()),
    }
}
