//! JSON-RPC 2.0 as MCP frames it on stdio (one message per line): the proxy's own small codec.
//! It classifies a line without rebuilding it, so that what passes through reaches the other
//! side byte for byte, and it words the errors both sides get for what it cannot read.

use serde_json::{Map, Value, json};

/// Invalid JSON.
pub const PARSE_ERROR: i64 = -32_700;
/// JSON that is not a JSON-RPC 2.0 message.
pub const INVALID_REQUEST: i64 = -32_600;
/// Parameters the method cannot take.
pub const INVALID_PARAMS: i64 = -32_602;
/// The proxy could not carry out the request.
pub const INTERNAL_ERROR: i64 = -32_603;

/// One message, classified.
#[derive(Clone, Debug, PartialEq)]
pub enum Message {
    /// A call that expects an answer under `id`.
    Request {
        /// A string or an integer.
        id: Value,
        method: String,
        params: Option<Value>,
    },
    /// A call without an answer.
    Notification { method: String, params: Option<Value> },
    /// An answer: `Ok(result)` or `Err(error object)`.
    Response { id: Value, outcome: Result<Value, Value> },
}

/// A line that is not a message, and the error answer it deserves.
#[derive(Clone, Debug, PartialEq)]
pub struct Malformed {
    /// The request's id when it could be read, else `null`.
    pub id: Value,
    /// [`PARSE_ERROR`] or [`INVALID_REQUEST`].
    pub code: i64,
    /// What was wrong, for the other side.
    pub message: String,
}

impl Malformed {
    /// The JSON-RPC error answer to the line.
    pub fn answer(&self) -> String {
        error(&self.id, self.code, &self.message)
    }
}

/// Reads one line.
pub fn parse(line: &str) -> Result<Message, Malformed> {
    let value: Value = serde_json::from_str(line).map_err(|e| Malformed {
        id: Value::Null,
        code: PARSE_ERROR,
        message: format!("parse error: {e}"),
    })?;
    let Value::Object(mut map) = value else {
        let message = if value.is_array() {
            "batches are not supported (MCP 2025-06-18 removed them): send one message per line"
        } else {
            "a message must be a JSON object"
        };
        return Err(invalid(Value::Null, message.to_owned()));
    };
    let id = map.remove("id");
    let readable_id = id.clone().filter(valid_id).unwrap_or(Value::Null);
    if map.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return Err(invalid(readable_id, "`jsonrpc` must be \"2.0\"".into()));
    }
    let params = map.remove("params");
    if let Some(p) = &params
        && !(p.is_object() || p.is_array())
    {
        return Err(invalid(readable_id, "`params` must be an object or an array".into()));
    }
    match (map.remove("method"), id) {
        (Some(Value::String(method)), None) => Ok(Message::Notification { method, params }),
        (Some(Value::String(method)), Some(id)) if valid_id(&id) => {
            Ok(Message::Request { id, method, params })
        }
        (Some(Value::String(_)), Some(_)) => {
            Err(invalid(Value::Null, "`id` must be a string or an integer".into()))
        }
        (Some(_), _) => Err(invalid(readable_id, "`method` must be a string".into())),
        (None, Some(id)) => response(id, &mut map),
        (None, None) => Err(invalid(Value::Null, "a message needs a `method` or an `id`".into())),
    }
}

fn response(id: Value, map: &mut Map<String, Value>) -> Result<Message, Malformed> {
    if !(valid_id(&id) || id.is_null()) {
        return Err(invalid(Value::Null, "`id` must be a string or an integer".into()));
    }
    match (map.remove("result"), map.remove("error")) {
        (Some(result), None) => Ok(Message::Response { id, outcome: Ok(result) }),
        (None, Some(error)) if error.get("code").is_some_and(Value::is_i64) => {
            Ok(Message::Response { id, outcome: Err(error) })
        }
        (None, Some(_)) => Err(invalid(id, "`error` must be an object with an integer `code`".into())),
        _ => Err(invalid(
            id,
            "a message with an `id` needs a `method` (a request) or exactly one of `result` and `error` \
             (a response)"
                .into(),
        )),
    }
}

fn invalid(id: Value, message: String) -> Malformed {
    Malformed { id, code: INVALID_REQUEST, message: format!("invalid request: {message}") }
}

fn valid_id(id: &Value) -> bool {
    id.is_string() || id.is_i64() || id.is_u64()
}

/// The key an id is remembered under: its JSON text, so `1` and `"1"` stay apart.
pub fn id_key(id: &Value) -> String {
    id.to_string()
}

/// A success answer.
pub fn result(id: &Value, result: &Value) -> String {
    json!({"jsonrpc": "2.0", "id": id, "result": result}).to_string()
}

