//! The safety check as a separate service (SPEC 6, 10): `airlock serve --role safety` answers
//! `POST /api/v1/safety/evaluate`, and the other roles call it with `--safety-url`. The caller
//! bounds each call by the client timeout (2 s); the service bounds each evaluation by the
//! engine defence timeout (3 s). The service and its callers share a token
//! (`AIRLOCK_SAFETY_TOKEN`) and the store, so that both compile the same snapshot: the
//! service answers rule positions and the caller maps them onto its own copy, after checking
//! that the snapshot hashes agree.
//!
//! A party on the path must not be able to answer `allow`. Two defences, usable together: an
//! `https://` URL checks the service's certificate against a CA of the caller's choosing and
//! may present a client certificate (the service's `--tls-client-ca` then admits only callers
//! that CA signed); and a service with an answer key signs every answer with Ed25519 over the
//! request's digest and the answer's bytes, which callers given its public key verify. An
//! answer that fails either check is the service being unavailable: the gate's fail mode
//! applies, the failure is counted and audited, and it is never read as a decision.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use airlock_core::defaults::{GATE_B_ENGINE_TIMEOUT_MS, PLAN_BODY_BYTES_MAX, REQUEST_BODY_BYTES_MAX};
use airlock_policy::{Decision, EvalError, Evaluation, Job, Policy, RuleIdx};
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse as _, Response};
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey};
use rustls::RootCertStore;
use rustls::client::ClientConfig;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{PrivateKeyDer, ServerName};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt as _, AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

use crate::checkpoint::{hex, unhex};
use crate::error::ApiError;
use crate::state::{AppState, SafetyError};
use crate::wire::{self, json_object, only_fields};

/// The header carrying an answer's signature (hex Ed25519).
const SIGNATURE_HEADER: &str = "x-airlock-signature";

/// What an answer's signature covers: this label, the request body's SHA-256 (hex) and the
/// answer body, each followed by a newline but the last. Binding the request means a signed
/// answer for one job cannot be replayed for another.
fn signed_message(request: &[u8], answer: &[u8]) -> Vec<u8> {
    let mut message = b"airlock-safety-answer-v1\n".to_vec();
    message.extend_from_slice(hex(&Sha256::digest(request)).as_bytes());
    message.push(b'\n');
    message.extend_from_slice(answer);
    message
}

/// The key a safety service signs its answers with (`--safety-answer-key FILE`).
#[derive(Debug)]
pub struct AnswerSigner(Ed25519KeyPair);

impl AnswerSigner {
    /// Reads the PKCS#8 key at `path`, or generates one there (mode 0600); whether it was
    /// generated.
    pub fn load_or_create(path: &Path) -> Result<(Self, bool), String> {
        let (key, created) = crate::checkpoint::ed25519_key(path, "safety answer key")?;
        Ok((Self(key), created))
    }

    /// The public key, hex: what callers take as `--safety-public-key`.
    pub fn public_key_hex(&self) -> String {
        hex(self.0.public_key().as_ref())
    }

    fn sign(&self, request: &[u8], answer: &[u8]) -> String {
        hex(self.0.sign(&signed_message(request, answer)).as_ref())
    }
}

/// How a caller checks the service: TLS files for an `https://` URL, and the public key its
/// answers must be signed with.
#[derive(Clone, Debug, Default)]
pub struct Trust {
    /// The CA that signed the service's certificate (PEM); required with `https://`.
    pub ca: Option<PathBuf>,
    /// A client certificate chain and its key (PEM), for a service that verifies callers.
    pub client: Option<(PathBuf, PathBuf)>,
    /// The service's answer key (hex Ed25519 public key): unsigned answers are refused.
    pub answer_key: Option<String>,
}

/// TLS to the service: the client configuration and the name its certificate must carry.
#[derive(Clone, Debug)]
struct Tls {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
}

