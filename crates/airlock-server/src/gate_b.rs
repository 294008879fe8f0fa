//! Gate B (SPEC 6) and the worker protocol (SPEC 9). Gate B runs when a worker claims: the
//! job it is handed was checked against the snapshot active a moment before. Each handler
//! loads, asks the core and applies: this module gathers a decision's inputs (the safety
//! check behind the breaker, the approval binding, the fail mode, the clock and the jitter),
//! `airlock_core::moves` decides and plans the write (`plan_gate_b`, `plan_finish`,
//! `plan_no_worker`, `plan_operator_retry`, `plan_discard`), and one atomic `Store::apply`
//! commits it. Leases are fenced by a token: a worker whose lease lapsed can neither
//! heartbeat nor complete.

use std::collections::HashMap;
use std::time::Duration;

use airlock_core::Millis;
use airlock_core::approval::{self, Status};
use airlock_core::breaker::Admission;
use airlock_core::defaults::REQUEST_BODY_BYTES_MAX;
use airlock_core::dispatch::{self, Action, AfterAttempt, ApprovalState, Rescheduled};
use airlock_core::ids::{ApprovalId, JobId};
use airlock_core::moves::{self, Answer, Finish, GateB, LeaseCheck};
use airlock_core::role::Role;
use airlock_core::state::JobState;
use airlock_policy::Decision;
use airlock_store::{Applied, DispatchOutcome, Heartbeat, JobRecord, Lease};
use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query as RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::state::{AppState, now_ms, random_bytes};
use crate::wire::{self, Query, json_object, only_fields};

/// Longest a claim waits for work.
pub(crate) const CLAIM_WAIT_MAX_MS: u64 = 30_000;
/// Candidates read per page.
const CLAIM_BATCH: u32 = 16;
/// Most queued jobs one look goes through to find one to lease.
const CLAIM_SCAN_MAX: u32 = 1_024;
/// How much longer than Gate B's safety timeout a claim holds the job it runs Gate B on.
const CLAIM_HOLD_SLACK_MS: u64 = 3_000;
/// Largest result a worker may report, in bytes.
pub const RESULT_BYTES_MAX: usize = 256 * 1024;

fn jitter() -> Result<f64, ApiError> {
    let bytes = random_bytes()?;
    let n = u16::from_le_bytes([bytes[0], bytes[1]]);
    Ok(0.5 + f64::from(n) / f64::from(u16::MAX))
}

