//! `amqps://` to the broker: a node with a TLS listener (`scripts/rabbit-tls`) serving a
//! certificate of a private CA made here with the `openssl` CLI. With `SHEEPDOG_AMQP_CA_FILE`
//! naming that CA, `migrate`, `enqueue` and a worker run a batch end to end over TLS; a
//! certificate for another name is refused, and so is the private CA when it is not given —
//! each with an error that says why and does not carry the password.
//!
//! Needs root (the node runs as the `rabbitmq` user) and `openssl`; about a minute. The node is
//! stopped at the end, pass or fail (a guard); the machine's broker (5672) is not touched.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{job_line, Broker, TestEnv, WorkerProcess};
use secrecy::ExposeSecret;
use sheepdog::upstream::mock::MockConfig;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/rabbit-tls");
const NODE: &str = "sdtls@localhost";
const USER: &str = "sdtls";
const PASSWORD: &str = "tls-pw-Zq81-never-shown";

fn run(cmd: &str, args: &[&str], dir: &Path) {
    let out = Command::new(cmd)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, and a server certificate signed by it for each name, in `dir`: ca.pem, NAME.pem, NAME.key.
fn make_certificates(dir: &Path, names: &[&str]) {
    run(
        "openssl",
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=sheepdog test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
        dir,
    );
    for name in names {
        std::fs::write(
            dir.join(format!("{name}.ext")),
            format!(
                "subjectAltName=DNS:{name}\nbasicConstraints=CA:FALSE\n\
                 keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
            ),
        )
        .unwrap();
        let (key, csr, pem, ext) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
            format!("{name}.ext"),
        );
        let subj = format!("/CN={name}");
        run(
            "openssl",
            &[
                "req", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &csr, "-subj", &subj,
            ],
            dir,
        );
        run(
            "openssl",
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                "2",
                "-extfile",
                &ext,
            ],
            dir,
        );
    }
}

/// The TLS node and the certificates' directory; the node is stopped and the directory removed
/// when dropped, also when the test fails.
struct TlsNode {
    dir: PathBuf,
    started: bool,
}

