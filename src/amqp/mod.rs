//! RabbitMQ: connecting, the topology (`sheepdog.jobs`, `sheepdog.dead`, the
//! retry tiers), and publishing with confirms.

use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use secrecy::{ExposeSecret, SecretString};

use crate::store::{redact_url, scrub};

/// The queue producers publish to (default exchange, this routing key).
pub const JOBS_QUEUE: &str = "sheepdog.jobs";
/// Refused and exhausted jobs, with their reason in `x-sheepdog-error`.
pub const DEAD_QUEUE: &str = "sheepdog.dead";
/// Header carrying a dead letter's reason.
pub const ERROR_HEADER: &str = "x-sheepdog-error";
/// Header counting how often a job went round the retry queues.
pub const RETRIES_HEADER: &str = "x-sheepdog-retries";
/// Delay tiers: a message published to `sheepdog.delay.<N>s` comes back to
/// `sheepdog.jobs` after N seconds.
pub const RETRY_TIERS_SECONDS: &[u64] = &[1, 5, 30, 120, 600];

pub fn retry_queue(seconds: u64) -> String {
    format!("sheepdog.delay.{seconds}s")
}

/// The shortest tier at least `delay` long (the longest tier past it).
pub fn retry_tier_for(delay: Duration) -> u64 {
    let secs = delay.as_secs_f64();
    RETRY_TIERS_SECONDS
        .iter()
        .copied()
        .find(|t| *t as f64 >= secs)
        .unwrap_or(*RETRY_TIERS_SECONDS.last().unwrap())
}

/// Connects, naming the connection so operators can tell replicas apart.
pub async fn connect(url: &SecretString, name: &str) -> anyhow::Result<Connection> {
    let props = ConnectionProperties::default().with_connection_name(LongString::from(name.to_string()));
    Connection::connect(url.expose_secret(), props).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot reach RabbitMQ at {}: {}. Is it running? `scripts/services` starts it (or set AMQP_URL).",
            redact_url(url.expose_secret()),
            scrub(&e.to_string(), url)
        )
    })
}

fn str_value(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.to_string()))
}

/// Declares every queue. Idempotent; the arguments never change between
/// versions without a migration note, since RabbitMQ refuses a redeclare that differs.
pub async fn declare_topology(channel: &Channel) -> anyhow::Result<()> {
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let mut jobs = FieldTable::default();
    jobs.insert(ShortString::from("x-queue-type"), str_value("quorum"));
    jobs.insert(ShortString::from("x-dead-letter-exchange"), str_value(""));
    jobs.insert(ShortString::from("x-dead-letter-routing-key"), str_value(DEAD_QUEUE));
    channel.queue_declare(JOBS_QUEUE.into(), durable, jobs).await?;

    let mut dead = FieldTable::default();
    dead.insert(ShortString::from("x-queue-type"), str_value("quorum"));
    channel.queue_declare(DEAD_QUEUE.into(), durable, dead).await?;

    // The delay tiers are quorum queues with at-least-once dead-lettering: an
    // expired message moves back to `sheepdog.jobs` only once that queue has
    // confirmed it. (A classic queue dead-letters at most once: a message that
    // expires while `sheepdog.jobs` is unavailable, as during a broker restart,
    // is dropped. The fault suite lost jobs that way.)
    for secs in RETRY_TIERS_SECONDS {
        let mut args = FieldTable::default();
        args.insert(ShortString::from("x-queue-type"), str_value("quorum"));
        args.insert(ShortString::from("x-dead-letter-strategy"), str_value("at-least-once"));
        args.insert(ShortString::from("x-overflow"), str_value("reject-publish"));
        args.insert(
            ShortString::from("x-message-ttl"),
            AMQPValue::LongLongInt((*secs * 1000) as i64),
        );
        args.insert(ShortString::from("x-dead-letter-exchange"), str_value(""));
        args.insert(ShortString::from("x-dead-letter-routing-key"), str_value(JOBS_QUEUE));
        channel
            .queue_declare(retry_queue(*secs).as_str().into(), durable, args)
            .await?;
    }
    Ok(())
}

/// Opens a channel in confirm mode.
pub async fn confirm_channel(conn: &Connection) -> anyhow::Result<Channel> {
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    Ok(ch)
}

/// Properties of a job message: persistent JSON.
pub fn job_properties(headers: Option<FieldTable>) -> BasicProperties {
    let p = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type(ShortString::from("application/json"));
    match headers {
        Some(h) => p.with_headers(h),
        None => p,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("the broker refused the message (nack)")]
    Nacked,
    #[error("no queue is bound to routing key {0}: run `sheepdog migrate` first")]
    Unroutable(String),
    #[error(transparent)]
    Amqp(#[from] lapin::Error),
}

/// Publishes to a queue through the default exchange, `mandatory`, and waits for
/// the broker's confirm.
pub async fn publish_confirmed(
    channel: &Channel,
    queue: &str,
    body: &[u8],
    properties: BasicProperties,
) -> Result<(), PublishError> {
    let confirm = channel
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            body,
            properties,
        )
        .await?
        .await?;
    check_confirmation(confirm, queue)
}

pub fn check_confirmation(confirm: Confirmation, queue: &str) -> Result<(), PublishError> {
    match confirm {
        Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
        Confirmation::Ack(Some(_)) => Err(PublishError::Unroutable(queue.to_string())),
        Confirmation::Nack(_) => Err(PublishError::Nacked),
    }
}

/// Reads a string header.
pub fn header_str(props: &BasicProperties, key: &str) -> Option<String> {
    let h = props.headers().as_ref()?;
    match h.inner().get(key)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

/// Reads an integer header.
pub fn header_u32(props: &BasicProperties, key: &str) -> Option<u32> {
    let h = props.headers().as_ref()?;
    match h.inner().get(key)? {
        AMQPValue::LongLongInt(n) => u32::try_from(*n).ok(),
        AMQPValue::LongInt(n) => u32::try_from(*n).ok(),
        AMQPValue::LongUInt(n) => Some(*n),
        AMQPValue::ShortInt(n) => u32::try_from(*n).ok(),
        AMQPValue::ShortUInt(n) => Some(*n as u32),
        _ => None,
    }
}

/// The headers of `props` with `set` applied, for a message we publish anew.
///
/// The broker's own dead-letter history (`x-death`, `x-first-death-*`,
/// `x-last-death-*`) is dropped: a message that carries it into a retry queue a
/// second time looks like a dead-letter cycle to RabbitMQ, which then silently
/// DROPS it when its TTL expires. The fault suite caught exactly that.
pub fn headers_with(props: &BasicProperties, set: &[(&str, AMQPValue)]) -> FieldTable {
    let mut h = FieldTable::default();
    if let Some(old) = props.headers() {
        for (k, v) in old.inner() {
            let k_str = k.as_str();
            if k_str != "x-death" && !k_str.starts_with("x-first-death-") && !k_str.starts_with("x-last-death-") {
                h.insert(k.clone(), v.clone());
            }
        }
    }
    for (k, v) in set {
        h.insert(ShortString::from(k.to_string()), v.clone());
    }
    h
}

pub fn string_value(s: &str) -> AMQPValue {
    str_value(s)
}
