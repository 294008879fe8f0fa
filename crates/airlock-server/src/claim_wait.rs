//! How a long-poll claim waits for work (SPEC 9) without polling the store: it sleeps until
//! the queue's notification wakes it (a job this process queued, the store's events, the job
//! bus), until the next queued job of its tenant comes due (a backoff or throttle delay ends,
//! which nothing announces), or until a slow safety-net re-check, whichever comes first. The
//! number of claims one key keeps waiting at once is capped, so that one worker key cannot hold
//! the listener's request slots with idle long-polls.
//!
//! A wake-up wakes every waiting claim, and all but one find nothing: they share one read of
//! the tenant's next due time ([`Work`]), which holds until the queue changes again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use airlock_core::Millis;
use airlock_core::ids::{KeyId, TenantId};
use airlock_store::StoreError;
use axum::http::StatusCode;
use tokio::sync::Notify;
use tokio::sync::futures::Notified;
use tokio::time::Instant;

use crate::error::ApiError;
use crate::state::{AppState, now_ms};

/// What wakes waiting claims, and each tenant's next due time as last read from the store.
#[derive(Default)]
pub struct Work {
    notify: Notify,
    /// Counts the queue's changes this process learns of; a due time read before the latest
    /// may be out of date.
    changes: AtomicU64,
    next_due: Mutex<HashMap<TenantId, Arc<tokio::sync::Mutex<Option<Due>>>>>,
}

/// A tenant's next due time (`None`: no queued job is due later) as read after `changes`.
#[derive(Clone, Copy)]
struct Due {
    changes: u64,
    at: Option<Millis>,
}

impl Work {
    /// Wakes every waiting claim: work may have become dispatchable.
    pub fn wake(&self) {
        self.changed();
        self.notify.notify_waiters();
    }

    /// The queue changed in a way no claim needs waking for (a job put back for later): the
    /// next due time is read again.
    pub fn changed(&self) {
        self.changes.fetch_add(1, Ordering::AcqRel);
    }

    /// Fires at the next [`Work::wake`]; it counts from its creation, before being awaited.
    pub fn notified(&self) -> Notified<'_> {
        self.notify.notified()
    }

    /// The tenant's next due time after `now`: the last one `read` while the queue has not
    /// changed since and that time is still ahead, else a fresh `read` (one at a time per
    /// tenant, so that the claims a wake-up found nothing for read it once).
    async fn next_due<F>(
        &self,
        tenant: &TenantId,
        now: Millis,
        read: impl FnOnce() -> F,
    ) -> Result<Option<Millis>, ApiError>
    where
        F: Future<Output = Result<Option<Millis>, StoreError>>,
    {
        let slot = {
            let mut slots =
                self.next_due.lock().map_err(|_| ApiError::internal("next due times poisoned"))?;
            Arc::clone(slots.entry(tenant.clone()).or_default())
        };
        let mut due = slot.lock().await;
        let changes = self.changes.load(Ordering::Acquire);
        if let Some(known) = *due
            && known.changes == changes
            && known.at.is_none_or(|at| at > now)
        {
            return Ok(known.at);
        }
        let at = read().await?;
        *due = Some(Due { changes, at });
        Ok(at)
    }
}

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
    let due = state.work().next_due(tenant, now, || state.store().next_due(tenant, now)).await?;
    let started = Instant::now();
    let mut wake = deadline.min(started + state.config().http.long_poll_recheck);
    if let Some(at) = due {
        wake = wake.min(started + Duration::from_millis(u64::try_from(at.saturating_sub(now)).unwrap_or(0)));
    }
    let _ = tokio::time::timeout_at(wake, woken).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    /// `work.next_due` at `now` for tenant `acme`, reading `stored` (and counting the reads).
    async fn due(work: &Work, reads: &AtomicUsize, now: Millis, stored: Option<Millis>) -> Option<Millis> {
        let read = || async {
            reads.fetch_add(1, Ordering::Relaxed);
            Ok(stored)
        };
        work.next_due(&"acme".parse().unwrap(), now, read).await.unwrap()
    }

    #[tokio::test]
    async fn a_due_time_is_read_again_only_after_a_change_or_once_it_has_passed() {
        let (work, reads) = (Work::default(), AtomicUsize::new(0));
        assert_eq!(due(&work, &reads, 100, Some(500)).await, Some(500));
        // Unchanged and still ahead: the claims that found nothing share the read.
        assert_eq!(due(&work, &reads, 200, Some(900)).await, Some(500));
        assert_eq!(reads.load(Ordering::Relaxed), 1);
        // A job put back for later, or a wake-up: read again.
        work.changed();
        assert_eq!(due(&work, &reads, 200, Some(300)).await, Some(300));
        work.wake();
        assert_eq!(due(&work, &reads, 200, None).await, None);
        assert_eq!(due(&work, &reads, 250, Some(700)).await, None, "no change since the last read");
        assert_eq!(reads.load(Ordering::Relaxed), 3);
        work.changed();
        assert_eq!(due(&work, &reads, 300, Some(400)).await, Some(400));
        // The time read has come: whatever was due then may be taken, so read what follows.
        assert_eq!(due(&work, &reads, 400, Some(800)).await, Some(800));
        assert_eq!(reads.load(Ordering::Relaxed), 5);
    }

    #[tokio::test]
    async fn tenants_have_their_own_due_times() {
        let work = Work::default();
        let (acme, other) = ("acme".parse().unwrap(), "other".parse().unwrap());
        assert_eq!(work.next_due(&acme, 0, || async { Ok(Some(10)) }).await.unwrap(), Some(10));
        assert_eq!(work.next_due(&other, 0, || async { Ok(Some(20)) }).await.unwrap(), Some(20));
        assert_eq!(work.next_due(&acme, 0, || async { Ok(None) }).await.unwrap(), Some(10));
    }
}
