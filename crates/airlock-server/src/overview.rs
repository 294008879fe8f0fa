//! `GET /api/v1/overview`: one tenant's figures at a glance — jobs by state, pending approvals
//! (exact count and the oldest's age), DLQ depth, fail-open decisions in the last hour and the
//! breaker — for the console's overview and inbox header, in one store round.

use airlock_core::Millis;
use airlock_core::state::JobState;
use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::state::{AppState, now_ms};

/// The window the fail-open counts cover.
const FAIL_OPEN_WINDOW_MS: Millis = 3_600_000;

/// `GET /api/v1/overview`.
pub async fn overview(State(state): State<AppState>, caller: Caller) -> Result<Json<Value>, ApiError> {
    let now = now_ms();
    let o = state.store().overview(&caller.tenant, now - FAIL_OPEN_WINDOW_MS).await?;
    let jobs: serde_json::Map<String, Value> = JobState::ALL
        .iter()
        .map(|s| (s.as_str().to_owned(), json!(o.jobs.get(s).copied().unwrap_or(0))))
        .collect();
    let breaker = if state.config().shared_breaker {
        state.store().breaker_state(now).await?
    } else {
        state.breaker().lock().map_err(|_| ApiError::internal("breaker lock poisoned"))?.state(now)
    };
    Ok(Json(json!({
        "tenant": caller.tenant.as_str(),
        "principal": caller.principal,
        "roles": caller.roles.iter().map(|r| r.as_str()).collect::<Vec<_>>(),
        "at": now,
        "jobs": jobs,
        "approvals": {"pending": o.pending_approvals, "oldest_created_at": o.oldest_pending_at},
        "dlq_depth": o.dlq_depth,
        "fail_open_last_hour": {"gate_a": o.fail_open_gate_a, "gate_b": o.fail_open_gate_b},
        "breaker": breaker.encode().0,
        "policy_version": state.safety().active().version,
    })))
}
