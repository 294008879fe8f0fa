//! Resource changes of a plan job, before and after, with each change's decision. A plan job's
//! payload is `{format_version, terraform_version, changes: [...]}` (what `POST /api/v1/plans`
//! builds), each change with `address`, `actions`, `before`, `after`; the job's `plan_changes`
//! holds each change's latest gate decision, in the same order. One change as a payload, or a
//! whole `terraform show -json` (`resource_changes[].change`) sent as a job's payload, is read
//! too, without decisions. Anything else has no changes to show.

use serde_json::Value;

/// One resource change.
#[derive(Debug, PartialEq)]
pub struct Change {
    /// Its position in the payload's list of changes.
    pub index: usize,
    /// The resource address.
    pub address: String,
    /// The actions (`create`, `update`, `delete`, …).
    pub actions: Vec<String>,
    /// Attributes that differ, with their value before and after (`None`: absent).
    pub attributes: Vec<Attribute>,
    /// How the gates last decided it, for a plan job's change.
    pub decision: Option<Decided>,
}

/// A change's decision, as the job's `plan_changes` gives it.
#[derive(Debug, PartialEq)]
pub struct Decided {
    /// `allow`, `throttle`, `require_human` or `deny`.
    pub decision: String,
    /// The deciding rules.
    pub rule_ids: Vec<String>,
    /// Why.
    pub reason: String,
}

/// A plan's changes as shown: at most [`CHANGES_MAX`] of them, and how many there are.
#[derive(Debug, PartialEq)]
pub struct Changes {
    /// The changes shown.
    pub shown: Vec<Change>,
    /// How many the payload holds.
    pub total: usize,
}

/// One attribute of a changed resource.
#[derive(Debug, PartialEq)]
pub struct Attribute {
    /// Its name.
    pub name: String,
    /// Before the change.
    pub before: Option<Value>,
    /// After the change.
    pub after: Option<Value>,
}

/// Most resource changes shown for one job: as many as the API explains.
pub const CHANGES_MAX: usize = airlock_core::defaults::PLAN_CHANGES_EXPLAINED_MAX;

/// The resource changes of a job: its `payload`, and its `plan_changes` (null for jobs that are
/// not plans).
pub fn changes(payload: &Value, plan_changes: &Value) -> Changes {
    if let Some(list) = payload.get("changes").and_then(Value::as_array) {
        let decided = plan_changes.as_array().map(Vec::as_slice).unwrap_or_default();
        let shown = list
            .iter()
            .enumerate()
            .take(CHANGES_MAX)
            .filter_map(|(i, c)| {
                let mut change = one(c.get("address"), c.get("actions"), c.get("before"), c.get("after"))?;
                change.index = i;
                // Decided in plan order; the address confirms the pairing.
                change.decision = decided
                    .get(i)
                    .filter(|d| d.get("address").and_then(Value::as_str) == Some(change.address.as_str()))
                    .map(decision);
                Some(change)
            })
            .collect();
        return Changes { shown, total: list.len() };
    }
    if let Some(list) = payload.get("resource_changes").and_then(Value::as_array) {
        let shown = list
            .iter()
            .enumerate()
            .take(CHANGES_MAX)
            .filter_map(|(i, rc)| {
                let change = rc.get("change")?;
                let mut change =
                    one(rc.get("address"), change.get("actions"), change.get("before"), change.get("after"))?;
                change.index = i;
                Some(change)
            })
            .collect();
        return Changes { shown, total: list.len() };
    }
    let has_sides = payload.get("before").is_some() || payload.get("after").is_some();
    if has_sides && payload.get("actions").is_some() {
        let shown: Vec<Change> =
            one(payload.get("address"), payload.get("actions"), payload.get("before"), payload.get("after"))
                .into_iter()
                .collect();
        return Changes { total: shown.len(), shown };
    }
    Changes { shown: Vec::new(), total: 0 }
}

fn decision(d: &Value) -> Decided {
    let text = |key: &str| d.get(key).and_then(Value::as_str).unwrap_or_default().to_owned();
    let rule_ids = d
        .get("rule_ids")
        .and_then(Value::as_array)
        .map(|ids| ids.iter().filter_map(Value::as_str).map(str::to_owned).collect())
        .unwrap_or_default();
    Decided { decision: text("decision"), rule_ids, reason: text("reason") }
}