fn lease_token() -> Result<String, ApiError> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(ApiError::internal)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// `POST /api/v1/workers/claim` `{"pool", "wait_ms", "job_id"?}`: long-polls for a job of the
/// pool, runs Gate B on each candidate, and returns the first one leased (204 when none came).
/// With `job_id`, the only candidate is that job (a client that submitted it and runs it
/// itself, like the MCP proxy): it is leased, or 204 as soon as it is no longer queued.
pub async fn claim(State(state): State<AppState>, caller: Caller, body: Body) -> Result<Response, ApiError> {
    caller.require(Role::Worker)?;
    let bytes = wire::read_body(body, REQUEST_BODY_BYTES_MAX).await?;
    let map = if bytes.is_empty() { serde_json::Map::new() } else { json_object(&bytes)? };
    only_fields(&map, &["pool", "wait_ms", "job_id"])?;
    let mut errors = Vec::new();
    let pool = match map.get("pool") {
        None if state.config().pool_takes("default", "").is_some() => "default".to_owned(),
        None => {
            let names: Vec<&str> = state.config().pools.iter().map(|(name, _)| name.as_str()).collect();
            errors.push((
                "pool".to_owned(),
                format!("is required: this server routes topics to the pools {}", names.join(", ")),
            ));
            String::new()
        }
        Some(Value::String(p)) if state.config().pool_takes(p, "").is_some() => p.clone(),
        Some(Value::String(p)) => {
            errors.push(("pool".to_owned(), format!("unknown pool `{p}`")));
            String::new()
        }
        Some(_) => {
            errors.push(("pool".to_owned(), "must be a pool name".to_owned()));
            String::new()
        }
    };
    let wait_ms = match map.get("wait_ms") {
        None => 0,
        Some(v) => v.as_u64().filter(|w| *w <= CLAIM_WAIT_MAX_MS).unwrap_or_else(|| {
            errors.push(("wait_ms".into(), format!("must be 0 to {CLAIM_WAIT_MAX_MS}")));
            0
        }),
    };
    let job_id = match map.get("job_id") {
        None => None,
        Some(Value::String(id)) => Some(id.parse::<JobId>().map_err(|_| ApiError::not_found("job"))?),
        Some(_) => {
            errors.push(("job_id".into(), "must be a job id".into()));
            None
        }
    };
    if !errors.is_empty() {
        return Err(ApiError::invalid(errors));
    }
    let _waiting = match wait_ms {
        0 => None,
        _ => Some(state.claim_waits().enter(&caller.key_id, state.config().http.long_polls_per_key_max)?),
    };
    let deadline = tokio::time::Instant::now() + Duration::from_millis(wait_ms);
    loop {
        let woken = state.work().notified();
        state.metrics().inc("airlock_claim_looks_total", &[]);
        let leased = if let Some(id) = &job_id {
            match claim_one(&state, &caller, &pool, id).await? {
                OneClaim::Leased(leased) => Some(leased),
                OneClaim::NotQueued => return Ok(StatusCode::NO_CONTENT.into_response()),
                OneClaim::NotYet => None,
            }
        } else if state.config().pool_takes_all(&pool) {
            claim_held(&state, &caller).await?
        } else {
            claim_from_pages(&state, &caller, &pool).await?
        };
        if let Some(leased) = leased {
            return Ok(Json(leased).into_response());
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(StatusCode::NO_CONTENT.into_response());
        }
        crate::claim_wait::sleep(&state, &caller.tenant, deadline, woken).await?;
    }
}

/// A claim for a pool that takes every topic: holds the next job no other claim holds (of any
/// process) and runs Gate B on it, until one is leased or none is left.
async fn claim_held(state: &AppState, caller: &Caller) -> Result<Option<Value>, ApiError> {
    // Long enough for Gate B's safety check to time out and the dispatch to commit.
    let hold_ms = u64::try_from(state.config().gate_b_timeout.as_millis())
        .unwrap_or(u64::MAX)
        .saturating_add(CLAIM_HOLD_SLACK_MS);
    // One clock reading per look, as for pages: a job Gate B puts back (backoff, throttle) is
    // not due again within the same look, so each job is decided at most once per look.
    let now = now_ms();
    for _ in 0..CLAIM_SCAN_MAX {
        let Some(job) = state.store().hold_next(&caller.tenant, now, hold_ms).await? else {
            return Ok(None);
        };
        if let Some(leased) = gate_b(state, caller, job).await? {
            return Ok(Some(leased));
        }
    }
    Ok(None)
}

/// What a claim of one named job found.
enum OneClaim {
    Leased(Value),
    /// Not queued (awaiting approval, leased, ended): waiting will not lease it.
    NotQueued,
    /// Queued but not leased now (not yet due, throttled, requeued, another claim on it).
    NotYet,
}

/// A claim of one job by id: Gate B on it when it is queued and due.
async fn claim_one(state: &AppState, caller: &Caller, pool: &str, id: &JobId) -> Result<OneClaim, ApiError> {
    let job = state.store().job(&caller.tenant, id).await?.ok_or_else(|| ApiError::not_found("job"))?;
    if state.config().pool_takes(pool, &job.topic) != Some(true) {
        return Err(ApiError::invalid(vec![(
            "job_id".into(),
            format!("the pool `{pool}` does not take the job's topic `{}`", job.topic),
        )]));
    }
    if job.state != JobState::Queued {
        return Ok(OneClaim::NotQueued);
    }
    if job.dispatch.not_before > now_ms() || !state.begin_dispatch(id) {
        return Ok(OneClaim::NotYet);
    }
    let leased = gate_b(state, caller, job).await;
    state.end_dispatch(id);
    Ok(leased?.map_or(OneClaim::NotYet, OneClaim::Leased))
}

