//! Prices per token (contract §3) and the exact cost of a call.
//!
//! Prices are read in LiteLLM's field names so its `model_prices_and_context_window.json`
//! works as a price file. Every figure becomes a `Decimal` straight from the JSON
//! text, never through arithmetic on floats.

use std::collections::HashMap;
use std::path::Path;

use anyhow::Context;
use rust_decimal::Decimal;
use serde_json::Value;

/// The built-in table, `prices.json` at the repository root.
pub const BUILT_IN: &str = include_str!("../prices.json");

/// Per-token prices of one model, in USD.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Price {
    pub input: Decimal,
    pub output: Decimal,
    /// Price of a cached prompt token, where the model has one.
    pub cache_read: Option<Decimal>,
}

/// Token counts as the upstream reports them in `usage`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// `usage.prompt_tokens_details.cached_tokens`, part of `prompt_tokens`.
    pub cached_tokens: u64,
}

impl Usage {
    /// Reads `usage` from an OpenAI-style response body.
    pub fn from_response(body: &Value) -> Option<Usage> {
        let u = body.get("usage")?;
        let prompt_tokens = u.get("prompt_tokens")?.as_u64()?;
        let completion_tokens = u.get("completion_tokens").and_then(Value::as_u64).unwrap_or(0);
        let cached_tokens = u
            .pointer("/prompt_tokens_details/cached_tokens")
            .and_then(Value::as_u64)
            .unwrap_or(0)
            .min(prompt_tokens);
        Some(Usage {
            prompt_tokens,
            completion_tokens,
            cached_tokens,
        })
    }

    pub fn total(&self) -> u64 {
        self.prompt_tokens + self.completion_tokens
    }
}

impl Price {
    /// Exact cost of a call: uncached prompt tokens at the input price, cached
    /// ones at the cache price where one is given, completion at the output price.
    pub fn cost(&self, usage: &Usage) -> Decimal {
        let cached = usage.cached_tokens.min(usage.prompt_tokens);
        let (uncached, cached_price) = match self.cache_read {
            Some(p) => (usage.prompt_tokens - cached, p * Decimal::from(cached)),
            None => (usage.prompt_tokens, Decimal::ZERO),
        };
        (self.input * Decimal::from(uncached) + cached_price + self.output * Decimal::from(usage.completion_tokens))
            .normalize()
    }

    /// The most a call can cost: every prompt token uncached, every allowed
    /// completion token used.
    pub fn worst_case(&self, prompt_tokens: u64, max_completion_tokens: u64) -> Decimal {
        (self.input * Decimal::from(prompt_tokens) + self.output * Decimal::from(max_completion_tokens)).normalize()
    }
}

/// A price table keyed by model name.
#[derive(Clone, Debug, Default)]
pub struct PriceTable {
    models: HashMap<String, Price>,
}

impl PriceTable {
    pub fn built_in() -> PriceTable {
        Self::parse(BUILT_IN).expect("the built-in price table is valid")
    }

    /// The table at `path`, or the built-in one.
    pub fn load(path: Option<&Path>) -> anyhow::Result<PriceTable> {
        match path {
            None => Ok(Self::built_in()),
            Some(p) => {
                let text = std::fs::read_to_string(p).with_context(|| format!("reading price file {}", p.display()))?;
                Self::parse(&text).with_context(|| format!("price file {}", p.display()))
            }
        }
    }

    /// Parses a LiteLLM-style table. Entries without both token prices (images,
    /// embeddings, the file's `sample_spec`) are skipped.
    pub fn parse(text: &str) -> anyhow::Result<PriceTable> {
        let value: Value = serde_json::from_str(text).context("price file is not valid JSON")?;
        let Value::Object(obj) = value else {
            anyhow::bail!("price file must be a JSON object keyed by model name");
        };
        let mut models = HashMap::new();
        for (name, entry) in obj {
            let field = |k: &str| -> anyhow::Result<Option<Decimal>> {
                match entry.get(k) {
                    None | Some(Value::Null) => Ok(None),
                    Some(v) => decimal(v).map(Some).with_context(|| format!("{name}.{k}")),
                }
            };
            let (Some(input), Some(output)) = (field("input_cost_per_token")?, field("output_cost_per_token")?) else {
                continue;
            };
            let cache_read = field("cache_read_input_token_cost")?;
            models.insert(
                name,
                Price {
                    input,
                    output,
                    cache_read,
                },
            );
        }
        anyhow::ensure!(
            !models.is_empty(),
            "price file names no model with input and output prices"
        );
        Ok(PriceTable { models })
    }

    /// Model names of the built-in table, sorted.
    pub fn built_in_names() -> Vec<String> {
        let mut names: Vec<String> = Self::built_in().models.into_keys().collect();
        names.sort();
        names
    }

    pub fn get(&self, model: &str) -> Option<&Price> {
        self.models.get(model)
    }

    pub fn len(&self) -> usize {
        self.models.len()
    }

    pub fn is_empty(&self) -> bool {
        self.models.is_empty()
    }
}

fn decimal(v: &Value) -> anyhow::Result<Decimal> {
    crate::money::non_negative(v, "price")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    #[test]
    fn exact_cost_with_cache() {
        let t = PriceTable::built_in();
        let p = t.get("deepseek-v3.2").unwrap();
        assert_eq!(p.input, Decimal::from_str("0.00000028").unwrap());
        let c = p.cost(&Usage {
            prompt_tokens: 1000,
            completion_tokens: 333,
            cached_tokens: 400,
        });
        // 600 × 0.28e-6 + 400 × 0.028e-6 + 333 × 0.42e-6
        assert_eq!(c, Decimal::from_str("0.00031906").unwrap());
        for m in [
            "gpt-4.1",
            "gpt-4o",
            "claude-sonnet-4.5",
            "gemini-2.5-flash",
            "deepseek-v3.2",
        ] {
            assert!(t.get(m).is_some(), "{m} has a price");
        }
    }

    #[test]
    fn litellm_shapes() {
        let t = PriceTable::parse(
            r#"{"sample_spec": {"input_cost_per_token": "x-not-used"},
                "m": {"input_cost_per_token": 0.0000015, "output_cost_per_token": "2E-6"}}"#,
        );
        assert!(t.is_err(), "a bad figure is an error, not a silent zero");
        let t = PriceTable::parse(r#"{"img": {"output_cost_per_image": 0.04}, "m": {"input_cost_per_token": 0.0000015, "output_cost_per_token": "2E-6"}}"#).unwrap();
        let p = t.get("m").unwrap();
        assert_eq!(
            p.cost(&Usage {
                prompt_tokens: 2,
                completion_tokens: 1,
                cached_tokens: 1
            }),
            Decimal::from_str("0.000005").unwrap()
        );
    }
}
