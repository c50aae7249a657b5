//! One granted call: send it, decide what the answer means, carry the decision out.
//!
//! Carrying out is one fixed order: tell the breakers and the upstream limit what the answer
//! said (so other replicas stop as soon as possible), then hand the settlement (the ledger row,
//! the money and the job's fate) to the dispatcher, which writes it in its next round's
//! transaction together with the next grants, and counts and logs it once that commits.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use rand::Rng;
use serde_json::json;
use tokio::sync::OwnedSemaphorePermit;

use super::decide::{decide, BreakerNote, Context, Decision};
use super::Worker;
use crate::job::Job;
use crate::limits::throttle::{self, UpstreamLimit};
use crate::store::dispatch::{Granted, Payload};
use crate::store::settle::{CallOutcome, JobFate, Settlement};

/// Calls the upstream for a granted job and hands its settlement, with the job's slot, to the
/// dispatcher. The slot stays taken until the settlement is written.
pub async fn run(w: Arc<Worker>, g: Granted, permit: OwnedSemaphorePermit) {
    w.metrics.in_flight.fetch_add(1, Ordering::Relaxed);
    let replica = w.replica();
    let settlement = match call(&w, &g, replica).await {
        Ok(s) => s,
        Err(s) => s,
    };
    w.metrics.in_flight.fetch_sub(1, Ordering::Relaxed);
    w.returned(settlement, permit);
}

/// Makes the call and decides. `Err` carries a settlement for a job that could not be called
/// at all (it cannot happen for a message intake accepted, but is recorded, not panicked on).
async fn call(w: &Worker, g: &Granted, replica: i64) -> Result<Settlement, Settlement> {
    let refuse = |why: String| Settlement {
        id: g.id.clone(),
        model: g.model.clone(),
        call_id: g.call_id,
        attempt: g.attempt,
        shared: g.shared,
        outcome: CallOutcome::Error,
        status_code: None,
        prompt_tokens: None,
        completion_tokens: None,
        cached_tokens: None,
        cache_write_tokens: None,
        reasoning_tokens: None,
        cost_usd: rust_decimal::Decimal::ZERO,
        error: Some(why.clone()),
        upstream_request_id: None,
        latency_ms: None,
        response: None,
        fate: JobFate::Failed {
            error: json!({"code": "invalid_message", "message": why}),
            dead_letter: Some(why),
        },
    };
    let price = w.prices.get(&g.model).ok_or_else(|| {
        refuse(format!(
            "model {:?} has no price in this replica's price table",
            g.model
        ))
    })?;
    let body = match &g.payload {
        // Made when the job arrived: sent as it is.
        Payload::Request(request) => request.clone(),
        // A job stored by an earlier version: its request is made now.
        Payload::Message(message) => {
            let job = Job::parse(message, usize::MAX).map_err(|e| refuse(format!("stored message is invalid: {e}")))?;
            let request = job.upstream_request(w.args.pricing.default_max_tokens, price.reasoning);
            serde_json::to_vec(&request.body).map_err(|e| refuse(format!("cannot encode the request: {e}")))?
        }
    };
    let attempt = w.client.call(body).await;
    let ctx = Context {
        attempt: g.attempt.max(1) as u32,
        max_attempts: w.args.max_attempts,
        price,
        reserve_cost: g.reserve_cost_usd,
        reserve_tokens: g.reserve_tokens.max(0) as u64,
        jitter: rand::rng().random::<f64>(),
        probe: g.probe.as_deref(),
        first_after_pause: g.first_after_pause.as_deref(),
    };
    let d = decide(&attempt, &ctx);
    tell_the_shared_state(w, g, replica, &d).await;
    w.metrics.call(
        d.ledger.outcome.as_str(),
        &g.model,
        attempt.latency,
        d.ledger.usage.map_or(0, |u| u.prompt_tokens),
        d.ledger.usage.map_or(0, |u| u.completion_tokens),
        d.ledger.cost_usd,
    );
    Ok(settlement(g, d))
}