/// A claim for a pool of some topics (globs, matched here): pages through the queue past other
/// pools' jobs, up to a bound.
async fn claim_from_pages(state: &AppState, caller: &Caller, pool: &str) -> Result<Option<Value>, ApiError> {
    let now = now_ms();
    let mut offset = 0;
    while offset < CLAIM_SCAN_MAX {
        let mut page = state.store().dispatchable(&caller.tenant, now, offset, CLAIM_BATCH).await?;
        let full = page.len() == CLAIM_BATCH as usize;
        // Claims of other processes read the same page: each starts at a random job of it, so
        // that they seldom run Gate B on the same job only for one to find it taken.
        if !page.is_empty() {
            let start = usize::from(random_bytes()?[0]) % page.len();
            page.rotate_left(start);
        }
        for job in page {
            if state.config().pool_takes(pool, &job.topic) != Some(true) || !state.begin_dispatch(&job.id) {
                continue;
            }
            let id = job.id.clone();
            let leased = gate_b(state, caller, job).await;
            state.end_dispatch(&id);
            if let Some(leased) = leased? {
                return Ok(Some(leased));
            }
        }
        if !full {
            break;
        }
        offset += CLAIM_BATCH;
    }
    Ok(None)
}

/// Decisions made for one dispatch when publishes keep superseding them before the commit.
const DECIDE_ATTEMPTS_MAX: u32 = 3;

