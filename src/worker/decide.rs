//! What one call's answer means for the ledger, the job, the breakers and the upstream's
//! limit: a pure function from the attempt (and whether it was a breaker's probe or the first
//! call after an upstream pause) to a [`Decision`]. It touches nothing; `execute` carries the
//! decision out. The unit tests below walk the rows of the README's "What happens to a job"
//! table that an upstream answer decides, one test per row.

use std::time::Duration;

use rust_decimal::Decimal;
use serde_json::json;

use crate::limits::breaker::Health;
use crate::limits::throttle::UpstreamLimit;
use crate::prices::{Price, Usage};
use crate::store::settle::{CallOutcome, JobFate};
use crate::upstream::{Attempt, Verdict};

/// What `decide` needs besides the attempt.
#[derive(Debug, Clone)]
pub struct Context<'a> {
    /// This call's attempt number (1 for the first).
    pub attempt: u32,
    pub max_attempts: u32,
    pub price: &'a Price,
    /// The call's reserved worst case, charged when its answer was never read.
    pub reserve_cost: Decimal,
    pub reserve_tokens: u64,
    /// A draw from [0, 1) for the backoff's jitter.
    pub jitter: f64,
    /// This call was the probe of this scope's breaker.
    pub probe: Option<&'a str>,
    /// This call was the first after this scope's upstream pause.
    pub first_after_pause: Option<&'a str>,
}

/// What a breaker records from one answer.
#[derive(Debug, Clone, PartialEq)]
pub enum BreakerNote {
    /// An ordinary call, in this replica's windows (failures may open the model's breaker).
    Record(Health),
    /// The answer to a breaker's probe: `passed` closes it, else it opens again for longer.
    ProbeAnswered { scope: String, passed: bool },
    /// The account was refused (401/402/403): open the account-wide breaker now.
    AccountRefused { reason: String },
}

/// The ledger row a call leaves.
#[derive(Debug, Clone, PartialEq)]
pub struct Ledger {
    pub outcome: CallOutcome,
    pub status_code: Option<i32>,
    pub usage: Option<Usage>,
    pub cost_usd: Decimal,
    pub error: Option<String>,
    pub request_id: Option<String>,
    pub latency_ms: i32,
}

/// What a call's answer means.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub ledger: Ledger,
    /// The job's end, or its return to the backlog.
    pub fate: JobFate,
    /// The body stored as the job's response when it ends (JSON text, as it came).
    pub response: Option<String>,
    /// What the breakers record, in this order.
    pub breakers: Vec<BreakerNote>,
    /// What the upstream said about its own limit (for the model's scope).
    pub upstream_limit: Option<UpstreamLimit>,
    /// The first call after this scope's pause came back without a 429: the rest may go.
    pub gate_passed: Option<String>,
}

/// The wait before a job's next attempt: the retry policy's job schedule (`retry::job_retry`),
/// about 2 s, 4 s, 8 s … up to 10 minutes, with equal jitter from `jitter`.
pub fn backoff(attempt: u32, jitter: f64) -> Duration {
    crate::retry::job_retry(attempt, jitter, None)
}

pub fn decide(a: &Attempt, ctx: &Context) -> Decision {
    let status = a.response.as_ref().map(|r| r.status);
    Decision {
        ledger: ledger_of(a, ctx),
        fate: fate_of(a, ctx),
        response: a.response.as_ref().map(|r| r.raw.clone()),
        breakers: breaker_notes(a, ctx),
        upstream_limit: upstream_limit_of(a, ctx),
        // The first call after a pause opens the gate unless it met the next 429.
        gate_passed: ctx
            .first_after_pause
            .filter(|_| status != Some(429))
            .map(str::to_string),
    }
}

