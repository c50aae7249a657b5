//! The whole path of a job against the real Postgres and RabbitMQ, with the mock
//! upstream on a real socket.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::{job_line, wait_for, TestEnv};
use rust_decimal::Decimal;
use serde_json::{json, Value};
use sheepdog::prices::{PriceTable, Usage};
use sheepdog::upstream::mock::{MockConfig, MockMode};

const MODELS: &[&str] = &[
    "gpt-4.1",
    "gpt-4o",
    "claude-sonnet-4.5",
    "gemini-2.5-flash",
    "deepseek-v3.2",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_goes_through_with_one_result_per_job_and_exact_cost() {
    let env = TestEnv::new(MockConfig {
        cached_percent: 40,
        latency_ms_max: 5,
        ..Default::default()
    })
    .await;
    let lines: Vec<Value> = (0..300)
        .map(|i| {
            let text = format!("Question {i}: {}", "why is the sky blue? ".repeat(i % 7 + 1));
            job_line(&format!("row-{i}"), MODELS[i % MODELS.len()], &text)
        })
        .collect();
    let report = env.enqueue_lines("b1", &lines).await;
    assert_eq!((report.published, report.new_jobs), (300, 300));
    assert!(report.refused.is_empty() && report.unconfirmed.is_empty());

    let w1 = env.spawn_worker("w1").await;
    let w2 = env.spawn_worker("w2").await;
    let status = env.wait_batch("b1", Duration::from_secs(60)).await;
    assert_eq!((status.total, status.succeeded, status.failed), (300, 300, 0));

    // Exactly one result row and one upstream call per job.
    assert_eq!(
        env.count("SELECT count(*) FROM sheepdog.job_results WHERE batch_id = 'b1'")
            .await,
        300
    );
    assert_eq!(
        env.count("SELECT count(*) FROM sheepdog.llm_calls WHERE batch_id = 'b1'")
            .await,
        300
    );
    let calls = env.mock.state.calls();
    assert_eq!(calls.len(), 300, "the upstream saw one call per job");

    // The stored cost equals the cost computed from the mock's own usage, exactly.
    let prices = PriceTable::built_in();
    let by_request: HashMap<&str, &sheepdog::upstream::mock::CallRecord> =
        calls.iter().map(|c| (c.request_id.as_str(), c)).collect();
    let rows: Vec<(String, String, Decimal, Option<String>, i64, i64)> = sqlx::query_as(
        "SELECT custom_id, model, cost_usd, upstream_request_id, prompt_tokens, completion_tokens
           FROM sheepdog.llm_calls WHERE batch_id = 'b1'",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    let mut total = Decimal::ZERO;
    for (custom_id, model, cost, request_id, prompt, completion) in &rows {
        let rec = by_request[request_id.as_deref().expect("request id recorded")];
        assert_eq!(&rec.model, model);
        assert_eq!(
            (*prompt as u64, *completion as u64),
            (rec.prompt_tokens, rec.completion_tokens)
        );
        let usage = Usage {
            prompt_tokens: rec.prompt_tokens,
            completion_tokens: rec.completion_tokens,
            cached_tokens: rec.cached_tokens,
            cache_write_tokens: rec.cache_write_tokens,
            reasoning_tokens: rec.reasoning_tokens,
        };
        let expected = prices.get(model).unwrap().cost(&usage);
        assert_eq!(*cost, expected, "cost of {custom_id}");
        assert!(rec.cached_tokens > 0, "the cache price is exercised");
        total += expected;
    }
    let stored_total: Decimal =
        sqlx::query_scalar("SELECT sum(cost_usd) FROM sheepdog.job_results WHERE batch_id = 'b1'")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(stored_total, total);
    let summary: (i64, i64, Decimal) =
        sqlx::query_as("SELECT total, succeeded, cost_usd FROM sheepdog.batch_summary WHERE batch_id = 'b1'")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(summary, (300, 300, total));
    let daily: Decimal = sqlx::query_scalar("SELECT sum(cost_usd) FROM sheepdog.cost_daily WHERE batch_id = 'b1'")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(daily, total);
    // Metadata is stored with the job, never sent upstream.
    let meta: Value = sqlx::query_scalar("SELECT metadata FROM sheepdog.job_results WHERE custom_id = 'row-7'")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(meta, json!({"n": "row-7"}));
    // The API key went upstream as a bearer token.
    assert!(calls.iter().all(|c| c.authorized));

    w1.stop().await;
    w2.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_job_published_again_gives_one_result_and_one_call() {
    let env = TestEnv::new(MockConfig::default()).await;
    let line = job_line("dup", "gpt-4o", "hello").to_string();
    env.publish(line.as_bytes()).await;
    env.publish(line.as_bytes()).await;
    let w = env.spawn_worker("w").await;
    let m = w.metrics.clone();
    wait_for(Duration::from_secs(30), "the second copy to be recognised", || {
        let m = m.clone();
        async move { (m.jobs_duplicate.load(std::sync::atomic::Ordering::Relaxed) >= 1).then_some(()) }
    })
    .await;
    // Once more after the result is stored.
    env.publish(line.as_bytes()).await;
    wait_for(Duration::from_secs(30), "the third copy to be recognised", || {
        let m = m.clone();
        async move { (m.jobs_duplicate.load(std::sync::atomic::Ordering::Relaxed) >= 2).then_some(()) }
    })
    .await;
    assert_eq!(env.mock.state.call_count(), 1, "one upstream call");
    assert_eq!(env.count("SELECT count(*) FROM sheepdog.llm_calls").await, 1);
    assert_eq!(
        env.count("SELECT count(*) FROM sheepdog.job_results WHERE status = 'succeeded'")
            .await,
        1
    );
    assert_eq!(env.queue_depth("sheepdog.jobs").await, 0);
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_dies_after_storing_a_job_before_its_ack_causes_no_second_job_or_call() {
    let env = TestEnv::new(MockConfig::default()).await;
    env.publish(job_line("crash-1", "gpt-4.1", "hi").to_string().as_bytes())
        .await;
    // A real worker process that exits (like kill -9) right after the job is stored, before
    // the delivery's ack.
    let status = tokio::process::Command::new(env!("CARGO_BIN_EXE_sheepdog"))
        .arg("worker")
        .env("DATABASE_URL", secrecy::ExposeSecret::expose_secret(&env.db_url))
        .env("AMQP_URL", secrecy::ExposeSecret::expose_secret(&env.amqp_url))
        .env("HOLYSHEEP_BASE_URL", env.mock.base_url())
        .env("SHEEPDOG_METRICS_ADDR", "off")
        .env("SHEEPDOG_FAULT", "exit-after-admit")
        .kill_on_drop(true)
        .status()
        .await
        .unwrap();
    assert_eq!(status.code(), Some(137));
    assert_eq!(
        env.count("SELECT count(*) FROM sheepdog.job_results WHERE status = 'queued'")
            .await,
        1
    );
    // The broker redelivers the unacked message to the next worker, which finds the job
    // already stored and acks the copy; the job is called once.
    let w = env.spawn_worker("w").await;
    let m = w.metrics.clone();
    wait_for(Duration::from_secs(30), "the redelivery to be recognised", || {
        let m = m.clone();
        async move { (m.jobs_duplicate.load(std::sync::atomic::Ordering::Relaxed) >= 1).then_some(()) }
    })
    .await;
    env.wait_batch("default", Duration::from_secs(30)).await;
    assert_eq!(env.mock.state.call_count(), 1);
    assert_eq!(env.count("SELECT count(*) FROM sheepdog.llm_calls").await, 1);
    assert_eq!(env.queue_depth("sheepdog.jobs").await, 0);
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_call_leaves_an_unknown_ledger_row_charged_at_its_reservation() {
    // The upstream hangs, so the first worker dies holding the call.
    let env = TestEnv::new(MockConfig {
        mode: MockMode::Hang,
        ..Default::default()
    })
    .await;
    env.publish(job_line("mid-call", "gpt-4o", "hi").to_string().as_bytes())
        .await;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_sheepdog"))
        .arg("worker")
        .env("DATABASE_URL", secrecy::ExposeSecret::expose_secret(&env.db_url))
        .env("AMQP_URL", secrecy::ExposeSecret::expose_secret(&env.amqp_url))
        .env("HOLYSHEEP_BASE_URL", env.mock.base_url())
        .env("SHEEPDOG_METRICS_ADDR", "off")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let state = env.mock.state.clone();
    wait_for(Duration::from_secs(30), "the call to reach the upstream", || {
        let s = state.clone();
        async move { (s.call_count() == 1).then_some(()) }
    })
    .await;
    child.kill().await.unwrap(); // SIGKILL
    assert_eq!(
        env.count("SELECT count(*) FROM sheepdog.llm_calls WHERE outcome = 'pending'")
            .await,
        1
    );

    env.mock.state.update(|c| c.mode = MockMode::Ok);
    let w = env.spawn_worker("w").await;
    env.wait_batch("default", Duration::from_secs(60)).await;
    let rows: Vec<(i32, String, Decimal)> =
        sqlx::query_as("SELECT attempt, outcome, cost_usd FROM sheepdog.llm_calls ORDER BY attempt")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(rows[0].1, "unknown");
    assert_eq!(rows[1].1, "ok");
    let reserved: Decimal = sqlx::query_scalar("SELECT reserved_cost_usd FROM sheepdog.calls WHERE attempt = 1")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert!(reserved > Decimal::ZERO);
    assert_eq!(rows[0].2, reserved, "the unknown call is charged at its reservation");
    let job_cost: Decimal = sqlx::query_scalar("SELECT cost_usd FROM sheepdog.job_results")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(job_cost, rows[0].2 + rows[1].2, "the job's cost covers every call");
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_round_trips_to_openai_batch_output() {
    let env = TestEnv::new(MockConfig::default()).await;
    let mut lines: Vec<Value> = (0..40)
        .map(|i| job_line(&format!("e-{i:02}"), "gpt-4o-mini", &format!("q{i}")))
        .collect();
    lines.push(job_line("e-bad", "gpt-4o-mini", "please fail [mock:400]"));
    env.enqueue_lines("exp", &lines).await;
    let w = env.spawn_worker("w").await;
    env.wait_batch("exp", Duration::from_secs(60)).await;
    w.stop().await;

    let out = std::env::temp_dir().join(format!("{}-out.jsonl", env.name));
    let (n, _) = sheepdog::commands::status::export(&env.pool, "exp", &out, None)
        .await
        .unwrap();
    assert_eq!(n, 41);
    let text = std::fs::read_to_string(&out).unwrap();
    let _ = std::fs::remove_file(&out);
    let mut ids = HashSet::new();
    let responses: HashMap<String, Value> =
        sqlx::query_as::<_, (String, sqlx::types::Json<Value>)>("SELECT custom_id, response FROM sheepdog.job_results")
            .fetch_all(&env.pool)
            .await
            .unwrap()
            .into_iter()
            .map(|(k, v)| (k, v.0))
            .collect();
    for line in text.lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        let id = v["custom_id"].as_str().unwrap().to_string();
        assert!(v["id"].as_str().unwrap().starts_with("batch_req_"));
        assert_eq!(v["response"]["body"], responses[&id], "{id}");
        if id == "e-bad" {
            assert_eq!(v["response"]["status_code"], 400);
            assert!(v["error"]["message"].as_str().unwrap().contains("400"));
        } else {
            assert_eq!(v["response"]["status_code"], 200);
            assert!(v["response"]["request_id"].as_str().unwrap().starts_with("req_"));
            assert_eq!(v["error"], Value::Null);
            assert!(v["response"]["body"]["choices"][0]["message"]["content"].is_string());
        }
        assert!(ids.insert(id));
    }
    let expected: HashSet<String> = lines
        .iter()
        .map(|l| l["custom_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, expected);
    // The 400 failed only its own job, with the upstream's error, after one call.
    assert_eq!(
        env.count("SELECT count(*) FROM sheepdog.job_results WHERE status = 'failed'")
            .await,
        1
    );
    assert_eq!(
        env.count("SELECT attempts::bigint FROM sheepdog.job_results WHERE custom_id = 'e-bad'")
            .await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_messages_are_dead_lettered_with_their_reason_while_good_jobs_go_on() {
    let env = TestEnv::new(MockConfig::default()).await;
    let big = json!({"custom_id": "big", "batch_id": "bad", "body": {"model": "gpt-4o", "messages": [{"role": "user", "content": "x".repeat(70_000)}]}}).to_string();
    let bad: Vec<(String, &str, Option<&str>)> = vec![
        ("this is not json".into(), "not valid JSON", None),
        ("[1,2,3]".into(), "JSON object", None),
        (json!({"batch_id": "bad", "body": {}}).to_string(), "custom_id is required", None),
        (json!({"custom_id": "", "body": {}}).to_string(), "must not be empty", None),
        (json!({"custom_id": "no-body", "batch_id": "bad"}).to_string(), "body is required", Some("no-body")),
        (json!({"custom_id": "bad-url", "batch_id": "bad", "url": "/v1/embeddings", "body": {"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}}).to_string(), "url must be", Some("bad-url")),
        (json!({"custom_id": "no-msgs", "batch_id": "bad", "body": {"model": "gpt-4o"}}).to_string(), "messages is required", Some("no-msgs")),
        (json!({"custom_id": "neg", "batch_id": "bad", "body": {"model": "gpt-4o", "max_tokens": -5, "messages": [{"role": "user", "content": "x"}]}}).to_string(), "max_tokens", Some("neg")),
        (json!({"custom_id": "no-price", "batch_id": "bad", "body": {"model": "mystery-model-9", "messages": [{"role": "user", "content": "x"}]}}).to_string(), "has no price", Some("no-price")),
        (big, "larger than the maximum", None),
        (String::from_utf8_lossy(&[0xff, 0xfe, b'{']).into_owned(), "not valid JSON", None),
    ];
    let mut good = Vec::new();
    for (i, (body, _, _)) in bad.iter().enumerate() {
        env.publish(body.as_bytes()).await;
        let g = json!({"custom_id": format!("good-{i}"), "batch_id": "good", "body": {"model": "gpt-4o", "messages": [{"role": "user", "content": "fine"}]}});
        env.publish(g.to_string().as_bytes()).await;
        good.push(g);
    }
    let mut args = env.worker_args();
    args.message.max_message_bytes = 64 * 1024;
    let w = env.spawn_worker_with("w", args).await;
    let m = w.metrics.clone();
    let n_bad = bad.len() as u64;
    wait_for(Duration::from_secs(30), "every bad message to be dead-lettered", || {
        let m = m.clone();
        async move { (m.jobs_dead_lettered.load(std::sync::atomic::Ordering::Relaxed) >= n_bad).then_some(()) }
    })
    .await;
    let status = env.wait_batch("good", Duration::from_secs(30)).await;
    assert_eq!(status.succeeded, good.len() as i64, "good jobs went on");
    w.stop().await;

    let dead = env.drain_dead().await;
    assert_eq!(dead.len(), bad.len());
    for (body, reason_part, id) in &bad {
        let (_, reason) = dead
            .iter()
            .find(|(b, _)| b == body.as_bytes())
            .unwrap_or_else(|| panic!("{reason_part}: body unchanged in sheepdog.dead"));
        let reason = reason.as_deref().expect("x-sheepdog-error header");
        assert!(
            reason.contains(reason_part),
            "{reason:?} should mention {reason_part:?}"
        );
        if let Some(id) = id {
            let (status, error): (String, sqlx::types::Json<Value>) = sqlx::query_as(
                "SELECT status, error FROM sheepdog.job_results WHERE batch_id = 'bad' AND custom_id = $1",
            )
            .bind(id)
            .fetch_one(&env.pool)
            .await
            .unwrap();
            assert_eq!(status, "failed");
            assert!(error.0["message"].as_str().unwrap().contains(reason_part));
        }
    }
    assert_eq!(
        env.mock.state.call_count(),
        good.len(),
        "no bad message reached the upstream"
    );
    assert_eq!(env.queue_depth("sheepdog.jobs").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_reports_bad_lines_and_duplicates_by_line_number() {
    let env = TestEnv::new(MockConfig::default()).await;
    let lines = [
        job_line("a", "gpt-4o", "x").to_string(),
        "{not json".to_string(),
        job_line("b", "gpt-4o", "x").to_string(),
        String::new(),
        job_line("a", "gpt-4o", "again").to_string(),
        json!({"custom_id": "c", "body": {"model": "gpt-4o"}}).to_string(),
        json!({"custom_id": "d", "batch_id": "other", "body": {"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}}).to_string(),
    ];
    let path = std::env::temp_dir().join(format!("{}-in.jsonl", env.name));
    std::fs::write(&path, lines.join("\n")).unwrap();
    let opts = sheepdog::commands::enqueue::EnqueueOptions::batch("q");
    let r = sheepdog::commands::enqueue::enqueue_file(&env.pool, &env.amqp_url, &path, &opts)
        .await
        .unwrap();
    let _ = std::fs::remove_file(&path);
    assert_eq!(r.published, 2);
    let refused: Vec<(u64, &str)> = r.refused.iter().map(|x| (x.line, x.reason.as_str())).collect();
    assert_eq!(
        refused.iter().map(|x| x.0).collect::<Vec<_>>(),
        vec![2, 5, 6, 7],
        "{refused:?}"
    );
    assert!(refused[0].1.contains("not valid JSON"));
    assert!(refused[1].1.contains("appears earlier"));
    assert!(refused[2].1.contains("messages"));
    assert!(refused[3].1.contains("differs from --batch"));
    assert_eq!(env.queue_depth("sheepdog.jobs").await, 2);
    let size: i64 = sqlx::query_scalar("SELECT size FROM sheepdog.batches WHERE batch_id = 'q'")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(size, 2);
    assert_eq!(
        env.count("SELECT count(*) FROM sheepdog.job_results WHERE status = 'queued'")
            .await,
        2
    );
}

/// Connections propose 16 KiB frames (lapin keeps 32 frames per direction per connection, so
/// RabbitMQ's 128 KiB made 8 MiB per connection), a URL's own `frame_max` wins, and a job much
/// larger than a frame still goes through a `sheepdog worker` whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_use_small_frames_and_a_job_larger_than_many_frames_goes_through_whole() {
    use secrecy::{ExposeSecret, SecretString};
    let env = TestEnv::new(MockConfig::default()).await;
    assert_eq!(env.amqp.configuration().frame_max(), sheepdog::amqp::FRAME_MAX);
    let own = SecretString::from(format!("{}?frame_max=65536", env.amqp_url.expose_secret()));
    let conn = sheepdog::amqp::connect(&own, "test-own-frame").await.expect("connect");
    assert_eq!(conn.configuration().frame_max(), 65536, "the URL's frame_max is kept");
    let _ = conn.close(0, "done".into()).await;

    let _worker = common::WorkerProcess::start(&env, &[]);
    // About 300 KiB of prompt: some 19 frames of 16 KiB each way.
    let content: String = (0..30_000).map(|i| format!("w{:07} ", i)).collect();
    let r = env.enqueue_lines("big", &[job_line("big-1", "gpt-4o", &content)]).await;
    assert_eq!(r.published, 1, "{r:?}");
    let s = env.wait_batch("big", Duration::from_secs(60)).await;
    assert_eq!(s.succeeded, 1, "{s:?}");
    let calls = env.mock.state.calls();
    assert_eq!(calls.len(), 1);
    let body = json!({"messages": [{"role": "user", "content": content}]});
    let expected = sheepdog::tokens::prompt_tokens(body.as_object().unwrap());
    assert_eq!(calls[0].prompt_tokens, expected, "the upstream saw the whole prompt");
}

/// A round whose plan cannot be claimed (a planned job's backlog row gone, as when its batch's
/// window ends between the round's read and its claim) is rolled back, and the calls it was
/// settling went with it: they must still be recorded, or they stay `pending` and the replica,
/// which counts them as settled, finds them as lost grants and makes them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_whose_claim_fails_still_records_the_calls_it_settled() {
    use sheepdog::job::JobId;
    use sheepdog::store::intake::{admit, Admission};
    use sheepdog::store::settle::{CallOutcome, JobFate, Settlement};

    let env = TestEnv::new(MockConfig::default()).await;
    let pool = &env.pool;
    let batch = "claim-fails";
    let admissions = ["first", "second"]
        .iter()
        .map(|c| Admission {
            id: JobId {
                batch_id: batch.into(),
                custom_id: (*c).into(),
            },
            model: "gpt-4o-mini".into(),
            metadata: None,
            request: br#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#.to_vec(),
            reserve_tokens: 100,
            reserve_cost_usd: Decimal::new(1, 4),
        })
        .collect();
    admit(pool, admissions).await.expect("admit");
    let lease = Duration::from_secs(30);
    // The first job goes out on a call of replica 1.
    let first = sheepdog::store::dispatch::settle_and_dispatch(pool, &[], 1, 1, lease, false)
        .await
        .expect("first round");
    assert_eq!(first.jobs.len(), 1, "one job granted");
    let call = &first.jobs[0];
    assert_eq!(call.id.custom_id, "first");
    // The second job's backlog row will be gone when the next round claims it.
    for statement in [
        "CREATE FUNCTION sheepdog.test_keep_backlog() RETURNS trigger LANGUAGE plpgsql AS
             $$ BEGIN RETURN NULL; END $$",
        "CREATE TRIGGER keep BEFORE DELETE ON sheepdog.backlog
             FOR EACH ROW EXECUTE FUNCTION sheepdog.test_keep_backlog()",
    ] {
        sqlx::query(statement).execute(pool).await.expect("trigger");
    }
    let answered = Settlement {
        id: call.id.clone(),
        model: call.model.clone(),
        call_id: call.call_id,
        attempt: call.attempt,
        shared: call.shared,
        outcome: CallOutcome::Ok,
        status_code: Some(200),
        prompt_tokens: Some(10),
        completion_tokens: Some(5),
        cached_tokens: Some(0),
        cache_write_tokens: None,
        reasoning_tokens: None,
        cost_usd: Decimal::new(45, 7),
        error: None,
        upstream_request_id: Some("req-1".into()),
        latency_ms: Some(12),
        response: Some(r#"{"choices":[]}"#.into()),
        fate: JobFate::Succeeded,
    };
    let round =
        sheepdog::store::dispatch::settle_and_dispatch(pool, std::slice::from_ref(&answered), 1, 1, lease, false)
            .await
            .expect("second round");
    assert!(round.jobs.is_empty(), "the second job could not be claimed");
    let (outcome, status): (String, String) = sqlx::query_as(
        "SELECT c.outcome, r.status FROM sheepdog.calls c
           JOIN sheepdog.job_results r ON r.batch_id = c.batch_id AND r.custom_id = c.custom_id
          WHERE c.batch_id = $1 AND c.custom_id = 'first'",
    )
    .bind(batch)
    .fetch_one(pool)
    .await
    .expect("the call's row");
    assert_eq!(
        (outcome.as_str(), status.as_str()),
        ("ok", "succeeded"),
        "the settled call is recorded"
    );
    let lost = sheepdog::store::dispatch::lost_grants(pool, 1, &[])
        .await
        .expect("lost grants");
    assert!(lost.is_empty(), "no call is left to be made again: {:?}", lost.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_sent_back_to_the_queue_is_not_acked_with_the_deliveries_after_it() {
    // Intake acks many deliveries in one ack (`multiple`: every delivery of the channel up to
    // a tag). A delivery it could not store goes back to the queue after a pause; the acks of
    // the deliveries after it, sent meanwhile, must not take it along.
    let env = TestEnv::new(MockConfig::default()).await;
    sqlx::raw_sql(
        "CREATE TABLE public.held (on_ boolean NOT NULL);
         INSERT INTO public.held VALUES (true);
         CREATE FUNCTION public.hold_poison() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF NEW.custom_id = 'poison' AND (SELECT on_ FROM public.held) THEN
                 RAISE EXCEPTION 'held by the test';
             END IF;
             RETURN NEW;
         END $$;
         CREATE TRIGGER hold_poison BEFORE INSERT ON sheepdog.backlog
             FOR EACH ROW EXECUTE FUNCTION public.hold_poison();",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    env.publish(job_line("poison", "gpt-4.1", "first").to_string().as_bytes())
        .await;
    for i in 0..199 {
        env.publish(job_line(&format!("after-{i}"), "gpt-4.1", "hi").to_string().as_bytes())
            .await;
    }
    let w = env.spawn_worker("w").await;
    wait_for(
        Duration::from_secs(60),
        "the deliveries after it to be stored",
        || async {
            let n = env
                .count("SELECT count(*) FROM sheepdog.jobs WHERE custom_id LIKE 'after-%'")
                .await;
            (n == 199).then_some(())
        },
    )
    .await;
    assert_eq!(
        env.count("SELECT count(*) FROM sheepdog.jobs WHERE custom_id = 'poison'")
            .await,
        0,
        "held back so far"
    );
    sqlx::query("UPDATE public.held SET on_ = false")
        .execute(&env.pool)
        .await
        .unwrap();
    wait_for(
        Duration::from_secs(60),
        "the held delivery to come back and its job to end",
        || async {
            let n = env
                .count("SELECT count(*) FROM sheepdog.job_results WHERE status = 'succeeded'")
                .await;
            (n == 200).then_some(())
        },
    )
    .await;
    assert_eq!(env.mock.state.call_count(), 200);
    assert_eq!(env.queue_depth("sheepdog.jobs").await, 0);
    w.stop().await;
}
