//! The `x-ratelimit-*` headers OpenAI-compatible APIs send with each answer:
//! `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`. The resets are durations in Go's
//! notation (`1s`, `6m0s`, `120ms`, `1h2m3.5s`).

use std::time::Duration;

use reqwest::header::HeaderMap;

/// What the upstream said about its own limits in one answer.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RateLimitInfo {
    pub limit_requests: Option<u64>,
    pub remaining_requests: Option<u64>,
    pub reset_requests: Option<Duration>,
    pub limit_tokens: Option<u64>,
    pub remaining_tokens: Option<u64>,
    pub reset_tokens: Option<Duration>,
}

impl RateLimitInfo {
    pub fn from_headers(h: &HeaderMap) -> RateLimitInfo {
        let num = |k: &str| h.get(k)?.to_str().ok()?.trim().parse::<u64>().ok();
        let dur = |k: &str| parse_duration(h.get(k)?.to_str().ok()?);
        RateLimitInfo {
            limit_requests: num("x-ratelimit-limit-requests"),
            remaining_requests: num("x-ratelimit-remaining-requests"),
            reset_requests: dur("x-ratelimit-reset-requests"),
            limit_tokens: num("x-ratelimit-limit-tokens"),
            remaining_tokens: num("x-ratelimit-remaining-tokens"),
            reset_tokens: dur("x-ratelimit-reset-tokens"),
        }
    }

    /// How long until the limit has room again, if the headers say it has none left (for the
    /// requests; for the tokens, none left for a call of `tokens`).
    pub fn exhausted_for(&self, tokens: u64) -> Option<(Duration, &'static str)> {
        let req = (self.remaining_requests == Some(0))
            .then_some(self.reset_requests)
            .flatten()
            .map(|d| (d, "requests"));
        let tok = self
            .remaining_tokens
            .filter(|r| *r < tokens.max(1))
            .and(self.reset_tokens)
            .map(|d| (d, "tokens"));
        match (req, tok) {
            (Some(a), Some(b)) => Some(if a.0 >= b.0 { a } else { b }),
            (a, b) => a.or(b),
        }
    }

    /// The latest reset the headers give, for a 429 that said nothing else.
    pub fn reset(&self) -> Option<Duration> {
        match (self.reset_requests, self.reset_tokens) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }
}

/// Parses `1h2m3.5s`, `250ms`, `6m0s`, `20s`, or a plain number of seconds; capped at an hour.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(3600.0)));
    }
    let mut total = 0f64;
    let mut num = String::new();
    let mut chars = s.chars().peekable();
    let mut any = false;
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() || c == '.' {
            num.push(c);
            continue;
        }
        let unit = match (c, chars.peek()) {
            ('m', Some('s')) => {
                chars.next();
                0.001
            }
            ('u' | 'µ', Some('s')) => {
                chars.next();
                0.000_001
            }
            ('n', Some('s')) => {
                chars.next();
                0.000_000_001
            }
            ('h', _) => 3600.0,
            ('m', _) => 60.0,
            ('s', _) => 1.0,
            _ => return None,
        };
        let v: f64 = num.parse().ok()?;
        total += v * unit;
        num.clear();
        any = true;
    }
    if !num.is_empty() || !any {
        return None;
    }
    Some(Duration::from_secs_f64(total.min(3600.0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        assert_eq!(parse_duration("1s"), Some(Duration::from_secs(1)));
        assert_eq!(parse_duration("6m0s"), Some(Duration::from_secs(360)));
        assert_eq!(parse_duration("120ms"), Some(Duration::from_millis(120)));
        assert_eq!(parse_duration("2m3.5s"), Some(Duration::from_secs_f64(123.5)));
        assert_eq!(
            parse_duration("1h2m3.5s"),
            Some(Duration::from_secs(3600)),
            "capped at an hour"
        );
        assert_eq!(parse_duration("59.5"), Some(Duration::from_secs_f64(59.5)));
        assert_eq!(parse_duration("soon"), None);
        assert_eq!(parse_duration("5x"), None);
    }

    #[test]
    fn exhausted_when_nothing_is_left() {
        let mut h = HeaderMap::new();
        h.insert("x-ratelimit-remaining-requests", "0".parse().unwrap());
        h.insert("x-ratelimit-reset-requests", "59s".parse().unwrap());
        h.insert("x-ratelimit-remaining-tokens", "1000".parse().unwrap());
        h.insert("x-ratelimit-reset-tokens", "2s".parse().unwrap());
        let r = RateLimitInfo::from_headers(&h);
        assert_eq!(r.exhausted_for(100), Some((Duration::from_secs(59), "requests")));
        h.insert("x-ratelimit-remaining-requests", "3".parse().unwrap());
        let r = RateLimitInfo::from_headers(&h);
        assert_eq!(r.exhausted_for(100), None);
        assert_eq!(r.exhausted_for(5000), Some((Duration::from_secs(2), "tokens")));
    }
}
