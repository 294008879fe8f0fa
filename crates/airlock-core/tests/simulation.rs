//! Deterministic simulation of the scheduler core (SPEC 4, 6, 7, 8), so that faults are tested by the thousand.
//! Seeds `0..AIRLOCK_SIM_SEEDS` (default 10,000) each run a random workload through random faults with every
//! invariant checked after every step; a failing seed prints `AIRLOCK_SIM_SEED=<n>`, which replays it exactly
//! with a trace of every event.
#![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic, reason = "a test fails by panicking")]

mod sim;

use std::panic::{self, AssertUnwindSafe};

use airlock_policy::Policy;
use sim::coverage::Coverage;
use sim::world::{self, Options, Sabotage, Strict, TraceMode};

/// Seeds a sweep runs unless `AIRLOCK_SIM_SEEDS` says otherwise.
const SEEDS_DEFAULT: u64 = 10_000;
/// Below this many seeds, a fault class that never happened is not yet a failure.
const SEEDS_FOR_COVERAGE: u64 = 1_000;
/// Trace lines shown for a failing seed found by a sweep.
const TRACE_TAIL_LINES: usize = 60;

fn env_u64(name: &str) -> Option<u64> {
    let text = std::env::var(name).ok()?;
    Some(text.trim().parse().unwrap_or_else(|_| panic!("{name} must be a number, got `{text}`")))
}

fn replay_command(seed: u64, test: &str) -> String {
    format!("AIRLOCK_SIM_SEED={seed} cargo test -p airlock-core --test simulation {test} -- --nocapture")
}

/// One seed, with a panic inside the core turned into a failure that still names the seed.
fn run_one(
    seed: u64,
    policies: &[Policy],
    trace: TraceMode,
    options: Options,
) -> (Result<Coverage, String>, Vec<String>) {
    match panic::catch_unwind(AssertUnwindSafe(|| world::run(seed, policies, trace, options))) {
        Ok(outcome) => outcome,
        Err(payload) => {
            let message = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "a non-string panic".to_owned());
            (Err(format!("seed {seed} panicked: {message}")), Vec::new())
        }
    }
}