impl TlsNode {
    /// (Re)starts the node, fresh, serving the certificate made for `name`.
    fn serve(&mut self, name: &str) {
        self.started = true;
        let d = |f: String| self.dir.join(f).to_string_lossy().into_owned();
        let out = Command::new(SCRIPT)
            .args([
                "start",
                &d(format!("{name}.pem")),
                &d(format!("{name}.key")),
                &d("ca.pem".into()),
            ])
            .output()
            .expect("scripts/rabbit-tls runs");
        assert!(
            out.status.success(),
            "scripts/rabbit-tls start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // A user of its own, so the password is one that must never show up in an error.
        let ctl = Broker {
            ctl_node: Some(NODE.into()),
            urls: vec![],
        };
        ctl.ctl(&["add_user", USER, PASSWORD]);
    }
}

impl Drop for TlsNode {
    fn drop(&mut self) {
        if self.started {
            let _ = Command::new(SCRIPT).arg("stop").output();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn amqps_url(vhost: &str) -> String {
    format!("amqps://{USER}:{PASSWORD}@localhost:5691/{vhost}")
}

/// `sheepdog ARGS…` with the environment's database, the given `AMQP_URL` and CA file.
async fn sheepdog(env: &TestEnv, args: &[&str], amqp_url: &str, ca: Option<&Path>) -> (bool, String) {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_sheepdog"));
    cmd.args(args)
        .env("DATABASE_URL", env.db_url.expose_secret())
        .env("AMQP_URL", amqp_url)
        .env("RUST_LOG", "warn")
        .env_remove("SHEEPDOG_AMQP_CA_FILE");
    if let Some(ca) = ca {
        cmd.env("SHEEPDOG_AMQP_CA_FILE", ca);
    }
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("sheepdog {args:?} did not end in 60 s"))
        .expect("sheepdog runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn amqps_with_a_private_ca_works_and_wrong_names_and_unknown_cas_are_refused() {
    let dir = std::env::temp_dir().join(format!("sheepdog-tls-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut node = TlsNode {
        dir: dir.clone(),
        started: false,
    };
    make_certificates(&dir, &["localhost", "not-this-host.example"]);
    let ca = dir.join("ca.pem");
    node.serve("localhost");

    // Set up over the plain listener: the vhost, the database, the mock.
    let broker = Broker {
        ctl_node: Some(NODE.into()),
        urls: vec!["amqp://guest:guest@127.0.0.1:5690".into()],
    };
    let env = TestEnv::new_on(MockConfig::default(), &broker).await;
    broker.ctl(&["set_permissions", "-p", &env.name, USER, ".*", ".*", ".*"]);
    let url = amqps_url(&env.name);

    // (a) Over TLS with the private CA: migrate, enqueue 20 jobs, a worker runs them.
    let (ok, text) = sheepdog(&env, &["migrate"], &url, Some(&ca)).await;
    assert!(ok, "migrate over amqps with the CA: {text}");
    let file = dir.join("jobs.jsonl");
    let lines: String = (0..20)
        .map(|i| {
            format!(
                "{}\n",
                job_line(&format!("tls-{i:02}"), "gpt-4o-mini", &format!("tls {i}"))
            )
        })
        .collect();
    std::fs::write(&file, lines).unwrap();
    let (ok, text) = sheepdog(
        &env,
        &["enqueue", &file.to_string_lossy(), "--batch", "tls", "--quiet"],
        &url,
        Some(&ca),
    )
    .await;
    assert!(ok, "enqueue over amqps: {text}");
    let mut worker = WorkerProcess::start(
        &env,
        &[
            ("AMQP_URL", url.clone()),
            ("SHEEPDOG_AMQP_CA_FILE", ca.to_string_lossy().into_owned()),
        ],
    );
    env.wait_batch("tls", Duration::from_secs(60)).await;
    worker.kill9().await;
    let a = env.audit("tls", 20).await;
    let answered: std::collections::HashSet<String> =
        env.mock.state.calls().iter().map(|c| c.request_id.clone()).collect();
    assert_eq!(answered.len(), 20, "the mock answered each job once: {a:?}");
    println!(
        "tls (a): migrate, enqueue and a worker over {} with SHEEPDOG_AMQP_CA_FILE: {} jobs, {} succeeded, \
         {} calls answered by the mock, {} ledger rows",
        url.replace(PASSWORD, "***"),
        a.jobs,
        a.succeeded,
        a.mock_calls,
        a.ledger_rows
    );

    // (c) The same node without the CA file: the private CA is not trusted.
    let (ok, text) = sheepdog(&env, &["migrate"], &url, None).await;
    println!("tls (c) without SHEEPDOG_AMQP_CA_FILE: {}", text.trim());
    assert!(!ok, "an unknown CA is refused");
    assert!(!text.contains(PASSWORD), "the password stays out of errors: {text}");
    let lower = text.to_lowercase();
    assert!(
        lower.contains("unknownissuer") || lower.contains("unknown issuer"),
        "the error says the certificate's issuer is unknown: {text}"
    );
    assert!(
        text.contains("SHEEPDOG_AMQP_CA_FILE") && !text.contains("Is it running?"),
        "the hint points at the certificate, not at a broker that is down: {text}"
    );

    // (b) A certificate of the same CA for another name: refused, naming the name.
    node.serve("not-this-host.example");
    let (ok, text) = sheepdog(&env, &["migrate"], &url, Some(&ca)).await;
    println!("tls (b) certificate for not-this-host.example: {}", text.trim());
    assert!(!ok, "a certificate for another name is refused");
    assert!(!text.contains(PASSWORD), "the password stays out of errors: {text}");
    assert!(
        lower_has_name_error(&text),
        "the error says the certificate is not valid for the name: {text}"
    );
    drop(env);
    drop(node);
}

fn lower_has_name_error(text: &str) -> bool {
    let lower = text.to_lowercase();
    (lower.contains("not valid for name") || lower.contains("notvalidforname")) && lower.contains("localhost")
}
