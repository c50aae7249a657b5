//! RabbitMQ: connecting, the topology (`sheepdog.jobs`, `sheepdog.dead`), every header name
//! and every publish (dead letters, the outbox, replays), always with confirms.

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use secrecy::{ExposeSecret, SecretString};

use crate::redact::{redact_url, scrub};

mod pool;
pub use pool::{channels_setting, Channels, PooledChannel, CHANNELS_ENV, DEFAULT_CHANNELS};

/// The queue producers publish to (default exchange, this routing key).
pub const JOBS_QUEUE: &str = "sheepdog.jobs";
/// Refused and exhausted jobs, with their reason in `x-sheepdog-error`.
pub const DEAD_QUEUE: &str = "sheepdog.dead";
/// The durable topic exchange of the results stream (contract §8): routing key = batch id.
pub const RESULTS_EXCHANGE: &str = "sheepdog.results";
/// Header naming a results-stream event: `job.finished` or `batch.finished`.
pub const EVENT_HEADER: &str = "x-sheepdog-event";
/// Header carrying a dead letter's reason.
pub const ERROR_HEADER: &str = "x-sheepdog-error";
/// Header counting how often `dead replay` sent a message back.
pub const REPLAYS_HEADER: &str = "x-sheepdog-replays";

/// How long one broker of the list may take to accept a connection before the next is tried.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Connects, naming the connection so operators can tell replicas apart. `url` may list several
/// brokers (the nodes of a cluster), comma-separated: they are tried in turn from a random one
/// (so replicas spread over the nodes), and the first that answers is used. A caller that loses
/// its connection calls this again, and so moves to a node that is still up.
pub async fn connect(url: &SecretString, name: &str) -> anyhow::Result<Connection> {
    let urls = broker_urls(url.expose_secret());
    if urls.is_empty() {
        anyhow::bail!("AMQP_URL is empty: give one broker URL, or several separated by commas");
    }
    let tls = tls_config()?;
    let first = rand::random_range(0..urls.len());
    let mut failures = Vec::with_capacity(urls.len());
    for i in 0..urls.len() {
        let one = urls[(first + i) % urls.len()];
        let uri = match broker_uri(one) {
            Ok(uri) => uri,
            Err(e) => {
                failures.push(format!("{} ({})", redact_url(one), scrub(&e, url)));
                continue;
            }
        };
        let props = ConnectionProperties::default().with_connection_name(LongString::from(name.to_string()));
        let runtime = lapin::runtime::default_runtime()?;
        let connecting = Connection::connect_uri_with_config(uri, props, tls.clone(), runtime);
        let failure = match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
            Ok(Ok(conn)) => {
                if urls.len() > 1 {
                    tracing::info!(broker = %redact_url(one), "connected to RabbitMQ");
                }
                return Ok(conn);
            }
            Ok(Err(e)) => scrub(&e.to_string(), url),
            Err(_) => format!("no answer in {} s", CONNECT_TIMEOUT.as_secs()),
        };
        failures.push(format!("{} ({failure})", redact_url(one)));
    }
    // A broker that answered with a certificate we refuse is running: say what to check instead.
    let hint = if failures.iter().any(|f| f.contains("certificate")) {
        format!("The broker's TLS certificate was refused: it must be valid for the URL's host and signed by a public CA or one in {CA_FILE_ENV}.")
    } else {
        "Is it running? `scripts/services` starts it (or set AMQP_URL).".to_string()
    };
    Err(anyhow::anyhow!(
        "cannot reach RabbitMQ at {}. {hint}",
        failures.join("; ")
    ))
}

/// The frame size sheepdog proposes when the URL names none (`?frame_max=` in `AMQP_URL` wins).
/// lapin keeps two buffers of 32 frames per connection, written through at once: at RabbitMQ's
/// own 128 KiB that is 8 MiB of memory per connection; at 16 KiB, 1 MiB. A job's message is a
/// few hundred bytes to a few KiB; a larger one goes in more frames.
pub const FRAME_MAX: u32 = 16 * 1024;

/// One broker URL, parsed, with sheepdog's frame size unless the URL names its own.
fn broker_uri(one: &str) -> Result<lapin::uri::AMQPUri, String> {
    let mut uri: lapin::uri::AMQPUri = one.parse()?;
    uri.query.frame_max.get_or_insert(FRAME_MAX);
    Ok(uri)
}

/// The environment variable naming a PEM file of CA certificates that `amqps://` brokers are
/// verified against, besides the public roots (a private CA).
pub const CA_FILE_ENV: &str = "SHEEPDOG_AMQP_CA_FILE";

fn tls_config() -> anyhow::Result<lapin::tcp::OwnedTLSConfig> {
    let cert_chain = match std::env::var_os(CA_FILE_ENV).filter(|v| !v.is_empty()) {
        None => None,
        Some(path) => Some(std::fs::read_to_string(&path).map_err(|e| {
            anyhow::anyhow!(
                "{CA_FILE_ENV}: cannot read {}: {e}",
                std::path::Path::new(&path).display()
            )
        })?),
    };
    Ok(lapin::tcp::OwnedTLSConfig {
        identity: None,
        cert_chain,
    })
}

