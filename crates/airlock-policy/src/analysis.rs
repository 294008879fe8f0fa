//! Static analysis for `check`: rules that can never match, and rules that can never decide
//! because a more restrictive rule always matches with them. Only what is proven is reported:
//! each finding follows from the rule text alone, for every possible job.

use crate::diag::Diagnostic;
use crate::glob::Glob;
use crate::model::{Cond, Field, Literal, Mode, Rule, Test};
use crate::policy::{Policy, RuleIdx};

/// Pairs of rules compared for shadowing before the analysis stops looking (it then reports
/// less, never something false).
const SHADOW_PAIRS_MAX: usize = 5_000_000;

/// All warnings for a compiled policy, in rule order.
pub fn analyze(policy: &Policy) -> Vec<Diagnostic> {
    let mut warnings = Vec::new();
    let mut pairs = 0usize;
    for (idx, rule) in (0..).zip(policy.rules()) {
        if let Some(why) = never_matches(policy, rule) {
            warnings.push(
                Diagnostic::warning(rule.span, format!("rule `{}` can never match: {why}", rule.id))
                    .with_help("fix or remove the rule"),
            );
            continue;
        }
        if rule.mode == Mode::Audit || pairs > SHADOW_PAIRS_MAX {
            continue;
        }
        let candidates: Vec<RuleIdx> = policy.shadow_candidates(idx);
        pairs += candidates.len();
        let shadow = candidates.into_iter().filter_map(|i| policy.rule(i)).find(|other| {
            other.mode == Mode::Enforce
                && other.decision > rule.decision
                && implies(policy, &rule.when, &other.when)
        });
        if let Some(other) = shadow {
            warnings.push(
                Diagnostic::warning(
                    rule.span,
                    format!(
                        "rule `{}` can never decide: whenever it matches, rule `{}` also matches and its `{}` is more restrictive than `{}`",
                        rule.id, other.id, other.decision, rule.decision
                    ),
                )
                .with_help("narrow or remove one of the two rules"),
            );
        }
    }
    warnings
}

/// Why a rule can never match, when that is provable.
fn never_matches(policy: &Policy, rule: &Rule) -> Option<String> {
    for cond in &rule.when {
        if let Some(why) = cond_never(cond) {
            return Some(why);
        }
    }
    let atoms: Vec<(&Field, &[Test])> = rule
        .when
        .iter()
        .filter_map(|c| match c {
            Cond::Field { field, tests, .. } => Some((field, tests.as_slice())),
            _ => None,
        })
        .collect();
    for (i, (field, tests)) in atoms.iter().enumerate() {
        for (other_field, other_tests) in atoms.iter().skip(i + 1) {
            if field == other_field && disjoint(tests, other_tests) {
                return Some(format!("it requires `{field}` to be two different things"));
            }
        }
    }
    // A topic required to be one of some names, and a risk class none of those names is in.
    let topics =
        atoms.iter().find_map(|(f, tests)| (**f == Field::Topic).then(|| literal_names(tests)).flatten());
    let classes =
        atoms.iter().find_map(|(f, tests)| (**f == Field::Risk).then(|| literal_names(tests)).flatten());
    if let (Some(topics), Some(classes)) = (topics, classes)
        && topics.iter().all(|t| !classes.iter().any(|class| policy.in_class(t, class)))
    {
        let classes: Vec<String> = classes.iter().map(|c| format!("`{c}`")).collect();
        return Some(format!("no topic it names is in risk class {}", classes.join(" or ")));
    }
    None
}

fn cond_never(cond: &Cond) -> Option<String> {
    match cond {
        Cond::Field { field, tests, .. } => field_never(field, tests),
        Cond::Any(conds) if conds.is_empty() => Some("its `any` list is empty".into()),
        Cond::Any(conds) => {
            let reasons: Option<Vec<String>> = conds.iter().map(cond_never).collect();
            reasons.map(|r| format!("no `any` branch can match ({})", r.join("; ")))
        }
        Cond::All(conds) => conds.iter().find_map(cond_never),
        Cond::Not(inner) => match inner.as_ref() {
            Cond::All(conds) if conds.is_empty() => Some("`not: {}` never holds".into()),
            _ => None,
        },
    }
}

fn field_never(field: &Field, tests: &[Test]) -> Option<String> {
    let absent = tests.iter().any(|t| matches!(t, Test::Exists(false)));
    if absent && tests.iter().any(|t| !matches!(t, Test::Exists(false))) {
        return Some(format!("`{field}` cannot be both absent and tested"));
    }
    let mut low = f64::NEG_INFINITY;
    let mut high = f64::INFINITY;
    let mut open = (false, false);
    for test in tests {
        match test {
            Test::Equals(ls) if ls.is_empty() => {
                return Some(format!("`{field}` must equal one of an empty list"));
            }
            Test::Globs(gs) if gs.is_empty() => {
                return Some(format!("`{field}` must match one of an empty list"));
            }
            Test::Gt(n) if *n >= low => (low, open.0) = (*n, true),
            Test::Gte(n) if *n > low => (low, open.0) = (*n, false),
            Test::Lt(n) if *n <= high => (high, open.1) = (*n, true),
            Test::Lte(n) if *n < high => (high, open.1) = (*n, false),
            _ => {}
        }
    }
    if low > high || (low == high && (open.0 || open.1)) {
        return Some(format!("no number is in the range required of `{field}`"));
    }
    None
}

