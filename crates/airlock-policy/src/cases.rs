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
use crate::yaml::{self, Key, Kind, Node};

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

/// The keys of a job case.
pub const CASE_KEYS: [&str; 4] = ["name", "job", "expect", "rules"];

/// Parses a cases file; every error is reported with its position.
pub fn parse(text: &str) -> Result<Vec<Case>, Vec<Diagnostic>> {
    parse_with(text, job_case)
}

/// A job case from its entry (keys [`CASE_KEYS`]).
pub fn job_case(entry: &Entry<'_>, errors: &mut Vec<Diagnostic>) -> Option<Case> {
    entry.only(&CASE_KEYS, errors);
    let job = match entry.get("job") {
        None => {
            errors.push(Diagnostic::error(entry.span, format!("case `{}` has no `job`", entry.name)));
            None
        }
        Some(job) => match Job::from_json(&job.to_json()) {
            Ok(j) => Some(j),
            Err(field_errors) => {
                errors.extend(
                    field_errors
                        .iter()
                        .map(|e| Diagnostic::error(job.span, format!("case `{}`: {e}", entry.name))),
                );
                None
            }
        },
    };
    let expect = entry.expect(errors);
    let rules = match entry.get("rules") {
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
    Some(Case { name: entry.name.clone(), span: entry.span, job: job?, expect: expect?, rules: rules? })
}

/// One case of a cases file as written: a map whose keys were checked, and its name.
pub struct Entry<'a> {
    /// The case's `name`, or `case N` when it has none.
    pub name: String,
    /// Where the case starts.
    pub span: Span,
    entries: &'a [(Key, Node)],
}

impl<'a> Entry<'a> {
    /// Reports every key of the case that is not one of `keys`.
    pub fn only(&self, keys: &[&str], errors: &mut Vec<Diagnostic>) {
        for (key, _) in self.entries {
            if !keys.contains(&key.text.as_str()) {
                errors.push(
                    Diagnostic::error(key.span, format!("unknown key `{}` in a case", key.text))
                        .with_help(format!("expected {}", one_of(keys))),
                );
            }
        }
    }

    /// The value of `key`, when the case has it.
    pub fn get(&self, key: &str) -> Option<&'a Node> {
        self.entries.iter().find(|(k, _)| k.text == key).map(|(_, v)| v)
    }

    /// The case's `expect`: a decision name, which every kind of case has.
    pub fn expect(&self, errors: &mut Vec<Diagnostic>) -> Option<Decision> {
        match self.get("expect") {
            Some(node) => decision(node, "expect", errors),
            None => {
                errors.push(Diagnostic::error(self.span, format!("case `{}` has no `expect`", self.name)));
                None
            }
        }
    }
}

/// Reads a cases file: a top-level `cases` list (or a bare list) of maps; `case` builds each
/// case from its entry (checking its keys with [`Entry::only`]), adding to the errors what is
/// wrong. Every error of the file is returned at once. Job cases ([`job_case`]) and plan cases
/// (`airlock_plan::cases`) share it, so one file may hold both.
pub fn parse_with<T>(
    text: &str,
    mut case: impl FnMut(&Entry<'_>, &mut Vec<Diagnostic>) -> Option<T>,
) -> Result<Vec<T>, Vec<Diagnostic>> {
    let root = yaml::parse(text)?;
    let items = match &root.kind {
        Kind::Map(entries) => match entries.iter().find(|(k, _)| k.text == "cases") {
            Some((_, Node { kind: Kind::Seq(items), .. })) => items.as_slice(),
            _ => return Err(vec![Diagnostic::error(root.span, "expected a top-level `cases` list")]),
        },
        Kind::Seq(items) => items.as_slice(),
        _ => return Err(vec![Diagnostic::error(root.span, "expected a top-level `cases` list")]),
    };
    let mut errors = Vec::new();
    let mut cases = Vec::new();
    for (n, node) in items.iter().enumerate() {
        let number = n + 1;
        let Kind::Map(entries) = &node.kind else {
            errors.push(Diagnostic::error(node.span, format!("case {number} must be a map")));
            continue;
        };
        let mut entry = Entry { name: String::new(), span: node.span, entries };
        entry.name = match entry.get("name").map(|n| &n.kind) {
            Some(Kind::Str(s)) => s.clone(),
            _ => format!("case {number}"),
        };
        if let Some(case) = case(&entry, &mut errors) {
            cases.push(case);
        }
    }
    if errors.is_empty() { Ok(cases) } else { Err(errors) }
}

/// A decision name; `what` names the field in the error when it is not one.
pub fn decision(node: &Node, what: &str, errors: &mut Vec<Diagnostic>) -> Option<Decision> {
    match &node.kind {
        Kind::Str(s) => Decision::parse(s).or_else(|| {
            let names: Vec<&str> = Decision::ALL.iter().map(|d| d.as_str()).collect();
            errors.push(
                Diagnostic::error(node.span, format!("unknown decision `{s}`"))
                    .with_help(format!("expected {}", one_of(&names))),
            );
            None
        }),
        _ => {
            errors.push(Diagnostic::error(node.span, format!("`{what}` must be a decision name")));
            None
        }
    }
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
