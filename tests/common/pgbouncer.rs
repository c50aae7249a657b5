//! A PgBouncer of its own (Debian's `pgbouncer` package, which `scripts/services` installs) in
//! transaction mode in front of the machine's Postgres, on a free port: what most production
//! fleets put between their services and Postgres.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

/// A running `pgbouncer` in `pool_mode = transaction`; killed when dropped.
pub struct PgBouncer {
    _child: tokio::process::Child,
    pub port: u16,
    dir: PathBuf,
}

impl PgBouncer {
    /// Starts one, as Debian's package ships it, with a pool small enough that its clients share
    /// its servers (so a statement left outside a transaction would reach another server).
    pub async fn start() -> PgBouncer {
        let port = super::free_port();
        let dir = std::env::temp_dir().join(format!("sheepdog-pgbouncer-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("users.txt"), "\"postgres\" \"\"\n").unwrap();
        std::fs::write(
            dir.join("pgbouncer.ini"),
            format!(
                "[databases]\n* = host=127.0.0.1 port=5432\n\n[pgbouncer]\nlisten_addr = 127.0.0.1\n\
                 listen_port = {port}\nauth_type = trust\nauth_file = {}\npool_mode = transaction\n\
                 max_client_conn = 1000\ndefault_pool_size = 10\n\
                 ignore_startup_parameters = extra_float_digits,options\n",
                dir.join("users.txt").display()
            ),
        )
        .unwrap();
        let root = std::process::Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false);
        let mut cmd = tokio::process::Command::new("pgbouncer");
        // PgBouncer refuses to run as root: as root it is told to switch to `postgres`.
        if root {
            cmd.args(["-u", "postgres"]);
        }
        let child = cmd
            .arg(dir.join("pgbouncer.ini"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("pgbouncer (scripts/services installs Debian's package)");
        super::wait_for(Duration::from_secs(20), "pgbouncer to listen", || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .ok()
                .map(|_| ())
        })
        .await;
        PgBouncer {
            _child: child,
            port,
            dir,
        }
    }

    /// The URL of `database` through this PgBouncer.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
