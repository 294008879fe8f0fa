//! The HTTP listener. It drives hyper directly (not `axum::serve`, which runs without a timer and
//! so without hyper's header-read timeout) so that a listener open to untrusted clients holds:
//! a header-read timeout, an idle timeout between requests, a connection cap below the file
//! limit (connections over it get a 503 at once), and a shutdown that drains for a bounded
//! time. The per-request timeout and the in-flight limit are middleware of the router
//! ([`crate::limit`]), so that they apply to every router and show in the request metrics.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use airlock_core::defaults;
use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;
use tower::ServiceExt as _;

use crate::tls::TlsConfig;

/// The listener's limits (config section `http:`); defaults from the one defaults table.
#[derive(Clone, Debug)]
pub struct HttpLimits {
    /// Longest a client may take to send a request's headers.
    pub header_read_timeout: Duration,
    /// Longest a connection may stay silent with no request in progress.
    pub idle_timeout: Duration,
    /// Longest one request may take (a long-poll claim: plus its wait).
    pub request_timeout: Duration,
    /// Requests served at once; the excess gets 503 with `Retry-After`.
    pub in_flight_max: usize,
    /// Open connections (lowered at start to stay below the file limit).
    pub connections_max: usize,
    /// How long a shutdown waits for in-flight requests.
    pub drain_timeout: Duration,
    /// Long-poll claims one key may keep waiting at once; the excess gets 429 with `Retry-After`.
    pub long_polls_per_key_max: usize,
    /// How often a waiting claim looks at the queue when nothing woke it and no job came due.
    pub long_poll_recheck: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_millis(defaults::HTTP_HEADER_READ_TIMEOUT_MS),
            idle_timeout: Duration::from_millis(defaults::HTTP_IDLE_TIMEOUT_MS),
            request_timeout: Duration::from_millis(defaults::HTTP_REQUEST_TIMEOUT_MS),
            in_flight_max: defaults::HTTP_IN_FLIGHT_MAX,
            connections_max: defaults::HTTP_CONNECTIONS_MAX,
            drain_timeout: Duration::from_millis(defaults::HTTP_DRAIN_TIMEOUT_MS),
            long_polls_per_key_max: defaults::CLAIM_LONG_POLLS_PER_KEY_MAX,
            long_poll_recheck: Duration::from_millis(defaults::CLAIM_RECHECK_MS),
        }
    }
}

/// What a connection over the cap is told before it is closed.
const REFUSAL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
retry-after: 1\r\nconnection: close\r\ncontent-length: 88\r\n\r\n\
{\"error\":\"overloaded\",\"message\":\"too many open connections; retry\",\"retry_after_secs\":1}";

/// Pause after a failed `accept` (out of file descriptors): retrying at once would spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// The soft file limit of this process (`Max open files` in `/proc/self/limits`), when known.
fn file_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.trim_start_matches("Max open files").split_whitespace().next()?.parse().ok()
}

/// The connection cap: the configured one, lowered to stay below the file limit.
pub fn connection_cap(configured: usize) -> usize {
    match file_limit() {
        Some(limit) => configured.min(limit.saturating_sub(defaults::HTTP_FD_RESERVE)).max(1),
        None => configured.max(1),
    }
}

/// Serves `router` on `listener` (over TLS when `tls` is given) until `shutdown` completes,
/// then stops accepting, asks every connection to close after its current request, and waits
/// at most `limits.drain_timeout` for them.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: HttpLimits,
    tls: Option<TlsConfig>,
    shutdown: impl Future<Output = ()>,
) {
    let cap = connection_cap(limits.connections_max);
    tracing::info!(connections_max = cap, in_flight_max = limits.in_flight_max, "listener limits");
    let permits = Arc::new(Semaphore::new(cap));
    let (stop, stopped) = watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            // Over the cap: answer without a task and close, so the refusal costs nothing more.
            if tls.is_none() {
                let _ = stream.try_write(REFUSAL);
            }
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (router, limits, stopped) = (router.clone(), limits.clone(), stopped.clone());
        let acceptor = tls.as_ref().map(TlsConfig::acceptor);
        tokio::spawn(async move {
            match acceptor {
                None => connection(stream, peer, router, &limits, stopped).await,
                // The handshake counts against the header-read budget.
                Some(acceptor) => {
                    match tokio::time::timeout(limits.header_read_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => connection(stream, peer, router, &limits, stopped).await,
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
            drop(permit);
        });
    }
    drop(listener);
    let _ = stop.send(true);
    let all = u32::try_from(cap).unwrap_or(u32::MAX);
    match tokio::time::timeout(limits.drain_timeout, permits.acquire_many(all)).await {
        Ok(_) => tracing::info!("stopped: in-flight requests drained"),
        Err(_) => tracing::warn!(
            open = cap.saturating_sub(permits.available_permits()),
            drain_ms = limits.drain_timeout.as_millis(),
            "stopped: connections still open after the drain timeout were dropped"
        ),
    }
}

/// One connection: HTTP/1.1 with keep-alive, closed when idle or asked to stop.
async fn connection<IO>(
    io: IO,
    peer: SocketAddr,
    router: Router,
    limits: &HttpLimits,
    mut stopped: watch::Receiver<bool>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Tracked { inner: io, activity: Arc::clone(&activity) });
    let requests = Arc::clone(&activity);
    let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
        request.extensions_mut().insert(ConnectInfo(peer));
        let busy = Busy::new(Arc::clone(&requests));
        let router = router.clone();
        async move {
            let response = router.oneshot(request).await;
            drop(busy);
            response
        }
    });
    let mut builder = http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout).keep_alive(true);
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    let mut closing = false;
    loop {
        let check = if activity.busy() {
            Instant::now() + limits.idle_timeout
        } else {
            activity.last() + limits.idle_timeout
        };
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
                return;
            }
            () = tokio::time::sleep_until(check), if !closing => {
                if !activity.busy() && activity.last() + limits.idle_timeout <= Instant::now() {
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
            }
            _ = stopped.changed(), if !closing => {
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
        }
    }
}

/// When a connection last moved a byte, and how many of its requests are being served.
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
    busy: AtomicUsize,
}

impl Activity {
    fn new() -> Self {
        Self { start: Instant::now(), last_ms: AtomicU64::new(0), busy: AtomicUsize::new(0) }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }

    fn busy(&self) -> bool {
        self.busy.load(Ordering::Relaxed) > 0
    }
}

/// A request being served on a connection (which is therefore not idle).
struct Busy(Arc<Activity>);

impl Busy {
    fn new(activity: Arc<Activity>) -> Self {
        activity.busy.fetch_add(1, Ordering::Relaxed);
        Self(activity)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.touch();
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A connection's stream that records when bytes move.
struct Tracked<IO> {
    inner: IO,
    activity: Arc<Activity>,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Tracked<IO> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.touch();
        }
        result
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Tracked<IO> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_write(cx, buf);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        result
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_refusal_is_a_complete_response() {
        let text = std::str::from_utf8(REFUSAL).unwrap_or_default();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or_default();
        assert!(head.contains(&format!("content-length: {}", body.len())), "{text}");
        assert!(serde_json::from_str::<serde_json::Value>(body).is_ok(), "{body}");
    }

    #[test]
    fn the_cap_stays_below_the_file_limit() {
        let limit = file_limit().unwrap_or(usize::MAX);
        assert!(connection_cap(usize::MAX) <= limit.saturating_sub(defaults::HTTP_FD_RESERVE).max(1));
        assert_eq!(connection_cap(3), 3.min(limit.saturating_sub(defaults::HTTP_FD_RESERVE)).max(1));
    }
}
