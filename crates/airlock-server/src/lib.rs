//! Airlock's HTTP service (SPEC sections 5, 7, 8, 11, 12): Gate A, jobs, approvals, the policy
//! API, keys, audit and metrics, over one [`Store`]. Handlers read the clock and parse the
//! wire format; decisions come from the policy engine and the pure core.

mod approvals;
mod audit_api;
pub mod auth;
pub mod checkpoint;
mod claim_wait;
pub mod error;
mod gate_a;
mod gate_b;
mod jobs;
pub mod keys;
pub mod listener;
pub mod metrics;
mod ops;
mod overview;
mod payload_schema;
mod plans;
mod policy_api;
pub mod relay;
pub mod remote_safety;
pub mod state;
pub mod tls;
pub mod wire;

use std::sync::Arc;
use std::time::{Duration, Instant};

use airlock_core::ids::TenantId;
use airlock_core::role::Role;
use airlock_store::Store;
use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse as _, Response};
use axum::routing::{delete, get, post};

pub use audit_api::verify_tenant;
pub use ops::OPENAPI;
use state::{ActivePolicy, AppState, Config};

/// Every route: method and path. The OpenAPI document must describe each (tested).
pub const ROUTES: [(&str, &str); 38] = [
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/metrics"),
    ("get", "/api/v1/openapi.json"),
    ("post", "/api/v1/jobs"),
    ("get", "/api/v1/jobs"),
    ("get", "/api/v1/jobs/{id}"),
    ("post", "/api/v1/jobs/{id}/cancel"),
    ("get", "/api/v1/approvals"),
    ("get", "/api/v1/approvals/{id}"),
    ("post", "/api/v1/approvals/{id}/approve"),
    ("post", "/api/v1/approvals/{id}/reject"),
    ("get", "/api/v1/policy/snapshots"),
    ("post", "/api/v1/policy/publish"),
    ("post", "/api/v1/policy/rollback"),
    ("post", "/api/v1/policy/simulate"),
    ("post", "/api/v1/policy/explain"),
    ("post", "/api/v1/policy/diff"),
    ("post", "/api/v1/keys"),
    ("get", "/api/v1/keys"),
    ("delete", "/api/v1/keys/{id}"),
    ("get", "/api/v1/audit"),
    ("post", "/api/v1/audit/verify"),
    ("post", "/api/v1/admin/faults"),
    ("post", "/api/v1/workers/claim"),
    ("post", "/api/v1/workers/jobs/{id}/heartbeat"),
    ("post", "/api/v1/workers/jobs/{id}/complete"),
    ("post", "/api/v1/workers/jobs/{id}/fail"),
    ("get", "/api/v1/dlq"),
    ("get", "/api/v1/dlq/{id}"),
    ("post", "/api/v1/dlq/{id}/retry"),
    ("post", "/api/v1/dlq/{id}/discard"),
    ("post", "/api/v1/safety/evaluate"),
    ("get", "/api/v1/reports/idempotency"),
    ("get", "/api/v1/overview"),
    ("get", "/api/v1/approvals/summary"),
    ("get", "/api/v1/policy/snapshots/{version}"),
    ("post", "/api/v1/plans"),
];

/// What one process serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProcessRole {
    /// Everything: the gateway's and the scheduler's routes.
    All,
    /// Gate A and the API for people and agents; not the worker protocol.
    Gateway,
    /// The worker protocol (Gate B), with health and metrics.
    Scheduler,
}

impl ProcessRole {
    /// Whether a request path belongs to this role.
    pub(crate) fn serves(self, path: &str) -> bool {
        let common = matches!(path, "/healthz" | "/readyz" | "/metrics" | "/api/v1/openapi.json");
        let worker = path.starts_with("/api/v1/workers/");
        match self {
            Self::All => true,
            Self::Gateway => !worker,
            Self::Scheduler => worker || common,
        }
    }
}

/// The application for one role.
pub fn router_for(state: AppState, role: ProcessRole) -> Router {
    router(state).layer(axum::Extension(role)).layer(middleware::from_fn(
        move |request: Request, next: Next| async move {
            if role.serves(request.uri().path()) {
                next.run(request).await
            } else {
                error::ApiError::new(
                    axum::http::StatusCode::NOT_FOUND,
                    "not_found",
                    format!("this process runs the {role:?} role; send this request to another"),
                )
                .into_response()
            }
        },
    ))
}

