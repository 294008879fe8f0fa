//! The safety check as a separate service (SPEC 6, 10): `airlock serve --role safety` answers
//! `POST /api/v1/safety/evaluate`, and the other roles call it with `--safety-url`. The caller
//! bounds each call by the client timeout (2 s); the service bounds each evaluation by the
//! engine defence timeout (3 s). The service and its callers share a token
//! (`AIRLOCK_SAFETY_TOKEN`) and the store, so that both compile the same snapshot: the
//! service answers rule positions and the caller maps them onto its own copy, after checking
//! that the snapshot hashes agree.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use airlock_core::defaults::{GATE_B_ENGINE_TIMEOUT_MS, PLAN_BODY_BYTES_MAX, REQUEST_BODY_BYTES_MAX};
use airlock_policy::{Decision, EvalError, Evaluation, Job, Policy, RuleIdx};
use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};

use crate::error::ApiError;
use crate::state::{AppState, SafetyError};
use crate::wire::{self, json_object, only_fields};

/// How a remote safety service is reached.
#[derive(Clone, Debug)]
pub struct RemoteSafety {
    /// `host:port`.
    pub addr: String,
    /// The shared token.
    pub token: String,
}

impl RemoteSafety {
    /// Parses `http://host:port` (plain HTTP; keep the service on a private network).
    pub fn new(url: &str, token: String) -> Result<Self, String> {
        let addr = url
            .strip_prefix("http://")
            .map(|rest| rest.trim_end_matches('/'))
            .filter(|a| !a.is_empty() && !a.contains('/'))
            .ok_or_else(|| format!("`{url}` is not an http://host:port URL"))?;
        if token.len() < 16 {
            return Err("AIRLOCK_SAFETY_TOKEN must be at least 16 characters".into());
        }
        Ok(Self { addr: addr.to_owned(), token })
    }

    /// Asks the service for the decision on `job` under snapshot `version`.
    pub async fn evaluate(
        &self,
        job: &Job,
        version: u64,
        policy: &Policy,
    ) -> Result<Evaluation, SafetyError> {
        let body = json!({"snapshot_version": version, "job": job_json(job)}).to_string();
        let (status, reply) = post(&self.addr, &self.token, &body).await.map_err(SafetyError::Unavailable)?;
        if status != 200 {
            return Err(SafetyError::Unavailable(format!("the safety service answered {status}: {reply}")));
        }
        let v: Value = serde_json::from_str(&reply).map_err(|e| SafetyError::Unavailable(e.to_string()))?;
        if v.get("snapshot_hash").and_then(Value::as_str) != Some(policy.hash()) {
            return Err(SafetyError::Unavailable("the safety service evaluated another snapshot".into()));
        }
        let decision = v
            .get("decision")
            .and_then(Value::as_str)
            .and_then(Decision::parse)
            .ok_or_else(|| SafetyError::Unavailable("the safety service sent no decision".into()))?;
        let positions = |key: &str| -> Vec<RuleIdx> {
            v.get(key)
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(|i| i.as_u64().and_then(|i| u32::try_from(i).ok())).collect())
                .unwrap_or_default()
        };
        let deciding = positions("deciding");
        if deciding.iter().any(|i| policy.rule(*i).is_none()) {
            return Err(SafetyError::Unavailable(
                "the safety service named a rule this snapshot lacks".into(),
            ));
        }
        let errors = positions("errors")
            .into_iter()
            .map(|i| (i, EvalError::Fanout(airlock_policy::path::FanoutExceeded)))
            .collect();
        Ok(Evaluation { decision, deciding, audit: positions("audit"), errors })
    }
}

fn job_json(job: &Job) -> Value {
    json!({
        "tenant": job.tenant,
        "principal": job.principal,
        "topic": job.topic,
        "env": job.env,
        "labels": job.labels,
        "payload": job.payload,
        "plan_hash": job.plan_hash,
    })
}