/// Breakers, account, the upstream's limit: what this answer tells every replica.
async fn tell_the_shared_state(w: &Worker, g: &Granted, replica: i64, d: &Decision) {
    let what = d.ledger.error.as_deref().unwrap_or("ok");
    for note in &d.breakers {
        match note {
            BreakerNote::AccountRefused { reason } => {
                tracing::error!(%reason, "the upstream refused the account: no replica calls until a probe passes");
                w.breakers.trip(crate::limits::ALL, reason).await;
            }
            BreakerNote::ProbeAnswered { scope, passed } => {
                w.breakers.probe_result(scope, replica, *passed, what).await
            }
            BreakerNote::Record(health) => {
                w.breakers.record(&g.model, *health, what).await;
            }
        }
    }
    let result = match d.upstream_limit {
        Some(UpstreamLimit::TooMany { retry_after, reset }) => throttle::too_many(&w.pool, &g.model, retry_after, reset)
            .await
            .map(|hold| {
                tracing::warn!(model = %g.model, hold_s = hold.as_secs_f64(), "the upstream answered 429: every replica holds off this model");
            }),
        Some(UpstreamLimit::Exhausted { reset }) => throttle::exhausted(&w.pool, &g.model, reset, "rate").await,
        None => Ok(()),
    };
    if let Err(e) = result {
        tracing::warn!(error = %e, "could not record the upstream's limit");
    }
    if let Some(scope) = &d.gate_passed {
        if let Err(e) = throttle::first_passed(&w.pool, scope, replica).await {
            tracing::warn!(error = %e, "could not open the gate after the first call");
        }
    }
}

fn settlement(g: &Granted, d: Decision) -> Settlement {
    Settlement {
        id: g.id.clone(),
        model: g.model.clone(),
        call_id: g.call_id,
        attempt: g.attempt,
        shared: g.shared,
        outcome: d.ledger.outcome,
        status_code: d.ledger.status_code,
        prompt_tokens: d.ledger.usage.map(|u| u.prompt_tokens as i64),
        completion_tokens: d.ledger.usage.map(|u| u.completion_tokens as i64),
        cached_tokens: d.ledger.usage.map(|u| u.cached_tokens as i64),
        cache_write_tokens: d.ledger.usage.map(|u| u.cache_write_tokens as i64),
        reasoning_tokens: d.ledger.usage.map(|u| u.reasoning_tokens as i64),
        cost_usd: d.ledger.cost_usd,
        error: d.ledger.error,
        upstream_request_id: d.ledger.request_id,
        latency_ms: Some(d.ledger.latency_ms),
        response: d.response,
        fate: d.fate,
    }
}

/// Counts and logs a settled call (once its settlement committed).
pub(super) fn log_and_count(w: &Worker, s: &Settlement) {
    let status = match &s.fate {
        JobFate::Succeeded => {
            w.metrics.jobs_succeeded.fetch_add(1, Ordering::Relaxed);
            "succeeded"
        }
        JobFate::Failed { dead_letter, .. } => {
            w.metrics.jobs_failed.fetch_add(1, Ordering::Relaxed);
            if dead_letter.is_some() {
                w.metrics.jobs_dead_lettered.fetch_add(1, Ordering::Relaxed);
            }
            "failed"
        }
        JobFate::Retry { after_ms } => {
            w.metrics.jobs_retried.fetch_add(1, Ordering::Relaxed);
            tracing::info!(job = %s.id, error = s.error.as_deref().unwrap_or(""), retry_in_ms = after_ms, "retrying later");
            return;
        }
    };
    tracing::info!(
        batch_id = %s.id.batch_id, custom_id = %s.id.custom_id, status,
        prompt_tokens = s.prompt_tokens.unwrap_or(0), completion_tokens = s.completion_tokens.unwrap_or(0),
        cost_usd = %s.cost_usd, latency_ms = s.latency_ms.unwrap_or(0), "job finished"
    );
}
