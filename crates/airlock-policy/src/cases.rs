//! Policy test cases (`airlock policy test`): a YAML file of jobs and the decisions, and
//! optionally the deciding rules, a policy must give them.
//!
//! ```yaml
//! cases:
//!   - name: public ingress in production is denied
//!     job: { topic: infra.security_group.update, env: production, payload: { cidr: 0.0.0.0/0 } }
//!     expect: deny
//!     rules: [deny-prod-public-ingress]   # optional: the exact deciding rule ids
//! ```

use crate::diag::{Diagnostic, Span, one_of};
use crate::job::Job;
use crate::model::Decision;
use crate::policy::Policy;
use crate::yaml::{self, Kind, Node};

/// One case.
#[derive(Clone, Debug)]
pub struct Case {
    /// What the case checks, for humans.
    pub name: String,
    /// Where the case starts.
    pub span: Span,
    /// The job.
    pub job: Job,
    /// The decision the policy must give.
    pub expect: Decision,
    /// The deciding rule ids the policy must give, in file order, when the case says.
    pub rules: Option<Vec<String>>,
}

/// A case the policy got wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// The case's name.
    pub name: String,
    /// Where the case starts.
    pub span: Span,
    /// What the case expects, e.g. `deny [deny-prod-public-ingress]`.
    pub expected: String,
    /// What the policy gave.
    pub actual: String,
}

const CASE_KEYS: [&str; 4] = ["name", "job", "expect", "rules"];

/// Parses a cases file; every error is reported with its position.
pub fn parse(text: &str) -> Result<Vec<Case>, Vec<Diagnostic>> {
    let root = yaml::parse(text)?;
    let mut errors = Vec::new();
    let items = match &root.kind {
        Kind::Map(entries) => match entries.iter().find(|(k, _)| k.text == "cases") {
            Some((_, Node { kind: Kind::Seq(items), .. })) => items.as_slice(),
            _ => {
                return Err(vec![Diagnostic::error(root.span, "expected a top-level `cases` list")]);
            }
        },
        Kind::Seq(items) => items.as_slice(),
        _ => {
            return Err(vec![Diagnostic::error(root.span, "expected a top-level `cases` list")]);
        }
    };
    let mut cases = Vec::new();
    for (n, item) in items.iter().enumerate() {
        if let Some(case) = parse_case(item, n + 1, &mut errors) {
            cases.push(case);
        }
    }
    if errors.is_empty() { Ok(cases) } else { Err(errors) }
}

fn parse_case(node: &Node, number: usize, errors: &mut Vec<Diagnostic>) -> Option<Case> {
    let Kind::Map(entries) = &node.kind else {
        errors.push(Diagnostic::error(node.span, format!("case {number} must be a map")));
        return None;
    };
    for (key, _) in entries {
        if !CASE_KEYS.contains(&key.text.as_str()) {
            errors.push(
                Diagnostic::error(key.span, format!("unknown key `{}` in a case", key.text))
                    .with_help(format!("expected {}", one_of(&CASE_KEYS))),
            );
        }
    }
    let get = |name: &str| entries.iter().find(|(k, _)| k.text == name).map(|(_, v)| v);
    let name = match get("name").map(|n| &n.kind) {
        Some(Kind::Str(s)) => s.clone(),
        _ => format!("case {number}"),
    };
    let job = match get("job") {
        None => {
            errors.push(Diagnostic::error(node.span, format!("case `{name}` has no `job`")));
            None
        }
        Some(job) => match Job::from_json(&job.to_json()) {
            Ok(j) => Some(j),
            Err(field_errors) => {
                errors.extend(
                    field_errors.iter().map(|e| Diagnostic::error(job.span, format!("case `{name}`: {e}"))),
                );
                None
            }
        },
    };
    let expect = match get("expect") {
        Some(Node { kind: Kind::Str(s), span }) => {
            let d = Decision::parse(s);
            if d.is_none() {
                let names: Vec<&str> = Decision::ALL.iter().map(|d| d.as_str()).collect();
                errors.push(
                    Diagnostic::error(*span, format!("unknown decision `{s}`"))
                        .with_help(format!("expected {}", one_of(&names))),
                );
            }
            d
        }
        Some(other) => {
            errors.push(Diagnostic::error(other.span, "`expect` must be a decision name"));
            None
        }
        None => {
            errors.push(Diagnostic::error(node.span, format!("case `{name}` has no `expect`")));
            None
        }
    };
    let rules = match get("rules") {
        None => Some(None),
        Some(Node { kind: Kind::Seq(items), .. }) => items
            .iter()
            .map(|i| match &i.kind {
                Kind::Str(s) => Some(s.clone()),
                _ => {
                    errors.push(Diagnostic::error(i.span, "rule ids must be strings"));
                    None
                }
            })
            .collect::<Option<Vec<_>>>()
            .map(Some),
        Some(other) => {
            errors.push(Diagnostic::error(other.span, "`rules` must be a list of rule ids"));
            None
        }
    };
    Some(Case { name, span: node.span, job: job?, expect: expect?, rules: rules? })
}

/// Runs every case; returns the ones the policy got wrong.
pub fn run(policy: &Policy, cases: &[Case]) -> Vec<Failure> {
    let mut failures = Vec::new();
    for case in cases {
        let evaluation = policy.evaluate(&case.job);
        let ids = policy.ids(&evaluation.deciding);
        let decision_ok = evaluation.decision == case.expect;
        let rules_ok = case.rules.as_ref().is_none_or(|want| *want == ids);
        if !(decision_ok && rules_ok) {
            let expected = match &case.rules {
                Some(rules) => format!("{} [{}]", case.expect, rules.join(", ")),
                None => case.expect.to_string(),
            };
            failures.push(Failure {
                name: case.name.clone(),
                span: case.span,
                expected,
                actual: format!("{} [{}]", evaluation.decision, ids.join(", ")),
            });
        }
    }
    failures
}
