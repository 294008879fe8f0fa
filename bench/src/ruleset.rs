//! Equivalent policies for the three engines: the seed's three rules and seeded, generated
//! sets of any size, each rendered as Airlock YAML, Cedar and Rego from one list of rules, so
//! that no engine gets a policy the others do not.

use std::fmt::{self, Write as _};

use airlock_policy::Decision;
use serde_json::Value;

use crate::DEFAULT_DECISION;
use crate::rng::Rng;

/// A value a payload condition compares with. The strings need no escaping, so each renders
/// as the same literal in YAML, JSON, Cedar and Rego.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scalar {
    /// A string.
    Str(&'static str),
    /// An integer.
    Int(i64),
    /// A boolean.
    Bool(bool),
}

impl Scalar {
    /// The JSON value a job carries.
    pub fn json(self) -> Value {
        match self {
            Self::Str(s) => Value::from(s),
            Self::Int(n) => Value::from(n),
            Self::Bool(b) => Value::from(b),
        }
    }
}

impl fmt::Display for Scalar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Str(s) => write!(f, "\"{s}\""),
            Self::Int(n) => write!(f, "{n}"),
            Self::Bool(b) => write!(f, "{b}"),
        }
    }
}

/// Payload fields rules test, with the values they test for: a small vocabulary, so that
/// rules on one topic and env overlap and a job can match several of them.
pub const VOCABULARY: [(&str, &[Scalar]); 6] = [
    ("cidr", &[Scalar::Str("0.0.0.0/0"), Scalar::Str("10.0.0.0/8"), Scalar::Str("192.168.0.0/16")]),
    ("region", &[Scalar::Str("us-east-1"), Scalar::Str("eu-west-1"), Scalar::Str("ap-south-1")]),
    ("tier", &[Scalar::Str("gold"), Scalar::Str("silver"), Scalar::Str("bronze")]),
    ("owner", &[Scalar::Str("team-a"), Scalar::Str("team-b"), Scalar::Str("team-c"), Scalar::Str("team-d")]),
    ("replicas", &[Scalar::Int(0), Scalar::Int(1), Scalar::Int(3)]),
    ("force", &[Scalar::Bool(true), Scalar::Bool(false)]),
];

/// Environments, weighted: half the rules are about production.
const ENVS: [&str; 10] = [
    "production",
    "production",
    "production",
    "production",
    "production",
    "staging",
    "staging",
    "staging",
    "dev",
    "dev",
];

/// Decisions, weighted: mostly allow, throttle and require_human, some deny.
const DECISIONS: [(Decision, usize); 4] =
    [(Decision::Allow, 8), (Decision::Throttle, 5), (Decision::RequireHuman, 5), (Decision::Deny, 2)];

/// 25 services x 4 resources x 3 verbs: 300 distinct topics. No rule uses the verb `read`,
/// which gives jobs that match nothing.
const SERVICES: usize = 25;
const RESOURCES: [&str; 4] = ["instance", "bucket", "database", "queue"];
const VERBS: [&str; 3] = ["create", "update", "delete"];

/// The same seed for every size, so that a set is a pure function of its size.
const SEED: u64 = 0x5eed_a1a0_c0de_0001;

/// One rule: a conjunction of equality tests on topic, env and payload fields.
#[derive(Clone, Debug)]
pub struct Rule {
    /// Unique id.
    pub id: String,
    /// The topic it requires.
    pub topic: String,
    /// The env it requires.
    pub env: &'static str,
    /// Payload fields it requires, each equal to its value; distinct names.
    pub payload: Vec<(&'static str, Scalar)>,
    /// What it decides.
    pub decision: Decision,
}

impl Rule {
    /// Whether a job with these fields matches: the generator's own reading of the rule, used
    /// to choose jobs and as the reference all three engines must agree with.
    pub fn matches(&self, topic: &str, env: &str, payload: &[(&str, Scalar)]) -> bool {
        self.topic == topic
            && self.env == env
            && self.payload.iter().all(|(name, value)| payload.iter().any(|(n, v)| n == name && v == value))
    }
}

/// A policy in the three languages.
pub struct RuleSet {
    /// Name of the set in benchmark ids, e.g. `rules-1000`.
    pub name: String,
    /// The rules, in file order.
    pub rules: Vec<Rule>,
    /// The Airlock policy.
    pub yaml: String,
    /// The Cedar policy set.
    pub cedar: String,
    /// The Rego module.
    pub rego: String,
}

impl RuleSet {
    /// The seed policy: Airlock loads the fixture itself, the other engines its three rules.
    pub fn seed() -> Self {
        let rule = |id: &str, topic: &str, payload, decision| Rule {
            id: id.to_owned(),
            topic: topic.to_owned(),
            env: "production",
            payload,
            decision,
        };
        Self::new(
            "seed-3".to_owned(),
            vec![
                rule(
                    "deny-prod-public-ingress",
                    "infra.security_group.update",
                    vec![("cidr", Scalar::Str("0.0.0.0/0"))],
                    Decision::Deny,
                ),
                rule("require-approval-prod-delete", "infra.resource.delete", vec![], Decision::RequireHuman),
                rule("throttle-bulk-recreate", "infra.cluster.recreate", vec![], Decision::Throttle),
            ],
            Some(include_str!("../../examples/policies/seed.yaml")),
        )
    }

