//! `POST /api/v1/plans`: a Terraform/OpenTofu plan (the JSON of `terraform show -json`) as the
//! body, the submission's parameters in the query string. The plan is read into one plan job,
//! checked like any submit body, and handed to Gate A; nothing is stored when it is not a plan.

use std::collections::HashMap;

use airlock_core::defaults::PLAN_BODY_BYTES_MAX;
use airlock_core::role::Role;
use airlock_plan::{Plan, Submission};
use airlock_policy::Job;
use axum::body::Body;
use axum::extract::{Query as RawQuery, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde_json::{Map, Value, json};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::state::AppState;
use crate::wire::{self, Query};

const _: () =
    assert!(PLAN_BODY_BYTES_MAX == airlock_plan::PLAN_BYTES_MAX, "one limit for the API and the reader");

const PARAMS: [&str; 5] = ["env", "workspace", "plan_hash", "plan_file", "idempotency_key"];

/// `POST /api/v1/plans?env=&workspace=&plan_hash=&plan_file=&idempotency_key=`.
pub async fn submit(
    State(state): State<AppState>,
    caller: Caller,
    RawQuery(params): RawQuery<HashMap<String, String>>,
    body: Body,
) -> Result<Response, ApiError> {
    caller.require(Role::Submitter)?;
    let query = Query::new(params, &PARAMS)?;
    let bytes = wire::read_body(body, PLAN_BODY_BYTES_MAX).await?;
    let plan = Plan::parse(&bytes)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_plan", e.to_string()))?;
    let mut errors = Vec::new();
    let env = query.get::<String>("env")?.map(|e| e.trim().to_lowercase());
    if env.is_none() {
        errors.push(("env".to_owned(), "is required, e.g. `?env=production`".to_owned()));
    }
    let plan_hash = match query.get::<String>("plan_hash")? {
        None => airlock_plan::plan_hash(&bytes),
        Some(hash) if is_sha256(&hash) => hash,
        Some(hash) => {
            errors.push((
                "plan_hash".to_owned(),
                format!("`{hash}` is not `sha256:` and 64 lowercase hex digits"),
            ));
            String::new()
        }
    };
    let plan_file = query.get::<String>("plan_file")?;
    if let Some(file) = &plan_file
        && (file.is_empty() || file.contains('/') || file.contains('\\') || file == "." || file == "..")
    {
        errors.push(("plan_file".to_owned(), format!("`{file}` must be a file name, without a directory")));
    }
    let submission = Submission {
        env: env.unwrap_or_default(),
        workspace: query.get::<String>("workspace")?,
        plan_hash,
        plan_file,
        idempotency_key: query.get::<String>("idempotency_key")?,
    };
    let job = airlock_plan::plan_job(plan, caller.tenant.as_str(), &caller.principal, submission);
    // The names and labels the adapter put together pass the checks of any submit body.
    if errors.is_empty()
        && let Err(field_errors) = Job::from_json(&envelope(&job))
    {
        errors.extend(field_errors.into_iter().map(|e| (e.field, e.message)));
    }
    if !errors.is_empty() {
        return Err(ApiError::invalid(errors));
    }
    crate::gate_a::submit_job(&state, &caller, job).await
}

/// The job without its payload, in the shape of a submit body, for validation.
fn envelope(job: &Job) -> Value {
    let mut o = Map::new();
    o.insert("tenant".into(), json!(job.tenant.as_str()));
    o.insert("principal".into(), json!(job.principal));
    o.insert("topic".into(), json!(job.topic));
    o.insert("env".into(), json!(job.env));
    o.insert("labels".into(), json!(job.labels));
    o.insert("plan_hash".into(), json!(job.plan_hash));
    o.insert("idempotency_key".into(), json!(job.idempotency_key));
    Value::Object(o)
}

fn is_sha256(text: &str) -> bool {
    text.strip_prefix("sha256:").is_some_and(|hex| {
        hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}
