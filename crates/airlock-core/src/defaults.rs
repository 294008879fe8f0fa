//! Every default and limit of SPEC section 13 and of the API, in one table. Each is
//! overridable in configuration where the spec says so; the values here are what a fresh
//! install runs with.

use crate::Millis;

/// Gate A evaluation timeout (SPEC 5).
pub const GATE_A_TIMEOUT_MS: u64 = 5_000;
/// Gate B safety client timeout (SPEC 6).
pub const GATE_B_CLIENT_TIMEOUT_MS: u64 = 2_000;
/// Gate B engine defence timeout (SPEC 6).
pub const GATE_B_ENGINE_TIMEOUT_MS: u64 = 3_000;
/// Consecutive safety failures that open the breaker.
pub const BREAKER_FAILURES_TO_OPEN: u32 = 3;
/// How long the breaker stays open.
pub const BREAKER_OPEN_MS: u64 = 30_000;
/// Probe calls admitted while half-open.
pub const BREAKER_HALF_OPEN_PROBES: u32 = 3;
/// Scheduling attempts before a job is dead-lettered.
pub const SCHEDULING_ATTEMPTS_MAX: u32 = 50;
/// Backoff cap between scheduling attempts.
pub const BACKOFF_CAP_MS: u64 = 30_000;
/// First backoff between scheduling attempts.
pub const BACKOFF_BASE_MS: u64 = 1_000;
/// Execution attempts before a job is dead-lettered.
pub const EXECUTION_ATTEMPTS_MAX: u32 = 3;
/// Lease length.
pub const LEASE_MS: u64 = 30_000;
/// Heartbeat interval workers are told to keep.
pub const HEARTBEAT_MS: u64 = 10_000;
/// How long an approval request stays valid.
pub const APPROVAL_TTL_MS: Millis = 24 * 3600 * 1000;
/// How long an idempotency key is remembered.
pub const IDEMPOTENCY_RETENTION_MS: Millis = 30 * 24 * 3600 * 1000;
/// Largest request body, in bytes.
pub const REQUEST_BODY_BYTES_MAX: usize = 1024 * 1024;
/// Largest policy accepted by `POST /api/v1/policy/publish`, in bytes.
pub const POLICY_BODY_BYTES_MAX: usize = airlock_policy::limits::POLICY_BYTES_MAX;
/// Largest Terraform plan JSON accepted by `POST /api/v1/plans`, in bytes (plans of
/// thousands of resources run to megabytes).
pub const PLAN_BODY_BYTES_MAX: usize = 32 * 1024 * 1024;
/// Most changes of a plan job explained rule by rule in `GET /api/v1/approvals/{id}`
/// (`plan_explanations`), and shown by the console.
pub const PLAN_CHANGES_EXPLAINED_MAX: usize = 200;
/// Largest page of a list endpoint.
pub const PAGE_SIZE_MAX: u32 = 500;
/// Page size when the client names none.
pub const PAGE_SIZE_DEFAULT: u32 = 50;
/// Most audit records (gate decisions, transitions) the job view shows for one job.
pub const JOB_VIEW_AUDIT_MAX: u32 = 1_000;
/// Topics of MCP tool calls (`airlock mcp proxy`): `mcp.<server>.<tool>`.
pub const MCP_TOPICS: &str = "mcp.**";
/// Execution attempts of an MCP tool call: a call is never run again unless the agent asks again.
pub const MCP_EXECUTION_ATTEMPTS_MAX: u32 = 1;
/// How long the MCP proxy holds a tool call that needs a human before it answers "pending".
pub const MCP_APPROVAL_WAIT_MS: u64 = 120_000;
/// Largest tool result the MCP proxy records with its job (the agent gets it whole); the
/// server's limit on a worker's result.
pub const MCP_RESULT_BYTES_MAX: usize = 256 * 1024;

