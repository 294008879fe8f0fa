//! Approvals (SPEC 7): list, get, approve, reject. Approving re-checks the binding first:
//! when the job hash or the snapshot (or, with rule binding, the deciding rules) changed, the
//! approval is refused with 409, the old request is recorded as stale, and a fresh request
//! bound to the current job and snapshot takes its place.

use std::collections::HashMap;

use airlock_core::Millis;
use airlock_core::approval::{self, Stale, Status, VoteError};
use airlock_core::decided::Decided;
use airlock_core::defaults::REQUEST_BODY_BYTES_MAX;
use airlock_core::ids::ApprovalId;
use airlock_core::role::Role;
use airlock_core::state::{Event, JobState};
use airlock_core::votes::{self, Ballot, Cast, Counted, Refused};
use airlock_store::{ApprovalRecord, JobRecord, StoreError};
use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query as RawQuery, State};
use axum::http::StatusCode;
use serde_json::{Value, json};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::state::{AppState, now_ms, random_bytes};
use crate::wire::{self, Query};

/// Longest comment a rejection may carry.
const REJECT_COMMENT_CHARS_MAX: usize = 4_000;

/// Times an approval is re-read and retried when another approver changed it first.
const CONFLICT_RETRIES: usize = 3;

fn parse_id(text: &str) -> Result<ApprovalId, ApiError> {
    text.parse().map_err(|_| ApiError::not_found("approval"))
}

fn require_reader(caller: &Caller) -> Result<(), ApiError> {
    if caller.roles.allows(Role::Operator) { Ok(()) } else { caller.require_read(Role::Approver) }
}

/// `GET /api/v1/approvals?status=&after=&limit=` (default status: pending).
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    RawQuery(params): RawQuery<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    require_reader(&caller)?;
    let q = Query::new(params, &["status", "after", "limit"])?;
    let status = match q.get::<String>("status")?.as_deref() {
        None => Some(Status::Pending),
        Some("all") => None,
        Some(s) => Some(s.parse::<Status>().map_err(|e| ApiError::invalid(vec![("status".into(), e)]))?),
    };
    let after = q.get::<ApprovalId>("after")?;
    let limit = q.limit()?;
    let found = state.store().approvals(&caller.tenant, status, after.as_ref(), limit).await?;
    let next = (found.len() == limit as usize).then(|| found.last().map(|a| a.id.to_string())).flatten();
    Ok(Json(json!({"approvals": found.iter().map(wire::approval).collect::<Vec<_>>(), "next": next})))
}

/// `GET /api/v1/approvals/{id}`: the request, its job, and the job's current decision.
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    require_reader(&caller)?;
    let (approval, job) = load(&state, &caller, &parse_id(&id)?).await?;
    let mut body = wire::approval(&approval);
    let active = state.safety().active();
    let policy_job = job.to_policy_job();
    // Whether approving now would pass the binding check, so a client shows "stale" before
    // anyone clicks; the approve call checks it again at the commit.
    let binding = approval::check_binding(
        &approval.request,
        &policy_job,
        &active.policy,
        state.config().approval_binding,
        now_ms(),
    );
    if let Some(o) = body.as_object_mut() {
        o.insert("job".into(), crate::jobs::view(&state, &job).await?);
        o.insert("current_decision".into(), current_decision(&state, &job));
        o.insert("binding_current".into(), json!(binding.is_ok()));
        o.insert("stale_reason".into(), json!(binding.err().map(|s| s.to_string())));
        o.insert(
            "explanation".into(),
            wire::explanation(&active.policy, &policy_job, &active.policy.explain(&policy_job)),
        );
        // A plan job is decided change by change: each change's trace is its explanation.
        if airlock_plan::is_plan_job(&policy_job) {
            let explained: Vec<Value> = airlock_plan::explain(
                &active.policy,
                &policy_job,
                airlock_core::defaults::PLAN_CHANGES_EXPLAINED_MAX,
            )
            .iter()
            .map(|c| {
                json!({
                    "address": c.address,
                    "topic": c.job.topic,
                    "explanation": wire::explanation(&active.policy, &c.job, &c.explanation),
                })
            })
            .collect();
            o.insert("plan_explanations".into(), Value::Array(explained));
        }
    }
    Ok(Json(body))
}

