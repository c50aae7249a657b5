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

pub use crate::usage::Usage;

/// The built-in table, `prices.json` at the repository root.
pub const BUILT_IN: &str = include_str!("../prices.json");

/// Per-token prices of one model, in USD.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Price {
    pub input: Decimal,
    pub output: Decimal,
    /// Price of a prompt token read from the cache (`cache_read_input_token_cost`), where the
    /// model has one; otherwise such a token costs `input`.
    pub cache_read: Option<Decimal>,
    /// Price of a prompt token written to the cache (`cache_creation_input_token_cost`), where
    /// the model has one; otherwise such a token costs `input`.
    pub cache_write: Option<Decimal>,
    /// LiteLLM's `supports_reasoning`: the model takes `max_completion_tokens`, never
    /// `max_tokens` (OpenAI's o-series answer 400 to the latter).
    pub reasoning: bool,
}

impl Price {
    /// Exact cost of a call: uncached prompt tokens at the input price, cache reads and writes
    /// at their own prices where the model has them, the whole output (reasoning included) at
    /// the output price.
    pub fn cost(&self, usage: &Usage) -> Decimal {
        let read = self.cache_read.unwrap_or(self.input);
        let write = self.cache_write.unwrap_or(self.input);
        let cached = usage.cached_tokens.min(usage.prompt_tokens);
        let written = usage.cache_write_tokens.min(usage.prompt_tokens - cached);
        (self.input * Decimal::from(usage.uncached_tokens())
            + read * Decimal::from(cached)
            + write * Decimal::from(written)
            + self.output * Decimal::from(usage.completion_tokens))
        .normalize()
    }

    /// The most a call can cost: every prompt token at the dearest prompt price (a cache write
    /// costs more than a plain input token), every allowed completion token used.
    pub fn worst_case(&self, prompt_tokens: u64, max_completion_tokens: u64) -> Decimal {
        let prompt = [Some(self.input), self.cache_read, self.cache_write]
            .into_iter()
            .flatten()
            .max()
            .unwrap_or(self.input);
        (prompt * Decimal::from(prompt_tokens) + self.output * Decimal::from(max_completion_tokens)).normalize()
    }
}

/// What the account is charged per USD of list price (the price file's `"sheepdog"` entry):
/// HolySheep bills in CNY at a rate of its own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Currency {
    /// An ISO 4217 code such as `CNY`.
    pub code: String,
    pub per_usd: Decimal,
}

impl Currency {
    /// List prices as they are: USD, one for one.
    pub fn usd() -> Currency {
        Currency {
            code: "USD".into(),
            per_usd: Decimal::ONE,
        }
    }

    /// What the account is charged for `usd` of list price.
    pub fn charged(&self, usd: Decimal) -> Decimal {
        (usd * self.per_usd).normalize()
    }

    pub fn is_usd(&self) -> bool {
        self.code == "USD" && self.per_usd == Decimal::ONE
    }
}

/// A price table keyed by model name.
#[derive(Clone, Debug)]
pub struct PriceTable {
    models: HashMap<String, Price>,
    /// The account's currency: the `"sheepdog"` entry, else USD one for one.
    currency: Currency,
}

