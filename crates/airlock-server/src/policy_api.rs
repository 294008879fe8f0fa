//! The policy API: snapshots, publish, rollback, and the side-effect-free questions
//! (simulate, explain, diff). Publishing and rolling back change the one global policy, so they
//! belong to platform admins; the questions are asked about the caller's own tenant.

use airlock_core::defaults::{POLICY_BODY_BYTES_MAX, REQUEST_BODY_BYTES_MAX};
use airlock_core::role::Role;
use std::time::Instant;

use airlock_policy::{Job, Policy, Refused};
use airlock_store::JobFilter;
use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::state::{ActivePolicy, AppState, DryRunLimits, now_ms};
use crate::wire::{self, json_object, only_fields};

/// Most stored jobs one diff evaluates.
const DIFF_JOBS_MAX: u32 = 100_000;
/// Jobs read from the store per page during a diff.
const DIFF_PAGE: u32 = 500;

/// `GET /api/v1/policy/snapshots`: the active snapshot and the history. The policy source is
/// for operators and admins; everyone else sees versions and hashes.
pub async fn snapshots(State(state): State<AppState>, caller: Caller) -> Result<Json<Value>, ApiError> {
    let all = state.store().snapshots().await?;
    let with_source = caller.roles.allows(Role::Operator);
    let active = all.iter().find(|s| s.active).map(|s| wire::snapshot(s, with_source));
    Ok(Json(
        json!({"active": active, "snapshots": all.iter().map(|s| wire::snapshot(s, false)).collect::<Vec<_>>()}),
    ))
}

/// `GET /api/v1/policy/snapshots/{version}`: one snapshot; its source for operators and admins.
pub async fn snapshot(
    State(state): State<AppState>,
    caller: Caller,
    axum::extract::Path(version): axum::extract::Path<String>,
) -> Result<Json<Value>, ApiError> {
    let version: u64 = version.parse().map_err(|_| ApiError::not_found("snapshot"))?;
    let record = state.store().snapshot(version).await?.ok_or_else(|| ApiError::not_found("snapshot"))?;
    Ok(Json(wire::snapshot(&record, caller.roles.allows(Role::Operator))))
}

fn invalid_policy(errors: &[airlock_policy::Diagnostic]) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "invalid_policy",
        format!("the policy has {} error(s)", errors.len()),
    )
    .with("diagnostics", wire::diagnostics(errors))
}

fn compile(source: &str) -> Result<(Policy, Vec<airlock_policy::Diagnostic>), ApiError> {
    airlock_policy::compile(source).map_err(|errors| invalid_policy(&errors))
}

async fn activate(
    state: &AppState,
    caller: &Caller,
    source: String,
    note: Option<String>,
) -> Result<Response, ApiError> {
    let (policy, warnings) = compile(&source)?;
    let record =
        state.store().publish(policy.hash(), &source, note.as_deref(), now_ms(), &caller.principal).await?;
    state.safety().activate(ActivePolicy { version: record.version, policy });
    tracing::info!(version = record.version, hash = %record.hash, actor = %caller.principal, "policy published");
    let mut body = wire::snapshot(&record, false);
    if let Some(o) = body.as_object_mut() {
        o.insert("warnings".into(), wire::diagnostics(&warnings));
    }
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// `POST /api/v1/policy/publish`: the body is the policy YAML.
pub async fn publish(
    State(state): State<AppState>,
    caller: Caller,
    body: Body,
) -> Result<Response, ApiError> {
    caller.require_platform_admin()?;
    let bytes = wire::read_body(body, POLICY_BODY_BYTES_MAX).await?;
    let source = String::from_utf8(bytes.to_vec())
        .map_err(|_| ApiError::bad_request("the policy is not valid UTF-8"))?;
    activate(&state, &caller, source, None).await
}

/// `POST /api/v1/policy/rollback` `{"version": n}`: re-activates version n as a new version.
pub async fn rollback(
    State(state): State<AppState>,
    caller: Caller,
    body: Body,
) -> Result<Response, ApiError> {
    caller.require_platform_admin()?;
    let map = json_object(&wire::read_body(body, REQUEST_BODY_BYTES_MAX).await?)?;
    only_fields(&map, &["version"])?;
    let version = match map.get("version") {
        None | Some(Value::Null) => Err("is required: the snapshot version to restore".to_owned()),
        Some(v) => v.as_u64().filter(|n| *n > 0).ok_or_else(|| {
            format!("`{v}` is not a snapshot version: write a whole number from 1, without a decimal point")
        }),
    }
    .map_err(|message| ApiError::invalid(vec![("version".into(), message)]))?;
    let old = state
        .store()
        .snapshot(version)
        .await?
        .ok_or_else(|| ApiError::not_found(&format!("snapshot {version}")))?;
    activate(&state, &caller, old.source, Some(format!("rollback to version {version}"))).await
}

/// The job of a simulate/explain body: `{"job": {...}}`, or the job's fields at the top level
/// (the seed article's `{"topic": ..., "tenant": ...}`). The tenant is the caller's (naming it
/// is allowed when it is the caller's own); the principal may be set for a what-if, and
/// defaults to the caller. Every bad or missing field is reported at once.
fn job_of(caller: &Caller, map: &Map<String, Value>) -> Result<Job, ApiError> {
    let (mut job, prefix) = match map.get("job") {
        Some(Value::Object(job)) => (job.clone(), "job."),
        Some(_) => {
            return Err(ApiError::invalid(vec![("job".into(), "must be the job as a JSON object".into())]));
        }
        None => {
            let mut flat = map.clone();
            flat.remove("policy");
            (flat, "")
        }
    };
    let mut errors = Vec::new();
    match job.remove("tenant") {
        None => {}
        Some(Value::String(t)) if t.trim().eq_ignore_ascii_case(caller.tenant.as_str()) => {}
        Some(other) => errors.push((
            format!("{prefix}tenant"),
            format!(
                "is set by the API key (this key's tenant is `{}`, the body names {}); remove it",
                caller.tenant, other
            ),
        )),
    }
    job.insert("tenant".into(), json!(caller.tenant.as_str()));
    job.entry("principal").or_insert_with(|| json!(caller.principal));
    match Job::from_json(&Value::Object(job)) {
        Ok(job) if errors.is_empty() => Ok(job),
        Ok(_) => Err(ApiError::invalid(errors)),
        Err(field_errors) => {
            errors.extend(field_errors.into_iter().map(|e| (format!("{prefix}{}", e.field), e.message)));
            Err(ApiError::invalid(errors))
        }
    }
}

/// 422: a candidate policy, or a dry-run, that needs more than its budget.
fn over_budget(reason: String) -> ApiError {
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "over_budget", reason)
}

