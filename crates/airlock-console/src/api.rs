//! The console's only way to the domain: requests to the HTTP API, made in process through the
//! API's router with the session's key, so that every rule (roles, tenants, binding checks,
//! CSRF-free JSON semantics) is the API's, enforced once.

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use serde_json::Value;
use tower::ServiceExt as _;

/// Largest API answer the console reads (a job view with a 1 MiB payload and its history).
const ANSWER_BYTES_MAX: usize = 8 * 1024 * 1024;

/// An API answer.
pub struct Answer {
    /// Its status.
    pub status: StatusCode,
    /// Its JSON body (`Null` when it had none).
    pub body: Value,
}

impl Answer {
    /// Whether it succeeded.
    pub fn ok(&self) -> bool {
        self.status.is_success()
    }

    /// The API's error message, for a failed answer.
    pub fn message(&self) -> String {
        let text = |k: &str| self.body.get(k).and_then(Value::as_str).map(str::to_owned);
        let mut message = text("message").unwrap_or_else(|| format!("the API answered {}", self.status));
        if let Some(fields) = self.body.get("fields").and_then(Value::as_array) {
            for f in fields {
                let field = f.get("field").and_then(Value::as_str).unwrap_or("?");
                let why = f.get("message").and_then(Value::as_str).unwrap_or("?");
                message.push_str(&format!("; {field}: {why}"));
            }
        }
        message
    }

    /// The error code (`policy_denied`, `approval_stale`, …).
    pub fn code(&self) -> &str {
        self.body.get("error").and_then(Value::as_str).unwrap_or("")
    }
}

/// Why a page could not be made from the API.
#[derive(Debug)]
pub enum Failure {
    /// The key was refused (revoked): the session ends.
    SignedOut,
    /// The API could not be reached or answered garbage.
    Broken(String),
}

/// The HTTP API, in this process.
#[derive(Clone)]
pub struct Api(Router);

impl Api {
    /// Over the API's router.
    pub fn new(router: Router) -> Self {
        Self(router)
    }

    /// One request; a 401 is [`Failure::SignedOut`].
    pub async fn call(
        &self,
        key: &str,
        method: Method,
        uri: &str,
        body: Option<&Value>,
    ) -> Result<Answer, Failure> {
        let answer = self.call_raw(Some(key), method, uri, body).await?;
        if answer.status == StatusCode::UNAUTHORIZED {
            return Err(Failure::SignedOut);
        }
        Ok(answer)
    }

    /// `GET`.
    pub async fn get(&self, key: &str, uri: &str) -> Result<Answer, Failure> {
        self.call(key, Method::GET, uri, None).await
    }

    /// `POST` with a JSON body.
    pub async fn post(&self, key: &str, uri: &str, body: &Value) -> Result<Answer, Failure> {
        self.call(key, Method::POST, uri, Some(body)).await
    }

    /// One request with or without a key; a 401 is an answer like any other.
    pub async fn call_raw(
        &self,
        key: Option<&str>,
        method: Method,
        uri: &str,
        body: Option<&Value>,
    ) -> Result<Answer, Failure> {
        let mut request = Request::builder().method(method).uri(uri);
        if let Some(key) = key {
            request = request.header(header::AUTHORIZATION, format!("Bearer {key}"));
        }
        let request = match body {
            Some(json) => {
                request.header(header::CONTENT_TYPE, "application/json").body(Body::from(json.to_string()))
            }
            None => request.body(Body::empty()),
        }
        .map_err(|e| Failure::Broken(format!("bad API request `{uri}`: {e}")))?;
        let response = self.0.clone().oneshot(request).await.map_err(|e| Failure::Broken(format!("{e}")))?;
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), ANSWER_BYTES_MAX)
            .await
            .map_err(|e| Failure::Broken(format!("reading the API's answer to `{uri}`: {e}")))?;
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .map_err(|e| Failure::Broken(format!("the API's answer to `{uri}` is not JSON: {e}")))?
        };
        Ok(Answer { status, body })
    }
}