/// The ledger row: exact cost from usage, or the reservation for a call that may have been
/// billed but whose answer was never read.
fn ledger_of(a: &Attempt, ctx: &Context) -> Ledger {
    let resp = a.response.as_ref();
    let usage = resp.and_then(|r| r.usage);
    let (outcome, cost) = match (&a.verdict, usage) {
        (Verdict::Ok, Some(u)) => (CallOutcome::Ok, ctx.price.cost(&u)),
        (_, Some(u)) => (CallOutcome::Error, ctx.price.cost(&u)),
        (_, None) if a.maybe_billed => (CallOutcome::Unknown, ctx.reserve_cost),
        (_, None) => (CallOutcome::Error, Decimal::ZERO),
    };
    Ledger {
        outcome,
        status_code: resp.map(|r| i32::from(r.status)),
        usage,
        cost_usd: cost,
        error: match &a.verdict {
            Verdict::Ok => None,
            v => Some(v.reason().to_string()),
        },
        request_id: resp.and_then(|r| r.request_id.clone()),
        latency_ms: a.latency.as_millis().min(i32::MAX as u128) as i32,
    }
}

/// The job's end, or its return to the backlog.
fn fate_of(a: &Attempt, ctx: &Context) -> JobFate {
    match &a.verdict {
        Verdict::Ok => JobFate::Succeeded,
        Verdict::Permanent { reason } => JobFate::Failed {
            error: json!({"code": "upstream_rejected", "message": reason}),
            dead_letter: None,
        },
        Verdict::Transient { reason, retry_after } => {
            // A breaker's probe, or the first call after an upstream pause, tests the upstream,
            // not the job: however long an outage lasts, it never uses up the job's attempts.
            let testing = ctx.probe.is_some() || ctx.first_after_pause.is_some();
            if ctx.attempt >= ctx.max_attempts && !testing {
                let why = format!("gave up after {} attempts; last: {reason}", ctx.attempt);
                JobFate::Failed {
                    error: json!({"code": "attempts_exhausted", "message": why}),
                    dead_letter: Some(why),
                }
            } else {
                let delay = crate::retry::job_retry(ctx.attempt, ctx.jitter, *retry_after);
                JobFate::Retry {
                    after_ms: delay.as_millis() as i64,
                }
            }
        }
        // The key or the balance: no job fails. It waits for the account breaker's probe.
        Verdict::Paused { .. } => JobFate::Retry { after_ms: 0 },
    }
}

/// What the breakers record. They count what says the upstream is failing: 5xx, timeouts, cut
/// connections. A 429 is the upstream's own limit and a 4xx the job's fault; neither is an
/// outage. A probe passes when the upstream answered at all.
fn breaker_notes(a: &Attempt, ctx: &Context) -> Vec<BreakerNote> {
    let status = a.response.as_ref().map(|r| r.status);
    let health = match &a.verdict {
        Verdict::Paused { .. } => None,
        Verdict::Transient { .. } if a.unreachable => Some(Health::Unreachable),
        Verdict::Transient { .. } if status.is_none_or(|s| s >= 500) => Some(Health::ModelFailed),
        _ => Some(Health::Answered),
    };
    let mut notes = Vec::new();
    if let Verdict::Paused { reason } = &a.verdict {
        notes.push(BreakerNote::AccountRefused {
            reason: format!("account refused: {reason}"),
        });
    }
    match (ctx.probe, health) {
        (Some(scope), _) => notes.push(BreakerNote::ProbeAnswered {
            scope: scope.to_string(),
            passed: health == Some(Health::Answered),
        }),
        (None, Some(h)) => notes.push(BreakerNote::Record(h)),
        (None, None) => {}
    }
    notes
}

/// What the upstream said about its own limit: a 429, or headers that say it is used up.
fn upstream_limit_of(a: &Attempt, ctx: &Context) -> Option<UpstreamLimit> {
    let resp = a.response.as_ref()?;
    if resp.status == 429 {
        return Some(UpstreamLimit::TooMany {
            retry_after: match &a.verdict {
                Verdict::Transient { retry_after, .. } => *retry_after,
                _ => None,
            },
            reset: resp.limits.reset(),
        });
    }
    resp.limits
        .exhausted_for(ctx.reserve_tokens)
        .map(|(reset, _)| UpstreamLimit::Exhausted { reset })
}

#[cfg(test)]
#[path = "decide_tests.rs"]
mod tests;
