//! The contract's guarantees (§5) as users start sheepdog: `sheepdog worker` processes started
//! together, settings from the environment, every other setting at its default, limits changed
//! while they run, workers killed with SIGKILL. Each test judges by what the mock upstream
//! itself recorded (arrival times, tokens, answers), not by sheepdog's own tables.
//!
//! No test here shortens a setting (lease, timeout, poll interval) to make a guarantee hold.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::scenario::{check_windows, first_arrival, grant_to_arrival, now_ms};
use common::{job_line, wait_for, TestEnv, WorkerProcess};
use rust_decimal::Decimal;
use serde_json::Value;
use sheepdog::prices::{PriceTable, Usage};
use sheepdog::upstream::mock::{CallRecord, MockConfig, MockModel};

fn lines(n: usize, prefix: &str, model: &str, max_tokens: u64) -> Vec<Value> {
    (0..n)
        .map(|i| {
            let mut l = job_line(
                &format!("{prefix}-{i:05}"),
                model,
                &format!("{prefix} job {i}: answer briefly."),
            );
            l["body"]["max_tokens"] = max_tokens.into();
            l
        })
        .collect()
}

fn mock(latency_min: u64, latency_max: u64) -> MockConfig {
    MockConfig {
        latency_ms_min: latency_min,
        latency_ms_max: latency_max,
        ..Default::default()
    }
}

/// Waits until the mock has seen calls spanning `secs` from `from_ms` on.
async fn calls_for(env: &TestEnv, from_ms: Option<f64>, secs: f64, timeout: Duration) -> Vec<CallRecord> {
    let state = env.mock.state.clone();
    wait_for(timeout, &format!("{secs} s of calls"), || {
        let s = state.clone();
        async move {
            let calls = s.calls();
            let from = from_ms.unwrap_or_else(|| first_arrival(&calls));
            let last = calls.iter().map(|c| c.arrived_ms).fold(0.0, f64::max);
            (last - from >= secs * 1000.0).then_some(calls)
        }
    })
    .await
}

/// Requests per minute used between `from` and `from + 60 s`, after the first second's burst,
/// as a share of `rpm`.
fn utilisation(calls: &[CallRecord], from: f64, rpm: f64) -> f64 {
    let n = calls
        .iter()
        .filter(|c| c.arrived_ms >= from + 1000.0 && c.arrived_ms < from + 61_000.0)
        .count();
    n as f64 / rpm
}

