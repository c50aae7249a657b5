//! What ops and analysts rely on: metrics and health, reports that match the
//! ledger, dead-letter replay, and the read-only analyst role.

mod common;

use std::time::Duration;

use common::{job_line, small_lines, wait_for, TestEnv, WorkerProcess};
use rust_decimal::Decimal;
use secrecy::ExposeSecret;
use serde_json::Value;
use sheepdog::commands::report::{render, Format};
use sheepdog::upstream::mock::{MockConfig, MockMode};

async fn get(url: &str) -> (u16, String) {
    let r = reqwest::get(url).await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_during_a_run_and_readyz_turns_unready_when_the_account_breaker_opens() {
    let env = TestEnv::new(MockConfig {
        latency_ms_min: 20,
        latency_ms_max: 40,
        ..Default::default()
    })
    .await;
    let mut args = env.worker_args();
    args.concurrency = 4;
    let w = env.spawn_worker_with("m", args).await;
    let (_server, addr) = sheepdog::metrics::serve("127.0.0.1:0", w.metrics.clone())
        .await
        .unwrap();
    let base = format!("http://{addr}");
    assert_eq!(get(&format!("{base}/healthz")).await.0, 200);
    let m = w.metrics.clone();
    wait_for(Duration::from_secs(10), "the replica to connect", || {
        let m = m.clone();
        async move { m.ready().is_ok().then_some(()) }
    })
    .await;
    assert_eq!(get(&format!("{base}/readyz")).await.0, 200);

    let lines: Vec<Value> = (0..200)
        .map(|i| job_line(&format!("m-{i}"), "gpt-4o", &format!("q{i}")))
        .collect();
    env.enqueue_lines("metrics", &lines).await;
    let first = wait_for(Duration::from_secs(20), "jobs to start finishing", || {
        let b = base.clone();
        async move {
            let (_, text) = get(&format!("{b}/metrics")).await;
            let n = metric(&text, "sheepdog_jobs_total{outcome=\"succeeded\"}");
            (n > 0.0).then_some(text)
        }
    })
    .await;
    env.wait_batch("metrics", Duration::from_secs(60)).await;
    let (_, last) = get(&format!("{base}/metrics")).await;
    let ok = |t: &str| metric(t, "sheepdog_jobs_total{outcome=\"succeeded\"}");
    assert!(ok(&last) > ok(&first), "the counter moved");
    assert_eq!(ok(&last), 200.0);
    assert_eq!(metric(&last, "sheepdog_upstream_calls_total{outcome=\"ok\"}"), 200.0);
    assert_eq!(metric(&last, "sheepdog_upstream_latency_seconds_count"), 200.0);
    let cost = metric(&last, "sheepdog_cost_usd_total{model=\"gpt-4o\"}");
    let ledger: Decimal = sqlx::query_scalar("SELECT sum(cost_usd) FROM sheepdog.llm_calls")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(
        Decimal::from_str_exact(&cost.to_string()).unwrap().round_dp(9),
        ledger.round_dp(9)
    );
    assert_eq!(
        metric(&last, "sheepdog_breaker_state{scope=\"*\",state=\"closed\"}"),
        1.0
    );

    // The upstream refuses the account: the account's breaker opens and the replica says it
    // is not ready.
    env.mock.state.update(|c| c.mode = MockMode::Unauthorized);
    let more: Vec<Value> = (0..20).map(|i| job_line(&format!("f-{i}"), "gpt-4o", "x")).collect();
    env.enqueue_lines("failing", &more).await;
    let b = base.clone();
    let body = wait_for(Duration::from_secs(20), "/readyz to turn unready", || {
        let b = b.clone();
        async move {
            let (code, body) = get(&format!("{b}/readyz")).await;
            (code == 503).then_some(body)
        }
    })
    .await;
    assert!(body.contains("circuit breaker open"), "{body}");
    assert!(body.contains("account refused"), "{body}");
    let b = base.clone();
    let text = wait_for(Duration::from_secs(10), "/metrics to show the open breaker", || {
        let b = b.clone();
        async move {
            let (_, text) = get(&format!("{b}/metrics")).await;
            text.contains("sheepdog_breaker_state{scope=\"*\",state=\"open\"} 1")
                .then_some(text)
        }
    })
    .await;
    assert_eq!(metric(&text, "sheepdog_paused"), 1.0);
    assert_eq!(
        env.count("SELECT count(*) FROM sheepdog.job_results WHERE status = 'failed'")
            .await,
        0
    );
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_turns_unready_when_the_budget_is_spent() {
    let env = TestEnv::new(MockConfig::default()).await;
    let limits = sheepdog::config::LimitArgs {
        budget_usd: Some("0.001".parse().unwrap()),
        budget_period: Some(sheepdog::limits::BudgetPeriod::Day),
        ..Default::default()
    };
    let w = env.spawn_worker_limited("b", env.worker_args(), &limits).await;
    let (_server, addr) = sheepdog::metrics::serve("127.0.0.1:0", w.metrics.clone())
        .await
        .unwrap();
    let lines: Vec<Value> = (0..40)
        .map(|i| job_line(&format!("b-{i}"), "gpt-4o", &format!("q{i}")))
        .collect();
    env.enqueue_lines("budget", &lines).await;
    let body = wait_for(Duration::from_secs(20), "/readyz to say the budget is spent", || {
        let url = format!("http://{addr}/readyz");
        async move {
            let (code, body) = get(&url).await;
            (code == 503 && body.contains("budget")).then_some(body)
        }
    })
    .await;
    assert!(body.contains("budget exhausted until"), "{body}");
    let (_, text) = get(&format!("http://{addr}/metrics")).await;
    assert_eq!(metric(&text, "sheepdog_paused"), 1.0);
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_sums_match_the_ledger_to_the_micro_dollar() {
    let env = TestEnv::new(MockConfig {
        cached_percent: 30,
        ..Default::default()
    })
    .await;
    let models = ["gpt-4.1", "deepseek-v3.2", "claude-sonnet-4.5"];
    let a: Vec<Value> = (0..60)
        .map(|i| job_line(&format!("a-{i}"), models[i % 3], &format!("report {i}")))
        .collect();
    let b: Vec<Value> = (0..30)
        .map(|i| job_line(&format!("b-{i}"), models[i % 2], &format!("other {i}")))
        .collect();
    env.enqueue_lines("rep-a", &a).await;
    env.enqueue_lines("rep-b", &b).await;
    let w = env.spawn_worker("r").await;
    env.wait_batch("rep-a", Duration::from_secs(60)).await;
    env.wait_batch("rep-b", Duration::from_secs(60)).await;
    w.stop().await;

    let ledger: Decimal = sqlx::query_scalar("SELECT sum(cost_usd) FROM sheepdog.llm_calls")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    let rows = sheepdog::store::report::cost_report(&env.pool, None, None, None)
        .await
        .unwrap();
    assert_eq!(rows.iter().map(|r| r.cost_usd).sum::<Decimal>(), ledger);
    assert_eq!(rows.len(), 5, "one row per day, model and batch");
    // JSON and CSV carry the same exact figures.
    let json: Value = serde_json::from_str(&render(&rows, Format::Json)).unwrap();
    assert_eq!(
        json["total"]["cost_usd"].as_str().unwrap().parse::<Decimal>().unwrap(),
        ledger
    );
    let csv = render(&rows, Format::Csv);
    let column = csv
        .lines()
        .next()
        .unwrap()
        .split(',')
        .position(|c| c == "cost_usd")
        .expect("a cost_usd column");
    let csv_total: Decimal = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').nth(column).unwrap().parse::<Decimal>().unwrap())
        .sum();
    assert_eq!(csv_total, ledger);
    let one = sheepdog::store::report::cost_report(&env.pool, None, None, Some("rep-b"))
        .await
        .unwrap();
    let b_ledger: Decimal = sqlx::query_scalar("SELECT sum(cost_usd) FROM sheepdog.llm_calls WHERE batch_id = 'rep-b'")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(one.iter().map(|r| r.cost_usd).sum::<Decimal>(), b_ledger);
    assert!(render(&rows, Format::Table).contains("total"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_brings_a_dead_lettered_job_to_succeeded_after_its_cause_is_fixed() {
    let env = TestEnv::new(MockConfig::default()).await;
    // A model the price table does not know yet: the job fails before any call.
    env.enqueue_lines(
        "late",
        &[
            job_line("new-1", "brand-new-model", "hi"),
            job_line("ok-1", "gpt-4o", "hi"),
        ],
    )
    .await;
    let w = env.spawn_worker("before").await;
    env.wait_batch("late", Duration::from_secs(30)).await;
    w.stop().await;
    assert_eq!(
        env.count("SELECT count(*) FROM sheepdog.job_results WHERE status = 'failed'")
            .await,
        1
    );
    let dead = sheepdog::commands::dead::list(&env.amqp_url, Some("late"), 10)
        .await
        .unwrap();
    assert_eq!(dead.len(), 1);
    assert!(dead[0].reason.as_deref().unwrap().contains("has no price"));
    let e = &env;
    wait_for(
        Duration::from_secs(10),
        "list to leave the dead letter in place",
        || async move { (e.queue_depth("sheepdog.dead").await == 1).then_some(()) },
    )
    .await;

    // The fix: a price file that knows the model.
    let prices = std::env::temp_dir().join(format!("{}-prices.json", env.name));
    let mut table: Value = serde_json::from_str(sheepdog::prices::BUILT_IN).unwrap();
    table["brand-new-model"] = serde_json::json!({"input_cost_per_token": 1e-06, "output_cost_per_token": 2e-06});
    std::fs::write(&prices, table.to_string()).unwrap();
    let mut args = env.worker_args();
    args.pricing.prices = Some(prices.clone());
    let w = env.spawn_worker_with("after", args).await;
    let r = sheepdog::commands::dead::replay(&env.pool, &env.amqp_url, Some("late"), usize::MAX)
        .await
        .unwrap();
    assert_eq!(r.replayed, 1);
    let s = env.wait_batch("late", Duration::from_secs(30)).await;
    assert_eq!((s.succeeded, s.failed), (2, 0));
    assert_eq!(env.queue_depth("sheepdog.dead").await, 0);
    w.stop().await;
    let _ = std::fs::remove_file(prices);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_analyst_role_sees_the_views_and_not_the_tables() {
    let env = TestEnv::new(MockConfig::default()).await;
    let mut tx = env.pool.begin().await.unwrap();
    sqlx::query("SET LOCAL ROLE sheepdog_analyst")
        .execute(&mut *tx)
        .await
        .unwrap();
    for view in ["job_results", "llm_calls", "cost_daily", "batch_summary", "limit_usage"] {
        sqlx::query(&format!("SELECT * FROM sheepdog.{view} LIMIT 1"))
            .fetch_all(&mut *tx)
            .await
            .unwrap_or_else(|e| panic!("{view}: {e}"));
    }
    let denied = sqlx::query("SELECT * FROM sheepdog.jobs LIMIT 1")
        .fetch_all(&mut *tx)
        .await
        .unwrap_err();
    assert!(denied.to_string().contains("permission denied"), "{denied}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_churn_tables_do_not_keep_their_dead_rows() {
    // Each job leaves a dead row in `backlog` (and its index), and outbox rows go too; a dispatch walks the
    // dead entries at the head of the backlog's index until a vacuum. Autovacuum is off on this
    // machine (and looks once a minute where it is on): the workers must keep them small.
    let env = TestEnv::new(MockConfig::default()).await;
    let _w = WorkerProcess::start(&env, &[]);
    env.enqueue_lines("churn", &small_lines(6_000, "churn")).await;
    env.wait_batch("churn", Duration::from_secs(120)).await;
    let dead = wait_for(Duration::from_secs(30), "the churn tables vacuumed", || async {
        let rows: Vec<(String, i64, i64)> = sqlx::query_as(
            "SELECT relname::text, n_dead_tup, vacuum_count + autovacuum_count FROM pg_stat_user_tables
              WHERE schemaname = 'sheepdog' AND relname IN ('backlog', 'outbox') ORDER BY relname",
        )
        .fetch_all(&env.pool)
        .await
        .unwrap();
        let backlog_vacuumed = rows.iter().any(|r| r.0 == "backlog" && r.2 > 0);
        (backlog_vacuumed && rows.iter().all(|r| r.1 < 2_000)).then_some(rows)
    })
    .await;
    eprintln!("after 6,000 jobs (dead rows, vacuums): {dead:?}");
}

/// A publisher claims outbox rows, publishes them and deletes them, holding no transaction in
/// between. One that died mid-publish leaves its rows claimed: they go out once its replica is
/// gone (taken over), and not while it is still registered (it may be publishing them now).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_rows_claimed_by_a_replica_that_is_gone_are_published_and_a_live_claim_is_left_alone() {
    let env = TestEnv::new(MockConfig::default()).await;
    // A replica that was registered and last seen 10 s from now: it is taken over 5 s after that
    // (SHEEPDOG_TAKEOVER_SECONDS), as a process killed mid-publish would be.
    let busy: i64 = sqlx::query_scalar(
        "INSERT INTO sheepdog.replicas (name, last_seen) VALUES ('mid-publish', now() + interval '10 seconds') RETURNING id",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    for (body, by) in [("gone", busy + 1_000_000), ("held", busy)] {
        sqlx::query(
            "INSERT INTO sheepdog.outbox (routing_key, headers, body, claimed_by, claimed_at)
             VALUES ('sheepdog.dead', jsonb_build_object('x-sheepdog-error', $1::text), $2, $3, now())",
        )
        .bind(body)
        .bind(body.as_bytes())
        .bind(by)
        .execute(&env.pool)
        .await
        .unwrap();
    }
    let _w = WorkerProcess::start(&env, &[]);
    let seen = std::sync::Mutex::new(Vec::<String>::new());
    dead_letters_until(&env, &seen, "gone", Duration::from_secs(30)).await;
    let registered = format!("SELECT count(*) FROM sheepdog.replicas WHERE id = {busy}");
    assert_eq!(
        *seen.lock().unwrap(),
        ["gone"],
        "only the row of the replica that is gone went out"
    );
    assert_eq!(
        env.count(&registered).await,
        1,
        "the claiming replica was still registered"
    );
    assert_eq!(
        env.count("SELECT count(*) FROM sheepdog.outbox WHERE body = 'held'::bytea")
            .await,
        1
    );
    // Taken over, the replica loses its claim: its row goes out too, and the outbox is empty.
    dead_letters_until(&env, &seen, "held", Duration::from_secs(60)).await;
    assert_eq!(*seen.lock().unwrap(), ["gone", "held"]);
    assert_eq!(env.count(&registered).await, 0);
    wait_for(Duration::from_secs(10), "an empty outbox", || async {
        (env.count("SELECT count(*) FROM sheepdog.outbox").await == 0).then_some(())
    })
    .await;
}

/// Takes the dead letters as they come into `seen` (their bodies), until one is `body`.
async fn dead_letters_until(env: &TestEnv, seen: &std::sync::Mutex<Vec<String>>, body: &str, timeout: Duration) {
    wait_for(timeout, &format!("the dead letter {body:?}"), || async {
        let got = env.drain_dead().await;
        let mut seen = seen.lock().unwrap();
        seen.extend(got.into_iter().map(|(b, _)| String::from_utf8(b).unwrap()));
        seen.iter().any(|b| b == body).then_some(())
    })
    .await;
}

/// Postgres refuses the worker's connections (here its role's `CONNECTION LIMIT`, as a full
/// `max_connections` would): at start the worker exits saying why; running, it says why in its
/// log and in `/readyz`, calls nothing while it holds no life line, and carries on by itself
/// once the database takes it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_postgres_refuses_says_why_in_its_log_and_readyz_and_recovers_by_itself() {
    let env = TestEnv::new(MockConfig::default()).await;
    let role = format!("{}_lim", env.name);
    // Roles outlive the test's database: dropped however the test ends (dropped before `env`).
    let _role = DropRole {
        db_url: env.db_url.expose_secret().to_string(),
        role: role.clone(),
    };
    for sql in [
        format!("CREATE ROLE {role} LOGIN CONNECTION LIMIT 0"),
        format!("GRANT ALL ON SCHEMA sheepdog TO {role}"),
        format!("GRANT ALL ON ALL TABLES IN SCHEMA sheepdog TO {role}"),
        format!("GRANT ALL ON ALL SEQUENCES IN SCHEMA sheepdog TO {role}"),
        format!("GRANT ALL ON ALL FUNCTIONS IN SCHEMA sheepdog TO {role}"),
    ] {
        sqlx::query(&sql).execute(&env.pool).await.unwrap();
    }
    let port = common::free_port();
    let log_path = std::env::temp_dir().join(format!("{role}.log"));
    let worker = || {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_sheepdog"))
            .arg("worker")
            .env("DATABASE_URL", format!("postgres://{role}@127.0.0.1:5432/{}", env.name))
            .env("AMQP_URL", env.amqp_url.expose_secret())
            .env("HOLYSHEEP_BASE_URL", env.mock.base_url())
            .env("SHEEPDOG_METRICS_ADDR", format!("127.0.0.1:{port}"))
            .env_remove("RUST_LOG")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log_path).unwrap())
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    };

    // Refused at start: it exits, and says why.
    let status = tokio::time::timeout(Duration::from_secs(60), worker().wait())
        .await
        .expect("a worker Postgres refuses exits")
        .unwrap();
    assert!(!status.success());
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        log.contains("too many connections for role"),
        "the log does not say why:\n{log}"
    );

    // Refused while running: Postgres cuts its connections and takes no new one.
    sqlx::query(&format!("ALTER ROLE {role} CONNECTION LIMIT -1"))
        .execute(&env.pool)
        .await
        .unwrap();
    let mut running = worker();
    let readyz = format!("http://127.0.0.1:{port}/readyz");
    let ready = |want: u16, says: &'static str| {
        let u = readyz.clone();
        async move {
            let r = reqwest::get(&u).await.ok()?;
            let code = r.status().as_u16();
            let body = r.text().await.ok()?;
            (code == want && body.contains(says)).then_some(body)
        }
    };
    wait_for(Duration::from_secs(60), "the worker to be ready", || ready(200, "")).await;
    sqlx::query(&format!("ALTER ROLE {role} CONNECTION LIMIT 0"))
        .execute(&env.pool)
        .await
        .unwrap();
    sqlx::query(&format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'"
    ))
    .execute(&env.pool)
    .await
    .unwrap();
    let body = wait_for(Duration::from_secs(60), "/readyz to say Postgres refuses", || {
        ready(503, "too many connections for role")
    })
    .await;
    assert!(body.contains("database"), "{body}");
    env.enqueue_lines("refused", &small_lines(20, "refused")).await;
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        log.contains("too many connections for role"),
        "the log does not say why:\n{log}"
    );

    // The operator lets it in again; nobody restarts the worker.
    assert_eq!(
        env.mock.state.call_count(),
        0,
        "a replica without its life line called the upstream"
    );
    sqlx::query(&format!("ALTER ROLE {role} CONNECTION LIMIT -1"))
        .execute(&env.pool)
        .await
        .unwrap();
    wait_for(Duration::from_secs(60), "/readyz to turn ready", || ready(200, "")).await;
    let status = env.wait_batch("refused", Duration::from_secs(60)).await;
    assert_eq!(status.succeeded, 20, "{status:?}");
    assert_eq!(env.mock.state.call_count(), 20, "each job called once");

    running.start_kill().unwrap();
    let _ = running.wait().await;
    let _ = std::fs::remove_file(&log_path);
}

/// Drops a test's role (and what it was granted) when the test ends, passed or failed.
struct DropRole {
    db_url: String,
    role: String,
}

impl Drop for DropRole {
    fn drop(&mut self) {
        let sql = format!("DROP OWNED BY {0}; DROP ROLE IF EXISTS {0}", self.role);
        let _ = std::process::Command::new("psql")
            .args(["-q", &self.db_url, "-c", &sql])
            .stdout(std::process::Stdio::null())
            .status();
    }
}

/// `sheepdog limits show | head -0`, `status | head`: a reader that quits early ends the command
/// as it ends other Unix tools, by SIGPIPE and silently, never with a panic on stderr.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_piped_into_a_reader_that_quits_ends_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let env = TestEnv::new(MockConfig::default()).await;
    let mut child = env
        .command(&["limits", "show"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("sheepdog runs");
    // The reader is gone before the first line is written.
    drop(child.stdout.take());
    let out = child.wait_with_output().await.expect("it ends");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "no panic: {stderr}");
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGPIPE),
        "ended by SIGPIPE: {:?} {stderr}",
        out.status
    );
}
