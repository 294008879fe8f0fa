//! `airlock serve --config FILE`: the settings beyond the fixed flags, as YAML, checked with
//! line and column like a policy. Every key is optional; absent keys keep SPEC 13's defaults.
//!
//! ```yaml
//! gate_a:
//!   fail_mode: closed              # or open
//!   fail_mode_topics: { "infra.*.read": open }
//!   timeout_ms: 5000
//! approvals:
//!   ttl_secs: 86400
//!   binding: snapshot              # or rule
//! idempotency:
//!   retention_days: 30
//!   required_topics: ["infra.resource.*"]
//! ```

use std::time::Duration;

use airlock_policy::Diagnostic;
use airlock_policy::glob::Glob;
use airlock_policy::yaml::{self, Key, Kind, Node};
use airlock_server::state::{Config, FailMode};

/// Parses a config file into the server configuration.
pub fn parse(text: &str) -> Result<Config, Vec<Diagnostic>> {
    let root = yaml::parse(text)?;
    let mut errors = Vec::new();
    let mut config = Config::default();
    for (section, value) in entries(&root, &mut errors) {
        match section.text.as_str() {
            "gate_a" => {
                for (key, v) in entries(value, &mut errors) {
                    match key.text.as_str() {
                        "fail_mode" => {
                            if let Some(m) = parse_str::<FailMode>(v, &mut errors) {
                                config.gate_a_fail_mode = m;
                            }
                        }
                        "fail_mode_topics" => {
                            for (pattern, mode) in entries(v, &mut errors) {
                                let glob = Glob::new(&pattern.text).map_err(|e| {
                                    errors.push(Diagnostic::error(pattern.span, format!("invalid glob: {e}")))
                                });
                                if let (Ok(glob), Some(mode)) =
                                    (glob, parse_str::<FailMode>(mode, &mut errors))
                                {
                                    config.gate_a_fail_mode_topics.push((glob, mode));
                                }
                            }
                        }
                        "timeout_ms" => {
                            if let Some(ms) = positive(v, &mut errors) {
                                config.gate_a_timeout = Duration::from_millis(ms);
                            }
                        }
                        _ => unknown(key, &["fail_mode", "fail_mode_topics", "timeout_ms"], &mut errors),
                    }
                }
            }
            "approvals" => {
                for (key, v) in entries(value, &mut errors) {
                    match key.text.as_str() {
                        "ttl_secs" => {
                            if let Some(s) = positive(v, &mut errors) {
                                config.approval_ttl_ms =
                                    i64::try_from(s.saturating_mul(1000)).unwrap_or(i64::MAX);
                            }
                        }
                        "binding" => {
                            if let Some(b) = parse_str(v, &mut errors) {
                                config.approval_binding = b;
                            }
                        }
                        _ => unknown(key, &["ttl_secs", "binding"], &mut errors),
                    }
                }
            }
            "idempotency" => {
                for (key, v) in entries(value, &mut errors) {
                    match key.text.as_str() {
                        "retention_days" => {
                            if let Some(d) = positive(v, &mut errors) {
                                config.idempotency_retention_ms =
                                    i64::try_from(d.saturating_mul(86_400_000)).unwrap_or(i64::MAX);
                            }
                        }
                        "required_topics" => {
                            let Kind::Seq(items) = &v.kind else {
                                errors.push(Diagnostic::error(
                                    v.span,
                                    "`required_topics` must be a list of topic globs",
                                ));
                                continue;
                            };
                            for item in items {
                                match &item.kind {
                                    Kind::Str(s) => match Glob::new(s) {
                                        Ok(g) => config.require_idempotency_key.push(g),
                                        Err(e) => errors
                                            .push(Diagnostic::error(item.span, format!("invalid glob: {e}"))),
                                    },
                                    other => errors.push(Diagnostic::error(
                                        item.span,
                                        format!("expected a topic glob, found {}", other.describe()),
                                    )),
                                }
                            }
                        }
                        _ => unknown(key, &["retention_days", "required_topics"], &mut errors),
                    }
                }
            }
            _ => unknown(section, &["gate_a", "approvals", "idempotency"], &mut errors),
        }
    }
    if errors.is_empty() { Ok(config) } else { Err(errors) }
}

fn entries<'a>(node: &'a Node, errors: &mut Vec<Diagnostic>) -> &'a [(Key, Node)] {
    match &node.kind {
        Kind::Map(entries) => entries,
        Kind::Null => &[],
        other => {
            errors.push(Diagnostic::error(node.span, format!("expected a map, found {}", other.describe())));
            &[]
        }
    }
}

fn unknown(key: &Key, allowed: &[&str], errors: &mut Vec<Diagnostic>) {
    errors.push(
        Diagnostic::error(key.span, format!("unknown key `{}`", key.text))
            .with_help(format!("expected one of {}", allowed.join(", "))),
    );
}

fn parse_str<T: std::str::FromStr<Err = String>>(node: &Node, errors: &mut Vec<Diagnostic>) -> Option<T> {
    match &node.kind {
        Kind::Str(s) => s.parse().map_err(|e: String| errors.push(Diagnostic::error(node.span, e))).ok(),
        other => {
            errors
                .push(Diagnostic::error(node.span, format!("expected a string, found {}", other.describe())));
            None
        }
    }
}

fn positive(node: &Node, errors: &mut Vec<Diagnostic>) -> Option<u64> {
    match node.kind {
        Kind::Int(n) if n > 0 => Some(n.unsigned_abs()),
        _ => {
            errors.push(Diagnostic::error(node.span, "expected a positive integer"));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use airlock_core::approval::Binding;

    use super::*;

    #[test]
    fn reads_every_setting() {
        let config = parse(
            "gate_a:\n  fail_mode: open\n  fail_mode_topics: { \"infra.resource.*\": closed }\n  timeout_ms: 250\n\
             approvals: { ttl_secs: 60, binding: rule }\nidempotency: { retention_days: 2, required_topics: [\"infra.**\"] }\n",
        )
        .unwrap();
        assert_eq!(config.gate_a_fail_mode, FailMode::Open);
        assert_eq!(config.gate_a_fail_mode_for("infra.resource.delete"), FailMode::Closed);
        assert_eq!(config.gate_a_fail_mode_for("infra.bucket.read"), FailMode::Open);
        assert_eq!(config.gate_a_timeout, Duration::from_millis(250));
        assert_eq!((config.approval_ttl_ms, config.approval_binding), (60_000, Binding::Rule));
        assert_eq!(config.idempotency_retention_ms, 2 * 86_400_000);
        assert!(config.require_idempotency_key[0].matches("infra.a.b"));
    }

    #[test]
    fn reports_bad_settings_with_positions() {
        let errors = parse("gate_a:\n  fail_mode: sometimes\napprovals:\n  ttl: 5\n").unwrap_err();
        let rendered: Vec<String> = errors.iter().map(|d| d.render("c.yaml")).collect();
        assert!(rendered[0].starts_with("c.yaml:2:14: error: unknown fail mode `sometimes`"), "{rendered:?}");
        assert!(rendered[1].starts_with("c.yaml:4:3: error: unknown key `ttl`"), "{rendered:?}");
    }
}
