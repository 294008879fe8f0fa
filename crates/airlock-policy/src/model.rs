//! The compiled policy: decisions, rules and conditions as types, with nothing left as text
//! that evaluation would have to parse again.

use std::fmt;

use regex::Regex;

use crate::cidr::Net;
use crate::diag::Span;
use crate::glob::Glob;
use crate::path::Path;

/// What a policy decides for a job, ordered from least to most restrictive, so that `max`
/// is the precedence of SPEC 3.3: `deny` > `require_human` > `throttle` > `allow`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Decision {
    /// Go ahead.
    Allow,
    /// Go ahead within a token-bucket budget.
    Throttle,
    /// Go ahead only with a human approval bound to this job and snapshot.
    RequireHuman,
    /// Never.
    Deny,
}

impl Decision {
    /// Every decision, in order of restrictiveness.
    pub const ALL: [Decision; 4] = [Self::Allow, Self::Throttle, Self::RequireHuman, Self::Deny];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Throttle => "throttle",
            Self::RequireHuman => "require_human",
            Self::Deny => "deny",
        }
    }

    /// Parses a wire name.
    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|d| d.as_str() == text)
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether a rule's decision is applied or only recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// The rule decides.
    Enforce,
    /// The rule is evaluated and reported as "would have decided", never applied.
    Audit,
}

impl Mode {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Enforce => "enforce",
            Self::Audit => "audit",
        }
    }
}

/// What a throttle budget is counted per.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LimitKey {
    /// The job's tenant.
    Tenant,
    /// The job's topic.
    Topic,
    /// The job's env.
    Env,
    /// The submitting principal.
    Principal,
}

impl LimitKey {
    /// Every key, for messages.
    pub const ALL: [LimitKey; 4] = [Self::Tenant, Self::Topic, Self::Env, Self::Principal];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tenant => "tenant",
            Self::Topic => "topic",
            Self::Env => "env",
            Self::Principal => "principal",
        }
    }
}

/// A token-bucket budget: `rate` tokens per `per_secs`, holding at most `burst`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Limit {
    /// Tokens added per window.
    pub rate: u32,
    /// The window, in seconds.
    pub per_secs: u64,
    /// Bucket capacity; defaults to `rate`.
    pub burst: u32,
    /// What the bucket is counted per, sorted and without duplicates.
    pub key: Vec<LimitKey>,
}

/// One rule.
#[derive(Clone, Debug)]
pub struct Rule {
    /// Unique id.
    pub id: String,
    /// Where the rule starts in its file.
    pub span: Span,
    /// The conjunction that must hold.
    pub when: Vec<Cond>,
    /// What it decides when it matches.
    pub decision: Decision,
    /// Enforce or audit.
    pub mode: Mode,
    /// Why, for humans; `None` when the file gives none.
    pub reason: Option<String>,
    /// The budget of a throttle rule (the default budget when the file gives none).
    pub limit: Option<Limit>,
    /// Approvals a `require_human` rule needs (1 unless the file asks for a quorum).
    pub approvals: u32,
    /// `sha256:` of the rule's canonical form, for approvals bound to rule content.
    pub hash: String,
}

impl Rule {
    /// Whether any condition looks at the payload. A rule that does not decides alike for
    /// every payload of a job with the same topic, env, tenant, principal and labels.
    pub fn reads_payload(&self) -> bool {
        self.when.iter().any(Cond::reads_payload)
    }
}

impl Cond {
    fn reads_payload(&self) -> bool {
        match self {
            Self::Field { field, .. } => matches!(field, Field::Payload(_)),
            Self::All(conds) | Self::Any(conds) => conds.iter().any(Self::reads_payload),
            Self::Not(cond) => cond.reads_payload(),
        }
    }
}

