//! Reading `terraform show -json PLANFILE` (and `tofu show -json`), `format_version` 0.1 to
//! 1.x: only `resource_changes` is kept, every other section is skipped unread, unknown keys
//! are ignored, and what is not a plan (a state, HCL, truncated JSON, a huge file) is named.

use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::{Map, Value};

use crate::address::Address;
use crate::redact::redact;

/// Largest plan JSON read, in bytes (the HTTP API's body limit for plans too).
pub const PLAN_BYTES_MAX: usize = 32 * 1024 * 1024;

/// Most resource changes in one plan.
pub const CHANGES_MAX: usize = 100_000;

/// What a change does to its resource, the last segment of its topic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Action {
    /// `["create"]`.
    Create,
    /// `["update"]`.
    Update,
    /// `["delete"]`.
    Delete,
    /// `["delete", "create"]` or `["create", "delete"]` (create before destroy).
    Replace,
    /// `["forget"]` (Terraform 1.7+): removed from the state, left running.
    Forget,
}

impl Action {
    /// Every action.
    pub const ALL: [Action; 5] = [Self::Create, Self::Update, Self::Delete, Self::Replace, Self::Forget];

    /// The name used in topics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Create => "create",
            Self::Update => "update",
            Self::Delete => "delete",
            Self::Replace => "replace",
            Self::Forget => "forget",
        }
    }

    /// Parses a topic name.
    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.as_str() == text)
    }

    /// Whether the change destroys the resource's current object (delete, replace): rules on
    /// `destructive: true` cover both.
    pub fn destructive(self) -> bool {
        matches!(self, Self::Delete | Self::Replace)
    }

    /// The action Terraform's `actions` list stands for; `None` for `no-op` and `read`, which
    /// change nothing.
    fn from_actions(actions: &[String]) -> Result<Option<Self>, ()> {
        let names: Vec<&str> = actions.iter().map(String::as_str).collect();
        match names.as_slice() {
            ["no-op"] | ["read"] => Ok(None),
            ["create"] => Ok(Some(Self::Create)),
            ["update"] => Ok(Some(Self::Update)),
            ["delete"] => Ok(Some(Self::Delete)),
            ["delete", "create"] | ["create", "delete"] => Ok(Some(Self::Replace)),
            ["forget"] => Ok(Some(Self::Forget)),
            _ => Err(()),
        }
    }
}

/// One resource change, normalised, with sensitive values already replaced.
#[derive(Clone, Debug, PartialEq)]
pub struct Change {
    /// The full address.
    pub address: String,
    /// The resource type.
    pub resource_type: String,
    /// What it does.
    pub action: Action,
    /// The module path, empty in the root module.
    pub module: String,
    /// The provider, e.g. `registry.terraform.io/hashicorp/aws`.
    pub provider: String,
    /// The job payload of SPEC 15: `address`, `module_address`, `mode`, `type`, `name`,
    /// `index`, `provider_name`, `actions`, `action`, `action_reason`, `destructive`,
    /// `before`, `after`, `after_unknown`.
    pub payload: Value,
}

/// A plan: its versions and the changes that do something.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// The JSON format version, e.g. `1.2`.
    pub format_version: String,
    /// The Terraform (or OpenTofu) version that wrote it, when given.
    pub terraform_version: Option<String>,
    /// Every change that is not `no-op` or `read`, in file order.
    pub changes: Vec<Change>,
}

/// Why a document is not a plan Airlock can read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// Over [`PLAN_BYTES_MAX`].
    #[error("the plan is {0} bytes; the limit is {PLAN_BYTES_MAX} (is this a plan JSON?)")]
    TooLarge(usize),
    /// Not JSON at all.
    #[error(
        "not a Terraform plan: the file is not JSON ({0}); run `terraform show -json PLANFILE` to get one"
    )]
    NotJson(String),
    /// JSON that stops early.
    #[error("not a Terraform plan: the JSON is truncated ({0})")]
    Truncated(String),
    /// JSON of another kind.
    #[error("not a Terraform plan: {0}")]
    NotAPlan(String),
    /// A format this version does not read.
    #[error("unsupported plan `format_version` `{0}`; Airlock reads 0.1 to 1.x")]
    Version(String),
    /// A field of the right document with a wrong value.
    #[error("`{field}`: {message}")]
    Field {
        /// Where, e.g. `resource_changes[3].change.actions`.
        field: String,
        /// What is wrong.
        message: String,
    },
}

#[derive(Deserialize)]
struct Document {
    format_version: Option<Value>,
    terraform_version: Option<Value>,
    resource_changes: Option<Vec<RawChange>>,
    planned_values: Option<IgnoredAny>,
    values: Option<IgnoredAny>,
    lineage: Option<IgnoredAny>,
    resources: Option<IgnoredAny>,
}

