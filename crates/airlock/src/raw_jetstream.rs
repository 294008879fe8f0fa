//! The raw JetStream loop the benchmarks compare Airlock with: a plain NATS client doing what
//! one job does on the bus at the least (publish with ack, pull, ack), with the bus's stream
//! settings (file storage), so that "Airlock / raw JetStream" compares like with like.

use std::collections::VecDeque;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use futures_util::StreamExt as _;

/// Messages of `payload` bytes published (each publish ack awaited, up to `window` in flight) to
/// a fresh file-backed stream, consumed from a durable pull consumer and acked one by one, for
/// `duration`: the messages consumed and acked. The stream is deleted afterwards.
pub async fn run(url: &str, payload: usize, window: usize, duration: Duration) -> Result<u64, String> {
    let client = async_nats::ConnectOptions::new()
        .name("airlock-bench")
        .connection_timeout(Duration::from_secs(5))
        .connect(url)
        .await
        .map_err(|e| format!("cannot connect to {url}: {e}"))?;
    let js = jetstream::new(client);
    let name = format!("AIRLOCK_BENCH_{}", std::process::id());
    let subject = format!("{}.bench", name.to_ascii_lowercase());
    let stream = js
        .get_or_create_stream(stream::Config {
            name: name.clone(),
            subjects: vec![subject.clone()],
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())?;
    let result = pump(&js, &stream, subject, payload, window.max(1), duration).await;
    let _ = js.delete_stream(&name).await;
    result
}

async fn pump(
    js: &jetstream::Context,
    stream: &stream::Stream,
    subject: String,
    payload: usize,
    window: usize,
    duration: Duration,
) -> Result<u64, String> {
    let consumer: consumer::PullConsumer = stream
        .get_or_create_consumer(
            "bench",
            consumer::pull::Config {
                durable_name: Some("bench".into()),
                ack_policy: consumer::AckPolicy::Explicit,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| e.to_string())?;
    let mut messages = consumer.messages().await.map_err(|e| e.to_string())?;
    let deadline = tokio::time::Instant::now() + duration;
    let body = "j".repeat(payload);
    let publisher = {
        let js = js.clone();
        tokio::spawn(async move {
            let mut acks = VecDeque::with_capacity(window);
            while tokio::time::Instant::now() < deadline {
                if acks.len() >= window
                    && let Some(ack) = acks.pop_front()
                {
                    let _: jetstream::context::PublishAckFuture = ack;
                    ack.await.map_err(|e| e.to_string())?;
                }
                acks.push_back(
                    js.publish(subject.clone(), body.clone().into()).await.map_err(|e| e.to_string())?,
                );
            }
            for ack in acks {
                ack.await.map_err(|e| e.to_string())?;
            }
            Ok::<(), String>(())
        })
    };
    let mut consumed = 0_u64;
    while let Ok(Some(message)) = tokio::time::timeout_at(deadline, messages.next()).await {
        message.map_err(|e| e.to_string())?.ack().await.map_err(|e| e.to_string())?;
        consumed += 1;
    }
    publisher.await.map_err(|e| e.to_string())??;
    Ok(consumed)
}
