//! Prompt token estimate, used to reserve a job's worst case against the
//! global token bucket and the budget before it is sent.
//!
//! It counts with a real BPE (`o200k_base`, whose vocabulary ships inside the
//! `tiktoken-rs` crate) using OpenAI's chat framing: 3 tokens per message,
//! 1 for a `name`, 3 to prime the reply. The mock upstream reports
//! `prompt_tokens` with this same count.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::OnceLock;

use rustc_hash::FxHashMap;
use serde_json::{Map, Value};

/// Tokens counted for an image part: OpenAI's high-detail 2×2-tile figure, an
/// upper bound for most images.
const IMAGE_TOKENS: u64 = 765;

/// The ordinary (not special) tokens of `o200k_base`: ranks 0 to 199,997.
const ORDINARY_RANKS: u32 = 199_998;

/// `o200k_base` packed for counting: each token's bytes once, in one buffer, and their ranks by
/// those bytes. `tiktoken-rs` keeps the vocabulary three times over (by bytes, by rank and
/// sorted) in 38 MB; counting needs only the ranks by bytes, about 8 MB.
struct Bpe {
    ranks: FxHashMap<&'static [u8], u32>,
    split: fancy_regex::Regex,
}

fn bpe() -> &'static Bpe {
    static BPE: OnceLock<Bpe> = OnceLock::new();
    BPE.get_or_init(|| {
        // Read once from the vocabulary `tiktoken-rs` ships, then dropped.
        let full = tiktoken_rs::o200k_base().expect("the o200k_base vocabulary ships inside tiktoken-rs");
        let mut bytes = Vec::with_capacity(1 << 21);
        let mut spans = Vec::with_capacity(ORDINARY_RANKS as usize);
        for rank in 0..ORDINARY_RANKS {
            if let Ok(b) = full.decode_bytes(&[rank]) {
                spans.push((bytes.len(), b.len(), rank));
                bytes.extend_from_slice(&b);
            }
        }
        drop(full);
        // Lives as long as the process: one allocation, made once.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        let ranks = spans
            .into_iter()
            .map(|(at, len, rank)| (&bytes[at..at + len], rank))
            .collect();
        let split = fancy_regex::Regex::new(tiktoken_rs::O200K_BASE_PAT_STR).expect("o200k_base's pattern compiles");
        // The full vocabulary took about 50 MB for a moment: give those pages back to the system
        // now (the allocator would otherwise keep them for a process that never needs them).
        // SAFETY: `mi_collect` only frees memory the allocator holds unused; it takes no pointer.
        unsafe { libmimalloc_sys::mi_collect(true) };
        Bpe { ranks, split }
    })
}

/// Tokens of `text` as `o200k_base` encodes it (without special tokens): split by its pattern,
/// each piece one token or the count its byte-pair merges leave.
fn bpe_len(text: &str) -> u64 {
    let b = bpe();
    let mut n = 0u64;
    let mut at = 0;
    for m in b.split.find_iter(text) {
        let Ok(m) = m else {
            // The pattern gave up (its backtracking limit): the rest counts a token a byte, an
            // upper bound.
            return n + (text.len() - at) as u64;
        };
        at = m.end();
        let piece = m.as_str().as_bytes();
        n += if b.ranks.contains_key(piece) {
            1
        } else {
            merged_len(&b.ranks, piece)
        };
    }
    n
}

