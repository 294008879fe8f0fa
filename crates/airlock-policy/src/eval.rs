//! How conditions hold on a job. Pure and total: every input gives a verdict or an
//! [`EvalError`], never a panic, and a missing field or a type mismatch simply does not match.

use std::fmt::Write as _;

use serde_json::Value;

use crate::cidr::Net;
use crate::job::Job;
use crate::model::{Cond, Field, Literal, Test};
use crate::path::FanoutExceeded;
use crate::policy::Policy;

/// Something went wrong while evaluating a rule. The rule then fails closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EvalError {
    /// A `[*]` path reached too many values.
    #[error(transparent)]
    Fanout(#[from] FanoutExceeded),
    /// The caller's deadline passed ([`crate::Policy::evaluate_within`]): there is no decision.
    #[error("the evaluation ran out of time")]
    OutOfTime,
    /// A CIDR operator met a present value that is not an IP address or CIDR.
    #[error("a value is not an IP address or CIDR, so `cidr_within`/`cidr_overlaps` cannot judge it")]
    NotANetwork,
    /// A numeric operator met a present value that is not a JSON number.
    #[error("a value is not a number, so `gt`/`gte`/`lt`/`lte` cannot judge it")]
    NotANumber,
    /// A test against a list held for some elements and not for others.
    #[error("a test against a list held for some of its elements and not for others")]
    MixedList,
}

/// What a field resolves to on one job.
#[derive(Clone, Copy)]
enum Subject<'a> {
    Str(&'a str),
    Json(&'a Value),
}

impl<'a> Subject<'a> {
    fn as_str(self) -> Option<&'a str> {
        match self {
            Self::Str(s) => Some(s),
            Self::Json(Value::String(s)) => Some(s),
            Self::Json(_) => None,
        }
    }

    fn as_f64(self) -> Option<f64> {
        match self {
            Self::Json(Value::Number(n)) => n.as_f64(),
            _ => None,
        }
    }

    fn render(self) -> String {
        let text = match self {
            Self::Str(s) => s.to_owned(),
            Self::Json(v) => v.to_string(),
        };
        truncate(text)
    }
}

/// The job plus what evaluation derives from it at most once.
pub(crate) struct Ctx<'a> {
    pub job: &'a Job,
    /// The payload conditions read: the job's own, or one lent by the caller
    /// ([`crate::Policy::evaluate_on`]).
    pub payload: &'a Value,
    pub policy: &'a Policy,
    classes: Option<Vec<&'a str>>,
    /// Asked every [`TIME_CHECK_EVERY`] field tests whether there is time left.
    time_left: Option<&'a mut dyn FnMut() -> bool>,
    tests: u32,
    /// The deadline passed: every later test fails with [`EvalError::OutOfTime`].
    pub out_of_time: bool,
}

/// Field tests between two questions to the caller's deadline: a clock read costs about as
/// much as a simple test, so asking every time would double the cost of evaluation.
const TIME_CHECK_EVERY: u32 = 16;

impl<'a> Ctx<'a> {
    pub fn new(job: &'a Job, policy: &'a Policy) -> Self {
        Self {
            job,
            payload: &job.payload,
            policy,
            classes: None,
            time_left: None,
            tests: 0,
            out_of_time: false,
        }
    }

    /// This context, reading `payload` instead of the job's.
    pub fn on(self, payload: &'a Value) -> Self {
        Self { payload, ..self }
    }

    /// A context that stops evaluating once `time_left` answers `false`.
    pub fn within(job: &'a Job, policy: &'a Policy, time_left: &'a mut dyn FnMut() -> bool) -> Self {
        Self { time_left: Some(time_left), ..Self::new(job, policy) }
    }

    fn check_time(&mut self) -> Result<(), EvalError> {
        if let Some(time_left) = self.time_left.as_mut() {
            self.tests = self.tests.wrapping_add(1);
            if self.out_of_time || (self.tests % TIME_CHECK_EVERY == 1 && !time_left()) {
                self.out_of_time = true;
                return Err(EvalError::OutOfTime);
            }
        }
        Ok(())
    }

