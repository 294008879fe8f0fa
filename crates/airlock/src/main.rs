//! The `airlock` binary: the single entry point for every role and every tool.

mod admin_cmd;
mod audit_cmd;
mod bench_cmd;
mod bench_https;
mod client_cmd;
mod config;
mod console_bench;
mod demo_cmd;
mod inproc;
mod mcp_bench;
mod mcp_cmd;
mod plan_cmd;
mod policy_cmd;
mod raw_jetstream;
mod serve_cmd;
mod terraform_apply;
mod worker_cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

/// Runtime governance for autonomous agents that change infrastructure.
#[derive(Parser)]
#[command(name = "airlock", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check, test, simulate and explain policies offline; publish, roll back, list, diff on a server.
    #[command(subcommand)]
    Policy(policy_cmd::PolicyCommand),
    /// Run the service (embedded mode: one process, one SQLite file).
    Serve(Box<serve_cmd::ServeArgs>),
    /// Start Airlock in-process and walk through every case of the dual-gate model.
    Demo,
    /// Submit a job to a server through Gate A.
    #[command(after_help = client_cmd::SUBMIT_EXIT_CODES)]
    Submit(client_cmd::SubmitArgs),
    /// List, inspect and cancel jobs on a server.
    #[command(subcommand)]
    Jobs(client_cmd::JobsCommand),
    /// List, inspect, approve and reject approval requests on a server.
    #[command(subcommand)]
    Approvals(client_cmd::ApprovalsCommand),
    /// List, inspect, retry and discard dead-lettered jobs on a server.
    #[command(subcommand)]
    Dlq(client_cmd::DlqCommand),
    /// Create, list and revoke API keys on a server.
    #[command(subcommand)]
    Keys(client_cmd::KeysCommand),
    /// Verify the audit trail.
    #[command(subcommand)]
    Audit(audit_cmd::AuditCommand),
    /// Load generators for the benchmarks in BENCHMARKS.md.
    #[command(subcommand)]
    Bench(bench_cmd::BenchCommand),
    /// Run a command per job for a worker pool (job JSON on stdin, result on stdout).
    Worker(worker_cmd::WorkerArgs),
    /// Terraform/OpenTofu plans: check offline (CI), test cases, submit as one plan job.
    #[command(subcommand)]
    Plan(plan_cmd::PlanCommand),
    /// Govern MCP tool calls: a proxy in front of any MCP server.
    #[command(subcommand)]
    Mcp(mcp_cmd::McpCommand),
    /// Offline administration of a data directory (recover a platform admin key).
    #[command(subcommand)]
    Admin(admin_cmd::AdminCommand),
}

/// How results are printed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Readable text.
    #[default]
    Human,
    /// One JSON document on stdout, for machines.
    Json,
}

/// Exit status: 0 success, 1 bad input or failed checks; `--exit-code` adds 2 (deny) and
/// 3 (require_human). Usage errors exit 1 too, so that 2 and 3 only ever mean a decision.
fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { ExitCode::from(1) } else { ExitCode::SUCCESS };
        }
    };
    match cli.command {
        Command::Policy(command) => policy_cmd::run(command),
        Command::Serve(args) => serve_cmd::run(*args),
        Command::Demo => demo_cmd::run(),
        Command::Submit(args) => client_cmd::submit(&args),
        Command::Jobs(command) => client_cmd::jobs(command),
        Command::Approvals(command) => client_cmd::approvals(command),
        Command::Dlq(command) => client_cmd::dlq(command),
        Command::Keys(command) => client_cmd::keys(command),
        Command::Audit(command) => audit_cmd::run(command),
        Command::Bench(command) => bench_cmd::run(command),
        Command::Worker(args) => worker_cmd::run(args),
        Command::Plan(command) => plan_cmd::run(command),
        Command::Mcp(command) => mcp_cmd::run(command),
        Command::Admin(command) => admin_cmd::run(command),
    }
}
