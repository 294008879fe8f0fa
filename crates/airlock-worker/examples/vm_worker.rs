//! A worker for `infra.vm.create` written with the SDK: the smallest complete use of the loop
//! and the effect ledger. Run against a server with a worker key:
//!
//! ```sh
//! AIRLOCK_URL=http://127.0.0.1:8080 AIRLOCK_API_KEY=... cargo run -p airlock-worker --example vm_worker
//! ```
//!
//! It has no signal handling (the SDK needs none; `airlock worker` shows how to wire SIGTERM to
//! the shutdown flag), so Ctrl-C kills it mid-job: the lease lapses and another worker, or this
//! one restarted, retries the job, and the ledger answers for a VM already created.

use std::sync::atomic::AtomicBool;

use airlock_worker::{EffectLedger, Job, OnceError, Outcome, Worker, WorkerConfig};
use serde_json::{Value, json};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let worker = Worker::new(WorkerConfig {
        url: std::env::var("AIRLOCK_URL").unwrap_or_else(|_| "http://127.0.0.1:8080".into()),
        api_key: std::env::var("AIRLOCK_API_KEY")?,
        name: "vm-worker-example".into(),
        ..WorkerConfig::default()
    })?;
    let ledger = EffectLedger::open("vm-worker-effects.jsonl")?;
    let shutdown = AtomicBool::new(false);
    worker.run(
        |job: &Job| {
            if job.topic != "infra.vm.create" {
                return Outcome::Failed(format!("this worker does not handle `{}`", job.topic));
            }
            match ledger.once(job.effect_key(), || create_vm(job)) {
                Ok(vm) | Err(OnceError::Unrecorded { result: vm, .. }) => Outcome::Success(vm),
                Err(OnceError::Effect(e)) => Outcome::Retryable(e),
            }
        },
        &shutdown,
    )?;
    Ok(())
}

/// Stands in for a cloud API call. A real one passes `job.effect_key()` as the API's own
/// idempotency token, so a repeat after a crash in the ledger's window creates nothing new.
fn create_vm(job: &Job) -> Result<Value, String> {
    let size = job.payload.get("size").and_then(Value::as_u64).unwrap_or(1);
    eprintln!("creating a VM of size {size} for {} (attempt {})", job.id, job.attempt);
    Ok(json!({"vm": format!("vm-{}", job.id), "size": size, "client_token": job.effect_key()}))
}
