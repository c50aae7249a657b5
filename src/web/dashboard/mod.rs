//! `sheepdog dashboard` (contract §9): server-rendered pages of the batches, limits, breakers
//! and dead letters, from the same binary. Pages read Postgres through a pool that gives up
//! after 2 s (a page then says "database unreachable", 503) and RabbitMQ through one shared
//! connection, rebuilt on demand. Actions (batch cancel, pause, resume, priority; dead-letter
//! replay) exist only when `SHEEPDOG_DASHBOARD_TOKEN` is set: see `auth.rs`.

mod auth;
mod chart;
mod pages;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::FormRejection;
use axum::extract::{ConnectInfo, Form, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use secrecy::SecretString;
use serde::Deserialize;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::{Face, Problem, WebError};
use crate::store::Priority;

/// What the dashboard needs to run.
pub struct Settings {
    pub addr: String,
    pub database_url: SecretString,
    /// `DATABASE_URL` is a pooler in transaction mode (see `store::sql`).
    pub transaction_pooler: bool,
    pub amqp_url: SecretString,
    /// Enables the actions for whoever signs in with it; `None`: read-only.
    pub token: Option<SecretString>,
}

pub(crate) struct App {
    pool: PgPool,
    amqp_url: SecretString,
    /// The pooled channels queue depths are read on.
    channels: crate::amqp::Channels,
    /// Until when RabbitMQ is not asked again after a failure.
    amqp_down_until: tokio::sync::Mutex<Option<std::time::Instant>>,
    auth: auth::Auth,
}

/// Serves the dashboard until `shutdown` is cancelled.
pub async fn serve(s: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    let app = Arc::new(App {
        pool: super::pool(&s.database_url, 8, s.transaction_pooler)?,
        channels: crate::amqp::Channels::new(&s.amqp_url, "sheepdog dashboard"),
        amqp_url: s.amqp_url,
        amqp_down_until: tokio::sync::Mutex::new(None),
        auth: auth::Auth::new(s.token),
    });
    tracing::info!(actions = app.auth.enabled(), "dashboard starting");
    super::serve(&s.addr, "dashboard", router(app), shutdown).await
}

fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/", get(overview))
        .route("/batches", get(batches))
        .route("/batches/{id}", get(batch))
        .route("/batches/{id}/export", get(export))
        .route("/batches/{id}/{action}", post(batch_action))
        .route("/limits", get(limits))
        .route("/dead", get(dead))
        .route("/dead/replay", post(dead_replay))
        .route("/login", get(login_form).post(login))
        .route("/logout", post(logout))
        .with_state(app)
}

/// The dashboard shows a problem as a page. The database being down is its own answer (503),
/// with a page that refreshes itself until it is back.
pub(crate) struct Html;

impl Face for Html {
    fn render(problem: &Problem) -> Response {
        let code = problem.status();
        let (title, text) = match problem {
            Problem::DbDown => (
                "database unreachable",
                "The database is unreachable: nothing can be shown now. This page retries by itself.".to_string(),
            ),
            Problem::AmqpDown => (
                "RabbitMQ unreachable",
                "RabbitMQ is unreachable: the dead letters cannot be read now.".to_string(),
            ),
            Problem::NotFound(what) => ("not found", what.clone()),
            Problem::Forbidden(why) | Problem::Unauthorized(why) | Problem::Conflict(why) => ("forbidden", why.clone()),
            Problem::Invalid { message, .. } => ("not found", message.clone()),
            Problem::Internal(_) => (
                "error",
                "The page could not be built; the dashboard's log says why.".to_string(),
            ),
        };
        (code, pages::error_page(code.as_u16(), title, &text)).into_response()
    }
}

/// Why a page could not be shown.
pub(crate) type PageError = WebError<Html>;

fn not_found(what: String) -> PageError {
    Problem::NotFound(what).into()
}

/// Every page is built within 5 s or answered as a database outage.
async fn bounded<T>(f: impl std::future::Future<Output = Result<T, PageError>>) -> Result<T, PageError> {
    tokio::time::timeout(Duration::from_secs(5), f)
        .await
        .unwrap_or(Err(Problem::DbDown.into()))
}

impl App {
    /// Ready messages in each queue, or None for all when RabbitMQ cannot be asked within a
    /// second. After a failure RabbitMQ is not asked again for 10 s, so pages stay fast.
    async fn queue_depths(&self, queues: &[&str]) -> Vec<Option<u32>> {
        let none = vec![None; queues.len()];
        let mut down_until = self.amqp_down_until.lock().await;
        if down_until.is_some_and(|until| std::time::Instant::now() < until) {
            return none;
        }
        let attempt = async {
            let ch = self.channels.get().await.ok()?;
            let mut out = Vec::with_capacity(queues.len());
            for q in queues {
                out.push(Some(crate::amqp::queue_depth(&ch, q).await.ok()?));
            }
            Some(out)
        };
        match tokio::time::timeout(Duration::from_secs(1), attempt).await {
            Ok(Some(depths)) => {
                *down_until = None;
                depths
            }
            _ => {
                *down_until = Some(std::time::Instant::now() + Duration::from_secs(10));
                none
            }
        }
    }
}

