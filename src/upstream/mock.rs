//! `sheepdog mock-upstream`: an OpenAI-compatible stand-in for HolySheep.
//!
//! Same route, bodies, `usage`, error bodies and headers as the real API, with
//! knobs for latency, random errors, forced 429s with `Retry-After`, and 5xx,
//! auth and hang modes, changeable at run time through `POST /_mock/config`.
//! `usage` is a pure function of the request (prompt tokens counted as
//! [`crate::tokens::prompt_tokens`] does) so tests can compute costs exactly.
//! Every call it answers is recorded (`GET /_mock/calls`) so tests can check the
//! ledger against what the upstream really saw.
//!
//! `rpm_limit` makes it behave like a real account limit: at most that many requests are
//! answered in any sliding minute, the rest get 429 with `Retry-After`, and every answer carries
//! `x-ratelimit-{limit,remaining,reset}-requests` as OpenAI sends them. `models` overrides any of
//! this per model, so a test can break one model and not another.
//!
//! `usage` comes in each vendor's own shape ([`UsageShape`]), chosen by the model's name unless
//! set (`usage_shape`, for all or per model), with cache reads, cache writes and reasoning tokens
//! as asked; OpenAI's reasoning models answer `400 unsupported_parameter` to `max_tokens`, as
//! the real API does.
//!
//! A user message containing `[mock:400]`, `[mock:401]`, `[mock:404]`,
//! `[mock:422]`, `[mock:429]`, `[mock:500]` or `[mock:hang]` gets that answer,
//! whatever the mode, so one job of a batch can be made to fail.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

/// How the mock answers every call (triggers aside).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum MockMode {
    /// Answer normally.
    #[default]
    Ok,
    /// Every call 500.
    Fail,
    /// Never answer.
    Hang,
    /// Every call 401.
    Unauthorized,
    /// Every call 402.
    NoBalance,
    /// Every call 429.
    Overloaded,
}

/// How `usage` is written, as each vendor's API (or an OpenAI-shaped gateway in front of it)
/// writes it. See `crate::usage` for how sheepdog reads each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum UsageShape {
    /// `prompt_tokens_details.cached_tokens`, `completion_tokens_details.reasoning_tokens`.
    Openai,
    /// `prompt_cache_hit_tokens` / `prompt_cache_miss_tokens` (no `prompt_tokens_details`).
    Deepseek,
    /// OpenAI's fields plus Anthropic's `cache_creation_input_tokens` and `cache_read_input_tokens`.
    Anthropic,
    /// Anthropic's own: `input_tokens` (the uncached part only), `output_tokens`, cache fields.
    AnthropicNative,
    /// Thoughts beside the output: `completion_tokens` leaves them out, `total_tokens` counts them.
    Gemini,
}

impl UsageShape {
    /// The shape a model's vendor answers in, by its name.
    pub fn of_model(model: &str) -> UsageShape {
        if model.starts_with("claude") {
            UsageShape::Anthropic
        } else if model.starts_with("gemini") {
            UsageShape::Gemini
        } else if model.starts_with("deepseek") {
            UsageShape::Deepseek
        } else {
            UsageShape::Openai
        }
    }
}

/// OpenAI's reasoning models (o-series, gpt-5): they refuse `max_tokens`.
fn openai_reasoning(model: &str) -> bool {
    ["o1", "o3", "o4", "gpt-5"].iter().any(|p| {
        model
            .strip_prefix(p)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('-'))
    })
}

/// Models that spend output on reasoning, by name.
fn reasoning_model(model: &str) -> bool {
    openai_reasoning(model) || model.contains("reasoner") || model.contains("thinking")
}