/// Compiles a candidate policy under the dry-run budget (`time_left` is the caller's deadline).
fn compile_candidate(
    source: &str,
    limits: &DryRunLimits,
    time_left: &mut dyn FnMut() -> bool,
) -> Result<Policy, ApiError> {
    let budget = airlock_policy::Budget { regex_bytes_max: limits.regex_bytes_max, time_left };
    match airlock_policy::compile_within(source, budget) {
        Ok((policy, _)) => Ok(policy),
        Err(Refused::Invalid(errors)) => Err(invalid_policy(&errors)),
        Err(Refused::OverBudget(reason)) => Err(over_budget(reason)),
    }
}

/// Which dry-run question.
#[derive(Clone, Copy)]
enum Ask {
    Simulate,
    Explain,
}

/// Reads and checks a simulate/explain body `{"job": {...}, "policy": "..."?}`. A candidate
/// policy is the operator's tool: a submitter asks the active snapshot only.
async fn question(state: &AppState, caller: &Caller, body: Body) -> Result<Map<String, Value>, ApiError> {
    let operator = caller.roles.allows(Role::Operator);
    if !(operator || caller.roles.allows(Role::Submitter)) {
        caller.require(Role::Operator)?;
    }
    let limit = if operator { state.config().dry_run.candidate_bytes_max } else { REQUEST_BODY_BYTES_MAX };
    let map = json_object(&wire::read_body(body, limit).await?)?;
    if map.contains_key("job") {
        only_fields(&map, &["job", "policy"])?;
    }
    if !matches!(map.get("policy"), None | Some(Value::Null)) && !operator {
        return Err(ApiError::forbidden(format!(
            "a candidate `policy` needs the `operator` role (this key, `{}`, has `{}`); without one, \
             the active snapshot answers",
            caller.principal, caller.roles
        )));
    }
    Ok(map)
}

/// Answers a dry-run off the async threads, within the dry-run budget: compiling the
/// candidate (if any) and evaluating the job share `dry_run.budget_ms`.
async fn answer(
    state: &AppState,
    caller: &Caller,
    map: &Map<String, Value>,
    ask: Ask,
) -> Result<Value, ApiError> {
    let job = job_of(caller, map)?;
    let candidate = match map.get("policy") {
        None | Some(Value::Null) => None,
        Some(Value::String(source)) => Some(source.clone()),
        Some(_) => {
            return Err(ApiError::invalid(vec![(
                "policy".into(),
                "must be the policy YAML as a string".into(),
            )]));
        }
    };
    let active = state.safety().active();
    let limits = state.config().dry_run.clone();
    let work = tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let mut time_left = || started.elapsed() < limits.budget;
        let compiled;
        let policy = match &candidate {
            None => &active.policy,
            Some(source) => {
                compiled = compile_candidate(source, &limits, &mut time_left)?;
                &compiled
            }
        };
        let answer = match ask {
            Ask::Simulate => airlock_plan::evaluate_any_within(policy, &job, &mut time_left)
                .map(|(e, _)| wire::evaluation(policy, &job, &e)),
            Ask::Explain => {
                policy.explain_within(&job, &mut time_left).map(|e| wire::explanation(policy, &job, &e))
            }
        };
        answer.ok_or_else(|| {
            over_budget(format!(
                "the dry-run took longer than its budget of {} ms and was stopped",
                limits.budget.as_millis()
            ))
        })
    });
    work.await.map_err(ApiError::internal)?
}

