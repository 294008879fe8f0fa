//! What a run exercised, counted per fault class and summed across seeds, so that the suite
//! proves it reaches every path it claims to test rather than passing vacuously.

macro_rules! coverage {
    ($($(#[doc = $doc:literal])* $name:ident,)*) => {
        /// How often each interesting thing happened.
        #[derive(Clone, Copy, Debug, Default)]
        pub struct Coverage {
            $($(#[doc = $doc])* pub $name: u64,)*
        }

        impl Coverage {
            /// Adds another run's counts.
            pub fn add(&mut self, other: &Self) {
                $(self.$name += other.$name;)*
            }

            /// Every count, by name.
            pub fn entries(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($name), self.$name),)*]
            }
        }
    };
}

coverage! {
    /// Jobs admitted at Gate A.
    submitted,
    /// Gate A denials.
    gate_a_denies,
    /// Gate A throttle refusals.
    gate_a_throttled,
    /// Leases granted after a Gate B decision.
    leases,
    /// Leases granted without a decision (fail open).
    bypasses,
    /// Gate B denials.
    gate_b_denies,
    /// Gate B sent a job back for a (fresh) approval.
    needs_approval,
    /// Gate B throttle refusals (requeued, uncounted).
    throttle_deferrals,
    /// Counted requeues because the safety check was unavailable.
    unavailable_requeues,
    /// Jobs dead-lettered (scheduling or execution attempts exhausted).
    dead_letters,
    /// Approvals whose binding broke (refused at approve time, or stale at Gate B).
    stale_approvals,
    /// Approval requests that outlived their TTL.
    expired_approvals,
    /// Approval quorums reached.
    approvals_granted,
    /// Approval requests rejected.
    approvals_rejected,
    /// Self-approvals refused.
    self_approvals_refused,
    /// Breaker transitions into open.
    breaker_openings,
    /// Half-open probes admitted.
    breaker_probes,
    /// Half-open probes admitted while an earlier probe of the same period was in flight.
    concurrent_probes,
    /// Calls refused by an open breaker.
    breaker_refusals,
    /// Calls refused while half-open because every probe was out.
    probe_cap_refusals,
    /// Decisions thrown away because the safety service answered under an older snapshot.
    superseded_decisions,
    /// Safety answers for jobs that were cancelled while the check ran.
    dropped_checks,
    /// Policy publishes and rollbacks.
    publishes,
    /// Successful completions accepted.
    successes,
    /// Retryable worker failures accepted.
    retryable_failures,
    /// Permanent worker failures accepted.
    permanent_failures,
    /// Completions refused because the same completion was already applied.
    duplicate_completions_rejected,
    /// Completions refused because their lease token was no longer current.
    stale_token_completions_rejected,
    /// Heartbeats refused for a stale token.
    stale_heartbeats,
    /// Duplicated claim commits refused by the transition table.
    duplicate_claims_rejected,
    /// Claim requests lost before the scheduler saw them.
    lost_claims,
    /// Messages lost on the wire.
    lost_messages,
    /// Messages delivered twice.
    duplicated_messages,
    /// Leases that expired.
    lease_expiries,
    /// Worker crashes.
    worker_crashes,
    /// Cancellations.
    cancels,
    /// Operator retries out of the DLQ.
    operator_retries,
    /// Clock steps backwards.
    clock_backwards,
    /// Clock jumps of a minute or more.
    clock_jumps,
}