/// What one model does differently from the rest; unset fields follow the main settings.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct MockModel {
    pub mode: Option<MockMode>,
    pub latency_ms_min: Option<u64>,
    pub latency_ms_max: Option<u64>,
    pub error_rate: Option<f64>,
    pub rate_429: Option<f64>,
    /// This model's own sliding-minute limit.
    pub rpm_limit: Option<u64>,
    /// The shape of its `usage` (default: by the model's name).
    pub usage_shape: Option<UsageShape>,
    pub cached_percent: Option<u64>,
    pub cache_write_percent: Option<u64>,
    pub reasoning_percent: Option<u64>,
    /// Answer `max_tokens` with 400 `unsupported_parameter` (default: OpenAI's reasoning models).
    pub rejects_max_tokens: Option<bool>,
}

/// What the mock does with each request. Every field can be changed while it runs
/// (`POST /_mock/config`); the defaults are the command line's (`sheepdog mock-upstream`).
#[derive(Clone, Debug, Serialize, Deserialize, clap::Args)]
#[serde(default)]
pub struct MockConfig {
    /// Added latency in ms, drawn uniformly from `latency-ms..=latency-ms-max`.
    #[arg(long = "latency-ms", default_value_t = 0)]
    pub latency_ms_min: u64,
    /// High end of the latency range (at or below the low end: a fixed latency).
    #[arg(long = "latency-ms-max", default_value_t = 0)]
    pub latency_ms_max: u64,
    /// How every call is answered.
    #[arg(long, value_enum, default_value = "ok")]
    pub mode: MockMode,
    /// Share of calls answered 500, at random.
    #[arg(long, default_value_t = 0.0)]
    pub error_rate: f64,
    /// Share of calls answered 429 with `Retry-After`, at random.
    #[arg(long = "rate-429", default_value_t = 0.0)]
    pub rate_429: f64,
    /// `Retry-After` sent with 429s, in seconds.
    #[arg(long = "retry-after", default_value_t = 1.0)]
    pub retry_after_seconds: f64,
    /// Percent of prompt tokens reported as cached.
    #[arg(long, default_value_t = 0)]
    pub cached_percent: u64,
    /// Percent of prompt tokens reported as written to the cache (where the shape reports writes).
    #[arg(long, default_value_t = 0)]
    pub cache_write_percent: u64,
    /// Percent of completion tokens that are reasoning (default: 50 for reasoning models, by
    /// name: o-series, gpt-5, `*reasoner*`, `*thinking*`; 0 for the rest).
    #[arg(long)]
    pub reasoning_percent: Option<u64>,
    /// The shape of `usage` for every model (default: each model's vendor's, by its name).
    #[arg(long, value_enum)]
    pub usage_shape: Option<UsageShape>,
    /// When set, requests must carry `Authorization: Bearer <this>`.
    #[arg(skip)]
    pub api_key: Option<String>,
    /// Requests answered per sliding minute (an account's limit); the rest get 429.
    #[arg(long)]
    pub rpm_limit: Option<u64>,
    /// Whether answers carry `x-ratelimit-*` headers when a limit is set.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub ratelimit_headers: bool,
    /// Per-model overrides, by model name (set through `POST /_mock/config`).
    #[arg(skip)]
    pub models: BTreeMap<String, MockModel>,
}

impl MockConfig {
    /// The settings that apply to `model`: the main ones, with its overrides.
    fn for_model(&self, model: &str) -> (MockConfig, Option<String>) {
        let mut c = self.clone();
        let Some(m) = self.models.get(model) else {
            return (c, None);
        };
        if let Some(v) = m.mode {
            c.mode = v;
        }
        if let Some(v) = m.latency_ms_min {
            c.latency_ms_min = v;
            c.latency_ms_max = c.latency_ms_max.max(v);
        }
        if let Some(v) = m.latency_ms_max {
            c.latency_ms_max = v;
        }
        if let Some(v) = m.error_rate {
            c.error_rate = v;
        }
        if let Some(v) = m.rate_429 {
            c.rate_429 = v;
        }
        if let Some(v) = m.usage_shape {
            c.usage_shape = Some(v);
        }
        if let Some(v) = m.cached_percent {
            c.cached_percent = v;
        }
        if let Some(v) = m.cache_write_percent {
            c.cache_write_percent = v;
        }
        if let Some(v) = m.reasoning_percent {
            c.reasoning_percent = Some(v);
        }
        // A model's own limit keeps its own window.
        let window = m.rpm_limit.map(|l| {
            c.rpm_limit = Some(l);
            model.to_string()
        });
        (c, window)
    }
}

