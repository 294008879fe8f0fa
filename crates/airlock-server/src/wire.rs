//! The JSON wire format: how domain and store types look to clients, and how request bodies
//! and query strings are read. Conversions are explicit, here and nowhere else.

use std::collections::HashMap;

use airlock_core::audit::{Kind, Record};
use airlock_store::{ApprovalRecord, GateDecision, JobRecord, KeyRecord, SnapshotRecord, Transition};
use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, StatusCode, header};
use serde_json::{Value, json};

use crate::error::ApiError;

/// Reads a request body, refusing more than `limit` bytes with 413.
pub async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(body, limit).await.map_err(|_| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the request body is over the {limit}-byte limit"),
        )
        .with("limit_bytes", json!(limit))
    })
}

/// Refuses a body not declared as JSON (`Content-Type: application/json`, parameters such as
/// `charset` allowed) with 415, so that a form post or a text body is never read as a job.
pub fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let declared =
        headers.get(header::CONTENT_TYPE).map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let essence = declared.as_deref().and_then(|t| t.split(';').next()).map(str::trim);
    if essence.is_some_and(|e| e.eq_ignore_ascii_case("application/json")) {
        return Ok(());
    }
    let found = declared.map_or_else(|| "no `Content-Type`".to_owned(), |t| format!("`Content-Type: {t}`"));
    Err(ApiError::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
        format!("the body must be JSON sent with `Content-Type: application/json`; this request has {found}"),
    ))
}

/// Parses a JSON object body.
pub fn json_object(bytes: &[u8]) -> Result<serde_json::Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(ApiError::bad_request(format!(
            "the body must be a JSON object, found {}",
            airlock_policy::job::json_kind(&other)
        ))),
        Err(e) => Err(ApiError::bad_request(format!("the body is not valid JSON: {e}"))),
    }
}

pub use airlock_core::decided::merge;

/// Refuses body fields other than `allowed`.
pub fn only_fields(map: &serde_json::Map<String, Value>, allowed: &[&str]) -> Result<(), ApiError> {
    let unknown: Vec<(String, String)> = map
        .keys()
        .filter(|k| !allowed.contains(&k.as_str()))
        .map(|k| (k.clone(), format!("unknown field; expected one of {}", allowed.join(", "))))
        .collect();
    if unknown.is_empty() { Ok(()) } else { Err(ApiError::invalid(unknown)) }
}

/// Query parameters, refusing unknown ones.
pub struct Query(HashMap<String, String>);

impl Query {
    /// Checks the parameter names against `allowed`.
    pub fn new(params: HashMap<String, String>, allowed: &[&str]) -> Result<Self, ApiError> {
        let unknown: Vec<(String, String)> = params
            .keys()
            .filter(|k| !allowed.contains(&k.as_str()))
            .map(|k| (k.clone(), format!("unknown query parameter; expected one of {}", allowed.join(", "))))
            .collect();
        if unknown.is_empty() { Ok(Self(params)) } else { Err(ApiError::invalid(unknown)) }
    }

    /// A parameter parsed by `FromStr`, with the parser's message on failure.
    pub fn get<T: std::str::FromStr>(&self, name: &str) -> Result<Option<T>, ApiError>
    where
        T::Err: std::fmt::Display,
    {
        match self.0.get(name) {
            None => Ok(None),
            Some(text) => text
                .parse()
                .map(Some)
                .map_err(|e| ApiError::invalid(vec![(name.to_owned(), format!("`{text}`: {e}"))])),
        }
    }

    /// A page size: default and maximum from the defaults table.
    pub fn limit(&self) -> Result<u32, ApiError> {
        let max = airlock_core::defaults::PAGE_SIZE_MAX;
        match self.get::<u32>("limit")? {
            None => Ok(airlock_core::defaults::PAGE_SIZE_DEFAULT),
            Some(n) if (1..=max).contains(&n) => Ok(n),
            Some(n) => {
                Err(ApiError::invalid(vec![("limit".into(), format!("`{n}` is not between 1 and {max}"))]))
            }
        }
    }
}

/// A decision as clients see it: `{decision, rule_ids, reason, snapshot}`.
pub fn decision(g: &GateDecision) -> Value {
    json!({
        "decision": g.decision.as_str(),
        "rule_ids": g.rule_ids,
        "reason": g.reason,
        "snapshot": g.snapshot_hash,
        "snapshot_version": g.snapshot_version,
        "at": g.at,
        "bypassed": g.bypassed,
    })
}