/// `POST /api/v1/policy/simulate` `{"job": {...}, "policy": "..."?}`: no budget consumed,
/// nothing stored.
pub async fn simulate(
    State(state): State<AppState>,
    caller: Caller,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let map = question(&state, &caller, body).await?;
    Ok(Json(answer(&state, &caller, &map, Ask::Simulate).await?))
}

/// `POST /api/v1/policy/explain`: like simulate, with every rule's verdict.
pub async fn explain(
    State(state): State<AppState>,
    caller: Caller,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let map = question(&state, &caller, body).await?;
    Ok(Json(answer(&state, &caller, &map, Ask::Explain).await?))
}

/// `POST /api/v1/policy/diff` `{"policy": "...", "since": ms?, "until": ms?, "limit": n?}`:
/// every stored job of the caller's tenant, created in the range, whose decision would change
/// under the candidate.
pub async fn diff(
    State(state): State<AppState>,
    caller: Caller,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    caller.require(Role::Operator)?;
    let map = json_object(&wire::read_body(body, state.config().dry_run.candidate_bytes_max).await?)?;
    only_fields(&map, &["policy", "since", "until", "limit"])?;
    let Some(Value::String(source)) = map.get("policy") else {
        return Err(ApiError::invalid(vec![(
            "policy".into(),
            "is required: the candidate policy YAML as a string".into(),
        )]));
    };
    let limits = state.config().dry_run.clone();
    let source = source.clone();
    let candidate = tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        compile_candidate(&source, &limits, &mut || started.elapsed() < limits.budget)
    })
    .await
    .map_err(ApiError::internal)??;
    let number = |field: &str, what: &str| -> Result<Option<i64>, ApiError> {
        match map.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_i64()
                .map(Some)
                .ok_or_else(|| ApiError::invalid(vec![(field.into(), format!("must be {what}"))])),
        }
    };
    let time = "a time in milliseconds since the epoch";
    let (since, until) = (number("since", time)?, number("until", time)?);
    let limit = match number("limit", "a number of jobs")? {
        None => DIFF_JOBS_MAX,
        Some(n) if (1..=i64::from(DIFF_JOBS_MAX)).contains(&n) => u32::try_from(n).unwrap_or(DIFF_JOBS_MAX),
        Some(n) => {
            return Err(ApiError::invalid(vec![(
                "limit".into(),
                format!("`{n}` is not between 1 and {DIFF_JOBS_MAX}"),
            )]));
        }
    };
    let active = state.safety().active();
    let mut changed = Vec::new();
    let mut evaluated = 0u32;
    let mut filter = JobFilter { since, until, limit: DIFF_PAGE.min(limit), ..JobFilter::default() };
    loop {
        let page = state.store().jobs(&caller.tenant, &filter).await?;
        for record in &page {
            let job = record.to_policy_job();
            let before = airlock_plan::evaluate_any(&active.policy, &job).0;
            let after = airlock_plan::evaluate_any(&candidate, &job).0;
            let (before_ids, after_ids) =
                (active.policy.ids(&before.deciding), candidate.ids(&after.deciding));
            if before.decision != after.decision || before_ids != after_ids {
                changed.push(json!({
                    "job_id": record.id.as_str(),
                    "topic": record.topic,
                    "env": record.env,
                    "state": record.state.as_str(),
                    "created_at": record.created_at,
                    "active": {"decision": before.decision.as_str(), "rule_ids": before_ids},
                    "candidate": {"decision": after.decision.as_str(), "rule_ids": after_ids},
                }));
            }
        }
        evaluated += u32::try_from(page.len()).unwrap_or(u32::MAX);
        match page.last() {
            Some(last) if page.len() == filter.limit as usize && evaluated < limit => {
                filter.after = Some(last.id.clone());
                filter.limit = DIFF_PAGE.min(limit - evaluated);
            }
            _ => break,
        }
    }
    Ok(Json(json!({
        "active": active.policy.hash(),
        "candidate": candidate.hash(),
        "jobs_evaluated": evaluated,
        "changed": changed,
    })))
}