impl Default for MockConfig {
    fn default() -> Self {
        crate::config::defaults()
    }
}

/// One request the mock answered.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CallRecord {
    /// Milliseconds since the Unix epoch when the request arrived.
    pub arrived_ms: f64,
    pub status: u16,
    pub model: String,
    pub request_id: String,
    pub prompt_tokens: u64,
    /// The whole output, reasoning included: what the call is billed for, whatever the shape.
    pub completion_tokens: u64,
    pub cached_tokens: u64,
    #[serde(default)]
    pub cache_write_tokens: u64,
    #[serde(default)]
    pub reasoning_tokens: u64,
    /// The request's `max_tokens` and `max_completion_tokens`, as sent.
    #[serde(default)]
    pub max_tokens: Option<u64>,
    #[serde(default)]
    pub max_completion_tokens: Option<u64>,
    /// Latency the mock itself added, in milliseconds.
    pub latency_ms: u64,
    /// Whether the request carried a bearer key.
    pub authorized: bool,
    /// Requests being answered when this one arrived, itself included.
    pub concurrent: u64,
    /// The text of the request's last message (its first 200 bytes), to tell jobs apart.
    pub content: String,
}

#[derive(Default)]
struct Inner {
    config: MockConfig,
    calls: Vec<CallRecord>,
    in_flight: u64,
    max_in_flight: u64,
    /// When answered requests arrived, per limit window (`""` for the account's).
    windows: HashMap<String, VecDeque<Instant>>,
}

/// The account's (or a model's) sliding-minute limit as one request sees it.
struct Window {
    limit: u64,
    /// Admitted: under the limit (and now counted in it).
    admitted: bool,
    remaining: u64,
    /// Until the oldest request in the window leaves it.
    reset: Duration,
}

impl Inner {
    fn take_from_window(&mut self, key: &str, limit: u64) -> Window {
        let now = Instant::now();
        let minute = Duration::from_secs(60);
        let w = self.windows.entry(key.to_string()).or_default();
        while w.front().is_some_and(|t| now.duration_since(*t) >= minute) {
            w.pop_front();
        }
        let admitted = (w.len() as u64) < limit;
        if admitted {
            w.push_back(now);
        }
        let reset = w
            .front()
            .map(|t| minute.saturating_sub(now.duration_since(*t)))
            .unwrap_or_default();
        Window {
            limit,
            admitted,
            remaining: limit.saturating_sub(w.len() as u64),
            reset,
        }
    }
}

/// Shared state of a running mock.
#[derive(Clone, Default)]
pub struct MockState {
    inner: Arc<Mutex<Inner>>,
}

impl MockState {
    pub fn new(config: MockConfig) -> Self {
        let s = MockState::default();
        s.set_config(config);
        s
    }
    pub fn config(&self) -> MockConfig {
        self.inner.lock().unwrap().config.clone()
    }
    pub fn set_config(&self, config: MockConfig) {
        self.inner.lock().unwrap().config = config;
    }
    pub fn update(&self, f: impl FnOnce(&mut MockConfig)) {
        f(&mut self.inner.lock().unwrap().config)
    }
    /// Every call answered so far, in arrival order.
    pub fn calls(&self) -> Vec<CallRecord> {
        self.inner.lock().unwrap().calls.clone()
    }
    pub fn call_count(&self) -> usize {
        self.inner.lock().unwrap().calls.len()
    }
    /// The most requests that were ever being answered at once.
    pub fn max_in_flight(&self) -> u64 {
        self.inner.lock().unwrap().max_in_flight
    }
}

/// A mock running on a real socket.
pub struct MockServer {
    pub addr: SocketAddr,
    pub state: MockState,
    task: tokio::task::JoinHandle<()>,
}

