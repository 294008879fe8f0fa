//! `airlock serve --config FILE`: the settings beyond the fixed flags, as YAML, checked with
//! line and column like a policy. Every key is optional; absent keys keep SPEC 13's defaults.
//!
//! ```yaml
//! gate_a:
//!   fail_mode: closed              # or open
//!   fail_mode_topics: { "infra.*.read": open }
//!   fail_mode_risk: { low: open }
//!   timeout_ms: 5000
//! approvals:
//!   ttl_secs: 86400
//!   binding: snapshot              # or rule
//! idempotency:
//!   retention_days: 30
//!   required_topics: ["infra.resource.*"]
//! gate_b:
//!   fail_mode: closed
//!   fail_mode_topics: { "infra.*.read": open }
//!   fail_mode_risk: { low: open }
//!   timeout_ms: 2000
//! breaker: { failures_to_open: 3, open_ms: 30000, probes: 3 }
//! scheduling: { attempts_max: 50, backoff_base_ms: 1000, backoff_cap_ms: 30000 }
//! execution: { attempts_max: 3, attempts_topics: { "infra.cluster.*": 1 } }
//! leases: { lease_ms: 30000, heartbeat_ms: 10000 }
//! pools: { default: ["**"], infra: ["infra.**"] }
//! http:
//!   header_read_timeout_ms: 10000
//!   idle_timeout_ms: 5000
//!   request_timeout_ms: 30000      # long-poll claims: plus their wait_ms
//!   in_flight_max: 512             # the excess gets 503 + Retry-After
//!   connections_max: 4096          # lowered to stay below the file limit
//!   drain_timeout_ms: 30000
//!   long_polls_per_key_max: 64     # claims one key keeps waiting; the excess gets 429
//!   long_poll_recheck_ms: 1000     # a waiting claim is woken by new work; this is the safety net
//! dry_run:                         # simulate/explain/diff with a candidate policy (operators)
//!   candidate_bytes_max: 1048576
//!   budget_ms: 2000                # compile + evaluate, off the async threads; over → 422
//!   regex_bytes_max: 4194304       # all the candidate's regexes, compiled
//! auth:
//!   failures_per_minute: 20        # per source address; then 429 until the minute ends
//! metrics:
//!   require_key: false             # true: /metrics needs `Authorization: Bearer <key>`
//! audit:
//!   checkpoint_ms: 60000           # signed checkpoints to `--audit-export`, when a head moved
//! ```

use std::time::Duration;

use airlock_policy::Diagnostic;
use airlock_policy::glob::Glob;
use airlock_policy::yaml::{self, Key, Kind, Node};
use airlock_server::state::{Config, FailMode, FailModes};

