//! The job as policy sees it, parsed from JSON with an error per bad field, and its hash
//! (SPEC 2): `sha256:` + hex of the RFC 8785 form of
//! `{tenant, topic, env, labels, payload, plan_hash}`, the whole payload however large.

use std::collections::BTreeMap;
use std::fmt;

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::jcs;
use crate::limits::{LABEL_BYTES_MAX, LABELS_MAX, NAME_BYTES_MAX, PAYLOAD_DEPTH_MAX};

/// One requested action.
#[derive(Clone, Debug, PartialEq)]
pub struct Job {
    /// The tenant the job belongs to.
    pub tenant: String,
    /// Who submitted it.
    pub principal: String,
    /// Dotted action name, e.g. `infra.resource.delete`.
    pub topic: String,
    /// Target environment, e.g. `production`.
    pub env: String,
    /// Free-form string labels.
    pub labels: BTreeMap<String, String>,
    /// The action's arguments.
    pub payload: Value,
    /// Hash of the plan the action came from, when there is one.
    pub plan_hash: Option<String>,
    /// The submitter's retry key, when there is one. Not part of the job hash.
    pub idempotency_key: Option<String>,
}

/// One thing wrong with a job document, naming the field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// Dotted field name, e.g. `labels.team`.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}`: {}", self.field, self.message)
    }
}

/// Fields a job document may carry.
const JOB_FIELDS: [&str; 8] =
    ["tenant", "principal", "topic", "env", "labels", "payload", "plan_hash", "idempotency_key"];

/// Tenant used when a job document for simulation names none.
pub const SIMULATION_TENANT: &str = "default";
/// Principal used when a job document for simulation names none.
pub const SIMULATION_PRINCIPAL: &str = "anonymous";

impl Job {
    /// Parses a job document for simulation and tests: `topic` and `env` are required; `tenant`
    /// and `principal` default to [`SIMULATION_TENANT`] and [`SIMULATION_PRINCIPAL`]. Every
    /// bad field is reported.
    pub fn from_json(value: &Value) -> Result<Self, Vec<FieldError>> {
        Self::from_value(value.clone())
    }

    /// Like [`Job::from_json`], taking the document by value so that the payload is moved,
    /// not copied.
    pub fn from_value(value: Value) -> Result<Self, Vec<FieldError>> {
        let mut errors = Vec::new();
        let Value::Object(mut map) = value else {
            return Err(vec![FieldError {
                field: "job".into(),
                message: format!("expected a JSON object, found {}", json_kind(&value)),
            }]);
        };
        let payload = map.remove("payload");
        for key in map.keys() {
            if !JOB_FIELDS.contains(&key.as_str()) {
                errors.push(FieldError {
                    field: key.clone(),
                    message: format!("unknown field; expected one of {}", JOB_FIELDS.join(", ")),
                });
            }
        }
        let tenant = name(&map, "tenant", false, &mut errors).unwrap_or_else(|| SIMULATION_TENANT.into());
        let principal =
            name(&map, "principal", false, &mut errors).unwrap_or_else(|| SIMULATION_PRINCIPAL.into());
        let topic = name(&map, "topic", true, &mut errors).unwrap_or_default();
        let env = name(&map, "env", true, &mut errors).unwrap_or_default();
        let labels = labels(map.get("labels"), &mut errors);
        let payload = payload.unwrap_or_else(|| Value::Object(Map::new()));
        check_payload_depth(&payload, &mut errors);
        let plan_hash = optional_string(&map, "plan_hash", &mut errors);
        let idempotency_key = optional_string(&map, "idempotency_key", &mut errors);
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Self { tenant, principal, topic, env, labels, payload, plan_hash, idempotency_key })
    }

    /// Parses raw JSON bytes; a syntax error is reported against the field `job`.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, Vec<FieldError>> {
        let value: Value = serde_json::from_slice(bytes)
            .map_err(|e| vec![FieldError { field: "job".into(), message: format!("invalid JSON: {e}") }])?;
        Self::from_value(value)
    }

    /// The job hash of SPEC 2. An absent `plan_hash` is hashed as `null`.
    pub fn hash(&self) -> String {
        let mut object = Map::new();
        object.insert("tenant".into(), Value::String(self.tenant.clone()));
        object.insert("topic".into(), Value::String(self.topic.clone()));
        object.insert("env".into(), Value::String(self.env.clone()));
        object.insert(
            "labels".into(),
            Value::Object(self.labels.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect()),
        );
        object.insert("payload".into(), self.payload.clone());
        object.insert("plan_hash".into(), self.plan_hash.clone().map_or(Value::Null, Value::String));
        sha256_tagged(&jcs::to_vec(&Value::Object(object)))
    }
}

