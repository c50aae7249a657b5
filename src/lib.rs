//! sheepdog: a queue-driven background worker for batch LLM chat-completion
//! jobs. See `ARCHITECTURE.md` for the path of one job.

pub mod amqp;
pub mod commands;
pub mod config;
pub mod dead;
pub mod estimate;
pub mod health;
pub mod job;
pub mod limits;
pub mod metrics;
pub mod money;
pub mod plan;
pub mod prices;
pub mod publish;
pub mod redact;
pub mod retry;
pub mod store;
pub mod tokens;
pub mod upstream;
pub mod usage;
pub mod web;
pub mod worker;

/// Picks rustls' ring provider once per process (several crates link rustls
/// with different default providers, and rustls refuses to guess).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
