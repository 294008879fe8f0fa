//! From YAML to a compiled [`Policy`]: every key, type and value checked, every error of the
//! file collected with its position, and the canonical form hashed.

use regex::RegexBuilder;
use serde_json::{Map, Value, json};

use crate::cidr::Net;
use crate::diag::{Diagnostic, Span, one_of, suggest};
use crate::glob::Glob;
use crate::jcs;
use crate::job::{sha256_tagged, tagged};
use crate::limits::{
    APPROVALS_MAX, CONDITION_DEPTH_MAX, POLICY_BYTES_MAX, REGEX_DFA_CACHE_BYTES, REGEX_OVERHEAD_BYTES,
    REGEX_SIZE_MAX, REGEX_TOTAL_BYTES_MAX, RULES_MAX, THROTTLE_DEFAULT_PER_SECS, THROTTLE_DEFAULT_RATE,
    THROTTLE_PER_MAX_SECS,
};
use crate::model::{
    Cond, Decision, Field, Limit, LimitKey, Literal, Mode, RiskClass, Rule, TerraformTopic, Test,
};
use crate::path::Path;
use crate::policy::Policy;
use crate::schema::PayloadSchemas;
use crate::yaml::{self, Key, Kind, Node};

const TOP_KEYS: [&str; 6] = ["version", "defaults", "risk", "rules", "schemas", "terraform"];
const TERRAFORM_KEYS: [&str; 1] = ["topics"];
const DEFAULTS_KEYS: [&str; 2] = ["decision", "reason"];
const RULE_KEYS: [&str; 7] = ["id", "when", "decision", "reason", "mode", "limit", "approvals"];
const LIMIT_KEYS: [&str; 4] = ["rate", "per", "burst", "key"];
const RESERVED_WHEN_KEYS: [&str; 10] =
    ["topic", "env", "tenant", "principal", "risk", "labels", "payload", "all", "any", "not"];
/// Words people write for reserved `when` keys; a shorthand close to one gets a warning.
const LOOKALIKES: [(&str, &str); 6] = [
    ("environment", "env"),
    ("topics", "topic"),
    ("label", "labels"),
    ("tenant_id", "tenant"),
    ("user", "principal"),
    ("risk_class", "risk"),
];
const OPERATORS: [&str; 12] = [
    "glob",
    "regex",
    "in",
    "not_in",
    "gt",
    "gte",
    "lt",
    "lte",
    "exists",
    "contains",
    "cidr_within",
    "cidr_overlaps",
];
const DECISIONS: [&str; 4] = ["allow", "deny", "throttle", "require_human"];

/// Compiles policy text. On success the policy comes with its warnings (the compiler's and the
/// static analysis'); on failure every error of the file is returned, sorted by position.
pub fn compile(text: &str) -> Result<(Policy, Vec<Diagnostic>), Vec<Diagnostic>> {
    let budget = Budget { regex_bytes_max: REGEX_TOTAL_BYTES_MAX, time_left: &mut || true };
    match compile_within(text, budget) {
        Ok((policy, mut warnings)) => {
            warnings.extend(crate::analysis::analyze(&policy));
            warnings.sort_by_key(|d| d.span);
            Ok((policy, warnings))
        }
        Err(Refused::Invalid(errors)) => Err(errors),
        Err(Refused::OverBudget(reason)) => Err(vec![Diagnostic::error(Span { line: 1, col: 1 }, reason)]),
    }
}

/// What one compilation may spend: a policy from an untrusted party (a dry-run's candidate)
/// is compiled under a budget, so that it cannot take the server's CPU or memory.
pub struct Budget<'a> {
    /// Total compiled size of the policy's regexes, in bytes (each also stays under
    /// [`REGEX_SIZE_MAX`]).
    pub regex_bytes_max: usize,
    /// Asked before each rule; once it answers `false` the compilation stops. The compiler
    /// reads no clock; the caller's closure does.
    pub time_left: &'a mut dyn FnMut() -> bool,
}

/// Why a budgeted compilation gave no policy.
#[derive(Debug)]
pub enum Refused {
    /// The policy has errors: all of them, sorted by position.
    Invalid(Vec<Diagnostic>),
    /// The policy needs more than its budget; the reason says which part ran out.
    OverBudget(String),
}

/// [`compile`] under a [`Budget`], without the static analysis (whose warnings a dry-run does
/// not show). The compiler's own warnings come with the policy.
pub fn compile_within(text: &str, budget: Budget<'_>) -> Result<(Policy, Vec<Diagnostic>), Refused> {
    if text.len() > POLICY_BYTES_MAX {
        return Err(Refused::Invalid(vec![Diagnostic::error(
            Span { line: 1, col: 1 },
            format!("policy is {} bytes; the limit is {POLICY_BYTES_MAX}", text.len()),
        )]));
    }
    let root = yaml::parse(text).map_err(Refused::Invalid)?;
    let mut compiler = Compiler {
        regex_bytes_max: budget.regex_bytes_max,
        regex_bytes_left: budget.regex_bytes_max,
        time_left: Some(budget.time_left),
        ..Compiler::default()
    };
    let parts = compiler.document(&root);
    if let Some(reason) = compiler.over_budget {
        return Err(Refused::OverBudget(reason));
    }
    let mut diagnostics = compiler.diagnostics;
    diagnostics.sort_by_key(|d| (d.span, d.severity));
    match parts {
        Some(parts) if diagnostics.iter().all(|d| d.severity != crate::diag::Severity::Error) => {
            Ok((parts.into_policy(), diagnostics))
        }
        _ => {
            diagnostics.retain(|d| d.severity == crate::diag::Severity::Error);
            Err(Refused::Invalid(diagnostics))
        }
    }
}

