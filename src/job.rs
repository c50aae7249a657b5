//! The job message (contract §1): parse and validate one AMQP body.
//!
//! Parsing never panics: every way a body can be wrong becomes an [`InvalidJob`]
//! with a reason a producer can act on, and, where it could be read, the job's
//! identity so the failure can be recorded against it.

use serde_json::{Map, Value};

/// Batch used when a message names none.
pub const DEFAULT_BATCH: &str = "default";
pub const MAX_CUSTOM_ID_BYTES: usize = 256;
pub const MAX_BATCH_ID_BYTES: usize = 128;

/// A job's identity: publishing or delivering the same pair again never makes a second result.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct JobId {
    pub batch_id: String,
    pub custom_id: String,
}

impl std::fmt::Display for JobId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.batch_id, self.custom_id)
    }
}

/// A validated job.
#[derive(Clone, Debug)]
pub struct Job {
    pub id: JobId,
    pub model: String,
    /// The request body exactly as the producer sent it.
    pub body: Map<String, Value>,
    pub metadata: Option<Value>,
}

/// Why a message was refused. `id` is set where the identity could be read.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{reason}")]
pub struct InvalidJob {
    pub reason: String,
    pub id: Option<JobId>,
}

impl InvalidJob {
    fn new(reason: impl Into<String>, id: Option<JobId>) -> Self {
        Self {
            reason: reason.into(),
            id,
        }
    }
}

impl Job {
    /// Parses one message body, checking every rule of contract §1.
    pub fn parse(bytes: &[u8], max_bytes: usize) -> Result<Job, InvalidJob> {
        if bytes.len() > max_bytes {
            return Err(InvalidJob::new(
                format!(
                    "message is {} bytes, larger than the maximum of {max_bytes}",
                    bytes.len()
                ),
                None,
            ));
        }
        let text =
            std::str::from_utf8(bytes).map_err(|e| InvalidJob::new(format!("message is not UTF-8: {e}"), None))?;
        let value: Value =
            serde_json::from_str(text).map_err(|e| InvalidJob::new(format!("message is not valid JSON: {e}"), None))?;
        Self::from_value(value)
    }

