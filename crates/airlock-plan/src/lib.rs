//! Terraform and OpenTofu plans as governed actions (SPEC 15). Reads the JSON of
//! `terraform show -json PLANFILE`, turns every resource change that does something into a job
//! (topic `tf.<type>.<create|update|delete|replace>`, or the policy's `terraform.topics`
//! mapping) with its sensitive values replaced, and decides a whole plan as one plan job whose
//! decision is the most restrictive of its changes'. Pure: no I/O, no clock; the gates, the
//! CLI and the tests share it.

pub mod address;
pub mod cases;
pub mod compare;
mod evaluate;
mod plan;
pub mod redact;

pub use evaluate::{
    ChangeDecision, ChangeExplanation, LABEL_PLAN_FILE, LABEL_WORKSPACE, PLAN_TOPIC, PlanEvaluation,
    Submission, evaluate, evaluate_any, evaluate_any_within, evaluate_within, explain, is_plan_job, plan_job,
};
pub use plan::{Action, CHANGES_MAX, Change, PLAN_BYTES_MAX, Plan, PlanError};

/// The plan hash jobs are bound to: `sha256:` of the binary plan file when there is one, else
/// of the plan JSON.
pub fn plan_hash(bytes: &[u8]) -> String {
    airlock_policy::job::sha256_tagged(bytes)
}
