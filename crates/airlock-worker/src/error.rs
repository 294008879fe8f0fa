//! What can go wrong talking to the server, split by what the caller should do about it:
//! wait and try again (`Unreachable`, `Unavailable`), give up on the job (`LeaseLost`), or stop
//! and fix the setup (`Config`, `Refused`, `Protocol`).

/// An error from the worker protocol.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The worker configuration is unusable (bad URL, empty key, `wait_ms` out of range).
    #[error("invalid worker configuration: {0}")]
    Config(String),
    /// No answer: connection refused, reset or timed out. Transient.
    #[error("cannot reach the Airlock server at {url}: {message}")]
    Unreachable {
        /// The server's base URL.
        url: String,
        /// What the transport said.
        message: String,
    },
    /// The server answered 5xx or 429. Transient.
    #[error("the server is unavailable (HTTP {status}): {message}")]
    Unavailable {
        /// The HTTP status.
        status: u16,
        /// The server's message, or the start of its body.
        message: String,
    },
    /// 409 `lease_lost`: the lease lapsed or was handed to another worker; stop work on the job.
    #[error("the lease is lost: {0}")]
    LeaseLost(String),
    /// Any other refusal (401, 403, 400 ...): retrying the same request will not help.
    #[error("the server refused the request: {code} (HTTP {status}): {message}")]
    Refused {
        /// The HTTP status.
        status: u16,
        /// The stable error code from the body, e.g. `unauthorized`.
        code: String,
        /// The server's message.
        message: String,
    },
    /// The server answered something this SDK does not understand.
    #[error("unexpected answer from the server: {0}")]
    Protocol(String),
}

impl Error {
    /// Whether the same request may succeed later without anything changing on this side.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unreachable { .. } | Self::Unavailable { .. })
    }
}
