//! Batch control (contract §7) and the results stream (§8), as users run them: worker processes
//! with the defaults, the CLI run while a batch is half done, judged by what the mock upstream
//! recorded.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::scenario::now_ms;
use common::{mock_latency as mock, small_lines as lines};
use common::{wait_for, TestEnv, WorkerProcess};
use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use rust_decimal::Decimal;
use serde_json::Value;
use sheepdog::prices::{PriceTable, Usage};
use sheepdog::upstream::mock::CallRecord;

const MODEL: &str = "gpt-4o-mini";

/// The mock's calls for one batch (its jobs' texts start with the prefix).
fn calls_of(env: &TestEnv, prefix: &str) -> Vec<CallRecord> {
    let p = format!("{prefix} job ");
    env.mock
        .state
        .calls()
        .into_iter()
        .filter(|c| c.content.starts_with(&p))
        .collect()
}

async fn succeeded(env: &TestEnv, batch: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM sheepdog.job_results WHERE batch_id = $1 AND status = 'succeeded'")
        .bind(batch)
        .fetch_one(&env.pool)
        .await
        .unwrap()
}

async fn reach(env: &TestEnv, batch: &str, n: i64, timeout: Duration) {
    wait_for(timeout, &format!("{n} jobs of {batch} succeeded"), || async move {
        (succeeded(env, batch).await >= n).then_some(())
    })
    .await;
}

async fn count_status(env: &TestEnv, batch: &str, status: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM sheepdog.job_results WHERE batch_id = $1 AND status = $2")
        .bind(batch)
        .bind(status)
        .fetch_one(&env.pool)
        .await
        .unwrap()
}