    /// Validates an already-parsed JSON value (the `enqueue` command uses this too).
    pub fn from_value(value: Value) -> Result<Job, InvalidJob> {
        let Value::Object(mut obj) = value else {
            return Err(InvalidJob::new("message must be a JSON object", None));
        };
        let custom_id = match obj.get("custom_id") {
            Some(Value::String(s)) if s.is_empty() => return Err(InvalidJob::new("custom_id must not be empty", None)),
            Some(Value::String(s)) if s.len() > MAX_CUSTOM_ID_BYTES => {
                return Err(InvalidJob::new(
                    format!("custom_id is {} bytes, at most {MAX_CUSTOM_ID_BYTES} allowed", s.len()),
                    None,
                ))
            }
            Some(Value::String(s)) => s.clone(),
            Some(_) => return Err(InvalidJob::new("custom_id must be a string", None)),
            None => return Err(InvalidJob::new("custom_id is required", None)),
        };
        let batch_id = match obj.get("batch_id") {
            None | Some(Value::Null) => DEFAULT_BATCH.to_string(),
            Some(Value::String(s)) if s.is_empty() => return Err(InvalidJob::new("batch_id must not be empty", None)),
            Some(Value::String(s)) if s.len() > MAX_BATCH_ID_BYTES => {
                return Err(InvalidJob::new(
                    format!("batch_id is {} bytes, at most {MAX_BATCH_ID_BYTES} allowed", s.len()),
                    None,
                ))
            }
            Some(Value::String(s)) => s.clone(),
            Some(_) => return Err(InvalidJob::new("batch_id must be a string", None)),
        };
        let id = JobId { batch_id, custom_id };
        let bad = |reason: String| InvalidJob::new(reason, Some(id.clone()));

        match obj.get("method") {
            None => {}
            Some(Value::String(m)) if m == "POST" => {}
            Some(other) => return Err(bad(format!("method must be \"POST\", got {}", short(other)))),
        }
        match obj.get("url") {
            None => {}
            Some(Value::String(u)) if u == "/v1/chat/completions" => {}
            Some(other) => {
                return Err(bad(format!(
                    "url must be \"/v1/chat/completions\", got {}",
                    short(other)
                )))
            }
        }
        let metadata = match obj.remove("metadata") {
            None | Some(Value::Null) => None,
            Some(m @ Value::Object(_)) => Some(m),
            Some(_) => return Err(bad("metadata must be a JSON object".into())),
        };
        let body = match obj.remove("body") {
            Some(Value::Object(b)) => b,
            Some(_) => return Err(bad("body must be a JSON object".into())),
            None => return Err(bad("body is required".into())),
        };
        let model = match body.get("model") {
            Some(Value::String(m)) if !m.is_empty() => m.clone(),
            Some(_) => return Err(bad("body.model must be a non-empty string".into())),
            None => return Err(bad("body.model is required".into())),
        };
        match body.get("messages") {
            Some(Value::Array(msgs)) if !msgs.is_empty() => {
                for (i, m) in msgs.iter().enumerate() {
                    match m {
                        Value::Object(o) if matches!(o.get("role"), Some(Value::String(_))) => {}
                        _ => return Err(bad(format!("body.messages[{i}] must be an object with a string role"))),
                    }
                }
            }
            Some(Value::Array(_)) => return Err(bad("body.messages must not be empty".into())),
            Some(_) => return Err(bad("body.messages must be an array".into())),
            None => return Err(bad("body.messages is required".into())),
        }
        for key in ["max_tokens", "max_completion_tokens"] {
            match body.get(key) {
                None | Some(Value::Null) => {}
                Some(v) if v.as_u64().is_some_and(|n| n <= u32::MAX as u64) => {}
                Some(_) => return Err(bad(format!("body.{key} must be a non-negative integer"))),
            }
        }
        Ok(Job {
            id,
            model,
            body,
            metadata,
        })
    }

    /// The request sent upstream and the most completion tokens it allows. The body is sent
    /// as given, except that streaming is forced off and the completion bound goes under the
    /// name the model takes: a reasoning model (`supports_reasoning` in the price file) gets
    /// `max_completion_tokens` and never `max_tokens` (the job's `max_tokens` is carried over
    /// under that name); any other model keeps what the job wrote, and gets `max_tokens` =
    /// `default_max_tokens` when the job set neither.
    pub fn upstream_request(&self, default_max_tokens: u32, reasoning: bool) -> UpstreamRequest {
        let mut body = self.body.clone();
        body.insert("stream".into(), Value::Bool(false));
        body.remove("stream_options");
        let given = |k: &str| body.get(k).and_then(Value::as_u64).map(|n| n as u32);
        let (completion, legacy) = (given("max_completion_tokens"), given("max_tokens"));
        let max_completion_tokens = if reasoning {
            let bound = completion.or(legacy).unwrap_or(default_max_tokens);
            body.remove("max_tokens");
            body.insert("max_completion_tokens".into(), Value::from(bound));
            bound
        } else {
            for k in ["max_completion_tokens", "max_tokens"] {
                if body.get(k).is_some_and(Value::is_null) {
                    body.remove(k);
                }
            }
            match (completion, legacy) {
                // Both given: whichever the upstream honours, the larger bounds the answer.
                (Some(a), Some(b)) => a.max(b),
                (Some(n), None) | (None, Some(n)) => n,
                (None, None) => {
                    body.insert("max_tokens".into(), Value::from(default_max_tokens));
                    default_max_tokens
                }
            }
        };
        UpstreamRequest {
            body,
            max_completion_tokens,
        }
    }
}