struct Parts {
    default: Decision,
    default_reason: Option<String>,
    risk: Vec<RiskClass>,
    rules: Vec<Rule>,
    terraform: Vec<TerraformTopic>,
    schemas: PayloadSchemas,
    /// Each rule's canonical bytes, in rule order.
    canonical_rules: Vec<Vec<u8>>,
}

impl Parts {
    /// Hashes the canonical form `{"defaults", "risk", "rules", "schemas"?, "terraform"?,
    /// "version"}` (keys in RFC 8785 order; `schemas` and `terraform` only when the policy has
    /// them, so that older policies keep their hash) by streaming each rule's canonical bytes into the digest, so that a large policy
    /// is never held as one JSON tree.
    fn into_policy(self) -> Policy {
        use sha2::{Digest, Sha256};
        let defaults = json!({"decision": self.default.as_str(), "reason": self.default_reason});
        let risk: Map<String, Value> = self
            .risk
            .iter()
            .map(|c| (c.name.clone(), sorted(c.topics.iter().map(|g| json!(g.as_str())).collect())))
            .collect();
        let mut digest = Sha256::new();
        digest.update(b"{\"defaults\":");
        digest.update(jcs::to_vec(&defaults));
        digest.update(b",\"risk\":");
        digest.update(jcs::to_vec(&Value::Object(risk)));
        digest.update(b",\"rules\":[");
        for (i, bytes) in self.canonical_rules.iter().enumerate() {
            if i > 0 {
                digest.update(b",");
            }
            digest.update(bytes);
        }
        digest.update(b"]");
        if !self.schemas.is_empty() {
            digest.update(b",\"schemas\":");
            digest.update(jcs::to_vec(&self.schemas.canonical()));
        }
        if !self.terraform.is_empty() {
            let topics: Vec<Value> =
                self.terraform.iter().map(|t| json!([t.pattern.as_str(), t.topic])).collect();
            digest.update(b",\"terraform\":");
            digest.update(jcs::to_vec(&json!({"topics": topics})));
        }
        digest.update(b",\"version\":\"v1\"}");
        let hash = tagged(&digest.finalize());
        Policy::new(
            self.default,
            self.default_reason,
            self.risk,
            self.rules,
            self.terraform,
            self.schemas,
            hash,
        )
    }
}

#[derive(Default)]
struct Compiler<'a> {
    diagnostics: Vec<Diagnostic>,
    canonical_rules: Vec<Vec<u8>>,
    risk_names: Vec<String>,
    /// What the policy's regexes may take in all, and still, in bytes.
    regex_bytes_max: usize,
    regex_bytes_left: usize,
    /// The caller's deadline ([`Budget::time_left`]).
    time_left: Option<&'a mut dyn FnMut() -> bool>,
    /// Why the compilation stopped over its budget.
    over_budget: Option<String>,
}

type Entries<'a> = &'a [(Key, Node)];

