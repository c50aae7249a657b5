//! sheepdog behind PgBouncer in transaction mode (Debian's 1.18, as most production fleets run
//! a pooler in front of Postgres): `sheepdog worker` processes and the CLI with `DATABASE_URL` at
//! the pooler, `SHEEPDOG_DATABASE_POOL_MODE=transaction`, the life line's session at Postgres
//! itself, every other setting at its default. The core of contract §5 must hold there: limits
//! from the first call and across `limits set`, nothing lost and no second call through a
//! kill -9, judged by what the mock upstream recorded.

mod common;

use std::time::Duration;

use common::pgbouncer::PgBouncer;
use common::scenario::{check_windows, first_arrival, now_ms};
use common::{mock_latency, small_lines, wait_for, TestEnv, WorkerProcess};
use secrecy::ExposeSecret;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_takeover_and_a_kill_9_hold_behind_pgbouncer_in_transaction_mode() {
    let env = TestEnv::new(mock_latency(50, 150)).await;
    let pgbouncer = PgBouncer::start().await;
    let via = [
        ("DATABASE_URL", pgbouncer.url(&env.name)),
        ("SHEEPDOG_DATABASE_POOL_MODE", "transaction".to_string()),
        ("SHEEPDOG_SESSION_DATABASE_URL", env.db_url.expose_secret().to_string()),
    ];
    let n = 450;
    // Workers first, the limit in their environment, then the batch.
    let mut settings = via.to_vec();
    settings.push(("SHEEPDOG_RPM", "600".to_string()));
    let mut workers = WorkerProcess::start_many(&env, 3, &settings);
    let path = std::env::temp_dir().join(format!("{}-pgb.jsonl", env.name));
    let lines: String = small_lines(n, "pgb").iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(&path, lines).unwrap();
    let out = env
        .cli_with(
            &["enqueue", &path.display().to_string(), "--batch", "pgb", "--quiet"],
            &via,
        )
        .await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // A third of the way: one replica killed mid-batch, then the limit raised, both through the pooler.
    let state = env.mock.state.clone();
    wait_for(Duration::from_secs(60), "a third of the calls", || {
        let s = state.clone();
        async move { (s.call_count() >= n / 3).then_some(()) }
    })
    .await;
    workers[0].kill9().await;
    let out = env.cli_with(&["limits", "set", "--rpm", "900"], &via).await;
    let set_at = now_ms();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let status = env.wait_batch("pgb", Duration::from_secs(120)).await;
    assert_eq!((status.succeeded, status.failed), (n as i64, 0));
    let calls = env.mock.state.calls();
    let (before, after): (Vec<_>, Vec<_>) = calls.iter().cloned().partition(|c| c.arrived_ms < set_at);
    check_windows(
        &before,
        first_arrival(&before),
        600.0,
        false,
        "rpm 600 from the env, behind pgbouncer",
    );
    check_windows(&after, set_at, 900.0, false, "limits set --rpm 900 through pgbouncer");
    // Nothing lost, one result per job, every call the upstream answered in the ledger.
    let a = env.audit("pgb", n as i64).await;
    println!(
        "behind pgbouncer: {n} jobs, {} upstream calls, {} ledger rows ({} unknown), {} jobs called twice",
        a.mock_calls, a.ledger_rows, a.unknown_rows, a.called_twice
    );
    // The killed replica was taken over: its row is gone.
    let replicas = env.count("SELECT count(*) FROM sheepdog.replicas").await;
    assert_eq!(
        replicas,
        2,
        "the dead replica was taken over: {:?}",
        sqlx::query_as::<_, (i64, String)>("SELECT id, name FROM sheepdog.replicas")
            .fetch_all(&env.pool)
            .await
            .unwrap()
    );
    for mut w in workers {
        w.kill9().await;
    }
    let _ = std::fs::remove_file(&path);
}
