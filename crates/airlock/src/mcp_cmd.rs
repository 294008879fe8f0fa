//! `airlock mcp proxy`: the MCP governance proxy (crate `airlock-mcp`) behind the CLI's flags
//! and environment variables.

use std::process::ExitCode;
use std::time::Duration;

use airlock_core::defaults::MCP_APPROVAL_WAIT_MS;
use clap::{Args, Subcommand};

/// The server `--url` names when neither the flag nor `AIRLOCK_URL` is set.
const DEFAULT_URL: &str = "http://127.0.0.1:8080";

#[derive(Subcommand)]
pub enum McpCommand {
    /// An MCP server on stdio in front of the MCP server run by CMD: every tool call becomes an
    /// Airlock job, decided by Gate A at the call and by Gate B just before it is forwarded.
    Proxy(ProxyArgs),
}

#[derive(Args)]
pub struct ProxyArgs {
    /// The upstream's name; tool calls become jobs with topic `mcp.<name>.<tool>`.
    #[arg(long)]
    name: String,
    /// The env of every job (what `env` rules match).
    #[arg(long, default_value = "default")]
    env: String,
    /// The worker pool the proxy claims its own jobs from (it must take `mcp.<name>.*`).
    #[arg(long, default_value = "default")]
    pool: String,
    /// Seconds a call that needs a human is held, with progress notifications, before the
    /// agent hears "pending approval"; the same call made again later continues the same job.
    #[arg(long, value_name = "SECS", default_value_t = MCP_APPROVAL_WAIT_MS / 1000)]
    approval_wait: u64,
    /// Leave out of `tools/list` the tools the policy denies for this key's principal whatever
    /// the arguments (provable from the rules: a matched deny rule that does not look at the
    /// payload); other tools stay listed, and every call is governed either way.
    #[arg(long)]
    hide_denied: bool,
    /// Where approvers approve, named in the "pending approval" answer [env: AIRLOCK_CONSOLE_URL].
    #[arg(long)]
    console_url: Option<String>,
    /// Airlock's base URL (Gate A and the API) [env: AIRLOCK_URL] [default: http://127.0.0.1:8080].
    #[arg(long)]
    url: Option<String>,
    /// Where the worker protocol is, when another process serves it (a `--role scheduler`)
    /// [env: AIRLOCK_WORKER_URL] [default: the `--url`].
    #[arg(long)]
    worker_url: Option<String>,
    /// An API key with the submitter and worker roles [env: AIRLOCK_API_KEY]. Prefer the
    /// variable: a flag shows in the process list.
    #[arg(long)]
    api_key: Option<String>,
    /// An upstream reached over MCP's streamable HTTP transport, in place of a command.
    #[arg(long, value_name = "URL", conflicts_with = "command")]
    upstream_url: Option<String>,
    /// The upstream MCP server's command line (after `--`, or after the last option).
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        required_unless_present = "upstream_url",
        num_args = 1..,
        value_name = "CMD"
    )]
    command: Vec<String>,
}

pub fn run(command: McpCommand) -> ExitCode {
    let McpCommand::Proxy(args) = command;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    // Stdout is the MCP channel: logs go to stderr, where MCP clients collect them.
    tracing_subscriber::fmt().with_env_filter(filter).with_ansi(false).with_writer(std::io::stderr).init();
    match proxy(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn proxy(args: ProxyArgs) -> Result<(), String> {
    let from_env = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    if args.name.trim().is_empty() {
        return Err("`--name` is empty: name the upstream server, e.g. `--name filesystem`".into());
    }
    if args.env.trim().is_empty() {
        return Err("`--env` is empty".into());
    }
    let url = args.url.or_else(|| from_env("AIRLOCK_URL")).unwrap_or_else(|| DEFAULT_URL.to_owned());
    let worker_url =
        args.worker_url.or_else(|| from_env("AIRLOCK_WORKER_URL")).unwrap_or_else(|| url.clone());
    let api_key = args
        .api_key
        .or_else(|| from_env("AIRLOCK_API_KEY"))
        .ok_or("no API key: set `AIRLOCK_API_KEY` to a key with the submitter and worker roles")?;
    let airlock = airlock_mcp::Airlock::new(&url, &worker_url, &api_key)?;
    airlock_mcp::run(
        airlock_mcp::Options {
            server: args.name.trim().to_owned(),
            env: args.env.trim().to_ascii_lowercase(),
            pool: args.pool,
            approval_wait: Duration::from_secs(args.approval_wait),
            console_url: args.console_url.or_else(|| from_env("AIRLOCK_CONSOLE_URL")),
            hide_denied: args.hide_denied,
            airlock,
            upstream: match args.upstream_url {
                Some(url) => airlock_mcp::Upstream::Url(url),
                None => airlock_mcp::Upstream::Command(args.command),
            },
        },
        signals()?,
    )
}

/// A receiver that gets one message on SIGTERM, SIGINT or SIGHUP: clients stop an MCP server
/// with a signal when closing its stdin does not end it at once.
fn signals() -> Result<std::sync::mpsc::Receiver<()>, String> {
    use tokio::signal::unix::{SignalKind, signal};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|e| format!("cannot watch for signals: {e}"))?;
    let (sender, receiver) = std::sync::mpsc::channel();
    let mut watched = Vec::new();
    for kind in [SignalKind::terminate(), SignalKind::interrupt(), SignalKind::hangup()] {
        let _guard = runtime.enter();
        watched.push(signal(kind).map_err(|e| format!("cannot watch for signals: {e}"))?);
    }
    std::thread::spawn(move || {
        runtime.block_on(async move {
            let waits = watched.iter_mut().map(|s| Box::pin(s.recv()));
            futures_util::future::select_all(waits).await;
        });
        let _ = sender.send(());
    });
    Ok(receiver)
}
