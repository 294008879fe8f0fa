//! The distributed job bus: NATS JetStream carries wake-ups between replicas.
//!
//! PostgreSQL stays the source of truth. A job that becomes queued writes an outbox row in the
//! same transaction; a relay publishes the rows here (one message per round and tenant) and
//! deletes them only after JetStream acknowledged the publish. Schedulers consume a durable
//! pull consumer with explicit acks and, for each message, wake their claim loops, which read
//! the job from PostgreSQL (`FOR UPDATE`).
//! So a lost message only delays a dispatch until the next poll, and a duplicate (a crash
//! between publish and delete, a redelivery after a missed ack) is one more harmless wake-up:
//! JetStream's dedupe window is never used (no `Nats-Msg-Id` is sent).
//!
//! The embedded mode has no bus: its wake-up path is the in-process `Notify` of the server.

use std::path::PathBuf;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use futures_util::StreamExt as _;

/// The stream name when none is given.
pub const DEFAULT_STREAM: &str = "AIRLOCK_WORK";

/// How long a wake-up is kept: a consumer that was away longer polls the store instead.
const MAX_AGE: Duration = Duration::from_secs(300);

/// How long the server waits for an ack before redelivering.
const ACK_WAIT: Duration = Duration::from_secs(5);

/// Deliveries of one message before the server gives up on it (it is only a wake-up).
const MAX_DELIVER: i64 = 5;

/// A consumer nobody pulled from for this long (its process is gone) is removed by the server.
const INACTIVE_THRESHOLD: Duration = Duration::from_secs(600);

/// How long a publish waits for JetStream's ack.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(2);

/// How long the subscriber waits before re-attaching after losing its consumer.
const RESUBSCRIBE_DELAY: Duration = Duration::from_millis(500);

/// A bus failure: the server is unreachable, refused, or did not acknowledge in time.
#[derive(Debug, thiserror::Error)]
#[error("nats: {0}")]
pub struct BusError(String);

/// A connect error with its causes (a TLS failure says why only in its source).
fn connect_error(e: &async_nats::ConnectError) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text = format!("{text}: {cause_text}");
        }
        source = cause.source();
    }
    text
}

fn fail(e: impl std::fmt::Display) -> BusError {
    BusError(e.to_string())
}

/// How the bus connection is secured. A `tls://` URL requires TLS, checked against the system's
/// roots unless a CA is given; giving a CA or a client certificate requires TLS for a
/// `nats://` URL too, so that a setting is never silently unused.
#[derive(Clone, Debug, Default)]
pub struct BusTls {
    /// Trust only this CA (PEM) for the server's certificate.
    pub ca: Option<PathBuf>,
    /// A client certificate chain and its key (PEM), for a server that verifies clients.
    pub client: Option<(PathBuf, PathBuf)>,
}

impl BusTls {
    fn options(&self, url: &str, mut options: async_nats::ConnectOptions) -> async_nats::ConnectOptions {
        if url.starts_with("tls://") || self.ca.is_some() || self.client.is_some() {
            options = options.require_tls(true);
        }
        if let Some(ca) = &self.ca {
            options = options.add_root_certificates(ca.clone());
        }
        if let Some((cert, key)) = &self.client {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        options
    }
}

/// A connection to the JetStream job bus.
#[derive(Clone)]
pub struct NatsBus {
    js: jetstream::Context,
    stream: String,
    /// Subjects are `<prefix>.<tenant>`; the stream holds `<prefix>.>`.
    prefix: String,
}

impl NatsBus {
    /// Connects to the NATS server at `url` (`nats://host:port`, or `tls://host:port` for TLS
    /// as `tls` says) and creates the stream `stream_name` if it does not exist (file storage,
    /// a few minutes of retention). The default stream takes the subjects `airlock.work.>`; any
    /// other stream (tests, several deployments on one server) takes `<stream name in lower
    /// case>.>`, so streams never overlap.
    pub async fn connect(url: &str, stream_name: &str, tls: &BusTls) -> Result<Self, BusError> {
        let options = async_nats::ConnectOptions::new()
            .name("airlock")
            .connection_timeout(Duration::from_secs(5))
            .max_reconnects(None);
        let client = tls
            .options(url, options)
            .connect(url)
            .await
            .map_err(|e| BusError(format!("cannot connect to {url}: {}", connect_error(&e))))?;
        let mut js = jetstream::new(client);
        js.set_timeout(PUBLISH_TIMEOUT);
        let prefix = if stream_name == DEFAULT_STREAM {
            "airlock.work".to_owned()
        } else {
            stream_name.to_ascii_lowercase()
        };
        let bus = Self { js, stream: stream_name.to_owned(), prefix };
        bus.ensure_stream().await?;
        Ok(bus)
    }

