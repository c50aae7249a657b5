//! What one call's answer means for the ledger, the job, the breakers and the upstream's
//! limit: a pure function from the attempt (and whether it was a breaker's probe or the first
//! call after an upstream pause) to a [`Decision`]. It touches nothing; `execute` carries the
//! decision out. The unit tests below walk the rows of the README's "What happens to a job"
//! table that an upstream answer decides, one test per row.

use std::time::Duration;

use rust_decimal::Decimal;
use serde_json::{json, Value};

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
    /// The body stored as the job's response when it ends.
    pub response: Option<Value>,
    /// What the breakers record, in this order.
    pub breakers: Vec<BreakerNote>,
    /// What the upstream said about its own limit (for the model's scope).
    pub upstream_limit: Option<UpstreamLimit>,
    /// The first call after this scope's pause came back without a 429: the rest may go.
    pub gate_passed: Option<String>,
}

/// Exponential backoff with equal jitter: about 2 s, 4 s, 8 s … up to 10 minutes.
pub fn backoff(attempt: u32, jitter: f64) -> Duration {
    let base = 2f64.powi(attempt.min(10) as i32).min(600.0);
    Duration::from_secs_f64(base / 2.0 + jitter.clamp(0.0, 1.0) * base / 2.0)
}

pub fn decide(a: &Attempt, ctx: &Context) -> Decision {
    let resp = a.response.as_ref();
    let usage = resp.and_then(|r| r.usage);
    let (outcome, cost) = match (&a.verdict, usage) {
        (Verdict::Ok, Some(u)) => (CallOutcome::Ok, ctx.price.cost(&u)),
        (_, Some(u)) => (CallOutcome::Error, ctx.price.cost(&u)),
        (_, None) if a.maybe_billed => (CallOutcome::Unknown, ctx.reserve_cost),
        (_, None) => (CallOutcome::Error, Decimal::ZERO),
    };
    let status = resp.map(|r| r.status);
    let ledger = Ledger {
        outcome,
        status_code: status.map(i32::from),
        usage,
        cost_usd: cost,
        error: match &a.verdict {
            Verdict::Ok => None,
            v => Some(v.reason().to_string()),
        },
        request_id: resp.and_then(|r| r.request_id.clone()),
        latency_ms: a.latency.as_millis().min(i32::MAX as u128) as i32,
    };
    // The upstream's own limit: a 429, or headers that say it is used up.
    let limits = resp.map(|r| r.limits).unwrap_or_default();
    let upstream_limit = if status == Some(429) {
        Some(UpstreamLimit::TooMany {
            retry_after: match &a.verdict {
                Verdict::Transient { retry_after, .. } => *retry_after,
                _ => None,
            },
            reset: limits.reset(),
        })
    } else {
        limits
            .exhausted_for(ctx.reserve_tokens)
            .map(|(reset, _)| UpstreamLimit::Exhausted { reset })
    };
    // The breakers count what says the upstream is failing: 5xx, timeouts, cut connections.
    // A 429 is the upstream's own limit; a 4xx is the job's fault; neither is an outage.
    let health = match &a.verdict {
        Verdict::Paused { .. } => None,
        Verdict::Transient { .. } if a.unreachable => Some(Health::Unreachable),
        Verdict::Transient { .. } if status.is_none_or(|s| s >= 500) => Some(Health::ModelFailed),
        _ => Some(Health::Answered),
    };
    let mut breakers = Vec::new();
    if let Verdict::Paused { reason } = &a.verdict {
        breakers.push(BreakerNote::AccountRefused {
            reason: format!("account refused: {reason}"),
        });
    }
    match (ctx.probe, health) {
        // A probe passes when the upstream answered (a 2xx, a 4xx, even a 429).
        (Some(scope), _) => breakers.push(BreakerNote::ProbeAnswered {
            scope: scope.to_string(),
            passed: health == Some(Health::Answered),
        }),
        (None, Some(h)) => breakers.push(BreakerNote::Record(h)),
        (None, None) => {}
    }
    let gate_passed = ctx
        .first_after_pause
        .filter(|_| status != Some(429))
        .map(str::to_string);
    let mut d = Decision {
        ledger,
        fate: JobFate::Succeeded,
        response: resp.map(|r| r.body.clone()),
        breakers,
        upstream_limit,
        gate_passed,
    };
    match &a.verdict {
        Verdict::Ok => {}
        Verdict::Permanent { reason } => {
            d.fate = JobFate::Failed {
                error: json!({"code": "upstream_rejected", "message": reason}),
                dead_letter: None,
            };
        }
        Verdict::Transient { reason, retry_after } => {
            if ctx.attempt >= ctx.max_attempts {
                let why = format!("gave up after {} attempts; last: {reason}", ctx.attempt);
                d.fate = JobFate::Failed {
                    error: json!({"code": "attempts_exhausted", "message": why}),
                    dead_letter: Some(why),
                };
            } else {
                let delay = backoff(ctx.attempt, ctx.jitter).max(retry_after.unwrap_or_default());
                d.fate = JobFate::Retry {
                    after_ms: delay.as_millis() as i64,
                };
            }
        }
        Verdict::Paused { .. } => {
            // The key or the balance: no job fails. It waits for the account breaker's probe.
            d.fate = JobFate::Retry { after_ms: 0 };
        }
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::ratelimit::RateLimitInfo;
    use crate::upstream::Response;
    use std::str::FromStr;

    fn price() -> Price {
        Price {
            input: Decimal::from_str("0.000002").unwrap(),
            output: Decimal::from_str("0.000008").unwrap(),
            cache_read: None,
        }
    }

    fn ctx(p: &Price, attempt: u32) -> Context<'_> {
        Context {
            attempt,
            max_attempts: 8,
            price: p,
            reserve_cost: Decimal::from_str("0.01").unwrap(),
            reserve_tokens: 500,
            jitter: 0.5,
            probe: None,
            first_after_pause: None,
        }
    }

    fn answered(status: u16, body: Value, verdict: Verdict) -> Attempt {
        Attempt {
            response: Some(Response {
                status,
                usage: Usage::from_response(&body),
                body,
                request_id: Some("req_1".into()),
                limits: RateLimitInfo::default(),
            }),
            verdict,
            latency: Duration::from_millis(120),
            maybe_billed: false,
            unreachable: false,
        }
    }

    fn transient(reason: &str, retry_after: Option<Duration>) -> Verdict {
        Verdict::Transient {
            reason: reason.into(),
            retry_after,
        }
    }

    #[test]
    fn a_2xx_with_usage_succeeds_at_its_exact_cost() {
        let p = price();
        let body = json!({"usage": {"prompt_tokens": 100, "completion_tokens": 10}});
        let d = decide(&answered(200, body.clone(), Verdict::Ok), &ctx(&p, 1));
        assert_eq!(d.fate, JobFate::Succeeded);
        assert_eq!(d.ledger.outcome, CallOutcome::Ok);
        assert_eq!(d.ledger.cost_usd, Decimal::from_str("0.00028").unwrap());
        assert_eq!(d.response, Some(body));
        assert_eq!(d.breakers, vec![BreakerNote::Record(Health::Answered)]);
    }

    #[test]
    fn a_400_404_or_422_fails_at_once_without_a_dead_letter() {
        let p = price();
        for s in [400, 404, 422] {
            let v = Verdict::Permanent {
                reason: format!("upstream answered HTTP {s}"),
            };
            let d = decide(&answered(s, json!({"error": {}}), v), &ctx(&p, 1));
            match &d.fate {
                JobFate::Failed { error, dead_letter } => {
                    assert_eq!(error["code"], "upstream_rejected");
                    assert!(dead_letter.is_none());
                }
                f => panic!("{s}: {f:?}"),
            }
            assert_eq!(d.ledger.outcome, CallOutcome::Error);
            assert_eq!(d.ledger.cost_usd, Decimal::ZERO);
            assert_eq!(
                d.breakers,
                vec![BreakerNote::Record(Health::Answered)],
                "a 4xx is not an outage"
            );
        }
    }

    #[test]
    fn a_5xx_or_timeout_retries_with_backoff_and_feeds_the_model_breaker() {
        let p = price();
        let d = decide(&answered(503, json!({}), transient("HTTP 503", None)), &ctx(&p, 1));
        assert_eq!(d.breakers, vec![BreakerNote::Record(Health::ModelFailed)]);
        match d.fate {
            JobFate::Retry { after_ms } => assert!((1000..=2000).contains(&after_ms), "{after_ms}"),
            f => panic!("{f:?}"),
        }
        let timeout = Attempt {
            response: None,
            verdict: transient("upstream call timed out", None),
            latency: Duration::from_secs(120),
            maybe_billed: true,
            unreachable: false,
        };
        let d = decide(&timeout, &ctx(&p, 3));
        assert_eq!(d.ledger.outcome, CallOutcome::Unknown, "may have been billed");
        assert_eq!(
            d.ledger.cost_usd,
            Decimal::from_str("0.01").unwrap(),
            "at its reservation"
        );
        assert_eq!(d.breakers, vec![BreakerNote::Record(Health::ModelFailed)]);
        match d.fate {
            JobFate::Retry { after_ms } => assert!((4000..=8000).contains(&after_ms)),
            f => panic!("{f:?}"),
        }
    }

    #[test]
    fn a_refused_connection_is_the_upstream_unreachable_and_not_billed() {
        let p = price();
        let a = Attempt {
            response: None,
            verdict: transient("cannot connect", None),
            latency: Duration::from_millis(1),
            maybe_billed: false,
            unreachable: true,
        };
        let d = decide(&a, &ctx(&p, 1));
        assert_eq!(d.breakers, vec![BreakerNote::Record(Health::Unreachable)]);
        assert_eq!(
            (d.ledger.outcome, d.ledger.cost_usd),
            (CallOutcome::Error, Decimal::ZERO)
        );
    }

    #[test]
    fn a_429_retries_no_sooner_than_retry_after_and_pauses_the_scope() {
        let p = price();
        let v = transient("HTTP 429", Some(Duration::from_secs(30)));
        let d = decide(&answered(429, json!({}), v), &ctx(&p, 1));
        assert_eq!(d.fate, JobFate::Retry { after_ms: 30_000 });
        assert_eq!(
            d.upstream_limit,
            Some(UpstreamLimit::TooMany {
                retry_after: Some(Duration::from_secs(30)),
                reset: None
            })
        );
        assert_eq!(
            d.breakers,
            vec![BreakerNote::Record(Health::Answered)],
            "a 429 is not an outage"
        );
    }

    #[test]
    fn out_of_attempts_fails_and_dead_letters() {
        let p = price();
        let d = decide(&answered(500, json!({}), transient("HTTP 500", None)), &ctx(&p, 8));
        match d.fate {
            JobFate::Failed { error, dead_letter } => {
                assert_eq!(error["code"], "attempts_exhausted");
                assert!(dead_letter.unwrap().contains("gave up after 8 attempts"));
            }
            f => panic!("{f:?}"),
        }
    }

    #[test]
    fn a_401_402_or_403_fails_no_job_and_refuses_the_account() {
        let p = price();
        for s in [401, 402, 403] {
            let v = Verdict::Paused {
                reason: format!("HTTP {s}"),
            };
            let d = decide(&answered(s, json!({}), v), &ctx(&p, 8));
            assert_eq!(d.fate, JobFate::Retry { after_ms: 0 }, "{s}: even on its last attempt");
            match &d.breakers[..] {
                [BreakerNote::AccountRefused { reason }] => assert!(reason.starts_with("account refused")),
                b => panic!("{b:?}"),
            }
        }
    }

    #[test]
    fn a_2xx_without_usage_may_have_been_billed() {
        let p = price();
        let mut a = answered(200, json!({"choices": []}), transient("HTTP 200 without usage", None));
        a.maybe_billed = true;
        let d = decide(&a, &ctx(&p, 1));
        assert_eq!(d.ledger.outcome, CallOutcome::Unknown);
        assert!(matches!(d.fate, JobFate::Retry { .. }));
    }

    #[test]
    fn headers_that_say_the_limit_is_used_up_hold_the_scope() {
        let p = price();
        let body = json!({"usage": {"prompt_tokens": 1, "completion_tokens": 1}});
        let mut a = answered(200, body, Verdict::Ok);
        a.response.as_mut().unwrap().limits = RateLimitInfo {
            remaining_requests: Some(0),
            reset_requests: Some(Duration::from_secs(20)),
            ..Default::default()
        };
        let d = decide(&a, &ctx(&p, 1));
        assert_eq!(
            d.upstream_limit,
            Some(UpstreamLimit::Exhausted {
                reset: Duration::from_secs(20)
            })
        );
        assert_eq!(d.fate, JobFate::Succeeded);
    }

    #[test]
    fn backoff_doubles_with_equal_jitter_and_caps_at_ten_minutes() {
        assert_eq!(backoff(1, 0.0), Duration::from_secs(1));
        assert_eq!(backoff(1, 1.0), Duration::from_secs(2));
        assert_eq!(backoff(3, 0.0), Duration::from_secs(4));
        assert_eq!(backoff(30, 1.0), Duration::from_secs(600));
    }

    #[test]
    fn a_probe_passes_when_the_upstream_answers_and_fails_when_it_does_not() {
        let p = price();
        let mut c = ctx(&p, 2);
        c.probe = Some("gpt-x");
        let body = json!({"usage": {"prompt_tokens": 1, "completion_tokens": 1}});
        let d = decide(&answered(200, body, Verdict::Ok), &c);
        assert_eq!(
            d.breakers,
            vec![BreakerNote::ProbeAnswered {
                scope: "gpt-x".into(),
                passed: true
            }]
        );
        let d = decide(&answered(503, json!({}), transient("HTTP 503", None)), &c);
        assert_eq!(
            d.breakers,
            vec![BreakerNote::ProbeAnswered {
                scope: "gpt-x".into(),
                passed: false
            }]
        );
        let d = decide(&answered(429, json!({}), transient("HTTP 429", None)), &c);
        assert_eq!(
            d.breakers,
            vec![BreakerNote::ProbeAnswered {
                scope: "gpt-x".into(),
                passed: true
            }],
            "a 429 proves the model answers; its pause is the throttle's"
        );
    }

    #[test]
    fn the_first_call_after_a_pause_opens_the_gate_unless_it_got_a_429() {
        let p = price();
        let mut c = ctx(&p, 1);
        c.first_after_pause = Some("gpt-x");
        let body = json!({"usage": {"prompt_tokens": 1, "completion_tokens": 1}});
        assert_eq!(
            decide(&answered(200, body, Verdict::Ok), &c).gate_passed.as_deref(),
            Some("gpt-x")
        );
        let d = decide(&answered(429, json!({}), transient("HTTP 429", None)), &c);
        assert_eq!(d.gate_passed, None, "the 429 starts the next, longer pause instead");
    }
}