/// The entry of a price file that is sheepdog's own settings, not a model.
pub const SETTINGS_ENTRY: &str = "sheepdog";

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
    /// embeddings, the file's `sample_spec`) are skipped; the `"sheepdog"` entry holds the
    /// account's currency.
    pub fn parse(text: &str) -> anyhow::Result<PriceTable> {
        let value: Value = serde_json::from_str(text).context("price file is not valid JSON")?;
        let Value::Object(mut obj) = value else {
            anyhow::bail!("price file must be a JSON object keyed by model name");
        };
        let currency = match obj.remove(SETTINGS_ENTRY) {
            None | Some(Value::Null) => Currency::usd(),
            Some(settings) => currency(&settings).with_context(|| format!("the {SETTINGS_ENTRY:?} entry"))?,
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
            let reasoning = match entry.get("supports_reasoning") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(other) => anyhow::bail!("{name}.supports_reasoning must be true or false, not {other}"),
            };
            models.insert(
                name.clone(),
                Price {
                    input,
                    output,
                    cache_read: field("cache_read_input_token_cost")?,
                    cache_write: field("cache_creation_input_token_cost")?,
                    reasoning,
                },
            );
        }
        anyhow::ensure!(
            !models.is_empty(),
            "price file names no model with input and output prices"
        );
        Ok(PriceTable { models, currency })
    }

    /// What the account is charged per USD of list price.
    pub fn currency(&self) -> &Currency {
        &self.currency
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

/// `{"currency": "CNY", "per_usd": "1"}`: a three-letter code and a positive exact rate.
fn currency(settings: &Value) -> anyhow::Result<Currency> {
    let code = match settings.get("currency") {
        Some(Value::String(c)) if c.len() == 3 && c.bytes().all(|b| b.is_ascii_alphabetic()) => c.to_ascii_uppercase(),
        Some(other) => anyhow::bail!("currency must be a three-letter code such as \"CNY\", not {other}"),
        None => anyhow::bail!("currency is required (a three-letter code such as \"CNY\")"),
    };
    let per_usd = match settings.get("per_usd") {
        Some(v) => crate::money::non_negative(v, "per_usd")?,
        None if code == "USD" => Decimal::ONE,
        None => anyhow::bail!("per_usd is required: what the account is charged in {code} per USD of list price"),
    };
    anyhow::ensure!(per_usd > Decimal::ZERO, "per_usd must be more than zero");
    Ok(Currency { code, per_usd })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    fn usage(prompt: u64, completion: u64, cached: u64, written: u64) -> Usage {
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            cached_tokens: cached,
            cache_write_tokens: written,
            reasoning_tokens: 0,
        }
    }

    #[test]
    fn exact_cost_with_cache() {
        let t = PriceTable::built_in();
        let p = t.get("deepseek-v3.2").unwrap();
        assert_eq!(p.input, d("0.00000028"));
        // 600 × 0.28e-6 + 400 × 0.028e-6 + 333 × 0.42e-6
        assert_eq!(p.cost(&usage(1000, 333, 400, 0)), d("0.00031906"));
        for m in [
            "gpt-4.1",
            "gpt-4o",
            "claude-sonnet-4.5",
            "gemini-2.5-flash",
            "deepseek-v3.2",
            "o3",
            "o4-mini",
            "deepseek-reasoner",
        ] {
            assert!(t.get(m).is_some(), "{m} has a price");
        }
        assert!(t.currency().is_usd());
    }

    #[test]
    fn reasoning_models_are_marked() {
        let t = PriceTable::built_in();
        for m in ["o3", "o4-mini", "deepseek-reasoner"] {
            assert!(t.get(m).unwrap().reasoning, "{m} takes max_completion_tokens");
        }
        for m in ["gpt-4.1", "gpt-4o-mini", "deepseek-v3.2"] {
            assert!(!t.get(m).unwrap().reasoning, "{m} takes max_tokens");
        }
    }

    #[test]
    fn cache_writes_have_their_own_price_and_bound_the_worst_case() {
        let t = PriceTable::built_in();
        let p = t.get("claude-sonnet-4.5").unwrap();
        // 200 uncached × 3e-6 + 300 reads × 0.3e-6 + 1000 writes × 3.75e-6 + 20 × 15e-6
        assert_eq!(p.cost(&usage(1500, 20, 300, 1000)), d("0.00474"));
        // The worst case prices every prompt token as a write, the dearest.
        assert_eq!(p.worst_case(1500, 20), d("0.005925"));
        assert!(p.worst_case(1500, 20) >= p.cost(&usage(1500, 20, 0, 1500)));
        // Without a write price a write costs an input token.
        let g = t.get("gpt-4.1").unwrap();
        assert_eq!(g.cost(&usage(100, 0, 0, 100)), g.cost(&usage(100, 0, 0, 0)));
    }

    #[test]
    fn litellm_shapes() {
        let t = PriceTable::parse(
            r#"{"sample_spec": {"input_cost_per_token": "x-not-used"},
                "m": {"input_cost_per_token": 0.0000015, "output_cost_per_token": "2E-6"}}"#,
        );
        assert!(t.is_err(), "a bad figure is an error, not a silent zero");
        let t = PriceTable::parse(r#"{"img": {"output_cost_per_image": 0.04}, "m": {"input_cost_per_token": 0.0000015, "output_cost_per_token": "2E-6", "supports_reasoning": true}}"#).unwrap();
        let p = t.get("m").unwrap();
        assert!(p.reasoning);
        assert_eq!(p.cost(&usage(2, 1, 1, 0)), d("0.000005"));
    }

    #[test]
    fn the_account_currency_entry() {
        let t = PriceTable::parse(
            r#"{"sheepdog": {"currency": "cny", "per_usd": "7.1"},
                "m": {"input_cost_per_token": 1e-06, "output_cost_per_token": 2e-06}}"#,
        )
        .unwrap();
        assert_eq!(t.currency().code, "CNY");
        assert_eq!(t.currency().charged(d("0.5")), d("3.55"));
        assert!(t.get("sheepdog").is_none());
        for bad in [
            r#"{"sheepdog": {"currency": "CNY"}}"#,
            r#"{"sheepdog": {"currency": "yuan", "per_usd": 1}}"#,
            r#"{"sheepdog": {"currency": "CNY", "per_usd": 0}}"#,
        ] {
            let text = bad.replace(
                "}}",
                r#"}, "m": {"input_cost_per_token": 1e-06, "output_cost_per_token": 2e-06}}"#,
            );
            assert!(PriceTable::parse(&text).is_err(), "{text}");
        }
    }
}
