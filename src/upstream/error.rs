//! What an upstream answer means for the job, decided in one place (contract §5).
//!
//! | answer                                   | verdict                                 |
//! |------------------------------------------|-----------------------------------------|
//! | 2xx with a body and `usage`              | `Ok`                                    |
//! | 429, 408, 409, 425, 5xx, timeout, network| `Transient` (with any `Retry-After`)    |
//! | 401, 402, 403                            | `Paused`: the key or the balance        |
//! | 400, 404, 422 and other 4xx              | `Permanent`: the job fails at once      |

use std::time::Duration;

use reqwest::header::HeaderMap;
use serde_json::Value;

#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// The call answered; the job is done.
    Ok,
    /// The request is wrong; retrying cannot help.
    Permanent { reason: String },
    /// The upstream or the network failed; retry later, not before `retry_after`.
    Transient {
        reason: String,
        retry_after: Option<Duration>,
    },
    /// The account cannot be used (key refused, balance gone): fail no job, pause everything.
    Paused { reason: String },
}

impl Verdict {
    pub fn reason(&self) -> &str {
        match self {
            Verdict::Ok => "ok",
            Verdict::Permanent { reason } | Verdict::Transient { reason, .. } | Verdict::Paused { reason } => reason,
        }
    }
}

/// Classifies an HTTP answer by status, headers and body.
pub fn classify(status: u16, headers: &HeaderMap, body: &Value) -> Verdict {
    let message = body
        .pointer("/error/message")
        .and_then(Value::as_str)
        .map(|m| truncate(m, 300))
        .unwrap_or_default();
    let reason = if message.is_empty() {
        format!("upstream answered HTTP {status}")
    } else {
        format!("upstream answered HTTP {status}: {message}")
    };
    match status {
        200..=299 => {
            if crate::usage::Usage::from_response(body).is_some() {
                Verdict::Ok
            } else {
                Verdict::Transient {
                    reason: format!("upstream answered HTTP {status} without usage"),
                    retry_after: None,
                }
            }
        }
        401..=403 => Verdict::Paused { reason },
        408 | 409 | 425 | 429 | 500..=599 => Verdict::Transient {
            reason,
            retry_after: retry_after(headers, body),
        },
        _ => Verdict::Permanent { reason },
    }
}

/// `Retry-After` as seconds or an HTTP date, `retry-after-ms`, or the body's
/// `error.retry_after`; capped at an hour so a silly value cannot stall us forever.
pub fn retry_after(headers: &HeaderMap, body: &Value) -> Option<Duration> {
    let cap = Duration::from_secs(3600);
    if let Some(ms) = headers
        .get("retry-after-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|v| v.is_finite() && *v >= 0.0)
    {
        return Some(Duration::from_secs_f64(ms / 1000.0).min(cap));
    }
    if let Some(v) = headers.get(reqwest::header::RETRY_AFTER).and_then(|v| v.to_str().ok()) {
        let v = v.trim();
        if let Ok(secs) = v.parse::<f64>() {
            if secs.is_finite() && secs >= 0.0 {
                return Some(Duration::from_secs_f64(secs).min(cap));
            }
        }
        if let Ok(when) = chrono::DateTime::parse_from_rfc2822(v) {
            let d = when.with_timezone(&chrono::Utc) - chrono::Utc::now();
            return Some(d.to_std().unwrap_or_default().min(cap));
        }
    }
    let secs = match body.pointer("/error/retry_after") {
        Some(Value::Number(n)) => n.as_f64(),
        Some(Value::String(s)) => s.trim().parse::<f64>().ok(),
        _ => None,
    }?;
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs).min(cap))
}

pub fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn table() {
        let h = HeaderMap::new();
        let ok = json!({"usage": {"prompt_tokens": 1}});
        assert_eq!(classify(200, &h, &ok), Verdict::Ok);
        assert!(matches!(classify(200, &h, &json!({})), Verdict::Transient { .. }));
        for s in [400, 404, 422] {
            assert!(matches!(classify(s, &h, &json!({})), Verdict::Permanent { .. }), "{s}");
        }
        for s in [401, 402, 403] {
            assert!(matches!(classify(s, &h, &json!({})), Verdict::Paused { .. }), "{s}");
        }
        for s in [429, 500, 502, 503, 504] {
            assert!(matches!(classify(s, &h, &json!({})), Verdict::Transient { .. }), "{s}");
        }
    }

    #[test]
    fn retry_after_sources() {
        let mut h = HeaderMap::new();
        h.insert("retry-after", "7".parse().unwrap());
        assert_eq!(retry_after(&h, &json!({})), Some(Duration::from_secs(7)));
        let body = json!({"error": {"retry_after": 2.5}});
        assert_eq!(retry_after(&HeaderMap::new(), &body), Some(Duration::from_millis(2500)));
        assert_eq!(retry_after(&HeaderMap::new(), &json!({})), None);
    }
}
