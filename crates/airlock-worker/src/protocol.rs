//! The worker protocol's four calls over plain HTTP (SPEC 9): the only module that knows the
//! URLs, the JSON field names and what each status code means.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value, json};

use crate::error::Error;
use crate::job::{Job, Signals};

/// Largest answer read. A claim carries the job's payload: up to the server's 1 MiB body limit
/// for a job, and for a plan job (`POST /api/v1/plans`, up to 32 MiB of plan JSON) its changes,
/// normalised, which can outgrow the plan's `resource_changes` a little (each change gains
/// `action`, `destructive` and nulls for absent fields): twice the plan limit covers them.
const RESPONSE_BYTES_MAX: u64 = 64 * 1024 * 1024;
/// How long a complete or fail may take.
const REPORT_TIMEOUT: Duration = Duration::from_secs(30);
/// Extra time a claim may take beyond its long-poll wait.
const CLAIM_SLACK: Duration = Duration::from_secs(15);
/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A leased job and what keeps it leased.
#[derive(Debug)]
pub(crate) struct Claim {
    pub job: Job,
    pub token: String,
    pub heartbeat: Duration,
}

/// A heartbeat's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Beat {
    Extended,
    Cancel,
}

/// One server, one key.
pub(crate) struct Client {
    base: String,
    key: String,
    agent: ureq::Agent,
}

impl Client {
    pub fn new(url: &str, key: &str, name: &str) -> Result<Self, Error> {
        let base = url.trim().trim_end_matches('/').to_owned();
        if !base.starts_with("http://") {
            return Err(Error::Config(format!(
                "the server URL `{base}` must start with `http://` (the SDK speaks plain HTTP; put a \
                 TLS-terminating proxy next to the worker for HTTPS)"
            )));
        }
        if key.trim().is_empty() {
            return Err(Error::Config("the API key is empty".into()));
        }
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(CONNECT_TIMEOUT))
            .user_agent(format!("airlock-worker/{} ({name})", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        Ok(Self { base, key: key.trim().to_owned(), agent })
    }

    #[cfg(test)]
    pub fn base(&self) -> &str {
        &self.base
    }

    /// `POST /api/v1/workers/claim`: a leased job, or `None` when none came within `wait`.
    pub fn claim(&self, pool: &str, wait: Duration) -> Result<Option<Claim>, Error> {
        let wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
        let body = json!({"pool": pool, "wait_ms": wait_ms});
        let (status, answer) = self.post("/api/v1/workers/claim", &body, wait + CLAIM_SLACK)?;
        match status {
            204 => Ok(None),
            200 => match parse_claim(answer) {
                Ok(claim) => Ok(Some(claim)),
                Err(Unreadable { message, lease: Some((id, token)) }) => {
                    // Leased to us but unreadable (a newer server?): hand it back rather than sit
                    // on it until the lease lapses; a worker that can read it may take it.
                    let error = format!("the worker could not read the claim: {message}");
                    let _ = self.fail(&id, &token, &error, true);
                    Err(Error::Protocol(error))
                }
                Err(Unreadable { message, lease: None }) => Err(Error::Protocol(message)),
            },
            _ => Err(refusal(status, &answer)),
        }
    }

    /// `POST /api/v1/workers/jobs/{id}/heartbeat`.
    pub fn heartbeat(&self, id: &str, token: &str, timeout: Duration) -> Result<Beat, Error> {
        let (status, answer) =
            self.post(&job_path(id, "heartbeat"), &json!({"lease_token": token}), timeout)?;
        if status != 200 {
            return Err(refusal(status, &answer));
        }
        match answer.get("cancel").and_then(Value::as_bool) {
            Some(true) => Ok(Beat::Cancel),
            Some(false) => Ok(Beat::Extended),
            None => Err(Error::Protocol("a heartbeat answer without `cancel`".into())),
        }
    }

    /// `POST /api/v1/workers/jobs/{id}/complete`; the job's state afterwards.
    pub fn complete(&self, id: &str, token: &str, result: &Value) -> Result<String, Error> {
        let body = json!({"lease_token": token, "result": result});
        self.finish(&job_path(id, "complete"), &body)
    }

    /// `POST /api/v1/workers/jobs/{id}/fail`; the job's state afterwards.
    pub fn fail(&self, id: &str, token: &str, error: &str, retryable: bool) -> Result<String, Error> {
        let body = json!({"lease_token": token, "error": error, "retryable": retryable});
        self.finish(&job_path(id, "fail"), &body)
    }

    fn finish(&self, path: &str, body: &Value) -> Result<String, Error> {
        let (status, answer) = self.post(path, body, REPORT_TIMEOUT)?;
        if status != 200 {
            return Err(refusal(status, &answer));
        }
        answer
            .get("state")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| Error::Protocol("a report answer without `state`".into()))
    }

