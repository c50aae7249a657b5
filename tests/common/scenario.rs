//! Judging a run by what the upstream itself saw: the mock's record of arrivals, tokens and
//! answers, checked against the contract's bounds.

use sheepdog::upstream::mock::CallRecord;

/// The most requests and tokens (by the upstream's own usage count) that arrived in any window
/// of `secs` seconds starting at or after `from_ms`.
pub fn worst_window(calls: &[CallRecord], from_ms: f64, secs: f64) -> (usize, u64) {
    let mut arrivals: Vec<(f64, u64)> = calls
        .iter()
        .filter(|c| c.arrived_ms >= from_ms)
        .map(|c| (c.arrived_ms, c.prompt_tokens + c.completion_tokens))
        .collect();
    arrivals.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (mut best_n, mut best_tokens, mut j, mut tokens) = (0, 0u64, 0, 0u64);
    for i in 0..arrivals.len() {
        while j < arrivals.len() && arrivals[j].0 < arrivals[i].0 + secs * 1000.0 {
            tokens += arrivals[j].1;
            j += 1;
        }
        best_n = best_n.max(j - i);
        best_tokens = best_tokens.max(tokens);
        tokens -= arrivals[i].1;
    }
    (best_n, best_tokens)
}

/// One window's figure against its bound.
#[derive(Debug, Clone, Copy)]
pub struct WindowCheck {
    pub secs: f64,
    pub used: f64,
    pub bound: f64,
}

/// Checks the 1, 5, 10 and 60 s windows from `from_ms` on against `rate × (T + burst) / 60`,
/// for requests (`tokens = false`) or for tokens. Returns the figures; panics on a breach.
pub fn check_windows(
    calls: &[CallRecord],
    from_ms: f64,
    per_minute: f64,
    tokens: bool,
    what: &str,
) -> Vec<WindowCheck> {
    let burst = 1.0;
    let mut out = Vec::new();
    for secs in [1.0, 5.0, 10.0, 60.0] {
        let (n, t) = worst_window(calls, from_ms, secs);
        let used = if tokens { t as f64 } else { n as f64 };
        let bound = per_minute * (secs + burst) / 60.0;
        out.push(WindowCheck { secs, used, bound });
    }
    let line: Vec<String> = out
        .iter()
        .map(|w| format!("{:.0}s {}/{:.0}", w.secs, w.used, w.bound))
        .collect();
    println!("{what}: worst windows (used/bound): {}", line.join(", "));
    for w in &out {
        assert!(
            w.used <= w.bound,
            "{what}: {} in a {} s window; the bound is {}",
            w.used,
            w.secs,
            w.bound
        );
    }
    out
}

/// Time of the first arrival, in ms since the epoch.
pub fn first_arrival(calls: &[CallRecord]) -> f64 {
    calls.iter().map(|c| c.arrived_ms).fold(f64::INFINITY, f64::min)
}

/// Milliseconds since the Unix epoch, now (the mock's clock).
pub fn now_ms() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
        * 1000.0
}

/// How long after its grant (the dispatch's clock) each call reached the upstream (the mock's
/// clock; both are this machine's): (p50, p99, max) in milliseconds.
pub async fn grant_to_arrival(pool: &sqlx::PgPool, calls: &[CallRecord]) -> (f64, f64, f64) {
    let rows: Vec<(String, f64)> = sqlx::query_as(
        "SELECT upstream_request_id, extract(epoch FROM started_at)::float8 * 1000
           FROM sheepdog.calls WHERE upstream_request_id IS NOT NULL",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let granted: std::collections::HashMap<String, f64> = rows.into_iter().collect();
    let mut delays: Vec<f64> = calls
        .iter()
        .filter_map(|c| granted.get(&c.request_id).map(|g| c.arrived_ms - g))
        .collect();
    delays.sort_by(|a, b| a.total_cmp(b));
    if delays.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    let at = |q: f64| delays[((delays.len() - 1) as f64 * q) as usize];
    (at(0.5), at(0.99), *delays.last().unwrap())
}
