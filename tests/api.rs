//! The OpenAI Batch API (contract §10) as producers use it: `sheepdog api` and `sheepdog worker`
//! run as processes with env settings and defaults, and the official `openai` Python package
//! (from the venv `scripts/services` fills from PyPI) drives the API with
//! `_strict_response_validation=True` (tests/api/scenarios.py). What the SDK sees is checked
//! there; what happened behind it (the ledger, the mock upstream's own record of calls, the
//! process's memory) here. Every wait is bounded; every process is killed when dropped.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{mock_latency as mock, wait_for, TestEnv, WorkerProcess};
use rust_decimal::Decimal;
use secrecy::ExposeSecret;
use serde_json::Value;
use sheepdog::upstream::mock::MockConfig;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// A `sheepdog api` process on a port of its own; killed (SIGKILL) when dropped.
struct Api {
    child: tokio::process::Child,
    base: String,
}

impl Api {
    async fn start(env: &TestEnv) -> Api {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_sheepdog"));
        cmd.arg("api")
            .env("DATABASE_URL", env.db_url.expose_secret())
            .env("AMQP_URL", env.amqp_url.expose_secret())
            .env("SHEEPDOG_API_ADDR", "127.0.0.1:0")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let mut child = cmd.spawn().expect("api process");
        let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
        let line = tokio::time::timeout(Duration::from_secs(20), out.next_line())
            .await
            .expect("the api says where it listens within 20 s")
            .unwrap()
            .expect("a line");
        let base = line
            .strip_prefix("api on ")
            .expect("api on http://…/")
            .trim_end_matches('/')
            .to_string();
        Api { child, base }
    }

    fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    /// A figure of /proc/PID/status, in kB (VmRSS, VmHWM).
    fn mem_kb(&self, field: &str) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        s.lines()
            .find_map(|l| l.strip_prefix(&format!("{field}:")))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap()
    }

    async fn kill9(&mut self) {
        self.child.start_kill().expect("kill");
        let _ = self.child.wait().await;
    }
}