impl MockServer {
    /// Binds `addr` (port 0 for a free one) and serves in the background.
    pub async fn start(addr: &str, config: MockConfig) -> anyhow::Result<MockServer> {
        let listener = listen(addr).await?;
        let addr = listener.local_addr()?;
        let state = MockState::new(config);
        let app = router(state.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(MockServer { addr, state, task })
    }

    /// The base URL to give sheepdog as `HOLYSHEEP_BASE_URL`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }
}

/// Binds with an accept queue as deep as the system allows, as production servers are set up
/// (tokio's default is 1,024). A worker starting 2,000 calls at once opens 2,000 connections in
/// the same millisecond; with a shallow queue the kernel drops the handshakes that overflow it,
/// and each of those calls then waits a second for its SYN to be sent again: a delay of the
/// stand-in, not of the worker or of a real upstream.
async fn listen(addr: &str) -> anyhow::Result<tokio::net::TcpListener> {
    let mut last = None;
    for a in tokio::net::lookup_host(addr).await? {
        let socket = if a.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        match socket.bind(a).and_then(|()| socket.listen(ACCEPT_QUEUE)) {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
    }
    Err(match last {
        Some(e) => anyhow::Error::from(e).context(format!("cannot listen on {addr}")),
        None => anyhow::anyhow!("{addr} resolves to no address"),
    })
}

/// Linux caps it at `net.core.somaxconn` (4,096 by default since 5.4).
const ACCEPT_QUEUE: u32 = 4096;

impl Drop for MockServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub fn router(state: MockState) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/chat/completions", post(chat))
        .route("/v1/models", get(models))
        .route("/_mock/config", get(get_config).post(set_config))
        .route("/_mock/calls", get(get_calls))
        .with_state(state)
}

async fn models() -> Json<Value> {
    let data: Vec<Value> = crate::prices::PriceTable::built_in_names()
        .into_iter()
        .map(|m| json!({"id": m, "object": "model", "owned_by": "mock"}))
        .collect();
    Json(json!({"object": "list", "data": data}))
}

async fn get_config(State(s): State<MockState>) -> Json<MockConfig> {
    Json(s.config())
}

async fn set_config(State(s): State<MockState>, Json(c): Json<MockConfig>) -> Json<MockConfig> {
    s.set_config(c.clone());
    Json(c)
}

async fn get_calls(State(s): State<MockState>) -> Json<Vec<CallRecord>> {
    Json(s.calls())
}

fn now_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
        * 1000.0
}

/// Decrements the in-flight count however the handler ends (a client that
/// hangs up drops the future).
struct InFlight(MockState);
impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.inner.lock().unwrap().in_flight -= 1;
    }
}

fn error_body(status: StatusCode, message: &str, kind: &str, code: Option<&str>) -> Value {
    json!({"error": {"message": message, "type": kind, "param": null, "code": code}, "status": status.as_u16()})
}

