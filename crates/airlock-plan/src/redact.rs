//! Sensitive values out before anything else sees them: Terraform's `before_sensitive` and
//! `after_sensitive` mirror the value's shape with `true` where a value is sensitive, and each
//! such value becomes [`SENSITIVE`], so it is never evaluated, stored, logged or shown.

use serde_json::Value;

/// What a sensitive value is replaced by.
pub const SENSITIVE: &str = "(sensitive)";

/// `value` with every part `mask` marks sensitive replaced by [`SENSITIVE`]. A mask that does
/// not follow the value's shape marks nothing where it diverges, except `true`, which always
/// hides the whole value below it.
pub fn redact(value: Value, mask: &Value) -> Value {
    match (value, mask) {
        (_, Value::Bool(true)) => Value::String(SENSITIVE.into()),
        (Value::Object(map), Value::Object(masks)) => Value::Object(
            map.into_iter()
                .map(|(k, v)| {
                    let v = match masks.get(&k) {
                        Some(m) => redact(v, m),
                        None => v,
                    };
                    (k, v)
                })
                .collect(),
        ),
        (Value::Array(items), Value::Array(masks)) => Value::Array(
            items
                .into_iter()
                .enumerate()
                .map(|(i, v)| match masks.get(i) {
                    Some(m) => redact(v, m),
                    None => v,
                })
                .collect(),
        ),
        (value, _) => value,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn masks_follow_the_shape() {
        let value = json!({"password": "hunter2", "tags": {"a": "1", "b": "2"}, "list": [{"k": "s"}, {"k": "t"}], "plain": 3});
        let mask = json!({"password": true, "tags": {"b": true}, "list": [{}, {"k": true}], "plain": false});
        assert_eq!(
            redact(value, &mask),
            json!({"password": SENSITIVE, "tags": {"a": "1", "b": SENSITIVE}, "list": [{"k": "s"}, {"k": SENSITIVE}], "plain": 3})
        );
        assert_eq!(redact(json!({"a": [1, 2]}), &json!(true)), json!(SENSITIVE));
        assert_eq!(redact(json!({"a": 1}), &json!([true])), json!({"a": 1}));
    }
}
