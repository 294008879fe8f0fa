//! Airlock's domain, as pure functions and state machines: what a job is and which states it
//! may move through, how an approval stays bound to a job and a snapshot, how a throttle budget
//! refills, how the audit chain links. Time and randomness come in as arguments; nothing here
//! reads a clock, touches a disk or a socket.

pub mod approval;
pub mod audit;
pub mod breaker;
pub mod decided;
pub mod defaults;
pub mod dispatch;
pub mod ids;
pub mod moves;
pub mod record;
pub mod role;
pub mod state;
pub mod throttle;
pub mod votes;

/// Milliseconds since the Unix epoch: the only notion of time in the core.
pub type Millis = i64;