    /// Sends one JSON request; the status and the JSON body (`null` when there is none).
    fn post(&self, path: &str, body: &Value, timeout: Duration) -> Result<(u16, Value), Error> {
        let unreachable =
            |e: ureq::Error| Error::Unreachable { url: self.base.clone(), message: e.to_string() };
        let mut response = self
            .agent
            .post(format!("{}{path}", self.base))
            .config()
            .timeout_global(Some(timeout))
            .build()
            .header("authorization", format!("Bearer {}", self.key))
            .header("content-type", "application/json")
            .send(body.to_string())
            .map_err(unreachable)?;
        let status = response.status().as_u16();
        let text = response
            .body_mut()
            .with_config()
            .limit(RESPONSE_BYTES_MAX)
            .read_to_string()
            .map_err(unreachable)?;
        if text.trim().is_empty() {
            return Ok((status, Value::Null));
        }
        match serde_json::from_str(&text) {
            Ok(value) => Ok((status, value)),
            Err(_) if status >= 500 => Err(Error::Unavailable { status, message: excerpt(&text) }),
            Err(_) => Err(Error::Protocol(format!(
                "HTTP {status} with a body that is not JSON: {}",
                excerpt(&text)
            ))),
        }
    }
}

fn job_path(id: &str, verb: &str) -> String {
    // Ids come from the server and are `job_` plus base32, but a path is no place to trust that.
    let id: String = id
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    format!("/api/v1/workers/jobs/{id}/{verb}")
}

fn excerpt(text: &str) -> String {
    let short: String = text.trim().chars().take(200).collect();
    if short.is_empty() { "no body".into() } else { format!("`{short}`") }
}

/// The error a non-2xx answer stands for.
fn refusal(status: u16, answer: &Value) -> Error {
    let error = answer.get("error");
    let code = error.and_then(|e| e.get("code").or(Some(e))).and_then(Value::as_str).unwrap_or("").to_owned();
    let message = error
        .and_then(|e| e.get("message"))
        .or_else(|| answer.get("message"))
        .and_then(Value::as_str)
        .unwrap_or("(no message)")
        .to_owned();
    match status {
        409 if code == "lease_lost" => Error::LeaseLost(message),
        429 | 500..=599 => Error::Unavailable { status, message },
        _ => Error::Refused { status, code: if code.is_empty() { "error".into() } else { code }, message },
    }
}

/// A claim that could not be read, with the lease when at least that much was readable.
struct Unreadable {
    message: String,
    lease: Option<(String, String)>,
}

fn parse_claim(answer: Value) -> Result<Claim, Unreadable> {
    let Value::Object(mut map) = answer else {
        return Err(Unreadable { message: "the claim is not a JSON object".into(), lease: None });
    };
    let text =
        |map: &Map<String, Value>, name: &str| map.get(name).and_then(Value::as_str).map(str::to_owned);
    let (Some(id), Some(token)) = (text(&map, "job_id"), text(&map, "lease_token")) else {
        return Err(Unreadable { message: "the claim has no `job_id` or `lease_token`".into(), lease: None });
    };
    let unreadable = |message: String| Unreadable { message, lease: Some((id.clone(), token.clone())) };
    let field =
        |name: &str| unreadable(format!("the claim's `{name}` is missing or not of the expected type"));
    map.remove("lease_token");
    let attempt = map
        .get("attempt")
        .and_then(Value::as_u64)
        .and_then(|a| u32::try_from(a).ok())
        .ok_or_else(|| field("attempt"))?;
    let heartbeat_ms =
        map.get("heartbeat_ms").and_then(Value::as_u64).ok_or_else(|| field("heartbeat_ms"))?;
    let idempotency_key = match map.get("idempotency_key") {
        None | Some(Value::Null) => None,
        Some(Value::String(k)) => Some(k.clone()),
        Some(_) => return Err(field("idempotency_key")),
    };
    let labels = match map.get("labels") {
        None | Some(Value::Null) => BTreeMap::new(),
        Some(Value::Object(labels)) => labels
            .iter()
            .map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_owned())))
            .collect::<Option<_>>()
            .ok_or_else(|| field("labels"))?,
        Some(_) => return Err(field("labels")),
    };
    let topic = text(&map, "topic").ok_or_else(|| field("topic"))?;
    let env = text(&map, "env").ok_or_else(|| field("env"))?;
    let job_hash = text(&map, "job_hash").unwrap_or_default();
    let payload = map.get("payload").cloned().unwrap_or(Value::Null);
    let job = Job {
        id,
        attempt,
        idempotency_key,
        topic,
        env,
        labels,
        payload,
        job_hash,
        claim: Value::Object(map),
        signals: Arc::new(Signals::default()),
    };
    Ok(Claim { job, token, heartbeat: Duration::from_millis(heartbeat_ms) })
}