    /// The risk classes of the job's topic, computed once.
    fn classes(&mut self) -> &[&'a str] {
        let (policy, topic) = (self.policy, self.job.topic.as_str());
        self.classes.get_or_insert_with(|| policy.classes_of(topic).collect())
    }
}

/// Whether every condition holds, in three-valued logic so that the written order of
/// conditions never matters: one condition that is definitely false makes the conjunction
/// false even when another errors; otherwise an error wins over true.
pub(crate) fn all(conds: &[Cond], ctx: &mut Ctx<'_>) -> Result<bool, EvalError> {
    let mut error = None;
    for cond in conds {
        match holds(cond, ctx) {
            Ok(false) => return Ok(false),
            Ok(true) => {}
            Err(e) => error = Some(e),
        }
    }
    error.map_or(Ok(true), Err)
}

fn holds(cond: &Cond, ctx: &mut Ctx<'_>) -> Result<bool, EvalError> {
    match cond {
        Cond::Field { field, tests, .. } => field_holds(field, tests, ctx),
        Cond::All(conds) => all(conds, ctx),
        Cond::Any(conds) => {
            let mut error = None;
            for cond in conds {
                match holds(cond, ctx) {
                    Ok(true) => return Ok(true),
                    Ok(false) => {}
                    Err(e) => error = Some(e),
                }
            }
            error.map_or(Ok(false), Err)
        }
        Cond::Not(cond) => Ok(!holds(cond, ctx)?),
    }
}

fn field_holds(field: &Field, tests: &[Test], ctx: &mut Ctx<'_>) -> Result<bool, EvalError> {
    ctx.check_time()?;
    let (job, payload) = (ctx.job, ctx.payload);
    let subject = match field {
        Field::Topic => Some(Subject::Str(&job.topic)),
        Field::Env => Some(Subject::Str(&job.env)),
        Field::Tenant => Some(Subject::Str(&job.tenant)),
        Field::Principal => Some(Subject::Str(&job.principal)),
        Field::Risk => {
            // A topic may be in several classes; the condition holds when one of them passes.
            let classes = ctx.classes();
            if classes.is_empty() {
                return Ok(wants_absent(tests).unwrap_or(false));
            }
            let passes = wants_absent(tests).is_none()
                && classes.iter().any(|c| value_holds(tests, Subject::Str(c)).is_ok_and(|held| held));
            return Ok(passes);
        }
        Field::Label(name) => job.labels.get(name).map(|v| Subject::Str(v)),
        Field::Payload(path) => {
            if let Some(absent) = wants_absent(tests) {
                let found = path.any(payload, &mut |_| true)?;
                return Ok(!found && absent);
            }
            // `[*]` means "any element": a definite match wins over an error elsewhere.
            let mut error = None;
            let found = path.any(payload, &mut |v| match value_holds(tests, Subject::Json(v)) {
                Ok(holds) => holds,
                Err(e) => {
                    error = Some(e);
                    false
                }
            })?;
            return match error {
                Some(e) if !found => Err(e),
                _ => Ok(found),
            };
        }
    };
    match subject {
        None => Ok(wants_absent(tests).unwrap_or(false)),
        Some(s) if wants_absent(tests).is_none() => value_holds(tests, s),
        Some(_) => Ok(false),
    }
}

/// Whether every test holds on one value, three-valued like [`all`].
fn value_holds(tests: &[Test], subject: Subject<'_>) -> Result<bool, EvalError> {
    let mut error = None;
    for test in tests {
        match test_on(test, subject) {
            Ok(false) => return Ok(false),
            Ok(true) => {}
            Err(e) => error = Some(e),
        }
    }
    error.map_or(Ok(true), Err)
}

/// A test on a value; a scalar test against a list applies to its elements: it holds when it
/// holds for every element and fails when it fails for every one (an empty list fails), and a
/// list on which the elements disagree is an error, so that a restrictive rule fails closed
/// whichever way (`x: a` or `not: { x: a }`) it was written.
fn test_on(test: &Test, subject: Subject<'_>) -> Result<bool, EvalError> {
    let Subject::Json(Value::Array(items)) = subject else { return test_holds(test, subject) };
    if matches!(test, Test::Contains(_) | Test::Exists(_)) {
        return test_holds(test, subject);
    }
    let (mut held, mut failed) = (false, false);
    for item in items {
        if test_holds(test, Subject::Json(item))? {
            held = true;
        } else {
            failed = true;
        }
    }
    match (held, failed) {
        (true, true) => Err(EvalError::MixedList),
        (held, _) => Ok(held),
    }
}