/// Parses a config file into the server configuration.
pub fn parse(text: &str) -> Result<Config, Vec<Diagnostic>> {
    let root = yaml::parse(text)?;
    let mut errors = Vec::new();
    let mut config = Config::default();
    for (section, value) in entries(&root, &mut errors) {
        match section.text.as_str() {
            "gate_a" => gate(value, &mut config.gate_a_fail, &mut config.gate_a_timeout, &mut errors),
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
            "gate_b" => gate(value, &mut config.gate_b_fail, &mut config.gate_b_timeout, &mut errors),
            "breaker" => {
                for (key, v) in entries(value, &mut errors) {
                    let Some(n) = positive(v, &mut errors) else { continue };
                    match key.text.as_str() {
                        "failures_to_open" => config.breaker.failures_to_open = small(n),
                        "open_ms" => config.breaker.open_ms = n,
                        "probes" => config.breaker.probes = small(n),
                        _ => unknown(key, &["failures_to_open", "open_ms", "probes"], &mut errors),
                    }
                }
            }
            "scheduling" => {
                for (key, v) in entries(value, &mut errors) {
                    let Some(n) = positive(v, &mut errors) else { continue };
                    match key.text.as_str() {
                        "attempts_max" => config.caps.scheduling_attempts_max = small(n),
                        "backoff_base_ms" => config.caps.backoff_base_ms = n,
                        "backoff_cap_ms" => config.caps.backoff_cap_ms = n,
                        _ => {
                            unknown(key, &["attempts_max", "backoff_base_ms", "backoff_cap_ms"], &mut errors)
                        }
                    }
                }
            }
            "execution" => {
                for (key, v) in entries(value, &mut errors) {
                    match key.text.as_str() {
                        "attempts_max" => {
                            if let Some(n) = positive(v, &mut errors) {
                                config.caps.execution_attempts_max = small(n);
                            }
                        }
                        "attempts_topics" => {
                            // Before the built-in patterns: the first match wins.
                            let mut at = 0;
                            for (pattern, n) in entries(v, &mut errors) {
                                let glob = Glob::new(&pattern.text).map_err(|e| {
                                    errors.push(Diagnostic::error(pattern.span, format!("invalid glob: {e}")))
                                });
                                if let (Ok(glob), Some(n)) = (glob, positive(n, &mut errors)) {
                                    config.execution_attempts_topics.insert(at, (glob, small(n)));
                                    at += 1;
                                }
                            }
                        }
                        _ => unknown(key, &["attempts_max", "attempts_topics"], &mut errors),
                    }
                }
            }
            "leases" => {
                for (key, v) in entries(value, &mut errors) {
                    let Some(n) = positive(v, &mut errors) else { continue };
                    match key.text.as_str() {
                        "lease_ms" => config.lease_ms = n,
                        "heartbeat_ms" => config.heartbeat_ms = n,
                        _ => unknown(key, &["lease_ms", "heartbeat_ms"], &mut errors),
                    }
                }
            }
            "pools" => {
                for (name, patterns) in entries(value, &mut errors) {
                    let Kind::Seq(items) = &patterns.kind else {
                        errors.push(Diagnostic::error(patterns.span, "a pool is a list of topic globs"));
                        continue;
                    };
                    let mut globs = Vec::new();
                    for item in items {
                        match &item.kind {
                            Kind::Str(s) => match Glob::new(s) {
                                Ok(g) => globs.push(g),
                                Err(e) => {
                                    errors.push(Diagnostic::error(item.span, format!("invalid glob: {e}")))
                                }
                            },
                            other => errors.push(Diagnostic::error(
                                item.span,
                                format!("expected a topic glob, found {}", other.describe()),
                            )),
                        }
                    }
                    config.pools.push((name.text.clone(), globs));
                }
            }
            "http" => {
                for (key, v) in entries(value, &mut errors) {
                    let Some(n) = positive(v, &mut errors) else { continue };
                    let http = &mut config.http;
                    match key.text.as_str() {
                        "header_read_timeout_ms" => http.header_read_timeout = Duration::from_millis(n),
                        "idle_timeout_ms" => http.idle_timeout = Duration::from_millis(n),
                        "request_timeout_ms" => http.request_timeout = Duration::from_millis(n),
                        "in_flight_max" => http.in_flight_max = usize::try_from(n).unwrap_or(usize::MAX),
                        "connections_max" => http.connections_max = usize::try_from(n).unwrap_or(usize::MAX),
                        "drain_timeout_ms" => http.drain_timeout = Duration::from_millis(n),
                        "long_polls_per_key_max" => {
                            http.long_polls_per_key_max = usize::try_from(n).unwrap_or(usize::MAX);
                        }
                        "long_poll_recheck_ms" => http.long_poll_recheck = Duration::from_millis(n),
                        _ => unknown(key, &HTTP_KEYS, &mut errors),
                    }
                }
            }
            "dry_run" => {
                for (key, v) in entries(value, &mut errors) {
                    let Some(n) = positive(v, &mut errors) else { continue };
                    let dry_run = &mut config.dry_run;
                    match key.text.as_str() {
                        "candidate_bytes_max" => {
                            dry_run.candidate_bytes_max = usize::try_from(n).unwrap_or(usize::MAX);
                        }
                        "budget_ms" => dry_run.budget = Duration::from_millis(n),
                        "regex_bytes_max" => {
                            dry_run.regex_bytes_max = usize::try_from(n).unwrap_or(usize::MAX)
                        }
                        _ => unknown(
                            key,
                            &["candidate_bytes_max", "budget_ms", "regex_bytes_max"],
                            &mut errors,
                        ),
                    }
                }
            }
            "auth" => {
                for (key, v) in entries(value, &mut errors) {
                    let Some(n) = positive(v, &mut errors) else { continue };
                    match key.text.as_str() {
                        "failures_per_minute" => config.auth_failures_per_minute = small(n),
                        _ => unknown(key, &["failures_per_minute"], &mut errors),
                    }
                }
            }
            "audit" => {
                for (key, v) in entries(value, &mut errors) {
                    let Some(n) = positive(v, &mut errors) else { continue };
                    match key.text.as_str() {
                        "checkpoint_ms" => config.audit_checkpoint = Duration::from_millis(n),
                        _ => unknown(key, &["checkpoint_ms"], &mut errors),
                    }
                }
            }
            "metrics" => {
                for (key, v) in entries(value, &mut errors) {
                    match (key.text.as_str(), &v.kind) {
                        ("require_key", Kind::Bool(b)) => config.metrics_require_key = *b,
                        ("require_key", other) => errors.push(Diagnostic::error(
                            v.span,
                            format!("expected `true` or `false`, found {}", other.describe()),
                        )),
                        _ => unknown(key, &["require_key"], &mut errors),
                    }
                }
            }
            _ => unknown(
                section,
                &[
                    "gate_a",
                    "approvals",
                    "idempotency",
                    "gate_b",
                    "breaker",
                    "scheduling",
                    "execution",
                    "leases",
                    "pools",
                    "http",
                    "dry_run",
                    "auth",
                    "metrics",
                    "audit",
                ],
                &mut errors,
            ),
        }
    }
    if errors.is_empty() { Ok(config) } else { Err(errors) }
}