#[cfg(test)]
pub(crate) mod tests_support {
    #![allow(clippy::unwrap_used, reason = "test data")]

    use super::*;

    /// A claim as the server sends it, parsed.
    pub(crate) fn claim() -> Claim {
        let answer = json!({
            "job_id": "job_01ABC", "lease_token": "secret", "lease_expires_at": 1_000,
            "heartbeat_ms": 300, "attempt": 2, "idempotency_key": null, "topic": "infra.vm.create",
            "env": "dev", "labels": {"team": "a"}, "payload": {"size": 2}, "job_hash": "h",
            "gate_b": {"decision": "allow"}
        });
        parse_claim(answer).ok().unwrap()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic, reason = "a test fails by panicking")]

    use super::*;

    fn claim_json() -> Value {
        json!({
            "job_id": "job_01ABC", "lease_token": "secret", "lease_expires_at": 1_000,
            "heartbeat_ms": 300, "attempt": 2, "idempotency_key": null, "topic": "infra.vm.create",
            "env": "dev", "labels": {"team": "a"}, "payload": {"size": 2}, "job_hash": "h",
            "gate_b": {"decision": "allow"}
        })
    }

    #[test]
    fn a_claim_becomes_a_job_without_its_token() {
        let claim = parse_claim(claim_json()).unwrap_or_else(|e| panic!("{}", e.message));
        assert_eq!(claim.token, "secret");
        assert_eq!(claim.heartbeat, Duration::from_millis(300));
        let job = claim.job;
        assert_eq!((job.id.as_str(), job.attempt, job.topic.as_str()), ("job_01ABC", 2, "infra.vm.create"));
        assert_eq!(job.effect_key(), "job_01ABC", "no idempotency key: the job id");
        assert_eq!(job.labels.get("team").map(String::as_str), Some("a"));
        assert!(job.to_json().get("lease_token").is_none());
        assert_eq!(job.to_json().get("payload"), Some(&json!({"size": 2})));
        assert!(!job.cancelled());
    }

    #[test]
    fn an_unreadable_claim_keeps_its_lease_so_it_can_be_handed_back() {
        let mut bad = claim_json();
        bad["attempt"] = json!("two");
        let Err(e) = parse_claim(bad) else { panic!("accepted a bad attempt") };
        assert_eq!(e.lease, Some(("job_01ABC".into(), "secret".into())));
        assert!(e.message.contains("`attempt`"), "{}", e.message);
        let Err(e) = parse_claim(json!({"job_id": "job_01ABC"})) else { panic!("accepted no token") };
        assert_eq!(e.lease, None);
    }

    #[test]
    fn refusals_map_to_what_the_caller_should_do() {
        let lost = json!({"error": {"code": "lease_lost", "message": "gone"}});
        assert!(matches!(refusal(409, &lost), Error::LeaseLost(m) if m == "gone"));
        assert!(refusal(503, &Value::Null).is_transient());
        assert!(refusal(429, &Value::Null).is_transient());
        let auth = json!({"error": "unauthorized", "message": "bad key"});
        assert!(
            matches!(refusal(401, &auth), Error::Refused { status: 401, code, .. } if code == "unauthorized")
        );
        assert!(!refusal(401, &auth).is_transient());
    }

    #[test]
    fn only_plain_http_urls_and_real_keys_are_accepted() {
        assert!(matches!(Client::new("https://x", "k", "w"), Err(Error::Config(_))));
        assert!(matches!(Client::new("http://x/", " ", "w"), Err(Error::Config(_))));
        assert_eq!(Client::new("http://x:1/", "k", "w").unwrap().base(), "http://x:1");
    }
}