/// A console session ends after this long without a request.
pub const CONSOLE_SESSION_IDLE_MS: u64 = 30 * 60 * 1000;
/// A console session ends this long after sign-in, however active.
pub const CONSOLE_SESSION_ABSOLUTE_MS: u64 = 12 * 3600 * 1000;
/// How often an open console page asks whether its data changed (live updates).
pub const CONSOLE_LIVE_POLL_MS: u64 = 250;
const _: () = assert!(CONSOLE_SESSION_IDLE_MS <= CONSOLE_SESSION_ABSOLUTE_MS);
const _: () = assert!(GATE_B_CLIENT_TIMEOUT_MS < GATE_B_ENGINE_TIMEOUT_MS);
const _: () = assert!(HEARTBEAT_MS * 3 <= LEASE_MS, "a worker gets three heartbeats per lease");
const _: () = assert!(BACKOFF_BASE_MS <= BACKOFF_CAP_MS);
const _: () = assert!(IDEMPOTENCY_RETENTION_MS > APPROVAL_TTL_MS);
const _: () = assert!(PAGE_SIZE_DEFAULT <= PAGE_SIZE_MAX);

// Exposure limits (issue 11): what a listener open to untrusted clients enforces.

/// Longest a client may take to send a request's headers before its connection is closed.
pub const HTTP_HEADER_READ_TIMEOUT_MS: u64 = 10_000;
/// Longest a connection may stay silent with no request in progress before it is closed.
pub const HTTP_IDLE_TIMEOUT_MS: u64 = 5_000;
/// Longest one request may take; a long-poll claim gets its `wait_ms` on top.
pub const HTTP_REQUEST_TIMEOUT_MS: u64 = 30_000;
/// Requests served at once; the excess is shed with 503 and `Retry-After`.
pub const HTTP_IN_FLIGHT_MAX: usize = 512;
/// Open connections; lowered at start to stay [`HTTP_FD_RESERVE`] below the file limit.
pub const HTTP_CONNECTIONS_MAX: usize = 4_096;
/// File descriptors kept free below the process's file limit (store, logs, refusals).
pub const HTTP_FD_RESERVE: usize = 64;
/// How long a shutdown waits for in-flight requests before it drops them.
pub const HTTP_DRAIN_TIMEOUT_MS: u64 = 30_000;
/// Largest dry-run body (`/policy/simulate`, `/explain`) carrying a candidate policy.
pub const CANDIDATE_BODY_BYTES_MAX: usize = 1024 * 1024;
/// Time a candidate policy's compilation and evaluation may take, off the async threads.
pub const CANDIDATE_BUDGET_MS: u64 = 2_000;
/// Total size of the compiled regexes of one policy, in bytes.
pub const POLICY_REGEX_BYTES_MAX: usize = airlock_policy::limits::REGEX_TOTAL_BYTES_MAX;
/// Failed authentications from one source address per minute before it gets 429.
pub const AUTH_FAILURES_PER_MINUTE: u32 = 20;

/// How often signed audit checkpoints are exported (`--audit-export`), when a head moved.
pub const AUDIT_CHECKPOINT_MS: u64 = 60_000;

/// Long-poll claims one key may keep waiting at once; one more gets 429 with `Retry-After`.
pub const CLAIM_LONG_POLLS_PER_KEY_MAX: usize = 64;
/// How often a waiting claim looks at the queue when nothing woke it and no job came due: a
/// safety net for a lost notification, not the way work is found.
pub const CLAIM_RECHECK_MS: u64 = 1_000;

const _: () = assert!(CLAIM_LONG_POLLS_PER_KEY_MAX <= HTTP_IN_FLIGHT_MAX);
const _: () = assert!(HTTP_IDLE_TIMEOUT_MS <= HTTP_HEADER_READ_TIMEOUT_MS);
const _: () = assert!(HTTP_IN_FLIGHT_MAX <= HTTP_CONNECTIONS_MAX);
const _: () = assert!(CANDIDATE_BODY_BYTES_MAX <= POLICY_BODY_BYTES_MAX);