/// A job summary for lists.
pub fn job_summary(j: &JobRecord) -> Value {
    json!({
        "job_id": j.id.as_str(),
        "topic": j.topic,
        "env": j.env,
        "state": j.state.as_str(),
        "principal": j.principal,
        "decision": j.gate_a.decision.as_str(),
        "rule_ids": j.gate_a.rule_ids,
        "approval_id": j.approval_id.as_ref().map(|a| a.as_str()),
        "created_at": j.created_at,
        "updated_at": j.updated_at,
    })
}

/// A job in full, with its history.
/// Audit record kinds that carry a gate's decision on a job.
const DECISION_KINDS: [(Kind, &str); 3] =
    [(Kind::JobSubmitted, "a"), (Kind::GateBDecision, "b"), (Kind::GateBThrottled, "b")];

/// A job in full: its content, state, every gate decision (from its audit records), attempts,
/// backoff, lease holder (never the token), result, last error and history.
pub fn job(j: &JobRecord, history: &[Transition], audit: &[Record]) -> Value {
    let d = &j.dispatch;
    let gate_decisions: Vec<Value> = audit
        .iter()
        .filter_map(|r| {
            let (_, gate) = DECISION_KINDS.iter().find(|(kind, _)| *kind == r.draft.kind)?;
            let data = &r.draft.data;
            let mut decision = json!({
                "gate": gate,
                "decision": data.get("decision").cloned().unwrap_or(json!("allow")),
                "outcome": data.get("outcome"),
                "rule_ids": data.get("rule_ids"),
                "reason": data.get("reason"),
                "snapshot": data.get("snapshot"),
                "snapshot_version": data.get("snapshot_version"),
                "bypassed": data.get("gate_a_bypassed").or_else(|| data.get("gate_b_bypassed")),
                "at": r.draft.at,
                "audit_seq": r.seq,
            });
            // A plan job's decision carries each change's (see `airlock_plan`).
            if let (Some(changes), Some(o)) = (data.get("changes"), decision.as_object_mut()) {
                o.insert("changes".into(), changes.clone());
                o.insert("change_counts".into(), data.get("change_counts").cloned().unwrap_or(Value::Null));
            }
            Some(decision)
        })
        .collect();
    // The changes as the latest gate decided them; null for jobs that are not plans.
    let plan_changes =
        gate_decisions.iter().rev().find_map(|g| g.get("changes")).cloned().unwrap_or(Value::Null);
    json!({
        "job_id": j.id.as_str(),
        "tenant": j.tenant.as_str(),
        "principal": j.principal,
        "topic": j.topic,
        "env": j.env,
        "labels": j.labels,
        "payload": j.payload,
        "plan_hash": j.plan_hash,
        "plan_changes": plan_changes,
        "idempotency_key": j.idempotency_key,
        "job_hash": j.job_hash,
        "state": j.state.as_str(),
        "gate_a_bypassed": j.gate_a.bypassed,
        "decisions": {"gate_a": decision(&j.gate_a), "gate_b": d.gate_b.as_ref().map(decision)},
        "gate_decisions": gate_decisions,
        "attempts": {"scheduling": d.scheduling_attempts, "execution": d.execution_attempts},
        "not_before": d.not_before,
        "lease": d.lease.as_ref().map(|l| json!({"holder": l.worker, "expires_at": l.expires_at})),
        "result": d.result,
        "error": d.error,
        "dead_letter_reason": d.dead_letter_reason,
        "discarded_at": d.discarded_at,
        "approval_id": j.approval_id.as_ref().map(|a| a.as_str()),
        "created_at": j.created_at,
        "updated_at": j.updated_at,
        "history": history.iter().map(|t| json!({
            "seq": t.seq,
            "from": t.from.map(|s| s.as_str()),
            "to": t.to.as_str(),
            "at": t.at,
            "actor": t.actor,
            "reason": t.reason,
        })).collect::<Vec<_>>(),
    })
}

/// An approval request.
pub fn approval(a: &ApprovalRecord) -> Value {
    let r = &a.request;
    json!({
        "id": a.id.as_str(),
        "job_id": a.job_id.as_str(),
        "status": r.status.as_str(),
        "binding": {"job_hash": r.job_hash, "snapshot": r.snapshot_hash, "rule_ids": r.rule_ids, "rule_hashes": r.rule_hashes},
        "requested_by": r.requested_by,
        "created_at": r.created_at,
        "expires_at": r.expires_at,
        "quorum": r.quorum,
        "approvers": r.approvers,
        "decided_at": a.decided_at,
        "decided_by": a.decided_by,
    })
}

