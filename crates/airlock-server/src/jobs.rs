//! Jobs of the caller's tenant: get (with decisions and history), list (filtered, paged),
//! cancel. Another tenant's job is a 404, never a 403: its existence is not disclosed.

use std::collections::HashMap;

use airlock_core::defaults::JOB_VIEW_AUDIT_MAX;
use airlock_core::ids::JobId;
use airlock_core::moves;
use airlock_core::role::Role;
use airlock_core::state::{Event, JobState};
use airlock_store::{JobFilter, JobRecord};
use axum::Json;
use axum::extract::{Path, Query as RawQuery, State};
use serde_json::{Value, json};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::state::{AppState, now_ms};
use crate::wire::{self, Query};

fn parse_id(text: &str) -> Result<JobId, ApiError> {
    text.parse().map_err(|_| ApiError::not_found("job"))
}

/// A job in full, with its history and every gate decision (from its audit records).
pub async fn view(state: &AppState, job: &JobRecord) -> Result<Value, ApiError> {
    let history = state.store().history(&job.tenant, &job.id).await?;
    let audit = state.store().job_audit(&job.tenant, &job.id, JOB_VIEW_AUDIT_MAX).await?;
    Ok(wire::job(job, &history, &audit))
}

/// `GET /api/v1/jobs/{id}`.
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = parse_id(&id)?;
    let job = state.store().job(&caller.tenant, &id).await?.ok_or_else(|| ApiError::not_found("job"))?;
    let mut body = view(&state, &job).await?;
    if let (Some(approval_id), Some(o)) = (&job.approval_id, body.as_object_mut())
        && let Some(approval) = state.store().approval(&caller.tenant, approval_id).await?
    {
        o.insert("approval".into(), wire::approval(&approval));
    }
    Ok(Json(body))
}

/// `GET /api/v1/jobs?state=&topic=&env=&after=&limit=`.
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    RawQuery(params): RawQuery<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let q = Query::new(params, &["state", "topic", "env", "after", "limit"])?;
    let filter = JobFilter {
        state: q.get::<JobState>("state")?,
        topic: q.get::<String>("topic")?,
        env: q.get::<String>("env")?,
        after: q.get::<JobId>("after")?,
        since: None,
        until: None,
        limit: q.limit()?,
    };
    let jobs = state.store().jobs(&caller.tenant, &filter).await?;
    let next = (jobs.len() == filter.limit as usize).then(|| jobs.last().map(|j| j.id.to_string())).flatten();
    Ok(Json(json!({"jobs": jobs.iter().map(wire::job_summary).collect::<Vec<_>>(), "next": next})))
}

/// `POST /api/v1/jobs/{id}/cancel`: by the job's submitter or an operator.
pub async fn cancel(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = parse_id(&id)?;
    let job = state.store().job(&caller.tenant, &id).await?.ok_or_else(|| ApiError::not_found("job"))?;
    if job.principal != caller.principal {
        caller.require(Role::Operator)?;
    }
    let mv = moves::plan_transition(
        caller.tenant.clone(),
        id,
        Event::Cancel,
        now_ms(),
        caller.principal.clone(),
        "cancelled".into(),
    );
    let job = state.store().apply(mv).await?.finished()?;
    Ok(Json(json!({"job_id": job.id.as_str(), "state": job.state.as_str()})))
}

/// `GET /api/v1/reports/idempotency`: the release-gate report of SPEC 8. Per topic, accepted
/// submissions and how many arrived without an idempotency key, and whether the configuration
/// requires one for that topic.
pub async fn idempotency_report(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Value>, ApiError> {
    caller.require_read(Role::Operator)?;
    let rows = state.store().idempotency_report(&caller.tenant).await?;
    let topics: Vec<Value> = rows
        .into_iter()
        .map(|(topic, submissions, without_key)| {
            let required = state.config().require_idempotency_key.iter().any(|g| g.matches(&topic));
            json!({"topic": topic, "submissions": submissions, "without_idempotency_key": without_key, "key_required": required})
        })
        .collect();
    Ok(Json(json!({"topics": topics})))
}