/// The keys of the `http` section.
const HTTP_KEYS: [&str; 8] = [
    "header_read_timeout_ms",
    "idle_timeout_ms",
    "request_timeout_ms",
    "in_flight_max",
    "connections_max",
    "drain_timeout_ms",
    "long_polls_per_key_max",
    "long_poll_recheck_ms",
];

/// A `gate_a` or `gate_b` section: the gate's fail modes and its check timeout.
fn gate(section: &Node, fail: &mut FailModes, timeout: &mut Duration, errors: &mut Vec<Diagnostic>) {
    for (key, v) in entries(section, errors) {
        match key.text.as_str() {
            "fail_mode" => {
                if let Some(m) = parse_str::<FailMode>(v, errors) {
                    fail.default = m;
                }
            }
            "fail_mode_topics" => {
                for (pattern, mode) in entries(v, errors) {
                    let glob = Glob::new(&pattern.text).map_err(|e| {
                        errors.push(Diagnostic::error(pattern.span, format!("invalid glob: {e}")))
                    });
                    if let (Ok(glob), Some(mode)) = (glob, parse_str::<FailMode>(mode, errors)) {
                        fail.topics.push((glob, mode));
                    }
                }
            }
            "fail_mode_risk" => {
                for (class, mode) in entries(v, errors) {
                    if let Some(mode) = parse_str::<FailMode>(mode, errors) {
                        fail.risk.push((class.text.clone(), mode));
                    }
                }
            }
            "timeout_ms" => {
                if let Some(ms) = positive(v, errors) {
                    *timeout = Duration::from_millis(ms);
                }
            }
            _ => unknown(key, &["fail_mode", "fail_mode_topics", "fail_mode_risk", "timeout_ms"], errors),
        }
    }
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

fn small(n: u64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
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
        assert_eq!(config.gate_a_fail.default, FailMode::Open);
        let risky = parse("gate_a: { fail_mode_risk: { high: closed, low: open } }\n").unwrap();
        assert_eq!(risky.gate_a_fail.for_topic("infra.x", &["low"]), FailMode::Open);
        assert_eq!(risky.gate_a_fail.for_topic("infra.x", &["low", "high"]), FailMode::Closed, "closed wins");
        assert_eq!(risky.gate_a_fail.for_topic("infra.x", &[]), FailMode::Closed, "the default");
        assert_eq!(config.gate_a_fail.for_topic("infra.resource.delete", &[]), FailMode::Closed);
        assert_eq!(config.gate_a_fail.for_topic("infra.bucket.read", &[]), FailMode::Open);
        assert_eq!(config.gate_a_timeout, Duration::from_millis(250));
        assert_eq!((config.approval_ttl_ms, config.approval_binding), (60_000, Binding::Rule));
        assert_eq!(config.idempotency_retention_ms, 2 * 86_400_000);
        assert!(config.require_idempotency_key[0].matches("infra.a.b"));
    }

    #[test]
    fn reads_gate_b_settings() {
        let config = parse(
            "gate_b: { fail_mode: open, fail_mode_risk: { high: closed }, timeout_ms: 100 }\n\
             breaker: { failures_to_open: 2, open_ms: 500, probes: 1 }\n\
             scheduling: { attempts_max: 5, backoff_base_ms: 10, backoff_cap_ms: 40 }\n\
             execution: { attempts_max: 2, attempts_topics: { \"infra.cluster.*\": 1 } }\n\
             leases: { lease_ms: 1500, heartbeat_ms: 500 }\npools: { infra: [\"infra.**\"] }\n",
        )
        .unwrap();
        assert_eq!(config.gate_b_fail.for_topic("infra.vm.delete", &["high"]), FailMode::Closed);
        assert_eq!(config.gate_b_fail.for_topic("infra.vm.read", &[]), FailMode::Open);
        assert_eq!(
            (config.breaker.failures_to_open, config.breaker.open_ms, config.breaker.probes),
            (2, 500, 1)
        );
        assert_eq!(config.caps.scheduling_attempts_max, 5);
        assert_eq!(config.caps_for("infra.cluster.recreate").execution_attempts_max, 1);
        assert_eq!(config.caps_for("infra.vm.create").execution_attempts_max, 2);
        assert_eq!(config.caps_for("mcp.fs.write_file").execution_attempts_max, 1, "built in");
        let mcp = parse("execution: { attempts_topics: { \"mcp.fs.*\": 2, \"mcp.**\": 3 } }\n").unwrap();
        assert_eq!(mcp.caps_for("mcp.fs.read_file").execution_attempts_max, 2, "configured first");
        assert_eq!(mcp.caps_for("mcp.git.log").execution_attempts_max, 3, "configured first");
        assert_eq!(Config::default().caps_for("mcp.git.log").execution_attempts_max, 1);
        assert_eq!((config.lease_ms, config.heartbeat_ms), (1500, 500));
        assert_eq!(config.pool_takes("infra", "infra.vm.create"), Some(true));
        assert_eq!(config.pool_takes("default", "infra.vm.create"), None);
    }

    #[test]
    fn reads_listener_limits() {
        let config = parse(
            "http: { header_read_timeout_ms: 100, idle_timeout_ms: 50, request_timeout_ms: 200, \
             in_flight_max: 3, connections_max: 9, drain_timeout_ms: 400, long_polls_per_key_max: 2, \
             long_poll_recheck_ms: 700 }\n",
        )
        .unwrap();
        let http = &config.http;
        assert_eq!(
            (http.header_read_timeout, http.idle_timeout),
            (Duration::from_millis(100), Duration::from_millis(50))
        );
        assert_eq!(
            (http.request_timeout, http.drain_timeout),
            (Duration::from_millis(200), Duration::from_millis(400))
        );
        assert_eq!((http.in_flight_max, http.connections_max, http.long_polls_per_key_max), (3, 9, 2));
        assert_eq!(http.long_poll_recheck, Duration::from_millis(700));
        assert_eq!(parse("").unwrap().http.in_flight_max, airlock_core::defaults::HTTP_IN_FLIGHT_MAX);
        let dry =
            parse("dry_run: { candidate_bytes_max: 10, budget_ms: 20, regex_bytes_max: 30 }\n").unwrap();
        assert_eq!(
            (dry.dry_run.candidate_bytes_max, dry.dry_run.budget, dry.dry_run.regex_bytes_max),
            (10, Duration::from_millis(20), 30)
        );
        let errors = parse("http: { idle_ms: 5 }\n").unwrap_err();
        assert!(errors[0].render("c").contains("unknown key `idle_ms`"), "{}", errors[0].render("c"));
    }

    #[test]
    fn reports_bad_settings_with_positions() {
        let errors = parse("gate_a:\n  fail_mode: sometimes\napprovals:\n  ttl: 5\n").unwrap_err();
        let rendered: Vec<String> = errors.iter().map(|d| d.render("c.yaml")).collect();
        assert!(rendered[0].starts_with("c.yaml:2:14: error: unknown fail mode `sometimes`"), "{rendered:?}");
        assert!(rendered[1].starts_with("c.yaml:4:3: error: unknown key `ttl`"), "{rendered:?}");
    }
}