/// A condition inside `when`.
#[derive(Clone, Debug)]
pub enum Cond {
    /// One field, all of whose tests hold on the same value.
    Field {
        /// The field.
        field: Field,
        /// The tests, all of which must hold.
        tests: Vec<Test>,
        /// Where the condition is written.
        span: Span,
    },
    /// Every condition holds.
    All(Vec<Cond>),
    /// At least one condition holds.
    Any(Vec<Cond>),
    /// The condition does not hold.
    Not(Box<Cond>),
}

/// What a condition looks at.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Field {
    /// The job's topic.
    Topic,
    /// The job's env.
    Env,
    /// The job's tenant.
    Tenant,
    /// The submitting principal.
    Principal,
    /// The topic's risk class.
    Risk,
    /// One label.
    Label(String),
    /// A payload path.
    Payload(Path),
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Topic => f.write_str("topic"),
            Self::Env => f.write_str("env"),
            Self::Tenant => f.write_str("tenant"),
            Self::Principal => f.write_str("principal"),
            Self::Risk => f.write_str("risk"),
            Self::Label(name) => write!(f, "labels.{name}"),
            Self::Payload(path) => write!(f, "payload.{path}"),
        }
    }
}

/// A scalar written in a policy.
#[derive(Clone, Debug, PartialEq)]
pub enum Literal {
    /// `null`.
    Null,
    /// `true` / `false`.
    Bool(bool),
    /// An integer.
    Int(i64),
    /// A float.
    Float(f64),
    /// A string.
    Str(String),
}

/// One test on a value.
#[derive(Clone, Debug)]
pub enum Test {
    /// Equal to one of these (a scalar is a list of one; `in` is the same test).
    Equals(Vec<Literal>),
    /// A string matching one of these globs (literal names are globs without wildcards).
    Globs(Vec<Glob>),
    /// A string the regex finds a match in (unanchored; use `^` and `$` to anchor).
    Regex(Regex),
    /// Present and equal to none of these.
    NotIn(Vec<Literal>),
    /// A number greater than this.
    Gt(f64),
    /// A number greater than or equal to this.
    Gte(f64),
    /// A number less than this.
    Lt(f64),
    /// A number less than or equal to this.
    Lte(f64),
    /// Present (`true`) or absent (`false`).
    Exists(bool),
    /// A list with an element equal to this, or a string containing this string.
    Contains(Literal),
    /// An address or network inside one of these networks.
    CidrWithin(Vec<Net>),
    /// An address or network sharing an address with one of these networks.
    CidrOverlaps(Vec<Net>),
}

/// A named set of topic patterns, usable as `risk: high` in rules and fail modes.
#[derive(Clone, Debug)]
pub struct RiskClass {
    /// The class name.
    pub name: String,
    /// Topics in the class.
    pub topics: Vec<Glob>,
}

/// One entry of `terraform.topics`: the topic a Terraform resource change is evaluated under.
#[derive(Clone, Debug)]
pub struct TerraformTopic {
    /// Matched against the resource type, or against `TYPE.ACTION` when `whole`.
    pub pattern: Glob,
    /// The topic, or its prefix (the action is appended) unless `whole`.
    pub topic: String,
    /// The pattern names an action too, and `topic` is the whole topic.
    pub whole: bool,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "a test fails by panicking")]

    #[test]
    fn a_rule_reads_the_payload_when_any_condition_does() {
        let (policy, _) = crate::compile::compile(
            "version: v1\nrules:\n\
             - { id: topic-only, when: { topic: mcp.fs.delete, env: production, labels: { team: a } }, decision: deny }\n\
             - { id: shorthand, when: { topic: t, path: /a }, decision: deny }\n\
             - { id: nested, when: { any: [ { env: dev }, { not: { payload: { \"a[*].b\": 1 } } } ] }, decision: deny }\n",
        )
        .unwrap();
        let reads: Vec<bool> = policy.rules().iter().map(super::Rule::reads_payload).collect();
        assert_eq!(reads, [false, true, true]);
    }
}