/// How a remote safety service is reached.
#[derive(Clone, Debug)]
pub struct RemoteSafety {
    /// `host:port`.
    pub addr: String,
    /// The shared token.
    pub token: String,
    tls: Option<Tls>,
    answer_key: Option<Vec<u8>>,
}

impl RemoteSafety {
    /// Parses `http://host:port` or `https://host:port`, with `trust`'s settings.
    pub fn new(url: &str, token: String, trust: &Trust) -> Result<Self, String> {
        let (https, rest) = match (url.strip_prefix("https://"), url.strip_prefix("http://")) {
            (Some(rest), _) => (true, rest),
            (None, Some(rest)) => (false, rest),
            (None, None) => return Err(format!("`{url}` is not an http:// or https:// URL")),
        };
        let addr = Some(rest.trim_end_matches('/'))
            .filter(|a| !a.is_empty() && !a.contains('/'))
            .ok_or_else(|| format!("`{url}` is not an http(s)://host:port URL"))?;
        if token.len() < 16 {
            return Err("AIRLOCK_SAFETY_TOKEN must be at least 16 characters".into());
        }
        let tls = match (https, &trust.ca) {
            (true, Some(ca)) => Some(Tls {
                config: Arc::new(client_config(ca, trust.client.as_ref())?),
                name: host_name(addr)?,
            }),
            (true, None) => {
                return Err(format!("`{url}` needs `--safety-ca FILE`: the CA of the service's certificate"));
            }
            (false, _) if trust.ca.is_some() || trust.client.is_some() => {
                return Err(format!("`--safety-ca` and `--safety-cert` need an https:// URL, not `{url}`"));
            }
            (false, _) => None,
        };
        let answer_key = match &trust.answer_key {
            None => None,
            Some(text) => Some(
                unhex(text)
                    .filter(|k| k.len() == 32)
                    .ok_or("`--safety-public-key` is not 64 hex digits (an Ed25519 public key)")?,
            ),
        };
        Ok(Self { addr: addr.to_owned(), token, tls, answer_key })
    }

    /// Asks the service for the decision on `job` under snapshot `version`.
    pub async fn evaluate(
        &self,
        job: &Job,
        version: u64,
        policy: &Policy,
    ) -> Result<Evaluation, SafetyError> {
        let body = json!({"snapshot_version": version, "job": job_json(job)}).to_string();
        let reply = self.post(&body).await.map_err(SafetyError::Unavailable)?;
        if reply.status != 200 {
            return Err(SafetyError::Unavailable(format!(
                "the safety service answered {}: {}",
                reply.status,
                String::from_utf8_lossy(&reply.body)
            )));
        }
        if let Some(key) = &self.answer_key {
            let signature = reply.signature.as_deref().and_then(unhex).ok_or_else(|| {
                SafetyError::Unavailable("the safety service's answer is not signed".into())
            })?;
            UnparsedPublicKey::new(&ED25519, key)
                .verify(&signed_message(body.as_bytes(), &reply.body), &signature)
                .map_err(|_| {
                    SafetyError::Unavailable(
                        "the safety service's answer does not verify with its public key".into(),
                    )
                })?;
        }
        let v: Value =
            serde_json::from_slice(&reply.body).map_err(|e| SafetyError::Unavailable(e.to_string()))?;
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

    /// One request on a fresh connection: small, bounded, no pooling to go stale across a
    /// service restart.
    async fn post(&self, body: &str) -> Result<Reply, String> {
        let addr = &self.addr;
        let stream =
            tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("cannot reach {addr}: {e}"))?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        match &self.tls {
            None => exchange(stream, addr, &self.token, body).await,
            Some(tls) => {
                let stream = tokio_rustls::TlsConnector::from(Arc::clone(&tls.config))
                    .connect(tls.name.clone(), stream)
                    .await
                    .map_err(|e| format!("TLS with {addr} failed: {e}"))?;
                exchange(stream, addr, &self.token, body).await
            }
        }
    }
}

