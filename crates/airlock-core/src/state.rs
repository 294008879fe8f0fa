//! The job lifecycle of SPEC section 4 as one transition table: every state change in Airlock
//! goes through [`JobState::next`], and nothing else decides which moves are legal.

use std::fmt;
use std::str::FromStr;

/// Where a job is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum JobState {
    /// Waiting for a human decision.
    AwaitingApproval,
    /// Admitted; waiting for a worker (and Gate B).
    Queued,
    /// Handed to a worker under a lease.
    Leased,
    /// Done.
    Succeeded,
    /// Ran and failed without retries left, or failed permanently.
    Failed,
    /// Gate B denied it.
    Denied,
    /// A human rejected it.
    Rejected,
    /// Its approval request expired.
    Expired,
    /// Cancelled by its submitter or an operator.
    Cancelled,
    /// Out of attempts; kept for triage.
    DeadLettered,
}

/// What happens to a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Event {
    /// An approval request reached its quorum.
    Approved,
    /// A human rejected the approval request.
    Rejected,
    /// The approval request outlived its TTL.
    ApprovalExpired,
    /// The submitter or an operator cancelled the job.
    Cancel,
    /// Gate B allowed it and a worker took a lease.
    Lease,
    /// Gate B denied it.
    GateBDeny,
    /// Gate B needs a fresh approval.
    NeedsApproval,
    /// Back to the queue: backoff, throttle delay, lease expiry or retryable failure.
    Requeue,
    /// Out of attempts.
    DeadLetter,
    /// The worker finished successfully.
    Succeed,
    /// The worker failed without retries left.
    Fail,
    /// An operator sent a dead-lettered job back through Gate B.
    OperatorRetry,
}

/// A move the table does not allow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("a job in state `{from}` cannot take `{event:?}`")]
pub struct InvalidTransition {
    /// The state the job was in.
    pub from: JobState,
    /// What was attempted.
    pub event: Event,
}

impl JobState {
    /// Every state.
    pub const ALL: [JobState; 10] = [
        Self::AwaitingApproval,
        Self::Queued,
        Self::Leased,
        Self::Succeeded,
        Self::Failed,
        Self::Denied,
        Self::Rejected,
        Self::Expired,
        Self::Cancelled,
        Self::DeadLettered,
    ];

    /// The transition table.
    pub fn next(self, event: Event) -> Result<JobState, InvalidTransition> {
        use Event as E;
        use JobState as S;
        let to = match (self, event) {
            (S::AwaitingApproval, E::Approved) => S::Queued,
            (S::AwaitingApproval, E::Rejected) => S::Rejected,
            (S::AwaitingApproval, E::ApprovalExpired) => S::Expired,
            (S::AwaitingApproval | S::Queued | S::Leased, E::Cancel) => S::Cancelled,
            (S::Queued, E::Lease) => S::Leased,
            (S::Queued, E::GateBDeny) => S::Denied,
            (S::Queued, E::NeedsApproval) => S::AwaitingApproval,
            (S::Queued | S::Leased, E::Requeue) => S::Queued,
            (S::Queued | S::Leased, E::DeadLetter) => S::DeadLettered,
            (S::Leased, E::Succeed) => S::Succeeded,
            (S::Leased, E::Fail) => S::Failed,
            (S::DeadLettered, E::OperatorRetry) => S::Queued,
            (from, event) => return Err(InvalidTransition { from, event }),
        };
        Ok(to)
    }

    /// Whether the job will never move again (dead-lettered jobs can be retried by an operator).
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Succeeded | Self::Failed | Self::Denied | Self::Rejected | Self::Expired | Self::Cancelled
        )
    }

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AwaitingApproval => "awaiting_approval",
            Self::Queued => "queued",
            Self::Leased => "leased",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Denied => "denied",
            Self::Rejected => "rejected",
            Self::Expired => "expired",
            Self::Cancelled => "cancelled",
            Self::DeadLettered => "dead_lettered",
        }
    }
}

impl FromStr for JobState {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        Self::ALL.into_iter().find(|s| s.as_str() == text).ok_or_else(|| {
            let names: Vec<&str> = Self::ALL.iter().map(|s| s.as_str()).collect();
            format!("unknown state `{text}`; expected one of {}", names.join(", "))
        })
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_matches_spec_section_4() {
        use Event as E;
        use JobState as S;
        let legal = [
            (S::AwaitingApproval, E::Approved, S::Queued),
            (S::AwaitingApproval, E::Rejected, S::Rejected),
            (S::AwaitingApproval, E::ApprovalExpired, S::Expired),
            (S::AwaitingApproval, E::Cancel, S::Cancelled),
            (S::Queued, E::Lease, S::Leased),
            (S::Queued, E::GateBDeny, S::Denied),
            (S::Queued, E::NeedsApproval, S::AwaitingApproval),
            (S::Queued, E::Requeue, S::Queued),
            (S::Queued, E::DeadLetter, S::DeadLettered),
            (S::Queued, E::Cancel, S::Cancelled),
            (S::Leased, E::Succeed, S::Succeeded),
            (S::Leased, E::Fail, S::Failed),
            (S::Leased, E::Requeue, S::Queued),
            (S::Leased, E::DeadLetter, S::DeadLettered),
            (S::Leased, E::Cancel, S::Cancelled),
            (S::DeadLettered, E::OperatorRetry, S::Queued),
        ];
        let events = [
            E::Approved,
            E::Rejected,
            E::ApprovalExpired,
            E::Cancel,
            E::Lease,
            E::GateBDeny,
            E::NeedsApproval,
            E::Requeue,
            E::DeadLetter,
            E::Succeed,
            E::Fail,
            E::OperatorRetry,
        ];
        for from in JobState::ALL {
            for event in events {
                let expected = legal.iter().find(|(f, e, _)| *f == from && *e == event).map(|(_, _, to)| *to);
                assert_eq!(from.next(event).ok(), expected, "{from} + {event:?}");
            }
        }
    }

    #[test]
    fn terminal_states_have_no_exit() {
        for state in JobState::ALL.into_iter().filter(|s| s.is_terminal()) {
            assert!(state.next(Event::Cancel).is_err());
            assert!(state.next(Event::Requeue).is_err());
            assert_eq!(state.as_str().parse::<JobState>(), Ok(state));
        }
    }
}
