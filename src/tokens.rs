//! Prompt token estimate, used to reserve a job's worst case against the
//! global token bucket and the budget before it is sent.
//!
//! It counts with a real BPE (`o200k_base`, whose vocabulary ships inside the
//! `tiktoken-rs` crate) using OpenAI's chat framing: 3 tokens per message,
//! 1 for a `name`, 3 to prime the reply. The mock upstream reports
//! `prompt_tokens` with this same count.

use serde_json::{Map, Value};

/// Tokens counted for an image part: OpenAI's high-detail 2×2-tile figure, an
/// upper bound for most images.
const IMAGE_TOKENS: u64 = 765;

fn bpe_len(text: &str) -> u64 {
    tiktoken_rs::o200k_base_singleton().encode_ordinary(text).len() as u64
}

/// Loads the vocabulary now rather than on the first job.
pub fn warm_up() {
    let _ = bpe_len("warm up");
}

fn content_tokens(content: &Value) -> u64 {
    match content {
        Value::String(s) => bpe_len(s),
        Value::Array(parts) => parts
            .iter()
            .map(|p| match p.get("type").and_then(Value::as_str) {
                Some("text") => p.get("text").and_then(Value::as_str).map(bpe_len).unwrap_or(0),
                Some("image_url") | Some("input_image") => IMAGE_TOKENS,
                _ => bpe_len(&p.to_string()),
            })
            .sum(),
        Value::Null => 0,
        other => bpe_len(&other.to_string()),
    }
}

/// Estimated `prompt_tokens` of a chat-completions request body.
pub fn prompt_tokens(body: &Map<String, Value>) -> u64 {
    let mut n = 3; // every reply is primed with <|start|>assistant<|message|>
    if let Some(Value::Array(messages)) = body.get("messages") {
        for m in messages {
            n += 3;
            if let Value::Object(m) = m {
                for (k, v) in m {
                    n += match k.as_str() {
                        "content" => content_tokens(v),
                        "name" => 1 + v.as_str().map(bpe_len).unwrap_or(0),
                        "role" => v.as_str().map(bpe_len).unwrap_or(0),
                        _ => bpe_len(&v.to_string()),
                    };
                }
            }
        }
    }
    for key in ["tools", "functions", "response_format"] {
        if let Some(v) = body.get(key) {
            n += bpe_len(&v.to_string());
        }
    }
    n
}

/// The prompt tokens to reserve for a job: the estimate plus a margin, wider
/// for models whose own tokenizer is not OpenAI's (Claude, Gemini, DeepSeek
/// count the same text differently), so a reservation stays a worst case.
pub fn prompt_reservation(model: &str, estimate: u64) -> u64 {
    let openai = ["gpt-", "o1", "o3", "o4", "chatgpt-"]
        .iter()
        .any(|p| model.starts_with(p));
    if openai {
        estimate + estimate / 10 + 4
    } else {
        estimate + estimate * 2 / 5 + 8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_like_openai_chat_framing() {
        let body = serde_json::json!({"model": "gpt-4o", "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Hello there"}]});
        // "You are a helpful assistant." = 6 tokens, "Hello there" = 2, roles 1 each.
        assert_eq!(prompt_tokens(body.as_object().unwrap()), 3 + (3 + 1 + 6) + (3 + 1 + 2));
    }
}
