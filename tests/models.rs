//! Many models, many batches (contract §6, §7): limits and breakers per model, no head-of-line
//! blocking, priorities and fair shares. As users run it: `sheepdog worker` processes, settings
//! from the environment (a limits file for the models' own limits), everything else at its
//! default; judged by the mock upstream's own record.

mod common;

use std::time::{Duration, Instant};

use common::scenario::{check_windows, now_ms};
use common::{job_line, wait_for, TestEnv, WorkerProcess};
use serde_json::Value;
use sheepdog::upstream::mock::{CallRecord, MockConfig, MockMode, MockModel};

const A: &str = "gpt-4.1";
const B: &str = "gpt-4o-mini";

fn lines(n: usize, prefix: &str, model: &str) -> Vec<Value> {
    (0..n)
        .map(|i| {
            let mut l = job_line(&format!("{prefix}-{i:05}"), model, &format!("{prefix} job {i}"));
            l["body"]["max_tokens"] = 20.into();
            l
        })
        .collect()
}

fn mock() -> MockConfig {
    MockConfig {
        latency_ms_min: 50,
        latency_ms_max: 150,
        ..Default::default()
    }
}

fn of_model(calls: &[CallRecord], model: &str) -> Vec<CallRecord> {
    calls.iter().filter(|c| c.model == model).cloned().collect()
}

/// Writes a limits file for the workers' environment.
fn limits_file(env: &TestEnv, json: &str) -> String {
    let path = std::env::temp_dir().join(format!("{}-limits.json", env.name));
    std::fs::write(&path, json).unwrap();
    path.display().to_string()
}

