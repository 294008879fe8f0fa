//! The proxy's client of Airlock: the public HTTP API (submit, job view, cancel) and the worker
//! protocol (claim, heartbeat, complete, fail), nothing else. One keep-alive agent; every
//! failure to get an answer is `Unreachable`, which the proxy turns into a fail-closed answer.

use std::time::Duration;

use serde_json::{Value, json};

/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long any call but a long-polling claim may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Extra time a claim may take beyond its long-poll wait.
const CLAIM_SLACK: Duration = Duration::from_secs(15);
/// Largest answer read: a job view carries a payload and a result.
const RESPONSE_BYTES_MAX: u64 = 8 * 1024 * 1024;

/// Airlock could not be asked: no connection, a timeout, or an answer that is not JSON.
#[derive(Clone, Debug)]
pub struct Unreachable(pub String);

impl std::fmt::Display for Unreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// An answer: status, JSON body (`null` when empty), and whether it replays an earlier one.
#[derive(Clone, Debug)]
pub struct Answer {
    pub status: u16,
    pub body: Value,
    pub replayed: bool,
}

/// One Airlock deployment and one key (submitter and worker roles in one tenant).
pub struct Airlock {
    api: String,
    worker: String,
    authorization: String,
    agent: ureq::Agent,
}

impl Airlock {
    /// `api`: where Gate A and the API are (a gateway); `worker`: where the worker protocol is
    /// (a scheduler; the same server in embedded mode).
    pub fn new(api: &str, worker: &str, key: &str) -> Result<Self, String> {
        let base = |url: &str, what: &str| {
            let url = url.trim().trim_end_matches('/').to_owned();
            if url.starts_with("http://") || url.starts_with("https://") {
                Ok(url)
            } else {
                Err(format!("the {what} URL `{url}` must start with `http://` or `https://`"))
            }
        };
        if key.trim().is_empty() {
            return Err("the API key is empty: set `AIRLOCK_API_KEY`".into());
        }
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(CONNECT_TIMEOUT))
            .user_agent(format!("airlock-mcp/{}", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        Ok(Self {
            api: base(api, "Airlock")?,
            worker: base(worker, "worker")?,
            authorization: format!("Bearer {}", key.trim()),
            agent,
        })
    }

    /// `POST /api/v1/jobs`: Gate A.
    pub fn submit(&self, body: &Value) -> Result<Answer, Unreachable> {
        self.call(&self.api, "/api/v1/jobs", Some(body), CALL_TIMEOUT)
    }

    /// `GET /api/v1/jobs/{id}`.
    pub fn job(&self, id: &str) -> Result<Answer, Unreachable> {
        self.call(&self.api, &format!("/api/v1/jobs/{}", path_segment(id)), None, CALL_TIMEOUT)
    }

    /// `POST /api/v1/jobs/{id}/cancel`.
    pub fn cancel(&self, id: &str) -> Result<Answer, Unreachable> {
        self.call(
            &self.api,
            &format!("/api/v1/jobs/{}/cancel", path_segment(id)),
            Some(&json!({})),
            CALL_TIMEOUT,
        )
    }

    /// `POST /api/v1/policy/explain`: no side effect.
    pub fn explain(&self, body: &Value) -> Result<Answer, Unreachable> {
        self.call(&self.api, "/api/v1/policy/explain", Some(body), CALL_TIMEOUT)
    }

    /// `POST /api/v1/workers/claim` for one job: Gate B now.
    pub fn claim(&self, pool: &str, id: &str, wait: Duration) -> Result<Answer, Unreachable> {
        let wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
        let body = json!({"pool": pool, "job_id": id, "wait_ms": wait_ms});
        self.call(&self.worker, "/api/v1/workers/claim", Some(&body), wait + CLAIM_SLACK)
    }

    /// `POST /api/v1/workers/jobs/{id}/heartbeat`.
    pub fn heartbeat(&self, id: &str, token: &str) -> Result<Answer, Unreachable> {
        let path = format!("/api/v1/workers/jobs/{}/heartbeat", path_segment(id));
        self.call(&self.worker, &path, Some(&json!({"lease_token": token})), CALL_TIMEOUT)
    }

    /// `POST /api/v1/workers/jobs/{id}/complete`.
    pub fn complete(&self, id: &str, token: &str, result: &Value) -> Result<Answer, Unreachable> {
        let path = format!("/api/v1/workers/jobs/{}/complete", path_segment(id));
        self.call(&self.worker, &path, Some(&json!({"lease_token": token, "result": result})), CALL_TIMEOUT)
    }

    /// `POST /api/v1/workers/jobs/{id}/fail`, never retryable: a call runs again only when the
    /// agent asks again.
    pub fn fail(&self, id: &str, token: &str, error: &str) -> Result<Answer, Unreachable> {
        let path = format!("/api/v1/workers/jobs/{}/fail", path_segment(id));
        let body = json!({"lease_token": token, "error": error, "retryable": false});
        self.call(&self.worker, &path, Some(&body), CALL_TIMEOUT)
    }

    fn call(
        &self,
        base: &str,
        path: &str,
        body: Option<&Value>,
        timeout: Duration,
    ) -> Result<Answer, Unreachable> {
        let url = format!("{base}{path}");
        let unreachable = |e: ureq::Error| Unreachable(format!("cannot reach Airlock at {base}: {e}"));
        let sent = match body {
            Some(body) => self
                .agent
                .post(&url)
                .config()
                .timeout_global(Some(timeout))
                .build()
                .header("authorization", &self.authorization)
                .header("content-type", "application/json")
                .send(body.to_string()),
            None => self
                .agent
                .get(&url)
                .config()
                .timeout_global(Some(timeout))
                .build()
                .header("authorization", &self.authorization)
                .call(),
        };
        let mut response = sent.map_err(unreachable)?;
        let status = response.status().as_u16();
        let replayed = response.headers().get("idempotent-replayed").is_some_and(|v| v.as_bytes() == b"true");
        let text = response
            .body_mut()
            .with_config()
            .limit(RESPONSE_BYTES_MAX)
            .read_to_string()
            .map_err(unreachable)?;
        if text.trim().is_empty() {
            return Ok(Answer { status, body: Value::Null, replayed });
        }
        match serde_json::from_str(&text) {
            Ok(body) => Ok(Answer { status, body, replayed }),
            Err(_) => Err(Unreachable(format!("Airlock at {base} answered HTTP {status} without JSON"))),
        }
    }
}

/// Ids come from the server, but a path is no place to trust that.
fn path_segment(id: &str) -> String {
    id.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::panic, reason = "a test fails by panicking")]

    use super::*;

    #[test]
    fn urls_and_keys_are_checked() {
        assert!(Airlock::new("ftp://x", "http://x", "k").is_err_and(|e| e.contains("`ftp://x`")));
        assert!(Airlock::new("http://x", "http://x", " ").is_err_and(|e| e.contains("AIRLOCK_API_KEY")));
        assert!(Airlock::new("http://x/", "https://y", "k").is_ok());
        assert_eq!(path_segment("job_01/../x"), "job_01%2F%2E%2E%2Fx");
    }

    #[test]
    fn an_unreachable_server_is_reported_not_hidden() {
        // Port 1 on loopback: nothing listens there.
        let airlock =
            Airlock::new("http://127.0.0.1:1", "http://127.0.0.1:1", "k").unwrap_or_else(|e| panic!("{e}"));
        let Err(e) = airlock.submit(&json!({})) else { panic!("an answer from nowhere") };
        assert!(e.0.contains("cannot reach Airlock at http://127.0.0.1:1"), "{e}");
    }
}
