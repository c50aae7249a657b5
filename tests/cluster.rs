//! sheepdog against a three-node RabbitMQ cluster (`scripts/rabbit-cluster`): `AMQP_URL` lists
//! the three nodes; the node leading `sheepdog.jobs` is stopped mid-batch and started again. The
//! run ends with the fault suite's audit (no job lost, one result each, every answered call in
//! the ledger).
//!
//! Needs root (the nodes run as the `rabbitmq` user) and about two minutes. The cluster is
//! stopped at the end, pass or fail (a guard); the machine's broker (5672) is not touched.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{job_line, wait_for, Broker, TestEnv, WorkerProcess};
use serde_json::Value;
use sheepdog::upstream::mock::MockConfig;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/rabbit-cluster");
const NODES: [&str; 3] = ["sd1", "sd2", "sd3"];

fn script(args: &[&str]) {
    let out = Command::new(SCRIPT)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{SCRIPT}: {e}"));
    assert!(
        out.status.success(),
        "scripts/rabbit-cluster {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The cluster, started clean; stopped when dropped, also when the test fails.
struct Cluster;

impl Cluster {
    fn start() -> Cluster {
        let c = Cluster; // from here on, a failure still stops whatever started
        script(&["start"]);
        c
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::env::var("SHEEPDOG_TEST_KEEP").is_ok() {
            eprintln!("kept the cluster running (scripts/rabbit-cluster stop)");
            return;
        }
        let _ = Command::new(SCRIPT).arg("stop").output();
    }
}

/// `rabbitmqctl -n <node>@localhost args…` on the first node that answers (one may be down).
fn ctl_any(args: &[&str]) -> String {
    let mut errors = Vec::new();
    for n in NODES {
        let out = Command::new("rabbitmqctl")
            .args(["-q", "-n", &format!("{n}@localhost")])
            .args(args)
            .output()
            .expect("rabbitmqctl runs");
        if out.status.success() {
            return String::from_utf8_lossy(&out.stdout).into_owned();
        }
        errors.push(format!("{n}: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    panic!("no node answered rabbitmqctl {args:?}: {}", errors.join("; "));
}

/// (leader, members) of a queue of `vhost`.
fn queue_placement(vhost: &str, queue: &str) -> (String, Vec<String>) {
    let out = ctl_any(&[
        "list_queues",
        "-p",
        vhost,
        "name",
        "type",
        "leader",
        "members",
        "--formatter",
        "json",
    ]);
    let rows: Vec<Value> = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let q = rows
        .iter()
        .find(|r| r["name"] == queue)
        .unwrap_or_else(|| panic!("{queue} not on the cluster: {out}"));
    assert_eq!(q["type"], "quorum", "{queue} is a quorum queue: {q}");
    let members = q["members"]
        .as_array()
        .map(|m| m.iter().filter_map(|v| v.as_str().map(String::from)).collect())
        .unwrap_or_default();
    (q["leader"].as_str().unwrap_or("").to_string(), members)
}

fn running_nodes() -> usize {
    let out = ctl_any(&["cluster_status", "--formatter", "json"]);
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    v["running_nodes"].as_array().map(|a| a.len()).unwrap_or(0)
}

fn lines(range: std::ops::Range<usize>, prefix: &str) -> Vec<Value> {
    range
        .map(|i| job_line(&format!("{prefix}-{i:04}"), "gpt-4o-mini", &format!("cluster test {i}")))
        .collect()
}

/// Jobs of `batch` (whose custom_id starts with `prefix`) that have ended.
async fn done(env: &TestEnv, batch: &str, prefix: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM sheepdog.job_results WHERE batch_id = $1 AND custom_id LIKE $2 || '%' \
         AND status IN ('succeeded', 'failed')",
    )
    .bind(batch)
    .bind(prefix)
    .fetch_one(&env.pool)
    .await
    .unwrap_or(0)
}

async fn reach(env: &TestEnv, batch: &str, prefix: &str, n: i64, timeout: Duration) {
    wait_for(timeout, &format!("{n} jobs {prefix}* of {batch} done"), || async move {
        (done(env, batch, prefix).await >= n).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_node_leading_the_jobs_queue_stops_and_the_batch_goes_on() {
    let test_start = Instant::now();
    let _cluster = Cluster::start();
    let broker = Broker {
        ctl_node: Some("sd1@localhost".into()),
        urls: (1..=3)
            .map(|i| format!("amqp://guest:guest@127.0.0.1:568{i}"))
            .collect(),
    };
    // Declared after the cluster, so dropped before it: the vhost and database go first.
    let env = TestEnv::new_on(
        MockConfig {
            latency_ms_min: 100,
            latency_ms_max: 300,
            ..Default::default()
        },
        &broker,
    )
    .await;
    // The binary's own `migrate`, through the three-node URL (TestEnv ran the same code already).
    let out = env.cli(&["migrate"]).await;
    assert!(
        out.status.success(),
        "sheepdog migrate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for q in [sheepdog::amqp::JOBS_QUEUE, sheepdog::amqp::DEAD_QUEUE] {
        let (leader, members) = queue_placement(&env.name, q);
        assert_eq!(
            members.len(),
            3,
            "{q} has a replica on every node: leader {leader}, members {members:?}"
        );
    }
    // The leader does not move without a fault: found now, so the stop comes right at 300 done.
    let (leader, members) = queue_placement(&env.name, sheepdog::amqp::JOBS_QUEUE);

    // 1,000 jobs: 500 now, 500 after the stop (those must come through the new leader).
    let batch = "cluster";
    let n = 1000i64;
    env.enqueue_lines(batch, &lines(0..500, "a")).await;
    let workers = WorkerProcess::start_many(&env, 3, &[]);
    let started = Instant::now();

    reach(&env, batch, "", 300, Duration::from_secs(90)).await;
    let node = leader.split('@').next().unwrap().to_string();
    assert!(NODES.contains(&node.as_str()), "leader {leader:?}");
    let before = done(&env, batch, "").await;
    let stopped = Instant::now();
    script(&["stop-node", &node]);
    let stop_took = stopped.elapsed().as_secs_f64();

    // The second half, enqueued at once through the same three-node URL, the leader down.
    env.enqueue_lines(batch, &lines(500..1000, "b")).await;
    let enqueued = stopped.elapsed().as_secs_f64();
    // Progress again: ten more jobs ended (any of them; the first half may have been all done).
    reach(&env, batch, "", before + 10, Duration::from_secs(60)).await;
    let progress = stopped.elapsed().as_secs_f64();
    // And work that can only have come through the queue's new leader.
    reach(&env, batch, "b", 10, Duration::from_secs(60)).await;
    let new_work = stopped.elapsed().as_secs_f64();
    let (new_leader, _) = queue_placement(&env.name, sheepdog::amqp::JOBS_QUEUE);

    let restarted = Instant::now();
    script(&["start-node", &node]);
    let restart_took = restarted.elapsed().as_secs_f64();
    let running = running_nodes();
    assert_eq!(running, 3, "{node} rejoined the cluster");
    let (_, members_after) = queue_placement(&env.name, sheepdog::amqp::JOBS_QUEUE);
    assert_eq!(members_after.len(), 3, "{members_after:?}");

    // Every worker holds a broker connection again (those on the stopped node moved to a live
    // one): each names its connection sheepdog@HOST:PID.
    let pids: Vec<String> = workers.iter().map(|w| w.pid()).collect();
    let vhost = env.name.clone();
    wait_for(Duration::from_secs(30), "every worker connected to the cluster", || {
        let (pids, vhost) = (pids.clone(), vhost.clone());
        async move {
            let out = ctl_any(&["list_connections", "-p", &vhost, "client_properties"]);
            pids.iter()
                .all(|p| {
                    out.contains(&format!(":{p}\""))
                        || out.contains(&format!(":{p}<<"))
                        || out.contains(&format!(":{p}>>"))
                })
                .then_some(())
        }
    })
    .await;

    env.wait_batch(batch, Duration::from_secs(120)).await;
    let total = started.elapsed().as_secs_f64();
    for mut w in workers {
        w.kill9().await;
    }
    let a = env.audit(batch, n).await;
    println!(
        "cluster run: sheepdog.jobs on {} nodes; leader {leader} stopped at {before} done ({stop_took:.1} s to stop); progress again \
         {progress:.1} s after the stop command; 500 more enqueued (with the leader down) {enqueued:.1} s after \
         it; the first 10 of those done {new_work:.1} s after it (new leader {new_leader}); {node} back in {restart_took:.1} s, \
         {running} running nodes; {} jobs, {} results succeeded, {} ledger rows ({} unknown), \
         {} billed calls, {} jobs called twice; batch {total:.1} s, test {:.1} s",
        members.len(),
        a.jobs,
        a.succeeded,
        a.ledger_rows,
        a.unknown_rows,
        a.mock_calls,
        a.called_twice,
        test_start.elapsed().as_secs_f64()
    );
    assert!(progress < 10.0, "progress {progress:.1} s after the leader stopped");
    assert!(
        new_work < 10.0,
        "new jobs done {new_work:.1} s after the leader stopped"
    );
}
