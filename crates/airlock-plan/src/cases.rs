//! Plan test cases (`airlock plan test POLICY CASES...`, and `airlock policy test`, whose files
//! may mix them with job cases): real plan files and the decisions a policy must give them, as a
//! whole and per change.
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

use airlock_policy::cases::Entry;
use airlock_policy::diag::{Diagnostic, Span};
use airlock_policy::yaml::{Kind, Node};
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

/// The keys of a plan case.
pub const CASE_KEYS: [&str; 5] = ["name", "plan", "env", "expect", "changes"];

/// Parses a plan cases file; every error with its position. The file's shape (a `cases` list
/// of maps, `name`, `expect`) is read by the policy crate's parser, which `policy test` uses.
pub fn parse(text: &str) -> Result<Vec<Case>, Vec<Diagnostic>> {
    airlock_policy::cases::parse_with(text, plan_case)
}

/// A plan case from its entry (keys [`CASE_KEYS`]).
pub fn plan_case(entry: &Entry<'_>, errors: &mut Vec<Diagnostic>) -> Option<Case> {
    entry.only(&CASE_KEYS, errors);
    let string = |name: &str, errors: &mut Vec<Diagnostic>| match entry.get(name) {
        Some(Node { kind: Kind::Str(s), .. }) if !s.is_empty() => Some(s.clone()),
        Some(other) => {
            errors.push(Diagnostic::error(other.span, format!("`{name}` must be a non-empty string")));
            None
        }
        None => {
            errors.push(Diagnostic::error(entry.span, format!("case `{}` has no `{name}`", entry.name)));
            None
        }
    };
    let plan = string("plan", errors);
    let env = string("env", errors);
    let expect = entry.expect(errors);
    let changes = match entry.get("changes") {
        None => Some(None),
        Some(Node { kind: Kind::Map(entries), .. }) => {
            let mut map = BTreeMap::new();
            let mut ok = true;
            for (key, value) in entries {
                match airlock_policy::cases::decision(value, &key.text, errors) {
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
    Some(Case {
        name: entry.name.clone(),
        span: entry.span,
        plan: plan?,
        env: env?,
        expect: expect?,
        changes: changes?,
    })
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