/// One request on a fresh loopback/private connection: small, bounded, no pooling to go stale
/// across a service restart.
async fn post(addr: &str, token: &str, body: &str) -> Result<(u16, String), String> {
    let stream =
        tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("cannot reach {addr}: {e}"))?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let mut stream = tokio::io::BufReader::new(stream);
    let request = format!(
        "POST /api/v1/safety/evaluate HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {token}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.get_mut().write_all(request.as_bytes()).await.map_err(|e| e.to_string())?;
    let mut status_line = String::new();
    stream.read_line(&mut status_line).await.map_err(|e| e.to_string())?;
    let status: u16 =
        status_line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or("bad status line")?;
    let mut length = None;
    loop {
        let mut line = String::new();
        stream.read_line(&mut line).await.map_err(|e| e.to_string())?;
        if line == "\r\n" || line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse::<usize>().ok();
        }
    }
    let length = length.filter(|l| *l <= REQUEST_BODY_BYTES_MAX).ok_or("no usable content-length")?;
    let mut reply = vec![0u8; length];
    stream.read_exact(&mut reply).await.map_err(|e| e.to_string())?;
    Ok((status, String::from_utf8_lossy(&reply).into_owned()))
}

/// Compiled snapshots the service has loaded, by version.
#[derive(Default)]
pub struct Snapshots(Mutex<HashMap<u64, Arc<Policy>>>);

fn authorized(headers: &HeaderMap, token: &str) -> bool {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
        .unwrap_or_default();
    crate::auth::constant_time_eq(&Sha256::digest(presented).into(), &Sha256::digest(token).into())
}

/// `POST /api/v1/safety/evaluate` `{"snapshot_version", "job"}` (role `safety` only).
pub async fn evaluate(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let Some(token) = state.config().safety_token.clone() else {
        return Err(ApiError::not_found("route"));
    };
    if !authorized(&headers, &token) {
        return Err(ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "a safety token is required"));
    }
    // A plan job carries its changes: as large as the plans `POST /api/v1/plans` takes.
    let map = json_object(&wire::read_body(body, PLAN_BODY_BYTES_MAX).await?)?;
    only_fields(&map, &["snapshot_version", "job"])?;
    let version = map
        .get("snapshot_version")
        .and_then(Value::as_u64)
        .ok_or_else(|| ApiError::invalid(vec![("snapshot_version".into(), "is required".into())]))?;
    let job = Job::from_json(map.get("job").unwrap_or(&Value::Null)).map_err(|errors| {
        ApiError::invalid(errors.into_iter().map(|e| (format!("job.{}", e.field), e.message)).collect())
    })?;
    let policy = snapshot(&state, version).await?;
    let started = Instant::now();
    let engine = Arc::clone(&policy);
    let evaluation = tokio::time::timeout(
        Duration::from_millis(GATE_B_ENGINE_TIMEOUT_MS),
        // A plan job is decided per change here too, so that both deployments agree.
        tokio::task::spawn_blocking(move || airlock_plan::evaluate_any(&engine, &job).0),
    )
    .await
    .map_err(|_| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "evaluation_timeout",
            "the evaluation exceeded the engine defence timeout",
        )
    })?
    .map_err(ApiError::internal)?;
    state.metrics().observe(
        "airlock_policy_eval_seconds",
        &[("gate", "service")],
        started.elapsed().as_secs_f64(),
    );
    Ok(Json(json!({
        "snapshot_version": version,
        "snapshot_hash": policy.hash(),
        "decision": evaluation.decision.as_str(),
        "deciding": evaluation.deciding,
        "audit": evaluation.audit,
        "errors": evaluation.errors.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
    })))
}

async fn snapshot(state: &AppState, version: u64) -> Result<Arc<Policy>, ApiError> {
    if let Some(p) = state.snapshots().0.lock().ok().and_then(|m| m.get(&version).cloned()) {
        return Ok(p);
    }
    let record = state
        .store()
        .snapshot(version)
        .await?
        .ok_or_else(|| ApiError::not_found(&format!("snapshot {version}")))?;
    let (policy, _) = airlock_policy::compile(&record.source)
        .map_err(|_| ApiError::internal(format!("stored snapshot {version} does not compile")))?;
    let policy = Arc::new(policy);
    if let Ok(mut m) = state.snapshots().0.lock() {
        m.insert(version, Arc::clone(&policy));
    }
    Ok(policy)
}