    /// `count` generated rules: always the same ones for the same count.
    pub fn generated(count: usize) -> Self {
        let mut rng = Rng::new(SEED);
        let decisions: Vec<Decision> =
            DECISIONS.iter().flat_map(|(d, weight)| std::iter::repeat_n(*d, *weight)).collect();
        let rules = (0..count)
            .map(|i| {
                let topic =
                    format!("svc{}.{}.{}", rng.below(SERVICES), rng.pick(&RESOURCES), rng.pick(&VERBS));
                let first = rng.below(VOCABULARY.len());
                let mut names = vec![first];
                if rng.below(2) == 1 {
                    names.push((first + 1 + rng.below(VOCABULARY.len() - 1)) % VOCABULARY.len());
                }
                let payload = names
                    .into_iter()
                    .map(|n| {
                        let (name, values) = VOCABULARY[n];
                        (name, *rng.pick(values))
                    })
                    .collect();
                Rule {
                    id: format!("rule-{i:05}"),
                    topic,
                    env: ENVS[rng.below(ENVS.len())],
                    payload,
                    decision: *rng.pick(&decisions),
                }
            })
            .collect();
        Self::new(format!("rules-{count}"), rules, None)
    }

    /// The set with its three renderings; `yaml` replaces the generated Airlock rendering.
    fn new(name: String, rules: Vec<Rule>, yaml: Option<&str>) -> Self {
        let yaml = yaml.map_or_else(|| render_yaml(&rules), str::to_owned);
        let cedar = render_cedar(&rules);
        let rego = render_rego(&rules);
        Self { name, rules, yaml, cedar, rego }
    }

    /// The id of the rule at `idx`.
    pub fn id(&self, idx: u32) -> &str {
        &self.rules[idx as usize].id
    }
}

/// The Airlock policy: payload fields go under `payload:`, so none is read as a reserved key.
fn render_yaml(rules: &[Rule]) -> String {
    let mut out = format!(
        "# Generated by airlock-bench: {} rules.\nversion: v1\ndefaults:\n  decision: {}\nrules:\n",
        rules.len(),
        DEFAULT_DECISION.as_str()
    );
    for rule in rules {
        let _ = write!(out, "  - id: {}\n    when: {{ topic: {}, env: {}", rule.id, rule.topic, rule.env);
        if !rule.payload.is_empty() {
            let fields: Vec<String> = rule.payload.iter().map(|(n, v)| format!("{n}: {v}")).collect();
            let _ = write!(out, ", payload: {{ {} }}", fields.join(", "));
        }
        let _ = writeln!(out, " }}\n    decision: {}", rule.decision.as_str());
    }
    out
}

/// One `permit` per rule, its id and decision as annotations and its conditions in `when`;
/// `has` guards each payload field so that a missing one fails the rule without an error.
fn render_cedar(rules: &[Rule]) -> String {
    let mut out = String::new();
    for rule in rules {
        let _ = write!(
            out,
            "@id(\"{}\")\n@decision(\"{}\")\npermit (principal, action, resource)\nwhen {{ context.topic == \"{}\" && context.env == \"{}\"",
            rule.id,
            rule.decision.as_str(),
            rule.topic,
            rule.env
        );
        for (name, value) in &rule.payload {
            let _ = write!(out, " && context.payload has {name} && context.payload.{name} == {value}");
        }
        out.push_str(" };\n\n");
    }
    out
}

/// One partial-set rule per policy rule: `data.airlock.matched` is the set of matching ids.
fn render_rego(rules: &[Rule]) -> String {
    let mut out = String::from("package airlock\n\n");
    for rule in rules {
        let _ = write!(
            out,
            "matched contains \"{}\" if {{\n\tinput.topic == \"{}\"\n\tinput.env == \"{}\"\n",
            rule.id, rule.topic, rule.env
        );
        for (name, value) in &rule.payload {
            let _ = writeln!(out, "\tinput.payload.{name} == {value}");
        }
        out.push_str("}\n\n");
    }
    out
}
