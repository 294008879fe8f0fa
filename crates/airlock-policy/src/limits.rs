//! Every bound the policy language enforces, in one place, so that a reader can see what a
//! hostile or careless input can cost.

/// Largest policy document accepted, in bytes. Big enough for 10,000 realistic rules.
pub const POLICY_BYTES_MAX: usize = 16 * 1024 * 1024;

/// Deepest YAML nesting (maps and lists) accepted in a policy or a cases file.
pub const YAML_DEPTH_MAX: usize = 64;

/// Deepest nesting of `all` / `any` / `not` inside one `when`.
pub const CONDITION_DEPTH_MAX: usize = 32;

/// Most rules in one policy.
pub const RULES_MAX: usize = 100_000;

/// Largest compiled size of one `regex` operator, in bytes (the `regex` crate's size limit).
pub const REGEX_SIZE_MAX: usize = 256 * 1024;

/// Total compiled size of one policy's regexes, in bytes: a budget per policy, not only per
/// regex, so that many regexes under the per-regex limit cannot add up to gigabytes.
pub const REGEX_TOTAL_BYTES_MAX: usize = 4 * 1024 * 1024;

/// What each regex is charged beyond its automata (matching caches, prefilters), in bytes.
pub const REGEX_OVERHEAD_BYTES: usize = 1024;

/// Largest lazy-DFA cache of one regex, in bytes (the `regex` crate's default is 2 MiB, which
/// a policy with thousands of regexes would multiply).
pub const REGEX_DFA_CACHE_BYTES: usize = 256 * 1024;

/// Most payload values one path may visit while expanding `[*]` during one evaluation.
/// Past it the rule errors, and an erroring rule fails closed (see `eval`).
pub const PATH_FANOUT_MAX: usize = 10_000;

/// Longest glob, in bytes.
pub const GLOB_BYTES_MAX: usize = 1_024;

/// Most wildcards in one glob (matching recurses once per wildcard).
pub const GLOB_WILDCARDS_MAX: usize = 32;

/// Most segments in one payload path.
pub const PATH_SEGMENTS_MAX: usize = 32;

/// Largest quorum a `require_human` rule may ask for.
pub const APPROVALS_MAX: u32 = 16;

/// Longest throttle window (`limit.per`), in seconds: one week.
pub const THROTTLE_PER_MAX_SECS: u64 = 7 * 24 * 3600;

/// Default throttle budget without a `limit`: 1 per minute per (tenant, topic) (SPEC 3.4).
pub const THROTTLE_DEFAULT_RATE: u32 = 1;
/// Window of the default throttle budget, in seconds.
pub const THROTTLE_DEFAULT_PER_SECS: u64 = 60;

/// Deepest JSON nesting accepted in a job's payload.
pub const PAYLOAD_DEPTH_MAX: usize = 64;

/// Most labels on one job.
pub const LABELS_MAX: usize = 64;

/// Longest label key or value, in bytes.
pub const LABEL_BYTES_MAX: usize = 256;

/// Most payload-schema violations reported for one job: enough to fix a payload in one round,
/// bounded so that a large payload's answer stays small.
pub const SCHEMA_VIOLATIONS_MAX: usize = 100;

/// Longest topic, env, tenant or principal, in bytes.
pub const NAME_BYTES_MAX: usize = 256;

const _: () = assert!(REGEX_SIZE_MAX <= REGEX_TOTAL_BYTES_MAX);
const _: () = assert!(CONDITION_DEPTH_MAX < YAML_DEPTH_MAX, "a `when` lives inside YAML nesting");
const _: () = assert!(THROTTLE_DEFAULT_PER_SECS <= THROTTLE_PER_MAX_SECS);
