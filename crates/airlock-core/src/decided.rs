//! A gate's decision as the core records it: the evaluation, the snapshot it was made under and,
//! for a plan job, each change's decision. Both gates turn one into the same things — the
//! decision recorded on the job ([`Decided::record`]), the throttle budgets it takes
//! ([`Decided::budgets`]), the approval request it opens ([`Decided::request`]) and the details
//! its audit record carries ([`Decided::audit_data`]) — so they are built here, once.

use airlock_plan::PlanEvaluation;
use airlock_policy::{Evaluation, Job, Policy};
use serde_json::{Value, json};

use crate::Millis;
use crate::approval::Request;
use crate::record::{Budget, GateDecision};
use crate::throttle::bucket_key;

/// Which gate decided: each keeps its own throttle budgets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gate {
    /// At submit.
    A,
    /// At dispatch.
    B,
}

impl Gate {
    fn prefix(self) -> &'static str {
        match self {
            Self::A => "a",
            Self::B => "b",
        }
    }
}

/// An evaluation under a snapshot.
#[derive(Clone, Copy, Debug)]
pub struct Decided<'a> {
    /// The snapshot's policy.
    pub policy: &'a Policy,
    /// The snapshot's version.
    pub version: u64,
    /// The decision.
    pub evaluation: &'a Evaluation,
    /// For a plan job: every change's decision (`evaluation` is their most restrictive).
    pub plan: Option<&'a PlanEvaluation>,
}

impl Decided<'_> {
    /// Why, for humans: the deciding rule's reason, or for a plan job the summary over its
    /// changes.
    pub fn reason(&self) -> String {
        match self.plan {
            Some(plan) => plan.reason(self.policy),
            None => self.policy.reason(self.evaluation),
        }
    }

    /// The audit and answer fields of a plan job's decision: each change's decision and the
    /// count per decision. An empty object for other jobs.
    pub fn plan_fields(&self) -> Value {
        match self.plan {
            Some(plan) => json!({
                "changes": plan.changes_json(self.policy),
                "change_counts": plan.counts(),
            }),
            None => json!({}),
        }
    }

    /// The decision as recorded on the job, made at `at`.
    pub fn record(&self, at: Millis) -> GateDecision {
        GateDecision {
            decision: self.evaluation.decision,
            rule_ids: self.policy.ids(&self.evaluation.deciding).into_iter().map(str::to_owned).collect(),
            reason: self.reason(),
            snapshot_hash: self.policy.hash().to_owned(),
            snapshot_version: self.version,
            at,
            bypassed: false,
        }
    }

    /// The throttle budgets `gate` must take for `job`: one per deciding rule with a limit
    /// (none unless the decision is a throttle, whose deciding rules are the throttle rules).
    pub fn budgets(&self, gate: Gate, job: &Job) -> Vec<Budget> {
        if self.evaluation.decision != airlock_policy::Decision::Throttle {
            return Vec::new();
        }
        self.evaluation
            .deciding
            .iter()
            .filter_map(|i| self.policy.rule(*i))
            .filter_map(|rule| {
                let limit = rule.limit.clone()?;
                Some(Budget {
                    key: format!("{}|{}", gate.prefix(), bucket_key(&rule.id, &limit, job)),
                    limit,
                })
            })
            .collect()
    }

    /// The approval request a `require_human` decision opens, bound to `job_hash` and this
    /// snapshot's deciding rules.
    pub fn request(&self, job_hash: String, requested_by: String, at: Millis, ttl_ms: Millis) -> Request {
        Request::pending(self.policy, self.evaluation, job_hash, requested_by, at, ttl_ms)
    }

    /// The decision's details for its audit record: the decision, its rules and reason, the
    /// snapshot, the audit-mode rules that matched, the rules that failed to evaluate, and a
    /// plan job's per-change decisions.
    pub fn audit_data(&self, gate: &GateDecision) -> Value {
        let policy = self.policy;
        let mut data = json!({
            "decision": gate.decision.as_str(),
            "rule_ids": gate.rule_ids,
            "reason": gate.reason,
            "snapshot": gate.snapshot_hash,
            "snapshot_version": gate.snapshot_version,
            "audit_rule_ids": policy.ids(&self.evaluation.audit),
            "errors": self.evaluation.errors.iter().map(|(i, e)| json!({
                "rule_id": policy.rule(*i).map(|r| r.id.as_str()),
                "error": e.to_string(),
            })).collect::<Vec<_>>(),
        });
        merge(&mut data, self.plan_fields());
        data
    }
}

/// Adds `from`'s fields to `into` (both JSON objects; anything else is left as it is).
pub fn merge(into: &mut Value, from: Value) {
    if let (Value::Object(into), Value::Object(from)) = (into, from) {
        into.extend(from);
    }
}
