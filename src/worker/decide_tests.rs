//! `decide` walked through the README's "What happens to a job" table, row by row.

use super::*;
use crate::upstream::ratelimit::RateLimitInfo;
use crate::upstream::Response;
use serde_json::Value;
use std::str::FromStr;

fn price() -> Price {
    Price {
        input: Decimal::from_str("0.000002").unwrap(),
        output: Decimal::from_str("0.000008").unwrap(),
        cache_read: None,
        cache_write: None,
        reasoning: false,
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
            raw: body.to_string(),
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
    assert_eq!(d.response, Some(body.to_string()));
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

#[test]
fn a_probe_never_uses_up_its_jobs_attempts() {
    let p = price();
    let mut c = ctx(&p, 8);
    c.probe = Some("gpt-x");
    let d = decide(&answered(503, json!({}), transient("HTTP 503", None)), &c);
    assert!(matches!(d.fate, JobFate::Retry { .. }), "{:?}", d.fate);
    let mut c = ctx(&p, 9);
    c.first_after_pause = Some("gpt-x");
    let d = decide(&answered(429, json!({}), transient("HTTP 429", None)), &c);
    assert!(matches!(d.fate, JobFate::Retry { .. }), "{:?}", d.fate);
}