    /// The stream, created with the bus's settings if missing (idempotent).
    async fn ensure_stream(&self) -> Result<stream::Stream, BusError> {
        self.js
            .get_or_create_stream(stream::Config {
                name: self.stream.clone(),
                subjects: vec![format!("{}.>", self.prefix)],
                max_age: MAX_AGE,
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await
            .map_err(fail)
    }

    /// Publishes one wake-up for jobs of `tenant` that became queued (the message is their ids,
    /// one per line) and waits for JetStream's ack: once this returns `Ok`, the message is
    /// stored. One message per relay round and tenant, not per job: a wake-up says "look at
    /// the store", and a claim that looks takes every job it finds.
    pub async fn publish(&self, tenant: &str, job_ids: &[&str]) -> Result<(), BusError> {
        let token: String = tenant
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' })
            .collect();
        let subject = format!("{}.{token}", self.prefix);
        let ack = self.js.publish(subject, job_ids.join("\n").into()).await.map_err(fail)?;
        ack.await.map_err(fail)?;
        Ok(())
    }

    /// Consumes the durable pull consumer `group` (created if missing; explicit acks, bounded
    /// redelivery, only messages published from now on) for the life of the process: calls
    /// `on_wake` for each message, then acks it. Re-attaches after losing the server. Processes
    /// that must each see every wake-up use distinct groups; processes sharing a group share
    /// the messages.
    pub fn subscribe(
        &self,
        group: String,
        on_wake: impl Fn() + Send + Sync + 'static,
    ) -> tokio::task::JoinHandle<()> {
        let bus = self.clone();
        tokio::spawn(async move {
            loop {
                if let Err(e) = bus.consume(&group, &on_wake).await {
                    tracing::warn!(error = %e, "job bus subscription lost; re-attaching");
                }
                tokio::time::sleep(RESUBSCRIBE_DELAY).await;
            }
        })
    }

    async fn consume(&self, group: &str, on_wake: &(impl Fn() + Send + Sync)) -> Result<(), BusError> {
        let stream = self.ensure_stream().await?;
        let consumer: consumer::PullConsumer = stream
            .get_or_create_consumer(
                group,
                consumer::pull::Config {
                    durable_name: Some(group.to_owned()),
                    ack_policy: consumer::AckPolicy::Explicit,
                    ack_wait: ACK_WAIT,
                    max_deliver: MAX_DELIVER,
                    deliver_policy: consumer::DeliverPolicy::New,
                    inactive_threshold: INACTIVE_THRESHOLD,
                    ..Default::default()
                },
            )
            .await
            .map_err(fail)?;
        let mut messages = consumer.messages().await.map_err(fail)?;
        while let Some(message) = messages.next().await {
            let message = message.map_err(fail)?;
            on_wake();
            // A lost ack means one redelivery: one more wake-up, nothing else.
            if let Err(e) = message.ack().await {
                tracing::debug!(error = %e, "job bus ack failed");
            }
        }
        Err(BusError("the consumer's message stream ended".into()))
    }

    /// The stream's name.
    pub fn stream(&self) -> &str {
        &self.stream
    }
}

/// Deletes the stream `name` on the NATS server at `url`, with its messages and consumers (the
/// benchmark's clean-up; a stream that is already gone is not an error).
pub async fn delete_stream(url: &str, name: &str) -> Result<(), BusError> {
    let client = async_nats::ConnectOptions::new()
        .name("airlock")
        .connection_timeout(Duration::from_secs(5))
        .connect(url)
        .await
        .map_err(|e| BusError(format!("cannot connect to {url}: {e}")))?;
    let js = jetstream::new(client);
    match js.delete_stream(name).await {
        Ok(_) => Ok(()),
        Err(e) if e.to_string().contains("not found") => Ok(()),
        Err(e) => Err(fail(e)),
    }
}
