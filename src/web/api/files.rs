//! `/v1/files`: uploads streamed into Postgres, never held whole in memory; listing, reading back
//! (uploaded files chunk by chunk, output and error files made from the jobs as they are read),
//! deleting.

use axum::body::Body;
use axum::extract::multipart::MultipartRejection;
use axum::extract::{Multipart, Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;
use rand::distr::{Alphanumeric, SampleString};
use serde::Deserialize;
use serde_json::{json, Value};

use super::validate::LineCount;
use super::{ApiError, ApiState};
use crate::store::api::FileRow;
use crate::web::auth::Producer;
use crate::web::Problem;

/// OpenAI's limits for a batch input file.
pub const MAX_FILE_BYTES: u64 = 200 * 1000 * 1000;
pub const MAX_FILE_LINES: u64 = 50_000;
/// Bytes stored per chunk row.
const CHUNK_BYTES: usize = 1 << 20;

/// A new id: `file-` and 24 random characters.
pub fn new_id(start: &str) -> String {
    format!("{start}{}", Alphanumeric.sample_string(&mut rand::rng(), 24))
}

/// The File object.
pub fn object(f: &FileRow) -> Value {
    json!({
        "id": f.id, "object": "file", "bytes": f.bytes, "created_at": f.created_at.timestamp(),
        "filename": f.filename, "purpose": f.purpose, "status": "processed",
        "expires_at": f.expires_at.map(|t| t.timestamp()), "status_details": null,
    })
}

fn no_file(id: &str) -> ApiError {
    Problem::NotFound(format!("No such File object: {id}")).into()
}

fn bad(message: impl Into<String>, param: &str, code: &str) -> ApiError {
    Problem::invalid(message, Some(param), Some(code)).into()
}

/// `POST /v1/files`: multipart `purpose` (`batch`) and `file`. The file goes to Postgres a chunk
/// at a time while it is counted (bytes, requests); it becomes visible in one statement at the
/// end. A file over 200 MB or 50,000 requests is refused as soon as it passes the limit.
pub async fn upload(
    State(api): State<ApiState>,
    who: Producer,
    form: Result<Multipart, MultipartRejection>,
) -> Result<Json<Value>, ApiError> {
    let mut form = form.map_err(|e| bad(format!("Invalid multipart body: {e}"), "file", "invalid_request"))?;
    let pool = &api.0.pool;
    let mut purpose: Option<String> = None;
    let mut stored: Option<(String, i64, i32)> = None;
    let broken = |e: axum::extract::multipart::MultipartError| {
        bad(format!("The upload broke off: {e}"), "file", "invalid_request")
    };
    while let Some(mut field) = form.next_field().await.map_err(broken)? {
        match field.name() {
            Some("purpose") => purpose = Some(field.text().await.map_err(broken)?),
            Some("file") if stored.is_none() => {
                if purpose.as_deref().is_some_and(|p| p != "batch") {
                    break;
                }
                let id = new_id("file-");
                let filename = field.file_name().unwrap_or("upload.jsonl").to_string();
                crate::store::api::begin_upload(pool, &id, &who.name, &filename).await?;
                let result = async {
                    let mut buf: Vec<u8> = Vec::with_capacity(CHUNK_BYTES);
                    let (mut bytes, mut seq, mut count) = (0u64, 0i32, LineCount::default());
                    while let Some(data) = field.chunk().await.map_err(broken)? {
                        bytes += data.len() as u64;
                        count.feed(&data);
                        if bytes > MAX_FILE_BYTES {
                            return Err(bad(
                                "File is too large: a batch input file is at most 200 MB.",
                                "file",
                                "file_too_large",
                            ));
                        }
                        if count.lines > MAX_FILE_LINES {
                            return Err(bad(
                                "The file has more than 50,000 requests, the most a batch input file may hold.",
                                "file",
                                "too_many_requests",
                            ));
                        }
                        buf.extend_from_slice(&data);
                        if buf.len() >= CHUNK_BYTES {
                            crate::store::api::add_chunk(pool, &id, seq, &buf).await?;
                            seq += 1;
                            buf.clear();
                        }
                    }
                    if !buf.is_empty() {
                        crate::store::api::add_chunk(pool, &id, seq, &buf).await?;
                    }
                    let lines = count.finish();
                    if lines > MAX_FILE_LINES {
                        return Err(bad(
                            "The file has more than 50,000 requests, the most a batch input file may hold.",
                            "file",
                            "too_many_requests",
                        ));
                    }
                    Ok((bytes as i64, lines as i32))
                }
                .await;
                match result {
                    Ok((bytes, lines)) => stored = Some((id, bytes, lines)),
                    Err(e) => {
                        let _ = crate::store::api::drop_upload(pool, &id).await;
                        return Err(e);
                    }
                }
            }
            _ => {}
        }
    }
    let drop_stored = |s: &Option<(String, i64, i32)>| {
        let id = s.as_ref().map(|s| s.0.clone());
        let pool = pool.clone();
        async move {
            if let Some(id) = id {
                let _ = crate::store::api::drop_upload(&pool, &id).await;
            }
        }
    };
    match purpose.as_deref() {
        Some("batch") => {}
        None => {
            drop_stored(&stored).await;
            return Err(bad(
                "Missing required parameter: 'purpose'.",
                "purpose",
                "missing_required_parameter",
            ));
        }
        Some(other) => {
            drop_stored(&stored).await;
            return Err(bad(
                format!("Invalid value: '{other}'. This server takes files of purpose 'batch' only."),
                "purpose",
                "invalid_value",
            ));
        }
    }
    let Some((id, bytes, lines)) = stored else {
        return Err(bad(
            "Missing required parameter: 'file'.",
            "file",
            "missing_required_parameter",
        ));
    };
    let f = crate::store::api::finish_upload(pool, &id, bytes, lines, api.0.file_ttl)
        .await?
        .ok_or_else(|| {
            ApiError::from(Problem::Internal(format!(
                "upload {id} vanished before it was finished"
            )))
        })?;
    tracing::info!(file = %f.id, key = %who.name, bytes, lines, "file uploaded");
    Ok(Json(object(&f)))
}

#[derive(Deserialize)]
pub struct ListQuery {
    purpose: Option<String>,
    limit: Option<i64>,
    after: Option<String>,
    order: Option<String>,
}

/// `GET /v1/files`: the key's files (output and error files included), newest first by default.
pub async fn list(
    State(api): State<ApiState>,
    who: Producer,
    Query(q): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = super::limit_of(q.limit)?;
    let newest_first = match q.order.as_deref() {
        None | Some("desc") => true,
        Some("asc") => false,
        Some(o) => {
            return Err(bad(
                format!("Invalid value: '{o}'. Supported values are: 'asc' and 'desc'."),
                "order",
                "invalid_value",
            ))
        }
    };
    let mut rows = crate::store::api::files(
        &api.0.pool,
        &who.name,
        q.purpose.as_deref(),
        newest_first,
        q.after.as_deref(),
        limit + 1,
    )
    .await?;
    let has_more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    let data: Vec<Value> = rows.iter().map(object).collect();
    Ok(super::page(data, has_more, |v| {
        v["id"].as_str().unwrap_or_default().to_string()
    }))
}

/// `GET /v1/files/{id}`.
pub async fn retrieve(
    State(api): State<ApiState>,
    who: Producer,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let f = crate::store::api::file(&api.0.pool, &who.name, &id)
        .await?
        .ok_or_else(|| no_file(&id))?;
    Ok(Json(object(&f)))
}

/// `DELETE /v1/files/{id}`.
pub async fn delete(
    State(api): State<ApiState>,
    who: Producer,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    if !crate::store::api::delete_file(&api.0.pool, &who.name, &id).await? {
        return Err(no_file(&id));
    }
    Ok(Json(json!({"id": id, "object": "file", "deleted": true})))
}

/// `GET /v1/files/{id}/content`: streamed. An uploaded file is read a chunk at a time; an
/// output or error file is made from its batch's jobs as it is sent (the lines `export` writes).
pub async fn content(State(api): State<ApiState>, who: Producer, Path(id): Path<String>) -> Result<Response, ApiError> {
    let f = crate::store::api::file(&api.0.pool, &who.name, &id)
        .await?
        .ok_or_else(|| no_file(&id))?;
    let pool = api.0.pool.clone();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(4);
    tokio::spawn(async move {
        let fail = |e: crate::store::StoreError| Err(std::io::Error::other(e.to_string()));
        match (&f.batch_id, &f.kind) {
            (Some(batch), Some(kind)) => {
                let mut rows = crate::store::api::result_rows(&pool, batch, kind == "output");
                let mut buf = Vec::with_capacity(64 * 1024);
                while let Some(row) = rows.next().await {
                    match row {
                        Ok(job) => {
                            let _ = job.write_line(&mut buf);
                            buf.push(b'\n');
                        }
                        Err(e) => {
                            let _ = tx.send(fail(e.into())).await;
                            return;
                        }
                    }
                    if buf.len() >= 64 * 1024 && tx.send(Ok(std::mem::take(&mut buf))).await.is_err() {
                        return;
                    }
                }
                if !buf.is_empty() {
                    let _ = tx.send(Ok(buf)).await;
                }
            }
            _ => {
                for seq in 0.. {
                    let item = match crate::store::api::chunk(&pool, &f.id, seq).await {
                        Ok(Some(data)) => Ok(data),
                        Ok(None) => return,
                        Err(e) => fail(e),
                    };
                    let failed = item.is_err();
                    if tx.send(item).await.is_err() || failed {
                        return;
                    }
                }
            }
        }
    });
    let mut rx = rx;
    let body = Body::from_stream(futures::stream::poll_fn(move |cx| rx.poll_recv(cx)));
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], body).into_response())
}
