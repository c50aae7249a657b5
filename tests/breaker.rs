//! Circuit breakers shared by all replicas and classified retries, with three replicas and
//! the default breaker settings.

mod common;

use std::time::Duration;

use common::{job_line, wait_for, TestEnv};
use serde_json::Value;
use sheepdog::config::WorkerArgs;
use sheepdog::upstream::mock::{MockConfig, MockMode};

fn lines(n: usize, prefix: &str) -> Vec<Value> {
    (0..n)
        .map(|i| job_line(&format!("{prefix}-{i}"), "gpt-4o-mini", &format!("breaker test {i}")))
        .collect()
}

fn args(env: &TestEnv) -> WorkerArgs {
    let mut a = env.worker_args();
    a.concurrency = 8;
    a
}

async fn breaker_state(env: &TestEnv, scope: &str) -> (String, chrono::DateTime<chrono::Utc>, Option<String>) {
    sqlx::query_as("SELECT state, since, reason FROM sheepdog.breakers WHERE scope = $1")
        .bind(scope)
        .fetch_optional(&env.pool)
        .await
        .unwrap()
        .unwrap_or(("closed".into(), chrono::Utc::now(), None))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_model_opens_one_breaker_for_all_replicas_and_its_jobs_wait_instead_of_failing() {
    let env = TestEnv::new(MockConfig {
        mode: MockMode::Fail,
        latency_ms_min: 100,
        ..Default::default()
    })
    .await;
    env.enqueue_lines("storm", &lines(120, "s")).await;
    let a = args(&env);
    let ws = [
        env.spawn_worker_with("a", a.clone()).await,
        env.spawn_worker_with("b", a.clone()).await,
        env.spawn_worker_with("c", a).await,
    ];
    let pool = env.pool.clone();
    wait_for(Duration::from_secs(30), "the model's breaker to open", || {
        let pool = pool.clone();
        async move {
            let s: Option<String> =
                sqlx::query_scalar("SELECT state FROM sheepdog.breakers WHERE scope = 'gpt-4o-mini'")
                    .fetch_optional(&pool)
                    .await
                    .unwrap();
            (s.is_some_and(|s| s != "closed")).then_some(())
        }
    })
    .await;
    let (_, opened_at, reason) = breaker_state(&env, "gpt-4o-mini").await;
    assert!(reason.unwrap().contains("failed"), "the breaker says why");
    assert_eq!(
        breaker_state(&env, "*").await.0,
        "closed",
        "one model's failures leave the account's breaker closed"
    );
    // Every replica holds the model's jobs back.
    let metrics: Vec<_> = ws.iter().map(|w| w.metrics.clone()).collect();
    wait_for(Duration::from_secs(5), "every replica to hold the model back", || {
        let m = metrics.clone();
        async move {
            m.iter()
                .all(|m| m.health.lanes().iter().any(|b| b.scope == "gpt-4o-mini"))
                .then_some(())
        }
    })
    .await;
    // Let the upstream stay down through two probes (5 s, then 10 s later).
    let state = env.mock.state.clone();
    let opened_ms = opened_at.timestamp_millis() as f64;
    wait_for(Duration::from_secs(40), "two probes while it fails", || {
        let s = state.clone();
        async move { (s.calls().iter().filter(|c| c.arrived_ms > opened_ms + 150.0).count() >= 2).then_some(()) }
    })
    .await;
    let during = env.mock.state.calls();
    env.mock.state.update(|c| c.mode = MockMode::Ok);

    // Calls that were already in flight when it opened finish within the mock's 100 ms.
    let after_open: Vec<_> = during.iter().filter(|c| c.arrived_ms > opened_ms + 150.0).collect();
    let last_before = during
        .iter()
        .filter(|c| c.arrived_ms <= opened_ms + 150.0)
        .map(|c| c.arrived_ms)
        .fold(0.0, f64::max);
    println!(
        "failure window: {} upstream calls in all, {} before the breaker opened (+150 ms), {} probes after; \
         last non-probe call {:.0} ms after it opened",
        during.len(),
        during.len() - after_open.len(),
        after_open.len(),
        last_before - opened_ms
    );
    assert!(
        during.len() < 60,
        "few calls while failing, not hundreds: {}",
        during.len()
    );
    assert!(after_open.len() <= 6, "only probes while open: {}", after_open.len());
    assert!(
        after_open.iter().all(|c| c.concurrent == 1),
        "exactly one probe at a time"
    );

    let status = env.wait_batch("storm", Duration::from_secs(120)).await;
    assert_eq!(
        (status.succeeded, status.failed),
        (120, 0),
        "every job succeeded, none failed"
    );
    let max_attempts = env
        .count("SELECT max(attempts)::bigint FROM sheepdog.job_results")
        .await;
    assert!(
        max_attempts <= 4,
        "attempts did not pile up while the breaker was open: {max_attempts}"
    );
    assert_eq!(breaker_state(&env, "gpt-4o-mini").await.0, "closed");
    let calls = env.count("SELECT count(*) FROM sheepdog.llm_calls").await;
    assert_eq!(
        calls as usize,
        env.mock.state.call_count(),
        "every call the upstream saw is in the ledger"
    );
    for w in ws {
        w.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_401_pauses_every_replica_and_fails_nothing_until_a_probe_passes() {
    let env = TestEnv::new(MockConfig {
        mode: MockMode::Unauthorized,
        ..Default::default()
    })
    .await;
    env.enqueue_lines("auth", &lines(30, "k")).await;
    let a = args(&env);
    let ws = [
        env.spawn_worker_with("a", a.clone()).await,
        env.spawn_worker_with("b", a.clone()).await,
        env.spawn_worker_with("c", a).await,
    ];
    let metrics: Vec<_> = ws.iter().map(|w| w.metrics.clone()).collect();
    wait_for(
        Duration::from_secs(20),
        "every replica to pause on the refused key",
        || {
            let m = metrics.clone();
            async move {
                m.iter()
                    .all(|m| m.health.paused().is_some_and(|r| r.contains("account refused")))
                    .then_some(())
            }
        },
    )
    .await;
    assert_eq!(
        env.count("SELECT count(*) FROM sheepdog.job_results WHERE status = 'failed'")
            .await,
        0
    );
    let early = env.mock.state.call_count();
    assert!(early < 30, "replicas stopped calling: {early}");
    env.mock.state.update(|c| c.mode = MockMode::Ok);
    let status = env.wait_batch("auth", Duration::from_secs(60)).await;
    assert_eq!((status.succeeded, status.failed), (30, 0));
    // The batch can end on two replicas' calls while the third has not dispatched since the
    // probe passed: it learns the breaker closed at its next round (a quarter second apart).
    let metrics: Vec<_> = ws.iter().map(|w| w.metrics.clone()).collect();
    wait_for(Duration::from_secs(10), "every replica to resume", || {
        let m = metrics.clone();
        async move { m.iter().all(|m| m.health.paused().is_none()).then_some(()) }
    })
    .await;
    for w in ws {
        w.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_upstream_becomes_a_timeout_and_a_retry() {
    let env = TestEnv::new(MockConfig {
        mode: MockMode::Hang,
        ..Default::default()
    })
    .await;
    env.enqueue_lines("hang", &lines(1, "h")).await;
    let mut a = args(&env);
    a.concurrency = 1;
    let mut up = env.upstream_args();
    up.http_timeout_seconds = 1.0;
    // The point of this test is the timeout itself, so it is set short here.
    let w = sheepdog::commands::build_worker(
        &sheepdog::config::DbArgs::direct(env.db_url.clone()),
        &env.amqp_url,
        &up,
        &a,
        &Default::default(),
        "w".into(),
    )
    .await
    .unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(w.clone().run(shutdown.clone()));
    let state = env.mock.state.clone();
    wait_for(Duration::from_secs(10), "the first call", || {
        let s = state.clone();
        async move { (s.call_count() >= 1).then_some(()) }
    })
    .await;
    env.mock.state.update(|c| c.mode = MockMode::Ok);
    env.wait_batch("hang", Duration::from_secs(30)).await;
    let rows: Vec<(i32, String, Option<String>)> =
        sqlx::query_as("SELECT attempt, outcome, error FROM sheepdog.llm_calls ORDER BY attempt")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(rows[0].1, "unknown", "a timed-out call may have been billed");
    assert!(rows[0].2.as_deref().unwrap().contains("timed out"));
    assert_eq!(rows[1].1, "ok");
    shutdown.cancel();
    task.await.unwrap().unwrap();
}