/// `sha256:` followed by the lowercase hex digest of `bytes`.
pub fn sha256_tagged(bytes: &[u8]) -> String {
    tagged(&Sha256::digest(bytes))
}

/// `sha256:` followed by the lowercase hex of a finished digest.
pub(crate) fn tagged(digest: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256:");
    for byte in digest.iter() {
        let _ = write!(out, "{byte:02x}");
    }
    out
}

/// How a JSON value is named in error messages: "a string", "an object", ...
pub fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A topic, env, tenant or principal: non-empty dotted segments of letters, digits, `_`, `-`
/// (and `@`, `:` and `/` for principals, which are often emails or URIs).
fn name(
    map: &Map<String, Value>,
    field: &str,
    required: bool,
    errors: &mut Vec<FieldError>,
) -> Option<String> {
    let mut fail = |message: String| {
        errors.push(FieldError { field: field.into(), message });
        None
    };
    match map.get(field) {
        None if required => fail("is required".into()),
        None => None,
        Some(Value::String(s)) if s.len() > NAME_BYTES_MAX => {
            fail(format!("is longer than {NAME_BYTES_MAX} bytes"))
        }
        Some(Value::String(given)) => {
            // Topic, env and tenant are normalised (trimmed, lower-case) before anything sees
            // them, so that `Production` or ` infra.x` cannot reach a rule as another value.
            let s = &match field {
                "topic" | "env" | "tenant" => given.trim().to_ascii_lowercase(),
                _ => given.clone(),
            };
            if s.is_empty() {
                return fail("must not be empty".into());
            }
            let extra: &[char] = if field == "principal" { &['@', ':', '/', '+'] } else { &[] };
            let bad = s
                .chars()
                .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') || extra.contains(c)));
            match bad {
                Some(c) => fail(format!("`{given}` contains `{c}`; use letters, digits, `.`, `_` and `-`")),
                None if s.split('.').any(str::is_empty) => fail(format!("`{given}` has an empty segment")),
                None => Some(s.clone()),
            }
        }
        Some(other) => fail(format!("expected a string, found {}", json_kind(other))),
    }
}

fn labels(value: Option<&Value>, errors: &mut Vec<FieldError>) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    match value {
        None | Some(Value::Null) => {}
        Some(Value::Object(map)) => {
            if map.len() > LABELS_MAX {
                errors.push(FieldError {
                    field: "labels".into(),
                    message: format!("has {} labels; at most {LABELS_MAX} are allowed", map.len()),
                });
                return labels;
            }
            for (key, value) in map {
                let field = || format!("labels.{key}");
                match value {
                    _ if key.is_empty() || key.len() > LABEL_BYTES_MAX => errors.push(FieldError {
                        field: field(),
                        message: format!("label names must be 1 to {LABEL_BYTES_MAX} bytes"),
                    }),
                    Value::String(s) if s.len() > LABEL_BYTES_MAX => errors.push(FieldError {
                        field: field(),
                        message: format!("is longer than {LABEL_BYTES_MAX} bytes"),
                    }),
                    Value::String(s) => {
                        labels.insert(key.clone(), s.clone());
                    }
                    other => errors.push(FieldError {
                        field: field(),
                        message: format!("expected a string, found {}", json_kind(other)),
                    }),
                }
            }
        }
        Some(other) => errors.push(FieldError {
            field: "labels".into(),
            message: format!("expected an object of strings, found {}", json_kind(other)),
        }),
    }
    labels
}