/// The broker URLs of an `AMQP_URL` value: one, or several separated by commas.
pub fn broker_urls(value: &str) -> Vec<&str> {
    value.split(',').map(str::trim).filter(|u| !u.is_empty()).collect()
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

    channel
        .exchange_declare(
            RESULTS_EXCHANGE.into(),
            lapin::ExchangeKind::Topic,
            lapin::options::ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;

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

/// Publishes a delivery, body and headers unchanged, to `sheepdog.dead` with its reason in
/// `x-sheepdog-error`, and waits for the confirm.
pub async fn dead_letter(ch: &Channel, delivery: &lapin::message::Delivery, reason: &str) -> Result<(), PublishError> {
    let headers = headers_with(&delivery.properties, &[(ERROR_HEADER, str_value(reason))]);
    let props = delivery.properties.clone().with_headers(headers).with_delivery_mode(2);
    publish_confirmed(ch, DEAD_QUEUE, &delivery.data, props).await
}

/// Sends a dead letter back to `sheepdog.jobs` (`dead replay`): its reason dropped, its replay
/// count raised.
pub async fn replay(ch: &Channel, delivery: &lapin::message::Delivery) -> Result<(), PublishError> {
    let n = header_u32(&delivery.properties, REPLAYS_HEADER).unwrap_or(0) + 1;
    let mut map = headers_with(
        &delivery.properties,
        &[(REPLAYS_HEADER, AMQPValue::LongLongInt(n as i64))],
    )
    .inner()
    .clone();
    map.retain(|k, _| k.as_str() != ERROR_HEADER);
    let props = delivery
        .properties
        .clone()
        .with_headers(FieldTable::from(map))
        .with_delivery_mode(2);
    publish_confirmed(ch, JOBS_QUEUE, &delivery.data, props).await
}

/// A message to publish that was prepared elsewhere (the outbox).
pub struct Outgoing<'a> {
    /// `""` (the default exchange, routing to a queue) or an exchange name.
    pub exchange: &'a str,
    pub routing_key: &'a str,
    /// String headers, as a JSON object.
    pub headers: &'a serde_json::Value,
    pub body: &'a [u8],
}

/// Publishes messages, pipelined, and waits for every confirm. Messages for the default
/// exchange (queues) are `mandatory`: a missing queue is an error. One result per message.
pub async fn publish_all(ch: &Channel, messages: &[Outgoing<'_>]) -> Vec<Result<(), PublishError>> {
    let mut pending = Vec::with_capacity(messages.len());
    for m in messages {
        let mut headers = FieldTable::default();
        if let Some(obj) = m.headers.as_object() {
            for (k, v) in obj {
                let v = match v {
                    serde_json::Value::String(s) => str_value(s),
                    other => str_value(&other.to_string()),
                };
                headers.insert(ShortString::from(k.clone()), v);
            }
        }
        let props = job_properties(Some(headers));
        let mandatory = m.exchange.is_empty();
        let r = ch
            .basic_publish(
                m.exchange.into(),
                m.routing_key.into(),
                BasicPublishOptions {
                    mandatory,
                    ..Default::default()
                },
                m.body,
                props,
            )
            .await;
        pending.push(r);
    }
    let mut out = Vec::with_capacity(messages.len());
    for (m, r) in messages.iter().zip(pending) {
        let r = match r {
            Ok(confirm) => match confirm.await {
                Ok(Confirmation::Ack(Some(_))) if !m.exchange.is_empty() => Ok(()),
                Ok(c) => check_confirmation(c, m.routing_key),
                Err(e) => Err(PublishError::Amqp(e)),
            },
            Err(e) => Err(PublishError::Amqp(e)),
        };
        out.push(r);
    }
    out
}

/// Publishes job messages to `sheepdog.jobs` (persistent, `mandatory`), pipelined, and waits for
/// every confirm. One result per message.
pub async fn publish_jobs(ch: &Channel, payloads: &[&[u8]]) -> Vec<Result<(), PublishError>> {
    let mut pending = Vec::with_capacity(payloads.len());
    for body in payloads {
        pending.push(
            ch.basic_publish(
                "".into(),
                JOBS_QUEUE.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body,
                job_properties(None),
            )
            .await,
        );
    }
    let mut out = Vec::with_capacity(payloads.len());
    for r in pending {
        out.push(match r {
            Ok(confirm) => confirm
                .await
                .map_err(PublishError::from)
                .and_then(|c| check_confirmation(c, JOBS_QUEUE)),
            Err(e) => Err(PublishError::Amqp(e)),
        });
    }
    out
}

/// Messages ready in a queue.
pub async fn queue_depth(ch: &Channel, queue: &str) -> Result<u32, lapin::Error> {
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    Ok(ch
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await?
        .message_count())
}