/// The application, ready to serve or to test with `tower::ServiceExt::oneshot`.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .route("/api/v1/openapi.json", get(ops::openapi))
        .route("/api/v1/jobs", post(gate_a::submit).get(jobs::list))
        .route("/api/v1/jobs/{id}", get(jobs::get))
        .route("/api/v1/plans", post(plans::submit))
        .route("/api/v1/jobs/{id}/cancel", post(jobs::cancel))
        .route("/api/v1/reports/idempotency", get(jobs::idempotency_report))
        .route("/api/v1/overview", get(overview::overview))
        .route("/api/v1/approvals", get(approvals::list))
        .route("/api/v1/approvals/summary", get(approvals::summary))
        .route("/api/v1/approvals/{id}", get(approvals::get))
        .route("/api/v1/approvals/{id}/approve", post(approvals::approve))
        .route("/api/v1/approvals/{id}/reject", post(approvals::reject))
        .route("/api/v1/policy/snapshots", get(policy_api::snapshots))
        .route("/api/v1/policy/snapshots/{version}", get(policy_api::snapshot))
        .route("/api/v1/policy/publish", post(policy_api::publish))
        .route("/api/v1/policy/rollback", post(policy_api::rollback))
        .route("/api/v1/policy/simulate", post(policy_api::simulate))
        .route("/api/v1/policy/explain", post(policy_api::explain))
        .route("/api/v1/policy/diff", post(policy_api::diff))
        .route("/api/v1/keys", post(keys::create).get(keys::list))
        .route("/api/v1/keys/{id}", delete(keys::revoke))
        .route("/api/v1/audit", get(audit_api::list))
        .route("/api/v1/audit/verify", post(audit_api::verify))
        .route("/api/v1/admin/faults", post(ops::faults))
        .route("/api/v1/workers/claim", post(gate_b::claim))
        .route("/api/v1/workers/jobs/{id}/heartbeat", post(gate_b::heartbeat))
        .route("/api/v1/workers/jobs/{id}/complete", post(gate_b::complete))
        .route("/api/v1/workers/jobs/{id}/fail", post(gate_b::fail))
        .route("/api/v1/dlq", get(gate_b::dlq_list))
        .route("/api/v1/dlq/{id}", get(gate_b::dlq_get))
        .route("/api/v1/dlq/{id}/retry", post(gate_b::dlq_retry))
        .route("/api/v1/dlq/{id}/discard", post(gate_b::dlq_discard))
        .fallback(|| async { error::ApiError::not_found("route") })
        .method_not_allowed_fallback(|| async {
            error::ApiError::new(
                axum::http::StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this route does not take that method; see /api/v1/openapi.json",
            )
        })
        .layer(middleware::from_fn_with_state(state.clone(), limit))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

/// The safety service (`airlock serve --role safety`): health, metrics and evaluations only.
pub fn safety_router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .route("/api/v1/safety/evaluate", post(remote_safety::evaluate))
        .fallback(|| async { error::ApiError::not_found("route") })
        .layer(middleware::from_fn_with_state(state.clone(), limit))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

/// Sheds a request when `http.in_flight_max` are being served (503 with `Retry-After`), and
/// ends one that outlives `http.request_timeout` (a long-poll claim gets its longest wait on
/// top). Liveness probes are never shed.
async fn limit(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let path = request.uri().path();
    if path == "/healthz" {
        return next.run(request).await;
    }
    let limits = &state.config().http;
    let Ok(_slot) = state.in_flight_slots().try_acquire() else {
        return error::ApiError::new(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            format!("the server is serving its limit of {} requests; retry", limits.in_flight_max),
        )
        .retry_after(1)
        .into_response();
    };
    let mut budget = limits.request_timeout;
    if path == "/api/v1/workers/claim" {
        budget += Duration::from_millis(gate_b::CLAIM_WAIT_MAX_MS);
    }
    match tokio::time::timeout(budget, next.run(request)).await {
        Ok(response) => response,
        Err(_) => error::ApiError::new(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "request_timeout",
            format!("the request took longer than {} ms and was abandoned; retry", budget.as_millis()),
        )
        .retry_after(1)
        .into_response(),
    }
}

/// The `method` label: the standard methods, and `other` for any other string a client sends,
/// so that clients cannot grow the registry.
fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "other",
    }
}

async fn observe(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = method_label(request.method());
    let route = request.extensions().get::<MatchedPath>().map_or("unmatched", |p| p.as_str()).to_owned();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    let metrics = state.metrics();
    metrics.inc("airlock_http_requests_total", &[("method", method), ("route", &route), ("status", &status)]);
    metrics.observe("airlock_http_request_seconds", &[("route", &route)], started.elapsed().as_secs_f64());
    response
}

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The store failed.
    #[error("store: {0}")]
    Store(#[from] airlock_store::StoreError),
    /// The stored or given policy does not compile.
    #[error("policy `{source_name}` does not compile:\n{errors}")]
    Policy {
        /// Where it came from.
        source_name: String,
        /// Its errors, one per line.
        errors: String,
    },
    /// Anything else at start, with its description.
    #[error("{0}")]
    Other(String),
}