async fn failed(env: &TestEnv) -> i64 {
    env.count("SELECT count(*) FROM sheepdog.job_results WHERE status = 'failed'")
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_started_together_with_rpm_in_their_env_hold_it_from_the_first_call() {
    let env = TestEnv::new(mock(50, 150)).await;
    env.enqueue_lines("rpm", &lines(800, "r", "gpt-4o-mini", 20)).await;
    let _workers = WorkerProcess::start_many(&env, 3, &[("SHEEPDOG_RPM", "600".into())]);
    let calls = calls_for(&env, None, 61.0, Duration::from_secs(120)).await;
    let from = first_arrival(&calls);
    let (p50, p99, max) = grant_to_arrival(&env.pool, &calls).await;
    println!("rpm at start: grant to arrival p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms");
    check_windows(
        &calls,
        from,
        600.0,
        false,
        "SHEEPDOG_RPM=600, 3 workers started together",
    );
    let used = utilisation(&calls, from, 600.0);
    println!(
        "rpm at start: {:.1}% of 600 rpm used after the first second",
        used * 100.0
    );
    assert!(used >= 0.9, "the limit was used, not wasted: {:.1}%", used * 100.0);
    assert_eq!(failed(&env).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_started_together_with_tpm_in_their_env_hold_it_by_the_upstreams_count() {
    let env = TestEnv::new(mock(50, 150)).await;
    env.enqueue_lines("tpm", &lines(900, "t", "gpt-4o-mini", 20)).await;
    let _workers = WorkerProcess::start_many(&env, 3, &[("SHEEPDOG_TPM", "24000".into())]);
    let calls = calls_for(&env, None, 61.0, Duration::from_secs(120)).await;
    let from = first_arrival(&calls);
    let (p50, p99, max) = grant_to_arrival(&env.pool, &calls).await;
    println!("tpm at start: grant to arrival p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms");
    check_windows(
        &calls,
        from,
        24_000.0,
        true,
        "SHEEPDOG_TPM=24000, 3 workers started together",
    );
    let tokens: u64 = calls
        .iter()
        .filter(|c| c.arrived_ms >= from + 1000.0 && c.arrived_ms < from + 61_000.0)
        .map(|c| c.prompt_tokens + c.completion_tokens)
        .sum();
    // Reservations are worst cases (max_tokens, an estimate with a margin); the upstream counts
    // what was used, so the limit's use by its count stays below 100%.
    println!("tpm at start: {tokens} tokens in the minute after the first second");
    assert!(tokens as f64 >= 24_000.0 * 0.5, "the limit was used: {tokens}");
    assert_eq!(failed(&env).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_set_while_three_workers_run_hold_from_the_moment_the_command_returns() {
    let env = TestEnv::new(mock(50, 150)).await;
    env.enqueue_lines("live", &lines(6000, "l", "gpt-4o-mini", 20)).await;
    let _workers = WorkerProcess::start_many(&env, 3, &[]);
    let state = env.mock.state.clone();
    wait_for(
        Duration::from_secs(30),
        "the workers to be calling at full speed",
        || {
            let s = state.clone();
            async move { (s.call_count() >= 200).then_some(()) }
        },
    )
    .await;
    let out = env.cli(&["limits", "set", "--rpm", "600"]).await;
    let set_at = now_ms();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let before = env.mock.state.call_count();
    let calls = calls_for(&env, Some(set_at), 61.0, Duration::from_secs(120)).await;
    println!("limits set --rpm 600 returned after {before} unlimited calls");
    check_windows(&calls, set_at, 600.0, false, "limits set --rpm 600 while 3 workers run");
    let used = utilisation(&calls, set_at, 600.0);
    assert!(used >= 0.9, "the new limit was used: {:.1}%", used * 100.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_with_a_total_budget_in_their_env_never_spend_past_it() {
    let env = TestEnv::new(mock(50, 150)).await;
    env.enqueue_lines("money", &lines(100, "m", "gpt-4.1", 20)).await;
    let budget: Decimal = "0.0092".parse().unwrap();
    let _workers = WorkerProcess::start_many(
        &env,
        2,
        &[
            ("SHEEPDOG_BUDGET_USD", budget.to_string()),
            ("SHEEPDOG_BUDGET_PERIOD", "total".into()),
        ],
    );
    // Spent: nothing in flight, and what is left cannot take the cheapest waiting job.
    let pool = env.pool.clone();
    wait_for(Duration::from_secs(60), "the budget to hold every waiting job", || {
        let pool = pool.clone();
        async move {
            let held: bool = sqlx::query_scalar(
                "SELECT NOT EXISTS (SELECT 1 FROM sheepdog.llm_calls WHERE outcome = 'pending')
                    AND (SELECT budget_left_usd FROM sheepdog.limit_usage WHERE scope = '*')
                        < (SELECT min(reserve_cost_usd) FROM sheepdog.backlog)",
            )
            .fetch_one(&pool)
            .await
            .unwrap_or(false);
            held.then_some(())
        }
    })
    .await;
    let prices = PriceTable::built_in();
    let price = prices.get("gpt-4.1").unwrap();
    let billed: Decimal = env
        .mock
        .state
        .calls()
        .iter()
        .filter(|c| c.status == 200)
        .map(|c| {
            price.cost(&Usage {
                prompt_tokens: c.prompt_tokens,
                completion_tokens: c.completion_tokens,
                cached_tokens: c.cached_tokens,
                cache_write_tokens: c.cache_write_tokens,
                reasoning_tokens: c.reasoning_tokens,
            })
        })
        .sum();
    let done = env
        .count("SELECT count(*) FROM sheepdog.job_results WHERE status = 'succeeded'")
        .await;
    println!("budget {budget} USD total: the upstream billed {billed} USD for {done} jobs");
    assert!(billed <= budget, "billed {billed} past a budget of {budget}");
    assert!(billed >= budget / Decimal::from(2), "the budget was used: {billed}");
    assert!(done < 100, "jobs wait for budget: {done} done");
    assert_eq!(failed(&env).await, 0, "waiting for budget fails no job");
    // Raising it lets them go on, without a restart; waiting used up no attempt.
    let out = env.cli(&["limits", "set", "--budget-usd", "1"]).await;
    assert!(out.status.success());
    let s = env.wait_batch("money", Duration::from_secs(60)).await;
    assert_eq!((s.succeeded, s.failed), (100, 0));
    assert_eq!(
        env.count("SELECT max(attempts)::bigint FROM sheepdog.job_results")
            .await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_with_sigkill_has_its_jobs_taken_over_within_15_seconds() {
    let env = TestEnv::new(mock(1000, 3000)).await;
    let n = 400;
    env.enqueue_lines("kill", &lines(n, "k", "gpt-4o-mini", 20)).await;
    let settings = [("SHEEPDOG_CONCURRENCY", "16".to_string())];
    let mut workers = WorkerProcess::start_many(&env, 3, &settings);
    let state = env.mock.state.clone();
    let first = wait_for(Duration::from_secs(30), "the first call", || {
        let s = state.clone();
        async move { s.calls().first().map(|c| c.arrived_ms) }
    })
    .await;
    let wait = (first + 3000.0 - now_ms()).max(0.0);
    tokio::time::sleep(Duration::from_millis(wait as u64)).await;
    workers[0].kill9().await;
    let killed_at = now_ms();
    workers.push(WorkerProcess::start(&env, &settings));
    let started = Instant::now();
    env.wait_batch("kill", Duration::from_secs(180)).await;
    let a = env.audit("kill", n as i64).await;
    // The dead worker's calls: `unknown` in the ledger. Each of those jobs was called again
    // by another replica: how long after the kill?
    let dead: Vec<String> =
        sqlx::query_scalar("SELECT custom_id FROM sheepdog.llm_calls WHERE batch_id = 'kill' AND outcome = 'unknown'")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    let calls = env.mock.state.calls();
    let mut by_job: HashMap<String, Vec<f64>> = HashMap::new();
    for c in &calls {
        by_job.entry(c.content.clone()).or_default().push(c.arrived_ms);
    }
    let mut takeover = 0f64;
    for id in &dead {
        let i: usize = id.trim_start_matches("k-").parse().unwrap();
        let arrivals = &by_job[&format!("k job {i}: answer briefly.")];
        let again = arrivals
            .iter()
            .copied()
            .filter(|t| *t > killed_at)
            .fold(f64::INFINITY, f64::min);
        takeover = takeover.max(again - killed_at);
    }
    println!(
        "kill -9: {} jobs of the dead worker taken over, the last {:.1} s after the kill; batch of {n} done \
         {:.1} s after it; {} upstream calls, {} ledger rows ({} unknown)",
        dead.len(),
        takeover / 1000.0,
        started.elapsed().as_secs_f64(),
        a.mock_calls,
        a.ledger_rows,
        a.unknown_rows
    );
    assert!(!dead.is_empty(), "the killed worker had calls in flight");
    assert!(
        dead.len() <= 16,
        "only the dead worker's calls are unknown: {}",
        dead.len()
    );
    assert!(takeover <= 15_000.0, "taken over {takeover:.0} ms after the kill");
    // Live workers' calls (1-3 s each) were never taken over: the only jobs called twice are
    // the dead worker's.
    assert_eq!(a.called_twice, dead.len() as i64, "{a:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_keeps_answering_429_is_backed_off_from_and_not_hammered() {
    for headers in [true, false] {
        let env = TestEnv::new(MockConfig {
            rpm_limit: Some(30),
            retry_after_seconds: 2.0,
            ratelimit_headers: headers,
            ..mock(50, 150)
        })
        .await;
        env.enqueue_lines("busy", &lines(60, "b", "gpt-4o-mini", 20)).await;
        let _workers = WorkerProcess::start_many(&env, 2, &[]);
        let started = Instant::now();
        let s = env.wait_batch("busy", Duration::from_secs(150)).await;
        let took = started.elapsed().as_secs_f64();
        let calls = env.mock.state.calls();
        let first_429 = calls
            .iter()
            .filter(|c| c.status == 429)
            .map(|c| c.arrived_ms)
            .fold(f64::INFINITY, f64::min);
        // The first burst: what was sent before the first 429 could be heard of (1 s).
        let after_burst = calls
            .iter()
            .filter(|c| c.status == 429 && c.arrived_ms > first_429 + 1000.0)
            .count();
        let total_429 = calls.iter().filter(|c| c.status == 429).count();
        println!(
            "upstream admitting 30/min (x-ratelimit headers: {headers}): 60 jobs done in {took:.1} s, \
             {total_429} 429s, {after_burst} after the first burst"
        );
        assert_eq!((s.succeeded, s.failed), (60, 0));
        assert!(after_burst <= 10, "{after_burst} 429s after the first burst");
        assert!(took <= 130.0, "{took:.1} s");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_workers_long_call_is_never_taken_over_and_a_duplicate_is_not_called() {
    // A call far longer than the takeover time, on a worker that stays alive.
    let mut m = mock(10, 10);
    m.models.insert(
        "gpt-4o".into(),
        MockModel {
            latency_ms_min: Some(25_000),
            latency_ms_max: Some(25_000),
            ..Default::default()
        },
    );
    let env = TestEnv::new(m).await;
    let job = job_line("long-1", "gpt-4o", "a long one").to_string();
    env.publish(job.as_bytes()).await;
    let _workers = WorkerProcess::start_many(&env, 2, &[]);
    let state = env.mock.state.clone();
    wait_for(Duration::from_secs(30), "the call to reach the upstream", || {
        let s = state.clone();
        async move { (s.call_count() == 1).then_some(()) }
    })
    .await;
    // The same message again, while its job runs: acked without a call.
    env.publish(job.as_bytes()).await;
    let s = env.wait_batch("default", Duration::from_secs(60)).await;
    assert_eq!(s.succeeded, 1);
    assert_eq!(env.mock.state.call_count(), 1, "one call, never taken over");
    let rows: Vec<(String,)> = sqlx::query_as("SELECT outcome FROM sheepdog.llm_calls")
        .fetch_all(&env.pool)
        .await
        .unwrap();
    assert_eq!(rows, vec![("ok".to_string(),)]);
    assert_eq!(env.queue_depth("sheepdog.jobs").await, 0);
}
