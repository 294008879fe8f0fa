//! The Rust worker SDK for Airlock (SPEC 8, 9): a blocking worker loop over the HTTP worker
//! protocol, and an effect ledger that keeps a side effect to at most once per idempotency key.
//!
//! A worker long-polls `POST /api/v1/workers/claim` for its pool, runs a [`Handler`] on each
//! job while a background thread heartbeats the lease, and reports the [`Outcome`] under the
//! lease token. The token fences the job: once the lease lapses (the worker stalled or died)
//! the server requeues the job for another worker and refuses this one's report, so a job is
//! recorded as done at most once even though its handler may run more than once. The
//! [`EffectLedger`] narrows that "more than once" for side effects the worker itself performs.
//!
//! ```no_run
//! use std::sync::atomic::AtomicBool;
//! use airlock_worker::{EffectLedger, Job, OnceError, Outcome, Worker, WorkerConfig};
//! use serde_json::json;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let worker = Worker::new(WorkerConfig {
//!     url: "http://127.0.0.1:8080".into(),
//!     api_key: std::env::var("AIRLOCK_API_KEY")?,
//!     pool: "infra".into(),
//!     ..WorkerConfig::default()
//! })?;
//! let ledger = EffectLedger::open("worker-effects.jsonl")?;
//! let shutdown = AtomicBool::new(false); // set it from a signal handler to stop gracefully
//! worker.run(
//!     |job: &Job| match ledger.once(job.effect_key(), || create_vm(job)) {
//!         // Recorded or not, the VM exists: report success so the job is not retried.
//!         Ok(vm) | Err(OnceError::Unrecorded { result: vm, .. }) => Outcome::Success(vm),
//!         Err(OnceError::Effect(e)) => Outcome::Retryable(e),
//!     },
//!     &shutdown,
//! )?;
//! # Ok(())
//! # }
//! // Passes the effect key on, so a repeat after a crash is recognised by the cloud API too.
//! # fn create_vm(job: &Job) -> Result<serde_json::Value, String> {
//! #     Ok(json!({"vm": "vm-1", "client_token": job.effect_key()}))
//! # }
//! ```
//!
//! The SDK is blocking on purpose: a worker does one job at a time, and plain threads keep it
//! usable from any program without an async runtime. Run several `Worker`s on several threads
//! for parallelism; each claims its own jobs.

mod error;
mod job;
mod ledger;
mod protocol;
mod worker;

pub use error::Error;
pub use job::{End, Handler, Job, Outcome, Report};
pub use ledger::{EffectLedger, LedgerError, OnceError};
pub use worker::{WAIT_MS_DEFAULT, WAIT_MS_MAX, Worker, WorkerConfig};

/// Largest result the server accepts, in bytes of compact JSON (the server's own limit).
pub const RESULT_BYTES_MAX: usize = 256 * 1024;