async fn overview(State(app): State<Arc<App>>, headers: HeaderMap) -> Result<Response, PageError> {
    let viewer = app.auth.viewer(&headers);
    bounded(async {
        let o = crate::store::dashboard::overview(&app.pool).await?;
        let minutes = crate::store::dashboard::calls_per_minute(&app.pool, 60, None).await?;
        let usage = crate::limits::usage(&app.pool).await?;
        let breakers = crate::store::dashboard::breakers(&app.pool).await?;
        let depths = app
            .queue_depths(&[crate::amqp::DEAD_QUEUE, crate::amqp::JOBS_QUEUE])
            .await;
        let (dead, jobs) = (depths[0], depths[1]);
        Ok(pages::overview(&viewer, &o, &minutes, &usage, &breakers, dead, jobs).into_response())
    })
    .await
}

#[derive(Deserialize)]
struct ListQuery {
    status: Option<String>,
    page: Option<i64>,
}

const PAGE_SIZE: i64 = 50;

async fn batches(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Result<Response, PageError> {
    let viewer = app.auth.viewer(&headers);
    let status = q.status.filter(|s| pages::STATUSES.contains(&s.as_str()));
    let page = q.page.unwrap_or(0).max(0);
    bounded(async {
        // One page and one more row: whether there is a next page.
        let rows = crate::store::batches::list(&app.pool, status.as_deref(), PAGE_SIZE + 1, page * PAGE_SIZE).await?;
        let total = crate::store::dashboard::batch_count(&app.pool).await?;
        Ok(pages::batches(&viewer, &rows, status.as_deref(), page, PAGE_SIZE as usize, total).into_response())
    })
    .await
}

async fn batch(State(app): State<Arc<App>>, headers: HeaderMap, Path(id): Path<String>) -> Result<Response, PageError> {
    let viewer = app.auth.viewer(&headers);
    bounded(async {
        let Some(b) = crate::store::batches::show(&app.pool, &id).await? else {
            return Err(not_found(format!("no batch {id:?}")));
        };
        let models = crate::store::report::batch_cost_by_model(&app.pool, &id).await?;
        let latency = crate::store::dashboard::latency(&app.pool, &id).await?;
        let failures = crate::store::dashboard::failures(&app.pool, &id, 10).await?;
        let recent = crate::store::dashboard::recent(&app.pool, &id, 10).await?;
        // What is left of a batch still running: its expected cost and time to finish (§11).
        let estimate = if matches!(b.status.as_str(), "queued" | "in_progress" | "paused") {
            let priority = Priority::from_name(&b.priority).level();
            let cap_left = b.max_cost_usd.map(|c| c - b.cost_usd);
            Some(crate::estimate::running(&app.pool, &id, priority, cap_left).await?)
        } else {
            None
        };
        Ok(pages::batch(&viewer, &b, &models, latency, &failures, &recent, estimate.as_ref()).into_response())
    })
    .await
}

/// The batch's export lines (as `sheepdog export` writes them), streamed as they are read.
async fn export(State(app): State<Arc<App>>, Path(id): Path<String>) -> Result<Response, PageError> {
    use futures::StreamExt;
    if crate::store::batches::show(&app.pool, &id).await?.is_none() {
        return Err(not_found(format!("no batch {id:?}")));
    }
    let pool = app.pool.clone();
    let batch_id = id.clone();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(16);
    tokio::spawn(async move {
        let mut rows = crate::store::report::export_rows(&pool, &batch_id);
        while let Some(row) = rows.next().await {
            let item = match row {
                Ok(job) => {
                    let mut line = Vec::with_capacity(512);
                    let _ = job.write_line(&mut line);
                    line.push(b'\n');
                    Ok(line)
                }
                Err(e) => Err(std::io::Error::other(e.to_string())),
            };
            let failed = item.is_err();
            if tx.send(item).await.is_err() || failed {
                return;
            }
        }
    });
    let body = axum::body::Body::from_stream(tokio_stream(rx));
    let name: String = id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    Ok((
        [
            (header::CONTENT_TYPE, "application/x-ndjson".to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{name}.jsonl\""),
            ),
        ],
        body,
    )
        .into_response())
}

fn tokio_stream<T: Send + 'static>(mut rx: tokio::sync::mpsc::Receiver<T>) -> impl futures::Stream<Item = T> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

async fn limits(State(app): State<Arc<App>>, headers: HeaderMap) -> Result<Response, PageError> {
    let viewer = app.auth.viewer(&headers);
    bounded(async {
        let usage = crate::limits::usage(&app.pool).await?;
        let breakers = crate::store::dashboard::breakers(&app.pool).await?;
        let minutes = crate::store::dashboard::scope_use(&app.pool, 30).await?;
        Ok(pages::limits(&viewer, &usage, &breakers, &minutes).into_response())
    })
    .await
}

