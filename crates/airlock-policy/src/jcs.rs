//! RFC 8785 (JSON Canonicalization Scheme): one byte string per JSON value, so that equal
//! jobs and equal policies hash equally however they were written.

use serde_json::Value;

/// Writes the canonical form of `value` to `out`.
pub fn write(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(n) => write_number(n, out),
        Value::String(s) => write_string(s, out),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write(item, out);
            }
            out.push(b']');
        }
        Value::Object(map) => {
            // RFC 8785 orders members by the UTF-16 code units of their names.
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|(a, _), (b, _)| a.encode_utf16().cmp(b.encode_utf16()));
            out.push(b'{');
            for (i, (key, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_string(key, out);
                out.push(b':');
                write(item, out);
            }
            out.push(b'}');
        }
    }
}

/// The canonical form as a byte vector.
pub fn to_vec(value: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    write(value, &mut out);
    out
}

/// Numbers are IEEE 754 doubles printed as ECMAScript does; integers too large for a double
/// are rounded to one, as every JCS implementation does.
fn write_number(n: &serde_json::Number, out: &mut Vec<u8>) {
    const EXACT_MAX: u64 = 1 << 53;
    if let Some(u) = n.as_u64().filter(|u| *u <= EXACT_MAX) {
        out.extend_from_slice(u.to_string().as_bytes());
    } else if let Some(i) = n.as_i64().filter(|i| i.unsigned_abs() <= EXACT_MAX) {
        out.extend_from_slice(i.to_string().as_bytes());
    } else {
        let f = n.as_f64().unwrap_or(0.0);
        let mut buffer = ryu_js::Buffer::new();
        out.extend_from_slice(buffer.format(f).as_bytes());
    }
}

fn write_string(s: &str, out: &mut Vec<u8>) {
    out.push(b'"');
    for c in s.chars() {
        match c {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            '\u{8}' => out.extend_from_slice(b"\\b"),
            '\u{c}' => out.extend_from_slice(b"\\f"),
            '\n' => out.extend_from_slice(b"\\n"),
            '\r' => out.extend_from_slice(b"\\r"),
            '\t' => out.extend_from_slice(b"\\t"),
            c if u32::from(c) < 0x20 => out.extend_from_slice(format!("\\u{:04x}", u32::from(c)).as_bytes()),
            c => {
                let mut buffer = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buffer).as_bytes());
            }
        }
    }
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn canon(value: Value) -> String {
        String::from_utf8(to_vec(&value)).unwrap()
    }

    #[test]
    fn sorts_keys_and_drops_whitespace() {
        assert_eq!(
            canon(json!({"b": [1, {"z": null, "a": true}], "a": "x"})),
            r#"{"a":"x","b":[1,{"a":true,"z":null}]}"#
        );
    }

    #[test]
    fn numbers_follow_ecmascript() {
        let parsed: Value =
            serde_json::from_str("[1.0, 1e21, 1e-7, -0.0, 0.1, 123456789012345678901, 9007199254740993]")
                .unwrap();
        assert_eq!(canon(parsed), "[1,1e+21,1e-7,0,0.1,123456789012345680000,9007199254740992]");
    }

    #[test]
    fn escapes_like_rfc_8785() {
        assert_eq!(canon(json!("\u{1}\n\"\\é€😀\u{7f}")), "\"\\u0001\\n\\\"\\\\é€😀\u{7f}\"");
    }

    #[test]
    fn orders_keys_by_utf16_units() {
        // U+1F600 sorts after U+E000 in UTF-8 but before it in UTF-16 (surrogate D83D).
        assert_eq!(canon(json!({"\u{1F600}": 1, "\u{E000}": 2})), "{\"\u{1F600}\":1,\"\u{E000}\":2}");
    }
}
