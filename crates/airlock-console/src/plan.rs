//! Resource changes of a plan job, before and after, read generically from the job's payload:
//! either one change (a Terraform plan job's payload: `address`, `actions`, `before`, `after`)
//! or a whole plan (`terraform show -json`: `resource_changes[].change.{actions,before,after}`).
//! Anything else has no changes to show.

use serde_json::Value;

/// One resource change.
#[derive(Debug, PartialEq)]
pub struct Change {
    /// The resource address.
    pub address: String,
    /// The actions (`create`, `update`, `delete`, …).
    pub actions: Vec<String>,
    /// Attributes that differ, with their value before and after (`None`: absent).
    pub attributes: Vec<Attribute>,
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

/// Most resource changes shown for one job.
pub const CHANGES_MAX: usize = 200;

/// The resource changes in a payload.
pub fn changes(payload: &Value) -> Vec<Change> {
    if let Some(list) = payload.get("resource_changes").and_then(Value::as_array) {
        return list
            .iter()
            .take(CHANGES_MAX)
            .filter_map(|rc| {
                let change = rc.get("change")?;
                one(rc.get("address"), change.get("actions"), change.get("before"), change.get("after"))
            })
            .collect();
    }
    let has_sides = payload.get("before").is_some() || payload.get("after").is_some();
    if has_sides && payload.get("actions").is_some() {
        return one(
            payload.get("address"),
            payload.get("actions"),
            payload.get("before"),
            payload.get("after"),
        )
        .into_iter()
        .collect();
    }
    Vec::new()
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
    Some(Change { address, actions, attributes })
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
        let got = changes(&payload);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].address, "aws_instance.web");
        assert_eq!(got[0].actions, vec!["update"]);
        let names: Vec<&str> = got[0].attributes.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(names, vec!["gone", "type"]);
        assert_eq!(got[0].attributes[0].after, None);
        assert_eq!(got[0].attributes[1].after, Some(json!("t3.large")));
    }

    #[test]
    fn whole_plan_payload_and_others() {
        let payload = json!({"resource_changes": [
            {"address": "a.b", "change": {"actions": ["create"], "before": null, "after": {"x": 1}}},
            {"address": "c.d", "change": {"actions": ["delete"], "before": "v", "after": null}},
            {"address": "broken"},
        ]});
        let got = changes(&payload);
        assert_eq!(got.len(), 2);
        assert_eq!(
            got[0].attributes,
            vec![Attribute { name: "x".into(), before: None, after: Some(json!(1)) }]
        );
        assert_eq!(got[1].attributes[0].before, Some(json!("v")));
        assert!(changes(&json!({"cidr": "0.0.0.0/0"})).is_empty());
        assert!(changes(&json!([1, 2])).is_empty());
    }
}