/// Two tests on one field that no single value can pass together: two fixed sets of names or
/// values with nothing in common.
fn disjoint(a: &[Test], b: &[Test]) -> bool {
    match (fixed_values(a), fixed_values(b)) {
        (Some(xs), Some(ys)) => !xs.iter().any(|x| ys.contains(x)),
        (Some(xs), None) => globs_of(b).is_some_and(|gs| !xs.iter().any(|x| matches_any(gs, x))),
        (None, Some(ys)) => globs_of(a).is_some_and(|gs| !ys.iter().any(|y| matches_any(gs, y))),
        (None, None) => false,
    }
}

/// The string values a set of tests allows, when it allows a fixed list of strings.
fn fixed_values(tests: &[Test]) -> Option<Vec<&str>> {
    tests.iter().find_map(|t| match t {
        Test::Globs(gs) if gs.iter().all(Glob::is_literal) => Some(gs.iter().map(Glob::as_str).collect()),
        Test::Equals(ls) if ls.iter().all(|l| matches!(l, Literal::Str(_))) => Some(
            ls.iter()
                .filter_map(|l| match l {
                    Literal::Str(s) => Some(s.as_str()),
                    _ => None,
                })
                .collect(),
        ),
        _ => None,
    })
}

fn globs_of(tests: &[Test]) -> Option<&[Glob]> {
    tests.iter().find_map(|t| match t {
        Test::Globs(gs) => Some(gs.as_slice()),
        _ => None,
    })
}

fn matches_any(globs: &[Glob], name: &str) -> bool {
    globs.iter().any(|g| g.matches(name))
}

fn literal_names(tests: &[Test]) -> Option<Vec<&str>> {
    fixed_values(tests)
}

/// Whether every job that satisfies `when` also satisfies `other`: each condition of `other`
/// must follow from a single condition of `when`.
fn implies(policy: &Policy, when: &[Cond], other: &[Cond]) -> bool {
    other.iter().all(|needed| when.iter().any(|given| cond_implies(policy, given, needed, when)))
}

fn cond_implies(policy: &Policy, given: &Cond, needed: &Cond, when: &[Cond]) -> bool {
    match (given, needed) {
        (Cond::Field { field: gf, tests: gt, .. }, Cond::Field { field: nf, tests: nt, .. }) if gf == nf => {
            nt.iter().all(|n| gt.iter().any(|g| test_implies(g, n)))
        }
        (_, Cond::Field { field: Field::Risk, tests, .. }) => {
            // `risk: high` follows from a topic fixed to names that are all in class `high`.
            let Some(classes) = literal_names(tests) else {
                return false;
            };
            let topics = when.iter().find_map(|c| match c {
                Cond::Field { field: Field::Topic, tests, .. } => fixed_values(tests),
                _ => None,
            });
            topics.is_some_and(|ts| {
                !ts.is_empty() && ts.iter().all(|t| classes.iter().any(|c| policy.in_class(t, c)))
            })
        }
        (Cond::Field { .. }, _) => false,
        _ => same_cond(given, needed),
    }
}

/// Whether any value passing `given` also passes `needed`.
fn test_implies(given: &Test, needed: &Test) -> bool {
    match needed {
        Test::Exists(true) => !matches!(given, Test::Exists(false)),
        Test::Globs(needed_globs) => {
            fixed_values(std::slice::from_ref(given))
                .is_some_and(|names| names.iter().all(|n| matches_any(needed_globs, n)))
                || matches!(given, Test::Globs(gs) if gs.iter().all(|g| needed_globs.contains(g)))
        }
        Test::Equals(allowed) => match given {
            Test::Equals(ls) => ls.iter().all(|l| allowed.contains(l)),
            Test::Globs(gs) => gs.iter().all(|g| {
                g.is_literal() && allowed.iter().any(|a| matches!(a, Literal::Str(s) if s == g.as_str()))
            }),
            _ => false,
        },
        _ => same_test(given, needed),
    }
}

fn same_test(a: &Test, b: &Test) -> bool {
    crate::compile::canonical_test(a) == crate::compile::canonical_test(b)
}

fn same_cond(a: &Cond, b: &Cond) -> bool {
    crate::compile::canonical_cond(a) == crate::compile::canonical_cond(b)
}
