//! Gate A (SPEC 5): `POST /api/v1/jobs` (and `POST /api/v1/plans`, which reads a plan into a
//! plan job and submits it here, through [`submit_job`]). In this order: authenticate → validate → idempotency
//! → safety check (with its timeout) → persist and enqueue atomically. A deny, a throttle
//! refusal or an unavailable safety check in closed mode writes nothing but an audit record.

use airlock_core::approval::Request;
use airlock_core::audit::{Draft, Kind};
use airlock_core::decided::Gate;
use airlock_core::defaults::REQUEST_BODY_BYTES_MAX;
use airlock_core::ids::{ApprovalId, JobId};
use airlock_core::moves::{self, Admit};
use airlock_core::role::Role;
use airlock_core::state::JobState;
use airlock_policy::{Decision, Job};
use airlock_store::{Budget, GateDecision, SubmitOutcome};
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::state::{AppState, Checked, FailMode, now_ms, random_bytes};
use crate::wire::{self, json_object, merge};

const SUBMIT_FIELDS: [&str; 6] = ["topic", "env", "labels", "payload", "idempotency_key", "plan_hash"];

/// Decisions made for one submit when publishes keep superseding them before the commit.
const DECIDE_ATTEMPTS_MAX: u32 = 3;

/// Seconds a client should wait after a 503 from Gate A.
const UNAVAILABLE_RETRY_AFTER_SECS: u64 = 5;

/// `POST /api/v1/jobs`.
pub async fn submit(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    caller.require(Role::Submitter)?;
    wire::require_json(&headers)?;
    let bytes = wire::read_body(body, REQUEST_BODY_BYTES_MAX).await?;
    let job = parse_job(&state, &caller, &bytes)?;
    crate::payload_schema::check(&state, &job)?;
    submit_job(&state, &caller, job).await
}

