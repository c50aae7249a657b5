//! A small TCP fault proxy (this kernel has no netem): put it between sheepdog
//! and RabbitMQ, Postgres or the upstream to cut live connections, refuse new
//! ones, stall the bytes in flight, or pass a Postgres COMMIT on and cut the connection before
//! its answer comes back (the commit happens; the client never learns it).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

#[derive(Default)]
struct State {
    refuse: AtomicBool,
    stall: AtomicBool,
    /// How many more COMMITs to pass on with their connection cut after them.
    lose_commits: AtomicUsize,
    /// How many were.
    commits_lost: AtomicUsize,
    conns: Mutex<Vec<AbortHandle>>,
}

pub struct Proxy {
    pub addr: SocketAddr,
    target: SocketAddr,
    state: Arc<State>,
    accept: AbortHandle,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State::default());
        let st = state.clone();
        let accept = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                if st.refuse.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let Ok(outbound) = TcpStream::connect(target).await else {
                    continue;
                };
                let _ = inbound.set_nodelay(true);
                let _ = outbound.set_nodelay(true);
                let (ri, wi) = inbound.into_split();
                let (ro, wo) = outbound.into_split();
                let s1 = st.clone();
                let s2 = st.clone();
                let t = tokio::spawn(async move {
                    tokio::select! {
                        _ = pipe(ri, wo, s1, true) => {}
                        _ = pipe(ro, wi, s2, false) => {}
                    }
                });
                st.conns.lock().unwrap().push(t.abort_handle());
            }
        })
        .abort_handle();
        Proxy {
            addr,
            target,
            state,
            accept,
        }
    }

    /// `url` with its target's address replaced by the proxy's: its connections go through here.
    pub fn carry(&self, url: &SecretString) -> SecretString {
        SecretString::from(
            url.expose_secret()
                .replace(&self.target.to_string(), &self.addr.to_string()),
        )
    }

    /// Drops every live connection at once, both ways (like a network cut).
    pub fn cut(&self) {
        for c in self.state.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }

    /// Refuses (accepts and drops) new connections while `down`; with `cut`, an outage.
    pub fn set_down(&self, down: bool) {
        self.state.refuse.store(down, Ordering::SeqCst);
    }

    /// Holds every byte in flight while stalled.
    pub fn set_stall(&self, stall: bool) {
        self.state.stall.store(stall, Ordering::SeqCst);
    }

    /// Passes the next `n` COMMITs (a Postgres simple query, in plain text: the client must
    /// not use TLS) on to the server and cuts each one's connection right after it: the
    /// transaction commits, its answer is lost.
    pub fn lose_commit_answers(&self, n: usize) {
        self.state.lose_commits.store(n, Ordering::SeqCst);
    }

    /// How many COMMITs had their answers lost so far.
    pub fn commits_lost(&self) -> usize {
        self.state.commits_lost.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// A Postgres simple query `COMMIT`: type, length 11, the text and its NUL.
const COMMIT: &[u8] = b"Q\0\0\0\x0bCOMMIT\0";

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    st: Arc<State>,
    to_server: bool,
) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        while st.stall.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let lose = to_server
            && buf[..n].windows(COMMIT.len()).any(|w| w == COMMIT)
            && st
                .lose_commits
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |k| k.checked_sub(1))
                .is_ok();
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
        if lose {
            // The server has the COMMIT; both directions close before its answer is relayed.
            let _ = to.flush().await;
            st.commits_lost.fetch_add(1, Ordering::SeqCst);
            return;
        }
    }
}
