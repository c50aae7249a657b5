//! Test helpers: every test gets its own Postgres database, its own RabbitMQ vhost and its own
//! mock upstream on a real socket, and tears them down when its `TestEnv` drops. Workers run
//! either in this process (`spawn_worker`) or as the real binary (`WorkerProcess`), started as
//! users start them: settings from the environment, every other setting at its default.

#![allow(dead_code)]

pub mod pgbouncer;
pub mod proxy;
pub mod scenario;

use std::future::Future;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::options::{BasicGetOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use secrecy::{ExposeSecret, SecretString};
use sheepdog::config::{LimitArgs, UpstreamArgs, WorkerArgs};
use sheepdog::metrics::Metrics;
use sheepdog::upstream::mock::{MockConfig, MockServer};
use sheepdog::worker::Worker;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

pub const PG_ADMIN: &str = "postgres://postgres@127.0.0.1:5432/postgres";

pub struct TestEnv {
    pub name: String,
    pub db_url: SecretString,
    pub amqp_url: SecretString,
    pub pool: PgPool,
    pub mock: MockServer,
    pub amqp: lapin::Connection,
    pub channel: lapin::Channel,
    /// The node `rabbitmqctl -n` manages this environment's vhost on (None: the machine's broker).
    pub ctl_node: Option<String>,
}

/// Where a `TestEnv` gets its vhost: the machine's broker (`Broker::local()`), or other nodes
/// (a cluster, a TLS node) managed with `rabbitmqctl -n NODE`.
#[derive(Clone, Debug)]
pub struct Broker {
    /// `rabbitmqctl -n` node name; None for the machine's own broker.
    pub ctl_node: Option<String>,
    /// Each broker's URL without the vhost, e.g. `amqp://guest:guest@127.0.0.1:5681`; the
    /// environment's `AMQP_URL` lists them all, comma-separated, each with the vhost.
    pub urls: Vec<String>,
}

impl Broker {
    pub fn local() -> Broker {
        Broker {
            ctl_node: None,
            urls: vec!["amqp://guest:guest@127.0.0.1:5672".into()],
        }
    }

    /// `rabbitmqctl [-n NODE] args…`, panicking with its stderr when it fails.
    pub fn ctl(&self, args: &[&str]) -> String {
        let mut cmd = Command::new("rabbitmqctl");
        if let Some(n) = &self.ctl_node {
            cmd.args(["-n", n]);
        }
        let out = cmd.args(args).output().expect("rabbitmqctl runs");
        assert!(
            out.status.success(),
            "rabbitmqctl {:?} {args:?}: {}",
            self.ctl_node,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// A running in-process replica.
pub struct WorkerHandle {
    pub metrics: Arc<Metrics>,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl WorkerHandle {
    /// SIGTERM, in effect: stop, finish what is in hand, return.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.expect("worker task").expect("worker ended cleanly");
    }
}

fn rabbitmqctl(args: &[&str]) {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl runs");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl TestEnv {
    pub async fn new(mock: MockConfig) -> TestEnv {
        TestEnv::new_on(mock, &Broker::local()).await
    }

    /// An environment whose vhost lives on `broker` (a cluster: its `AMQP_URL` lists every node).
    pub async fn new_on(mock: MockConfig, broker: &Broker) -> TestEnv {
        sheepdog::install_crypto_provider();
        let _ = tracing_subscriber_init();
        let name = format!("sheepdog_test_{}", uuid::Uuid::new_v4().simple());
        match &broker.ctl_node {
            None => {
                rabbitmqctl(&["add_vhost", &name]);
                rabbitmqctl(&["set_permissions", "-p", &name, "guest", ".*", ".*", ".*"]);
            }
            Some(_) => {
                broker.ctl(&["add_vhost", &name]);
                broker.ctl(&["set_permissions", "-p", &name, "guest", ".*", ".*", ".*"]);
            }
        }
        let db_url = SecretString::from(format!("postgres://postgres@127.0.0.1:5432/{name}"));
        let urls: Vec<String> = broker.urls.iter().map(|u| format!("{u}/{name}")).collect();
        let amqp_url = SecretString::from(urls.join(","));
        // `migrate` creates the database, applies migrations and declares queues.
        let pool = sheepdog::commands::migrate(&db_url, &amqp_url).await.expect("migrate");
        let mock = MockServer::start("127.0.0.1:0", mock).await.expect("mock upstream");
        let amqp = sheepdog::amqp::connect(&amqp_url, "test").await.expect("amqp");
        let channel = sheepdog::amqp::confirm_channel(&amqp).await.expect("channel");
        TestEnv {
            name,
            db_url,
            amqp_url,
            pool,
            mock,
            amqp,
            channel,
            ctl_node: broker.ctl_node.clone(),
        }
    }

    pub fn upstream_args(&self) -> UpstreamArgs {
        let mut u: UpstreamArgs = sheepdog::config::defaults();
        u.base_url = self.mock.base_url();
        u.api_key = Some(SecretString::from("sk-test-never-logged"));
        u
    }

    /// The defaults, with 16 calls in flight and no metrics listener.
    pub fn worker_args(&self) -> WorkerArgs {
        let mut w: WorkerArgs = sheepdog::config::defaults();
        w.concurrency = 16;
        w.metrics_addr = "off".into();
        w
    }

    pub async fn spawn_worker(&self, name: &str) -> WorkerHandle {
        self.spawn_worker_with(name, self.worker_args()).await
    }

    pub async fn spawn_worker_with(&self, name: &str, args: WorkerArgs) -> WorkerHandle {
        self.spawn_worker_limited(name, args, &LimitArgs::default()).await
    }

    /// An in-process replica given these limits, as `sheepdog worker --rpm …` would be.
    pub async fn spawn_worker_limited(&self, name: &str, args: WorkerArgs, limits: &LimitArgs) -> WorkerHandle {
        let w: Arc<Worker> = sheepdog::commands::build_worker(
            &sheepdog::config::DbArgs::direct(self.db_url.clone()),
            &self.amqp_url,
            &self.upstream_args(),
            &args,
            limits,
            name.into(),
        )
        .await
        .expect("worker");
        let metrics = w.metrics.clone();
        let shutdown = CancellationToken::new();
        let s = shutdown.clone();
        let task = tokio::spawn(async move { w.run(s).await });
        WorkerHandle {
            metrics,
            shutdown,
            task,
        }
    }

    /// Publishes a persistent message to `sheepdog.jobs` and waits for its confirm.
    pub async fn publish(&self, body: &[u8]) {
        sheepdog::amqp::publish_confirmed(
            &self.channel,
            sheepdog::amqp::JOBS_QUEUE,
            body,
            sheepdog::amqp::job_properties(None),
        )
        .await
        .expect("publish");
    }

    /// Messages ready in a queue.
    pub async fn queue_depth(&self, queue: &str) -> u32 {
        let ch = self.amqp.create_channel().await.unwrap();
        let q = ch
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        let _ = ch.close(200, "".into()).await;
        q.message_count()
    }

    /// Takes every message in `sheepdog.dead`: (body, x-sheepdog-error).
    pub async fn drain_dead(&self) -> Vec<(Vec<u8>, Option<String>)> {
        let mut out = Vec::new();
        while let Some(m) = self
            .channel
            .basic_get(sheepdog::amqp::DEAD_QUEUE.into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            let reason = sheepdog::amqp::header_str(&m.delivery.properties, sheepdog::amqp::ERROR_HEADER);
            out.push((m.delivery.data.clone(), reason));
        }
        out
    }

    pub async fn count(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sql).fetch_one(&self.pool).await.unwrap()
    }

    /// Writes `lines` to a JSONL file and enqueues it as `batch`.
    pub async fn enqueue_lines(
        &self,
        batch: &str,
        lines: &[serde_json::Value],
    ) -> sheepdog::commands::enqueue::EnqueueReport {
        let path = std::env::temp_dir().join(format!("{}-{batch}.jsonl", self.name));
        let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
        std::fs::write(&path, text).unwrap();
        let opts = sheepdog::commands::enqueue::EnqueueOptions::batch(batch);
        let r = sheepdog::commands::enqueue::enqueue_file(&self.pool, &self.amqp_url, &path, &opts)
            .await
            .expect("enqueue");
        let _ = std::fs::remove_file(&path);
        r
    }

    /// Waits until every job of `batch` has ended.
    pub async fn wait_batch(&self, batch: &str, timeout: Duration) -> sheepdog::store::report::BatchStatus {
        let deadline = Instant::now() + timeout;
        loop {
            let s = sheepdog::store::report::batch_status(&self.pool, batch).await.unwrap();
            if s.done() {
                return s;
            }
            // What was left says where it stuck.
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for batch {batch} to finish: {s:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Runs the real binary with this environment's URLs (a CLI command, as a user would).
    pub async fn cli(&self, args: &[&str]) -> std::process::Output {
        self.cli_with(args, &[]).await
    }

    /// [`TestEnv::cli`] with more settings in its environment (over this environment's URLs).
    pub async fn cli_with(&self, args: &[&str], settings: &[(&str, String)]) -> std::process::Output {
        let mut cmd = self.command(args);
        for (k, v) in settings {
            cmd.env(k, v);
        }
        cmd.output().await.expect("sheepdog runs")
    }

    /// The real binary's command line with this environment's URLs, not started yet.
    pub fn command(&self, args: &[&str]) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_sheepdog"));
        cmd.args(args)
            .env("DATABASE_URL", self.db_url.expose_secret())
            .env("AMQP_URL", self.amqp_url.expose_secret())
            .env("RUST_LOG", "warn");
        cmd
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        // SHEEPDOG_TEST_KEEP=1 leaves the database and vhost for a post-mortem.
        if std::env::var("SHEEPDOG_TEST_KEEP").is_ok() {
            eprintln!("kept database and vhost {}", self.name);
            return;
        }
        let mut ctl = Command::new("rabbitmqctl");
        if let Some(n) = &self.ctl_node {
            ctl.args(["-n", n]);
        }
        let _ = ctl.args(["delete_vhost", &self.name]).output();
        let _ = Command::new("psql")
            .args([
                PG_ADMIN,
                "-qc",
                &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
            ])
            .output();
    }
}

/// Polls `check` until it yields a value, failing the test after `timeout`.
pub async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A port on 127.0.0.1 free when asked (a listener bound to port 0, then closed), for a
/// process the test starts to listen on.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `n` chat job lines of gpt-4o-mini with `max_tokens` 20, ids `{prefix}-00000` onwards.
pub fn small_lines(n: usize, prefix: &str) -> Vec<serde_json::Value> {
    (0..n)
        .map(|i| {
            let mut l = job_line(&format!("{prefix}-{i:05}"), "gpt-4o-mini", &format!("{prefix} job {i}"));
            l["body"]["max_tokens"] = 20.into();
            l
        })
        .collect()
}

/// A mock that answers after `lo`..`hi` ms.
pub fn mock_latency(lo: u64, hi: u64) -> MockConfig {
    MockConfig {
        latency_ms_min: lo,
        latency_ms_max: hi,
        ..Default::default()
    }
}

/// A chat job line in the OpenAI Batch input format.
pub fn job_line(custom_id: &str, model: &str, content: &str) -> serde_json::Value {
    serde_json::json!({
        "custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 50},
        "metadata": {"n": custom_id}
    })
}

fn tracing_subscriber_init() -> Result<(), ()> {
    // Logs only when asked for (RUST_LOG), so test output stays readable.
    if std::env::var("RUST_LOG").is_ok() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
    Ok(())
}

/// A `sheepdog worker` process, started as a user starts it: the environment's URLs, the
/// settings given, every other setting at its default. Killed (SIGKILL) when dropped.
pub struct WorkerProcess {
    pub child: tokio::process::Child,
}

impl WorkerProcess {
    pub fn start(env: &TestEnv, settings: &[(&str, String)]) -> WorkerProcess {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_sheepdog"));
        cmd.arg("worker")
            .env("DATABASE_URL", env.db_url.expose_secret())
            .env("AMQP_URL", env.amqp_url.expose_secret())
            .env("HOLYSHEEP_BASE_URL", env.mock.base_url())
            // Several replicas share this machine: each serves its metrics on a port of its own.
            .env("SHEEPDOG_METRICS_ADDR", "127.0.0.1:0")
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true);
        // SHEEPDOG_TEST_LOGS=DIR keeps each worker process's log, for a failing run.
        match std::env::var("SHEEPDOG_TEST_LOGS") {
            Ok(dir) => {
                let path =
                    std::path::Path::new(&dir).join(format!("{}-{}.log", env.name, uuid::Uuid::new_v4().simple()));
                cmd.stderr(std::fs::File::create(path).expect("log file"))
                    .env("RUST_LOG", "info");
            }
            Err(_) => {
                cmd.stderr(std::process::Stdio::null());
            }
        }
        for (k, v) in settings {
            cmd.env(k, v);
        }
        WorkerProcess {
            child: cmd.spawn().expect("worker process"),
        }
    }

    /// Starts `n` workers at the same moment with the same settings.
    pub fn start_many(env: &TestEnv, n: usize, settings: &[(&str, String)]) -> Vec<WorkerProcess> {
        (0..n).map(|_| WorkerProcess::start(env, settings)).collect()
    }

    pub fn pid(&self) -> String {
        self.child.id().expect("running").to_string()
    }

    /// kill -9.
    pub async fn kill9(&mut self) {
        self.child.start_kill().expect("kill");
        let _ = self.child.wait().await;
    }

    /// SIGTERM, then waits for the exit code.
    pub async fn term(&mut self, within: Duration) -> Option<i32> {
        Command::new("kill")
            .args(["-TERM", &self.pid()])
            .status()
            .expect("kill -TERM");
        tokio::time::timeout(within, self.child.wait())
            .await
            .expect("the worker exits")
            .expect("wait")
            .code()
    }
}

/// What the fault tests check at the end of every run, from the views and from
/// the mock's own record of the calls it answered.
#[derive(Debug)]
pub struct Audit {
    pub jobs: i64,
    pub succeeded: i64,
    pub ledger_rows: i64,
    pub unknown_rows: i64,
    pub pending_rows: i64,
    pub mock_calls: usize,
    /// Jobs the upstream was called for more than once.
    pub called_twice: i64,
}

impl TestEnv {
    pub async fn audit(&self, batch: &str, expected_jobs: i64) -> Audit {
        let q = |sql: &str| {
            let pool = self.pool.clone();
            let sql = sql.to_string();
            let batch = batch.to_string();
            async move {
                sqlx::query_scalar::<_, i64>(&sql)
                    .bind(batch)
                    .fetch_one(&pool)
                    .await
                    .unwrap()
            }
        };
        let a = Audit {
            jobs: q("SELECT count(*) FROM sheepdog.job_results WHERE batch_id = $1").await,
            succeeded: q("SELECT count(*) FROM sheepdog.job_results WHERE batch_id = $1 AND status = 'succeeded'").await,
            ledger_rows: q("SELECT count(*) FROM sheepdog.llm_calls WHERE batch_id = $1").await,
            unknown_rows: q("SELECT count(*) FROM sheepdog.llm_calls WHERE batch_id = $1 AND outcome = 'unknown'").await,
            pending_rows: q("SELECT count(*) FROM sheepdog.llm_calls WHERE batch_id = $1 AND outcome = 'pending'").await,
            mock_calls: self.mock.state.call_count(),
            called_twice: q("SELECT count(*) FROM (SELECT 1 FROM sheepdog.llm_calls WHERE batch_id = $1 GROUP BY custom_id HAVING count(*) > 1) x").await,
        };
        // No job lost, one result per job (the primary key makes two impossible).
        assert_eq!((a.jobs, a.succeeded), (expected_jobs, expected_jobs), "{a:?}");
        assert_eq!(a.pending_rows, 0, "{a:?}");
        // Every call the upstream answered is in the ledger: by its request id, or
        // as an `unknown` row (answered after its worker died).
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT upstream_request_id FROM sheepdog.llm_calls WHERE batch_id = $1 AND upstream_request_id IS NOT NULL",
        )
        .bind(batch)
        .fetch_all(&self.pool)
        .await
        .unwrap();
        let known: std::collections::HashSet<String> = ids.into_iter().collect();
        let missing = self
            .mock
            .state
            .calls()
            .iter()
            .filter(|c| !known.contains(&c.request_id))
            .count() as i64;
        assert!(
            missing <= a.unknown_rows,
            "{missing} answered calls are not in the ledger: {a:?}"
        );
        // The job's cost covers all its calls.
        let gap: rust_decimal::Decimal = sqlx::query_scalar(
            "SELECT coalesce(sum(j.cost_usd), 0) - (SELECT coalesce(sum(cost_usd), 0) FROM sheepdog.llm_calls WHERE batch_id = $1)
               FROM sheepdog.job_results j WHERE j.batch_id = $1",
        )
        .bind(batch)
        .fetch_one(&self.pool)
        .await
        .unwrap();
        assert_eq!(gap, rust_decimal::Decimal::ZERO, "job costs equal the ledger");
        a
    }
}

/// The Python of the venv `scripts/services` makes, where it installs the pinned `package` from
/// PyPI (the official SDKs and parsers the tests run against).
pub fn venv_python(package: &str) -> std::path::PathBuf {
    let py = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    assert!(
        py.exists(),
        "{} is missing: run scripts/services, which makes the venv and installs the pinned `{package}` package from PyPI",
        py.display()
    );
    py
}
