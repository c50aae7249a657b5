//! What a call used, read from an answer in whichever shape its vendor reports it: the one place
//! sheepdog reads `usage` (contract §3).
//!
//! HolySheep answers in OpenAI's chat-completion shape, but the `usage` object carries each
//! vendor's own fields:
//!
//! | shape | prompt | cache reads | cache writes | output |
//! |---|---|---|---|---|
//! | OpenAI | `prompt_tokens` (cache reads included) | `prompt_tokens_details.cached_tokens` | | `completion_tokens` (reasoning included: `completion_tokens_details.reasoning_tokens`) |
//! | DeepSeek | `prompt_tokens` = hit + miss | `prompt_cache_hit_tokens` | | as OpenAI |
//! | Anthropic through an OpenAI-shaped gateway | `prompt_tokens` (reads and writes included) | `cache_read_input_tokens` | `cache_creation_input_tokens` | as OpenAI |
//! | Gemini through an OpenAI-shaped gateway | as OpenAI | as OpenAI | | `completion_tokens` may leave the thoughts out: `total_tokens` = prompt + completion + `reasoning_tokens` |
//! | Anthropic's own (`input_tokens`) | `input_tokens` + reads + writes (`input_tokens` counts neither) | `cache_read_input_tokens` | `cache_creation_input_tokens` | `output_tokens` |
//! | Gemini's own (`usageMetadata`) | `promptTokenCount` | `cachedContentTokenCount` | | `candidatesTokenCount` + `thoughtsTokenCount` |
//!
//! Every shape becomes one [`Usage`] whose parts never overlap: `prompt_tokens` is the whole
//! prompt (uncached + cache reads + cache writes) and `completion_tokens` the whole output
//! (reasoning included), so a token is priced exactly once.

use serde_json::Value;

/// Token counts of one call, normalised: reads and writes are parts of `prompt_tokens`,
/// reasoning is part of `completion_tokens`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// The whole prompt: uncached tokens, cache reads and cache writes.
    pub prompt_tokens: u64,
    /// The whole output, reasoning tokens included.
    pub completion_tokens: u64,
    /// Prompt tokens read from the vendor's cache (part of `prompt_tokens`).
    pub cached_tokens: u64,
    /// Prompt tokens written to the vendor's cache (part of `prompt_tokens`).
    pub cache_write_tokens: u64,
    /// Output tokens spent on reasoning (part of `completion_tokens`).
    pub reasoning_tokens: u64,
}

/// The count under a JSON pointer of plain keys (`/a/b`). Walked key by key: `Value::pointer`
/// allocates each key again to undo `~` escapes, which none of these keys has (1.2% of a
/// worker's CPU in `bench`, for the nine pointers an answer is read with).
fn count(v: &Value, pointer: &str) -> Option<u64> {
    pointer.split('/').skip(1).try_fold(v, |v, key| v.get(key))?.as_u64()
}

/// The largest of the counts present under these pointers (vendors that report one figure
/// under two names report it twice, not split).
fn largest(v: &Value, pointers: &[&str]) -> u64 {
    pointers.iter().filter_map(|p| count(v, p)).max().unwrap_or(0)
}

impl Usage {
    /// Reads the usage of a response body, in any of the shapes in the module's table. `None`
    /// when the body reports none (a 2xx without usage is then charged at its reservation).
    pub fn from_response(body: &Value) -> Option<Usage> {
        if let Some(u) = body.get("usage").filter(|u| u.is_object()) {
            if count(u, "/prompt_tokens").is_some() {
                return Some(Self::openai_shaped(u));
            }
            if count(u, "/input_tokens").is_some() {
                return Some(Self::input_output_shaped(u));
            }
        }
        body.get("usageMetadata")
            .filter(|u| u.is_object())
            .and_then(Self::gemini_native)
    }

