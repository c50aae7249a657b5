//! Exact amounts from JSON. A JSON number is read from the text that was written, never through
//! `f64` arithmetic: `serde_json` keeps a number's shortest round-tripping text, which is the
//! literal in the file, so `2.8e-07` becomes exactly 0.00000028 and `0.0092` exactly 0.0092.

use std::str::FromStr;

use rust_decimal::Decimal;
use serde_json::Value;

/// A JSON number (or numeric string) as an exact, non-negative decimal. `what` names it in errors.
pub fn non_negative(v: &Value, what: &str) -> anyhow::Result<Decimal> {
    let text = match v {
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.trim().to_string(),
        _ => anyhow::bail!("{what} must be a number"),
    };
    let d = if text.contains(['e', 'E']) {
        Decimal::from_scientific(&text)
    } else {
        Decimal::from_str(&text)
    }
    .map_err(|e| anyhow::anyhow!("{what} {text:?} is not a decimal number: {e}"))?;
    anyhow::ensure!(d >= Decimal::ZERO, "{what} {text} is negative");
    Ok(d.normalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_from_the_written_text() {
        let v: Value = serde_json::from_str(r#"[0.0092, 2.8e-07, "1.5", 3000]"#).unwrap();
        let got: Vec<Decimal> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|x| non_negative(x, "x").unwrap())
            .collect();
        let want: Vec<Decimal> = ["0.0092", "0.00000028", "1.5", "3000"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(got, want);
        assert!(non_negative(&serde_json::json!(-1), "rpm")
            .unwrap_err()
            .to_string()
            .contains("negative"));
        assert!(non_negative(&serde_json::json!(true), "rpm").is_err());
    }
}
