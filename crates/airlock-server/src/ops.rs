//! Operational endpoints: liveness, readiness, Prometheus metrics, the OpenAPI document, and
//! (only when enabled at start) fault injection into the safety check for tests and drills.

use std::time::Duration;

use airlock_core::defaults::REQUEST_BODY_BYTES_MAX;
use axum::Json;
use axum::body::Body;
use axum::extract::{Extension, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::ProcessRole;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::state::{AppState, Fault};
use crate::wire::{self, json_object, only_fields};

/// The OpenAPI document, served as is.
pub const OPENAPI: &str = include_str!("openapi.json");

/// `GET /healthz`: the process is up.
pub async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// `GET /readyz`: the store answers and a policy is active.
pub async fn readyz(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    match state.store().active_snapshot().await {
        Ok(Some(s)) => Ok(Json(json!({"status": "ready", "snapshot_version": s.version}))),
        Ok(None) => {
            Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", "no policy is active")
                .retry_after(1))
        }
        Err(e) => {
            tracing::warn!(error = %e, "readiness check failed");
            Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", "the store is unavailable")
                .retry_after(1))
        }
    }
}

/// `GET /metrics`; with `metrics.require_key`, only for a request with a valid key.
pub async fn metrics(
    State(state): State<AppState>,
    caller: Result<Caller, ApiError>,
) -> Result<Response, ApiError> {
    if state.config().metrics_require_key {
        caller?;
    }
    let mut gauges = Vec::new();
    let counts = state.store().job_counts().await?;
    for job_state in airlock_core::state::JobState::ALL {
        let n = counts.get(&job_state).copied().unwrap_or(0);
        gauges.push(("airlock_jobs", vec![("state", job_state.as_str().to_owned())], n as f64));
    }
    let pending = state.store().pending_approvals().await?;
    gauges.push(("airlock_approvals_pending", Vec::new(), pending as f64));
    gauges.push(("airlock_policy_snapshot_version", Vec::new(), state.safety().active().version as f64));
    gauges.push(("airlock_dlq_depth", Vec::new(), state.store().dlq_depth().await? as f64));
    let now = crate::state::now_ms();
    let circuit = if state.config().shared_breaker {
        state.store().breaker_state(now).await?.gauge()
    } else {
        state.breaker().lock().map_or(2, |b| b.state(now).gauge())
    };
    gauges.push(("airlock_safety_circuit_state", Vec::new(), f64::from(circuit)));
    let text = state.metrics().render(&gauges);
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response())
}

/// `GET /api/v1/openapi.json`: the document of what this process serves. [`OPENAPI`] describes
/// every route of every role; a process leaves out the remote safety service's route (served
/// only by `--role safety`, which serves no document), the fault-injection route unless it was
/// enabled, and the routes its role sends elsewhere, so that a client or a fuzzer driven by
/// the document never meets a documented route that answers 404. The claim's `pool` lists the
/// pools this server has.
pub async fn openapi(State(state): State<AppState>, role: Option<Extension<ProcessRole>>) -> Response {
    let role = role.map_or(ProcessRole::All, |Extension(r)| r);
    let served = |path: &str| {
        path != "/api/v1/safety/evaluate"
            && (path != "/api/v1/admin/faults" || state.config().fault_injection)
            && role.serves(path)
    };
    match serde_json::from_str::<Value>(OPENAPI) {
        Ok(mut document) => {
            if let Some(paths) = document.get_mut("paths").and_then(Value::as_object_mut) {
                paths.retain(|path, _| served(path));
            }
            // The pools are this server's configuration: a claim names one of them.
            let pools: Vec<&str> = match state.config().pools.as_slice() {
                [] => vec!["default"],
                configured => configured.iter().map(|(name, _)| name.as_str()).collect(),
            };
            if let Some(pool) = document.pointer_mut("/components/schemas/ClaimRequest/properties/pool") {
                wire::merge(pool, json!({"enum": pools}));
            }
            ([(header::CONTENT_TYPE, "application/json")], document.to_string()).into_response()
        }
        Err(e) => ApiError::internal(e).into_response(),
    }
}

/// `POST /api/v1/admin/faults` `{"safety": "unavailable" | "slow" | "none", "delay_ms"?}`.
/// Exists only when the server was started with fault injection enabled.
pub async fn faults(
    State(state): State<AppState>,
    caller: Result<Caller, ApiError>,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    if !state.config().fault_injection {
        return Err(ApiError::not_found("route"));
    }
    let caller = caller?;
    caller.require_platform_admin()?;
    let map = json_object(&wire::read_body(body, REQUEST_BODY_BYTES_MAX).await?)?;
    only_fields(&map, &["safety", "delay_ms"])?;
    let fault = match map.get("safety").and_then(Value::as_str) {
        Some("none") => None,
        Some("unavailable") => Some(Fault::Unavailable),
        Some("slow") => {
            let ms = map.get("delay_ms").and_then(Value::as_u64).unwrap_or(10_000);
            Some(Fault::Slow(Duration::from_millis(ms)))
        }
        _ => {
            return Err(ApiError::invalid(vec![(
                "safety".into(),
                "must be `none`, `unavailable` or `slow`".into(),
            )]));
        }
    };
    let draft = airlock_core::audit::Draft {
        at: crate::state::now_ms(),
        kind: airlock_core::audit::Kind::SafetyFaultInjected,
        subject: "safety".into(),
        actor: caller.principal.clone(),
        data: json!({"safety": map.get("safety"), "delay_ms": map.get("delay_ms")}),
    };
    state.store().append_audit(&caller.tenant, draft, None).await?;
    state.safety().inject(fault);
    tracing::warn!(?fault, actor = %caller.principal, "safety fault injected");
    Ok(Json(json!({"safety": map.get("safety")})))
}