fn one(
    address: Option<&Value>,
    actions: Option<&Value>,
    before: Option<&Value>,
    after: Option<&Value>,
) -> Option<Change> {
    let address = address.and_then(Value::as_str).unwrap_or("(no address)").to_owned();
    let actions = actions?.as_array()?.iter().filter_map(Value::as_str).map(str::to_owned).collect();
    let (before, after) = (before.filter(|v| !v.is_null()), after.filter(|v| !v.is_null()));
    let mut names: Vec<&String> = Vec::new();
    for map in [before, after].into_iter().flatten().filter_map(Value::as_object) {
        names.extend(map.keys());
    }
    names.sort();
    names.dedup();
    let attributes = if names.is_empty() {
        // Not objects: the whole values are the change.
        if before == after {
            Vec::new()
        } else {
            vec![Attribute { name: "(value)".into(), before: before.cloned(), after: after.cloned() }]
        }
    } else {
        names
            .into_iter()
            .filter_map(|name| {
                let b = before.and_then(|v| v.get(name)).cloned();
                let a = after.and_then(|v| v.get(name)).cloned();
                (b != a).then(|| Attribute { name: name.clone(), before: b, after: a })
            })
            .collect()
    };
    Some(Change { index: 0, address, actions, attributes, decision: None })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn one_change_payload() {
        let payload = json!({
            "address": "aws_instance.web", "actions": ["update"],
            "before": {"type": "t3.micro", "ami": "a", "gone": 1},
            "after": {"type": "t3.large", "ami": "a"},
        });
        let got = changes(&payload, &Value::Null).shown;
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].address, "aws_instance.web");
        assert_eq!(got[0].actions, vec!["update"]);
        let names: Vec<&str> = got[0].attributes.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(names, vec!["gone", "type"]);
        assert_eq!(got[0].attributes[0].after, None);
        assert_eq!(got[0].attributes[1].after, Some(json!("t3.large")));
        assert_eq!(got[0].decision, None);
    }

    #[test]
    fn a_plan_jobs_changes_with_their_decisions() {
        let payload = json!({"format_version": "1.2", "terraform_version": "1.6.6", "changes": [
            {"address": "aws_db_instance.main", "action": "replace", "actions": ["delete", "create"],
             "before": {"engine": "postgres", "password": "(sensitive)"}, "after": {"engine": "postgres", "size": 2}},
            {"address": "aws_instance.web", "action": "create", "actions": ["create"], "before": null, "after": {"ami": "a"}},
            {"address": "aws_s3_bucket.logs", "action": "delete", "actions": ["delete"], "before": {"acl": "private"}, "after": null},
        ]});
        let decided = json!([
            {"address": "aws_db_instance.main", "action": "replace", "decision": "require_human",
             "rule_ids": ["two-approvers-stateful-destroy"], "reason": "two approvers"},
            {"address": "aws_instance.web", "decision": "allow", "rule_ids": [], "reason": "default"},
            {"address": "not.the_same", "decision": "deny", "rule_ids": ["x"], "reason": "y"},
        ]);
        let got = changes(&payload, &decided);
        assert_eq!(got.total, 3);
        let shown: Vec<(&str, Option<&str>)> = got
            .shown
            .iter()
            .map(|c| (c.address.as_str(), c.decision.as_ref().map(|d| d.decision.as_str())))
            .collect();
        assert_eq!(
            shown,
            [
                ("aws_db_instance.main", Some("require_human")),
                ("aws_instance.web", Some("allow")),
                ("aws_s3_bucket.logs", None),
            ],
            "a decision is shown only beside the change it was made on"
        );
        let db = &got.shown[0];
        assert_eq!(db.actions, ["delete", "create"]);
        assert_eq!(db.decision.as_ref().unwrap().rule_ids, ["two-approvers-stateful-destroy"]);
        let names: Vec<&str> = db.attributes.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(names, ["password", "size"]);
        let many: Vec<Value> = (0..CHANGES_MAX + 5)
            .map(
                |i| json!({"address": format!("a.b{i}"), "actions": ["create"], "before": null, "after": {}}),
            )
            .collect();
        let cut = changes(&json!({"changes": many}), &Value::Null);
        assert_eq!((cut.shown.len(), cut.total), (CHANGES_MAX, CHANGES_MAX + 5));
    }

    #[test]
    fn whole_plan_payload_and_others() {
        let payload = json!({"resource_changes": [
            {"address": "a.b", "change": {"actions": ["create"], "before": null, "after": {"x": 1}}},
            {"address": "c.d", "change": {"actions": ["delete"], "before": "v", "after": null}},
            {"address": "broken"},
        ]});
        let got = changes(&payload, &Value::Null).shown;
        assert_eq!(got.len(), 2);
        assert_eq!(
            got[0].attributes,
            vec![Attribute { name: "x".into(), before: None, after: Some(json!(1)) }]
        );
        assert_eq!(got[1].attributes[0].before, Some(json!("v")));
        assert!(changes(&json!({"cidr": "0.0.0.0/0"}), &Value::Null).shown.is_empty());
        assert!(changes(&json!([1, 2]), &Value::Null).shown.is_empty());
    }
}