/// A job's request as it goes upstream.
#[derive(Clone, Debug)]
pub struct UpstreamRequest {
    pub body: Map<String, Value>,
    /// The most completion tokens the answer may have (reasoning included): with the prompt,
    /// the job's worst case.
    pub max_completion_tokens: u32,
}

/// A short rendering of a JSON value for an error message.
fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 80 {
        let mut end = 80;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}…", &s[..end])
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Job, InvalidJob> {
        Job::parse(s.as_bytes(), 1 << 20)
    }

    #[test]
    fn accepts_a_batch_line() {
        let j = parse(r#"{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{"model":"gpt-4.1","messages":[{"role":"user","content":"hi"}]},"metadata":{"k":1}}"#).unwrap();
        assert_eq!(
            j.id,
            JobId {
                batch_id: "default".into(),
                custom_id: "a".into()
            }
        );
        assert_eq!(j.model, "gpt-4.1");
        assert_eq!(j.metadata, Some(serde_json::json!({"k":1})));
        let up = j.upstream_request(77, false);
        assert_eq!(up.body["max_tokens"], 77);
        assert_eq!(up.body["stream"], false);
        assert_eq!(up.max_completion_tokens, 77);
    }

    #[test]
    fn reasoning_models_get_max_completion_tokens_and_never_max_tokens() {
        let line = |extra: &str| {
            parse(&format!(
                r#"{{"custom_id":"a","body":{{"model":"o4-mini","messages":[{{"role":"user","content":"hi"}}]{extra}}}}}"#
            ))
            .unwrap()
        };
        for (extra, bound) in [
            ("", 4096),
            (r#","max_tokens":300"#, 300),
            (r#","max_completion_tokens":500"#, 500),
            (r#","max_tokens":300,"max_completion_tokens":500"#, 500),
            (r#","max_tokens":null"#, 4096),
        ] {
            let up = line(extra).upstream_request(4096, true);
            assert!(up.body.get("max_tokens").is_none(), "{extra}: {:?}", up.body);
            assert_eq!(up.body["max_completion_tokens"], bound, "{extra}");
            assert_eq!(up.max_completion_tokens, bound, "{extra}");
        }
        // Other models keep what the producer wrote.
        let up = line(r#","max_completion_tokens":500"#).upstream_request(4096, false);
        assert!(up.body.get("max_tokens").is_none());
        assert_eq!(up.max_completion_tokens, 500);
        let up = line(r#","max_tokens":300,"max_completion_tokens":500"#).upstream_request(4096, false);
        assert_eq!(
            (up.body["max_tokens"].as_u64(), up.max_completion_tokens),
            (Some(300), 500)
        );
    }

    #[test]
    fn refuses_with_reasons_and_identity() {
        let e = parse("nope").unwrap_err();
        assert!(e.reason.contains("not valid JSON") && e.id.is_none());
        let e = parse(r#"{"custom_id":"x","batch_id":"b","body":{"model":"m"}}"#).unwrap_err();
        assert!(e.reason.contains("messages"));
        assert_eq!(e.id.unwrap().batch_id, "b");
        let e = parse(r#"{"custom_id":"x","url":"/v1/embeddings","body":{}}"#).unwrap_err();
        assert!(e.reason.contains("url"));
        let e = parse(&format!(r#"{{"custom_id":"{}"}}"#, "x".repeat(300))).unwrap_err();
        assert!(e.reason.contains("at most 256"));
        let e = Job::parse(&[b'{'; 100], 10).unwrap_err();
        assert!(e.reason.contains("larger than the maximum"));
    }

    proptest::proptest! {
        #[test]
        fn never_panics_on_bytes(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = Job::parse(&bytes, 1 << 20);
        }

        #[test]
        fn never_panics_on_json_shapes(s in r#"\{("(custom_id|batch_id|body|model|messages|role|url|method|metadata|max_tokens)"|[:,\[\]{} ]|"[a-z]{0,3}"|-?[0-9]{1,3}|null|true){0,40}\}"#) {
            let _ = Job::parse(s.as_bytes(), 1 << 20);
        }
    }
}