impl Compiler<'_> {
    fn error(&mut self, span: Span, message: impl Into<String>) {
        self.diagnostics.push(Diagnostic::error(span, message));
    }

    fn error_help(&mut self, span: Span, message: impl Into<String>, help: impl Into<String>) {
        self.diagnostics.push(Diagnostic::error(span, message).with_help(help));
    }

    fn map<'a>(&mut self, node: &'a Node, what: &str) -> Option<Entries<'a>> {
        match &node.kind {
            Kind::Map(entries) => Some(entries),
            other => {
                self.error(node.span, format!("{what} must be a map, found {}", other.describe()));
                None
            }
        }
    }

    fn string(&mut self, node: &Node, what: &str) -> Option<String> {
        match &node.kind {
            Kind::Str(s) => Some(s.clone()),
            other => {
                self.error(node.span, format!("{what} must be a string, found {}", other.describe()));
                None
            }
        }
    }

    fn unknown_keys(&mut self, entries: Entries<'_>, allowed: &[&str], what: &str) {
        for (key, _) in entries {
            if !allowed.contains(&key.text.as_str()) {
                let help = match suggest(&key.text, allowed) {
                    Some(s) => format!("did you mean `{s}`?"),
                    None => format!("expected {}", one_of(allowed)),
                };
                self.error_help(key.span, format!("unknown key `{}` in {what}", key.text), help);
            }
        }
    }

    fn document(&mut self, root: &Node) -> Option<Parts> {
        let entries = self.map(root, "a policy")?;
        self.unknown_keys(entries, &TOP_KEYS, "the policy");
        match get(entries, "version") {
            None => {
                self.error_help(Span { line: 1, col: 1 }, "missing `version`", "add `version: v1` at the top")
            }
            Some(node) => match &node.kind {
                Kind::Str(v) if v == "v1" => {}
                other => {
                    let found = match other {
                        Kind::Str(s) => format!("`{s}`"),
                        k => k.describe().to_owned(),
                    };
                    self.error_help(
                        node.span,
                        format!("unsupported version {found}"),
                        "the only version is `v1`",
                    );
                }
            },
        }
        let (default, default_reason) = match get(entries, "defaults") {
            None => (Decision::Allow, None),
            Some(node) => self.defaults(node),
        };
        let risk = get(entries, "risk").map(|n| self.risk(n)).unwrap_or_default();
        let rules = match get(entries, "rules") {
            None => Vec::new(),
            Some(node) => self.rules(node),
        };
        let terraform = get(entries, "terraform").map(|n| self.terraform(n)).unwrap_or_default();
        let schemas = get(entries, "schemas").map(|n| self.schemas(n)).unwrap_or_default();
        Some(Parts {
            default,
            default_reason,
            risk,
            rules,
            terraform,
            schemas,
            canonical_rules: std::mem::take(&mut self.canonical_rules),
        })
    }

    fn defaults(&mut self, node: &Node) -> (Decision, Option<String>) {
        let Some(entries) = self.map(node, "`defaults`") else {
            return (Decision::Allow, None);
        };
        self.unknown_keys(entries, &DEFAULTS_KEYS, "`defaults`");
        let decision = match get(entries, "decision") {
            Some(n) => self.decision(n).unwrap_or(Decision::Allow),
            None => Decision::Allow,
        };
        let reason = get(entries, "reason").and_then(|n| self.string(n, "`reason`"));
        (decision, reason)
    }

    fn decision(&mut self, node: &Node) -> Option<Decision> {
        let text = self.string(node, "`decision`")?;
        let decision = Decision::parse(&text);
        if decision.is_none() {
            let help = match suggest(&text, &DECISIONS) {
                Some(s) => format!("did you mean `{s}`?"),
                None => format!("expected {}", one_of(&DECISIONS)),
            };
            self.error_help(node.span, format!("unknown decision `{text}`"), help);
        }
        decision
    }

    fn risk(&mut self, node: &Node) -> Vec<RiskClass> {
        let Some(entries) = self.map(node, "`risk`") else {
            return Vec::new();
        };
        let mut classes = Vec::new();
        for (key, value) in entries {
            let topics = self.string_list(value, &format!("risk class `{}`", key.text));
            let topics = topics.into_iter().filter_map(|(span, pattern)| self.glob(span, &pattern)).collect();
            self.risk_names.push(key.text.clone());
            classes.push(RiskClass { name: key.text.clone(), topics });
        }
        classes
    }

    /// `terraform: {topics: {PATTERN: TOPIC}}`: which topic a Terraform resource change is
    /// evaluated under. A pattern without a dot is a glob over the resource type and its topic
    /// gets the action appended (`aws_security_group: infra.security_group` gives
    /// `infra.security_group.update`); a pattern with a dot is matched against `TYPE.ACTION`
    /// and names the whole topic. The first matching pattern in file order wins.
    fn terraform(&mut self, node: &Node) -> Vec<TerraformTopic> {
        let Some(entries) = self.map(node, "`terraform`") else {
            return Vec::new();
        };
        self.unknown_keys(entries, &TERRAFORM_KEYS, "`terraform`");
        let Some(topics) = get(entries, "topics") else {
            return Vec::new();
        };
        let Some(topics) = self.map(topics, "`terraform.topics`") else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (key, value) in topics {
            let pattern = self.glob(key.span, &key.text);
            let topic = self.string(value, &format!("the topic of `{}`", key.text)).filter(|t| {
                let ok = !t.is_empty()
                    && t.split('.').all(|s| {
                        !s.is_empty()
                            && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
                    });
                if !ok {
                    self.error_help(
                        value.span,
                        format!("`{t}` is not a topic"),
                        "write dotted segments of letters, digits, `_` and `-`, e.g. `infra.security_group`",
                    );
                }
                ok
            });
            if let (Some(pattern), Some(topic)) = (pattern, topic) {
                out.push(TerraformTopic { whole: key.text.contains('.'), pattern, topic });
            }
        }
        out
    }

    /// `schemas: {PATTERN: SCHEMA}`: the JSON Schema (draft 2020-12) a payload of a topic
    /// matching PATTERN must satisfy; every matching pattern's schema applies. Their regexes
    /// (`pattern`, `patternProperties`) count against the policy's regex budget.
    fn schemas(&mut self, node: &Node) -> PayloadSchemas {
        let Some(entries) = self.map(node, "`schemas`") else {
            return PayloadSchemas::default();
        };
        let mut compiled = Vec::new();
        let mut spans = Vec::new();
        for (key, value) in entries {
            let pattern = self.glob(key.span, &key.text);
            if !matches!(value.kind, Kind::Map(_) | Kind::Bool(_)) {
                let what = format!("the schema of `{}`", key.text);
                self.error(
                    value.span,
                    format!("{what} must be a map or a boolean, found {}", value.kind.describe()),
                );
                continue;
            }
            let schema = value.to_json();
            self.charge_schema_regexes(&schema);
            if let Some(pattern) = pattern {
                compiled.push((pattern, schema));
                spans.push((value.span, key.text.clone()));
            }
        }
        match PayloadSchemas::compile(compiled) {
            Ok(schemas) => schemas,
            Err(errors) => {
                for (i, message) in errors {
                    if let Some((span, pattern)) = spans.get(i) {
                        self.error_help(
                            *span,
                            format!("the schema of `{pattern}` is not a valid JSON Schema: {message}"),
                            "write a JSON Schema (draft 2020-12) in YAML; `$ref` may only point inside it",
                        );
                    }
                }
                PayloadSchemas::default()
            }
        }
    }

    /// Charges the regexes of a schema (`pattern` strings, `patternProperties` keys) to the
    /// policy's regex budget, as a rule's `regex` is.
    fn charge_schema_regexes(&mut self, schema: &Value) {
        match schema {
            Value::Object(map) => {
                for (key, value) in map {
                    match (key.as_str(), value) {
                        ("pattern", Value::String(p)) => {
                            self.charge_regex(p);
                        }
                        ("patternProperties", Value::Object(props)) => {
                            for p in props.keys() {
                                self.charge_regex(p);
                            }
                        }
                        _ => {}
                    }
                    self.charge_schema_regexes(value);
                }
            }
            Value::Array(items) => items.iter().for_each(|v| self.charge_schema_regexes(v)),
            _ => {}
        }
    }

    fn string_list(&mut self, node: &Node, what: &str) -> Vec<(Span, String)> {
        match &node.kind {
            Kind::Str(s) => vec![(node.span, s.clone())],
            Kind::Seq(items) => items
                .iter()
                .filter_map(|item| {
                    self.string(item, &format!("each entry of {what}")).map(|s| (item.span, s))
                })
                .collect(),
            other => {
                self.error(
                    node.span,
                    format!("{what} must be a string or a list of strings, found {}", other.describe()),
                );
                Vec::new()
            }
        }
    }

    fn glob(&mut self, span: Span, pattern: &str) -> Option<Glob> {
        Glob::new(pattern).map_err(|e| self.error(span, format!("invalid glob: {e}"))).ok()
    }

    fn rules(&mut self, node: &Node) -> Vec<Rule> {
        let Kind::Seq(items) = &node.kind else {
            self.error(node.span, format!("`rules` must be a list, found {}", node.kind.describe()));
            return Vec::new();
        };
        if items.len() > RULES_MAX {
            self.error(node.span, format!("{} rules; at most {RULES_MAX} are allowed", items.len()));
            return Vec::new();
        }
        let mut seen: rustc_hash::FxHashMap<String, Span> = rustc_hash::FxHashMap::default();
        let mut rules = Vec::with_capacity(items.len());
        for (at, item) in (1..).zip(items) {
            if self.time_left.as_mut().is_some_and(|time_left| !time_left()) {
                self.over_budget = Some(format!(
                    "compiling the policy took longer than its time budget (stopped before rule {at} of {})",
                    items.len()
                ));
            }
            if self.over_budget.is_some() {
                break;
            }
            if let Some(rule) = self.rule(item) {
                if let Some(first) = seen.get(&rule.id) {
                    self.error_help(
                        rule.span,
                        format!("duplicate rule id `{}`", rule.id),
                        format!("first defined at line {}; ids must be unique", first.line),
                    );
                } else {
                    seen.insert(rule.id.clone(), rule.span);
                }
                rules.push(rule);
            }
        }
        rules
    }

    fn rule(&mut self, node: &Node) -> Option<Rule> {
        let entries = self.map(node, "a rule")?;
        self.unknown_keys(entries, &RULE_KEYS, "a rule");
        let id = match get(entries, "id") {
            None => {
                self.error_help(node.span, "rule without `id`", "every rule needs a unique `id`");
                None
            }
            Some(n) => self.string(n, "`id`").filter(|id| {
                let ok = !id.is_empty()
                    && id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
                if !ok {
                    self.error(n.span, format!("rule id `{id}` must be letters, digits, `-`, `_` or `.`"));
                }
                ok
            }),
        };
        let when = match get(entries, "when") {
            None => {
                self.error_help(node.span, "rule without `when`", "write `when: {}` to match every job");
                None
            }
            Some(n) => self.when(n, 0),
        };
        let decision = match get(entries, "decision") {
            None => {
                self.error_help(
                    node.span,
                    "rule without `decision`",
                    format!("expected {}", one_of(&DECISIONS)),
                );
                None
            }
            Some(n) => self.decision(n),
        };
        let mode = match get(entries, "mode") {
            None => Some(Mode::Enforce),
            Some(n) => match self.string(n, "`mode`").as_deref() {
                Some("enforce") => Some(Mode::Enforce),
                Some("audit") => Some(Mode::Audit),
                Some(other) => {
                    self.error_help(
                        n.span,
                        format!("unknown mode `{other}`"),
                        "expected `enforce` or `audit`",
                    );
                    None
                }
                None => None,
            },
        };
        let reason = get(entries, "reason").and_then(|n| self.string(n, "`reason`"));
        let limit = match (get_entry(entries, "limit"), decision) {
            (Some((k, _)), Some(d)) if d != Decision::Throttle => {
                self.error(k.span, format!("`limit` only applies to `throttle` rules, not `{d}`"));
                None
            }
            (Some((_, n)), _) => self.limit(n),
            (None, _) => Some(Limit {
                rate: THROTTLE_DEFAULT_RATE,
                per_secs: THROTTLE_DEFAULT_PER_SECS,
                burst: THROTTLE_DEFAULT_RATE,
                key: vec![LimitKey::Tenant, LimitKey::Topic],
            }),
        };
        let approvals = match (get_entry(entries, "approvals"), decision) {
            (Some((k, _)), Some(d)) if d != Decision::RequireHuman => {
                self.error(k.span, format!("`approvals` only applies to `require_human` rules, not `{d}`"));
                None
            }
            (Some((_, n)), _) => {
                self.count(n, "`approvals`", u64::from(APPROVALS_MAX)).and_then(|c| u32::try_from(c).ok())
            }
            (None, _) => Some(1),
        };
        let (id, when, decision, mode, limit, approvals) = (id?, when?, decision?, mode?, limit?, approvals?);
        let mut rule = Rule {
            id,
            span: node.span,
            when: flatten(when),
            decision,
            mode,
            reason,
            limit: (decision == Decision::Throttle).then_some(limit),
            approvals: if decision == Decision::RequireHuman { approvals } else { 1 },
            hash: String::new(),
        };
        let canonical = jcs::to_vec(&canonical_rule(&rule));
        rule.hash = sha256_tagged(&canonical);
        self.canonical_rules.push(canonical);
        Some(rule)
    }

    fn count(&mut self, node: &Node, what: &str, max: u64) -> Option<u64> {
        match node.kind {
            Kind::Int(n) if n >= 1 && n.unsigned_abs() <= max => Some(n.unsigned_abs()),
            Kind::Int(n) => {
                self.error(node.span, format!("{what} must be between 1 and {max}, found `{n}`"));
                None
            }
            ref other => {
                self.error(
                    node.span,
                    format!("{what} must be a positive integer, found {}", other.describe()),
                );
                None
            }
        }
    }

    fn limit(&mut self, node: &Node) -> Option<Limit> {
        let entries = self.map(node, "`limit`")?;
        self.unknown_keys(entries, &LIMIT_KEYS, "`limit`");
        let rate = match get(entries, "rate") {
            None => {
                self.error_help(node.span, "`limit` without `rate`", "e.g. `limit: { rate: 1, per: 10m }`");
                None
            }
            Some(n) => self.count(n, "`limit.rate`", u64::from(u32::MAX)).and_then(|r| u32::try_from(r).ok()),
        };
        let per_secs = match get(entries, "per") {
            None => Some(THROTTLE_DEFAULT_PER_SECS),
            Some(n) => self.duration(n),
        };
        let burst = match get(entries, "burst") {
            None => rate,
            Some(n) => {
                self.count(n, "`limit.burst`", u64::from(u32::MAX)).and_then(|b| u32::try_from(b).ok())
            }
        };
        let key = match get(entries, "key") {
            None => Some(vec![LimitKey::Tenant, LimitKey::Topic]),
            Some(n) => {
                let mut keys = Vec::new();
                let mut ok = true;
                for (span, name) in self.string_list(n, "`limit.key`") {
                    match LimitKey::ALL.into_iter().find(|k| k.as_str() == name) {
                        Some(k) => keys.push(k),
                        None => {
                            ok = false;
                            let names: Vec<&str> = LimitKey::ALL.iter().map(|k| k.as_str()).collect();
                            self.error_help(
                                span,
                                format!("unknown limit key `{name}`"),
                                format!("expected {}", one_of(&names)),
                            );
                        }
                    }
                }
                keys.sort();
                keys.dedup();
                ok.then_some(keys)
            }
        };
        Some(Limit { rate: rate?, per_secs: per_secs?, burst: burst?, key: key? })
    }

    /// `30s`, `10m`, `2h`, `1d`, or a plain number of seconds.
    fn duration(&mut self, node: &Node) -> Option<u64> {
        let seconds = match &node.kind {
            Kind::Int(n) if *n > 0 => Some(n.unsigned_abs()),
            Kind::Str(s) => {
                let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
                let factor = match unit {
                    "s" | "" => Some(1),
                    "m" => Some(60),
                    "h" => Some(3600),
                    "d" => Some(86_400),
                    _ => None,
                };
                digits.parse::<u64>().ok().filter(|n| *n > 0).zip(factor).and_then(|(n, f)| n.checked_mul(f))
            }
            _ => None,
        };
        match seconds {
            Some(s) if s <= THROTTLE_PER_MAX_SECS => Some(s),
            Some(_) => {
                self.error(node.span, format!("`limit.per` is longer than {THROTTLE_PER_MAX_SECS} seconds"));
                None
            }
            None => {
                self.error_help(
                    node.span,
                    "`limit.per` must be a positive duration",
                    "write e.g. `30s`, `10m`, `2h` or `1d`",
                );
                None
            }
        }
    }

    fn when(&mut self, node: &Node, depth: usize) -> Option<Vec<Cond>> {
        if depth > CONDITION_DEPTH_MAX {
            self.error(node.span, format!("conditions nested deeper than {CONDITION_DEPTH_MAX} levels"));
            return None;
        }
        let entries = self.map(node, "`when`")?;
        let mut conds = Vec::new();
        let mut ok = true;
        for (key, value) in entries {
            let parsed = match key.text.as_str() {
                "topic" => self.field(Field::Topic, value),
                "env" => self.field(Field::Env, value),
                "tenant" => self.field(Field::Tenant, value),
                "principal" => self.field(Field::Principal, value),
                "risk" => self.field(Field::Risk, value),
                "labels" => self.fields(value, "`labels`", |name| Ok(Field::Label(name.to_owned()))),
                "payload" => self.fields(value, "`payload`", |path| {
                    Path::parse(path).map(Field::Payload).map_err(|e| format!("invalid payload path: {e}"))
                }),
                "all" | "any" => {
                    let children = self.cond_list(value, &key.text, depth);
                    children.map(|c| if key.text == "all" { Cond::All(c) } else { Cond::Any(c) })
                }
                "not" => self.when(value, depth + 1).map(|c| Cond::Not(Box::new(Cond::All(c)))),
                shorthand => {
                    let lookalike = LOOKALIKES.iter().find(|(name, _)| suggest(shorthand, &[name]).is_some());
                    let reserved = suggest(shorthand, &RESERVED_WHEN_KEYS).or(lookalike.map(|(_, key)| *key));
                    if let Some(reserved) = reserved {
                        self.diagnostics.push(
                            Diagnostic::warning(
                                key.span,
                                format!("`{shorthand}` is read as `payload.{shorthand}`"),
                            )
                            .with_help(format!("did you mean `{reserved}`?")),
                        );
                    }
                    match Path::parse(shorthand) {
                        Ok(path) => self.field(Field::Payload(path), value),
                        Err(e) => {
                            self.error(key.span, format!("invalid payload path: {e}"));
                            None
                        }
                    }
                }
            };
            match parsed {
                Some(cond) => conds.push(cond),
                None => ok = false,
            }
        }
        ok.then_some(conds)
    }

    fn cond_list(&mut self, node: &Node, name: &str, depth: usize) -> Option<Vec<Cond>> {
        let Kind::Seq(items) = &node.kind else {
            self.error(
                node.span,
                format!("`{name}` must be a list of conditions, found {}", node.kind.describe()),
            );
            return None;
        };
        let mut out = Vec::new();
        let mut ok = true;
        for item in items {
            match self.when(item, depth + 1) {
                Some(c) => out.push(Cond::All(c)),
                None => ok = false,
            }
        }
        ok.then_some(out)
    }

    /// `labels:` and `payload:` — a map from label name or path to a value test.
    fn fields(
        &mut self,
        node: &Node,
        what: &str,
        field: impl Fn(&str) -> Result<Field, String>,
    ) -> Option<Cond> {
        let entries = self.map(node, what)?;
        let mut conds = Vec::new();
        let mut ok = true;
        for (key, value) in entries {
            let parsed = match field(&key.text) {
                Ok(f) => self.field(f, value),
                Err(message) => {
                    self.error(key.span, message);
                    None
                }
            };
            match parsed {
                Some(c) => conds.push(c),
                None => ok = false,
            }
        }
        ok.then_some(Cond::All(conds))
    }

    fn field(&mut self, field: Field, node: &Node) -> Option<Cond> {
        let is_name =
            matches!(field, Field::Topic | Field::Env | Field::Tenant | Field::Principal | Field::Risk);
        let tests = match &node.kind {
            Kind::Map(ops) => self.operators(&field, ops, node.span)?,
            Kind::Seq(items) if is_name => vec![self.names(&field, items)?],
            Kind::Str(_) if is_name => vec![self.names(&field, std::slice::from_ref(node))?],
            other if is_name => {
                self.error(
                    node.span,
                    format!(
                        "`{field}` must be a string, a list of strings or an operator map, found {}",
                        other.describe()
                    ),
                );
                return None;
            }
            Kind::Seq(items) => vec![Test::Equals(self.literals(items, &field)?)],
            _ => vec![Test::Equals(vec![self.literal(node, &field)?])],
        };
        Some(Cond::Field { field, tests, span: node.span })
    }

    /// A name field's value: exact names and globs; risk classes must exist.
    fn names(&mut self, field: &Field, items: &[Node]) -> Option<Test> {
        let mut globs = Vec::new();
        let mut ok = true;
        for item in items {
            let Some(text) = self.string(item, &format!("`{field}`")) else {
                ok = false;
                continue;
            };
            if *field == Field::Risk && !self.risk_names.contains(&text) {
                ok = false;
                let help = if self.risk_names.is_empty() {
                    "define classes under the top-level `risk` key".to_owned()
                } else {
                    let names: Vec<&str> = self.risk_names.iter().map(String::as_str).collect();
                    format!("defined classes: {}", one_of(&names))
                };
                self.error_help(item.span, format!("unknown risk class `{text}`"), help);
                continue;
            }
            if matches!(field, Field::Topic | Field::Env | Field::Tenant)
                && text != text.trim().to_ascii_lowercase()
            {
                self.diagnostics.push(
                    Diagnostic::warning(
                        item.span,
                        format!(
                            "`{text}` can never match: `{field}` values are trimmed and lower-cased before \
                             any rule sees them"
                        ),
                    )
                    .with_help(format!("write `{}`", text.trim().to_ascii_lowercase())),
                );
            }
            match self.glob(item.span, &text) {
                Some(g) => globs.push(g),
                None => ok = false,
            }
        }
        ok.then_some(Test::Globs(globs))
    }

    fn literal(&mut self, node: &Node, field: &Field) -> Option<Literal> {
        if !matches!(field, Field::Payload(_)) && !matches!(node.kind, Kind::Str(_)) {
            let help = match &node.kind {
                Kind::Int(_) | Kind::Float(_) | Kind::Bool(_) | Kind::Null => {
                    format!("`{field}` is always a string; quote the value, e.g. `\"{}\"`", node.to_json())
                }
                _ => format!("`{field}` is always a string"),
            };
            self.error_help(
                node.span,
                format!("`{field}` compares against a string, found {}", node.kind.describe()),
                help,
            );
            return None;
        }
        match &node.kind {
            Kind::Null => Some(Literal::Null),
            Kind::Bool(b) => Some(Literal::Bool(*b)),
            Kind::Int(i) => Some(Literal::Int(*i)),
            Kind::Float(f) if f.is_finite() => Some(Literal::Float(*f)),
            Kind::Str(s) => {
                self.lookalike_warning(node.span, field, s);
                Some(Literal::Str(s.clone()))
            }
            other => {
                let found =
                    if matches!(other, Kind::Float(_)) { "a non-finite number" } else { other.describe() };
                self.error_help(
                    node.span,
                    format!("`{field}` compares against a scalar, found {found}"),
                    "use a string, number, boolean or null; match nested values with a dotted path",
                );
                None
            }
        }
    }

    /// Warns on an equality test whose literal is a network or a number written as a string:
    /// a deny rule written that way lets through every variant that is another string for the
    /// same thing (` 0.0.0.0/0`, `0.0.0.0/00`, `::/0`; `100` for `"100"`).
    fn lookalike_warning(&mut self, span: Span, field: &Field, text: &str) {
        if Net::parse_lenient(text.trim()).is_ok() {
            self.diagnostics.push(
                Diagnostic::warning(
                    span,
                    format!(
                        "`{field}` is compared as text with `{text}`, which is a network: variants such as \
                         ` {text}`, a zero-padded prefix or the IPv6 form are other strings and slip past"
                    ),
                )
                .with_help("use `{ cidr_overlaps: ... }` or `{ cidr_within: ... }`, which compare networks"),
            );
        } else if matches!(field, Field::Payload(_)) && text.trim().parse::<f64>().is_ok() {
            self.diagnostics.push(
                Diagnostic::warning(
                    span,
                    format!("`{field}` is compared with the string `\"{text}\"`, which is a number: the JSON number is another value and slips past"),
                )
                .with_help("compare numbers with an unquoted literal or `gte`/`lte`"),
            );
        }
    }

    fn literals(&mut self, items: &[Node], field: &Field) -> Option<Vec<Literal>> {
        let mut out = Vec::new();
        let mut ok = true;
        for item in items {
            match self.literal(item, field) {
                Some(l) => out.push(l),
                None => ok = false,
            }
        }
        ok.then_some(out)
    }

    fn operators(&mut self, field: &Field, ops: Entries<'_>, span: Span) -> Option<Vec<Test>> {
        if ops.is_empty() {
            self.error_help(
                span,
                format!("empty operator map for `{field}`"),
                format!("use one of {}", one_of(&OPERATORS)),
            );
            return None;
        }
        let mut tests = Vec::new();
        let mut ok = true;
        for (key, value) in ops {
            match self.operator(field, key, value) {
                Some(t) => tests.push(t),
                None => ok = false,
            }
        }
        ok.then_some(tests)
    }

    /// Charges a regex to the policy's regex budget: its compiled automaton (measured by
    /// building it, as the `regex` crate would) and a fixed overhead. `None` once the budget is
    /// spent (a pattern that does not compile is left to the `regex` crate to report).
    fn charge_regex(&mut self, pattern: &str) -> Option<()> {
        use regex_automata::nfa::thompson;
        if self.over_budget.is_some() {
            return None;
        }
        let limit = REGEX_SIZE_MAX.min(self.regex_bytes_left);
        let built = thompson::Compiler::new()
            .configure(thompson::Config::new().nfa_size_limit(Some(limit)))
            .build(pattern);
        let cost = match built {
            Ok(nfa) => nfa.memory_usage().saturating_mul(2).saturating_add(REGEX_OVERHEAD_BYTES),
            Err(e) if e.size_limit().is_some() && limit < REGEX_SIZE_MAX => usize::MAX,
            Err(_) => return Some(()),
        };
        match self.regex_bytes_left.checked_sub(cost) {
            Some(left) => {
                self.regex_bytes_left = left;
                Some(())
            }
            None => {
                self.over_budget = Some(format!(
                    "the policy's regexes need more than their budget of {} bytes compiled (at `{}`)",
                    self.regex_bytes_max,
                    pattern.chars().take(60).collect::<String>()
                ));
                None
            }
        }
    }

    fn operator(&mut self, field: &Field, key: &Key, value: &Node) -> Option<Test> {
        let list = |node: &Node| match &node.kind {
            Kind::Seq(items) => items.clone(),
            _ => vec![node.clone()],
        };
        match key.text.as_str() {
            "glob" if *field == Field::Risk => {
                self.error(key.span, "`risk` takes class names, not globs");
                None
            }
            "glob" => self.names(field, &list(value)),
            "regex" => {
                let pattern = self.string(value, "`regex`")?;
                self.charge_regex(&pattern)?;
                RegexBuilder::new(&pattern)
                    .size_limit(REGEX_SIZE_MAX)
                    .dfa_size_limit(REGEX_DFA_CACHE_BYTES)
                    .build()
                    .map(Test::Regex)
                    .map_err(|e| {
                        let detail = e.to_string();
                        let last = detail.lines().last().unwrap_or_default().trim();
                        let message =
                            last.strip_prefix("error: ").unwrap_or(last).trim_end_matches('.').to_lowercase();
                        self.error(value.span, format!("invalid regex `{pattern}`: {message}"));
                    })
                    .ok()
            }
            "in" => self.literals(&list(value), field).map(Test::Equals),
            "not_in" => self.literals(&list(value), field).map(Test::NotIn),
            "gt" | "gte" | "lt" | "lte" if !matches!(field, Field::Payload(_)) => {
                self.error(
                    key.span,
                    format!("`{field}` is always a string; `{}` compares numbers", key.text),
                );
                None
            }
            "gt" | "gte" | "lt" | "lte" => {
                let n = match value.kind {
                    Kind::Int(i) => i as f64,
                    Kind::Float(f) if f.is_finite() => f,
                    ref other => {
                        self.error(
                            value.span,
                            format!("`{}` needs a number, found {}", key.text, other.describe()),
                        );
                        return None;
                    }
                };
                Some(match key.text.as_str() {
                    "gt" => Test::Gt(n),
                    "gte" => Test::Gte(n),
                    "lt" => Test::Lt(n),
                    _ => Test::Lte(n),
                })
            }
            "exists" => match value.kind {
                Kind::Bool(b) => Some(Test::Exists(b)),
                ref other => {
                    self.error(
                        value.span,
                        format!("`exists` needs `true` or `false`, found {}", other.describe()),
                    );
                    None
                }
            },
            "contains" => self.literal(value, field).map(Test::Contains),
            "cidr_within" | "cidr_overlaps" => {
                let mut nets = Vec::new();
                for (span, text) in self.string_list(value, &format!("`{}`", key.text)) {
                    match Net::parse_strict(&text) {
                        Ok(net) => nets.push(net),
                        Err(e) => self.error(span, format!("invalid CIDR: {e}")),
                    }
                }
                if nets.is_empty() {
                    return None;
                }
                Some(if key.text == "cidr_within" {
                    Test::CidrWithin(nets)
                } else {
                    Test::CidrOverlaps(nets)
                })
            }
            other => {
                let help = match suggest(other, &OPERATORS) {
                    Some(s) => format!("did you mean `{s}`?"),
                    None => format!(
                        "expected {}; to match a nested payload field, write its dotted path (`a.b: value`)",
                        one_of(&OPERATORS)
                    ),
                };
                self.error_help(key.span, format!("unknown operator `{other}` for `{field}`"), help);
                None
            }
        }
    }
}

