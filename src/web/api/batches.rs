//! `/v1/batches`: create (idempotent: a retried create returns the batch the first one made),
//! retrieve, cancel, list; the Batch object, from the API row and the sheepdog batch's figures.

use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::Json;
use rust_decimal::Decimal;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use super::{ApiError, ApiState};
use crate::store::api::{ApiBatch, Created, NewBatch};
use crate::store::batches::BatchObject;
use crate::store::Priority;
use crate::web::auth::Producer;
use crate::web::Problem;

/// The one endpoint sheepdog runs.
pub const ENDPOINT: &str = "/v1/chat/completions";
/// How long an `Idempotency-Key` is remembered.
const IDEMPOTENCY_KEY_KEPT: Duration = Duration::from_secs(24 * 3600);

fn bad(message: impl Into<String>, param: &str, code: &str) -> ApiError {
    Problem::invalid(message, Some(param), Some(code)).into()
}

fn no_batch(id: &str) -> ApiError {
    Problem::NotFound(format!("No batch found with id '{id}'.")).into()
}

/// The status OpenAI's vocabulary gives an API batch: its API phase first (validating, failed,
/// ended), then what its sheepdog batch is doing. `done`: every job ended, no call in flight.
pub fn status_of(phase: &str, sheepdog: &str, done: bool) -> &'static str {
    match (phase, sheepdog) {
        ("validating", _) => "validating",
        ("failed", _) => "failed",
        ("ended", "cancelled" | "cancelling") => "cancelled",
        ("ended", "expired") => "expired",
        ("ended", _) => "completed",
        (_, "cancelled" | "cancelling") => "cancelling",
        (_, "completed" | "expired") if done => "finalizing",
        _ => "in_progress",
    }
}

fn done(o: &BatchObject) -> bool {
    let c = &o.request_counts;
    c.completed + c.failed + o.cancelled + o.expired >= c.total && o.in_flight == 0
}

/// The Batch object.
pub fn object(a: &ApiBatch, o: Option<&BatchObject>) -> Value {
    let ts = |t: Option<chrono::DateTime<chrono::Utc>>| t.map(|t| t.timestamp());
    let status = status_of(&a.phase, o.map_or("queued", |o| o.status.as_str()), o.is_some_and(done));
    let ended_as = |s: &str| if status == s { ts(a.ended_at) } else { None };
    let counts = match (o, a.phase.as_str()) {
        (Some(o), "running" | "ended") => json!({
            "total": o.request_counts.total,
            "completed": o.request_counts.completed,
            "failed": o.request_counts.failed + o.cancelled + o.expired,
        }),
        _ => json!({"total": 0, "completed": 0, "failed": 0}),
    };
    json!({
        "id": a.id,
        "object": "batch",
        "endpoint": a.endpoint,
        "errors": a.errors.as_ref().map(|e| &e.0),
        "input_file_id": a.input_file_id,
        "completion_window": a.completion_window,
        "status": status,
        "output_file_id": a.output_file_id,
        "error_file_id": a.error_file_id,
        // The sheepdog batch's (made in the same transaction), rounded as its `expires_at` is.
        "created_at": o.map_or(a.created_at.timestamp(), |o| o.created_at),
        "in_progress_at": ts(a.in_progress_at),
        "expires_at": o.and_then(|o| o.expires_at),
        "finalizing_at": ts(a.finalizing_at),
        "completed_at": ended_as("completed"),
        "failed_at": ts(a.failed_at),
        "expired_at": ended_as("expired"),
        "cancelling_at": o.and_then(|o| o.cancelled_at),
        "cancelled_at": ended_as("cancelled"),
        "request_counts": counts,
        "metadata": a.metadata.as_ref().map(|m| &m.0),
        "model": null,
        "usage": null,
        // sheepdog's own figures, besides OpenAI's.
        "priority": o.map(|o| o.priority.as_str()),
        "max_cost_usd": o.and_then(|o| o.max_cost_usd),
        "cost_usd": o.map(|o| o.cost_usd),
    })
}