/// A snapshot, without its source unless asked.
pub fn snapshot(s: &SnapshotRecord, with_source: bool) -> Value {
    let mut v = json!({
        "version": s.version,
        "hash": s.hash,
        "created_at": s.created_at,
        "created_by": s.created_by,
        "note": s.note,
        "active": s.active,
    });
    if with_source && let Some(o) = v.as_object_mut() {
        o.insert("source".into(), json!(s.source));
    }
    v
}

/// A key, never its secret.
pub fn key(k: &KeyRecord) -> Value {
    json!({
        "id": k.id.as_str(),
        "tenant": k.tenant.as_str(),
        "name": k.name,
        "principal": k.principal(),
        "roles": k.roles.iter().map(|r| r.as_str()).collect::<Vec<_>>(),
        "created_at": k.created_at,
        "revoked_at": k.revoked_at,
    })
}

/// An audit record.
pub fn audit_record(r: &Record) -> Value {
    json!({
        "tenant": r.tenant,
        "seq": r.seq,
        "at": r.draft.at,
        "kind": r.draft.kind.as_str(),
        "subject": r.draft.subject,
        "actor": r.draft.actor,
        "data": r.draft.data,
        "prev_hash": r.prev_hash,
        "hash": r.hash,
    })
}

/// A decision with everything `simulate` reports: rules, reason, snapshot, job hash, audit
/// matches, errors, and the deciding rule's budget or quorum.
pub fn evaluation(
    policy: &airlock_policy::Policy,
    job: &airlock_policy::Job,
    evaluation: &airlock_policy::Evaluation,
) -> Value {
    let deciding = evaluation.deciding.first().and_then(|idx| policy.rule(*idx));
    let mut out = json!({
        "decision": evaluation.decision.as_str(),
        "rule_ids": policy.ids(&evaluation.deciding),
        "reason": policy.reason(evaluation),
        "snapshot": policy.hash(),
        "job_hash": job.hash(),
        "audit_rule_ids": policy.ids(&evaluation.audit),
        "errors": evaluation.errors.iter().map(|(idx, e)| json!({
            "rule_id": policy.rule(*idx).map(|r| r.id.as_str()),
            "error": e.to_string(),
        })).collect::<Vec<_>>(),
    });
    if let (Some(rule), Some(object)) = (deciding, out.as_object_mut()) {
        if let Some(limit) = &rule.limit {
            object.insert(
                "limit".into(),
                json!({
                    "rate": limit.rate,
                    "per_secs": limit.per_secs,
                    "burst": limit.burst,
                    "key": limit.key.iter().map(|k| k.as_str()).collect::<Vec<_>>(),
                }),
            );
        }
        if rule.decision == airlock_policy::Decision::RequireHuman {
            object.insert("approvals".into(), json!(rule.approvals));
        }
    }
    out
}

/// `explain`: the evaluation plus every rule's verdict.
pub fn explanation(
    policy: &airlock_policy::Policy,
    job: &airlock_policy::Job,
    explanation: &airlock_policy::Explanation,
) -> Value {
    use airlock_policy::Verdict;
    let mut out = evaluation(policy, job, &explanation.evaluation);
    let rules: Vec<Value> = policy
        .rules()
        .iter()
        .zip(&explanation.verdicts)
        .map(|(rule, verdict)| {
            let (verdict, detail) = match verdict {
                Verdict::Matched => ("matched", None),
                Verdict::NotMatched(why) => ("not_matched", Some(why.as_str())),
                Verdict::Error(e) => ("error", Some(e.as_str())),
            };
            json!({
                "id": rule.id,
                "decision": rule.decision.as_str(),
                "mode": rule.mode.as_str(),
                "verdict": verdict,
                "detail": detail,
                "reads_payload": rule.reads_payload(),
            })
        })
        .collect();
    if let Some(object) = out.as_object_mut() {
        object.insert("rules".into(), Value::Array(rules));
    }
    out
}

/// Policy diagnostics as JSON.
pub fn diagnostics(diagnostics: &[airlock_policy::Diagnostic]) -> Value {
    Value::Array(
        diagnostics
            .iter()
            .map(|d| {
                json!({
                    "line": d.span.line,
                    "col": d.span.col,
                    "severity": d.severity.as_str(),
                    "message": d.message,
                    "help": d.help,
                })
            })
            .collect(),
    )
}