#[derive(Deserialize)]
struct RawChange {
    address: Option<String>,
    module_address: Option<String>,
    mode: Option<String>,
    #[serde(rename = "type")]
    resource_type: Option<String>,
    name: Option<String>,
    index: Option<Value>,
    provider_name: Option<String>,
    change: Option<RawBody>,
    action_reason: Option<String>,
    deposed: Option<String>,
}

#[derive(Deserialize)]
struct RawBody {
    actions: Option<Vec<String>>,
    before: Option<Value>,
    after: Option<Value>,
    after_unknown: Option<Value>,
    before_sensitive: Option<Value>,
    after_sensitive: Option<Value>,
}

impl Plan {
    /// Reads plan JSON.
    pub fn parse(bytes: &[u8]) -> Result<Self, PlanError> {
        if bytes.len() > PLAN_BYTES_MAX {
            return Err(PlanError::TooLarge(bytes.len()));
        }
        let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
        match first {
            None => return Err(PlanError::NotAPlan("the file is empty".into())),
            Some(b'{') => {}
            Some(b'[') => return Err(PlanError::NotAPlan("the JSON is a list, not a plan object".into())),
            Some(_) => {
                return Err(PlanError::NotJson(
                    "it does not start with `{`; HCL or text is not a plan".into(),
                ));
            }
        }
        let document: Document = serde_json::from_slice(bytes).map_err(|e| match e.classify() {
            serde_json::error::Category::Eof => PlanError::Truncated(e.to_string()),
            serde_json::error::Category::Syntax | serde_json::error::Category::Io => {
                PlanError::NotJson(e.to_string())
            }
            serde_json::error::Category::Data => PlanError::NotAPlan(e.to_string()),
        })?;
        let format_version = match document.format_version {
            Some(Value::String(v)) => v,
            Some(other) => {
                return Err(PlanError::Field {
                    field: "format_version".into(),
                    message: format!("expected a string such as \"1.2\", found {other}"),
                });
            }
            None if document.lineage.is_some() || document.resources.is_some() => {
                return Err(PlanError::NotAPlan(
                    "this is a state file (terraform.tfstate); run `terraform show -json PLANFILE` on a saved plan"
                        .into(),
                ));
            }
            None => return Err(PlanError::NotAPlan("no `format_version`".into())),
        };
        if !(format_version.starts_with("0.") || format_version.starts_with("1.")) {
            return Err(PlanError::Version(format_version));
        }
        if document.resource_changes.is_none()
            && document.planned_values.is_none()
            && document.values.is_some()
        {
            return Err(PlanError::NotAPlan(
                "this is the JSON of a state (`terraform show -json` without a plan file): it has `values` \
                 and no `planned_values` or `resource_changes`"
                    .into(),
            ));
        }
        if document.resource_changes.is_none() && document.planned_values.is_none() {
            return Err(PlanError::NotAPlan("it has neither `resource_changes` nor `planned_values`".into()));
        }
        let raw = document.resource_changes.unwrap_or_default();
        if raw.len() > CHANGES_MAX {
            return Err(PlanError::Field {
                field: "resource_changes".into(),
                message: format!("{} changes; at most {CHANGES_MAX} are read", raw.len()),
            });
        }
        let mut changes = Vec::new();
        for (i, change) in raw.into_iter().enumerate() {
            if let Some(change) = normalise(change, i)? {
                changes.push(change);
            }
        }
        let terraform_version = match document.terraform_version {
            Some(Value::String(v)) => Some(v),
            _ => None,
        };
        Ok(Self { format_version, terraform_version, changes })
    }
}