/// The tokens a piece ends as under byte-pair encoding: start from its bytes and merge, again
/// and again, the adjacent pair whose bytes have the lowest rank (the leftmost of equals), until
/// no adjacent pair is a token. Candidate merges wait in a heap; one whose tokens have changed
/// since it was pushed is skipped when it comes up.
fn merged_len(ranks: &FxHashMap<&'static [u8], u32>, piece: &[u8]) -> u64 {
    let n = piece.len();
    if n < 2 {
        return n as u64;
    }
    // `end[s]`: where the token starting at byte `s` ends; `prev[s]`: where the one before it starts.
    let mut end: Vec<usize> = (1..=n).collect();
    let mut prev: Vec<usize> = (0..n).map(|s| s.wrapping_sub(1)).collect();
    let mut live = vec![true; n];
    let mut heap: BinaryHeap<Reverse<(u32, usize, usize)>> = BinaryHeap::with_capacity(n);
    for s in 0..n - 1 {
        if let Some(&r) = ranks.get(&piece[s..s + 2]) {
            heap.push(Reverse((r, s, s + 2)));
        }
    }
    let mut tokens = n as u64;
    while let Some(Reverse((_, start, stop))) = heap.pop() {
        let mid = end[start];
        if !live[start] || mid >= n || end[mid] != stop {
            continue;
        }
        live[mid] = false;
        end[start] = stop;
        if stop < n {
            prev[stop] = start;
        }
        tokens -= 1;
        if start > 0 {
            let p = prev[start];
            if let Some(&r) = ranks.get(&piece[p..stop]) {
                heap.push(Reverse((r, p, stop)));
            }
        }
        if stop < n {
            let next = end[stop];
            if let Some(&r) = ranks.get(&piece[start..next]) {
                heap.push(Reverse((r, start, next)));
            }
        }
    }
    tokens
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

    /// The packed counter counts as `tiktoken-rs`'s own encoder does, to the token.
    #[test]
    fn counts_exactly_as_tiktoken_does() {
        let reference = tiktoken_rs::o200k_base_singleton();
        let mut texts: Vec<String> = vec![
            String::new(),
            "Hello there".into(),
            "You are a helpful assistant.".into(),
            "  leading and trailing spaces   ".into(),
            "line one\nline two\r\n\n\tindented\n".into(),
            "I'm sure they'll say we've done what you'd've DONE'S".into(),
            "1234567890 3.14159 -42 1e10 0x1F 12,345,678".into(),
            "fn main() { println!(\"{:?}\", vec![1, 2, 3]); } // code".into(),
            "Grüße aus München, naïve café, Ångström".into(),
            "日本語のテキストと中文文本，还有한국어 텍스트".into(),
            "emoji 🐑🐕‍🦺 and symbols ∑∫√ ≠ ≤ → ←".into(),
            "https://api.holysheep.ai/v1/chat/completions?x=1&y=%20".into(),
            "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa".into(),
            "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!????????????".into(),
            "supercalifragilisticexpialidocious antidisestablishmentarianism".into(),
            "<|endoftext|> is text here, not a special token".into(),
        ];
        // Long runs: a piece thousands of bytes long.
        texts.push(" ".repeat(5000) + "x");
        texts.push("ab".repeat(3000));
        texts.push("word ".repeat(2000));
        // Pseudo-random text over a mixed alphabet.
        let alphabet: Vec<char> = "abcdefghijklmnopqrstuvwxyz ABC.,;:!?'\"-_()[]{}\n\t0123456789éü中文🐑"
            .chars()
            .collect();
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for len in [10, 100, 1000, 10_000] {
            for _ in 0..20 {
                let t: String = (0..len)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        alphabet[(x % alphabet.len() as u64) as usize]
                    })
                    .collect();
                texts.push(t);
            }
        }
        for t in &texts {
            assert_eq!(
                bpe_len(t),
                reference.encode_ordinary(t).len() as u64,
                "{:?}",
                t.chars().take(80).collect::<String>()
            );
        }
    }

    #[test]
    fn counts_like_openai_chat_framing() {
        let body = serde_json::json!({"model": "gpt-4o", "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Hello there"}]});
        // "You are a helpful assistant." = 6 tokens, "Hello there" = 2, roles 1 each.
        assert_eq!(prompt_tokens(body.as_object().unwrap()), 3 + (3 + 1 + 6) + (3 + 1 + 2));
    }
}