async fn object_of(api: &ApiState, owner: &str, id: &str) -> Result<Value, ApiError> {
    let a = crate::store::api::batch(&api.0.pool, owner, id)
        .await?
        .ok_or_else(|| no_batch(id))?;
    let o = crate::store::batches::show(&api.0.pool, id).await?;
    Ok(object(&a, o.as_ref()))
}

/// A create, checked.
struct CreateRequest {
    input_file_id: String,
    completion_window: String,
    window: Duration,
    metadata: Option<Value>,
    priority: Option<Priority>,
    max_cost_usd: Option<Decimal>,
}

fn required<'a>(o: &'a Map<String, Value>, name: &str) -> Result<&'a str, ApiError> {
    match o.get(name) {
        None | Some(Value::Null) => Err(bad(
            format!("Missing required parameter: '{name}'."),
            name,
            "missing_required_parameter",
        )),
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(bad(
            format!("Invalid type for '{name}': expected a string."),
            name,
            "invalid_type",
        )),
    }
}

fn check_create(body: &Value) -> Result<CreateRequest, ApiError> {
    let Some(o) = body.as_object() else {
        return Err(Problem::invalid("The body must be a JSON object.", None, None).into());
    };
    let input_file_id = required(o, "input_file_id")?.to_string();
    let endpoint = required(o, "endpoint")?;
    if endpoint != ENDPOINT {
        return Err(bad(
            format!("Invalid value: '{endpoint}'. Supported values are: '{ENDPOINT}'."),
            "endpoint",
            "invalid_value",
        ));
    }
    let completion_window = required(o, "completion_window")?.to_string();
    let window = crate::store::batches::parse_window(&completion_window).map_err(|e| {
        bad(
            format!("Invalid value for 'completion_window': {e} (24h, or any duration like 90s, 30m, 2d)."),
            "completion_window",
            "invalid_value",
        )
    })?;
    let metadata = match o.get("metadata") {
        None | Some(Value::Null) => None,
        Some(Value::Object(m)) => {
            if m.len() > 16 {
                return Err(bad("Invalid 'metadata': at most 16 keys.", "metadata", "invalid_value"));
            }
            for (k, v) in m {
                match v {
                    Value::String(s) if k.len() <= 64 && s.len() <= 512 => {}
                    Value::String(_) => {
                        return Err(bad(
                            format!("Invalid 'metadata.{k}': keys are at most 64 characters, values 512."),
                            &format!("metadata.{k}"),
                            "invalid_value",
                        ))
                    }
                    other => {
                        let kind = match other {
                            Value::Array(_) => "an array",
                            Value::Object(_) => "an object",
                            Value::Number(_) => "a number",
                            Value::Bool(_) => "a boolean",
                            _ => "null",
                        };
                        return Err(bad(
                            format!("Invalid type for 'metadata.{k}': expected a string, but got {kind} instead."),
                            &format!("metadata.{k}"),
                            "invalid_type",
                        ));
                    }
                }
            }
            Some(Value::Object(m.clone()))
        }
        Some(_) => {
            return Err(bad(
                "Invalid type for 'metadata': expected an object.",
                "metadata",
                "invalid_type",
            ))
        }
    };
    let priority = match o.get("priority") {
        None | Some(Value::Null) => None,
        Some(Value::String(p)) if p == "high" => Some(Priority::High),
        Some(Value::String(p)) if p == "normal" => Some(Priority::Normal),
        Some(Value::String(p)) if p == "low" => Some(Priority::Low),
        Some(other) => {
            return Err(bad(
                format!("Invalid value: {other}. Supported values are: 'high', 'normal' and 'low'."),
                "priority",
                "invalid_value",
            ))
        }
    };
    let max_cost_usd = match o.get("max_cost_usd") {
        None | Some(Value::Null) => None,
        // The number's own text, so the cap is exact (never a float).
        Some(Value::Number(n)) => Some(n.to_string()),
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => Some(String::new()),
    }
    .map(|text| {
        text.parse::<Decimal>()
            .or_else(|_| Decimal::from_scientific(&text))
            .ok()
            .filter(|d| !d.is_sign_negative())
            .ok_or_else(|| {
                bad(
                    "Invalid value for 'max_cost_usd': a non-negative number of USD.",
                    "max_cost_usd",
                    "invalid_value",
                )
            })
    })
    .transpose()?;
    Ok(CreateRequest {
        input_file_id,
        completion_window,
        window,
        metadata,
        priority,
        max_cost_usd,
    })
}