/// An error answer.
pub fn error(id: &Value, code: i64, message: &str) -> String {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}}).to_string()
}

/// A request.
pub fn request(id: &Value, method: &str, params: &Value) -> String {
    json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}).to_string()
}

/// A notification.
pub fn notification(method: &str, params: &Value) -> String {
    json!({"jsonrpc": "2.0", "method": method, "params": params}).to_string()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic, reason = "a test fails by panicking")]

    use super::*;

    fn check(line: &str, expected: Result<Message, (i64, &str)>) {
        let got = parse(line).map_err(|m| (m.code, m.message));
        match (&got, &expected) {
            (Ok(a), Ok(b)) => assert_eq!(a, b, "{line}"),
            (Err((code, message)), Err((want_code, want))) => {
                assert_eq!(code, want_code, "{line}: {message}");
                assert!(message.contains(want), "{line}: `{message}` lacks `{want}`");
            }
            _ => panic!("{line}: got {got:?}, expected {expected:?}"),
        }
    }

    #[test]
    fn classifies_every_kind_of_message() {
        check(
            r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"x"}}"#,
            Ok(Message::Request {
                id: json!(7),
                method: "tools/call".into(),
                params: Some(json!({"name": "x"})),
            }),
        );
        check(
            r#"{"jsonrpc":"2.0","id":"a","method":"ping"}"#,
            Ok(Message::Request { id: json!("a"), method: "ping".into(), params: None }),
        );
        check(
            r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
            Ok(Message::Notification { method: "notifications/initialized".into(), params: None }),
        );
        check(
            r#"{"jsonrpc":"2.0","id":7,"result":{}}"#,
            Ok(Message::Response { id: json!(7), outcome: Ok(json!({})) }),
        );
        check(
            r#"{"jsonrpc":"2.0","id":7,"error":{"code":-1,"message":"m"}}"#,
            Ok(Message::Response { id: json!(7), outcome: Err(json!({"code": -1, "message": "m"})) }),
        );
    }

    #[test]
    fn says_what_is_wrong_with_a_bad_line() {
        check("{not json", Err((PARSE_ERROR, "parse error")));
        check("[1]", Err((INVALID_REQUEST, "batches are not supported")));
        check("3", Err((INVALID_REQUEST, "must be a JSON object")));
        check(r#"{"id":1,"method":"x"}"#, Err((INVALID_REQUEST, "`jsonrpc` must be \"2.0\"")));
        check(r#"{"jsonrpc":"2.0","id":1.5,"method":"x"}"#, Err((INVALID_REQUEST, "`id` must be")));
        check(r#"{"jsonrpc":"2.0","id":null,"method":"x"}"#, Err((INVALID_REQUEST, "`id` must be")));
        check(r#"{"jsonrpc":"2.0","id":1,"method":3}"#, Err((INVALID_REQUEST, "`method` must be")));
        check(r#"{"jsonrpc":"2.0","id":1,"method":"x","params":3}"#, Err((INVALID_REQUEST, "`params`")));
        check(r#"{"jsonrpc":"2.0","id":1}"#, Err((INVALID_REQUEST, "exactly one of")));
        assert_eq!(parse(r#"{"jsonrpc":"2.0","id":1}"#).unwrap_err().id, json!(1), "answered under its id");
        check(r#"{"jsonrpc":"2.0","id":1,"error":{"code":"x"}}"#, Err((INVALID_REQUEST, "integer `code`")));
        check(r#"{"jsonrpc":"2.0"}"#, Err((INVALID_REQUEST, "needs a `method` or an `id`")));
    }

    #[test]
    fn a_bad_request_with_a_readable_id_is_answered_under_it() {
        let bad = parse(r#"{"jsonrpc":"1.0","id":4,"method":"x"}"#).unwrap_err();
        let answer: Value = serde_json::from_str(&bad.answer()).unwrap();
        assert_eq!(answer["id"], json!(4));
        assert_eq!(answer["error"]["code"], json!(INVALID_REQUEST));
        let unreadable: Value = serde_json::from_str(&parse("}").unwrap_err().answer()).unwrap();
        assert_eq!(unreadable["id"], Value::Null);
    }

    #[test]
    fn ids_of_different_types_are_different_keys() {
        assert_ne!(id_key(&json!(1)), id_key(&json!("1")));
        let line = request(&json!(1), "tools/list", &json!({}));
        assert!(matches!(parse(&line), Ok(Message::Request { .. })));
        assert!(matches!(parse(&notification("n", &json!({}))), Ok(Message::Notification { .. })));
        assert!(matches!(parse(&result(&json!("x"), &json!(1))), Ok(Message::Response { .. })));
        assert!(matches!(parse(&error(&json!("x"), INTERNAL_ERROR, "m")), Ok(Message::Response { .. })));
    }
}
