//! `/metrics` as Prometheus and the dashboards read it: a `sheepdog worker` process is scraped
//! and its body parsed by the `prometheus_client` Python package's OpenMetrics parser
//! (tests/metrics/scrape.py, from the venv `scripts/services` makes), which checks every family's
//! type, HELP and labels, the latency buckets, and every metric the Grafana dashboard and the
//! KEDA trigger query.

mod common;

use std::time::{Duration, Instant};

use common::{job_line, wait_for, TestEnv, WorkerProcess};
use sheepdog::upstream::mock::MockConfig;

/// Runs the checker on a scraped body: Ok(its JSON line), or Err(what it found wrong).
async fn check(body: &str) -> Result<serde_json::Value, String> {
    let path = std::env::temp_dir().join(format!("sheepdog-metrics-{}.txt", uuid::Uuid::new_v4().simple()));
    std::fs::write(&path, body).unwrap();
    let out = tokio::process::Command::new(common::venv_python("prometheus-client"))
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/metrics/scrape.py"))
        .arg(&path)
        .output()
        .await
        .expect("python runs");
    let _ = std::fs::remove_file(&path);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    if out.status.success() {
        Ok(serde_json::from_str(stdout.trim()).expect("one JSON line"))
    } else {
        Err(format!("{stdout}{}", String::from_utf8_lossy(&out.stderr)))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_process_serves_metrics_that_prometheus_and_the_dashboards_can_read() {
    let env = TestEnv::new(MockConfig::default()).await;
    let addr = metrics_addr();
    // A budget, so the budget's gauges have a sample to show.
    let _worker = WorkerProcess::start(
        &env,
        &[
            ("SHEEPDOG_METRICS_ADDR", addr.clone()),
            ("SHEEPDOG_BUDGET_USD", "100".into()),
        ],
    );
    let lines: Vec<_> = (0..20)
        .map(|i| job_line(&format!("s-{i}"), "gpt-4o", &format!("q{i}")))
        .collect();
    env.enqueue_lines("scrape", &lines).await;
    env.wait_batch("scrape", Duration::from_secs(60)).await;

    let url = format!("http://{addr}/metrics");
    let deadline = Instant::now() + Duration::from_secs(30);
    let (content_type, families) = loop {
        let last = match reqwest::get(&url).await {
            Ok(r) => {
                let ct = r.headers()[reqwest::header::CONTENT_TYPE].to_str().unwrap().to_string();
                let body = r.text().await.unwrap();
                match check(&body).await {
                    Ok(f) => break (ct, f),
                    Err(why) => why,
                }
            }
            Err(e) => e.to_string(),
        };
        // The gauges fill within seconds of the start (queue depths, breakers, limits).
        assert!(Instant::now() < deadline, "/metrics never passed the checks:\n{last}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(
        content_type.starts_with("application/openmetrics-text; version=1.0.0"),
        "{content_type}"
    );
    // The sample names stay those the dashboards and alerts were written against.
    for (family, sample) in [
        ("sheepdog_jobs", "sheepdog_jobs_total"),
        ("sheepdog_upstream_calls", "sheepdog_upstream_calls_total"),
        ("sheepdog_tokens", "sheepdog_tokens_total"),
        ("sheepdog_cost_usd", "sheepdog_cost_usd_total"),
        (
            "sheepdog_upstream_latency_seconds",
            "sheepdog_upstream_latency_seconds_bucket",
        ),
        ("sheepdog_jobs_in_flight", "sheepdog_jobs_in_flight"),
        ("sheepdog_queue_depth", "sheepdog_queue_depth"),
    ] {
        let samples = families[family]["samples"].as_array().unwrap();
        assert!(samples.iter().any(|s| s == sample), "{family}: {samples:?}");
    }
}

/// A free port on 127.0.0.1 for a worker's `/metrics`.
fn metrics_addr() -> String {
    let port = common::free_port();
    format!("127.0.0.1:{port}")
}

/// The value of `sheepdog_limit_used_last_minute{scope="*",kind="requests"}` in a scraped body.
fn requests_last_minute(body: &str) -> Option<f64> {
    body.lines()
        .find(|l| {
            l.starts_with("sheepdog_limit_used_last_minute{")
                && l.contains(r#"scope="*""#)
                && l.contains(r#"kind="requests""#)
        })?
        .rsplit(' ')
        .next()?
        .parse()
        .ok()
}

/// The last minute's use is the fleet's, on every replica: one replica reads it from the calls
/// for all of them (at most every 10 s), the others take what it read. Two `sheepdog worker`
/// processes started together run a batch; each one's gauge comes to the calls the upstream
/// recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_replica_shows_the_fleets_use_of_the_last_minute() {
    let env = TestEnv::new(MockConfig::default()).await;
    let addrs = [metrics_addr(), metrics_addr()];
    let _workers: Vec<_> = addrs
        .iter()
        .map(|a| WorkerProcess::start(&env, &[("SHEEPDOG_METRICS_ADDR", a.clone())]))
        .collect();
    let lines: Vec<_> = (0..30)
        .map(|i| job_line(&format!("m-{i}"), "gpt-4o-mini", &format!("q{i}")))
        .collect();
    env.enqueue_lines("minute", &lines).await;
    env.wait_batch("minute", Duration::from_secs(60)).await;
    let made = env.mock.state.calls().len() as f64;
    assert_eq!(made, 30.0, "one call a job");
    for addr in &addrs {
        let url = format!("http://{addr}/metrics");
        // Read every 10 s, from a reading at most 10 s old: within about 20 s of the batch's end.
        let shown = wait_for(
            Duration::from_secs(40),
            "the last minute's use on every replica",
            || {
                let url = url.clone();
                async move {
                    let body = reqwest::get(&url).await.ok()?.text().await.ok()?;
                    requests_last_minute(&body).filter(|n| *n == made)
                }
            },
        )
        .await;
        assert_eq!(shown, made, "{addr}");
    }
}