/// `POST /v1/batches`. The batch is made `validating` and answered at once; its file is then
/// validated and published in the background (`process.rs`).
///
/// Idempotent: the SDKs retry a create after a timeout or a 5xx and send no idempotency key, so
/// a create with the same body (input file, endpoint, window, metadata, sheepdog's fields) from
/// the same key within `SHEEPDOG_API_SAME_CREATE_WINDOW` returns the batch the first one made;
/// with an `Idempotency-Key` header, the same header within a day does. A unique key in
/// Postgres decides, so two at once make one batch.
pub async fn create(
    State(api): State<ApiState>,
    who: Producer,
    headers: HeaderMap,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let Json(body) = body.map_err(|e| {
        ApiError::from(Problem::invalid(
            format!("We could not parse the JSON body of your request: {e}"),
            None,
            None,
        ))
    })?;
    let r = check_create(&body)?;
    let (fingerprint, same_within) = match headers.get("idempotency-key").and_then(|v| v.to_str().ok()) {
        Some(k) if !k.is_empty() => (
            format!("idempotency-key:{:x}", Sha256::digest(k.as_bytes())),
            IDEMPOTENCY_KEY_KEPT,
        ),
        // serde_json's maps are sorted by key: the same body gives the same text.
        _ => (
            format!("body:{:x}", Sha256::digest(body.to_string().as_bytes())),
            api.0.same_create_within,
        ),
    };
    let id = super::files::new_id("batch_");
    let created = crate::store::api::create_batch(
        &api.0.pool,
        &NewBatch {
            id: &id,
            owner: &who.name,
            input_file_id: &r.input_file_id,
            endpoint: ENDPOINT,
            completion_window: &r.completion_window,
            window: r.window,
            metadata: r.metadata.as_ref(),
            priority: r.priority,
            max_cost_usd: r.max_cost_usd,
            fingerprint: &fingerprint,
            same_within,
            lease_owner: &api.0.me,
            lease: super::process::LEASE,
        },
    )
    .await?;
    let id = match created {
        Created::New => {
            tracing::info!(batch = %id, key = %who.name, file = %r.input_file_id, "batch created");
            super::process::start(api.clone(), id.clone());
            id
        }
        Created::Existing(existing) => {
            tracing::info!(batch = %existing, key = %who.name, "the same create again: its batch returned");
            existing
        }
    };
    Ok(Json(object_of(&api, &who.name, &id).await?))
}

/// `GET /v1/batches/{id}`.
pub async fn retrieve(
    State(api): State<ApiState>,
    who: Producer,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(object_of(&api, &who.name, &id).await?))
}

/// `POST /v1/batches/{id}/cancel`: as `batch cancel` does (within 2 s no call for it starts);
/// 409 for a batch that has ended; a batch already cancelling is answered as it is.
pub async fn cancel(
    State(api): State<ApiState>,
    who: Producer,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let before = object_of(&api, &who.name, &id).await?;
    let status = before["status"].as_str().unwrap_or_default().to_string();
    match status.as_str() {
        "cancelling" | "cancelled" => return Ok(Json(before)),
        "failed" | "completed" | "expired" | "finalizing" => {
            return Err(Problem::Conflict(format!("Cannot cancel a batch with status '{status}'.")).into())
        }
        _ => {}
    }
    let c = crate::store::batches::cancel(&api.0.pool, &id).await?;
    // A call granted just before the cancel reaches the upstream within milliseconds: answer
    // once it has, so that "no call starts after cancel returned" holds (as `batch cancel`).
    tokio::time::sleep(Duration::from_millis(100)).await;
    tracing::info!(batch = %id, key = %who.name, waiting = c.jobs, in_flight = c.in_flight, "batch cancelled");
    Ok(Json(object_of(&api, &who.name, &id).await?))
}

