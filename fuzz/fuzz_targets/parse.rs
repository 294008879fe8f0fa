//! Fuzz target `parse`: arbitrary bytes through `airlock_policy::compile`, which must refuse
//! bad input with errors and never panic. The body lives in `src/lib.rs`, shared with the
//! corpus test in `cargo test`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| airlock_policy_fuzz::parse(data));