/// `Some(true)` when the tests are exactly `exists: false` (match when absent); `Some(false)`
/// when `exists: false` is combined with a test that needs a value (never matches); `None`
/// when absence is not asked for.
fn wants_absent(tests: &[Test]) -> Option<bool> {
    tests
        .iter()
        .any(|t| matches!(t, Test::Exists(false)))
        .then(|| tests.iter().all(|t| matches!(t, Test::Exists(false))))
}

/// One test on one value. CIDR and numeric operators cannot judge a present value they cannot
/// read: that is an error (so a restrictive rule fails closed), not a quiet non-match that a
/// padded, zero-prefixed or quoted value could use to slip past a deny.
fn test_holds(test: &Test, subject: Subject<'_>) -> Result<bool, EvalError> {
    let number = || subject.as_f64().ok_or(EvalError::NotANumber);
    Ok(match test {
        Test::Equals(literals) => literals.iter().any(|l| equals(l, subject)),
        Test::Globs(globs) => subject.as_str().is_some_and(|s| globs.iter().any(|g| g.matches(s))),
        Test::Regex(regex) => subject.as_str().is_some_and(|s| regex.is_match(s)),
        Test::NotIn(literals) => !literals.iter().any(|l| equals(l, subject)),
        Test::Gt(n) => number()? > *n,
        Test::Gte(n) => number()? >= *n,
        Test::Lt(n) => number()? < *n,
        Test::Lte(n) => number()? <= *n,
        Test::Exists(present) => *present,
        Test::Contains(literal) => match (subject, literal) {
            (Subject::Json(Value::Array(items)), _) => {
                items.iter().any(|v| equals(literal, Subject::Json(v)))
            }
            (_, Literal::Str(needle)) => subject.as_str().is_some_and(|s| s.contains(needle.as_str())),
            _ => false,
        },
        Test::CidrWithin(nets) => {
            let n = network(subject)?;
            nets.iter().any(|outer| n.within(outer))
        }
        Test::CidrOverlaps(nets) => {
            let n = network(subject)?;
            nets.iter().any(|other| n.overlaps(other))
        }
    })
}

fn network(subject: Subject<'_>) -> Result<Net, EvalError> {
    subject.as_str().and_then(|s| Net::parse_lenient(s).ok()).ok_or(EvalError::NotANetwork)
}

/// Equality without coercion between types; numbers compare by value (`1` equals `1.0`).
fn equals(literal: &Literal, subject: Subject<'_>) -> bool {
    match (literal, subject) {
        (Literal::Str(l), s) => s.as_str() == Some(l.as_str()),
        (_, Subject::Str(_)) => false,
        (Literal::Null, Subject::Json(v)) => v.is_null(),
        (Literal::Bool(b), Subject::Json(v)) => v.as_bool() == Some(*b),
        (Literal::Int(i), Subject::Json(Value::Number(n))) => match n.as_i64() {
            Some(j) => j == *i,
            None => n.as_f64() == Some(*i as f64),
        },
        (Literal::Float(f), Subject::Json(Value::Number(n))) => n.as_f64() == Some(*f),
        _ => false,
    }
}

/// Why a rule did not match, for `explain`: the first condition that is definitely false,
/// in words. Same three-valued logic as [`all`]: an error only counts when nothing is false.
pub(crate) fn why_not(conds: &[Cond], ctx: &mut Ctx<'_>) -> Result<Option<String>, EvalError> {
    let mut error = None;
    for cond in conds {
        match holds(cond, ctx) {
            Ok(false) => return Ok(Some(describe_failure(cond, ctx))),
            Ok(true) => {}
            Err(e) => error = Some(e),
        }
    }
    error.map_or(Ok(None), Err)
}

