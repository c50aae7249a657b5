//! Global limits across replicas: three workers, each with its own connections,
//! against one mock that records when every request arrived.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{job_line, wait_for, TestEnv};
use rust_decimal::Decimal;
use serde_json::Value;
use sheepdog::config::LimitArgs;
use sheepdog::upstream::mock::{CallRecord, MockConfig};

/// The most requests and tokens that arrived in any window of `t_ms`.
fn worst_window(calls: &[CallRecord], t_ms: f64) -> (usize, u64) {
    sheepdog::commands::bench::worst_window(calls, t_ms / 1000.0)
}

fn limits(rpm: Option<i64>, tpm: Option<i64>, budget: Option<&str>) -> LimitArgs {
    LimitArgs {
        rpm: rpm.map(Decimal::from),
        tpm: tpm.map(Decimal::from),
        burst_seconds: Some(Decimal::ONE),
        budget_usd: budget.map(|b| b.parse().unwrap()),
        budget_period: Some("total".into()),
    }
}

fn lines(n: usize, prefix: &str, max_tokens: u64) -> Vec<Value> {
    (0..n)
        .map(|i| {
            let mut l = job_line(
                &format!("{prefix}-{i}"),
                "gpt-4o",
                &format!("Limit test prompt {i}, please answer."),
            );
            l["body"]["max_tokens"] = max_tokens.into();
            l
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_stay_inside_one_global_request_limit_and_use_it() {
    let env = TestEnv::new(MockConfig {
        latency_ms_min: 5,
        latency_ms_max: 30,
        ..Default::default()
    })
    .await;
    let rpm = 600; // 10 requests a second for everyone together; a bucket of 10.
    sheepdog::limits::apply(&env.pool, &limits(Some(rpm), None, None))
        .await
        .unwrap();
    // Deeper than the limit allows in the test's 70 s, so the limit is the bottleneck.
    env.enqueue_lines("rpm", &lines(720, "r", 20)).await;
    let ws = [
        env.spawn_worker("a").await,
        env.spawn_worker("b").await,
        env.spawn_worker("c").await,
    ];
    let state = env.mock.state.clone();
    wait_for(Duration::from_secs(120), "70 seconds of calls", || {
        let s = state.clone();
        async move {
            let calls = s.calls();
            let span = calls.last().map(|l| l.arrived_ms - calls[0].arrived_ms).unwrap_or(0.0);
            (span >= 70_000.0).then_some(())
        }
    })
    .await;
    let calls = env.mock.state.calls();
    for t in [1.0, 10.0, 60.0] {
        let (n, _) = worst_window(&calls, t * 1000.0);
        let bound = rpm as f64 * (t + 1.0) / 60.0;
        assert!(
            n as f64 <= bound,
            "{n} requests in a {t} s window; the limit allows {bound}"
        );
    }
    // Use of the limit: after the first burst, at least 95% of the rate.
    let span_s = (calls.last().unwrap().arrived_ms - calls[0].arrived_ms) / 1000.0;
    let rate = rpm as f64 / 60.0;
    let used = (calls.len() as f64 - rate) / (rate * span_s);
    assert!(used >= 0.95, "used {:.1}% of the limit", used * 100.0);
    assert!(
        ws.iter().all(|w| w.metrics.jobs_succeeded.load(Ordering::Relaxed) > 50),
        "every replica took its share"
    );
    assert_eq!(
        env.count("SELECT count(*) FROM sheepdog.job_results WHERE status = 'failed'")
            .await,
        0
    );
    for w in ws {
        w.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_stay_inside_one_global_token_limit_by_the_upstreams_count() {
    let env = TestEnv::new(MockConfig {
        latency_ms_min: 5,
        latency_ms_max: 30,
        ..Default::default()
    })
    .await;
    let tpm = 90_000; // 1,500 tokens a second; each job reserves about 65 and uses about 40.
    sheepdog::limits::apply(&env.pool, &limits(None, Some(tpm), None))
        .await
        .unwrap();
    env.enqueue_lines("tpm", &lines(1500, "t", 50)).await;
    let ws = [
        env.spawn_worker("a").await,
        env.spawn_worker("b").await,
        env.spawn_worker("c").await,
    ];
    let state = env.mock.state.clone();
    wait_for(Duration::from_secs(90), "25 seconds of calls", || {
        let s = state.clone();
        async move {
            let calls = s.calls();
            let span = calls.last().map(|l| l.arrived_ms - calls[0].arrived_ms).unwrap_or(0.0);
            (span >= 25_000.0).then_some(())
        }
    })
    .await;
    let calls = env.mock.state.calls();
    for t in [1.0, 10.0, 60.0] {
        let (_, tokens) = worst_window(&calls, t * 1000.0);
        let bound = tpm as f64 * (t + 1.0) / 60.0;
        assert!(
            tokens as f64 <= bound,
            "{tokens} tokens in a {t} s window; the limit allows {bound}"
        );
    }
    let span_s = (calls.last().unwrap().arrived_ms - calls[0].arrived_ms) / 1000.0;
    let total: u64 = calls.iter().map(|c| c.prompt_tokens + c.completion_tokens).sum();
    let rate = tpm as f64 / 60.0;
    let used = (total as f64 - rate) / (rate * span_s);
    assert!(used >= 0.95, "used {:.1}% of the token limit", used * 100.0);
    for w in ws {
        w.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn spend_never_passes_the_budget_and_replicas_resume_when_it_is_raised() {
    let env = TestEnv::new(MockConfig {
        latency_ms_min: 5,
        latency_ms_max: 20,
        ..Default::default()
    })
    .await;
    // About 18 jobs' worth at their worst case, 35 at their real cost; the batch needs far more.
    let budget = "0.01";
    sheepdog::limits::apply(&env.pool, &limits(None, None, Some(budget)))
        .await
        .unwrap();
    env.enqueue_lines("money", &lines(120, "m", 50)).await;
    let ws = [
        env.spawn_worker("a").await,
        env.spawn_worker("b").await,
        env.spawn_worker("c").await,
    ];
    let metrics: Vec<_> = ws.iter().map(|w| w.metrics.clone()).collect();
    wait_for(
        Duration::from_secs(30),
        "every replica to pause on the budget, holding nothing",
        || {
            let m = metrics.clone();
            async move {
                m.iter()
                    .all(|m| m.paused.lock().unwrap().is_some() && m.in_flight.load(Ordering::Relaxed) == 0)
                    .then_some(())
            }
        },
    )
    .await;
    let reason = metrics[0].paused.lock().unwrap().clone().unwrap();
    assert!(reason.contains("budget exhausted"), "{reason}");
    let spent: Decimal = sqlx::query_scalar("SELECT coalesce(sum(cost_usd), 0) FROM sheepdog.llm_calls")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    let budget: Decimal = budget.parse().unwrap();
    assert!(spent <= budget, "spent {spent} of a {budget} budget");
    assert!(
        spent >= budget * Decimal::new(5, 1),
        "the budget was used, not wasted: {spent}"
    );
    assert_eq!(
        env.count("SELECT count(*) FROM sheepdog.job_results WHERE status = 'failed'")
            .await,
        0
    );
    let done = env
        .count("SELECT count(*) FROM sheepdog.job_results WHERE status = 'succeeded'")
        .await;
    assert!(done < 120, "jobs wait for budget: {done} done");
    // Paused replicas consume nothing: the rest wait in the queue, unacked by no one.
    let depth = env.queue_depth("sheepdog.jobs").await;
    assert_eq!(depth as i64, 120 - done, "the waiting jobs are back in the queue");

    // Raising the budget resumes every replica by itself.
    sheepdog::limits::apply(&env.pool, &limits(None, None, Some("1")))
        .await
        .unwrap();
    let status = env.wait_batch("money", Duration::from_secs(60)).await;
    assert_eq!((status.succeeded, status.failed), (120, 0));
    let attempts = env
        .count("SELECT max(attempts)::bigint FROM sheepdog.job_results")
        .await;
    assert_eq!(attempts, 1, "waiting for budget used up no attempt");
    for w in ws {
        w.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_429_pauses_every_replica_until_its_retry_after() {
    let env = TestEnv::new(MockConfig {
        mode: "overloaded".into(),
        retry_after_seconds: 2.0,
        ..Default::default()
    })
    .await;
    // A generous rate limit, so replicas consult the shared state before every call.
    sheepdog::limits::apply(&env.pool, &limits(Some(60_000), None, None))
        .await
        .unwrap();
    env.enqueue_lines("busy", &lines(30, "p", 20)).await;
    let mut args = env.worker_args();
    args.concurrency = 2;
    let ws = [
        env.spawn_worker_with("a", args.clone()).await,
        env.spawn_worker_with("b", args.clone()).await,
        env.spawn_worker_with("c", args).await,
    ];
    let state = env.mock.state.clone();
    wait_for(Duration::from_secs(20), "the first 429", || {
        let s = state.clone();
        async move { (s.call_count() > 0).then_some(()) }
    })
    .await;
    let first = env.mock.state.calls()[0].arrived_ms;
    // Calls already in flight when the first 429 came may land; nobody starts one after it.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    env.mock.state.update(|c| c.mode = "ok".into());
    let calls = env.mock.state.calls();
    let in_pause = calls
        .iter()
        .filter(|c| c.arrived_ms > first + 300.0 && c.arrived_ms < first + 1900.0)
        .count();
    assert_eq!(in_pause, 0, "no replica called during the Retry-After");
    let status = env.wait_batch("busy", Duration::from_secs(60)).await;
    assert_eq!((status.succeeded, status.failed), (30, 0));
    for w in ws {
        w.stop().await;
    }
}