#[derive(Deserialize)]
pub struct ListQuery {
    limit: Option<i64>,
    after: Option<String>,
}

/// `GET /v1/batches?limit=&after=`: the key's batches, newest first.
pub async fn list(
    State(api): State<ApiState>,
    who: Producer,
    Query(q): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = super::limit_of(q.limit)?;
    let mut rows = crate::store::api::batches(&api.0.pool, &who.name, q.after.as_deref(), limit + 1).await?;
    let has_more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    let ids: Vec<String> = rows.iter().map(|a| a.id.clone()).collect();
    let objects = crate::store::batches::show_many(&api.0.pool, &ids).await?;
    let data: Vec<Value> = rows
        .iter()
        .map(|a| object(a, objects.iter().find(|o| o.id == a.id)))
        .collect();
    Ok(super::page(data, has_more, |v| {
        v["id"].as_str().unwrap_or_default().to_string()
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_in_openai_words() {
        assert_eq!(status_of("validating", "validating", false), "validating");
        assert_eq!(status_of("failed", "failed", true), "failed");
        assert_eq!(status_of("running", "queued", false), "in_progress");
        assert_eq!(status_of("running", "paused", false), "in_progress");
        assert_eq!(status_of("running", "in_progress", false), "in_progress");
        assert_eq!(status_of("running", "completed", true), "finalizing");
        assert_eq!(status_of("running", "expired", false), "in_progress");
        assert_eq!(status_of("running", "expired", true), "finalizing");
        assert_eq!(status_of("running", "cancelling", false), "cancelling");
        assert_eq!(status_of("running", "cancelled", true), "cancelling");
        assert_eq!(status_of("ended", "cancelled", true), "cancelled");
        assert_eq!(status_of("ended", "expired", true), "expired");
        assert_eq!(status_of("ended", "completed", true), "completed");
    }

    #[test]
    fn creates_are_checked_as_openai_does() {
        let ok = json!({"input_file_id": "file-x", "endpoint": ENDPOINT, "completion_window": "24h"});
        let r = check_create(&ok).unwrap();
        assert_eq!(r.window, Duration::from_secs(86_400));
        let code = |v: Value| check_create(&v).map(|_| ()).unwrap_err().problem;
        let p = code(json!({"input_file_id": "f", "endpoint": "/v1/embeddings", "completion_window": "24h"}));
        assert!(
            matches!(p, Problem::Invalid { ref param, ref code, .. } if param.as_deref() == Some("endpoint") && code.as_deref() == Some("invalid_value"))
        );
        let p = code(json!({"endpoint": ENDPOINT, "completion_window": "24h"}));
        assert!(
            matches!(p, Problem::Invalid { ref code, .. } if code.as_deref() == Some("missing_required_parameter"))
        );
        let p = code(json!({"input_file_id": "f", "endpoint": ENDPOINT, "completion_window": "soon"}));
        assert!(matches!(p, Problem::Invalid { ref param, .. } if param.as_deref() == Some("completion_window")));
        let p = code(
            json!({"input_file_id": "f", "endpoint": ENDPOINT, "completion_window": "24h", "metadata": {"tags": ["a"]}}),
        );
        assert!(
            matches!(p, Problem::Invalid { ref param, ref message, .. } if param.as_deref() == Some("metadata.tags") && message.contains("array"))
        );
        let r = check_create(
            &json!({"input_file_id": "f", "endpoint": ENDPOINT, "completion_window": "90s",
                                     "priority": "high", "max_cost_usd": 0.25}),
        )
        .unwrap();
        assert_eq!(
            (r.priority, r.max_cost_usd),
            (Some(Priority::High), Some("0.25".parse().unwrap()))
        );
        assert_eq!(r.window, Duration::from_secs(90));
        assert!(check_create(
            &json!({"input_file_id": "f", "endpoint": ENDPOINT, "completion_window": "24h", "max_cost_usd": -1})
        )
        .is_err());
    }
}