/// Runs a scenario of tests/api/scenarios.py; its last line of stdout, as JSON.
async fn scenario(name: &str, api: &Api, vars: &[(&str, String)], timeout: Duration) -> Value {
    let dir = std::env::temp_dir().join(format!("sheepdog-api-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut cmd = tokio::process::Command::new(common::venv_python("openai"));
    cmd.arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/api/scenarios.py"))
        .arg(name)
        .env("SD_BASE", format!("{}/v1", api.base))
        .env("SD_WORKDIR", &dir)
        .kill_on_drop(true);
    for (k, v) in vars {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(timeout, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("scenario {name} did not end within {timeout:?}"))
        .expect("python runs");
    let _ = std::fs::remove_dir_all(&dir);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "scenario {name} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.lines().last().expect("a result line")).expect("JSON")
}

/// `sheepdog keys create NAME [args]`: the key, the last line of its output.
async fn new_key(env: &TestEnv, name: &str, args: &[&str]) -> String {
    let mut all = vec!["keys", "create", name];
    all.extend_from_slice(args);
    let out = env.cli(&all).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let key = String::from_utf8_lossy(&out.stdout).lines().last().unwrap().to_string();
    assert!(key.starts_with("sd-"), "{key}");
    key
}

/// The mock's calls whose message starts with `prefix`.
fn calls_of(env: &TestEnv, prefix: &str) -> Vec<sheepdog::upstream::mock::CallRecord> {
    env.mock
        .state
        .calls()
        .into_iter()
        .filter(|c| c.content.starts_with(prefix))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_sdk_runs_batches_with_openai_objects_errors_and_keys() {
    let env = TestEnv::new(MockConfig::default()).await;
    let _worker = WorkerProcess::start(&env, &[]);
    let api = Api::start(&env).await;
    let (k1, k2, k3) = (
        new_key(&env, "team-a", &[]).await,
        new_key(&env, "team-b", &[]).await,
        new_key(&env, "team-c", &[]).await,
    );
    let keys = vec![("SD_KEY", k1.clone()), ("SD_KEY2", k2), ("SD_KEY3", k3)];
    let r = scenario("flow", &api, &keys, Duration::from_secs(120)).await;
    let batch = r["batch"].as_str().unwrap();

    // The API batch is the same batch everywhere: `batch show`, the §4 views, `export`.
    let out = env.cli(&["batch", "show", batch, "--json"]).await;
    let shown: Value = serde_json::from_slice(&out.stdout).expect("batch show --json");
    assert_eq!(
        (shown["status"].as_str(), shown["priority"].as_str()),
        (Some("completed"), Some("high"))
    );
    let summary: (String, i64, Option<Decimal>) =
        sqlx::query_as("SELECT status, total, max_cost_usd FROM sheepdog.batch_summary WHERE batch_id = $1")
            .bind(batch)
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(summary, ("completed".into(), 20, Some(Decimal::from(5))));
    let failed: String = sqlx::query_scalar("SELECT status FROM sheepdog.batch_summary WHERE batch_id = $1")
        .bind(r["failed"].as_str().unwrap())
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(failed, "failed", "a failed API batch is `failed` in batch_summary too");
    // Nothing of the invalid file was called; nothing of it is a job.
    assert!(calls_of(&env, "invalid job").is_empty());
    assert_eq!(
        env.count(&format!(
            "SELECT count(*) FROM sheepdog.jobs WHERE batch_id = '{}'",
            r["failed"].as_str().unwrap()
        ))
        .await,
        0
    );
    // The key never appears in the API's log, the database or the CLI's output.
    let hashed: i64 = sqlx::query_scalar("SELECT count(*) FROM sheepdog.api_keys WHERE key_hash = sha256($1::bytea)")
        .bind(k1.as_bytes())
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(hashed, 1, "stored as its SHA-256");
    let listed = env.cli(&["keys", "list"]).await;
    assert!(!String::from_utf8_lossy(&listed.stdout).contains(&k1[10..]));

    // A key works until it is revoked, and is refused from that moment.
    scenario("key_works", &api, &keys, Duration::from_secs(30)).await;
    let out = env.cli(&["keys", "revoke", "team-c"]).await;
    assert!(out.status.success());
    scenario("key_revoked", &api, &keys, Duration::from_secs(30)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_cancelled_through_the_api_starts_no_call_two_seconds_after_cancel_returned() {
    let env = TestEnv::new(mock(200, 400)).await;
    let _workers = WorkerProcess::start_many(&env, 2, &[]);
    let api = Api::start(&env).await;
    let key = new_key(&env, "canceller", &[]).await;
    let r = scenario("cancel", &api, &[("SD_KEY", key)], Duration::from_secs(150)).await;
    let returned = r["cancel_returned_ms"].as_f64().unwrap();
    let calls = calls_of(&env, "cancel job");
    let late: Vec<f64> = calls
        .iter()
        .map(|c| c.arrived_ms)
        .filter(|t| *t > returned + 2000.0)
        .collect();
    assert!(
        late.is_empty(),
        "{} calls arrived more than 2 s after cancel returned",
        late.len()
    );
    assert_eq!(
        r["succeeded"].as_i64().unwrap(),
        calls.iter().filter(|c| c.status == 200).count() as i64
    );
    eprintln!(
        "cancel: {} calls before, none after cancel returned + 2 s; {} answered lines in the output file, {} in the error file",
        calls.len(),
        r["succeeded"],
        r["ended_otherwise"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_50000_line_file_is_in_progress_within_60_s_and_the_api_does_not_grow_with_it() {
    let env = TestEnv::new(MockConfig::default()).await;
    let api = Api::start(&env).await;
    let key = new_key(&env, "bulk", &[]).await;
    // A file a tenth the size first: whatever the API keeps for any upload (buffers, the
    // allocator's pages, pooled connections) is in its peak after it.
    let small = scenario(
        "large",
        &api,
        &[
            ("SD_KEY", key.clone()),
            ("SD_LINES", "5000".into()),
            ("SD_PAD", "2900".into()),
        ],
        Duration::from_secs(240),
    )
    .await;
    let small_bytes = small["bytes"].as_u64().unwrap();
    let rss_before = api.mem_kb("VmHWM");
    let r = scenario(
        "large",
        &api,
        &[("SD_KEY", key), ("SD_LINES", "50000".into()), ("SD_PAD", "2900".into())],
        Duration::from_secs(240),
    )
    .await;
    let hwm = api.mem_kb("VmHWM");
    let bytes = r["bytes"].as_u64().unwrap();
    eprintln!(
        "50,000 lines, {:.1} MB: uploaded in {} s, in_progress {} s after the upload began; \
         API process peak (VmHWM) {} MB after a 5,000-line file, {} MB after this one",
        bytes as f64 / 1e6,
        r["upload_s"],
        r["in_progress_s"],
        rss_before / 1024,
        hwm / 1024
    );
    assert!(r["in_progress_s"].as_f64().unwrap() <= 60.0);
    let size: i64 = sqlx::query_scalar("SELECT size FROM sheepdog.batches WHERE batch_id = $1")
        .bind(r["batch"].as_str().unwrap())
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(size, 50_000);
    // The file is streamed through (chunks of 1 MiB, 500 lines per round of confirms), never
    // held: ten times the file grows the peak by far less than the difference in size.
    assert!(
        (hwm.saturating_sub(rss_before)) * 1024 < (bytes - small_bytes) / 4,
        "the API's peak grew by {} kB from a {small_bytes}-byte file to a {bytes}-byte one",
        hwm - rss_before
    );
}

/// Starts an upload by hand and stops halfway: the API has stored some chunks.
async fn half_upload(api: &Api, key: &str) -> tokio::net::TcpStream {
    let addr = api.base.trim_start_matches("http://").to_string();
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let boundary = "sheepdogboundary";
    let head = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n--{boundary}\r\n\
         Content-Disposition: form-data; name=\"file\"; filename=\"half.jsonl\"\r\nContent-Type: application/jsonl\r\n\r\n"
    );
    let line = format!(
        "{}\n",
        serde_json::json!({"custom_id": "h", "method": "POST", "url": "/v1/chat/completions",
                           "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "half job"}]}})
    );
    s.write_all(
        format!(
            "POST /v1/files HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\n\
             Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: 100000000\r\n\r\n{head}"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let block = line.repeat((1 << 20) / line.len() + 1);
    for _ in 0..4 {
        s.write_all(block.as_bytes()).await.unwrap();
    }
    s.flush().await.unwrap();
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_upload_and_mid_create_leaves_no_half_batch_and_a_retried_create_makes_no_second() {
    let env = TestEnv::new(MockConfig::default()).await;
    let _worker = WorkerProcess::start(&env, &[]);
    let mut api = Api::start(&env).await;
    let key = new_key(&env, "crashy", &[]).await;

    // Mid-upload: chunks stored, the file not finished; then kill -9.
    let _conn = half_upload(&api, &key).await;
    wait_for(Duration::from_secs(20), "chunks of the upload stored", || async {
        (env.count("SELECT count(*) FROM sheepdog.api_file_chunks").await >= 2).then_some(())
    })
    .await;
    api.kill9().await;
    assert_eq!(
        env.count("SELECT count(*) FROM sheepdog.api_files WHERE state = 'processed'")
            .await,
        0,
        "a killed upload is no file"
    );

    // Mid-create: the batch is validating and partly published when the API dies.
    let mut api = Api::start(&env).await;
    let vars = |extra: Vec<(&'static str, String)>| {
        let mut v = vec![("SD_KEY", key.clone())];
        v.extend(extra);
        v
    };
    let lines = 10_000;
    let up = scenario(
        "upload_only",
        &api,
        &vars(vec![("SD_LINES", lines.to_string())]),
        Duration::from_secs(60),
    )
    .await;
    let file = up["file"].as_str().unwrap().to_string();
    let created = scenario(
        "create_only",
        &api,
        &vars(vec![("SD_FILE", file.clone())]),
        Duration::from_secs(30),
    )
    .await;
    let batch = created["batch"].as_str().unwrap().to_string();
    assert_eq!(created["status"], "validating");
    let t = Instant::now();
    let seen = wait_for(Duration::from_secs(30), "the batch partly published", || async {
        let (size, control): (i64, String) =
            sqlx::query_as("SELECT size, control FROM sheepdog.batches WHERE batch_id = $1")
                .bind(&batch)
                .fetch_one(&env.pool)
                .await
                .unwrap();
        (size > 0 || control != "validating").then_some((size, control))
    })
    .await;
    api.kill9().await;
    assert_eq!(
        seen.1, "validating",
        "killed before every line was published ({} registered)",
        seen.0
    );
    let (size, control): (i64, String) =
        sqlx::query_as("SELECT size, control FROM sheepdog.batches WHERE batch_id = $1")
            .bind(&batch)
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert!(control == "validating" && size < lines, "{size} {control}");
    eprintln!(
        "kill -9 of the API while it published (seen {:?} after create returned): {size} of {lines} lines registered, batch still validating",
        t.elapsed()
    );
    // The worker has stored every job that reached it; dispatch grants none of them.
    wait_for(
        Duration::from_secs(30),
        "the worker to store what was published",
        || async { (env.queue_depth("sheepdog.jobs").await == 0).then_some(()) },
    )
    .await;
    assert!(
        calls_of(&env, "kill job").is_empty(),
        "no job of a half batch is called"
    );

    // The SDK retries the create against a new API process: the same batch, and it completes.
    let api = Api::start(&env).await;
    let again = scenario(
        "create_only",
        &api,
        &vars(vec![("SD_FILE", file)]),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(again["batch"].as_str(), Some(batch.as_str()), "no second batch");
    let done = scenario(
        "finish",
        &api,
        &vars(vec![("SD_BATCH", batch.clone())]),
        Duration::from_secs(150),
    )
    .await;
    assert_eq!(
        (done["completed"].as_i64(), done["total"].as_i64()),
        (Some(lines), Some(lines))
    );
    let a = env.audit(&batch, lines).await;
    assert_eq!(a.called_twice, 0, "{a:?}");
    let before: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM sheepdog.calls c JOIN sheepdog.api_batches a ON a.id = c.batch_id
          WHERE c.batch_id = $1 AND c.started_at < a.in_progress_at",
    )
    .bind(&batch)
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(
        before, 0,
        "no call started before every line was confirmed and the batch activated"
    );
    assert_eq!(env.count("SELECT count(*) FROM sheepdog.api_batches").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keys_batches_together_never_spend_past_the_keys_cap() {
    let env = TestEnv::new(MockConfig::default()).await;
    let _worker = WorkerProcess::start(&env, &[]);
    let api = Api::start(&env).await;
    let cap = Decimal::new(3, 4); // 0.0003 USD: room for some of the 60 jobs' worst cases
    let capped = new_key(&env, "capped", &["--max-cost-usd", "0.0003", "--period", "day"]).await;
    let free = new_key(&env, "free", &[]).await;
    let r = scenario(
        "capped",
        &api,
        &[("SD_KEY", capped), ("SD_KEY2", free)],
        Duration::from_secs(90),
    )
    .await;
    // The other key's batch completed meanwhile (the scenario waited for it). The capped key's
    // batches stop once the next job's worst case no longer fits: wait for that moment.
    let worst: Decimal =
        sqlx::query_scalar("SELECT max(reserve_cost_usd) FROM sheepdog.jobs WHERE batch_id LIKE 'batch_%'")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    let (spent, reserved) = wait_for(Duration::from_secs(60), "the key's cap used up", || async {
        let row: Option<(Decimal, Decimal)> =
            sqlx::query_as("SELECT spent, reserved FROM sheepdog.budget WHERE scope = 'key:capped'")
                .fetch_optional(&env.pool)
                .await
                .unwrap();
        row.filter(|(s, r)| r.is_zero() && *s + worst > cap)
    })
    .await;
    assert!(spent + reserved <= cap, "{spent} + {reserved} > {cap}");
    let ids: Vec<String> = r["capped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let ledger: Decimal =
        sqlx::query_scalar("SELECT coalesce(sum(cost_usd), 0) FROM sheepdog.llm_calls WHERE batch_id = ANY($1)")
            .bind(&ids)
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert!(ledger <= cap, "the key's batches spent {ledger} > {cap}");
    let waiting = env
        .count(&format!(
            "SELECT count(*) FROM sheepdog.jobs WHERE batch_id IN ('{}', '{}') AND status = 'queued'",
            ids[0], ids[1]
        ))
        .await;
    let failed = env
        .count(&format!(
            "SELECT count(*) FROM sheepdog.jobs WHERE batch_id IN ('{}', '{}') AND status = 'failed'",
            ids[0], ids[1]
        ))
        .await;
    assert!(
        waiting > 0 && failed == 0,
        "the rest wait, none fails: {waiting} waiting, {failed} failed"
    );
    eprintln!("key cap {cap} USD: its two batches spent {ledger} USD by the ledger; {waiting} jobs wait");
}
