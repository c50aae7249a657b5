//! Secrets never leak: the API key and the database and broker passwords appear
//! in no log line (at any RUST_LOG level), error message or table.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{job_line, wait_for, TestEnv};
use secrecy::ExposeSecret;
use serde_json::Value;
use sheepdog::upstream::mock::MockConfig;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_appear_in_no_log_line_error_or_table() {
    let api_key = format!("sk-live-{}", uuid::Uuid::new_v4().simple());
    // The mock first refuses the key (so error paths log), then accepts it.
    let env = TestEnv::new(MockConfig {
        api_key: Some("another-key".into()),
        ..Default::default()
    })
    .await;
    let user = format!("sd_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let amqp_pw = format!("amqp-pw-{}", uuid::Uuid::new_v4().simple());
    let db_pw = format!("db-pw-{}", uuid::Uuid::new_v4().simple());
    let ctl = |args: &[&str]| {
        let out = Command::new("rabbitmqctl").args(args).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    ctl(&["add_user", &user, &amqp_pw]);
    ctl(&["set_permissions", "-p", &env.name, &user, ".*", ".*", ".*"]);
    // Postgres trusts loopback here, so the password is carried but not needed.
    let db_url = format!("postgres://postgres:{db_pw}@127.0.0.1:5432/{}", env.name);
    let amqp_url = format!("amqp://{user}:{amqp_pw}@127.0.0.1:5672/{}", env.name);
    let secrets = [api_key.as_str(), amqp_pw.as_str(), db_pw.as_str()];

    let lines: Vec<Value> = (0..10)
        .map(|i| job_line(&format!("s-{i}"), "gpt-4o", "hello"))
        .collect();
    env.enqueue_lines("sec", &lines).await;
    let log = std::env::temp_dir().join(format!("{}-worker.log", env.name));
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_sheepdog"))
        .arg("worker")
        .env("DATABASE_URL", &db_url)
        .env("AMQP_URL", &amqp_url)
        .env("HOLYSHEEP_BASE_URL", env.mock.base_url())
        .env("HOLYSHEEP_API_KEY", &api_key)
        .env("SHEEPDOG_METRICS_ADDR", "off")
        .env("RUST_LOG", "trace")
        .stderr(std::fs::File::create(&log).unwrap())
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let state = env.mock.state.clone();
    wait_for(Duration::from_secs(20), "the key to be refused", || {
        let s = state.clone();
        async move { s.calls().iter().any(|c| c.status == 401).then_some(()) }
    })
    .await;
    env.mock.state.update(|c| c.api_key = Some(api_key.clone()));
    env.wait_batch("sec", Duration::from_secs(60)).await;
    Command::new("kill")
        .args(["-TERM", &child.id().unwrap().to_string()])
        .status()
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));

    let text = std::fs::read_to_string(&log).unwrap();
    let _ = std::fs::remove_file(&log);
    assert!(text.len() > 10_000, "trace logging was on ({} bytes)", text.len());
    for s in secrets {
        assert!(!text.contains(s), "a secret leaked into the trace log");
    }

    // Errors that name the URL hide its password.
    let bad_db = format!("postgres://postgres:{db_pw}@127.0.0.1:1/{}", env.name);
    let out = Command::new(env!("CARGO_BIN_EXE_sheepdog"))
        .args(["migrate"])
        .env("DATABASE_URL", &bad_db)
        .env("AMQP_URL", &amqp_url)
        .env("RUST_LOG", "trace")
        .output()
        .unwrap();
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success());
    assert!(
        all.contains("cannot reach Postgres at postgres://postgres:***@127.0.0.1:1/"),
        "{all}"
    );
    let bad_amqp = format!("amqp://{user}:{amqp_pw}-wrong@127.0.0.1:5672/{}", env.name);
    let out = Command::new(env!("CARGO_BIN_EXE_sheepdog"))
        .args(["migrate"])
        .env("DATABASE_URL", &db_url)
        .env("AMQP_URL", &bad_amqp)
        .env("RUST_LOG", "trace")
        .output()
        .unwrap();
    let all2 = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success());
    assert!(all2.contains("cannot reach RabbitMQ at amqp://"), "{all2}");
    for s in secrets {
        assert!(
            !all.contains(s) && !all2.contains(s),
            "a secret leaked into an error message"
        );
    }

    // Nor is any of them stored.
    let stored: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM sheepdog.jobs j
          WHERE j.response::text LIKE '%' || $1 || '%' OR j.error::text LIKE '%' || $1 || '%'
             OR EXISTS (SELECT 1 FROM sheepdog.calls c WHERE c.error LIKE '%' || $1 || '%')",
    )
    .bind(&api_key)
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(stored, 0);
    let _ = Command::new("rabbitmqctl").args(["delete_user", &user]).output();
    let _ = env.db_url.expose_secret();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_tls_with_sslmode_verify_full_verifies_the_server() {
    sheepdog::install_crypto_provider();
    // Debian's Postgres serves TLS with its snakeoil certificate, issued to "localhost".
    let cert = "/etc/ssl/certs/ssl-cert-snakeoil.pem";
    assert!(
        std::path::Path::new(cert).exists(),
        "the machine's Postgres certificate"
    );
    let url = |host: &str| {
        secrecy::SecretString::from(format!(
            "postgres://postgres@{host}:5432/postgres?sslmode=verify-full&sslrootcert={cert}"
        ))
    };
    let pool = sheepdog::store::connect(&url("localhost"), 1, false)
        .await
        .expect("TLS to the right name");
    let tls: (bool, String) = sqlx::query_as("SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(tls.0, "the connection is encrypted ({})", tls.1);
    // The same server under a name its certificate does not carry is refused.
    let err = sheepdog::store::connect(&url("127.0.0.1"), 1, false)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("certificate"), "{err}");
}
