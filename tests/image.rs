//! The container image's contents, proven without a Docker engine (none runs on this machine):
//! `scripts/image-rootfs` builds the root filesystem the Dockerfile copies into an empty image,
//! and the worker runs from it under chroot as uid 10001, as it would in the container.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{job_line, wait_for, TestEnv};
use secrecy::ExposeSecret;
use sheepdog::upstream::mock::MockConfig;

fn files(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else {
                out.push(p.strip_prefix(root).unwrap().to_string_lossy().into_owned());
            }
        }
    }
    out.sort();
    out
}

/// `chroot --userspec=10001:10001 ROOT /usr/local/bin/sheepdog ARGS` with the test's settings.
fn in_image(root: &Path, env: &TestEnv, args: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new("/usr/sbin/chroot");
    cmd.arg("--userspec=10001:10001")
        .arg(root)
        .arg("/usr/local/bin/sheepdog")
        .args(args)
        .env_clear()
        .env("DATABASE_URL", env.db_url.expose_secret())
        .env("AMQP_URL", env.amqp_url.expose_secret())
        .env("HOLYSHEEP_BASE_URL", env.mock.base_url())
        .env("SHEEPDOG_METRICS_ADDR", "127.0.0.1:19393")
        .env("RUST_LOG", "warn")
        .kill_on_drop(true);
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_holds_only_the_binary_its_c_runtime_and_ca_certificates_and_runs_as_uid_10001() {
    let env = TestEnv::new(MockConfig {
        latency_ms_min: 10,
        latency_ms_max: 30,
        ..Default::default()
    })
    .await;
    let root: PathBuf = std::env::temp_dir().join(format!("{}-rootfs", env.name));
    let out = std::process::Command::new("scripts/image-rootfs")
        .arg(env!("CARGO_BIN_EXE_sheepdog"))
        .arg(&root)
        .output()
        .expect("scripts/image-rootfs runs");
    assert!(
        out.status.success(),
        "image-rootfs: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Nothing but the binary, the C runtime's shared objects, the CA bundle and the user entry.
    let listed = files(&root);
    for f in &listed {
        let runtime = (f.starts_with("lib") || f.starts_with("usr/lib")) && f.contains(".so");
        assert!(
            runtime
                || [
                    "usr/local/bin/sheepdog",
                    "etc/ssl/certs/ca-certificates.crt",
                    "etc/passwd",
                    "etc/group"
                ]
                .contains(&f.as_str()),
            "unexpected file in the image: {f} (all: {listed:?})"
        );
    }
    assert!(
        !listed.iter().any(|f| f.ends_with("/sh") || f.ends_with("/bash")),
        "{listed:?}"
    );

    // As the image runs it: uid 10001, nothing but that root filesystem.
    let migrate = in_image(&root, &env, &["migrate"]).output().await.unwrap();
    assert!(
        migrate.status.success(),
        "migrate from the image: {}",
        String::from_utf8_lossy(&migrate.stderr)
    );
    let mut worker = in_image(&root, &env, &["worker"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // The health check the compose file and a container runtime use: the binary itself.
    wait_for(
        Duration::from_secs(30),
        "the worker in the image to answer its healthcheck",
        || {
            let root = root.clone();
            let env = &env;
            async move {
                let s = in_image(&root, env, &["healthcheck"]).output().await.unwrap();
                s.status.success().then_some(())
            }
        },
    )
    .await;
    let lines: Vec<_> = (0..20)
        .map(|i| job_line(&format!("img-{i}"), "gpt-4o-mini", &format!("image test {i}")))
        .collect();
    env.enqueue_lines("image", &lines).await;
    let s = env.wait_batch("image", Duration::from_secs(60)).await;
    assert_eq!((s.succeeded, s.failed), (20, 0));
    assert_eq!(env.mock.state.calls().len(), 20, "the mock answered every job once");
    let _ = worker.start_kill();
    let _ = worker.wait().await;
    let _ = std::fs::remove_dir_all(&root);
}