/// Runs Gate B on one queued job; the lease to hand out, or `None` when the job was not leased.
/// The decision is committed only under the snapshot it was made under: when a publish
/// supersedes it first, the store refuses the write and the job is decided again.
async fn gate_b(state: &AppState, caller: &Caller, job: JobRecord) -> Result<Option<Value>, ApiError> {
    let mut attempt = 1;
    loop {
        match decide(state, caller, &job).await {
            Err(e) if attempt < DECIDE_ATTEMPTS_MAX && e.superseded_by().is_some() => {
                state.refresh_policy(e.superseded_by()).await?;
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// One Gate B decision on `job` and its write: the safety check and the approval's binding
/// are read here, the decision and its move are the core's ([`moves::plan_gate_b`]), stamped
/// with the time the decision was made, and the store commits it only under the snapshot it
/// was made under.
async fn decide(state: &AppState, caller: &Caller, job: &JobRecord) -> Result<Option<Value>, ApiError> {
    let policy_job = job.to_policy_job();
    let topic = state.metrics().topic(&job.topic);
    let active = state.safety().active();
    let classes: Vec<&str> = active.policy.classes_of(&job.topic).collect();
    let fail_mode = state.config().gate_b_fail.for_topic(&job.topic, &classes);

    let checked = safety_check(state, &policy_job, now_ms()).await;
    let answer = match &checked {
        Ok(c) => {
            state.metrics().decided("b", c.evaluation.decision, &topic);
            state.metrics().observe("airlock_policy_eval_seconds", &[("gate", "b")], c.elapsed.as_secs_f64());
            let approval = if c.evaluation.decision == Decision::RequireHuman {
                approval_state(state, job, &c.active.policy, now_ms()).await?
            } else {
                ApprovalState::Missing
            };
            Answer::Decided(c.decided(), approval)
        }
        Err((reason, why)) => {
            state.metrics().inc("airlock_safety_check_failures_total", &[("gate", "b"), ("reason", reason)]);
            Answer::Unavailable {
                why: why.clone(),
                snapshot_hash: active.policy.hash().to_owned(),
                snapshot_version: active.version,
            }
        }
    };
    // Stamped when decided: the commit follows at once, and checks the snapshot is still active.
    let at = now_ms();
    let plan = moves::plan_gate_b(GateB {
        job,
        policy_job: &policy_job,
        answer,
        fail_mode,
        caps: state.config().caps_for(&job.topic),
        jitter: jitter()?,
        lease: Lease {
            token: lease_token()?,
            expires_at: at.saturating_add(ms(state.config().lease_ms)),
            worker: caller.principal.clone(),
        },
        approval_id: ApprovalId::generate(at, random_bytes()?),
        approval_ttl_ms: state.config().approval_ttl_ms,
        at,
        actor: caller.principal.clone(),
    });
    count(state, job, &topic, &plan.action);
    let leasing = matches!(plan.action, Action::Lease { .. });
    let gate = plan.decision;
    match state.store().apply(plan.mv).await?.dispatched()? {
        DispatchOutcome::Applied(leased) if leasing => {
            state.metrics().throttle_answered("b", gate.decision, &job.topic, true);
            let lease =
                leased.dispatch.lease.clone().ok_or_else(|| ApiError::internal("leased without a lease"))?;
            Ok(Some(json!({
                "job_id": leased.id.as_str(),
                "lease_token": lease.token,
                "lease_expires_at": lease.expires_at,
                "heartbeat_ms": state.config().heartbeat_ms,
                "attempt": leased.dispatch.execution_attempts,
                "idempotency_key": leased.idempotency_key,
                "topic": leased.topic,
                "env": leased.env,
                "labels": leased.labels,
                "payload": leased.payload,
                "job_hash": leased.job_hash,
                "plan_hash": leased.plan_hash,
                "gate_b": wire::decision(&gate),
            })))
        }
        DispatchOutcome::Throttled { .. } => {
            state.metrics().throttle_answered("b", gate.decision, &job.topic, false);
            state.work().changed();
            Ok(None)
        }
        DispatchOutcome::Applied(_) => {
            // Possibly put back for later (a backoff): waiting claims read the due time again.
            state.work().changed();
            Ok(None)
        }
        DispatchOutcome::Gone => Ok(None),
    }
}

/// The metrics and the log line of Gate B's action on `job`.
fn count(state: &AppState, job: &JobRecord, topic: &str, action: &Action) {
    let metrics = state.metrics();
    match action {
        Action::Lease { bypassed: true, .. } => {
            metrics.inc("airlock_scheduler_input_fail_open_total", &[("topic", topic)]);
            metrics.inc(
                "airlock_gate_decisions_total",
                &[("gate", "b"), ("decision", "bypassed"), ("topic", topic)],
            );
            tracing::warn!(job_id = %job.id, topic = %job.topic, "gate b unavailable; dispatched by fail-open mode");
        }
        Action::NeedsApproval(Some(_)) => metrics.inc("airlock_approvals_stale_total", &[]),
        Action::Requeue { .. } => metrics
            .inc("airlock_scheduling_attempts_total", &[("topic", topic), ("reason", "safety_unavailable")]),
        Action::DeadLetter(_) => {
            metrics.inc("airlock_dead_lettered_total", &[("topic", topic), ("reason", "scheduling_attempts")])
        }
        Action::Lease { .. } | Action::Deny | Action::NeedsApproval(None) => {}
    }
}

fn ms(value: u64) -> Millis {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// The safety check behind the breaker: `Err((reason label, description))` when unavailable.
async fn safety_check(
    state: &AppState,
    job: &airlock_policy::Job,
    now: Millis,
) -> Result<crate::state::Checked, (&'static str, String)> {
    let shared = state.config().shared_breaker;
    let admission = if shared {
        // Replicas share one breaker through the store; if the store cannot answer, neither
        // can a decision be recorded: count it as unavailable.
        match state.store().breaker_admit(state.config().breaker, now).await {
            Ok(a) => a,
            Err(e) => return Err(("store_unavailable", e.to_string())),
        }
    } else {
        state.breaker().lock().map_or(Admission::Refused, |mut b| b.admit(now))
    };
    if admission == Admission::Refused {
        return Err(("circuit_open", "circuit open".into()));
    }
    let result = state.safety().check(job, state.config().gate_b_timeout).await;
    let later = now_ms();
    if shared {
        if let Err(e) = state.store().breaker_report(state.config().breaker, later, result.is_ok()).await {
            tracing::warn!(error = %e, "cannot report to the shared breaker");
        }
    } else if let Ok(mut breaker) = state.breaker().lock() {
        match &result {
            Ok(_) => breaker.success(later),
            Err(_) => breaker.failure(later),
        }
    }
    result.map_err(|e| {
        let description = match &e {
            crate::state::SafetyError::Unavailable(m) => m.clone(),
            crate::state::SafetyError::Timeout(d) => format!("timed out after {d:?}"),
        };
        (e.reason(), description)
    })
}

async fn approval_state(
    state: &AppState,
    job: &JobRecord,
    policy: &airlock_policy::Policy,
    now: Millis,
) -> Result<ApprovalState, ApiError> {
    let Some(id) = &job.approval_id else { return Ok(ApprovalState::Missing) };
    let Some(record) = state.store().approval(&job.tenant, id).await? else {
        return Ok(ApprovalState::Missing);
    };
    if record.request.status != Status::Approved {
        return Ok(ApprovalState::Missing);
    }
    Ok(
        match approval::check_binding(
            &record.request,
            &job.to_policy_job(),
            policy,
            state.config().approval_binding,
            now,
        ) {
            Ok(()) => ApprovalState::Valid,
            Err(stale) => ApprovalState::Stale(stale),
        },
    )
}

fn job_id(text: &str) -> Result<JobId, ApiError> {
    text.parse().map_err(|_| ApiError::not_found("job"))
}

fn token_of(map: &serde_json::Map<String, Value>) -> Result<String, ApiError> {
    map.get("lease_token").and_then(Value::as_str).filter(|t| !t.is_empty()).map(str::to_owned).ok_or_else(
        || ApiError::invalid(vec![("lease_token".into(), "is required: the token of the claim".into())]),
    )
}

fn stale_lease(e: airlock_store::StoreError) -> ApiError {
    match e {
        airlock_store::StoreError::Conflict(m) => ApiError::new(StatusCode::CONFLICT, "lease_lost", m),
        other => other.into(),
    }
}

/// `POST /api/v1/workers/jobs/{id}/heartbeat` `{"lease_token"}`: extends the lease, or
/// answers `cancel: true` when the job was cancelled.
pub async fn heartbeat(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    caller.require(Role::Worker)?;
    let map = json_object(&wire::read_body(body, REQUEST_BODY_BYTES_MAX).await?)?;
    only_fields(&map, &["lease_token"])?;
    let now = now_ms();
    let expires_at = now.saturating_add(ms(state.config().lease_ms));
    let beat = state
        .store()
        .heartbeat(&caller.tenant, &job_id(&id)?, &token_of(&map)?, now, expires_at)
        .await
        .map_err(stale_lease)?;
    Ok(Json(match beat {
        Heartbeat::Extended { expires_at } => json!({"lease_expires_at": expires_at, "cancel": false}),
        Heartbeat::Cancelled => json!({"cancel": true}),
    }))
}

/// `POST /api/v1/workers/jobs/{id}/complete` `{"lease_token", "result"}`.
pub async fn complete(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    caller.require(Role::Worker)?;
    let bytes = wire::read_body(body, REQUEST_BODY_BYTES_MAX).await?;
    let map = json_object(&bytes)?;
    only_fields(&map, &["lease_token", "result"])?;
    let result = map.get("result").cloned().unwrap_or(Value::Null);
    let size = result.to_string().len();
    if size > RESULT_BYTES_MAX {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the result is {size} bytes; the limit is {RESULT_BYTES_MAX}"),
        ));
    }
    let now = now_ms();
    let lease = LeaseCheck { token: token_of(&map)?, live_at: Some(now) };
    let finish = Finish::Succeeded { result };
    let mv =
        moves::plan_finish(caller.tenant.clone(), job_id(&id)?, lease, finish, now, caller.principal.clone());
    let job = state.store().apply(mv).await.and_then(Applied::finished).map_err(stale_lease)?;
    Ok(Json(json!({"job_id": job.id.as_str(), "state": job.state.as_str()})))
}

/// `POST /api/v1/workers/jobs/{id}/fail` `{"lease_token", "error", "retryable"}`.
pub async fn fail(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    caller.require(Role::Worker)?;
    let map = json_object(&wire::read_body(body, REQUEST_BODY_BYTES_MAX).await?)?;
    only_fields(&map, &["lease_token", "error", "retryable"])?;
    let token = token_of(&map)?;
    let error: String = match map.get("error") {
        None => "failed".into(),
        Some(Value::String(e)) => e.chars().take(4096).collect(),
        Some(_) => return Err(ApiError::invalid(vec![("error".into(), "must be a string".into())])),
    };
    let retryable = match map.get("retryable") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            return Err(ApiError::invalid(vec![("retryable".into(), "must be `true` or `false`".into())]));
        }
    };
    let id = job_id(&id)?;
    let job = state.store().job(&caller.tenant, &id).await?.ok_or_else(|| ApiError::not_found("job"))?;
    let live = Some(now_ms());
    let job = end_attempt(&state, &job, &token, live, retryable, &error, &caller.principal)
        .await
        .map_err(stale_lease)?;
    Ok(Json(json!({"job_id": job.id.as_str(), "state": job.state.as_str()})))
}

/// Ends an execution attempt that failed (`live_at`: the worker's lease must still be live)
/// or whose lease lapsed (`None`), by the execution cap.
async fn end_attempt(
    state: &AppState,
    job: &JobRecord,
    token: &str,
    live_at: Option<Millis>,
    retryable: bool,
    error: &str,
    actor: &str,
) -> Result<JobRecord, airlock_store::StoreError> {
    let caps = state.config().caps_for(&job.topic);
    let finish = match dispatch::after_attempt(job.dispatch.execution_attempts, retryable, &caps, error) {
        AfterAttempt::Retry => Finish::Retry { error: error.to_owned() },
        AfterAttempt::Fail => Finish::Failed { error: error.to_owned() },
        AfterAttempt::DeadLetter(reason) => {
            let topic = state.metrics().topic(&job.topic);
            state
                .metrics()
                .inc("airlock_dead_lettered_total", &[("topic", &topic), ("reason", "execution_attempts")]);
            Finish::DeadLetter { reason }
        }
    };
    let retry = matches!(finish, Finish::Retry { .. });
    let lease = LeaseCheck { token: token.to_owned(), live_at };
    let mv =
        moves::plan_finish(job.tenant.clone(), job.id.clone(), lease, finish, now_ms(), actor.to_owned());
    let job = state.store().apply(mv).await?.finished()?;
    if retry {
        state.queued_here();
    }
    Ok(job)
}

/// Jobs whose topic no configured pool takes (SPEC 6, reason `no_worker`): no claim ever looks
/// at them, so this does. Each due one uses a scheduling attempt with the usual backoff and, at
/// the cap, goes to the DLQ. Run periodically; looks at most at [`CLAIM_SCAN_MAX`] queued jobs
/// per tenant.
pub async fn park_unroutable(state: &AppState) -> Result<usize, airlock_store::StoreError> {
    let config = state.config();
    if config.pools.is_empty() {
        return Ok(0);
    }
    let now = now_ms();
    let mut parked = 0;
    for tenant in state.store().audit_tenants().await? {
        let mut offset = 0;
        while offset < CLAIM_SCAN_MAX {
            let page = state.store().dispatchable(&tenant, now, offset, CLAIM_BATCH).await?;
            let full = page.len() == CLAIM_BATCH as usize;
            let mut moved = 0;
            for job in &page {
                if config.pools.iter().any(|(_, globs)| globs.iter().any(|g| g.matches(&job.topic))) {
                    continue;
                }
                let caps = config.caps_for(&job.topic);
                let jitter =
                    jitter().map_err(|_| airlock_store::StoreError::Unavailable("no randomness".into()))?;
                let topic = state.metrics().topic(&job.topic);
                let (rescheduled, mv) = moves::plan_no_worker(job, &caps, jitter, now);
                if let Rescheduled::DeadLetter(_) = rescheduled {
                    state.metrics().inc(
                        "airlock_dead_lettered_total",
                        &[("topic", &topic), ("reason", dispatch::NO_WORKER)],
                    );
                }
                state.metrics().inc(
                    "airlock_scheduling_attempts_total",
                    &[("topic", &topic), ("reason", dispatch::NO_WORKER)],
                );
                if let DispatchOutcome::Applied(_) = state.store().apply(mv).await?.dispatched()? {
                    parked += 1;
                    moved += 1;
                }
            }
            if !full {
                break;
            }
            // Moved jobs left the dispatchable set: the next page starts that much earlier.
            offset += CLAIM_BATCH - moved;
        }
    }
    Ok(parked)
}

/// Requeues or dead-letters jobs whose lease lapsed (a worker died or stalled). Run periodically.
pub async fn expire_leases(state: &AppState) -> Result<usize, airlock_store::StoreError> {
    let lapsed = state.store().lapsed_leases(now_ms(), 100).await?;
    let mut n = 0;
    for job in lapsed {
        let Some(lease) = &job.dispatch.lease else { continue };
        match end_attempt(state, &job, &lease.token.clone(), None, true, "lease expired", "system").await {
            Ok(_) => n += 1,
            Err(airlock_store::StoreError::Conflict(_)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// `GET /api/v1/dlq?topic=&reason=&after=&limit=`.
pub async fn dlq_list(
    State(state): State<AppState>,
    caller: Caller,
    RawQuery(params): RawQuery<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    caller.require_read(Role::Operator)?;
    let q = Query::new(params, &["topic", "reason", "after", "limit"])?;
    let (topic, reason) = (q.get::<String>("topic")?, q.get::<String>("reason")?);
    let limit = q.limit()?;
    let jobs = state
        .store()
        .dead_letters(&caller.tenant, topic.as_deref(), q.get::<JobId>("after")?.as_ref(), limit)
        .await?;
    let next = (jobs.len() == limit as usize).then(|| jobs.last().map(|j| j.id.to_string())).flatten();
    let shown: Vec<Value> = jobs
        .iter()
        .filter(|j| {
            reason.as_ref().is_none_or(|r| {
                j.dispatch.dead_letter_reason.as_deref().is_some_and(|d| d.contains(r.as_str()))
            })
        })
        .map(dead_letter)
        .collect();
    Ok(Json(json!({"dead_letters": shown, "next": next})))
}

fn dead_letter(j: &JobRecord) -> Value {
    let mut v = wire::job_summary(j);
    if let Some(o) = v.as_object_mut() {
        o.insert("reason".into(), json!(j.dispatch.dead_letter_reason));
        o.insert("scheduling_attempts".into(), json!(j.dispatch.scheduling_attempts));
        o.insert("execution_attempts".into(), json!(j.dispatch.execution_attempts));
    }
    v
}

async fn dead_lettered(state: &AppState, caller: &Caller, id: &str) -> Result<JobRecord, ApiError> {
    let job =
        state.store().job(&caller.tenant, &job_id(id)?).await?.ok_or_else(|| ApiError::not_found("job"))?;
    if job.state != JobState::DeadLettered || job.dispatch.discarded_at.is_some() {
        return Err(ApiError::not_found("dead-lettered job"));
    }
    Ok(job)
}

/// `GET /api/v1/dlq/{id}`.
pub async fn dlq_get(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    caller.require_read(Role::Operator)?;
    let job = dead_lettered(&state, &caller, &id).await?;
    let mut v = crate::jobs::view(&state, &job).await?;
    if let Some(o) = v.as_object_mut() {
        o.insert("reason".into(), json!(job.dispatch.dead_letter_reason));
    }
    Ok(Json(v))
}

/// `POST /api/v1/dlq/{id}/retry`: back to the queue with fresh attempts; Gate B runs again.
pub async fn dlq_retry(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Role::Operator)?;
    let job = dead_lettered(&state, &caller, &id).await?;
    let mv = moves::plan_operator_retry(&job, now_ms(), caller.principal.clone());
    let job = state.store().apply(mv).await?.finished()?;
    state.queued_here();
    Ok(Json(json!({"job_id": job.id.as_str(), "state": job.state.as_str()})))
}

/// `POST /api/v1/dlq/{id}/discard`: kept for the record, out of the DLQ.
pub async fn dlq_discard(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Role::Operator)?;
    let job = dead_lettered(&state, &caller, &id).await?;
    let mv = moves::plan_discard(&job, now_ms(), caller.principal.clone());
    let job = state.store().apply(mv).await?.finished()?;
    Ok(Json(
        json!({"job_id": job.id.as_str(), "state": job.state.as_str(), "discarded_at": job.dispatch.discarded_at}),
    ))
}
