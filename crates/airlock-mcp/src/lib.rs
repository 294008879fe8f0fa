//! `airlock mcp proxy`: a governance proxy for any MCP server (SPEC 15). The agent launches the
//! proxy in place of the server; the proxy starts the server as its child and speaks MCP to
//! both. Every `tools/call` becomes an Airlock job (topic `mcp.<server>.<tool>`, payload = the
//! arguments): Gate A decides at the call, a human approves when the policy says so, Gate B
//! decides again when the proxy claims its own job just before forwarding, and the job records
//! the outcome. Everything else passes through unchanged.
//!
//! Architecture invariant: the proxy is a client like any other. It speaks Airlock's public
//! HTTP API and the worker protocol, and knows nothing of stores, buses or the server's crates.

mod airlock;
pub mod call;
mod http_upstream;
pub mod jsonrpc;
mod proxy;

pub use airlock::Airlock;
pub use proxy::{Options, PROTOCOL_VERSIONS, Upstream, run};