/// `GET /api/v1/approvals/summary`: the tenant's pending requests in a few numbers, cheap
/// enough to poll: a client that remembers them knows when its inbox changed.
pub async fn summary(State(state): State<AppState>, caller: Caller) -> Result<Json<Value>, ApiError> {
    require_reader(&caller)?;
    let s = state.store().approval_summary(&caller.tenant).await?;
    Ok(Json(json!({
        "pending": s.pending,
        "oldest_created_at": s.oldest_created_at,
        "newest_id": s.newest_id.as_ref().map(ApprovalId::as_str),
        "votes": s.votes,
        "policy_version": state.safety().active().version,
    })))
}

async fn load(
    state: &AppState,
    caller: &Caller,
    id: &ApprovalId,
) -> Result<(ApprovalRecord, JobRecord), ApiError> {
    let approval =
        state.store().approval(&caller.tenant, id).await?.ok_or_else(|| ApiError::not_found("approval"))?;
    let job = state
        .store()
        .job(&caller.tenant, &approval.job_id)
        .await?
        .ok_or_else(|| ApiError::internal(format!("approval {id} has no job")))?;
    Ok((approval, job))
}

fn current_decision(state: &AppState, job: &JobRecord) -> Value {
    let active = state.safety().active();
    let (evaluation, plan) = airlock_plan::evaluate_any(&active.policy, &job.to_policy_job());
    json!({
        "decision": evaluation.decision.as_str(),
        "rule_ids": active.policy.ids(&evaluation.deciding),
        "reason": plan.map_or_else(|| active.policy.reason(&evaluation), |p| p.reason(&active.policy)),
        "snapshot": active.policy.hash(),
    })
}

/// `POST /api/v1/approvals/{id}/approve`.
pub async fn approve(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    decide(&state, &caller, &parse_id(&id)?, Decide::Approve).await
}

/// `POST /api/v1/approvals/{id}/reject`, with an optional body `{"comment": "..."}` kept in
/// the audit record.
pub async fn reject(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let bytes = wire::read_body(body, REQUEST_BODY_BYTES_MAX).await?;
    let comment = if bytes.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        let map = wire::json_object(&bytes)?;
        wire::only_fields(&map, &["comment"])?;
        match map.get("comment") {
            None | Some(Value::Null) => None,
            Some(Value::String(c)) if c.chars().count() <= REJECT_COMMENT_CHARS_MAX => Some(c.clone()),
            Some(Value::String(_)) => {
                return Err(ApiError::invalid(vec![(
                    "comment".into(),
                    format!("is longer than {REJECT_COMMENT_CHARS_MAX} characters"),
                )]));
            }
            Some(_) => return Err(ApiError::invalid(vec![("comment".into(), "must be a string".into())])),
        }
    };
    decide(&state, &caller, &parse_id(&id)?, Decide::Reject { comment }).await
}

/// What an approver decides.
enum Decide {
    Approve,
    Reject { comment: Option<String> },
}

async fn decide(
    state: &AppState,
    caller: &Caller,
    id: &ApprovalId,
    decision: Decide,
) -> Result<Json<Value>, ApiError> {
    caller.require(Role::Approver)?;
    for _ in 0..CONFLICT_RETRIES {
        let (record, job) = load(state, caller, id).await?;
        let now = now_ms();
        match attempt(state, caller, &record, &job, &decision, now).await {
            Err(Attempt::Conflict) => continue,
            Err(Attempt::Api(e)) if e.superseded_by().is_some() => {
                state.refresh_policy(e.superseded_by()).await?;
            }
            Err(Attempt::Api(e)) => return Err(e),
            Ok(body) => return Ok(Json(body)),
        }
    }
    Err(ApiError::new(StatusCode::CONFLICT, "conflict", "the approval request keeps changing; retry"))
}

enum Attempt {
    Conflict,
    Api(ApiError),
}

impl From<ApiError> for Attempt {
    fn from(e: ApiError) -> Self {
        Self::Api(e)
    }
}

impl From<StoreError> for Attempt {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict(_) => Self::Conflict,
            other => Self::Api(other.into()),
        }
    }
}