fn optional_string(map: &Map<String, Value>, field: &str, errors: &mut Vec<FieldError>) -> Option<String> {
    match map.get(field) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if !s.is_empty() && s.len() <= NAME_BYTES_MAX => Some(s.clone()),
        Some(Value::String(_)) => {
            errors.push(FieldError {
                field: field.into(),
                message: format!("must be 1 to {NAME_BYTES_MAX} bytes"),
            });
            None
        }
        Some(other) => {
            errors.push(FieldError {
                field: field.into(),
                message: format!("expected a string, found {}", json_kind(other)),
            });
            None
        }
    }
}

fn check_payload_depth(payload: &Value, errors: &mut Vec<FieldError>) {
    let mut stack = vec![(payload, 1usize)];
    while let Some((value, depth)) = stack.pop() {
        if depth > PAYLOAD_DEPTH_MAX {
            errors.push(FieldError {
                field: "payload".into(),
                message: format!("is nested deeper than {PAYLOAD_DEPTH_MAX} levels"),
            });
            return;
        }
        match value {
            Value::Array(items) => stack.extend(items.iter().map(|v| (v, depth + 1))),
            Value::Object(map) => stack.extend(map.values().map(|v| (v, depth + 1))),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn job(value: Value) -> Job {
        Job::from_json(&value).unwrap()
    }

    fn errors(value: Value) -> Vec<String> {
        Job::from_json(&value).unwrap_err().iter().map(ToString::to_string).collect()
    }

    #[test]
    fn hash_ignores_key_order_whitespace_and_idempotency_key() {
        let a = Job::from_slice(
            br#"{"topic":"t.a","env":"prod","payload":{"x":1,"y":[1,2]},"idempotency_key":"k1"}"#,
        )
        .unwrap();
        let b = Job::from_slice(br#"{ "payload": {"y": [1, 2], "x": 1.0}, "env": "prod", "topic": "t.a" }"#)
            .unwrap();
        assert_eq!(a.hash(), b.hash());
        let c = job(json!({"topic": "t.a", "env": "prod", "payload": {"x": 1, "y": [2, 1]}}));
        assert_ne!(a.hash(), c.hash());
        let d =
            job(json!({"topic": "t.a", "env": "prod", "payload": {"x": 1, "y": [1, 2]}, "plan_hash": "p"}));
        assert_ne!(a.hash(), d.hash());
    }

    #[test]
    fn hash_is_the_documented_digest() {
        let j = job(json!({"tenant": "acme", "topic": "t", "env": "e"}));
        let expected = sha256_tagged(
            br#"{"env":"e","labels":{},"payload":{},"plan_hash":null,"tenant":"acme","topic":"t"}"#,
        );
        assert_eq!(j.hash(), expected);
        assert!(expected.starts_with("sha256:") && expected.len() == 7 + 64);
    }

    #[test]
    fn names_every_bad_field() {
        let found = errors(json!({"topic": 3, "labels": {"team": 1}, "payload": {}, "extra": true}));
        assert!(found.contains(&"`topic`: expected a string, found a number".to_string()), "{found:?}");
        assert!(found.contains(&"`env`: is required".to_string()), "{found:?}");
        assert!(found.contains(&"`labels.team`: expected a string, found a number".to_string()), "{found:?}");
        assert!(found.iter().any(|e| e.starts_with("`extra`: unknown field")), "{found:?}");
        assert_eq!(errors(json!([1]))[0], "`job`: expected a JSON object, found an array");
        assert!(errors(json!({"topic": "a..b", "env": "p"}))[0].contains("empty segment"));
        assert!(errors(json!({"topic": "a b", "env": "p"}))[0].contains("contains ` `"));
        assert!(Job::from_slice(b"{\"topic\":").unwrap_err()[0].message.starts_with("invalid JSON"));
    }

    #[test]
    fn bounds_labels_and_payload_depth() {
        let many: Map<String, Value> = (0..=LABELS_MAX).map(|i| (format!("k{i}"), json!("v"))).collect();
        assert!(errors(json!({"topic": "t", "env": "e", "labels": many}))[0].contains("labels"));
        let mut deep = json!(1);
        for _ in 0..PAYLOAD_DEPTH_MAX {
            deep = json!([deep]);
        }
        assert!(errors(json!({"topic": "t", "env": "e", "payload": deep}))[0].contains("nested deeper"));
    }
}