async fn dead(State(app): State<Arc<App>>, headers: HeaderMap) -> Result<Response, PageError> {
    let viewer = app.auth.viewer(&headers);
    let depth = app.queue_depths(&[crate::amqp::DEAD_QUEUE]).await[0].ok_or(WebError::new(Problem::AmqpDown))?;
    let letters = tokio::time::timeout(Duration::from_secs(5), crate::dead::list(&app.amqp_url, None, 1000))
        .await
        .map_err(|_| WebError::new(Problem::AmqpDown))?
        .map_err(|_| WebError::new(Problem::AmqpDown))?;
    Ok(pages::dead(&viewer, depth, &letters).into_response())
}

async fn login_form(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    pages::login(&app.auth.viewer(&headers), app.auth.enabled(), false).into_response()
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
}

async fn login(
    State(app): State<Arc<App>>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    form: Result<Form<LoginForm>, FormRejection>,
) -> Result<Response, PageError> {
    if !app.auth.enabled() {
        return Err(Problem::Forbidden("this dashboard is read-only (no SHEEPDOG_DASHBOARD_TOKEN)".into()).into());
    }
    let given = form.map(|f| f.0.token).unwrap_or_default();
    match app.auth.sign_in(&given) {
        Some(cookie) => {
            tracing::info!(at = %chrono::Utc::now(), client = %client, action = "sign in", "dashboard action");
            Ok(([(header::SET_COOKIE, cookie)], Redirect::to("/")).into_response())
        }
        None => {
            tracing::warn!(at = %chrono::Utc::now(), client = %client, action = "sign in refused", "dashboard action");
            Ok((
                StatusCode::FORBIDDEN,
                pages::login(&app.auth.viewer(&headers), true, true),
            )
                .into_response())
        }
    }
}

/// A POST's form; a missing or unreadable one is refused as unauthorized (403), not 415.
type ActionBody = Result<Form<ActionForm>, FormRejection>;

fn form_of(body: ActionBody) -> ActionForm {
    body.map(|f| f.0).unwrap_or(ActionForm {
        csrf: None,
        priority: None,
        batch: None,
    })
}

#[derive(Deserialize)]
struct ActionForm {
    csrf: Option<String>,
    priority: Option<String>,
    batch: Option<String>,
}

async fn logout(State(app): State<Arc<App>>, headers: HeaderMap, body: ActionBody) -> Result<Response, PageError> {
    let f = form_of(body);
    app.auth.authorize(&headers, f.csrf.as_deref())?;
    app.auth.sign_out(&headers);
    Ok((
        [(header::SET_COOKIE, auth::CLEAR_COOKIE.to_string())],
        Redirect::to("/"),
    )
        .into_response())
}

async fn batch_action(
    State(app): State<Arc<App>>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path((id, action)): Path<(String, String)>,
    body: ActionBody,
) -> Result<Response, PageError> {
    let f = form_of(body);
    app.auth.authorize(&headers, f.csrf.as_deref())?;
    let pool = &app.pool;
    let detail = match action.as_str() {
        "cancel" => {
            let c = crate::store::batches::cancel(pool, &id).await?;
            if !c.found {
                return Err(not_found(format!("no batch {id:?}")));
            }
            format!("{} waiting job(s) cancelled, {} call(s) in flight", c.jobs, c.in_flight)
        }
        "pause" | "resume" => {
            if !crate::store::batches::set_paused(pool, &id, action == "pause").await? {
                return Err(not_found(format!("no batch {id:?} to {action} (or it is cancelled)")));
            }
            String::new()
        }
        "priority" => {
            let p = match f.priority.as_deref() {
                Some("high") => Priority::High,
                Some("normal") => Priority::Normal,
                Some("low") => Priority::Low,
                _ => return Err(not_found("priority is high, normal or low".into())),
            };
            if crate::store::batches::show(pool, &id).await?.is_none() {
                return Err(not_found(format!("no batch {id:?}")));
            }
            crate::store::batches::set_priority(pool, &id, p).await?;
            format!("priority {}", p.as_str())
        }
        _ => return Err(not_found(format!("no action {action:?}"))),
    };
    tracing::info!(at = %chrono::Utc::now(), client = %client, action = %action, batch = %id, detail = %detail, "dashboard action");
    Ok(Redirect::to(&format!("/batches/{}", pages::path_escape(&id))).into_response())
}

async fn dead_replay(
    State(app): State<Arc<App>>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: ActionBody,
) -> Result<Response, PageError> {
    let f = form_of(body);
    app.auth.authorize(&headers, f.csrf.as_deref())?;
    let batch = f.batch.filter(|b| !b.is_empty());
    let r = crate::dead::replay(&app.pool, &app.amqp_url, batch.as_deref(), usize::MAX)
        .await
        .map_err(|e| WebError::new(Problem::Internal(crate::redact::scrub(&e.to_string(), &app.amqp_url))))?;
    tracing::info!(
        at = %chrono::Utc::now(), client = %client, action = "dead replay",
        batch = batch.as_deref().unwrap_or("*"), replayed = r.replayed, left = r.skipped,
        "dashboard action"
    );
    Ok(Redirect::to("/dead").into_response())
}