async fn attempt(
    state: &AppState,
    caller: &Caller,
    record: &ApprovalRecord,
    job: &JobRecord,
    decision: &Decide,
    now: Millis,
) -> Result<Value, Attempt> {
    let active = state.safety().active();
    let ballot = match decision {
        Decide::Approve => Ballot::Approve,
        Decide::Reject { comment } => Ballot::Reject { comment: comment.as_deref() },
    };
    let cast = votes::cast(Cast {
        record,
        job,
        ballot,
        approver: &caller.principal,
        binding: approval::check_binding(
            &record.request,
            &job.to_policy_job(),
            &active.policy,
            state.config().approval_binding,
            now,
        ),
        snapshot_version: active.version,
        at: now,
    });
    let (change, remaining) = match cast {
        Ok(Counted::Change { change, remaining }) => (*change, remaining),
        Ok(Counted::Stale(stale)) => {
            return Err(refuse_stale(state, caller, record, job, stale, now).await?.into());
        }
        Err(refused) => {
            let (status, code) = match &refused {
                Refused::NotPending(_) => (StatusCode::CONFLICT, "approval_not_pending"),
                Refused::NotAwaiting(_) => (StatusCode::CONFLICT, "invalid_transition"),
                Refused::SelfApproval(_) | Refused::Vote(VoteError::SelfApproval(_)) => {
                    (StatusCode::FORBIDDEN, "self_approval")
                }
                Refused::Vote(_) => (StatusCode::CONFLICT, "approval_refused"),
            };
            return Err(ApiError::new(status, code, refused.to_string()).into());
        }
    };
    let queued = change.job_event == Some(Event::Approved);
    if queued {
        let wait = (now - record.request.created_at).max(0) as f64 / 1000.0;
        state.metrics().observe("airlock_approval_wait_seconds", &[], wait);
    }
    let saved = state.store().change_approval(change).await?;
    if queued {
        state.queued_here();
    }
    let job_state = state.store().job(&caller.tenant, &job.id).await?.map(|j| j.state).unwrap_or(job.state);
    let mut out = json!({"approval": wire::approval(&saved), "job_state": job_state.as_str()});
    if let (Some(remaining), Value::Object(out)) = (remaining, &mut out) {
        out.insert("remaining".into(), json!(remaining));
    }
    Ok(out)
}

/// Records the stale request, opens a fresh one bound to the current job and snapshot (or
/// expires the job when the request simply ran out of time), and returns the 409 to send.
async fn refuse_stale(
    state: &AppState,
    caller: &Caller,
    record: &ApprovalRecord,
    job: &JobRecord,
    stale: Stale,
    now: Millis,
) -> Result<ApiError, Attempt> {
    let current = current_decision(state, job);
    if stale == Stale::Expired {
        state.store().change_approval(votes::expire(record, true, now)).await?;
        return Ok(ApiError::new(
            StatusCode::CONFLICT,
            "approval_expired",
            "the approval request expired; the job is now `expired`",
        )
        .with("current_decision", current));
    }
    state.metrics().inc("airlock_approvals_stale_total", &[]);
    let active = state.safety().active();
    let (evaluation, plan) = airlock_plan::evaluate_any(&active.policy, &job.to_policy_job());
    let decided = Decided {
        policy: &active.policy,
        version: active.version,
        evaluation: &evaluation,
        plan: plan.as_ref(),
    };
    let change = votes::replace_stale(
        record,
        job,
        &stale,
        &decided,
        ApprovalId::generate(now, random_bytes()?),
        state.config().approval_ttl_ms,
        now,
        &caller.principal,
    );
    let new_id = change.replacement.as_ref().map(|r| r.id.to_string());
    state.store().change_approval(change).await?;
    Ok(ApiError::new(StatusCode::CONFLICT, "approval_stale", stale.to_string())
        .with("reason", json!(stale.to_string()))
        .with("current_decision", current)
        .with("new_approval_id", json!(new_id)))
}

/// Expires pending requests past their TTL, and their jobs. Run periodically.
pub async fn expire_due(state: &AppState, now: Millis) -> Result<usize, StoreError> {
    let due = state.store().expired_approvals(now, 100).await?;
    let mut expired = 0;
    for record in due {
        let job = state.store().job(&record.tenant, &record.job_id).await?;
        let awaiting = job.as_ref().is_some_and(|j| {
            j.state == JobState::AwaitingApproval && j.approval_id.as_ref() == Some(&record.id)
        });
        match state.store().change_approval(votes::expire(&record, awaiting, now)).await {
            Ok(_) => expired += 1,
            Err(StoreError::Conflict(_)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(expired)
}