fn get<'a>(entries: Entries<'a>, name: &str) -> Option<&'a Node> {
    get_entry(entries, name).map(|(_, v)| v)
}

fn get_entry<'a>(entries: Entries<'a>, name: &str) -> Option<(&'a Key, &'a Node)> {
    entries.iter().find(|(k, _)| k.text == name).map(|(k, v)| (k, v))
}

/// Lifts the members of nested `all`s into one conjunction, so that the index and the
/// analysis see every top-level field test.
fn flatten(conds: Vec<Cond>) -> Vec<Cond> {
    let mut out = Vec::with_capacity(conds.len());
    for cond in conds {
        match cond {
            Cond::All(inner) => out.extend(flatten(inner)),
            other => out.push(other),
        }
    }
    out
}

/// The canonical JSON of a rule: what its hash is over.
pub(crate) fn canonical_rule(rule: &Rule) -> Value {
    let mut object = Map::new();
    object.insert("id".into(), json!(rule.id));
    object.insert("decision".into(), json!(rule.decision.as_str()));
    object.insert("mode".into(), json!(rule.mode.as_str()));
    object.insert("reason".into(), json!(rule.reason));
    object.insert("when".into(), canonical_all(&rule.when));
    if let Some(limit) = &rule.limit {
        object.insert(
            "limit".into(),
            json!({
                "rate": limit.rate,
                "per_secs": limit.per_secs,
                "burst": limit.burst,
                "key": limit.key.iter().map(|k| k.as_str()).collect::<Vec<_>>(),
            }),
        );
    }
    if rule.decision == Decision::RequireHuman {
        object.insert("approvals".into(), json!(rule.approvals));
    }
    Value::Object(object)
}