async fn chat(State(state): State<MockState>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    let arrived_ms = now_ms();
    let started = Instant::now();
    let (config, concurrent, _guard) = {
        let mut inner = state.inner.lock().unwrap();
        inner.in_flight += 1;
        inner.max_in_flight = inner.max_in_flight.max(inner.in_flight);
        (inner.config.clone(), inner.in_flight, InFlight(state.clone()))
    };
    let request_id = format!("req_{}", uuid::Uuid::new_v4().simple());
    let authorized = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("Bearer "));

    let parsed: Result<Map<String, Value>, String> = serde_json::from_slice::<Value>(&body)
        .map_err(|e| format!("We could not parse the JSON body of your request: {e}"))
        .and_then(|v| match v {
            Value::Object(o) => Ok(o),
            _ => Err("The request body must be a JSON object.".into()),
        });
    let model = parsed
        .as_ref()
        .ok()
        .and_then(|b| b.get("model"))
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let trigger = parsed.as_ref().ok().and_then(trigger_of).unwrap_or_default();
    let content = parsed.as_ref().ok().map(last_content).unwrap_or_default();
    let (config, window_key) = config.for_model(&model);
    let latency_ms = if config.latency_ms_max > config.latency_ms_min {
        rand::rng().random_range(config.latency_ms_min..=config.latency_ms_max)
    } else {
        config.latency_ms_min
    };

    let rng_roll = || rand::rng().random::<f64>();
    let forced: Option<(StatusCode, &str)> = match trigger.as_str() {
        "" => None,
        "hang" => Some((StatusCode::GATEWAY_TIMEOUT, "hang")),
        t => t
            .parse::<u16>()
            .ok()
            .and_then(|c| StatusCode::from_u16(c).ok())
            .map(|s| (s, "trigger")),
    };
    let key_ok = match &config.api_key {
        None => true,
        Some(k) => headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v == format!("Bearer {k}")),
    };
    let mut outcome: Option<StatusCode> = if let Some((s, why)) = forced {
        if why == "hang" {
            None
        } else {
            Some(s)
        }
    } else if !key_ok {
        Some(StatusCode::UNAUTHORIZED)
    } else {
        match config.mode {
            MockMode::Fail => Some(StatusCode::INTERNAL_SERVER_ERROR),
            MockMode::Hang => None,
            MockMode::Unauthorized => Some(StatusCode::UNAUTHORIZED),
            MockMode::NoBalance => Some(StatusCode::PAYMENT_REQUIRED),
            MockMode::Overloaded => Some(StatusCode::TOO_MANY_REQUESTS),
            _ if config.rate_429 > 0.0 && rng_roll() < config.rate_429 => Some(StatusCode::TOO_MANY_REQUESTS),
            _ if config.error_rate > 0.0 && rng_roll() < config.error_rate => Some(StatusCode::INTERNAL_SERVER_ERROR),
            _ => Some(StatusCode::OK),
        }
    };
    // The account's limit: a request over it is answered 429 at once.
    let window = match (config.rpm_limit, outcome) {
        (Some(limit), Some(StatusCode::OK)) => {
            let w = state
                .inner
                .lock()
                .unwrap()
                .take_from_window(window_key.as_deref().unwrap_or(""), limit);
            if !w.admitted {
                outcome = Some(StatusCode::TOO_MANY_REQUESTS);
            }
            Some(w)
        }
        _ => None,
    };
    let Some(status) = outcome else {
        // Hang: answer nothing until the client gives up (or a long hour passes).
        // Recorded with status 0: the call arrived and may count as billed.
        state.inner.lock().unwrap().calls.push(CallRecord {
            arrived_ms,
            status: 0,
            model,
            request_id,
            prompt_tokens: 0,
            completion_tokens: 0,
            cached_tokens: 0,
            cache_write_tokens: 0,
            reasoning_tokens: 0,
            max_tokens: bound_of(&parsed, "max_tokens"),
            max_completion_tokens: bound_of(&parsed, "max_completion_tokens"),
            latency_ms: 0,
            authorized,
            concurrent,
            content,
        });
        tokio::time::sleep(Duration::from_secs(3600)).await;
        return StatusCode::GATEWAY_TIMEOUT.into_response();
    };
    let rejected_at_once = window.as_ref().is_some_and(|w| !w.admitted);
    if latency_ms > 0 && !rejected_at_once {
        tokio::time::sleep(Duration::from_millis(latency_ms)).await;
    }

    let mut record = CallRecord {
        arrived_ms,
        status: status.as_u16(),
        model: model.clone(),
        request_id: request_id.clone(),
        prompt_tokens: 0,
        completion_tokens: 0,
        cached_tokens: 0,
        cache_write_tokens: 0,
        reasoning_tokens: 0,
        max_tokens: bound_of(&parsed, "max_tokens"),
        max_completion_tokens: bound_of(&parsed, "max_completion_tokens"),
        latency_ms,
        authorized,
        concurrent,
        content,
    };
    let mut resp_headers = HeaderMap::new();
    resp_headers.insert("x-request-id", HeaderValue::from_str(&request_id).unwrap());
    resp_headers.insert(
        "openai-processing-ms",
        HeaderValue::from(started.elapsed().as_millis() as u64),
    );
    if let (Some(w), true) = (&window, config.ratelimit_headers) {
        resp_headers.insert("x-ratelimit-limit-requests", HeaderValue::from(w.limit));
        resp_headers.insert("x-ratelimit-remaining-requests", HeaderValue::from(w.remaining));
        if let Ok(v) = HeaderValue::from_str(&format!("{:.3}s", w.reset.as_secs_f64())) {
            resp_headers.insert("x-ratelimit-reset-requests", v);
        }
    }

    let (status, body) = match (status, &parsed) {
        (StatusCode::OK, Err(msg)) => {
            record.status = 400;
            (
                StatusCode::BAD_REQUEST,
                error_body(StatusCode::BAD_REQUEST, msg, "invalid_request_error", None),
            )
        }
        (StatusCode::OK, Ok(req)) => match completion(req, &model, &config) {
            Ok((body, used)) => {
                record.prompt_tokens = used.prompt_tokens;
                record.completion_tokens = used.completion_tokens;
                record.cached_tokens = used.cached_tokens;
                record.cache_write_tokens = used.cache_write_tokens;
                record.reasoning_tokens = used.reasoning_tokens;
                (StatusCode::OK, body)
            }
            Err(body) => {
                record.status = 400;
                (StatusCode::BAD_REQUEST, body)
            }
        },
        (StatusCode::TOO_MANY_REQUESTS, _) => {
            let secs = config.retry_after_seconds.max(0.0);
            resp_headers.insert("retry-after", HeaderValue::from(secs.ceil() as u64));
            resp_headers.insert("retry-after-ms", HeaderValue::from((secs * 1000.0).round() as u64));
            let mut b = error_body(
                status,
                "Rate limit reached for requests. Please try again later.",
                "requests",
                Some("rate_limit_exceeded"),
            );
            b["error"]["retry_after"] = json!(secs);
            (status, b)
        }
        (StatusCode::UNAUTHORIZED, _) => (
            status,
            error_body(
                status,
                "Incorrect API key provided.",
                "invalid_request_error",
                Some("invalid_api_key"),
            ),
        ),
        (StatusCode::PAYMENT_REQUIRED, _) => (
            status,
            error_body(
                status,
                "Your account balance is insufficient.",
                "insufficient_quota",
                Some("insufficient_quota"),
            ),
        ),
        (StatusCode::FORBIDDEN, _) => (
            status,
            error_body(
                status,
                "You are not allowed to use this model.",
                "permission_error",
                None,
            ),
        ),
        (StatusCode::NOT_FOUND, _) => (
            status,
            error_body(
                status,
                &format!("The model `{model}` does not exist."),
                "invalid_request_error",
                Some("model_not_found"),
            ),
        ),
        (s, _) if s.is_client_error() => (
            s,
            error_body(
                s,
                "Invalid request (forced by the mock).",
                "invalid_request_error",
                None,
            ),
        ),
        (s, _) => (
            s,
            error_body(
                s,
                "The server had an error while processing your request.",
                "server_error",
                None,
            ),
        ),
    };
    state.inner.lock().unwrap().calls.push(record);
    (status, resp_headers, Json(body)).into_response()
}

