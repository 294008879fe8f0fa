//! Gate A's payload schemas: a job whose payload breaks a schema of its topic (`schemas:` in
//! the active policy) is refused with 400 before anything is decided or stored, with every
//! violation named by its place in the payload.

use airlock_policy::Job;
use serde_json::json;

use crate::error::ApiError;
use crate::state::AppState;

/// Refuses `job` when its payload breaks its topic's schemas in the active snapshot.
pub(crate) fn check(state: &AppState, job: &Job) -> Result<(), ApiError> {
    let active = state.safety().active();
    let violations = active.policy.payload_violations(&job.topic, &job.payload);
    if violations.is_empty() {
        return Ok(());
    }
    let fields = violations.into_iter().map(|v| (format!("payload{}", v.pointer), v.message)).collect();
    Err(ApiError::invalid(fields).with("snapshot", json!(active.policy.hash())))
}