fn normalise(raw: RawChange, i: usize) -> Result<Option<Change>, PlanError> {
    let field = |name: &str| format!("resource_changes[{i}].{name}");
    let missing = |name: &str| PlanError::Field { field: field(name), message: "is required".into() };
    let body = raw.change.ok_or_else(|| missing("change"))?;
    let actions = body.actions.ok_or_else(|| missing("change.actions"))?;
    let Some(action) = Action::from_actions(&actions).map_err(|()| PlanError::Field {
        field: field("change.actions"),
        message: format!(
            "unsupported actions {actions:?}; expected no-op, read, create, update, delete, \
             [delete, create], [create, delete] or forget"
        ),
    })?
    else {
        return Ok(None);
    };
    let address = raw.address.ok_or_else(|| missing("address"))?;
    let parsed = Address::parse(&address)
        .map_err(|e| PlanError::Field { field: field("address"), message: e.to_string() })?;
    let resource_type = raw.resource_type.unwrap_or_else(|| parsed.resource_type.clone());
    if resource_type.is_empty()
        || !resource_type.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
    {
        return Err(PlanError::Field {
            field: field("type"),
            message: format!("`{resource_type}` is not a resource type"),
        });
    }
    let module = raw.module_address.unwrap_or_else(|| parsed.module.clone());
    let provider = raw.provider_name.unwrap_or_default();
    let index = raw.index.or_else(|| parsed.key.as_ref().map(crate::address::Key::to_json));
    let sensitive = |mask: Option<Value>| mask.unwrap_or(Value::Bool(false));
    let before = redact(body.before.unwrap_or(Value::Null), &sensitive(body.before_sensitive));
    let after = redact(body.after.unwrap_or(Value::Null), &sensitive(body.after_sensitive));
    let mut payload = Map::new();
    payload.insert("address".into(), Value::String(address.clone()));
    payload.insert(
        "module_address".into(),
        if module.is_empty() { Value::Null } else { Value::String(module.clone()) },
    );
    payload.insert("mode".into(), Value::String(raw.mode.unwrap_or_else(|| parsed.mode.as_str().to_owned())));
    payload.insert("type".into(), Value::String(resource_type.clone()));
    payload.insert("name".into(), Value::String(raw.name.unwrap_or_else(|| parsed.name.clone())));
    payload.insert("index".into(), index.unwrap_or(Value::Null));
    payload.insert("provider_name".into(), Value::String(provider.clone()));
    payload.insert("actions".into(), Value::Array(actions.into_iter().map(Value::String).collect()));
    payload.insert("action".into(), Value::String(action.as_str().into()));
    payload.insert("action_reason".into(), raw.action_reason.map_or(Value::Null, Value::String));
    payload.insert("destructive".into(), Value::Bool(action.destructive()));
    if let Some(deposed) = raw.deposed {
        payload.insert("deposed".into(), Value::String(deposed));
    }
    payload.insert("before".into(), before);
    payload.insert("after".into(), after);
    payload.insert("after_unknown".into(), body.after_unknown.unwrap_or(Value::Null));
    Ok(Some(Change { address, resource_type, action, module, provider, payload: Value::Object(payload) }))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "a test fails by panicking")]

    use serde_json::json;

    use super::*;

    fn plan(value: Value) -> Result<Plan, PlanError> {
        Plan::parse(value.to_string().as_bytes())
    }

    fn change(address: &str, actions: Value) -> Value {
        json!({"address": address, "type": "aws_instance", "name": "a", "change": {"actions": actions, "before": null, "after": {}}})
    }

    #[test]
    fn actions_map_to_topics_and_no_ops_are_dropped() {
        let p = plan(json!({"format_version": "1.2", "resource_changes": [
            change("aws_instance.a", json!(["no-op"])),
            change("aws_instance.b", json!(["read"])),
            change("aws_instance.c", json!(["create"])),
            change("aws_instance.d", json!(["delete", "create"])),
            change("aws_instance.e", json!(["create", "delete"])),
            change("aws_instance.f", json!(["delete"])),
            change("aws_instance.g", json!(["update"])),
        ]}))
        .unwrap();
        let got: Vec<(&str, Action, bool)> = p
            .changes
            .iter()
            .map(|c| (c.address.as_str(), c.action, c.payload["destructive"].as_bool().unwrap()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("aws_instance.c", Action::Create, false),
                ("aws_instance.d", Action::Replace, true),
                ("aws_instance.e", Action::Replace, true),
                ("aws_instance.f", Action::Delete, true),
                ("aws_instance.g", Action::Update, false),
            ]
        );
    }

    #[test]
    fn not_a_plan_is_named() {
        let cases: [(&[u8], &str); 9] = [
            (b"resource \"aws_instance\" \"a\" {}", "not JSON"),
            (b"{\"format_version\": \"1.2\", \"resource_changes\": [", "truncated"),
            (br#"{"version": 4, "serial": 3, "lineage": "x", "resources": []}"#, "state file"),
            (br#"{"format_version": "1.0", "values": {"root_module": {}}}"#, "JSON of a state"),
            (br#"{"format_version": "2.0", "resource_changes": []}"#, "unsupported plan `format_version` `2.0`"),
            (b"[1, 2]", "a list"),
            (b"  ", "empty"),
            (br#"{"format_version": "1.0", "resource_changes": [{"address": "a.b", "change": {"actions": ["explode"]}}]}"#, "resource_changes[0].change.actions"),
            (br#"{"format_version": "1.0", "resource_changes": {"a": 1}}"#, "not a Terraform plan: invalid type"),
        ];
        for (bytes, expected) in cases {
            let e = Plan::parse(bytes).unwrap_err().to_string();
            assert!(e.contains(expected), "{}: {e}", String::from_utf8_lossy(bytes));
        }
        let huge = vec![b' '; PLAN_BYTES_MAX + 1];
        assert!(Plan::parse(&huge).unwrap_err().to_string().contains("the limit is"));
    }

    #[test]
    fn an_empty_plan_has_no_changes() {
        let p = plan(json!({"format_version": "1.1", "planned_values": {}})).unwrap();
        assert!(p.changes.is_empty());
    }
}
