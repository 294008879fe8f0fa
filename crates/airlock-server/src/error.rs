//! The one error type of the HTTP API. Every error body has the same flat shape, the one the
//! spec fixes for a Gate A deny: `{"error": "<code>", "message": "...", ...details}`. Codes are
//! stable; messages are lowercase, name the offending value in backticks, and never name a
//! Rust type. Internal failures become a generic 500 and are logged, not shown.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use airlock_store::StoreError;

/// An API error: status, stable code, message, and optional details merged into the body.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    details: Map<String, Value>,
    retry_after_secs: Option<u64>,
    /// The active snapshot version, when the error is a decision made under a superseded one.
    superseded_by: Option<u64>,
}

impl ApiError {
    /// An error with a status, a code and a message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            details: Map::new(),
            retry_after_secs: None,
            superseded_by: None,
        }
    }

    /// Adds a detail field to the body.
    #[must_use]
    pub fn with(mut self, key: &str, value: Value) -> Self {
        self.details.insert(key.to_owned(), value);
        self
    }

    /// Adds a `Retry-After` header (and `retry_after_secs` in the body).
    #[must_use]
    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after_secs = Some(secs.max(1));
        self
    }

    /// 400 with one entry per bad field.
    pub fn invalid(fields: Vec<(String, String)>) -> Self {
        let summary = fields.iter().map(|(f, m)| format!("`{f}`: {m}")).collect::<Vec<_>>().join("; ");
        let list: Vec<Value> = fields.into_iter().map(|(f, m)| json!({"field": f, "message": m})).collect();
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", summary).with("fields", Value::Array(list))
    }

    /// 400 for a body or query that is not what the endpoint takes.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    /// 404; also what another tenant's objects look like.
    pub fn not_found(what: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", format!("{what} not found"))
    }

    /// 403 for a key without the needed role.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    /// 500; the cause is logged, never returned.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "internal error");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal error; see the server log")
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The active snapshot's version when this error is a write refused because its decision
    /// was made under a superseded snapshot: decide again under that version.
    pub fn superseded_by(&self) -> Option<u64> {
        self.superseded_by
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound => Self::not_found("object"),
            StoreError::InvalidTransition(t) => Self::new(
                StatusCode::CONFLICT,
                "invalid_transition",
                format!("the job is `{}` and cannot take that action", t.from),
            ),
            StoreError::Conflict(m) => Self::new(StatusCode::CONFLICT, "conflict", m),
            StoreError::Unavailable(m) => {
                tracing::error!(error = %m, "store unavailable");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    "the store is unavailable; retry later",
                )
                .retry_after(1)
            }
            StoreError::Corrupt(m) => Self::internal(format!("corrupt store: {m}")),
            StoreError::Stale { active } => Self {
                superseded_by: Some(active),
                ..Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "policy_changed",
                    format!("the policy changed (version {active}) while the decision was being made; retry"),
                )
                .retry_after(1)
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = Map::new();
        body.insert("error".into(), json!(self.code));
        body.insert("message".into(), json!(self.message));
        if let Some(secs) = self.retry_after_secs {
            body.insert("retry_after_secs".into(), json!(secs));
        }
        body.extend(self.details);
        let mut response = (self.status, axum::Json(Value::Object(body))).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"airlock\""));
        }
        if let Some(secs) = self.retry_after_secs
            && let Ok(value) = HeaderValue::from_str(&secs.to_string())
        {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
        response
    }
}
