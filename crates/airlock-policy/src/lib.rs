//! Airlock's policy language (SPEC section 3): YAML in, a compiled and hashed [`Policy`] out,
//! and a decision for any [`Job`]. No I/O, no clock, no async: everything here is a pure
//! function of its arguments, so the gates, the CLI and the simulator all share one engine.

mod analysis;
pub mod cases;
pub mod cidr;
mod compile;
pub mod diag;
mod eval;
pub mod glob;
pub mod jcs;
pub mod job;
pub mod limits;
pub mod model;
pub mod path;
mod policy;
pub mod schema;
pub mod yaml;

pub use compile::{Budget, Refused, compile, compile_within};
pub use diag::{Diagnostic, Severity, Span};
pub use eval::EvalError;
pub use job::{FieldError, Job};
pub use model::{Decision, Limit, LimitKey, Mode, Rule, TerraformTopic};
pub use policy::{Evaluation, Explanation, Policy, RuleIdx, Verdict};