/// When each job of a batch finished, in ms since the epoch, by custom_id order.
async fn finish_times(env: &TestEnv, batch: &str) -> Vec<f64> {
    sqlx::query_scalar(
        "SELECT extract(epoch FROM finished_at)::float8 * 1000 FROM sheepdog.job_results
          WHERE batch_id = $1 AND finished_at IS NOT NULL ORDER BY finished_at",
    )
    .bind(batch)
    .fetch_all(&env.pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_at_its_own_limit_never_holds_back_another_model() {
    let env = TestEnv::new(mock()).await;
    env.enqueue_lines("a", &lines(2000, "a", A)).await;
    env.enqueue_lines("b", &lines(300, "b", B)).await;
    let file = limits_file(&env, &format!(r#"{{"{A}": {{"rpm": 60}}}}"#));
    let started = Instant::now();
    let _workers = WorkerProcess::start_many(&env, 4, &[("SHEEPDOG_LIMITS_FILE", file)]);
    let b = env.wait_batch("b", Duration::from_secs(30)).await;
    let b_done = started.elapsed().as_secs_f64();
    assert_eq!((b.succeeded, b.failed), (300, 0));
    // A goes on at its own limit: a minute of it.
    let state = env.mock.state.clone();
    let calls = wait_for(Duration::from_secs(120), "a minute of A's calls", || {
        let s = state.clone();
        async move {
            let a = of_model(&s.calls(), A);
            let first = a.first()?.arrived_ms;
            (a.last()?.arrived_ms - first >= 61_000.0).then_some(a)
        }
    })
    .await;
    let first = calls[0].arrived_ms;
    check_windows(&calls, first, 60.0, false, "model A at its own 60 rpm");
    let in_minute = calls
        .iter()
        .filter(|c| c.arrived_ms >= first + 1000.0 && c.arrived_ms < first + 61_000.0)
        .count();
    println!(
        "2000 jobs of A (60 rpm) before 300 of B (no limit of its own), 4 workers: all of B done \
         {b_done:.1} s after the workers started; A ran {in_minute} requests in the minute after its first second"
    );
    assert!(b_done <= 15.0, "B done {b_done:.1} s after start");
    assert!(in_minute as f64 >= 0.9 * 60.0, "A at {in_minute} of 60 rpm");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_models_outage_opens_its_own_breaker_and_the_others_go_on() {
    let mut m = mock();
    m.models.insert(
        A.into(),
        MockModel {
            mode: Some(MockMode::Fail),
            ..Default::default()
        },
    );
    let env = TestEnv::new(m).await;
    env.enqueue_lines("a", &lines(150, "a", A)).await;
    env.enqueue_lines("b", &lines(300, "b", B)).await;
    let _workers = WorkerProcess::start_many(&env, 3, &[("SHEEPDOG_CONCURRENCY", "8".into())]);
    let state = env.mock.state.clone();
    let outage_from = wait_for(Duration::from_secs(30), "A's first failure", || {
        let s = state.clone();
        async move { s.calls().iter().find(|c| c.model == A).map(|c| c.arrived_ms) }
    })
    .await;
    // B goes on at full speed meanwhile: done well within the outage.
    let b = env.wait_batch("b", Duration::from_secs(15)).await;
    let b_done_in = now_ms() - outage_from;
    assert_eq!((b.succeeded, b.failed), (300, 0));
    // A's upstream fails for 15 s in all, then recovers.
    let left = (outage_from + 15_000.0 - now_ms()).max(0.0);
    tokio::time::sleep(Duration::from_millis(left as u64)).await;
    let outage_to = now_ms();
    env.mock.state.update(|c| {
        c.models.remove(A);
    });
    let a_calls_in_outage = of_model(&env.mock.state.calls(), A)
        .iter()
        .filter(|c| c.arrived_ms <= outage_to)
        .count();
    let breakers: Vec<(String, i32)> = sqlx::query_as("SELECT scope, trips FROM sheepdog.breakers ORDER BY scope")
        .fetch_all(&env.pool)
        .await
        .unwrap();
    let a = env.wait_batch("a", Duration::from_secs(120)).await;
    println!(
        "{A} failing for 15 s, {B} healthy, 3 workers at concurrency 8: all 300 of {B} done {:.1} s into \
         the outage; {a_calls_in_outage} calls of {A} during it; breakers tripped: {breakers:?}; then {} of 150 {A} jobs \
         succeeded, {} failed",
        b_done_in / 1000.0,
        a.succeeded,
        a.failed
    );
    assert!(
        b_done_in <= 10_000.0,
        "B done {:.1} s into the outage",
        b_done_in / 1000.0
    );
    assert!(
        a_calls_in_outage <= 60,
        "{a_calls_in_outage} calls of A during its outage"
    );
    assert!(
        breakers.iter().any(|(s, t)| s == A && *t > 0),
        "A's own breaker tripped"
    );
    assert!(
        breakers.iter().all(|(s, t)| s != "*" || *t == 0),
        "the account's breaker stayed closed"
    );
    assert_eq!((a.succeeded, a.failed), (150, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_batch_shares_a_limit_with_a_large_one_instead_of_waiting_for_it() {
    let env = TestEnv::new(mock()).await;
    let _workers = WorkerProcess::start_many(&env, 3, &[("SHEEPDOG_RPM", "600".into())]);
    env.enqueue_lines("large", &lines(3000, "l", B)).await;
    let state = env.mock.state.clone();
    wait_for(Duration::from_secs(30), "the large batch to be under way", || {
        let s = state.clone();
        async move { (s.call_count() >= 50).then_some(()) }
    })
    .await;
    let t = Instant::now();
    env.enqueue_lines("small", &lines(50, "s", B)).await;
    let s = env.wait_batch("small", Duration::from_secs(40)).await;
    let took = t.elapsed().as_secs_f64();
    let large_done = env
        .count("SELECT count(*) FROM sheepdog.job_results WHERE batch_id = 'large' AND status = 'succeeded'")
        .await;
    println!(
        "SHEEPDOG_RPM=600, a 3000-job batch then a 50-job one: the 50 finished {took:.1} s after they were \
         enqueued ({large_done} of the large batch done by then)"
    );
    assert_eq!((s.succeeded, s.failed), (50, 0));
    assert!(took <= 20.0, "{took:.1} s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_high_priority_batch_goes_before_a_low_one_that_came_first() {
    let env = TestEnv::new(mock()).await;
    let _workers = WorkerProcess::start_many(&env, 3, &[("SHEEPDOG_RPM", "300".into())]);
    let write = |name: &str, lines: &[Value]| {
        let path = std::env::temp_dir().join(format!("{}-{name}.jsonl", env.name));
        std::fs::write(&path, lines.iter().map(|l| format!("{l}\n")).collect::<String>()).unwrap();
        path.display().to_string()
    };
    let low = write("low", &lines(1000, "low", B));
    let high = write("high", &lines(40, "high", B));
    let out = env
        .cli(&["enqueue", &low, "--batch", "low", "--priority", "low", "--quiet"])
        .await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = env
        .cli(&["enqueue", &high, "--batch", "high", "--priority", "high", "--quiet"])
        .await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    env.wait_batch("high", Duration::from_secs(60)).await;
    let state = env.pool.clone();
    wait_for(Duration::from_secs(60), "60 low jobs done", || {
        let pool = state.clone();
        async move {
            let n: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM sheepdog.job_results WHERE batch_id = 'low' AND finished_at IS NOT NULL",
            )
            .fetch_one(&pool)
            .await
            .unwrap();
            (n >= 60).then_some(())
        }
    })
    .await;
    let highs = finish_times(&env, "high").await;
    let lows = finish_times(&env, "low").await;
    let last_high = highs.last().copied().unwrap();
    let lows_before = lows.iter().filter(|t| **t < last_high).count();
    println!(
        "SHEEPDOG_RPM=300, 1000 low-priority jobs then 40 high: all 40 high done when {lows_before} low ones were"
    );
    assert_eq!(highs.len(), 40);
    assert!(
        lows[59] > last_high,
        "the 60th low job finished after the last high one"
    );
    let _ = std::fs::remove_file(low);
    let _ = std::fs::remove_file(high);
}
