//! Payload schemas (`schemas:` in a policy): per topic pattern, a JSON Schema (draft 2020-12)
//! that a job's payload must satisfy before any rule sees it, so that a payload of a shape no
//! rule expected is refused with every violation named rather than decided on. Compiled by
//! `boon` with its loader replaced: a `$ref` that leaves the schema is an error, never a file
//! read or a fetch.

use std::fmt;

use serde_json::Value;

use crate::glob::Glob;
use crate::limits::SCHEMA_VIOLATIONS_MAX;

/// The compiled payload schemas of one policy, in file order.
#[derive(Default)]
pub struct PayloadSchemas {
    /// Each topic pattern, its compiled schema, and the schema as written (for the hash).
    entries: Vec<(Glob, boon::SchemaIndex, Value)>,
    compiled: boon::Schemas,
}

/// One way a payload breaks a schema of its topic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// Where in the payload, as a JSON pointer (empty for the payload itself).
    pub pointer: String,
    /// What is wrong there.
    pub message: String,
}

/// Refuses every URL: a payload schema is self-contained.
struct NoLoader;

impl boon::UrlLoader for NoLoader {
    fn load(&self, url: &str) -> Result<Value, Box<dyn std::error::Error>> {
        Err(format!("`{url}` is outside the schema; payload schemas load nothing").into())
    }
}

impl PayloadSchemas {
    /// Compiles `(pattern, schema)` pairs; on failure, the position of each bad schema in
    /// `entries` and why it is not a valid draft 2020-12 schema.
    pub fn compile(entries: Vec<(Glob, Value)>) -> Result<Self, Vec<(usize, String)>> {
        let mut compiler = boon::Compiler::new();
        compiler.set_default_draft(boon::Draft::V2020_12);
        compiler.enable_format_assertions();
        compiler.use_loader(Box::new(NoLoader));
        let mut compiled = boon::Schemas::new();
        let mut out = Vec::with_capacity(entries.len());
        let mut errors = Vec::new();
        for (i, (pattern, schema)) in entries.into_iter().enumerate() {
            let url = format!("urn:airlock:payload-schema:{i}");
            let index = match compiler.add_resource(&url, schema.clone()) {
                Ok(()) => compiler.compile(&url, &mut compiled),
                Err(e) => Err(e),
            };
            match index {
                Ok(index) => out.push((pattern, index, schema)),
                Err(e) => errors.push((i, describe(&e))),
            }
        }
        if errors.is_empty() { Ok(Self { entries: out, compiled }) } else { Err(errors) }
    }

    /// Whether the policy has no payload schema.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The canonical form: `[[pattern, schema], ...]` in file order.
    pub fn canonical(&self) -> Value {
        Value::Array(
            self.entries.iter().map(|(g, _, s)| Value::Array(vec![g.as_str().into(), s.clone()])).collect(),
        )
    }

    /// Every violation of every schema whose pattern matches `topic`, at most
    /// [`SCHEMA_VIOLATIONS_MAX`]; empty when the payload conforms or no pattern matches.
    pub fn violations(&self, topic: &str, payload: &Value) -> Vec<Violation> {
        let mut out = Vec::new();
        for (pattern, index, _) in &self.entries {
            if pattern.matches(topic)
                && let Err(e) = self.compiled.validate(payload, *index)
            {
                leaves(&e, &mut out);
            }
        }
        out.truncate(SCHEMA_VIOLATIONS_MAX);
        out
    }
}

impl fmt::Debug for PayloadSchemas {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.entries.iter().map(|(g, _, _)| g.as_str())).finish()
    }
}

/// The innermost errors of a validation error tree: the concrete violations.
fn leaves(error: &boon::ValidationError<'_, '_>, out: &mut Vec<Violation>) {
    if error.causes.is_empty() {
        out.push(Violation { pointer: error.instance_location.to_string(), message: error.kind.to_string() });
    }
    for cause in &error.causes {
        leaves(cause, out);
    }
}

/// Why a schema did not compile, on one line: each place where it breaks the draft 2020-12
/// metaschema, or the compiler's own reason (a `$ref` it may not load).
fn describe(error: &boon::CompileError) -> String {
    let text = match error {
        boon::CompileError::ValidationError { src, .. } => {
            let mut found = Vec::new();
            leaves(src, &mut found);
            let places: Vec<String> = found
                .iter()
                .map(|v| {
                    if v.pointer.is_empty() {
                        v.message.clone()
                    } else {
                        format!("`{}`: {}", v.pointer, v.message)
                    }
                })
                .collect();
            places.join("; ")
        }
        other => format!("{other:#}"),
    };
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    text.replace("urn:airlock:payload-schema:", "schema ")
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn schemas(entries: &[(&str, Value)]) -> Result<PayloadSchemas, Vec<(usize, String)>> {
        PayloadSchemas::compile(entries.iter().map(|(p, s)| (Glob::new(p).unwrap(), s.clone())).collect())
    }

    #[test]
    fn every_violation_of_every_matching_schema_is_listed() {
        let s = schemas(&[
            ("infra.*.update", json!({"type": "object", "required": ["cidr", "port", "name"]})),
            (
                "infra.security_group.*",
                json!({"properties": {"cidr": {"type": "string", "format": "ipv4"}, "port": {"maximum": 65535}}}),
            ),
        ])
        .unwrap();
        let found = s.violations("infra.security_group.update", &json!({"cidr": "nope", "port": 70000}));
        let pointers: Vec<&str> = found.iter().map(|v| v.pointer.as_str()).collect();
        assert_eq!(pointers, ["", "/cidr", "/port"], "{found:?}");
        assert!(found[0].message.contains("name"), "{found:?}");
        assert!(s.violations("infra.vm.create", &json!(1)).is_empty(), "no pattern matches");
        let good = json!({"cidr": "10.0.0.0", "port": 443, "name": "web"});
        assert!(s.violations("infra.security_group.update", &good).is_empty());
    }

    #[test]
    fn invalid_schemas_and_outside_references_are_refused() {
        let errors = schemas(&[
            ("a", json!({"type": "object"})),
            ("b", json!({"type": 5})),
            ("c", json!({"$ref": "https://example.com/s.json"})),
            ("d", json!({"$ref": "/etc/passwd"})),
        ])
        .unwrap_err();
        let at: Vec<usize> = errors.iter().map(|(i, _)| *i).collect();
        assert_eq!(at, [1, 2, 3], "{errors:?}");
        assert!(errors[1].1.contains("example.com"), "{errors:?}");
    }

    #[test]
    fn references_inside_the_schema_resolve() {
        let s = schemas(&[(
            "**",
            json!({"$defs": {"port": {"type": "integer"}}, "properties": {"port": {"$ref": "#/$defs/port"}}}),
        )])
        .unwrap();
        assert_eq!(s.violations("x", &json!({"port": "80"})).len(), 1);
    }
}