/// The last message's text, its first 200 bytes.
fn last_content(req: &Map<String, Value>) -> String {
    let text = req
        .get("messages")
        .and_then(Value::as_array)
        .and_then(|m| m.last())
        .and_then(|m| m.get("content"))
        .and_then(Value::as_str)
        .unwrap_or("");
    crate::upstream::error::truncate(text, 200)
}

/// The `[mock:...]` trigger in the request's messages, if any.
fn trigger_of(req: &Map<String, Value>) -> Option<String> {
    let msgs = req.get("messages")?.as_array()?;
    msgs.iter().find_map(|m| {
        let text = m.get("content")?.as_str()?;
        let start = text.find("[mock:")? + 6;
        let end = text[start..].find(']')? + start;
        Some(text[start..end].to_string())
    })
}

/// Completion tokens the mock reports: a pure function of the prompt, never
/// more than the request allows.
pub fn completion_tokens_for(prompt_tokens: u64, max_tokens: Option<u64>) -> u64 {
    let natural = 5 + (prompt_tokens * 7) % 40;
    max_tokens.map_or(natural, |m| natural.min(m))
}

/// A request's `max_tokens` or `max_completion_tokens`, if it sent one.
fn bound_of(req: &Result<Map<String, Value>, String>, key: &str) -> Option<u64> {
    req.as_ref().ok()?.get(key)?.as_u64()
}