/// The host of `host:port` (or `[v6]:port`) as the name the service's certificate must carry.
fn host_name(addr: &str) -> Result<ServerName<'static>, String> {
    let host = match addr.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() => host,
        _ => addr,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_owned()).map_err(|e| format!("`{host}` is not a host name: {e}"))
}

/// A TLS client trusting only `ca`, presenting `client` when given.
fn client_config(ca: &Path, client: Option<&(PathBuf, PathBuf)>) -> Result<ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for cert in crate::tls::certificates(ca)? {
        roots.add(cert).map_err(|e| format!("`{}`: not a usable CA certificate: {e}", ca.display()))?;
    }
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots);
    match client {
        None => Ok(builder.with_no_client_auth()),
        Some((cert, key)) => {
            let certs = crate::tls::certificates(cert)?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| format!("`{}` is not a PEM private key: {e}", key.display()))?;
            builder.with_client_auth_cert(certs, key).map_err(|e| {
                format!("`{}` and its key do not make a client certificate: {e}", cert.display())
            })
        }
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

/// The service's answer.
struct Reply {
    status: u16,
    /// The `x-airlock-signature` header.
    signature: Option<String>,
    body: Vec<u8>,
}

/// Sends the evaluate request over `stream` and reads the answer.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    addr: &str,
    token: &str,
    body: &str,
) -> Result<Reply, String> {
    let mut stream = tokio::io::BufReader::new(stream);
    let request = format!(
        "POST /api/v1/safety/evaluate HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {token}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.get_mut().write_all(request.as_bytes()).await.map_err(|e| e.to_string())?;
    stream.get_mut().flush().await.map_err(|e| e.to_string())?;
    let mut status_line = String::new();
    stream.read_line(&mut status_line).await.map_err(|e| e.to_string())?;
    let status: u16 =
        status_line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or("bad status line")?;
    let (mut length, mut signature) = (None, None);
    loop {
        let mut line = String::new();
        stream.read_line(&mut line).await.map_err(|e| e.to_string())?;
        if line == "\r\n" || line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse::<usize>().ok();
            } else if name.eq_ignore_ascii_case(SIGNATURE_HEADER) {
                signature = Some(value.trim().to_owned());
            }
        }
    }
    let length = length.filter(|l| *l <= REQUEST_BODY_BYTES_MAX).ok_or("no usable content-length")?;
    let mut reply = vec![0u8; length];
    stream.read_exact(&mut reply).await.map_err(|e| e.to_string())?;
    Ok(Reply { status, signature, body: reply })
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

/// `POST /api/v1/safety/evaluate` `{"snapshot_version", "job"}` (role `safety` only); the
/// answer is signed when the service has an answer key.
pub async fn evaluate(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let Some(token) = state.config().safety_token.clone() else {
        return Err(ApiError::not_found("route"));
    };
    if !authorized(&headers, &token) {
        return Err(ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "a safety token is required"));
    }
    // A plan job carries its changes: as large as the plans `POST /api/v1/plans` takes.
    let request = wire::read_body(body, PLAN_BODY_BYTES_MAX).await?;
    let map = json_object(&request)?;
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
    let answer = json!({
        "snapshot_version": version,
        "snapshot_hash": policy.hash(),
        "decision": evaluation.decision.as_str(),
        "deciding": evaluation.deciding,
        "audit": evaluation.audit,
        "errors": evaluation.errors.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
    })
    .to_string();
    let signature =
        state.config().safety_answer_key.as_ref().map(|key| key.sign(&request, answer.as_bytes()));
    let mut response = ([(header::CONTENT_TYPE, "application/json")], answer).into_response();
    if let Some(signature) = signature {
        let value = HeaderValue::from_str(&signature).map_err(ApiError::internal)?;
        response.headers_mut().insert(SIGNATURE_HEADER, value);
    }
    Ok(response)
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