/// Gate A for a validated job of the caller's tenant: idempotency → safety check → persist
/// and enqueue. Every way into the queue that a submitter takes goes through here.
pub(crate) async fn submit_job(state: &AppState, caller: &Caller, job: Job) -> Result<Response, ApiError> {
    let job_hash = job.hash();
    let retained_since = now_ms() - state.config().idempotency_retention_ms;

    if let Some(key) = &job.idempotency_key
        && let Some(existing) = state.store().idempotency(&caller.tenant, key, retained_since).await?
    {
        return idempotent_answer(state, key, &job_hash, &existing);
    }
    // A decision is committed only under the snapshot it was made under: when a publish
    // supersedes it first, the store refuses the write and the job is decided again.
    let mut attempt = 1;
    loop {
        match decide(state, caller, &job, &job_hash).await {
            Err(e) if attempt < DECIDE_ATTEMPTS_MAX && e.superseded_by().is_some() => {
                state.refresh_policy(e.superseded_by()).await?;
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// Gate A's safety check and the write of its outcome, stamped with the time of the decision
/// (the commit follows at once and checks the snapshot is still active).
async fn decide(state: &AppState, caller: &Caller, job: &Job, job_hash: &str) -> Result<Response, ApiError> {
    let topic_label = state.metrics().topic(&job.topic);
    let checked = state.safety().check(job, state.config().gate_a_timeout).await;
    let now = now_ms();
    let checked = match checked {
        Ok(checked) => checked,
        Err(e) => {
            state
                .metrics()
                .inc("airlock_safety_check_failures_total", &[("gate", "a"), ("reason", e.reason())]);
            let active = state.safety().active();
            let classes: Vec<&str> = active.policy.classes_of(&job.topic).collect();
            match state.config().gate_a_fail.for_topic(&job.topic, &classes) {
                FailMode::Closed => {
                    let draft = decision_draft(
                        caller,
                        job,
                        job_hash,
                        now,
                        Kind::GateAUnavailable,
                        json!({
                            "outcome": "refused",
                            "fail_mode": "closed",
                            "error": e.to_string(),
                        }),
                    );
                    state.store().append_audit(&caller.tenant, draft, None).await?;
                    return Err(ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "safety_unavailable",
                        format!("{e}; Gate A fails closed, nothing was stored"),
                    )
                    .retry_after(UNAVAILABLE_RETRY_AFTER_SECS));
                }
                FailMode::Open => {
                    state.metrics().inc("airlock_gateway_fail_open_total", &[("topic", &topic_label)]);
                    state.metrics().inc(
                        "airlock_gate_decisions_total",
                        &[("gate", "a"), ("decision", "bypassed"), ("topic", &topic_label)],
                    );
                    return accept_bypassed(state, caller, job, job_hash, now, &e.to_string()).await;
                }
            }
        }
    };
    record_evaluation(state, &checked, &topic_label);

    let decided = checked.decided();
    let gate = decided.record(now);
    let plan_fields = decided.plan_fields();
    let decision_data = decided.audit_data(&gate);

    match gate.decision {
        Decision::Deny => {
            let mut data = decision_data;
            merge(&mut data, json!({"outcome": "denied"}));
            let draft = decision_draft(caller, job, job_hash, now, Kind::GateADecision, data);
            state.store().append_audit(&caller.tenant, draft, Some(gate.snapshot_version)).await?;
            let mut denied = ApiError::new(StatusCode::FORBIDDEN, "policy_denied", gate.reason.clone())
                .with("rule_ids", json!(gate.rule_ids))
                .with("reason", json!(gate.reason))
                .with("snapshot", json!(gate.snapshot_hash));
            if let Value::Object(fields) = plan_fields {
                for (key, value) in fields {
                    denied = denied.with(&key, value);
                }
            }
            Err(denied)
        }
        Decision::Allow | Decision::Throttle | Decision::RequireHuman => {
            let budgets = decided.budgets(Gate::A, job);
            let approval = (gate.decision == Decision::RequireHuman).then(|| {
                decided.request(
                    job_hash.to_owned(),
                    caller.principal.clone(),
                    now,
                    state.config().approval_ttl_ms,
                )
            });
            let mut data = decision_data;
            merge(&mut data, json!({"outcome": "accepted"}));
            accept(state, caller, job, job_hash, now, gate, approval, budgets, data, plan_fields).await
        }
    }
}

fn parse_job(state: &AppState, caller: &Caller, bytes: &[u8]) -> Result<Job, ApiError> {
    let mut map = json_object(bytes)?;
    let mut errors: Vec<(String, String)> = Vec::new();
    for field in ["tenant", "principal"] {
        if map.remove(field).is_some() {
            errors.push((field.into(), "is set by the API key; remove it from the body".into()));
        }
    }
    for key in map.keys().filter(|k| !SUBMIT_FIELDS.contains(&k.as_str())) {
        errors.push((key.clone(), format!("unknown field; expected one of {}", SUBMIT_FIELDS.join(", "))));
    }
    map.retain(|k, _| SUBMIT_FIELDS.contains(&k.as_str()));
    map.insert("tenant".into(), json!(caller.tenant.as_str()));
    map.insert("principal".into(), json!(caller.principal));
    let parsed = Job::from_json(&Value::Object(map));
    let job = match parsed {
        Ok(job) => Some(job),
        Err(field_errors) => {
            errors.extend(field_errors.into_iter().map(|e| (e.field, e.message)));
            None
        }
    };
    if let Some(job) = &job
        && airlock_plan::is_plan_job(job)
    {
        errors.push((
            "topic".into(),
            format!("`{}` is reserved for plan jobs; send the plan JSON to POST /api/v1/plans", job.topic),
        ));
    }
    if let Some(job) = &job
        && job.idempotency_key.is_none()
        && state.config().require_idempotency_key.iter().any(|g| g.matches(&job.topic))
    {
        errors.push(("idempotency_key".into(), format!("is required for topic `{}`", job.topic)));
    }
    match job {
        Some(job) if errors.is_empty() => Ok(job),
        _ => Err(ApiError::invalid(errors)),
    }
}

fn idempotent_answer(
    state: &AppState,
    key: &str,
    job_hash: &str,
    existing: &airlock_store::IdempotencyRecord,
) -> Result<Response, ApiError> {
    if existing.job_hash != job_hash {
        return Err(key_reused(key, existing));
    }
    state.metrics().inc("airlock_idempotent_replays_total", &[]);
    let status = StatusCode::from_u16(existing.status).map_err(ApiError::internal)?;
    let body: Value = serde_json::from_str(&existing.body).map_err(ApiError::internal)?;
    let mut response = (status, axum::Json(body)).into_response();
    response.headers_mut().insert("idempotent-replayed", HeaderValue::from_static("true"));
    Ok(response)
}

fn key_reused(key: &str, existing: &airlock_store::IdempotencyRecord) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "idempotency_key_reused",
        format!("idempotency key `{key}` was already used for a different job"),
    )
    .with("job_id", json!(existing.job_id.as_str()))
}

fn record_evaluation(state: &AppState, checked: &Checked, topic: &str) {
    let metrics = state.metrics();
    metrics.observe("airlock_policy_eval_seconds", &[("gate", "a")], checked.elapsed.as_secs_f64());
    metrics.decided("a", checked.evaluation.decision, topic);
    for id in checked.active.policy.ids(&checked.evaluation.audit) {
        metrics.inc("airlock_policy_audit_matches_total", &[("gate", "a"), ("rule_id", id)]);
    }
}

fn decision_draft(caller: &Caller, job: &Job, job_hash: &str, at: i64, kind: Kind, data: Value) -> Draft {
    let mut full = json!({"topic": job.topic, "env": job.env, "job_hash": job_hash});
    merge(&mut full, data);
    Draft { at, kind, subject: "-".into(), actor: caller.principal.clone(), data: full }
}

async fn accept_bypassed(
    state: &AppState,
    caller: &Caller,
    job: &Job,
    job_hash: &str,
    now: i64,
    error: &str,
) -> Result<Response, ApiError> {
    let active = state.safety().active();
    let gate = GateDecision {
        decision: Decision::Allow,
        rule_ids: Vec::new(),
        reason: format!("safety check unavailable ({error}); accepted by fail-open mode"),
        snapshot_hash: active.policy.hash().to_owned(),
        snapshot_version: active.version,
        at: now,
        bypassed: true,
    };
    let data = json!({"outcome": "accepted", "fail_mode": "open", "gate_a_bypassed": true, "error": error});
    accept(state, caller, job, job_hash, now, gate, None, Vec::new(), data, json!({})).await
}

#[expect(clippy::too_many_arguments, reason = "one call per accepting path; a struct would only rename them")]
async fn accept(
    state: &AppState,
    caller: &Caller,
    job: &Job,
    job_hash: &str,
    now: i64,
    gate: GateDecision,
    approval: Option<Request>,
    budgets: Vec<Budget>,
    audit_data: Value,
    answer_fields: Value,
) -> Result<Response, ApiError> {
    let id = JobId::generate(now, random_bytes()?);
    let approval = match approval {
        Some(request) => Some((ApprovalId::generate(now, random_bytes()?), request)),
        None => None,
    };
    let mut submission = moves::admit(Admit {
        id,
        tenant: caller.tenant.clone(),
        job,
        job_hash: job_hash.to_owned(),
        gate,
        approval,
        budgets,
        audit_data,
        actor: caller.principal.clone(),
        at: now,
    });
    let (record, gate) = (&submission.job, &submission.job.gate_a);
    let state_after = record.state;
    let mut body = json!({
        "job_id": record.id.as_str(),
        "state": state_after.as_str(),
        "job_hash": job_hash,
        "decision": {"decision": gate.decision.as_str(), "rule_ids": gate.rule_ids, "reason": gate.reason, "snapshot": gate.snapshot_hash},
        "gate_a_bypassed": gate.bypassed,
    });
    merge(&mut body, answer_fields);
    if let (Some(a), Some(o)) = (&submission.approval, body.as_object_mut()) {
        o.insert(
            "approval".into(),
            json!({"id": a.id.as_str(), "expires_at": a.request.expires_at, "quorum": a.request.quorum}),
        );
    }
    let idempotency_key = job.idempotency_key.clone();
    submission.idempotency =
        idempotency_key.as_ref().map(|k| (k.clone(), StatusCode::ACCEPTED.as_u16(), body.to_string()));
    let gate = submission.job.gate_a.clone();
    let retained_since = now - state.config().idempotency_retention_ms;
    match state.store().submit(submission, retained_since).await? {
        SubmitOutcome::Accepted => {
            state.metrics().throttle_answered("a", gate.decision, &job.topic, true);
            if state_after == JobState::Queued {
                state.queued_here();
            }
            if idempotency_key.is_none() {
                let topic = state.metrics().topic(&job.topic);
                state
                    .metrics()
                    .inc("airlock_submissions_without_idempotency_key_total", &[("topic", &topic)]);
            }
            Ok((StatusCode::ACCEPTED, axum::Json(body)).into_response())
        }
        SubmitOutcome::Replay(existing) => {
            let key = idempotency_key.unwrap_or_default();
            idempotent_answer(state, &key, &existing.job_hash, &existing)
        }
        SubmitOutcome::KeyReused(existing) => {
            Err(key_reused(&idempotency_key.unwrap_or_default(), &existing))
        }
        SubmitOutcome::Throttled { retry_after_ms } => {
            state.metrics().throttle_answered("a", gate.decision, &job.topic, false);
            Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "throttled",
                format!("{}; the budget refills in {} ms", gate.reason, retry_after_ms),
            )
            .with("rule_ids", json!(gate.rule_ids))
            .with("reason", json!(gate.reason))
            .with("snapshot", json!(gate.snapshot_hash))
            .retry_after(retry_after_ms.div_ceil(1000)))
        }
    }
}
