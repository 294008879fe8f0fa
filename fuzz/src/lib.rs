//! The bodies of the fuzz targets, kept out of `fuzz_targets/` so that one copy serves both the
//! fuzzer and `cargo test`: `crates/airlock-policy/tests/fuzz_corpus.rs` includes this file by
//! path and runs the seed corpus through exactly these functions. Only the policy crate's
//! public API is used, and nothing beyond it, so the file compiles in either place.

use airlock_policy::{Decision, Job, Mode, Policy, Severity, Verdict, compile};

/// The line that separates the policy from the job in an `eval` input: the policy text, then a
/// line holding exactly `---job---`, then the job as JSON (`Job::from_slice`).
pub const JOB_SEPARATOR: &str = "\n---job---\n";

/// `parse`: any bytes, read as UTF-8 with invalid sequences replaced, must compile or be
/// refused without panicking. A refusal always names at least one error, and an accepted
/// policy carries a hash of the documented shape that a second compilation reproduces.
pub fn parse(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    match compile(&text) {
        Ok((policy, _warnings)) => {
            let hash = policy.hash();
            assert!(hash.starts_with("sha256:") && hash.len() == 7 + 64, "malformed hash `{hash}`");
            let again = compile(&text).map(|(p, _)| p.hash().to_owned());
            assert_eq!(again.as_deref(), Ok(hash), "compiling the same text twice gave different hashes");
        }
        Err(errors) => {
            assert!(!errors.is_empty(), "a refused policy must say why");
            assert!(errors.iter().all(|e| e.severity == Severity::Error), "a refusal carries only errors");
        }
    }
}

/// `eval`: an input made of a policy and a job (see [`JOB_SEPARATOR`]). When both parse, the
/// indexed `evaluate` must be deterministic, agree exactly with `explain` (which walks every
/// rule without the index), and give the decision that the verdicts imply (SPEC 3.3).
pub fn eval(data: &[u8]) {
    let Some((policy_text, job_bytes)) = split(data) else { return };
    let Ok((policy, _warnings)) = compile(&policy_text) else { return };
    let Ok(job) = Job::from_slice(job_bytes) else { return };
    check_job(&policy, &job);
}

/// Splits an `eval` input at the first separator line.
pub fn split(data: &[u8]) -> Option<(String, &[u8])> {
    let separator = JOB_SEPARATOR.as_bytes();
    let at = data.windows(separator.len()).position(|w| w == separator)?;
    let (policy, rest) = data.split_at(at);
    let job = rest.get(separator.len()..)?;
    Some((String::from_utf8_lossy(policy).into_owned(), job))
}

/// Every invariant `eval` checks for one compiled policy and one job.
pub fn check_job(policy: &Policy, job: &Job) {
    let first = policy.evaluate(job);
    let second = policy.evaluate(job);
    assert_eq!(first, second, "evaluating the same job twice gave different results");

    let explanation = policy.explain(job);
    let explained = &explanation.evaluation;
    assert_eq!(first.decision, explained.decision, "evaluate and explain disagree on the decision");
    assert_eq!(
        policy.ids(&first.deciding),
        policy.ids(&explained.deciding),
        "evaluate and explain disagree on the deciding rules"
    );
    assert_eq!(&first, explained, "evaluate and explain disagree on audit rules or errors");
    assert_eq!(explanation.verdicts.len(), policy.rules().len(), "explain gives one verdict per rule");

    // The decision the verdicts imply, computed here without the engine's `conclude`: the most
    // restrictive matching enforced rule, an erroring rule counting as matched when it restricts.
    let mut decision: Option<Decision> = None;
    let mut deciding = Vec::new();
    for ((idx, rule), verdict) in (0..).zip(policy.rules()).zip(&explanation.verdicts) {
        let counts = match verdict {
            Verdict::Matched => true,
            Verdict::NotMatched(_) => false,
            Verdict::Error(_) => rule.decision > Decision::Allow,
        };
        if !counts || rule.mode == Mode::Audit {
            continue;
        }
        if decision.is_none_or(|d| rule.decision > d) {
            decision = Some(rule.decision);
            deciding.clear();
        }
        if decision == Some(rule.decision) {
            deciding.push(idx);
        }
    }
    assert_eq!(
        first.decision,
        decision.unwrap_or(policy.default_decision()),
        "decision is not the most restrictive match"
    );
    assert_eq!(first.deciding, deciding, "deciding rules are not the matches with the decision");
    let _ = policy.reason(&first);
}
