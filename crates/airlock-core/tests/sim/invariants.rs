//! The invariants the simulator checks after every step and at the end of a run. They read
//! the world's state and its record of this step's leases; they never trust the code that
//! produced them, so each re-derives what it checks (the decision, the binding, the ledger).

use airlock_core::Millis;
use airlock_core::approval::{self, Status};
use airlock_core::state::JobState;
use airlock_policy::Decision;

use super::world::{Grant, Outcome, World};

impl World<'_> {
    /// Everything that must hold after every step.
    pub(super) fn check(&mut self) -> Outcome {
        if let Some(violation) = self.pending_violation.take() {
            return Err(violation);
        }
        let mut live_per_job = vec![0u32; self.jobs.len()];
        for &j in self.live.values() {
            live_per_job[j] += 1;
        }
        let caps = self.cfg.caps;
        for (j, job) in self.jobs.iter().enumerate() {
            let fail = |what: String| Err(self.violation(Some(j), &what));
            if live_per_job[j] > 1 {
                return fail(format!("{} live leases at once", live_per_job[j]));
            }
            match (job.state(), job.lease()) {
                (JobState::Leased, Some(lease)) if self.live.get(&lease.token) != Some(&j) => {
                    return fail(format!("leased under token {} that the ledger does not hold", lease.token));
                }
                (JobState::Leased, None) => return fail("leased without a lease".into()),
                // A job that may be leased again holds no lease; a finished or cancelled one keeps
                // its last, as the stores do, but no move's precondition honours it any more.
                (state, Some(lease)) if state != JobState::Leased && !state.is_terminal() => {
                    return fail(format!("`{state}` but still holding lease token {}", lease.token));
                }
                (state, _) if state != JobState::Leased && live_per_job[j] != 0 => {
                    return fail(format!("`{state}` but the ledger holds a live lease for it"));
                }
                _ => {}
            }
            if job.successes > 1 {
                return fail(format!("{} successful completions", job.successes));
            }
            if (job.state() == JobState::Succeeded) != (job.successes == 1) {
                return fail(format!("`{}` after {} successful completions", job.state(), job.successes));
            }
            if job.scheduling_attempts() > caps.scheduling_attempts_max {
                return fail(format!(
                    "{} scheduling attempts, cap {}",
                    job.scheduling_attempts(),
                    caps.scheduling_attempts_max
                ));
            }
            if job.execution_attempts() > caps.execution_attempts_max {
                return fail(format!(
                    "{} execution attempts, cap {}",
                    job.execution_attempts(),
                    caps.execution_attempts_max
                ));
            }
            let pending = job.requests.last().is_some_and(|r| r.status == Status::Pending);
            if job.state() == JobState::AwaitingApproval && !pending {
                return fail("awaiting approval without a pending request".into());
            }
        }
        // Every lease that appeared since the last check came from Gate B in this step, and
        // every lease Gate B granted in this step (even one already gone) was justified.
        for (&token, &j) in &self.live {
            if !self.prev_live.contains(&token) && !self.grants.iter().any(|g| g.token == token) {
                return Err(
                    self.violation(Some(j), &format!("lease token {token} without a Gate B decision"))
                );
            }
        }
        for grant in &self.grants {
            self.check_grant(grant)?;
        }
        self.prev_live = self.live.keys().copied().collect();
        Ok(())
    }

    /// A lease needs an allow, a throttle admitted by Gate B's budget, or a valid approval,
    /// all under the snapshot active now; or, with the safety check unavailable, fail open.
    fn check_grant(&self, grant: &Grant) -> Outcome {
        let j = grant.job;
        let job = &self.jobs[j];
        let fail = |what: String| Err(self.violation(Some(j), &what));
        if grant.bypassed || grant.unavailable {
            if !(grant.bypassed && grant.unavailable) {
                return fail(format!(
                    "lease with bypassed={} while the safety check was {}",
                    grant.bypassed,
                    if grant.unavailable { "unavailable" } else { "available" }
                ));
            }
            if grant.fail_mode != self.expected_fail_mode(j)
                || grant.fail_mode != airlock_core::dispatch::FailMode::Open
            {
                return fail(format!("bypassed Gate B in fail mode {:?}", grant.fail_mode));
            }
            if !job.bypassed {
                return fail("bypassed Gate B without marking the job `gate_b_bypassed`".into());
            }
            return Ok(());
        }
        let active = self.active_policy();
        let Some((decision, snapshot)) = &grant.decision else {
            return fail("lease without a decision and without a bypass".into());
        };
        if snapshot != active.hash() {
            return fail(format!("leased under snapshot {snapshot}, but {} is active", active.hash()));
        }
        let evaluation = active.evaluate(&job.job);
        if evaluation.decision != *decision {
            return fail(format!(
                "leased on `{decision}`, but the active snapshot decides `{}`",
                evaluation.decision
            ));
        }
        match decision {
            Decision::Allow => Ok(()),
            Decision::Deny => fail("leased on a `deny`".into()),
            Decision::Throttle if grant.charged_now => Ok(()),
            Decision::Throttle => fail("leased on a `throttle` that Gate B's budget never admitted".into()),
            Decision::RequireHuman => {
                let Some(request) = &grant.approval else {
                    return fail("leased on `require_human` without an approval".into());
                };
                if request.status != Status::Approved {
                    return fail(format!("leased on `require_human` with a `{}` approval", request.status));
                }
                if let Err(stale) =
                    approval::check_binding(request, &job.job, active, self.cfg.binding, self.now)
                {
                    return fail(format!("leased on `require_human` with a stale approval: {stale}"));
                }
                if self.cfg.strict.rule_coverage {
                    for rule in evaluation.deciding.iter().filter_map(|i| active.rule(*i)) {
                        if !request.rule_ids.contains(&rule.id) {
                            return fail(format!(
                                "leased on `require_human` from rule `{}`, but the {:?}-bound approval \
                                 (rules {:?}, {} approver(s)) never covered that rule",
                                rule.id,
                                self.cfg.binding,
                                request.rule_ids,
                                request.approvers.len()
                            ));
                        }
                        if (request.approvers.len() as u64) < u64::from(rule.approvals) {
                            return fail(format!(
                                "leased on `require_human` from rule `{}` (quorum {}) with {} approver(s)",
                                rule.id,
                                rule.approvals,
                                request.approvers.len()
                            ));
                        }
                    }
                }
                Ok(())
            }
        }
    }

    fn expected_fail_mode(&self, j: usize) -> airlock_core::dispatch::FailMode {
        use super::world::FailPolicy;
        use airlock_core::dispatch::FailMode;
        match self.cfg.fail {
            FailPolicy::Closed => FailMode::Closed,
            FailPolicy::Open => FailMode::Open,
            FailPolicy::OpenExceptHighRisk if self.jobs[j].high_risk => FailMode::Closed,
            FailPolicy::OpenExceptHighRisk => FailMode::Open,
        }
    }

    /// After the drain: every job is terminal, dead-lettered, awaiting a human, or queued
    /// within its retry horizon; nothing is leased past its lease.
    pub(super) fn check_end(&self) -> Outcome {
        let caps = &self.cfg.caps;
        let throttle_wait_ms = self
            .policies
            .iter()
            .flat_map(|p| p.rules())
            .filter_map(|r| r.limit.as_ref())
            .map(|l| (l.per_secs * 1000).div_ceil(u64::from(l.rate.max(1))))
            .max()
            .unwrap_or(0);
        let horizon_ms = (caps.backoff_cap_ms * 3 / 2).max(throttle_wait_ms) as Millis;
        for (j, job) in self.jobs.iter().enumerate() {
            let fail = |what: String| Err(self.violation(Some(j), &format!("at the end of the run: {what}")));
            match job.state() {
                s if s.is_terminal() => {}
                JobState::DeadLettered | JobState::AwaitingApproval => {}
                JobState::Queued => {
                    if job.scheduling_attempts() >= caps.scheduling_attempts_max {
                        return fail(format!(
                            "queued with {} scheduling attempts used of {}",
                            job.scheduling_attempts(),
                            caps.scheduling_attempts_max
                        ));
                    }
                    if job.not_before() > self.now + horizon_ms {
                        return fail(format!(
                            "queued until +{} ms, beyond the {horizon_ms} ms retry horizon",
                            job.not_before() - self.now
                        ));
                    }
                }
                JobState::Leased => match job.lease() {
                    Some(lease) if lease.expires_at > self.now => {}
                    lease => return fail(format!("stuck in `leased` past its lease ({lease:?})")),
                },
                other => return fail(format!("in unexpected state `{other}`")),
            }
        }
        Ok(())
    }
}
