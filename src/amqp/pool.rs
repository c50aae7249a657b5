//! The AMQP channels that publishers and readers share: a deadpool managed pool of confirm
//! channels over one connection of their own.
//!
//! The outbox (dead letters and the results stream), intake's dead letters, `enqueue`, the HTTP
//! API and the queue-depth reads (the worker's gauges, the dashboard) take a channel from it for
//! one publish or read and hand it back. A channel that broke (its connection went, or the broker
//! closed it, as a passive declare of a missing queue does) is not handed out again: deadpool
//! recycles it and the manager opens another, reconnecting first when the connection itself is
//! gone. A consumer keeps its own long-lived channel, outside the pool.

use deadpool::managed::{self, Metrics, Object, Pool, PoolError, RecycleError, RecycleResult};
use lapin::{Channel, Connection};
use secrecy::SecretString;

/// The environment variable sizing the pool: channels a process keeps at most.
pub const CHANNELS_ENV: &str = "SHEEPDOG_AMQP_CHANNELS";
/// Channels a process keeps by default.
pub const DEFAULT_CHANNELS: usize = 4;

/// The pool size from `SHEEPDOG_AMQP_CHANNELS` (at least 1), or the default.
pub fn channels_setting() -> usize {
    std::env::var(CHANNELS_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .map_or(DEFAULT_CHANNELS, |n| n.max(1))
}

/// Opens confirm channels on a connection it reopens when it is gone.
pub struct ChannelManager {
    url: SecretString,
    name: String,
    conn: tokio::sync::Mutex<Option<Connection>>,
}

impl ChannelManager {
    async fn channel(&self) -> anyhow::Result<Channel> {
        let mut conn = self.conn.lock().await;
        if conn.as_ref().is_none_or(|c| !c.status().connected()) {
            *conn = Some(super::connect(&self.url, &self.name).await?);
        }
        let opened = match conn.as_ref() {
            Some(c) => super::confirm_channel(c).await,
            None => unreachable!("connected above"),
        };
        if opened.is_err() {
            // The next channel starts from a new connection.
            *conn = None;
        }
        opened
    }
}

impl managed::Manager for ChannelManager {
    type Type = Channel;
    type Error = anyhow::Error;

    async fn create(&self) -> Result<Channel, anyhow::Error> {
        self.channel().await
    }

    async fn recycle(&self, ch: &mut Channel, _: &Metrics) -> RecycleResult<anyhow::Error> {
        if ch.status().connected() {
            Ok(())
        } else {
            Err(RecycleError::message("the channel is closed"))
        }
    }
}

/// A channel taken from the pool; it goes back when dropped.
pub type PooledChannel = Object<ChannelManager>;

/// The shared channels of one process. Cheap to clone.
#[derive(Clone)]
pub struct Channels {
    pool: Pool<ChannelManager>,
}

impl Channels {
    /// A pool of `SHEEPDOG_AMQP_CHANNELS` confirm channels on one connection named `name`.
    pub fn new(url: &SecretString, name: &str) -> Channels {
        Channels::with_size(url, name, channels_setting())
    }

    /// A pool of at most `size` confirm channels on one connection named `name`. Nothing is
    /// opened before the first `get`.
    pub fn with_size(url: &SecretString, name: &str, size: usize) -> Channels {
        let manager = ChannelManager {
            url: url.clone(),
            name: name.to_string(),
            conn: tokio::sync::Mutex::new(None),
        };
        let pool = Pool::builder(manager)
            .max_size(size.max(1))
            .build()
            .expect("a pool without timeouts needs no runtime");
        Channels { pool }
    }

    /// An open confirm channel: a pooled one, or a new one (reconnecting when needed).
    pub async fn get(&self) -> anyhow::Result<PooledChannel> {
        self.pool.get().await.map_err(|e| match e {
            PoolError::Backend(e) => e,
            other => anyhow::anyhow!("no AMQP channel: {other}"),
        })
    }

    /// Closes the pooled channels' connection.
    pub async fn close(&self) {
        // Each idle channel closed and answered first: a channel dropped as the connection
        // closes is caught mid-close, which lapin logs as an error.
        for ch in self.pool.retain(|_, _| false).removed {
            let _ = ch.close(200, "done".into()).await;
        }
        self.pool.close();
        let conn = self.pool.manager().conn.lock().await.take();
        if let Some(c) = conn {
            let _ = c.close(200, "done".into()).await;
        }
    }
}