/// What one answer used, in sheepdog's terms (the record the tests price from).
#[derive(Clone, Copy, Debug, Default)]
struct Used {
    prompt_tokens: u64,
    completion_tokens: u64,
    cached_tokens: u64,
    cache_write_tokens: u64,
    reasoning_tokens: u64,
}

/// `usage` as the vendor's shape writes it.
fn usage_json(shape: UsageShape, u: &Used) -> Value {
    let uncached = u.prompt_tokens - u.cached_tokens - u.cache_write_tokens;
    match shape {
        UsageShape::Openai => json!({
            "prompt_tokens": u.prompt_tokens,
            "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_tokens, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": u.reasoning_tokens, "audio_tokens": 0,
                                          "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0},
        }),
        UsageShape::Deepseek => {
            let mut v = json!({
                "prompt_tokens": u.prompt_tokens,
                "completion_tokens": u.completion_tokens,
                "total_tokens": u.prompt_tokens + u.completion_tokens,
                "prompt_cache_hit_tokens": u.cached_tokens,
                "prompt_cache_miss_tokens": u.prompt_tokens - u.cached_tokens,
            });
            if u.reasoning_tokens > 0 {
                v["completion_tokens_details"] = json!({"reasoning_tokens": u.reasoning_tokens});
            }
            v
        }
        UsageShape::Anthropic => json!({
            "prompt_tokens": u.prompt_tokens,
            "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
            "cache_creation_input_tokens": u.cache_write_tokens,
            "cache_read_input_tokens": u.cached_tokens,
        }),
        UsageShape::AnthropicNative => json!({
            "input_tokens": uncached,
            "output_tokens": u.completion_tokens,
            "cache_creation_input_tokens": u.cache_write_tokens,
            "cache_read_input_tokens": u.cached_tokens,
        }),
        UsageShape::Gemini => json!({
            "prompt_tokens": u.prompt_tokens,
            "completion_tokens": u.completion_tokens - u.reasoning_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
        }),
    }
}