    /// `prompt_tokens`/`completion_tokens`, with any vendor's cache and reasoning fields.
    fn openai_shaped(u: &Value) -> Usage {
        let mut prompt = count(u, "/prompt_tokens").unwrap_or(0);
        let mut completion = count(u, "/completion_tokens").unwrap_or(0);
        let cached = largest(
            u,
            &[
                "/prompt_tokens_details/cached_tokens",
                "/prompt_cache_hit_tokens",
                "/cache_read_input_tokens",
            ],
        );
        let written = largest(
            u,
            &[
                "/cache_creation_input_tokens",
                "/prompt_tokens_details/cache_write_tokens",
                "/prompt_tokens_details/cache_creation_tokens",
            ],
        );
        let reasoning = largest(u, &["/completion_tokens_details/reasoning_tokens"]);
        // In this shape the cache's reads and writes are parts of the prompt. A gateway whose
        // `prompt_tokens` counts only the uncached part (Anthropic's own meaning) gives itself
        // away when the parts add up to more than the whole.
        if cached + written > prompt {
            prompt += cached + written;
        }
        // Reasoning is part of the output, except where a gateway reports thoughts beside it
        // (Gemini's): then `total_tokens` counts them and the output does not.
        if reasoning > 0 && count(u, "/total_tokens") == Some(prompt + completion + reasoning) {
            completion += reasoning;
        }
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            cached_tokens: cached,
            cache_write_tokens: written,
            reasoning_tokens: reasoning.min(completion),
        }
    }

    /// `input_tokens`/`output_tokens`: Anthropic's own shape (input excludes the cache's
    /// reads and writes) or OpenAI's Responses shape (input includes its cached part).
    fn input_output_shaped(u: &Value) -> Usage {
        let input = count(u, "/input_tokens").unwrap_or(0);
        let output = count(u, "/output_tokens").unwrap_or(0);
        let reasoning = largest(u, &["/output_tokens_details/reasoning_tokens"]).min(output);
        if u.get("input_tokens_details").is_some() {
            let cached = largest(u, &["/input_tokens_details/cached_tokens"]).min(input);
            return Usage {
                prompt_tokens: input,
                completion_tokens: output,
                cached_tokens: cached,
                cache_write_tokens: 0,
                reasoning_tokens: reasoning,
            };
        }
        let cached = largest(u, &["/cache_read_input_tokens"]);
        let written = largest(u, &["/cache_creation_input_tokens"]);
        Usage {
            prompt_tokens: input + cached + written,
            completion_tokens: output,
            cached_tokens: cached,
            cache_write_tokens: written,
            reasoning_tokens: reasoning,
        }
    }

    /// Gemini's own `usageMetadata`: thoughts are output, counted beside the candidates.
    fn gemini_native(u: &Value) -> Option<Usage> {
        let prompt = count(u, "/promptTokenCount")?;
        let thoughts = count(u, "/thoughtsTokenCount").unwrap_or(0);
        let candidates = count(u, "/candidatesTokenCount").unwrap_or(0);
        Some(Usage {
            prompt_tokens: prompt,
            completion_tokens: candidates + thoughts,
            cached_tokens: count(u, "/cachedContentTokenCount").unwrap_or(0).min(prompt),
            cache_write_tokens: 0,
            reasoning_tokens: thoughts,
        })
    }

    /// Prompt tokens neither read from nor written to the cache.
    pub fn uncached_tokens(&self) -> u64 {
        self.prompt_tokens
            .saturating_sub(self.cached_tokens)
            .saturating_sub(self.cache_write_tokens)
    }

    pub fn total(&self) -> u64 {
        self.prompt_tokens + self.completion_tokens
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn read(usage: Value) -> Usage {
        Usage::from_response(&json!({ "usage": usage })).expect("usage")
    }

    #[test]
    fn openai_cache_reads_and_reasoning_are_parts_never_counted_twice() {
        let u = read(
            json!({"prompt_tokens": 1000, "completion_tokens": 300, "total_tokens": 1300,
            "prompt_tokens_details": {"cached_tokens": 400},
            "completion_tokens_details": {"reasoning_tokens": 256}}),
        );
        assert_eq!(
            u,
            Usage {
                prompt_tokens: 1000,
                completion_tokens: 300,
                cached_tokens: 400,
                cache_write_tokens: 0,
                reasoning_tokens: 256
            }
        );
        assert_eq!(u.uncached_tokens(), 600);
    }

    #[test]
    fn deepseek_reports_hits_in_its_own_fields() {
        let u = read(
            json!({"prompt_tokens": 90, "completion_tokens": 12, "total_tokens": 102,
            "prompt_cache_hit_tokens": 64, "prompt_cache_miss_tokens": 26}),
        );
        assert_eq!((u.prompt_tokens, u.cached_tokens, u.uncached_tokens()), (90, 64, 26));
        // Newer answers carry OpenAI's field as well: the same 64, not 128.
        let u = read(json!({"prompt_tokens": 90, "completion_tokens": 12,
            "prompt_tokens_details": {"cached_tokens": 64}, "prompt_cache_hit_tokens": 64}));
        assert_eq!(u.cached_tokens, 64);
    }

    #[test]
    fn anthropic_cache_writes_through_a_gateway() {
        let u = read(json!({"prompt_tokens": 1500, "completion_tokens": 20,
            "cache_creation_input_tokens": 1000, "cache_read_input_tokens": 300,
            "prompt_tokens_details": {"cached_tokens": 300}}));
        assert_eq!(
            (
                u.prompt_tokens,
                u.cached_tokens,
                u.cache_write_tokens,
                u.uncached_tokens()
            ),
            (1500, 300, 1000, 200)
        );
        // A gateway that passes Anthropic's meaning through (`prompt_tokens` = uncached only).
        let u = read(json!({"prompt_tokens": 10, "completion_tokens": 20,
            "cache_creation_input_tokens": 1000, "cache_read_input_tokens": 300}));
        assert_eq!((u.prompt_tokens, u.uncached_tokens()), (1310, 10));
    }

    #[test]
    fn gemini_thoughts_beside_the_output_are_added_once() {
        let u = read(json!({"prompt_tokens": 21, "completion_tokens": 0, "total_tokens": 81,
            "completion_tokens_details": {"reasoning_tokens": 60}}));
        assert_eq!((u.completion_tokens, u.reasoning_tokens), (60, 60));
        // Already inside: the total says so, nothing is added.
        let u = read(json!({"prompt_tokens": 21, "completion_tokens": 60, "total_tokens": 81,
            "completion_tokens_details": {"reasoning_tokens": 60}}));
        assert_eq!(u.completion_tokens, 60);
    }

    #[test]
    fn vendors_own_shapes() {
        let u = read(json!({"input_tokens": 10, "output_tokens": 50,
            "cache_creation_input_tokens": 200, "cache_read_input_tokens": 700}));
        assert_eq!(
            (u.prompt_tokens, u.uncached_tokens(), u.completion_tokens),
            (910, 10, 50)
        );
        let u = read(json!({"input_tokens": 100, "output_tokens": 50,
            "input_tokens_details": {"cached_tokens": 40}, "output_tokens_details": {"reasoning_tokens": 30}}));
        assert_eq!((u.prompt_tokens, u.cached_tokens, u.reasoning_tokens), (100, 40, 30));
        let u = Usage::from_response(&json!({"usageMetadata": {"promptTokenCount": 20,
            "candidatesTokenCount": 198, "thoughtsTokenCount": 405, "totalTokenCount": 623}}))
        .unwrap();
        assert_eq!(
            (u.prompt_tokens, u.completion_tokens, u.reasoning_tokens),
            (20, 603, 405)
        );
    }

    #[test]
    fn no_usage_is_none() {
        assert_eq!(Usage::from_response(&json!({"choices": []})), None);
        assert_eq!(Usage::from_response(&json!({"usage": null})), None);
        assert_eq!(Usage::from_response(&json!({"usage": {"total_tokens": 5}})), None);
    }
}
