//! Gate B's decisions (SPEC 6), as pure functions: what to do with a queued job given the
//! safety check's answer, the fail mode and the attempts so far; and what to do after a lease
//! expires or a worker fails. The driver gathers the inputs (reading the clock and drawing the
//! jitter), calls these, and executes the action.

use airlock_policy::Decision;

use crate::approval::Stale;
use crate::defaults::{BACKOFF_BASE_MS, BACKOFF_CAP_MS, EXECUTION_ATTEMPTS_MAX, SCHEDULING_ATTEMPTS_MAX};

/// Caps and backoff numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caps {
    /// Scheduling attempts before dead-lettering.
    pub scheduling_attempts_max: u32,
    /// Execution attempts before dead-lettering.
    pub execution_attempts_max: u32,
    /// First backoff.
    pub backoff_base_ms: u64,
    /// Largest backoff.
    pub backoff_cap_ms: u64,
}

impl Default for Caps {
    fn default() -> Self {
        Self {
            scheduling_attempts_max: SCHEDULING_ATTEMPTS_MAX,
            execution_attempts_max: EXECUTION_ATTEMPTS_MAX,
            backoff_base_ms: BACKOFF_BASE_MS,
            backoff_cap_ms: BACKOFF_CAP_MS,
        }
    }
}

/// What a gate does when the safety check is unavailable (SPEC 5, 6).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FailMode {
    /// Refuse (Gate A: 503; Gate B: requeue with backoff, a counted scheduling attempt).
    #[default]
    Closed,
    /// Proceed, mark the job bypassed, count and audit it.
    Open,
}

impl std::str::FromStr for FailMode {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "closed" => Ok(Self::Closed),
            "open" => Ok(Self::Open),
            other => Err(format!("unknown fail mode `{other}`; expected `closed` or `open`")),
        }
    }
}

impl FailMode {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
        }
    }
}

/// Where a `require_human` job's approval stands, checked against the active snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApprovalState {
    /// An approved request whose binding holds.
    Valid,
    /// No approved request.
    Missing,
    /// An approved request whose binding broke.
    Stale(Stale),
}

/// What the safety check said.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Safety {
    /// A decision, with the approval state when it is `require_human`.
    Decided(Decision, ApprovalState),
    /// No answer: timeout, error or open circuit.
    Unavailable(String),
}

/// What to do with the job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Lease it to the worker. `budgets`: a throttle decision, so Gate B's budgets must admit
    /// it first (a refusal requeues it until the budget refills, uncounted). `bypassed`: the
    /// safety check was unavailable and the fail mode is open.
    Lease {
        /// Charge the throttle budgets first.
        budgets: bool,
        /// Dispatched without a decision (fail open).
        bypassed: bool,
    },
    /// Gate B denied it.
    Deny,
    /// Needs a (fresh) human approval; the stale one, if any, is recorded as stale.
    NeedsApproval(Option<Stale>),
    /// Back to the queue after a delay. `counted`: it used a scheduling attempt.
    Requeue {
        /// How long to wait.
        delay_ms: u64,
        /// Whether it counts against the scheduling cap.
        counted: bool,
        /// Why.
        reason: String,
    },
    /// Out of attempts.
    DeadLetter(String),
}

/// Backoff before scheduling attempt `n + 1` after `n` failures: `min(cap, base · 2^(n-1))`
/// times `jitter`, which the caller draws uniformly from [0.5, 1.5].
pub fn backoff_ms(failures: u32, caps: &Caps, jitter: f64) -> u64 {
    let exponent = failures.saturating_sub(1).min(40);
    let raw = caps.backoff_base_ms.saturating_mul(1u64 << exponent).min(caps.backoff_cap_ms);
    (raw as f64 * jitter.clamp(0.5, 1.5)).round() as u64
}

/// Gate B for a queued job whose scheduling attempts so far are `scheduling_attempts`.
pub fn gate_b(
    safety: Safety,
    fail_mode: FailMode,
    scheduling_attempts: u32,
    caps: &Caps,
    jitter: f64,
) -> Action {
    match safety {
        Safety::Decided(Decision::Allow, _) => Action::Lease { budgets: false, bypassed: false },
        Safety::Decided(Decision::Throttle, _) => Action::Lease { budgets: true, bypassed: false },
        Safety::Decided(Decision::Deny, _) => Action::Deny,
        Safety::Decided(Decision::RequireHuman, ApprovalState::Valid) => {
            Action::Lease { budgets: false, bypassed: false }
        }
        Safety::Decided(Decision::RequireHuman, ApprovalState::Missing) => Action::NeedsApproval(None),
        Safety::Decided(Decision::RequireHuman, ApprovalState::Stale(s)) => Action::NeedsApproval(Some(s)),
        Safety::Unavailable(reason) => match fail_mode {
            FailMode::Open => Action::Lease { budgets: false, bypassed: true },
            FailMode::Closed => {
                let reason = format!("safety check unavailable: {reason}");
                match scheduling_failed(scheduling_attempts, caps, jitter, &reason) {
                    Rescheduled::Later { delay_ms } => Action::Requeue { delay_ms, counted: true, reason },
                    Rescheduled::DeadLetter(why) => Action::DeadLetter(why),
                }
            }
        },
    }
}

