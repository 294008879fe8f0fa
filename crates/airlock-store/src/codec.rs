//! How the stores encode what has no column type of its own (a gate decision, a list of
//! strings) and how they report stored data they cannot read: one encoding, shared by the
//! embedded and the PostgreSQL store, so that neither borrows from the other.

use airlock_core::audit::Kind;
use airlock_policy::Decision;
use serde_json::{Value, json};

use crate::{GateDecision, StoreError};

/// Stored data this version of Airlock cannot read.
pub(crate) fn corrupt(what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(what.to_string())
}

/// A gate decision as the JSON text stored in its column.
pub(crate) fn gate_json(g: &GateDecision) -> String {
    json!({
        "decision": g.decision.as_str(),
        "rule_ids": g.rule_ids,
        "reason": g.reason,
        "snapshot_hash": g.snapshot_hash,
        "snapshot_version": g.snapshot_version,
        "at": g.at,
        "bypassed": g.bypassed,
    })
    .to_string()
}

pub(crate) fn gate_from_json(text: &str) -> Result<GateDecision, StoreError> {
    let v: Value = serde_json::from_str(text).map_err(corrupt)?;
    let s = |k: &str| {
        v.get(k).and_then(Value::as_str).map(str::to_owned).ok_or_else(|| corrupt(format!("gate `{k}`")))
    };
    Ok(GateDecision {
        decision: Decision::parse(&s("decision")?).ok_or_else(|| corrupt("gate decision"))?,
        rule_ids: v
            .get("rule_ids")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).map(str::to_owned).collect())
            .unwrap_or_default(),
        reason: s("reason")?,
        snapshot_hash: s("snapshot_hash")?,
        snapshot_version: v.get("snapshot_version").and_then(Value::as_u64).unwrap_or(0),
        at: v.get("at").and_then(Value::as_i64).unwrap_or(0),
        bypassed: v.get("bypassed").and_then(Value::as_bool).unwrap_or(false),
    })
}

/// A JSON list of strings, as stored.
pub(crate) fn strings(text: &str) -> Result<Vec<String>, StoreError> {
    serde_json::from_str(text).map_err(corrupt)
}

/// An audit record's stored kind; one this version does not know is corrupt data.
pub(crate) fn audit_kind(text: &str) -> Result<Kind, StoreError> {
    text.parse().map_err(corrupt)
}
