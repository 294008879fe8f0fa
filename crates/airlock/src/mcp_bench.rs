//! `airlock bench mcp`: what `airlock mcp proxy` adds to an allowed tool call. One run starts
//! its own embedded server (as `bench submit` does), the upstream MCP server twice (once
//! direct, once behind the proxy, both alive for the whole run), and times the same sequence
//! of `tools/call`s on both in alternating blocks, each call awaited before the next. Every
//! proxied answer must equal the direct one before any time counts. Each call has its own
//! arguments (`{n}` in `--arguments` is the call's number), so every proxied call is a new job
//! through Gate A, a claim through Gate B, and a completion.

use std::io::{BufRead as _, BufReader, Write as _};
use std::process::{Child, ChildStdin, Command, ExitCode, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use airlock_mcp::jsonrpc::{self, Message};
use clap::Args;
use serde_json::{Value, json};

use crate::Format;
use crate::bench_cmd::{BENCH_ADMIN_KEY, start_server};

/// Calls timed on one side before switching to the other.
const BLOCK: usize = 25;
/// Longest wait for one answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Args)]
pub struct McpArgs {
    /// Calls timed on each side.
    #[arg(long, default_value_t = 500)]
    calls: usize,
    /// Calls made on each side before timing starts.
    #[arg(long, default_value_t = 50)]
    warmup: usize,
    /// The tool to call.
    #[arg(long, default_value = "echo")]
    tool: String,
    /// The call's arguments as JSON; `{n}` is replaced by the call's number.
    #[arg(long, default_value = r#"{"message": "bench call {n}"}"#)]
    arguments: String,
    #[arg(long, value_enum, default_value_t)]
    format: Format,
    /// The upstream MCP server's command line.
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<String>,
}

pub fn run(args: &McpArgs) -> ExitCode {
    match bench(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// An MCP session with a server on stdio, killed when dropped.
struct Session {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
    next_id: u64,
}

impl Session {
    fn start(command: &[String], env: &[(&str, &str)]) -> Result<Self, String> {
        let (program, args) = command.split_first().ok_or("no server command")?;
        let mut child = Command::new(program)
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start `{program}`: {e}"))?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err("no stdio for the server".into());
        };
        let (sender, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        let mut session = Self { child, stdin, lines, next_id: 0 };
        let hello = json!({"protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": {"name": "airlock-bench", "version": env!("CARGO_PKG_VERSION")}});
        session.request("initialize", &hello)?;
        session.send(&jsonrpc::notification("notifications/initialized", &json!({})))?;
        Ok(session)
    }

    fn send(&mut self, line: &str) -> Result<(), String> {
        writeln!(self.stdin, "{line}")
            .and_then(|()| self.stdin.flush())
            .map_err(|e| format!("the server is gone: {e}"))
    }

    /// One request and its answer's result.
    fn request(&mut self, method: &str, params: &Value) -> Result<Value, String> {
        self.next_id += 1;
        let id = json!(self.next_id);
        self.send(&jsonrpc::request(&id, method, params))?;
        loop {
            let line =
                self.lines.recv_timeout(ANSWER_TIMEOUT).map_err(|_| format!("no answer to `{method}`"))?;
            if let Ok(Message::Response { id: got, outcome }) = jsonrpc::parse(&line)
                && got == id
            {
                return outcome.map_err(|e| format!("`{method}` failed: {e}"));
            }
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn bench(args: &McpArgs) -> Result<(), String> {
    if args.calls == 0 {
        return Err("`--calls` must be at least 1".into());
    }
    let arguments = |n: usize| -> Result<Value, String> {
        serde_json::from_str(&args.arguments.replace("{n}", &n.to_string()))
            .map_err(|e| format!("`--arguments` is not JSON once `{{n}}` is replaced: {e}"))
    };
    arguments(0)?;
    let server = start_server(None)?;
    let key = agent_key(&server.addr)?;
    let url = format!("http://{}", server.addr);
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut proxied_command = vec![exe.to_string_lossy().into_owned(), "mcp".into(), "proxy".into()];
    proxied_command.extend(["--name".into(), "bench".into(), "--url".into(), url, "--".into()]);
    proxied_command.extend(args.command.iter().cloned());
    let mut direct = Session::start(&args.command, &[])?;
    let mut proxied = Session::start(&proxied_command, &[("AIRLOCK_API_KEY", &key), ("RUST_LOG", "error")])?;

    let call = |session: &mut Session, n: usize| -> Result<(Value, Duration), String> {
        let params = json!({"name": args.tool, "arguments": arguments(n)?});
        let started = Instant::now();
        let result = session.request("tools/call", &params)?;
        Ok((result, started.elapsed()))
    };
    let total = args.warmup + args.calls;
    let (mut direct_ms, mut proxied_ms) = (Vec::with_capacity(args.calls), Vec::with_capacity(args.calls));
    let mut n = 0;
    while n < total {
        let block = n..(n + BLOCK).min(total);
        let mut direct_results = Vec::with_capacity(BLOCK);
        for i in block.clone() {
            let (result, took) = call(&mut direct, i)?;
            if i >= args.warmup {
                direct_ms.push(took.as_secs_f64() * 1e3);
            }
            direct_results.push(result);
        }
        for (i, expected) in block.clone().zip(direct_results) {
            let (result, took) = call(&mut proxied, i)?;
            if result != expected {
                return Err(format!("call {i}: the proxy answered {result}, the server directly {expected}"));
            }
            if result.get("isError") == Some(&Value::Bool(true)) {
                return Err(format!("call {i} is a tool error, not an allowed call: {result}"));
            }
            if i >= args.warmup {
                proxied_ms.push(took.as_secs_f64() * 1e3);
            }
        }
        n = block.end;
    }
    direct_ms.sort_by(f64::total_cmp);
    proxied_ms.sort_by(f64::total_cmp);
    let pct = |v: &[f64], p: f64| {
        let at = ((v.len() as f64 - 1.0) * p).round() as usize;
        v.get(at).copied().unwrap_or(f64::NAN)
    };
    let (d50, d99, p50, p99) =
        (pct(&direct_ms, 0.5), pct(&direct_ms, 0.99), pct(&proxied_ms, 0.5), pct(&proxied_ms, 0.99));
    match args.format {
        Format::Json => println!(
            "{}",
            json!({
                "calls": args.calls, "warmup": args.warmup, "tool": args.tool,
                "direct_ms": {"p50": d50, "p99": d99},
                "proxied_ms": {"p50": p50, "p99": p99},
                "overhead_ms": {"p50": p50 - d50, "p99": p99 - d99},
            })
        ),
        Format::Human => {
            println!(
                "{} calls of `{}` on each side ({} warm-up), alternating blocks of {BLOCK}",
                args.calls, args.tool, args.warmup
            );
            println!("direct     p50 {d50:.2} ms, p99 {d99:.2} ms");
            println!("proxied    p50 {p50:.2} ms, p99 {p99:.2} ms");
            println!("overhead   p50 {:.2} ms, p99 {:.2} ms (target: p50 ≤ 3 ms)", p50 - d50, p99 - d99);
        }
    }
    Ok(())
}

/// A key with the submitter and worker roles, made with the bench server's admin key.
fn agent_key(addr: &str) -> Result<String, String> {
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let body = json!({"tenant": "bench", "name": "mcp-proxy", "roles": ["submitter", "worker"]});
    let mut response = agent
        .post(format!("http://{addr}/api/v1/keys"))
        .header("authorization", format!("Bearer {BENCH_ADMIN_KEY}"))
        .header("content-type", "application/json")
        .send(body.to_string())
        .map_err(|e| format!("cannot create the proxy's key: {e}"))?;
    let text = response.body_mut().read_to_string().map_err(|e| e.to_string())?;
    let reply: Value =
        serde_json::from_str(&text).map_err(|_| format!("the key answer is not JSON: {text}"))?;
    reply.get("key").and_then(Value::as_str).map(str::to_owned).ok_or_else(|| format!("no key in {reply}"))
}