/// Loads the active snapshot, publishing `initial` (name, text) first when the store has none.
pub async fn load_policy(store: &dyn Store, initial: (&str, &str)) -> Result<ActivePolicy, StartError> {
    let compile = |name: &str, text: &str| {
        airlock_policy::compile(text).map(|(p, _)| p).map_err(|errors| StartError::Policy {
            source_name: name.to_owned(),
            errors: errors.iter().map(|d| d.render(name)).collect::<Vec<_>>().join("\n"),
        })
    };
    if let Some(active) = store.active_snapshot().await? {
        let policy = compile(&format!("stored snapshot {}", active.version), &active.source)?;
        return Ok(ActivePolicy { version: active.version, policy });
    }
    let (name, text) = initial;
    let policy = compile(name, text)?;
    let record = store
        .publish(policy.hash(), text, Some(&format!("initial policy from {name}")), state::now_ms(), "system")
        .await?;
    Ok(ActivePolicy { version: record.version, policy })
}

/// Creates the platform admin key when the store has no key at all. Returns the secret when
/// it was generated (to be printed once), `None` when it came from `admin_key` or keys exist.
/// Stores its plain hash: for a server whose configuration has no key pepper.
pub async fn bootstrap_admin(
    store: &dyn Store,
    admin_key: Option<String>,
) -> Result<Option<String>, StartError> {
    bootstrap_admin_with(store, admin_key, &auth::KeyHasher::default()).await
}

/// [`bootstrap_admin`], hashing the key with `hasher` (the server's key pepper).
pub async fn bootstrap_admin_with(
    store: &dyn Store,
    admin_key: Option<String>,
    hasher: &auth::KeyHasher,
) -> Result<Option<String>, StartError> {
    if !store.keys(None).await?.is_empty() {
        return Ok(None);
    }
    let tenant: TenantId = TenantId::PLATFORM.parse().map_err(|e| StartError::Other(format!("{e}")))?;
    let roles = [Role::Admin].into_iter().collect();
    let generated = admin_key.is_none();
    let secret = match admin_key {
        Some(key) if key.len() >= 16 => key,
        Some(_) => return Err(StartError::Other("AIRLOCK_ADMIN_KEY must be at least 16 characters".into())),
        None => auth::generate_key().map_err(|e| StartError::Other(format!("{e:?}")))?,
    };
    let key = keys::NewKey { tenant, name: "admin".into(), principal: None, roles };
    match keys::create_key_with_secret(store, hasher, key, "system", secret).await {
        Ok((_, secret)) => Ok(generated.then_some(secret)),
        // Another replica starting at the same moment created it first.
        Err(e) if e.status() == axum::http::StatusCode::CONFLICT => Ok(None),
        Err(e) => Err(StartError::Other(format!("cannot create the admin key: {e:?}"))),
    }
}

/// Acts on other processes' notifications at once (claims wake up, publishes are activated),
/// when the store delivers them; polling in [`sweep`] covers anything missed.
pub fn spawn_listener(state: AppState) {
    let Some(mut events) = state.store().events() else { return };
    tokio::spawn(async move {
        loop {
            match events.recv().await {
                Ok(airlock_store::StoreEvent::Work) => state.work().wake(),
                Ok(airlock_store::StoreEvent::Keys) => state.keys().clear(),
                Ok(airlock_store::StoreEvent::Policy) => {
                    if let Err(e) = state.refresh_policy(None).await {
                        tracing::warn!(error = %e, "policy refresh failed");
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    state.keys().clear();
                    state.work().wake();
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
    });
}

/// How long an unrelayed wake-up is kept in the outbox.
const OUTBOX_KEEP_MS: i64 = 5 * 60 * 1000;

/// Every `period` until the process ends, [`sweep`].
pub fn spawn_sweeps(state: AppState, period: Duration) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        loop {
            tick.tick().await;
            sweep(&state).await;
        }
    });
}

/// Expires due approval requests, requeues or dead-letters jobs whose lease lapsed, and picks
/// up a snapshot another process published (the polling that keeps replicas on one policy).
pub async fn sweep(state: &AppState) {
    if let Err(e) = state.refresh_policy(None).await {
        tracing::warn!(error = %e, "policy refresh failed");
    }
    if let Err(e) = state.store().outbox_prune(state::now_ms() - OUTBOX_KEEP_MS).await {
        tracing::warn!(error = %e, "outbox prune failed");
    }
    if let Err(e) = approvals::expire_due(state, state::now_ms()).await {
        tracing::warn!(error = %e, "approval expiry sweep failed");
    }
    match gate_b::park_unroutable(state).await {
        Ok(0) => {}
        Ok(n) => tracing::warn!(jobs = n, "queued jobs whose topic no pool takes used a scheduling attempt"),
        Err(e) => tracing::warn!(error = %e, "no-worker sweep failed"),
    }
    match gate_b::expire_leases(state).await {
        Ok(0) => {}
        Ok(n) => {
            tracing::info!(jobs = n, "lapsed leases ended");
            state.queued_here();
        }
        Err(e) => tracing::warn!(error = %e, "lease expiry sweep failed"),
    }
}

/// Builds the shared state.
pub fn app_state(store: Arc<dyn Store>, active: ActivePolicy, config: Config) -> AppState {
    AppState::new(store, active, config)
}