fn describe_failure(cond: &Cond, ctx: &mut Ctx<'_>) -> String {
    match cond {
        Cond::Field { field, tests, .. } => {
            let expected = describe_tests(tests);
            match current_value(field, ctx) {
                None if matches!(field, Field::Risk) => {
                    format!("topic `{}` is in no risk class, expected {expected}", ctx.job.topic)
                }
                None => format!("`{field}` is missing, expected {expected}"),
                Some(value) => format!("`{field}` is {value}, expected {expected}"),
            }
        }
        Cond::All(conds) => match why_not(conds, ctx) {
            Ok(Some(reason)) => reason,
            Ok(None) => "all conditions held".into(),
            Err(e) => e.to_string(),
        },
        Cond::Any(conds) if conds.is_empty() => "`any` has no conditions".into(),
        Cond::Any(conds) => {
            let reasons: Vec<String> = conds.iter().map(|c| describe_failure(c, ctx)).collect();
            format!("no `any` branch held: {}", reasons.join("; "))
        }
        Cond::Not(_) => "the `not` condition held".into(),
    }
}

fn current_value(field: &Field, ctx: &mut Ctx<'_>) -> Option<String> {
    let (job, payload) = (ctx.job, ctx.payload);
    let quoted = |s: &str| format!("`{}`", truncate(s.to_owned()));
    match field {
        Field::Topic => Some(quoted(&job.topic)),
        Field::Env => Some(quoted(&job.env)),
        Field::Tenant => Some(quoted(&job.tenant)),
        Field::Principal => Some(quoted(&job.principal)),
        Field::Risk => {
            let classes: Vec<String> = ctx.classes().iter().map(|c| quoted(c)).collect();
            (!classes.is_empty()).then(|| classes.join(" and "))
        }
        Field::Label(name) => job.labels.get(name).map(|v| quoted(v)),
        Field::Payload(path) => {
            let mut seen = Vec::new();
            let _ = path.any(payload, &mut |v| {
                seen.push(Subject::Json(v).render());
                seen.len() >= 3
            });
            match seen.len() {
                0 => None,
                1 => seen.pop().map(|v| format!("`{v}`")),
                _ => Some(format!(
                    "[{}]",
                    seen.iter().map(|v| format!("`{v}`")).collect::<Vec<_>>().join(", ")
                )),
            }
        }
    }
}

fn describe_tests(tests: &[Test]) -> String {
    let parts: Vec<String> = tests.iter().map(describe_test).collect();
    parts.join(" and ")
}

fn describe_test(test: &Test) -> String {
    let list = |items: Vec<String>| match items.as_slice() {
        [one] => one.clone(),
        _ => format!("one of {}", items.join(", ")),
    };
    let literals = |ls: &[Literal]| {
        ls.iter().map(|l| format!("`{}`", crate::compile::literal_json(l))).collect::<Vec<_>>()
    };
    match test {
        Test::Equals(ls) => list(literals(ls)),
        Test::Globs(gs) => list(gs.iter().map(|g| format!("`{g}`")).collect()),
        Test::Regex(r) => format!("a match for regex `{}`", r.as_str()),
        Test::NotIn(ls) => format!("none of {}", literals(ls).join(", ")),
        Test::Gt(n) => format!("> {n}"),
        Test::Gte(n) => format!(">= {n}"),
        Test::Lt(n) => format!("< {n}"),
        Test::Lte(n) => format!("<= {n}"),
        Test::Exists(true) => "a value".into(),
        Test::Exists(false) => "no value".into(),
        Test::Contains(l) => format!("something containing `{}`", crate::compile::literal_json(l)),
        Test::CidrWithin(ns) => format!("an address within {}", nets(ns)),
        Test::CidrOverlaps(ns) => format!("a network overlapping {}", nets(ns)),
    }
}

fn nets(ns: &[Net]) -> String {
    let mut out = String::new();
    for (i, n) in ns.iter().enumerate() {
        let _ = write!(out, "{}`{n}`", if i > 0 { ", " } else { "" });
    }
    out
}

fn truncate(mut text: String) -> String {
    const SHOWN_MAX: usize = 80;
    if text.len() > SHOWN_MAX {
        let cut = (0..=SHOWN_MAX).rev().find(|i| text.is_char_boundary(*i)).unwrap_or(0);
        text.truncate(cut);
        text.push('…');
    }
    text
}
