//! `airlock bench submit`: a load generator for Gate A's allow path. With no `--url` it starts
//! its own `airlock serve` (this binary) on a fresh data directory and loopback port, so that
//! one command measures the real server with durable commits; it reports throughput, latency
//! percentiles measured from each request's intended send time (no coordinated omission), and
//! the server's resident memory. `airlock bench e2e` measures submit → claim → complete, in
//! process by default, or with `--store postgres://…` against two `airlock serve` replicas
//! sharing one PostgreSQL schema (distributed mode).

use std::io::{BufRead as _, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use serde_json::json;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::Format;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Sustained submits on the allow path.
    Submit(SubmitArgs),
    /// End to end in embedded mode: submit → Gate B claim → complete, with several workers.
    E2e(E2eArgs),
    /// The raw NATS JetStream loop (publish with ack → pull → ack), the ceiling for the bus.
    Jetstream(JetstreamArgs),
}

#[derive(Args)]
pub struct JetstreamArgs {
    /// The NATS server.
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    url: String,
    /// How long to run, in seconds.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Message size in bytes (the bus carries a job id).
    #[arg(long, default_value_t = 32)]
    payload: usize,
    /// Publishes awaiting their ack at once.
    #[arg(long, default_value_t = 64)]
    window: usize,
}

#[derive(Args)]
pub struct E2eArgs {
    /// How long to submit for, in seconds.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Submits per second; 0 submits as fast as the connections allow.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Submitting connections.
    #[arg(long, default_value_t = 16)]
    submitters: usize,
    /// Workers (each one connection, claiming with long-poll).
    #[arg(long, default_value_t = 8)]
    workers: usize,
    /// Also run with both gates switched off (a benchmark-only setting) and report the cost.
    #[arg(long)]
    compare_gates_off: bool,
    /// Runs of each setting, alternating; medians are reported.
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// Distributed mode: start two `airlock serve --store URL` replicas (this binary) and spread
    /// submitters and workers across them. Without `options=-csearch_path%3D<schema>` in the
    /// URL, each run gets a fresh schema (created and dropped with `psql`).
    #[arg(long, value_name = "URL", conflicts_with = "compare_gates_off")]
    store: Option<String>,
    #[arg(long, value_enum, default_value_t)]
    format: Format,
}

#[derive(Args)]
pub struct SubmitArgs {
    /// Server to load (`host:port`). Without it, a fresh server is started and stopped.
    #[arg(long)]
    addr: Option<String>,
    /// An admin key of that server (default: `AIRLOCK_ADMIN_KEY`).
    #[arg(long)]
    admin_key: Option<String>,
    /// Requests per second to send; 0 sends as fast as the connections allow.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// How long to send for, in seconds.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Stop after this many requests (0: no limit).
    #[arg(long, default_value_t = 0)]
    total: u64,
    /// Connections (each carries one request at a time).
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Data directory for the server this command starts (default: a new temp directory).
    #[arg(long)]
    data: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t)]
    format: Format,
}

const BENCH_ADMIN_KEY: &str = "bench-admin-key-not-secret-0001";
const ALLOW_ALL: &str = "version: v1\ndefaults: { decision: allow }\nrules:\n  - id: deny-public-ingress\n    \
                         when: { topic: infra.security_group.update, env: production, cidr: \"0.0.0.0/0\" }\n    \
                         decision: deny\n";

