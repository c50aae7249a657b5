//! One pooled HTTP client for `POST {base}/chat/completions`.

use std::time::{Duration, Instant};

use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;

use super::error::{classify, truncate, Verdict};
use super::ratelimit::RateLimitInfo;
use crate::config::UpstreamArgs;
use crate::prices::Usage;

/// What one upstream call gave back.
#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    /// What sheepdog reads of the body (`usage`, `usageMetadata`, `error`, `id`, as they came);
    /// the answer itself is in `raw`.
    pub body: Value,
    /// The body as JSON text: as it came when it was JSON (stored as it is, never encoded again).
    pub raw: String,
    /// The `x-request-id` header, else the body's `id`.
    pub request_id: Option<String>,
    pub usage: Option<Usage>,
    /// The upstream's own rate-limit headers.
    pub limits: RateLimitInfo,
}

/// One call attempt: what came back (if anything) and what it means.
#[derive(Clone, Debug)]
pub struct Attempt {
    pub response: Option<Response>,
    pub verdict: Verdict,
    pub latency: Duration,
    /// True when the request may have reached the upstream and been billed but no
    /// answer was read (a timeout, a connection cut mid-call): the ledger then
    /// charges the call at its reservation.
    pub maybe_billed: bool,
    /// The request never reached the upstream (connection refused, DNS): the upstream as a
    /// whole is unreachable, not one model failing.
    pub unreachable: bool,
}

/// How long a connection to the upstream waits idle in the pool before it is closed.
pub const IDLE_CONNECTION: Duration = Duration::from_secs(60);

#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    url: String,
    api_key: Option<SecretString>,
    max_response_bytes: usize,
    timeout: Duration,
}

impl Client {
    pub fn new(args: &UpstreamArgs, pool_size: usize) -> anyhow::Result<Client> {
        let http = reqwest::Client::builder()
            .timeout(args.http_timeout())
            .connect_timeout(Duration::from_secs(10).min(args.http_timeout()))
            .pool_max_idle_per_host(pool_size.max(1))
            .pool_idle_timeout(IDLE_CONNECTION)
            .tcp_nodelay(true)
            .user_agent(concat!("sheepdog/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Client {
            http,
            url: format!("{}/chat/completions", args.base_url.trim_end_matches('/')),
            // An empty HOLYSHEEP_API_KEY is no key.
            api_key: args.api_key.clone().filter(|k| !k.expose_secret().is_empty()),
            max_response_bytes: args.max_response_bytes,
            timeout: args.http_timeout(),
        })
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Sends one request (a JSON body, as bytes). Never fails: every failure is an [`Attempt`]
    /// with a verdict.
    pub async fn call(&self, body: Vec<u8>) -> Attempt {
        let started = Instant::now();
        let mut req = self
            .http
            .post(&self.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body);
        if let Some(key) = &self.api_key {
            req = req.bearer_auth(key.expose_secret());
        }
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => return network_failure(e, started),
        };
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let bytes = match read_limited(resp, self.max_response_bytes).await {
            Ok(b) => b,
            Err(ReadError::TooLarge) => {
                return Attempt {
                    response: None,
                    verdict: Verdict::Transient {
                        reason: format!(
                            "upstream response larger than the {}-byte limit",
                            self.max_response_bytes
                        ),
                        retry_after: None,
                    },
                    latency: started.elapsed(),
                    maybe_billed: true,
                    unreachable: false,
                }
            }
            Err(ReadError::Http(e)) => return network_failure(e, started),
        };
        let latency = started.elapsed();
        let (body, raw) = match read_parts(&bytes) {
            Ok(body) => {
                // Valid JSON is valid UTF-8.
                let raw = String::from_utf8(bytes).unwrap_or_default();
                (body, raw)
            }
            Err(_) => {
                let text = String::from_utf8_lossy(&bytes);
                let body =
                    serde_json::json!({"error": {"message": truncate(&text, 500), "type": "unparsable_response"}});
                let raw = body.to_string();
                (body, raw)
            }
        };
        let verdict = classify(status, &headers, &body);
        let request_id = headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .or_else(|| body.get("id").and_then(Value::as_str).map(str::to_string));
        let usage = Usage::from_response(&body);
        let limits = RateLimitInfo::from_headers(&headers);
        // A 2xx without usage was probably billed; we cannot tell what it cost.
        let maybe_billed = (200..300).contains(&status) && usage.is_none();
        Attempt {
            response: Some(Response {
                status,
                body,
                raw,
                request_id,
                usage,
                limits,
            }),
            verdict,
            latency,
            maybe_billed,
            unreachable: false,
        }
    }
}