/// A failed scheduling attempt's consequence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rescheduled {
    /// Back to the queue after `delay_ms`; the attempt counts.
    Later {
        /// The backoff.
        delay_ms: u64,
    },
    /// The cap is reached: the DLQ, with this reason.
    DeadLetter(String),
}

/// The reason of a job that no worker pool takes.
pub const NO_WORKER: &str = "no_worker";

/// A queued job whose topic no worker pool takes (SPEC 6, reason [`NO_WORKER`]): like any
/// scheduling failure, it waits with backoff and counts, then is dead-lettered.
pub fn no_worker(scheduling_attempts: u32, caps: &Caps, jitter: f64) -> Rescheduled {
    scheduling_failed(scheduling_attempts, caps, jitter, NO_WORKER)
}

/// One more failed scheduling attempt: back to the queue with backoff, or, at the cap, the DLQ.
fn scheduling_failed(scheduling_attempts: u32, caps: &Caps, jitter: f64, reason: &str) -> Rescheduled {
    let used = scheduling_attempts + 1;
    if used >= caps.scheduling_attempts_max {
        Rescheduled::DeadLetter(format!("scheduling attempts exhausted ({used}): {reason}"))
    } else {
        Rescheduled::Later { delay_ms: backoff_ms(used, caps, jitter) }
    }
}

/// What follows a worker's failure or an expired lease, after `execution_attempts` attempts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AfterAttempt {
    /// Run it again.
    Retry,
    /// Out of execution attempts.
    DeadLetter(String),
    /// A permanent failure.
    Fail,
}

/// After a failed or abandoned execution attempt.
pub fn after_attempt(execution_attempts: u32, retryable: bool, caps: &Caps, why: &str) -> AfterAttempt {
    if !retryable {
        return AfterAttempt::Fail;
    }
    if execution_attempts >= caps.execution_attempts_max {
        AfterAttempt::DeadLetter(format!("execution attempts exhausted ({execution_attempts}): {why}"))
    } else {
        AfterAttempt::Retry
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_with_jitter() {
        let caps = Caps::default();
        assert_eq!(backoff_ms(1, &caps, 1.0), 1_000);
        assert_eq!(backoff_ms(2, &caps, 1.0), 2_000);
        assert_eq!(backoff_ms(5, &caps, 1.0), 16_000);
        assert_eq!(backoff_ms(6, &caps, 1.0), 30_000);
        assert_eq!(backoff_ms(49, &caps, 1.0), 30_000);
        assert_eq!(backoff_ms(1, &caps, 0.5), 500);
        assert_eq!(backoff_ms(1, &caps, 9.0), 1_500, "jitter is clamped to [0.5, 1.5]");
    }

    #[test]
    fn fifty_attempts_take_about_twenty_three_minutes() {
        let caps = Caps::default();
        let total: u64 = (1..caps.scheduling_attempts_max).map(|n| backoff_ms(n, &caps, 1.0)).sum();
        assert!((22 * 60_000..=24 * 60_000).contains(&total), "{total} ms");
    }

    #[test]
    fn decisions_map_to_actions() {
        let caps = Caps::default();
        let decided = |d, a| gate_b(Safety::Decided(d, a), FailMode::Closed, 0, &caps, 1.0);
        assert_eq!(
            decided(Decision::Allow, ApprovalState::Missing),
            Action::Lease { budgets: false, bypassed: false }
        );
        assert_eq!(
            decided(Decision::Throttle, ApprovalState::Missing),
            Action::Lease { budgets: true, bypassed: false }
        );
        assert_eq!(decided(Decision::Deny, ApprovalState::Valid), Action::Deny);
        assert_eq!(
            decided(Decision::RequireHuman, ApprovalState::Valid),
            Action::Lease { budgets: false, bypassed: false }
        );
        assert_eq!(decided(Decision::RequireHuman, ApprovalState::Missing), Action::NeedsApproval(None));
        assert_eq!(
            decided(Decision::RequireHuman, ApprovalState::Stale(Stale::Expired)),
            Action::NeedsApproval(Some(Stale::Expired))
        );
    }

    #[test]
    fn unavailable_follows_the_fail_mode_and_the_cap() {
        let caps = Caps::default();
        let down = || Safety::Unavailable("timeout".into());
        assert_eq!(
            gate_b(down(), FailMode::Open, 0, &caps, 1.0),
            Action::Lease { budgets: false, bypassed: true }
        );
        assert!(matches!(
            gate_b(down(), FailMode::Closed, 0, &caps, 1.0),
            Action::Requeue { delay_ms: 1_000, counted: true, .. }
        ));
        assert!(
            matches!(gate_b(down(), FailMode::Closed, 49, &caps, 1.0), Action::DeadLetter(r) if r.contains("(50)"))
        );
    }

    #[test]
    fn execution_attempts_are_capped() {
        let caps = Caps::default();
        assert_eq!(after_attempt(1, true, &caps, "x"), AfterAttempt::Retry);
        assert_eq!(after_attempt(2, true, &caps, "x"), AfterAttempt::Retry);
        assert!(matches!(after_attempt(3, true, &caps, "lease expired"), AfterAttempt::DeadLetter(_)));
        assert_eq!(after_attempt(1, false, &caps, "x"), AfterAttempt::Fail);
    }
}
