//! Plan test cases (`airlock plan test POLICY CASES...`): real plan files and the decisions a
//! policy must give them, as a whole and per change.
//!
//! ```yaml
//! cases:
//!   - name: an open security group in production is denied
//!     plan: plans/open-sg.json          # relative to the cases file
//!     env: production
//!     expect: deny                      # the plan job's decision
//!     changes:                          # optional: decisions by address; every change
//!       aws_security_group.web: deny    # of the plan must be listed when given
//! ```

use std::collections::BTreeMap;

use airlock_policy::diag::{Diagnostic, Span, one_of};
use airlock_policy::yaml::{self, Kind, Node};
use airlock_policy::{Decision, Policy};

use crate::evaluate::{Submission, evaluate, plan_job};
use crate::plan::Plan;

/// One case.
#[derive(Clone, Debug)]
pub struct Case {
    /// What it checks.
    pub name: String,
    /// Where it starts.
    pub span: Span,
    /// The plan JSON file, as written (relative to the cases file).
    pub plan: String,
    /// The env the plan is evaluated for.
    pub env: String,
    /// The decision of the whole plan.
    pub expect: Decision,
    /// Decisions by change address, when the case gives them.
    pub changes: Option<BTreeMap<String, Decision>>,
}

const CASE_KEYS: [&str; 5] = ["name", "plan", "env", "expect", "changes"];

/// Parses a plan cases file; every error with its position.
pub fn parse(text: &str) -> Result<Vec<Case>, Vec<Diagnostic>> {
    let root = yaml::parse(text)?;
    let items = match &root.kind {
        Kind::Map(entries) => match entries.iter().find(|(k, _)| k.text == "cases") {
            Some((_, Node { kind: Kind::Seq(items), .. })) => items,
            _ => return Err(vec![Diagnostic::error(root.span, "expected a top-level `cases` list")]),
        },
        _ => return Err(vec![Diagnostic::error(root.span, "expected a top-level `cases` list")]),
    };
    let mut errors = Vec::new();
    let cases: Vec<Case> =
        items.iter().enumerate().filter_map(|(n, item)| case(item, n + 1, &mut errors)).collect();
    if errors.is_empty() { Ok(cases) } else { Err(errors) }
}

fn decision(node: &Node, errors: &mut Vec<Diagnostic>) -> Option<Decision> {
    let names: Vec<&str> = Decision::ALL.iter().map(|d| d.as_str()).collect();
    match &node.kind {
        Kind::Str(s) => Decision::parse(s).or_else(|| {
            errors.push(
                Diagnostic::error(node.span, format!("unknown decision `{s}`"))
                    .with_help(format!("expected {}", one_of(&names))),
            );
            None
        }),
        other => {
            errors.push(Diagnostic::error(
                node.span,
                format!("expected a decision, found {}", other.describe()),
            ));
            None
        }
    }
}

fn case(node: &Node, number: usize, errors: &mut Vec<Diagnostic>) -> Option<Case> {
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
    let string = |name: &str, errors: &mut Vec<Diagnostic>| match get(name).map(|n| (&n.kind, n.span)) {
        Some((Kind::Str(s), _)) if !s.is_empty() => Some(s.clone()),
        Some((_, span)) => {
            errors.push(Diagnostic::error(span, format!("`{name}` must be a non-empty string")));
            None
        }
        None => {
            errors.push(Diagnostic::error(node.span, format!("case {number} has no `{name}`")));
            None
        }
    };
    let name = match get("name").map(|n| &n.kind) {
        Some(Kind::Str(s)) => s.clone(),
        _ => format!("case {number}"),
    };
    let plan = string("plan", errors);
    let env = string("env", errors);
    let expect = match get("expect") {
        Some(n) => decision(n, errors),
        None => {
            errors.push(Diagnostic::error(node.span, format!("case `{name}` has no `expect`")));
            None
        }
    };
    let changes = match get("changes") {
        None => Some(None),
        Some(Node { kind: Kind::Map(entries), .. }) => {
            let mut map = BTreeMap::new();
            let mut ok = true;
            for (key, value) in entries {
                match decision(value, errors) {
                    Some(d) => {
                        map.insert(key.text.clone(), d);
                    }
                    None => ok = false,
                }
            }
            ok.then_some(Some(map))
        }
        Some(other) => {
            errors.push(Diagnostic::error(other.span, "`changes` must map addresses to decisions"));
            None
        }
    };
    Some(Case { name, span: node.span, plan: plan?, env: env?, expect: expect?, changes: changes? })
}

/// What differs between a case and the policy's decisions on its plan; empty when it passes.
pub fn run(policy: &Policy, case: &Case, plan: Plan) -> Vec<String> {
    let submission = Submission { env: case.env.clone(), plan_hash: String::new(), ..Submission::default() };
    let job = plan_job(
        plan,
        airlock_policy::job::SIMULATION_TENANT,
        airlock_policy::job::SIMULATION_PRINCIPAL,
        submission,
    );
    let result = evaluate(policy, &job);
    let mut out = Vec::new();
    if result.evaluation.decision != case.expect {
        out.push(format!(
            "plan: expected {}, got {} ({})",
            case.expect,
            result.evaluation.decision,
            result.reason(policy)
        ));
    }
    if let Some(expected) = &case.changes {
        let mut actual: BTreeMap<&str, (Decision, String)> = BTreeMap::new();
        for change in &result.changes {
            actual.insert(
                &change.address,
                (change.evaluation.decision, policy.ids(&change.evaluation.deciding).join(", ")),
            );
        }
        for (address, want) in expected {
            match actual.get(address.as_str()) {
                None => out.push(format!("`{address}`: expected {want}, but the plan has no such change")),
                Some((got, rules)) if got != want => {
                    out.push(format!("`{address}`: expected {want}, got {got} [{rules}]"));
                }
                Some(_) => {}
            }
        }
        for (address, (got, _)) in &actual {
            if !expected.contains_key(*address) {
                out.push(format!("`{address}`: not listed in the case, decided {got}"));
            }
        }
    }
    out
}