enum ReadError {
    TooLarge,
    Http(reqwest::Error),
}

async fn read_limited(mut resp: reqwest::Response, max: usize) -> Result<Vec<u8>, ReadError> {
    if resp.content_length().is_some_and(|n| n as usize > max) {
        return Err(ReadError::TooLarge);
    }
    let mut buf = Vec::with_capacity(resp.content_length().unwrap_or(1024).min(max as u64) as usize);
    while let Some(chunk) = resp.chunk().await.map_err(ReadError::Http)? {
        if buf.len() + chunk.len() > max {
            return Err(ReadError::TooLarge);
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf)
}

fn network_failure(e: reqwest::Error, started: Instant) -> Attempt {
    // reqwest's messages carry the URL, never the Authorization header.
    let (reason, maybe_billed, unreachable) = if e.is_timeout() {
        ("upstream call timed out".to_string(), true, false)
    } else if e.is_connect() {
        (
            format!("cannot connect to the upstream: {}", error_chain(&e)),
            false,
            true,
        )
    } else {
        (format!("upstream call failed: {}", error_chain(&e)), true, false)
    };
    Attempt {
        response: None,
        verdict: Verdict::Transient {
            reason,
            retry_after: None,
        },
        latency: started.elapsed(),
        maybe_billed,
        unreachable,
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// The members of an answer sheepdog reads. Its choices (the message, most of the body) are
/// skipped as they are parsed rather than built into maps and strings only to be dropped: a
/// worker keeps the answer as its text (`Response::raw`).
#[derive(serde::Deserialize)]
struct Parts {
    id: Option<Value>,
    usage: Option<Value>,
    #[serde(rename = "usageMetadata")]
    usage_metadata: Option<Value>,
    error: Option<Value>,
}

/// The body's members in [`Parts`], as an object of those present. A body that is JSON of
/// another shape (not an object, a member twice) is read whole, as before.
fn read_parts(bytes: &[u8]) -> Result<Value, serde_json::Error> {
    // (A struct also reads from an array, member by position: only an object is read in parts.)
    let object = bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
    let parts = if object {
        serde_json::from_slice::<Parts>(bytes).ok()
    } else {
        None
    };
    let Some(p) = parts else {
        return serde_json::from_slice::<Value>(bytes);
    };
    let mut m = serde_json::Map::new();
    for (k, v) in [
        ("id", p.id),
        ("usage", p.usage),
        ("usageMetadata", p.usage_metadata),
        ("error", p.error),
    ] {
        if let Some(v) = v {
            m.insert(k.to_string(), v);
        }
    }
    Ok(Value::Object(m))
}

#[cfg(test)]
mod tests {
    use super::read_parts;
    use serde_json::json;

    #[test]
    fn an_answer_is_read_in_the_parts_sheepdog_uses() {
        let body = json!({"id": "chatcmpl-1", "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1}});
        let parts = read_parts(body.to_string().as_bytes()).unwrap();
        assert_eq!(
            parts,
            json!({"id": "chatcmpl-1", "usage": {"prompt_tokens": 3, "completion_tokens": 1}})
        );
        let gemini = json!({"usageMetadata": {"promptTokenCount": 2}, "candidates": []});
        assert_eq!(
            read_parts(gemini.to_string().as_bytes()).unwrap(),
            json!({"usageMetadata": {"promptTokenCount": 2}})
        );
        let error = json!({"error": {"message": "slow down", "type": "rate_limit"}, "usage": null});
        assert_eq!(
            read_parts(error.to_string().as_bytes()).unwrap(),
            json!({"error": {"message": "slow down", "type": "rate_limit"}})
        );
    }

    #[test]
    fn json_of_another_shape_is_read_whole_and_text_is_not_json() {
        // An array would fill a struct by position: it is read as what it is.
        let array = br#"["x", {"prompt_tokens": 1, "completion_tokens": 1}]"#;
        assert_eq!(
            read_parts(array).unwrap(),
            json!(["x", {"prompt_tokens": 1, "completion_tokens": 1}])
        );
        // A member twice: the last one counts, as serde_json's Value has it.
        let twice = br#"{"usage": {"prompt_tokens": 1}, "usage": {"prompt_tokens": 2, "completion_tokens": 1}}"#;
        assert_eq!(read_parts(twice).unwrap()["usage"]["prompt_tokens"], 2);
        assert!(read_parts(b"<html>bad gateway</html>").is_err());
        assert!(read_parts(br#"{"usage": "#).is_err());
    }
}
