//! The fault suite: real faults against the real services, each run ending with
//! an audit from the views and the mock's own record (no job lost, one result
//! per job, every answered call in the ledger).
//!
//! These tests restart RabbitMQ and Postgres for the whole machine, so they run
//! one at a time (a lock below), and cargo runs this file's binary alone.

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use common::proxy::Proxy;
use common::{job_line, mock_latency, wait_for, TestEnv, WorkerProcess};
use secrecy::ExposeSecret;
use serde_json::Value;
use sheepdog::upstream::mock::MockConfig;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn lines(n: usize, prefix: &str) -> Vec<Value> {
    (0..n)
        .map(|i| job_line(&format!("{prefix}-{i:04}"), "gpt-4o-mini", &format!("fault test {i}")))
        .collect()
}

async fn done(env: &TestEnv, batch: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM sheepdog.job_results WHERE batch_id = $1 AND status IN ('succeeded', 'failed')",
    )
    .bind(batch)
    .fetch_one(&env.pool)
    .await
    .unwrap_or(0)
}

/// Waits until at least `n` jobs of `batch` have ended.
async fn reach(env: &TestEnv, batch: &str, n: i64, timeout: Duration) {
    wait_for(timeout, &format!("{n} jobs of {batch} done"), || async move {
        (done(env, batch).await >= n).then_some(())
    })
    .await;
}

/// Seconds until the batch makes progress again after a fault (ten more jobs
/// ended, or all `n` if fewer were left: a slow restart can outlast the batch).
async fn recovery(env: &TestEnv, batch: &str, n: i64) -> f64 {
    let start = Instant::now();
    let before = done(env, batch).await;
    reach(env, batch, (before + 10).min(n), Duration::from_secs(120)).await;
    start.elapsed().as_secs_f64()
}

