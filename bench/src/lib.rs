//! The comparison benchmark's shared parts: one generator of equivalent policies for Airlock,
//! Cedar and Rego, the benchmark jobs, and the three engines behind one [`Outcome`], so that the
//! criterion bench and the policy generator binary agree on what is measured.

pub mod engines;
pub mod jobs;
mod rng;
pub mod ruleset;

use airlock_policy::Decision;

/// The decision when no rule matches, in every rendering (`defaults.decision` in the YAML).
pub const DEFAULT_DECISION: Decision = Decision::Allow;

/// What an engine decided for one job, in Airlock's terms.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// The winning decision.
    pub decision: Decision,
    /// Positions (file order) of the matching rules with the winning decision, ascending.
    pub deciding: Vec<u32>,
    /// Rules whose evaluation failed; the benchmark's policies must never have any.
    pub errors: usize,
}

/// Airlock's precedence (SPEC 3.3) applied to the `(position, decision)` of every matching
/// rule, in any order: the most restrictive decision wins and every matching rule with it
/// decides, in file order; no match gives [`DEFAULT_DECISION`]. Cedar and Rego only report
/// which rules matched, so both finish with this.
pub fn conclude(matches: impl IntoIterator<Item = (u32, Decision)>, errors: usize) -> Outcome {
    let mut decision = None;
    let mut deciding = Vec::new();
    for (idx, candidate) in matches {
        match decision {
            Some(best) if candidate < best => {}
            Some(best) if candidate == best => deciding.push(idx),
            _ => {
                decision = Some(candidate);
                deciding.clear();
                deciding.push(idx);
            }
        }
    }
    deciding.sort_unstable();
    Outcome { decision: decision.unwrap_or(DEFAULT_DECISION), deciding, errors }
}