pub fn run(command: BenchCommand) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match command {
        BenchCommand::Submit(args) => runtime.block_on(submit(args)),
        BenchCommand::E2e(args) => e2e(&runtime, &args),
        BenchCommand::Jetstream(args) => runtime.block_on(jetstream(&args)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A server this command started; killed when dropped.
struct OwnServer {
    child: Child,
    addr: String,
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_server(data: Option<PathBuf>) -> Result<OwnServer, String> {
    let data =
        data.unwrap_or_else(|| std::env::temp_dir().join(format!("airlock-bench-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&data);
    std::fs::create_dir_all(&data).map_err(|e| format!("cannot create `{}`: {e}", data.display()))?;
    let policy = data.join("bench-policy.yaml");
    std::fs::write(&policy, ALLOW_ALL).map_err(|e| e.to_string())?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let child = Command::new(exe)
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(&data)
        .arg("--policy")
        .arg(&policy)
        .env("AIRLOCK_ADMIN_KEY", BENCH_ADMIN_KEY)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot start the server: {e}"))?;
    listening(child)
}

/// Replicas in distributed mode.
const REPLICAS: usize = 2;

/// A PostgreSQL schema this command created; dropped with `psql` when dropped.
struct OwnSchema {
    base: String,
    name: String,
}

impl Drop for OwnSchema {
    fn drop(&mut self) {
        let _ = Command::new("psql")
            .args([&self.base, "-q", "-c", &format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name)])
            .env("PGOPTIONS", "-c client_min_messages=warning")
            .status();
    }
}

/// Starts the replicas of a distributed run on `url`; in a fresh schema unless the URL names one.
fn start_replicas(url: &str, run: usize) -> Result<(Option<OwnSchema>, Vec<OwnServer>), String> {
    let (url, schema) = if url.contains("search_path") {
        (url.to_owned(), None)
    } else {
        let name = format!("airlock_bench_{}_{run}", std::process::id());
        let created = Command::new("psql")
            .args([url, "-q", "-c", &format!("DROP SCHEMA IF EXISTS {name} CASCADE; CREATE SCHEMA {name}")])
            .env("PGOPTIONS", "-c client_min_messages=warning")
            .status()
            .map_err(|e| format!("cannot run psql to create a schema: {e}"))?;
        if !created.success() {
            return Err(format!("psql could not create schema {name} at {url}"));
        }
        let sep = if url.contains('?') { '&' } else { '?' };
        (format!("{url}{sep}options=-csearch_path%3D{name}"), Some(OwnSchema { base: url.to_owned(), name }))
    };
    let dir = std::env::temp_dir().join(format!("airlock-bench-pg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create `{}`: {e}", dir.display()))?;
    let policy = dir.join("bench-policy.yaml");
    std::fs::write(&policy, ALLOW_ALL).map_err(|e| e.to_string())?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut replicas = Vec::new();
    // One after the other: the first creates the tables, the admin key and the policy.
    for _ in 0..REPLICAS {
        let child = Command::new(&exe)
            .args(["serve", "--listen", "127.0.0.1:0", "--store", &url, "--policy"])
            .arg(&policy)
            .env("AIRLOCK_ADMIN_KEY", BENCH_ADMIN_KEY)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start a replica: {e}"))?;
        replicas.push(listening(child)?);
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok((schema, replicas))
}

/// Waits for a started server's "listening" line; the server is killed if it never comes.
fn listening(mut child: Child) -> Result<OwnServer, String> {
    let stdout = child.stdout.take().ok_or("no server stdout")?;
    let mut server = OwnServer { child, addr: String::new() };
    let mut lines = BufReader::new(stdout).lines();
    loop {
        match lines.next() {
            Some(Ok(line)) => {
                if let Some(rest) = line.strip_prefix("airlock listening on http://") {
                    server.addr = rest.split_whitespace().next().unwrap_or_default().to_owned();
                    break;
                }
            }
            _ => return Err("the server exited before listening".into()),
        }
    }
    // Keep reading stdout so that the server never writes into a closed pipe.
    std::thread::spawn(move || lines.for_each(drop));
    Ok(server)
}

fn resident_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// One keep-alive HTTP/1.1 connection.
struct Conn {
    stream: tokio::io::BufReader<TcpStream>,
}

impl Conn {
    async fn open(addr: &str) -> Result<Self, String> {
        let stream = TcpStream::connect(addr).await.map_err(|e| format!("cannot connect to {addr}: {e}"))?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        Ok(Self { stream: tokio::io::BufReader::new(stream) })
    }

    async fn post(&mut self, path: &str, key: &str, body: &str) -> Result<(u16, String), String> {
        let request = format!(
            "POST {path} HTTP/1.1\r\nhost: bench\r\nauthorization: Bearer {key}\r\ncontent-type: application/json\r\n\
             content-length: {}\r\n\r\n{body}",
            body.len()
        );
        self.stream.get_mut().write_all(request.as_bytes()).await.map_err(|e| e.to_string())?;
        let mut status_line = String::new();
        self.stream.read_line(&mut status_line).await.map_err(|e| e.to_string())?;
        let status: u16 =
            status_line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or("bad status line")?;
        let mut length = 0usize;
        loop {
            let mut line = String::new();
            self.stream.read_line(&mut line).await.map_err(|e| e.to_string())?;
            if line == "\r\n" || line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().map_err(|_| "bad content-length")?;
            }
        }
        let mut body = vec![0u8; length];
        self.stream.read_exact(&mut body).await.map_err(|e| e.to_string())?;
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }
}

async fn submit(args: SubmitArgs) -> Result<(), String> {
    let own = match &args.addr {
        Some(_) => None,
        None => Some(start_server(args.data.clone())?),
    };
    let addr = args.addr.clone().or_else(|| own.as_ref().map(|s| s.addr.clone())).ok_or("no server")?;
    let admin = match (&own, &args.admin_key) {
        (Some(_), _) => BENCH_ADMIN_KEY.to_owned(),
        (None, Some(k)) => k.clone(),
        (None, None) => {
            std::env::var("AIRLOCK_ADMIN_KEY").map_err(|_| "give --admin-key or AIRLOCK_ADMIN_KEY")?
        }
    };
    let tenant = format!("bench-{}", std::process::id());
    let mut setup = Conn::open(&addr).await?;
    let (status, body) = setup
        .post(
            "/api/v1/keys",
            &admin,
            &json!({"tenant": tenant, "name": "bench", "roles": ["submitter"]}).to_string(),
        )
        .await?;
    if status != 201 {
        return Err(format!("cannot create a submitter key ({status}): {body}"));
    }
    let key: String = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("key").and_then(serde_json::Value::as_str).map(str::to_owned))
        .ok_or("no key in the response")?;

    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.seconds);
    let mut workers = Vec::new();
    for _ in 0..args.connections.max(1) {
        let (next, key, addr) = (Arc::clone(&next), key.clone(), addr.clone());
        let (rate, total) = (args.rate, args.total);
        workers.push(tokio::spawn(async move {
            let mut conn = Conn::open(&addr).await?;
            let mut samples = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if total > 0 && i >= total {
                    break;
                }
                let intended = if rate > 0 { started + Duration::from_secs_f64(i as f64 / rate as f64) } else { Instant::now() };
                if intended >= deadline {
                    break;
                }
                if rate > 0 {
                    tokio::time::sleep_until(intended.into()).await;
                }
                let body = json!({"topic": "infra.vm.create", "env": "production", "payload": {"n": i, "size": "m5.large"}})
                    .to_string();
                let (status, _) = conn.post("/api/v1/jobs", &key, &body).await?;
                samples.push((status, intended.elapsed()));
            }
            Ok::<_, String>(samples)
        }));
    }
    let mut samples = Vec::new();
    for w in workers {
        samples.extend(w.await.map_err(|e| e.to_string())??);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let rss_kib = own.as_ref().and_then(|s| resident_kib(s.child.id()));
    report(&args, &samples, elapsed, rss_kib);
    Ok(())
}

fn report(args: &SubmitArgs, samples: &[(u16, Duration)], elapsed: f64, rss_kib: Option<u64>) {
    let accepted = samples.iter().filter(|(s, _)| *s == 202).count();
    let mut latencies: Vec<Duration> = samples.iter().map(|(_, l)| *l).collect();
    latencies.sort();
    let pct = |p: f64| -> f64 {
        let i = ((latencies.len() as f64 * p).ceil() as usize).saturating_sub(1);
        latencies.get(i).map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    let mut statuses = std::collections::BTreeMap::new();
    for (s, _) in samples {
        *statuses.entry(*s).or_insert(0u64) += 1;
    }
    let result = json!({
        "requests": samples.len(),
        "accepted": accepted,
        "statuses": statuses.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
        "seconds": elapsed,
        "accepted_per_sec": accepted as f64 / elapsed,
        "target_rate": args.rate,
        "connections": args.connections,
        "latency_ms": {"p50": pct(0.50), "p90": pct(0.90), "p99": pct(0.99), "max": pct(1.0)},
        "server_rss_mib": rss_kib.map(|k| k as f64 / 1024.0),
    });
    match args.format {
        Format::Json => println!("{result}"),
        Format::Human => {
            println!(
                "requests   {} in {elapsed:.1} s ({} accepted; statuses {:?})",
                samples.len(),
                accepted,
                statuses
            );
            println!(
                "throughput {:.0} accepted submits/s (target rate {})",
                accepted as f64 / elapsed,
                args.rate
            );
            println!(
                "latency    p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
                pct(0.50),
                pct(0.90),
                pct(0.99),
                pct(1.0)
            );
            if let Some(k) = rss_kib {
                println!("server RSS {:.1} MiB", k as f64 / 1024.0);
            }
        }
    }
}

/// One end-to-end run's figures.
struct E2eResult {
    submitted: usize,
    completed_in_window: usize,
    seconds: f64,
    submit_to_claim_ms: Vec<f64>,
}

impl E2eResult {
    fn completed_per_sec(&self) -> f64 {
        self.completed_in_window as f64 / self.seconds
    }

    fn percentile(&self, p: f64) -> f64 {
        let i = ((self.submit_to_claim_ms.len() as f64 * p).ceil() as usize).saturating_sub(1);
        self.submit_to_claim_ms.get(i).copied().unwrap_or(0.0)
    }

    fn json(&self) -> serde_json::Value {
        json!({
            "submitted": self.submitted,
            "completed_in_window": self.completed_in_window,
            "seconds": self.seconds,
            "completed_per_sec": self.completed_per_sec(),
            "submit_to_claim_ms": {"p50": self.percentile(0.5), "p90": self.percentile(0.9), "p99": self.percentile(0.99)},
        })
    }
}

async fn jetstream(args: &JetstreamArgs) -> Result<(), String> {
    let duration = Duration::from_secs(args.seconds);
    let n = airlock_bus::bench_loop(&args.url, args.payload, args.window.max(1), duration)
        .await
        .map_err(|e| e.to_string())?;
    #[allow(clippy::cast_precision_loss, reason = "a rate for display")]
    let rate = n as f64 / duration.as_secs_f64().max(f64::EPSILON);
    println!(
        "jetstream: {n} messages of {} bytes published, consumed and acked in {}s: {rate:.0} msg/s",
        args.payload, args.seconds
    );
    Ok(())
}

fn e2e(runtime: &tokio::runtime::Runtime, args: &E2eArgs) -> Result<(), String> {
    let mut on = Vec::new();
    let mut off = Vec::new();
    for run in 0..args.repeat.max(1) {
        on.push(match &args.store {
            None => e2e_run(runtime, args, false)?,
            Some(url) => {
                let (_schema, replicas) = start_replicas(url, run)?;
                let addrs: Vec<String> = replicas.iter().map(|r| r.addr.clone()).collect();
                runtime.block_on(e2e_load(args, &addrs, BENCH_ADMIN_KEY))?
            }
        });
        if args.compare_gates_off {
            off.push(e2e_run(runtime, args, true)?);
        }
    }
    let median = |runs: &mut Vec<E2eResult>| -> Option<E2eResult> {
        runs.sort_by(|a, b| a.completed_per_sec().total_cmp(&b.completed_per_sec()));
        let mid = runs.len() / 2;
        (!runs.is_empty()).then(|| runs.swap_remove(mid))
    };
    let all = |runs: &[E2eResult]| runs.iter().map(|r| r.completed_per_sec().round()).collect::<Vec<_>>();
    let (on_all, off_all) = (all(&on), all(&off));
    let on = median(&mut on).ok_or("no run")?;
    let off = median(&mut off);
    let cost = off.as_ref().map(|off| 1.0 - on.completed_per_sec() / off.completed_per_sec());
    match args.format {
        Format::Json => println!(
            "{}",
            json!({
                "gates_on": on.json(), "gates_off": off.as_ref().map(E2eResult::json),
                "gates_on_runs": on_all, "gates_off_runs": off_all, "throughput_lost_to_gates": cost,
            })
        ),
        Format::Human => {
            if let Some(url) = &args.store {
                println!("distributed: {REPLICAS} `airlock serve --store` replicas on {url}");
            }
            for (name, r, runs) in std::iter::once(("gates on ", &on, &on_all))
                .chain(off.as_ref().map(|o| ("gates off", o, &off_all)))
            {
                println!(
                    "{name}  median {:.0} jobs/s completed (runs {runs:?}; {} submitted); submit→claim p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms",
                    r.completed_per_sec(),
                    r.submitted,
                    r.percentile(0.5),
                    r.percentile(0.9),
                    r.percentile(0.99)
                );
            }
            if let Some(cost) = cost {
                println!("throughput lost to the two gates (medians): {:.1}%", cost * 100.0);
            }
        }
    }
    Ok(())
}

fn e2e_run(runtime: &tokio::runtime::Runtime, args: &E2eArgs, gates_off: bool) -> Result<E2eResult, String> {
    let config = airlock_server::state::Config { gates_off, ..airlock_server::state::Config::default() };
    let name = if gates_off { "bench-e2e-off" } else { "bench-e2e-on" };
    let server = crate::inproc::start(runtime, name, ALLOW_ALL, config)?;
    let result = runtime.block_on(e2e_load(args, &[server.addr.to_string()], crate::inproc::ADMIN));
    let _ = std::fs::remove_dir_all(&server.dir);
    result
}

/// One end-to-end load on servers sharing one store: submitter and worker `i` use `addrs[i % n]`.
async fn e2e_load(args: &E2eArgs, addrs: &[String], admin: &str) -> Result<E2eResult, String> {
    let server_for = |i: usize| addrs.get(i % addrs.len().max(1)).cloned().unwrap_or_default();
    {
        let mut setup = Conn::open(&server_for(0)).await?;
        let mut keys = Vec::new();
        for (name, role) in [("agent", "submitter"), ("worker", "worker")] {
            let body = json!({"tenant": "bench", "name": name, "roles": [role]}).to_string();
            let (status, reply) = setup.post("/api/v1/keys", admin, &body).await?;
            if status != 201 {
                return Err(format!("cannot create the {name} key ({status}): {reply}"));
            }
            let secret = serde_json::from_str::<serde_json::Value>(&reply)
                .ok()
                .and_then(|v| v.get("key").and_then(serde_json::Value::as_str).map(str::to_owned))
                .ok_or("no key in the response")?;
            keys.push(secret);
        }
        let (agent, worker) = (keys.remove(0), keys.remove(0));

        let started = Instant::now();
        let deadline = started + Duration::from_secs(args.seconds);
        let next = Arc::new(AtomicU64::new(0));
        let mut submitters = Vec::new();
        for i in 0..args.submitters.max(1) {
            let (addr, agent, next, rate) = (server_for(i), agent.clone(), Arc::clone(&next), args.rate);
            submitters.push(tokio::spawn(async move {
                let mut conn = Conn::open(&addr).await?;
                let mut sent = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let intended = if rate > 0 {
                        started + Duration::from_secs_f64(i as f64 / rate as f64)
                    } else {
                        Instant::now()
                    };
                    if intended >= deadline {
                        break;
                    }
                    if rate > 0 {
                        tokio::time::sleep_until(intended.into()).await;
                    }
                    let body = json!({"topic": "infra.vm.create", "env": "production", "payload": {"n": i}})
                        .to_string();
                    let (status, reply) = conn.post("/api/v1/jobs", &agent, &body).await?;
                    if status == 202 {
                        let id = serde_json::from_str::<serde_json::Value>(&reply)
                            .ok()
                            .and_then(|v| {
                                v.get("job_id").and_then(serde_json::Value::as_str).map(str::to_owned)
                            })
                            .unwrap_or_default();
                        sent.push((id, intended));
                    }
                }
                Ok::<_, String>(sent)
            }));
        }
        let drain_until = deadline + Duration::from_secs(5);
        let mut workers = Vec::new();
        for i in 0..args.workers.max(1) {
            let (addr, worker) = (server_for(i), worker.clone());
            workers.push(tokio::spawn(async move {
                let mut conn = Conn::open(&addr).await?;
                let mut claimed = Vec::new();
                while Instant::now() < drain_until {
                    let (status, reply) =
                        conn.post("/api/v1/workers/claim", &worker, "{\"wait_ms\": 200}").await?;
                    if status == 204 {
                        if Instant::now() > deadline {
                            break;
                        }
                        continue;
                    }
                    let at = Instant::now();
                    let claim: serde_json::Value = serde_json::from_str(&reply).map_err(|e| e.to_string())?;
                    let id = claim
                        .get("job_id")
                        .and_then(serde_json::Value::as_str)
                        .unwrap_or_default()
                        .to_owned();
                    let token =
                        claim.get("lease_token").and_then(serde_json::Value::as_str).unwrap_or_default();
                    let body = json!({"lease_token": token, "result": {"ok": true}}).to_string();
                    let (status, _) =
                        conn.post(&format!("/api/v1/workers/jobs/{id}/complete"), &worker, &body).await?;
                    if status == 200 {
                        claimed.push((id, at, Instant::now()));
                    }
                }
                Ok::<_, String>(claimed)
            }));
        }
        let mut sent = std::collections::HashMap::new();
        for s in submitters {
            for (id, at) in s.await.map_err(|e| e.to_string())?? {
                sent.insert(id, at);
            }
        }
        let mut latencies = Vec::new();
        let mut completed_in_window = 0;
        for w in workers {
            for (id, claimed_at, done_at) in w.await.map_err(|e| e.to_string())?? {
                if done_at <= deadline {
                    completed_in_window += 1;
                }
                if let Some(sent_at) = sent.get(&id) {
                    latencies.push(claimed_at.saturating_duration_since(*sent_at).as_secs_f64() * 1000.0);
                }
            }
        }
        latencies.sort_by(f64::total_cmp);
        Ok(E2eResult {
            submitted: sent.len(),
            completed_in_window,
            seconds: args.seconds as f64,
            submit_to_claim_ms: latencies,
        })
    }
}
