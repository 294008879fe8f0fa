//! How a long-poll claim waits for work (SPEC 9) without polling the store: it sleeps until
//! the queue's notification wakes it (a job this process queued, the store's events, the job
//! bus), until the next queued job of its tenant comes due (a backoff or throttle delay ends,
//! which nothing announces), or until a slow safety-net re-check, whichever comes first. The
//! number of claims one key keeps waiting at once is capped, so that one worker key cannot hold
//! the listener's request slots with idle long-polls.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use airlock_core::ids::{KeyId, TenantId};
use axum::http::StatusCode;
use tokio::sync::futures::Notified;
use tokio::time::Instant;

use crate::error::ApiError;
use crate::state::{AppState, now_ms};

/// Claims waiting at once, by key.
#[derive(Default)]
pub struct ClaimWaits(Mutex<HashMap<KeyId, usize>>);

/// One waiting claim, counted until dropped (answered, or the client went away).
pub struct Waiting<'a> {
    waits: &'a ClaimWaits,
    key: KeyId,
}

impl ClaimWaits {
    /// Counts a claim of `key` that will wait, or 429 with `Retry-After` when the key already
    /// has `max` waiting.
    pub fn enter(&self, key: &KeyId, max: usize) -> Result<Waiting<'_>, ApiError> {
        let mut waits = self.0.lock().map_err(|_| ApiError::internal("claim waits poisoned"))?;
        let waiting = waits.entry(key.clone()).or_default();
        if *waiting >= max {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_long_polls",
                format!("this key already has {max} claims waiting for work; retry when one is answered"),
            )
            .retry_after(1));
        }
        *waiting += 1;
        Ok(Waiting { waits: self, key: key.clone() })
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let Ok(mut waits) = self.waits.0.lock() else { return };
        if let Some(waiting) = waits.get_mut(&self.key) {
            *waiting = waiting.saturating_sub(1);
            if *waiting == 0 {
                waits.remove(&self.key);
            }
        }
    }
}

/// Sleeps until `woken` fires, the tenant's next queued job comes due, the safety-net re-check,
/// or `deadline`, whichever is first.
pub async fn sleep(
    state: &AppState,
    tenant: &TenantId,
    deadline: Instant,
    woken: Notified<'_>,
) -> Result<(), ApiError> {
    let now = now_ms();
    let due = state.store().next_due(tenant, now).await?;
    let started = Instant::now();
    let mut wake = deadline.min(started + state.config().http.long_poll_recheck);
    if let Some(at) = due {
        wake = wake.min(started + Duration::from_millis(u64::try_from(at.saturating_sub(now)).unwrap_or(0)));
    }
    let _ = tokio::time::timeout_at(wake, woken).await;
    Ok(())
}
