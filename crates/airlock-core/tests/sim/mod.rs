//! The deterministic simulator of the scheduler core: a seeded world (virtual clock, store
//! model, safety service, workers, approvers, network) that drives the pure functions of
//! `airlock_core` through faults and checks invariants after every step.

pub mod coverage;
mod invariants;
pub mod policies;
mod rng;
pub mod world;