/// Runs seeds `0..count` on every core; returns the summed coverage and the failures by seed.
fn sweep(policies: &[Policy], count: u64, options: Options) -> (Coverage, Vec<(u64, String)>) {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(8) as u64;
    let results: Vec<(Coverage, Vec<(u64, String)>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                scope.spawn(move || {
                    let mut coverage = Coverage::default();
                    let mut failures = Vec::new();
                    for seed in (t..count).step_by(threads as usize) {
                        match run_one(seed, policies, TraceMode::Off, options).0 {
                            Ok(c) => coverage.add(&c),
                            Err(message) => failures.push((seed, message)),
                        }
                    }
                    (coverage, failures)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut coverage = Coverage::default();
    let mut failures = Vec::new();
    for (c, f) in results {
        coverage.add(&c);
        failures.extend(f);
    }
    failures.sort_by_key(|(seed, _)| *seed);
    (coverage, failures)
}

/// Replays one seed with a full trace, failing the test if the seed fails.
fn replay(seed: u64, policies: &[Policy], options: Options, test: &str) {
    println!("replaying seed {seed} with a trace of every event");
    let (outcome, _) = run_one(seed, policies, TraceMode::Print, options);
    match outcome {
        Ok(coverage) => println!("seed {seed} passes; coverage: {coverage:?}"),
        Err(message) => panic!("{message}\nreplay: {}", replay_command(seed, test)),
    }
}

/// Prints the failing seeds and the end of the first one's trace, then fails.
fn report(failures: &[(u64, String)], policies: &[Policy], options: Options, test: &str) -> ! {
    eprintln!("{} seed(s) failed; the first ones:", failures.len());
    for (seed, message) in failures.iter().take(10) {
        eprintln!("  seed {seed}: {message}\n    replay: {}", replay_command(*seed, test));
    }
    let (seed, message) = &failures[0];
    let (_, lines) = run_one(*seed, policies, TraceMode::Keep, options);
    eprintln!("last {TRACE_TAIL_LINES} events of seed {seed}:");
    for line in lines.iter().skip(lines.len().saturating_sub(TRACE_TAIL_LINES)) {
        eprintln!("  {line}");
    }
    panic!("{message}\nreplay: {}", replay_command(*seed, test));
}

fn print_coverage(count: u64, coverage: &Coverage) {
    println!("coverage over {count} seeds:");
    for (name, n) in coverage.entries() {
        println!("  {name:<34} {n:>10}");
    }
}

/// Runs the sweep (or, with `AIRLOCK_SIM_SEED`, replays one seed) for the test `test`.
fn simulate(test: &str, options: Options) {
    let policies = sim::policies::compile_all();
    if let Some(seed) = env_u64("AIRLOCK_SIM_SEED") {
        return replay(seed, &policies, options, test);
    }
    let count = env_u64("AIRLOCK_SIM_SEEDS").unwrap_or(SEEDS_DEFAULT);
    let (coverage, failures) = sweep(&policies, count, options);
    print_coverage(count, &coverage);
    if !failures.is_empty() {
        report(&failures, &policies, options, test);
    }
    if count >= SEEDS_FOR_COVERAGE {
        for (name, n) in coverage.entries() {
            assert!(n > 0, "{count} seeds never exercised `{name}`: the simulator lost a fault class");
        }
    }
}

/// The invariants of the issue, after every step of every seed.
#[test]
fn seeds_keep_every_invariant() {
    simulate("seeds_keep_every_invariant", Options::default());
}

/// Fails today (297 of 10,000 seeds; seed 16 and seed 64 are the two shapes): with
/// `Binding::Rule`, `approval::check_binding` only checks that the rules the approval names are
/// unchanged, not that they are the rules deciding now. A publish that adds a second
/// `require_human` rule (here with `approvals: 2`) next to an unchanged one lets a job through
/// with one approver (seed 16), and a request that names no rule binds to any rule (seed 64).
#[test]
fn rule_bound_approvals_cover_the_rules_deciding_now() {
    simulate(
        "rule_bound_approvals_cover_the_rules_deciding_now",
        Options { strict: Strict { rule_coverage: true, ..Strict::default() }, sabotage: None },
    );
}

/// Fails today (seeds 627 and 6766 of 10,000): `throttle::take` stores a bucket at a clock
/// that went backwards, so the same stretch of time refills it twice once the clock is back.
#[test]
fn throttle_budgets_hold_when_the_clock_steps_back() {
    simulate(
        "throttle_budgets_hold_when_the_clock_steps_back",
        Options { strict: Strict { budgets: true, ..Strict::default() }, sabotage: None },
    );
}

/// A seed is a complete description of a run: two runs of it take the same path.
#[test]
fn replays_are_exact() {
    let policies = sim::policies::compile_all();
    for seed in [0, 1, 7, 4_242] {
        let (first, first_lines) = world::run(seed, &policies, TraceMode::Keep, Options::default());
        let (second, second_lines) = world::run(seed, &policies, TraceMode::Keep, Options::default());
        assert_eq!(first_lines, second_lines, "seed {seed} took two different paths");
        assert_eq!(first.map(|c| c.entries()), second.map(|c| c.entries()), "seed {seed}");
    }
}

/// The invariants are not vacuous: each deliberately broken driver is caught within a few
/// hundred seeds, with the message that names what it broke.
#[test]
fn invariants_catch_a_broken_driver() {
    let policies = sim::policies::compile_all();
    let cases = [
        (Sabotage::LeaseOnDeny, "leased on a `deny`"),
        (Sabotage::ActOnOldSnapshot, "is active"),
        (Sabotage::SecondLease, "live leases at once"),
        (Sabotage::IgnoreCaps, "scheduling attempts, cap"),
    ];
    for (sabotage, expected) in cases {
        let options = Options { sabotage: Some(sabotage), ..Options::default() };
        let caught = (0..500).find_map(|seed| run_one(seed, &policies, TraceMode::Off, options).0.err());
        match caught {
            Some(message) => assert!(message.contains(expected), "{sabotage:?} caught as: {message}"),
            None => panic!("{sabotage:?} went unnoticed for 500 seeds"),
        }
    }
}