/// A 400 in OpenAI's error object.
fn invalid_request(message: &str, param: Option<&str>, code: Option<&str>) -> Value {
    json!({"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}})
}

fn completion(req: &Map<String, Value>, model: &str, config: &MockConfig) -> Result<(Value, Used), Value> {
    if model.is_empty() {
        return Err(invalid_request(
            "you must provide a model parameter",
            Some("model"),
            None,
        ));
    }
    if !matches!(req.get("messages"), Some(Value::Array(m)) if !m.is_empty()) {
        return Err(invalid_request(
            "'messages' must be a non-empty array",
            Some("messages"),
            None,
        ));
    }
    if req.get("stream").and_then(Value::as_bool) == Some(true) {
        return Err(invalid_request(
            "this mock does not stream; send stream: false",
            Some("stream"),
            None,
        ));
    }
    let rejects_max_tokens = config
        .models
        .get(model)
        .and_then(|m| m.rejects_max_tokens)
        .unwrap_or_else(|| openai_reasoning(model));
    if rejects_max_tokens && req.get("max_tokens").is_some_and(|v| !v.is_null()) {
        // OpenAI's own words for its reasoning models.
        return Err(invalid_request(
            "Unsupported parameter: 'max_tokens' is not supported with this model. Use 'max_completion_tokens' instead.",
            Some("max_tokens"),
            Some("unsupported_parameter"),
        ));
    }
    let prompt = crate::tokens::prompt_tokens(req);
    let max = ["max_completion_tokens", "max_tokens"]
        .iter()
        .find_map(|k| req.get(*k).and_then(Value::as_u64));
    let completion = completion_tokens_for(prompt, max);
    let natural = completion_tokens_for(prompt, None);
    let cached = prompt * config.cached_percent.min(100) / 100;
    let reasoning_percent = config
        .reasoning_percent
        .unwrap_or(if reasoning_model(model) { 50 } else { 0 });
    let used = Used {
        prompt_tokens: prompt,
        completion_tokens: completion,
        cached_tokens: cached,
        cache_write_tokens: (prompt * config.cache_write_percent.min(100) / 100).min(prompt - cached),
        reasoning_tokens: completion * reasoning_percent.min(100) / 100,
    };
    let shape = config.usage_shape.unwrap_or_else(|| UsageShape::of_model(model));
    let content = vec!["mock"; (completion - used.reasoning_tokens) as usize].join(" ");
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let body = json!({
        "id": format!("chatcmpl-{}", uuid::Uuid::new_v4().simple()),
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": content, "refusal": null},
            "logprobs": null,
            "finish_reason": if completion < natural { "length" } else { "stop" },
        }],
        "usage": usage_json(shape, &used),
        "system_fingerprint": "fp_sheepdog_mock",
    });
    Ok((body, used))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(model: &str, extra: Value, config: &MockConfig) -> Result<(Value, Used), Value> {
        let mut req = json!({"model": model, "messages": [{"role": "user", "content": "Tell me a long story."}]});
        for (k, v) in extra.as_object().unwrap() {
            req[k] = v.clone();
        }
        completion(req.as_object().unwrap(), model, config)
    }

    #[test]
    fn every_shape_reads_back_as_what_was_used() {
        for shape in [
            UsageShape::Openai,
            UsageShape::Deepseek,
            UsageShape::Anthropic,
            UsageShape::AnthropicNative,
            UsageShape::Gemini,
        ] {
            let config = MockConfig {
                usage_shape: Some(shape),
                cached_percent: 40,
                cache_write_percent: if matches!(shape, UsageShape::Anthropic | UsageShape::AnthropicNative) {
                    30
                } else {
                    0
                },
                reasoning_percent: Some(50),
                ..Default::default()
            };
            let (body, used) = answer("m", json!({"max_tokens": 30}), &config).unwrap();
            let read = crate::usage::Usage::from_response(&body).unwrap();
            assert_eq!(
                (
                    read.prompt_tokens,
                    read.completion_tokens,
                    read.cached_tokens,
                    read.cache_write_tokens
                ),
                (
                    used.prompt_tokens,
                    used.completion_tokens,
                    used.cached_tokens,
                    used.cache_write_tokens
                ),
                "{shape:?}: {}",
                body["usage"]
            );
        }
    }

    #[test]
    fn openai_reasoning_models_refuse_max_tokens() {
        let config = MockConfig::default();
        let e = answer("o4-mini", json!({"max_tokens": 30}), &config).unwrap_err();
        assert_eq!(e["error"]["code"], "unsupported_parameter");
        assert_eq!(e["error"]["param"], "max_tokens");
        let (body, used) = answer("o4-mini", json!({"max_completion_tokens": 30}), &config).unwrap();
        assert!(used.reasoning_tokens > 0);
        assert_eq!(
            body["usage"]["completion_tokens_details"]["reasoning_tokens"],
            used.reasoning_tokens
        );
        assert!(answer("gpt-4o", json!({"max_tokens": 30}), &config).is_ok());
        assert!(answer("o4", json!({"max_tokens": 30}), &config).is_err());
        assert!(answer("omni-x", json!({"max_tokens": 30}), &config).is_ok());
    }
}