/// Conjunctions and disjunctions are sets: their members are sorted by canonical bytes, so
/// that the order keys were written in never changes a hash.
fn canonical_all(conds: &[Cond]) -> Value {
    sorted(conds.iter().map(canonical_cond).collect())
}

fn sorted(mut values: Vec<Value>) -> Value {
    values.sort_by_cached_key(jcs::to_vec);
    values.dedup();
    Value::Array(values)
}

pub(crate) fn canonical_cond(cond: &Cond) -> Value {
    match cond {
        Cond::Field { field, tests, .. } => {
            json!({"field": field.to_string(), "tests": sorted(tests.iter().map(canonical_test).collect())})
        }
        Cond::All(c) => json!({"all": canonical_all(c)}),
        Cond::Any(c) => json!({"any": canonical_all(c)}),
        Cond::Not(c) => json!({"not": canonical_cond(c)}),
    }
}

pub(crate) fn canonical_test(test: &Test) -> Value {
    let literals = |ls: &[Literal]| sorted(ls.iter().map(canonical_literal).collect());
    let nets = |ns: &[Net]| sorted(ns.iter().map(|n| json!(n.to_string())).collect());
    match test {
        Test::Equals(ls) => json!({"equals": literals(ls)}),
        Test::Globs(gs) => json!({"globs": sorted(gs.iter().map(|g| json!(g.as_str())).collect())}),
        Test::Regex(r) => json!({"regex": r.as_str()}),
        Test::NotIn(ls) => json!({"not_in": literals(ls)}),
        Test::Gt(n) => json!({"gt": n}),
        Test::Gte(n) => json!({"gte": n}),
        Test::Lt(n) => json!({"lt": n}),
        Test::Lte(n) => json!({"lte": n}),
        Test::Exists(b) => json!({"exists": b}),
        Test::Contains(l) => json!({"contains": canonical_literal(l)}),
        Test::CidrWithin(ns) => json!({"cidr_within": nets(ns)}),
        Test::CidrOverlaps(ns) => json!({"cidr_overlaps": nets(ns)}),
    }
}

/// A literal in the canonical form. Integers a double cannot hold exactly are tagged strings,
/// so that two integers that compare differently never hash alike.
fn canonical_literal(literal: &Literal) -> Value {
    const EXACT_MAX: u64 = 1 << 53;
    match literal {
        Literal::Int(i) if i.unsigned_abs() > EXACT_MAX => json!({"int": i.to_string()}),
        other => literal_json(other),
    }
}

/// A literal as JSON, for display.
pub(crate) fn literal_json(literal: &Literal) -> Value {
    match literal {
        Literal::Null => Value::Null,
        Literal::Bool(b) => json!(b),
        Literal::Int(i) => json!(i),
        Literal::Float(f) => json!(f),
        Literal::Str(s) => json!(s),
    }
}
