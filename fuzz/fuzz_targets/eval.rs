//! Fuzz target `eval`: a policy and a job, checked for deterministic evaluation that agrees with
//! `explain` and with SPEC 3.3 precedence.
//!
//! Input format: the policy text, then a line holding exactly `---job---`, then the job as JSON:
//!
//! ```text
//! version: v1
//! rules: [{ id: r, when: { topic: a.b }, decision: deny }]
//! ---job---
//! {"topic": "a.b", "env": "production"}
//! ```
//!
//! Inputs without the separator line, or whose policy or job does not parse, are skipped. The
//! body lives in `src/lib.rs`, shared with the corpus test in `cargo test`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| airlock_policy_fuzz::eval(data));
