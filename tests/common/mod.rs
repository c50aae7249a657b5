//! Test helpers: every test gets its own Postgres database, its own RabbitMQ
//! vhost and its own mock upstream on a real socket, and tears them down when
//! its `TestEnv` drops.

#![allow(dead_code)]

use std::future::Future;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::options::{BasicGetOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use secrecy::SecretString;
use sheepdog::config::{UpstreamArgs, WorkerArgs};
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
        sheepdog::install_crypto_provider();
        let _ = tracing_subscriber_init();
        let name = format!("sheepdog_test_{}", uuid::Uuid::new_v4().simple());
        rabbitmqctl(&["add_vhost", &name]);
        rabbitmqctl(&["set_permissions", "-p", &name, "guest", ".*", ".*", ".*"]);
        let db_url = SecretString::from(format!("postgres://postgres@127.0.0.1:5432/{name}"));
        let amqp_url = SecretString::from(format!("amqp://guest:guest@127.0.0.1:5672/{name}"));
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
        }
    }

    pub fn upstream_args(&self) -> UpstreamArgs {
        UpstreamArgs {
            base_url: self.mock.base_url(),
            api_key: Some(SecretString::from("sk-test-never-logged")),
            http_timeout_seconds: 5.0,
            max_response_bytes: 1 << 20,
        }
    }

    pub fn worker_args(&self) -> WorkerArgs {
        WorkerArgs {
            concurrency: 16,
            default_max_tokens: 256,
            prices: None,
            max_message_bytes: 64 * 1024,
            max_attempts: 8,
            lease_seconds: 30.0,
            max_wait_seconds: 300.0,
            grace_seconds: 10.0,
            metrics_addr: "off".into(),
            breaker: Default::default(),
        }
    }

    pub async fn spawn_worker(&self, name: &str) -> WorkerHandle {
        self.spawn_worker_with(name, self.worker_args()).await
    }

    pub async fn spawn_worker_with(&self, name: &str, args: WorkerArgs) -> WorkerHandle {
        let w: Arc<Worker> =
            sheepdog::commands::build_worker(&self.db_url, &self.amqp_url, &self.upstream_args(), &args, name.into())
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
        let r = sheepdog::commands::enqueue::enqueue_file(&self.pool, &self.amqp_url, &path, batch, 1 << 20, false)
            .await
            .expect("enqueue");
        let _ = std::fs::remove_file(&path);
        r
    }

    /// Waits until every job of `batch` has ended.
    pub async fn wait_batch(&self, batch: &str, timeout: Duration) -> sheepdog::store::report::BatchStatus {
        let pool = self.pool.clone();
        let b = batch.to_string();
        wait_for(timeout, &format!("batch {batch} to finish"), || {
            let pool = pool.clone();
            let b = b.clone();
            async move {
                let s = sheepdog::store::report::batch_status(&pool, &b).await.unwrap();
                s.done().then_some(s)
            }
        })
        .await
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl").args(["delete_vhost", &self.name]).output();
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