fn sh(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn restart_broker() {
    sh("rabbitmqctl", &["stop_app"]);
    std::thread::sleep(Duration::from_secs(2));
    sh("rabbitmqctl", &["start_app"]);
    sh("rabbitmqctl", &["await_startup"]);
}

fn restart_postgres() {
    let version = std::fs::read_dir("/etc/postgresql")
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .max()
        .unwrap();
    sh(
        "pg_ctlcluster",
        &["--skip-systemctl-redirect", &version, "main", "restart"],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_through_kill_9_a_broker_restart_and_a_database_restart() {
    let _serial = SERIAL.lock().await;
    let env = TestEnv::new(MockConfig {
        latency_ms_min: 300,
        latency_ms_max: 600,
        ..Default::default()
    })
    .await;
    let n = 900;
    env.enqueue_lines("chaos", &lines(n, "c")).await;
    let extra = [("SHEEPDOG_CONCURRENCY", "8".to_string())];
    let mut workers: Vec<_> = (0..3).map(|_| WorkerProcess::start(&env, &extra)).collect();
    let started = Instant::now();

    reach(&env, "chaos", n as i64 / 4, Duration::from_secs(120)).await;
    workers[0].kill9().await; // mid-call
    workers[0] = WorkerProcess::start(&env, &extra);
    let after_kill = recovery(&env, "chaos", n as i64).await;

    reach(&env, "chaos", n as i64 / 2, Duration::from_secs(120)).await;
    restart_broker();
    let after_broker = recovery(&env, "chaos", n as i64).await;

    reach(&env, "chaos", 3 * n as i64 / 4, Duration::from_secs(120)).await;
    restart_postgres();
    let after_db = recovery(&env, "chaos", n as i64).await;

    env.wait_batch("chaos", Duration::from_secs(180)).await;
    let total = started.elapsed().as_secs_f64();
    for mut w in workers {
        w.kill9().await;
    }
    let a = env.audit("chaos", n as i64).await;
    println!(
        "chaos run: {n} jobs, 3 replicas, {total:.1} s; progress again {after_kill:.1} s after kill -9, \
         {after_broker:.1} s after the broker came back, {after_db:.1} s after the database restart; \
         {} upstream calls, {} ledger rows ({} unknown), {} jobs called more than once",
        a.mock_calls, a.ledger_rows, a.unknown_rows, a.called_twice
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cut_connections_to_rabbitmq_and_postgres_are_survived() {
    let _serial = SERIAL.lock().await;
    let env = TestEnv::new(mock_latency(100, 200)).await;
    let amqp = Proxy::start("127.0.0.1:5672".parse::<SocketAddr>().unwrap()).await;
    let pg = Proxy::start("127.0.0.1:5432".parse::<SocketAddr>().unwrap()).await;
    let (db_url, amqp_url) = (pg.carry(&env.db_url), amqp.carry(&env.amqp_url));
    let n = 400;
    env.enqueue_lines("cut", &lines(n, "x")).await;
    let mut args = env.worker_args();
    args.concurrency = 8;
    let mut handles = Vec::new();
    for i in 0..3 {
        let w = sheepdog::commands::build_worker(
            &sheepdog::config::DbArgs::direct(db_url.clone()),
            &amqp_url,
            &env.upstream_args(),
            &args,
            &Default::default(),
            format!("w{i}"),
        )
        .await
        .unwrap();
        let s = tokio_util::sync::CancellationToken::new();
        handles.push((s.clone(), tokio::spawn(w.run(s))));
    }
    reach(&env, "cut", n as i64 / 4, Duration::from_secs(60)).await;
    amqp.cut();
    reach(&env, "cut", n as i64 / 2, Duration::from_secs(60)).await;
    // A database outage: live connections cut, new ones refused for two seconds.
    pg.set_down(true);
    pg.cut();
    tokio::time::sleep(Duration::from_secs(2)).await;
    pg.set_down(false);
    reach(&env, "cut", 3 * n as i64 / 4, Duration::from_secs(60)).await;
    // Stalled bytes: the broker connection hangs for a while, then flows again.
    amqp.set_stall(true);
    tokio::time::sleep(Duration::from_secs(2)).await;
    amqp.set_stall(false);
    env.wait_batch("cut", Duration::from_secs(120)).await;
    for (s, h) in handles {
        s.cancel();
        h.await.unwrap().unwrap();
    }
    let a = env.audit("cut", n as i64).await;
    println!("cut run: {a:?}");
}

/// A round whose COMMIT reaches Postgres while its answer is lost with the connection: its
/// grants are the replica's in the ledger but in no task. The replica finds them and runs each
/// once, in slots of its own, however busy its slots are with new grants (once it waited for a
/// slot that only it could free, and its batch never ended).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grants_whose_commit_answer_was_lost_run_once_and_the_batch_ends() {
    let _serial = SERIAL.lock().await;
    let env = TestEnv::new(mock_latency(100, 200)).await;
    let pg = Proxy::start("127.0.0.1:5432".parse::<SocketAddr>().unwrap()).await;
    // The proxy reads the protocol to find the COMMITs: this worker talks to Postgres in plain text.
    let db_url = format!("{}?sslmode=disable", pg.carry(&env.db_url).expose_secret());
    let n = 400;
    env.enqueue_lines("lost", &lines(n, "l")).await;
    let extra = [("SHEEPDOG_CONCURRENCY", "8".to_string()), ("DATABASE_URL", db_url)];
    let mut worker = WorkerProcess::start(&env, &extra);
    // Six answers lost while the backlog is deep: each round after one fills every slot it can.
    for k in 1..=6 {
        reach(&env, "lost", (k * n / 8) as i64, Duration::from_secs(60)).await;
        pg.lose_commit_answers(1);
        wait_for(Duration::from_secs(30), "a COMMIT to pass", || async {
            (pg.commits_lost() >= k).then_some(())
        })
        .await;
    }
    env.wait_batch("lost", Duration::from_secs(120)).await;
    worker.kill9().await;
    let a = env.audit("lost", n as i64).await;
    // Every job called once: a lost grant is run by its replica, never taken over and called again.
    assert_eq!((a.mock_calls, a.called_twice, a.unknown_rows), (n, 0, 0), "{a:?}");
    println!(
        "lost answers: {} COMMITs cut after they passed; {a:?}",
        pg.commits_lost()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_finishes_the_jobs_in_hand_and_exits_0_and_a_second_signal_stops_at_once() {
    let _serial = SERIAL.lock().await;
    let env = TestEnv::new(MockConfig {
        latency_ms_min: 1500,
        ..Default::default()
    })
    .await;
    env.enqueue_lines("term", &lines(40, "t")).await;
    let extra = [("SHEEPDOG_CONCURRENCY", "8".to_string())];
    let mut w = WorkerProcess::start(&env, &extra);
    let state = env.mock.state.clone();
    wait_for(Duration::from_secs(20), "calls in flight", || {
        let s = state.clone();
        async move { (s.max_in_flight() >= 8).then_some(()) }
    })
    .await;
    let code = w.term(Duration::from_secs(20)).await;
    assert_eq!(code, Some(0), "a clean stop exits 0");
    // What it had in hand was finished, not abandoned.
    assert_eq!(
        env.count("SELECT count(*) FROM sheepdog.llm_calls WHERE outcome = 'pending'")
            .await,
        0
    );
    assert_eq!(
        env.count("SELECT count(*) FROM sheepdog.job_results WHERE status = 'running'")
            .await,
        0
    );
    assert!(
        env.count("SELECT count(*) FROM sheepdog.job_results WHERE status = 'succeeded'")
            .await
            >= 8
    );

    // Two signals: out at once; another replica takes its jobs over.
    let mut w = WorkerProcess::start(&env, &extra);
    let before = env.mock.state.call_count();
    let state = env.mock.state.clone();
    wait_for(Duration::from_secs(20), "new calls in flight", || {
        let s = state.clone();
        async move { (s.call_count() >= before + 4).then_some(()) }
    })
    .await;
    let pid = w.pid();
    sh("kill", &["-TERM", &pid]);
    sh("kill", &["-INT", &pid]);
    let t = Instant::now();
    let status = tokio::time::timeout(Duration::from_secs(5), w.child.wait())
        .await
        .expect("exits")
        .unwrap();
    assert!(t.elapsed() < Duration::from_secs(1), "the second signal stops at once");
    assert_eq!(status.code(), Some(130));
    // Nothing lost: a fresh worker takes over what the stopped one held and finishes the batch.
    env.mock.state.update(|c| c.latency_ms_min = 10);
    let mut w = WorkerProcess::start(&env, &extra);
    env.wait_batch("term", Duration::from_secs(120)).await;
    w.kill9().await;
    env.audit("term", 40).await;
}
