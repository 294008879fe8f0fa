//! Whether a plan file still holds the changes that were decided: before a governed apply, the
//! worker reads the file back (`terraform show -json`) and compares its changes with the plan
//! job's payload, so that a harmless plan JSON submitted beside a destructive plan file is never
//! applied. Changes are matched by address (and deposed object), in any order, and must be equal
//! in every field: normalised and redacted alike on both sides, they differ only when the plans do.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::plan::Change;

/// Most differences named in one answer; the rest are counted.
pub const DIFFERENCES_SHOWN_MAX: usize = 5;

/// The changes with one identity: as decided, and as the plan file has them.
type Versions<'a> = (Vec<&'a Value>, Vec<&'a Value>);

/// Where `shown` (the changes read from the plan file) differs from `decided` (a plan job's
/// `payload.changes`), one line per change, in address order; empty when they are the same.
pub fn differences(decided: &[Value], shown: &[Change]) -> Vec<String> {
    let mut by_key: BTreeMap<(&str, &str), Versions<'_>> = BTreeMap::new();
    for change in decided {
        by_key.entry(key(change)).or_default().0.push(change);
    }
    for change in shown {
        by_key.entry(key(&change.payload)).or_default().1.push(&change.payload);
    }
    let mut found = Vec::new();
    for ((address, _), (decided, shown)) in by_key {
        let name = |change: &Value| {
            let action = change.get("action").and_then(Value::as_str).unwrap_or("?");
            format!("`{address}` ({action})")
        };
        for extra in shown.iter().skip(decided.len()) {
            found.push(format!("{} is in the plan file but was not decided", name(extra)));
        }
        for missing in decided.iter().skip(shown.len()) {
            found.push(format!("{} was decided but is not in the plan file", name(missing)));
        }
        for (decided, shown) in decided.iter().zip(&shown) {
            if decided != shown {
                found.push(format!(
                    "{} was decided, the plan file has {}",
                    name(decided),
                    fields_differing(decided, shown)
                ));
            }
        }
    }
    found
}

/// A change's identity in a plan: its address and, for a deposed object, its deposed key.
fn key(change: &Value) -> (&str, &str) {
    let text = |field: &str| change.get(field).and_then(Value::as_str).unwrap_or_default();
    (text("address"), text("deposed"))
}

/// What differs between two versions of one change, e.g. `action `delete` and a different `after``.
fn fields_differing(decided: &Value, shown: &Value) -> String {
    let action = |change: &Value| change.get("action").and_then(Value::as_str).unwrap_or("?").to_owned();
    if action(decided) != action(shown) {
        return format!("`{}`", action(shown));
    }
    let mut names: Vec<&str> = Vec::new();
    for side in [decided, shown] {
        names.extend(side.as_object().into_iter().flat_map(|o| o.keys().map(String::as_str)));
    }
    names.sort_unstable();
    names.dedup();
    names.retain(|n| decided.get(n) != shown.get(n));
    let listed: Vec<String> = names.iter().map(|n| format!("`{n}`")).collect();
    format!("a different {}", listed.join(", "))
}

/// The differences as one sentence, at most [`DIFFERENCES_SHOWN_MAX`] named.
pub fn describe(differences: &[String]) -> String {
    let shown: Vec<&str> = differences.iter().take(DIFFERENCES_SHOWN_MAX).map(String::as_str).collect();
    let more = differences.len().saturating_sub(DIFFERENCES_SHOWN_MAX);
    let mut text = shown.join("; ");
    if more > 0 {
        text.push_str(&format!("; and {more} more"));
    }
    text
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "a test fails by panicking")]

    use serde_json::json;

    use super::*;
    use crate::Plan;

    fn plan(changes: &[Value]) -> Plan {
        Plan::parse(json!({"format_version": "1.2", "resource_changes": changes}).to_string().as_bytes())
            .unwrap()
    }

    fn change(address: &str, actions: &[&str], after: Value) -> Value {
        json!({"address": address, "type": "aws_instance", "name": "a",
               "change": {"actions": actions, "before": {"size": 1}, "after": after}})
    }

    fn decided(plan: Plan) -> Vec<Value> {
        plan.changes.into_iter().map(|c| c.payload).collect()
    }

    #[test]
    fn the_same_changes_in_any_order_are_the_same_plan() {
        let a = change("aws_instance.a", &["update"], json!({"size": 2}));
        let b = change("aws_instance.b", &["create"], json!({"size": 3}));
        let decided = decided(plan(&[a.clone(), b.clone()]));
        assert_eq!(differences(&decided, &plan(&[b, a]).changes), Vec::<String>::new());
        assert_eq!(differences(&[], &plan(&[]).changes), Vec::<String>::new());
    }

    #[test]
    fn every_kind_of_difference_is_named() {
        let decided = decided(plan(&[
            change("aws_instance.a", &["update"], json!({"size": 2})),
            change("aws_instance.b", &["update"], json!({"size": 2})),
            change("aws_instance.gone", &["create"], json!({})),
        ]));
        let shown = plan(&[
            change("aws_instance.a", &["delete"], Value::Null),
            change("aws_instance.b", &["update"], json!({"size": 9})),
            change("aws_instance.new", &["delete"], Value::Null),
        ]);
        assert_eq!(
            differences(&decided, &shown.changes),
            vec![
                "`aws_instance.a` (update) was decided, the plan file has `delete`",
                "`aws_instance.b` (update) was decided, the plan file has a different `after`",
                "`aws_instance.gone` (create) was decided but is not in the plan file",
                "`aws_instance.new` (delete) is in the plan file but was not decided",
            ]
        );
    }

    #[test]
    fn a_long_list_is_cut() {
        let many: Vec<String> = (0..8).map(|i| format!("d{i}")).collect();
        assert_eq!(describe(&many), "d0; d1; d2; d3; d4; and 3 more");
        assert_eq!(describe(&many[..1]), "d0");
    }
}