/// What the mock billed, at the model's prices.
fn billed(calls: &[CallRecord]) -> Decimal {
    let prices = PriceTable::built_in();
    calls
        .iter()
        .filter(|c| c.status == 200)
        .map(|c| {
            prices.get(&c.model).unwrap().cost(&Usage {
                prompt_tokens: c.prompt_tokens,
                completion_tokens: c.completion_tokens,
                cached_tokens: c.cached_tokens,
                cache_write_tokens: c.cache_write_tokens,
                reasoning_tokens: c.reasoning_tokens,
            })
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_batch_starts_no_call_within_two_seconds_and_ends_cancelled() {
    let env = TestEnv::new(mock(200, 400)).await;
    env.enqueue_lines("big", &lines(2000, "big")).await;
    let _workers = WorkerProcess::start_many(&env, 3, &[]);
    reach(&env, "big", 100, Duration::from_secs(60)).await;
    let out = env.cli(&["batch", "cancel", "big"]).await;
    let returned = now_ms();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let s = env.wait_batch("big", Duration::from_secs(30)).await;
    let calls = calls_of(&env, "big");
    let late = calls.iter().filter(|c| c.arrived_ms > returned + 2000.0).count();
    let last = calls.iter().map(|c| c.arrived_ms).fold(0.0, f64::max) - returned;
    let ok_calls = calls.iter().filter(|c| c.status == 200).count() as i64;
    println!(
        "cancel after 100 of 2000 succeeded: last call reached the upstream {:.0} ms after the command returned; \
         {} succeeded, {} cancelled, {} failed; {} calls billed",
        last, s.succeeded, s.cancelled, s.failed, ok_calls
    );
    assert_eq!(late, 0, "{late} calls more than 2 s after cancel returned");
    assert_eq!(s.failed, 0);
    assert_eq!(s.succeeded + s.cancelled, 2000);
    assert_eq!(s.succeeded, ok_calls, "succeeded jobs = calls the upstream billed");
    assert_eq!(s.status, "cancelled");
    // Every billed call is in the ledger.
    let ids: HashSet<String> = sqlx::query_scalar(
        "SELECT upstream_request_id FROM sheepdog.llm_calls WHERE batch_id = 'big' AND upstream_request_id IS NOT NULL",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap()
    .into_iter()
    .collect();
    assert!(calls
        .iter()
        .filter(|c| c.status == 200)
        .all(|c| ids.contains(&c.request_id)));
    // Export: cancelled jobs carry no response and the batch_cancelled error.
    let out_file = std::env::temp_dir().join(format!("{}-big.jsonl", env.name));
    let errors = std::env::temp_dir().join(format!("{}-big-errors.jsonl", env.name));
    let o = env
        .cli(&[
            "export",
            "--batch",
            "big",
            "--out",
            out_file.to_str().unwrap(),
            "--errors",
            errors.to_str().unwrap(),
        ])
        .await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = std::fs::read_to_string(&errors).unwrap();
    let errs: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(
        errs.len() as i64,
        s.cancelled,
        "the error file holds every job that did not succeed"
    );
    for e in &errs {
        assert_eq!(e["response"], Value::Null);
        assert_eq!(e["error"]["code"], "batch_cancelled");
        assert!(e["error"]["message"].is_string());
    }
    assert_eq!(std::fs::read_to_string(&out_file).unwrap().lines().count(), 2000);
    // Cancelling twice is fine.
    assert!(env.cli(&["batch", "cancel", "big"]).await.status.success());
    let _ = std::fs::remove_file(out_file);
    let _ = std::fs::remove_file(errors);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_batch_waits_without_calls_or_attempts_while_another_goes_on() {
    let env = TestEnv::new(mock(50, 150)).await;
    env.enqueue_lines("p1", &lines(600, "p1")).await;
    env.enqueue_lines("p2", &lines(600, "p2")).await;
    let _workers = WorkerProcess::start_many(&env, 2, &[]);
    reach(&env, "p1", 50, Duration::from_secs(60)).await;
    let out = env.cli(&["batch", "pause", "p1"]).await;
    let paused_at = now_ms();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let p2_before = succeeded(&env, "p2").await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    let p1_calls = calls_of(&env, "p1").iter().filter(|c| c.arrived_ms > paused_at).count();
    let p2_during = succeeded(&env, "p2").await - p2_before;
    let status: String = sqlx::query_scalar("SELECT status FROM sheepdog.batch_summary WHERE batch_id = 'p1'")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    println!("pause after 50: {p1_calls} calls of the paused batch in the next 8 s; the other batch finished {p2_during} jobs meanwhile");
    assert_eq!(p1_calls, 0, "no call of the paused batch");
    assert!(p2_during > 0, "the other batch went on");
    assert_eq!(status, "paused");
    assert!(env.cli(&["batch", "resume", "p1"]).await.status.success());
    let s1 = env.wait_batch("p1", Duration::from_secs(60)).await;
    let s2 = env.wait_batch("p2", Duration::from_secs(60)).await;
    assert_eq!((s1.succeeded, s2.succeeded), (600, 600));
    let max_attempts: i32 = sqlx::query_scalar("SELECT max(attempts) FROM sheepdog.job_results WHERE batch_id = 'p1'")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(max_attempts, 1, "waiting paused used no attempt");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capped_batch_never_spends_past_its_cap_and_waits_while_others_finish() {
    let env = TestEnv::new(mock(50, 150)).await;
    let capped = lines(300, "cap");
    // 40 jobs' worst case: the largest worst case of the batch, 40 times.
    let prices = PriceTable::built_in();
    let worst = capped
        .iter()
        .map(|l| {
            let job = sheepdog::job::Job::from_value(l.clone()).unwrap();
            let request = job.upstream_request(4096, false);
            let prompt = sheepdog::tokens::prompt_reservation(MODEL, sheepdog::tokens::prompt_tokens(&request.body));
            prices.get(MODEL).unwrap().worst_case(prompt, 20)
        })
        .max()
        .unwrap();
    let cap = worst * Decimal::from(40);
    let write = |name: &str, lines: &[Value]| {
        let path = std::env::temp_dir().join(format!("{}-{name}.jsonl", env.name));
        std::fs::write(&path, lines.iter().map(|l| format!("{l}\n")).collect::<String>()).unwrap();
        path.display().to_string()
    };
    let f = write("cap", &capped);
    let out = env
        .cli(&[
            "enqueue",
            &f,
            "--batch",
            "cap",
            "--max-cost-usd",
            &cap.to_string(),
            "--quiet",
        ])
        .await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    env.enqueue_lines("free", &lines(300, "free")).await;
    let _workers = WorkerProcess::start_many(&env, 3, &[]);
    let free = env.wait_batch("free", Duration::from_secs(60)).await;
    // The capped batch: stopped by its cap, nothing in flight, nothing failed.
    let pool = env.pool.clone();
    wait_for(Duration::from_secs(30), "the capped batch to stop at its cap", || {
        let pool = pool.clone();
        async move {
            let stopped: bool = sqlx::query_scalar(
                "SELECT NOT EXISTS (SELECT 1 FROM sheepdog.llm_calls WHERE batch_id = 'cap' AND outcome = 'pending')
                    AND (SELECT count(*) FROM sheepdog.job_results WHERE batch_id = 'cap' AND status = 'succeeded') > 0",
            )
            .fetch_one(&pool)
            .await
            .unwrap();
            stopped.then_some(())
        }
    })
    .await;
    // Stable: another dispatch round changes nothing.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let bill = billed(&calls_of(&env, "cap"));
    let done = succeeded(&env, "cap").await;
    println!("cap of 40 jobs' worst case ({cap} USD) on 300 jobs: the upstream billed {bill} USD for {done} jobs; the uncapped batch finished ({} jobs)", free.succeeded);
    assert!(bill <= cap, "billed {bill} past the cap {cap}");
    assert!((40..300).contains(&done), "{done} done within the cap");
    assert_eq!(
        count_status(&env, "cap", "failed").await,
        0,
        "capped jobs wait, they do not fail"
    );
    assert_eq!(free.succeeded, 300);
    // Raising the cap lets them go on.
    assert!(env
        .cli(&["batch", "set", "cap", "--max-cost-usd", "1"])
        .await
        .status
        .success());
    let s = env.wait_batch("cap", Duration::from_secs(60)).await;
    assert_eq!((s.succeeded, s.failed), (300, 0));
    let _ = std::fs::remove_file(f);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_call_starts_after_a_batchs_deadline_and_the_rest_expire() {
    let env = TestEnv::new(mock(2000, 4000)).await;
    let path = std::env::temp_dir().join(format!("{}-slow.jsonl", env.name));
    std::fs::write(
        &path,
        lines(1000, "slow").iter().map(|l| format!("{l}\n")).collect::<String>(),
    )
    .unwrap();
    let _workers = WorkerProcess::start_many(&env, 3, &[]);
    let out = env
        .cli(&[
            "enqueue",
            path.to_str().unwrap(),
            "--batch",
            "slow",
            "--completion-window",
            "8s",
            "--quiet",
        ])
        .await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (_, expires): (chrono::DateTime<chrono::Utc>, Option<chrono::DateTime<chrono::Utc>>) =
        sqlx::query_as("SELECT created_at, expires_at FROM sheepdog.batches WHERE batch_id = 'slow'")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    let deadline = expires.expect("a deadline").timestamp_millis() as f64;
    let s = env.wait_batch("slow", Duration::from_secs(60)).await;
    let calls = calls_of(&env, "slow");
    let after = calls.iter().filter(|c| c.arrived_ms > deadline + 1000.0).count();
    let last = calls.iter().map(|c| c.arrived_ms).fold(0.0, f64::max) - deadline;
    println!(
        "a deadline of 8 s on 1000 jobs of 2-4 s: the last call started {:.0} ms after it; {} succeeded, {} expired, {} failed",
        last, s.succeeded, s.expired, s.failed
    );
    assert_eq!(after, 0, "{after} calls more than 1 s after the deadline");
    assert_eq!(s.failed, 0);
    assert!(s.expired > 0);
    assert_eq!(s.succeeded + s.expired, 1000);
    assert_eq!(s.status, "expired");
    let _ = std::fs::remove_file(path);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_results_stream_carries_every_job_then_the_batch_through_a_kill_9() {
    let env = TestEnv::new(mock(100, 300)).await;
    // A consumer bound to the results exchange for this batch, before anything is published.
    let ch = env.amqp.create_channel().await.unwrap();
    let q = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    ch.queue_bind(
        q.name().as_str().into(),
        sheepdog::amqp::RESULTS_EXCHANGE.into(),
        "stream".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let mut consumer = ch
        .basic_consume(
            q.name().as_str().into(),
            "test".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    env.enqueue_lines("stream", &lines(300, "st")).await;
    let mut workers = WorkerProcess::start_many(&env, 3, &[]);
    reach(&env, "stream", 60, Duration::from_secs(60)).await;
    workers[0].kill9().await;
    workers[0] = WorkerProcess::start(&env, &[]);
    let started = Instant::now();
    let mut seen: HashSet<String> = HashSet::new();
    let mut events = 0;
    let finished = loop {
        let d = tokio::time::timeout(Duration::from_secs(90), consumer.next())
            .await
            .expect("the stream goes on")
            .unwrap()
            .unwrap();
        let kind = sheepdog::amqp::header_str(&d.properties, sheepdog::amqp::EVENT_HEADER).unwrap();
        let body: Value = serde_json::from_slice(&d.data).unwrap();
        d.ack(BasicAckOptions::default()).await.unwrap();
        match kind.as_str() {
            "job.finished" => {
                events += 1;
                assert_eq!(body["batch_id"], "stream");
                assert_eq!(body["status"], "succeeded");
                assert!(body["id"].as_str().unwrap().starts_with("batch_req_"));
                seen.insert(body["custom_id"].as_str().unwrap().to_string());
            }
            "batch.finished" => break body,
            other => panic!("unexpected event {other}"),
        }
    };
    println!(
        "results stream through a kill -9: {} job.finished events for {} distinct jobs, then batch.finished \
         ({:.1} s after the kill): status {}, request_counts {}",
        events,
        seen.len(),
        started.elapsed().as_secs_f64(),
        finished["status"],
        finished["request_counts"]
    );
    assert_eq!(seen.len(), 300, "every job at least once before batch.finished");
    assert_eq!(finished["id"], "stream");
    assert_eq!(finished["status"], "completed");
    assert_eq!(finished["request_counts"]["completed"], 300);
}
