//! `airlock bench submit`: a load generator for Gate A's allow path. With no `--url` it starts
//! its own `airlock serve` (this binary) on a fresh data directory and loopback port, so that
//! one command measures the real server with durable commits; it reports throughput, latency
//! percentiles measured from each request's intended send time (no coordinated omission), and
//! the server's resident memory.
//!
//! `airlock bench e2e` measures submit → Gate B claim → complete: completed jobs per second
//! (completions that finished within the submit window) and submit → claim latency from each
//! submit's intended send time. By default against a server in this process. With
//! `--store postgres://…` it measures distributed mode: two `airlock serve --role gateway` and
//! two `--role scheduler` child processes (this binary), all on one PostgreSQL schema and one
//! JetStream stream of their own (`--bus`); submitters talk to the gateways, workers claim and
//! complete on the schedulers. After each such run, with the replicas stopped, the raw JetStream
//! loop (`bench jetstream`: publish with ack → pull → ack, messages the size of a job id) runs
//! on the same NATS server for the same seconds, and the ratio of the two rates is reported.
//!
//! `airlock bench jetstream` runs that raw loop alone.

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
    /// End to end: submit → Gate B claim → complete, with several workers; in process, or
    /// distributed (`--store`: 2 gateways, 2 schedulers, PostgreSQL, JetStream) with the raw
    /// JetStream loop measured in the same run for comparison.
    E2e(E2eArgs),
    /// The raw NATS JetStream loop (publish with ack → pull → ack), the ceiling for the bus.
    Jetstream(JetstreamArgs),
    /// The console with a full store: inbox and jobs list server time, live-update latency.
    Console(crate::console_bench::ConsoleBenchArgs),
    /// What `airlock mcp proxy` adds to an allowed tool call, against calling the server directly.
    Mcp(crate::mcp_bench::McpArgs),
    /// What TLS costs the listener: the same requests over HTTP and HTTPS in one run.
    Https(crate::bench_https::HttpsArgs),
}

#[derive(Args)]
pub struct JetstreamArgs {
    /// The NATS server.
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    url: String,
    /// How long to run, in seconds.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Message size in bytes (default: a job id's, what the bus carries).
    #[arg(long, default_value_t = bus_payload_bytes())]
    payload: usize,
    /// Publishes awaiting their ack at once.
    #[arg(long, default_value_t = RAW_WINDOW)]
    window: usize,
}

#[derive(Args)]
pub struct E2eArgs {
    /// How long to submit for, in seconds (also how long the raw JetStream loop runs).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Submits per second offered, spread over the submitters; 0 submits as fast as the
    /// connections allow. Submit → claim latency counts from each submit's intended send time.
    /// The raw JetStream loop always runs as fast as it can.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Submitting connections (with `--store`: spread over the gateways).
    #[arg(long, default_value_t = 16)]
    submitters: usize,
    /// Workers, each one connection claiming with long-poll and completing each job it gets
    /// (with `--store`: spread over the schedulers).
    #[arg(long, default_value_t = 8)]
    workers: usize,
    /// Also run the same load with the server under the policy in FILE, alternating with the
    /// bench policy (an allow default and one rule no bench job matches), and report the
    /// throughput lost under FILE: what its rules cost over the gates' fixed work.
    #[arg(long, value_name = "FILE")]
    compare_policy: Option<PathBuf>,
    /// Runs of each setting, alternating; medians are reported (with `--store`, of Airlock's
    /// completed jobs/s and of the raw JetStream loop's msg/s, each run followed by its loop).
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// Distributed mode: for each run start 2 `airlock serve --role gateway` and 2 `--role
    /// scheduler` replicas (this binary, one after the other) with `--store URL --bus <--bus>`
    /// and a JetStream stream of their own, `AIRLOCK_E2E_<pid>_<run>`, then run the raw
    /// JetStream loop on `--bus`. Without `options=-csearch_path%3D<schema>` in the URL, each
    /// run gets a fresh schema (created and dropped with `psql`).
    #[arg(long, value_name = "URL", conflicts_with = "compare_policy")]
    store: Option<String>,
    /// With `--store`: the NATS JetStream server the replicas use as job bus and the raw loop runs on.
    #[arg(long, value_name = "NATS_URL", default_value = "nats://127.0.0.1:4222", requires = "store")]
    bus: String,
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

pub(crate) const BENCH_ADMIN_KEY: &str = "bench-admin-key-not-secret-0001";
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
        BenchCommand::Console(args) => runtime.block_on(crate::console_bench::run(args)),
        BenchCommand::Mcp(args) => return crate::mcp_bench::run(&args),
        BenchCommand::Https(args) => runtime.block_on(crate::bench_https::https(args)),
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
pub(crate) struct OwnServer {
    child: Child,
    pub(crate) addr: String,
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn start_server(data: Option<PathBuf>) -> Result<OwnServer, String> {
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

/// Gateways (Gate A and the API: `--role gateway`) in distributed mode.
const GATEWAYS: usize = 2;

/// Schedulers (the worker protocol, Gate B: `--role scheduler`) in distributed mode.
const SCHEDULERS: usize = 2;

/// Publishes awaiting their ack at once in the raw JetStream loop.
const RAW_WINDOW: usize = 64;

/// The size of a wake-up on the bus: the relay publishes the job id, nothing else.
fn bus_payload_bytes() -> usize {
    airlock_core::ids::JobId::generate(0, [0; 10]).as_str().len()
}

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

/// The processes of one distributed run. Dropping it stops the replicas, then drops the schema
/// (fields drop in order); [`distributed_run`] then deletes the run's JetStream stream.
struct Cluster {
    gateways: Vec<OwnServer>,
    schedulers: Vec<OwnServer>,
    stream: String,
    _schema: Option<OwnSchema>,
}

impl Cluster {
    fn addrs(servers: &[OwnServer]) -> Vec<String> {
        servers.iter().map(|s| s.addr.clone()).collect()
    }
}

/// The store URL of run `run`: `url` itself if it names a schema, else a fresh schema's.
fn own_schema(url: &str, run: usize) -> Result<(String, Option<OwnSchema>), String> {
    if url.contains("search_path") {
        return Ok((url.to_owned(), None));
    }
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
    Ok((format!("{url}{sep}options=-csearch_path%3D{name}"), Some(OwnSchema { base: url.to_owned(), name })))
}

/// Starts the replicas of distributed run `run` on store `url` and bus `bus`: the gateways, then
/// the schedulers, one after the other (the first creates the tables, the admin key and the
/// policy), in a fresh schema unless the URL names one and on a JetStream stream of their own.
fn start_cluster(url: &str, bus: &str, run: usize) -> Result<Cluster, String> {
    let (url, schema) = own_schema(url, run)?;
    let mut cluster =
        Cluster { gateways: Vec::new(), schedulers: Vec::new(), stream: stream_name(run), _schema: schema };
    let dir = std::env::temp_dir().join(format!("airlock-bench-pg-{}", std::process::id()));
    let started = start_replicas(&mut cluster, &url, bus, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    started.map(|()| cluster)
}

/// Writes the policy into `dir` and starts the cluster's gateways, then its schedulers.
fn start_replicas(cluster: &mut Cluster, url: &str, bus: &str, dir: &std::path::Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create `{}`: {e}", dir.display()))?;
    let policy = dir.join("bench-policy.yaml");
    std::fs::write(&policy, ALLOW_ALL).map_err(|e| format!("cannot write `{}`: {e}", policy.display()))?;
    for i in 0..GATEWAYS {
        let replica = start_replica("gateway", url, bus, &cluster.stream, &policy)
            .map_err(|e| format!("gateway {} of {GATEWAYS}: {e}", i + 1))?;
        cluster.gateways.push(replica);
    }
    for i in 0..SCHEDULERS {
        let replica = start_replica("scheduler", url, bus, &cluster.stream, &policy)
            .map_err(|e| format!("scheduler {} of {SCHEDULERS}: {e}", i + 1))?;
        cluster.schedulers.push(replica);
    }
    Ok(())
}

/// Starts one `airlock serve --role <role> --store <url> --bus <bus>` and waits until it listens.
fn start_replica(
    role: &str,
    url: &str,
    bus: &str,
    stream: &str,
    policy: &std::path::Path,
) -> Result<OwnServer, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this binary: {e}"))?;
    let child = Command::new(exe)
        .args(["serve", "--role", role, "--listen", "127.0.0.1:0", "--store", url])
        .args(["--bus", bus, "--bus-stream", stream, "--policy"])
        .arg(policy)
        .env("AIRLOCK_ADMIN_KEY", BENCH_ADMIN_KEY)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot start `airlock serve --role {role}`: {e}"))?;
    listening(child)
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
    let n = raw_loop(&args.url, args.payload, args.window, args.seconds).await?;
    println!(
        "jetstream: {n} messages of {} bytes published, consumed and acked in {}s: {:.0} msg/s",
        args.payload,
        args.seconds,
        per_sec(n, args.seconds)
    );
    Ok(())
}

/// The raw JetStream loop on `url` (publish with ack, up to `window` in flight → pull → ack, on a
/// fresh stream deleted afterwards) for `seconds`: the messages consumed and acked.
async fn raw_loop(url: &str, payload: usize, window: usize, seconds: u64) -> Result<u64, String> {
    crate::raw_jetstream::run(url, payload, window, Duration::from_secs(seconds))
        .await
        .map_err(|e| format!("the raw JetStream loop on {url}: {e}"))
}

#[allow(clippy::cast_precision_loss, reason = "a rate for display")]
fn per_sec(n: u64, seconds: u64) -> f64 {
    n as f64 / (seconds as f64).max(f64::EPSILON)
}

/// SIGINT and SIGTERM, listened for from the start of `bench e2e`, so that a stopped bench
/// returns through the usual path and its replicas and schemas are dropped (stopped, removed).
struct Interrupt {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

impl Interrupt {
    fn listen(runtime: &tokio::runtime::Runtime) -> Result<Self, String> {
        use tokio::signal::unix::{SignalKind, signal};
        let _context = runtime.enter();
        let listen = |kind| signal(kind).map_err(|e| format!("cannot listen for signals: {e}"));
        Ok(Self { int: listen(SignalKind::interrupt())?, term: listen(SignalKind::terminate())? })
    }

    /// `work`, unless a signal comes first (also one that came while nothing was waited for).
    async fn guard<T>(&mut self, work: impl Future<Output = Result<T, String>>) -> Result<T, String> {
        tokio::select! {
            result = work => result,
            _ = self.int.recv() => Err("interrupted (SIGINT)".into()),
            _ = self.term.recv() => Err("terminated (SIGTERM)".into()),
        }
    }
}

fn e2e(runtime: &tokio::runtime::Runtime, args: &E2eArgs) -> Result<(), String> {
    let mut interrupt = Interrupt::listen(runtime)?;
    let compared = match &args.compare_policy {
        Some(path) => Some(
            std::fs::read_to_string(path).map_err(|e| format!("cannot read `{}`: {e}", path.display()))?,
        ),
        None => None,
    };
    let mut on = Vec::new();
    let mut off = Vec::new();
    let mut raw = Vec::new();
    for run in 0..args.repeat.max(1) {
        match &args.store {
            None => on.push(e2e_run(runtime, args, ALLOW_ALL, &mut interrupt)?),
            Some(url) => {
                on.push(distributed_run(runtime, args, url, run, &mut interrupt)?);
                // After the replicas stopped, so that the loop has the machine to itself too.
                let loop_ = raw_loop(&args.bus, bus_payload_bytes(), RAW_WINDOW, args.seconds);
                raw.push(per_sec(runtime.block_on(interrupt.guard(loop_))?, args.seconds));
            }
        }
        if let Some(policy) = &compared {
            off.push(e2e_run(runtime, args, policy, &mut interrupt)?);
        }
    }
    e2e_report(args, on, off, raw)
}

fn e2e_report(
    args: &E2eArgs,
    mut on: Vec<E2eResult>,
    mut off: Vec<E2eResult>,
    mut raw: Vec<f64>,
) -> Result<(), String> {
    let median = |runs: &mut Vec<E2eResult>| -> Option<E2eResult> {
        runs.sort_by(|a, b| a.completed_per_sec().total_cmp(&b.completed_per_sec()));
        let mid = runs.len() / 2;
        (!runs.is_empty()).then(|| runs.swap_remove(mid))
    };
    let all = |runs: &[E2eResult]| runs.iter().map(|r| r.completed_per_sec().round()).collect::<Vec<_>>();
    let (on_all, off_all) = (all(&on), all(&off));
    let raw_all: Vec<f64> = raw.iter().map(|r| r.round()).collect();
    let on = median(&mut on).ok_or("no run")?;
    let off = median(&mut off);
    raw.sort_by(f64::total_cmp);
    let raw = raw.get(raw.len() / 2).copied();
    let cost = off.as_ref().map(|off| 1.0 - off.completed_per_sec() / on.completed_per_sec());
    let ratio = raw.map(|raw| on.completed_per_sec() / raw);
    let stream = format!("AIRLOCK_E2E_{}_<run>", std::process::id());
    match args.format {
        Format::Json => println!(
            "{}",
            json!({
                "target_rate": args.rate, "submitters": args.submitters, "workers": args.workers,
                "distributed": args.store.as_ref().map(|url| json!({
                    "store": url, "bus": args.bus, "stream": stream,
                    "gateways": GATEWAYS, "schedulers": SCHEDULERS,
                })),
                "bench_policy": on.json(), "compared_policy": off.as_ref().map(E2eResult::json),
                "compared_policy_file": args.compare_policy.as_ref().map(|p| p.display().to_string()),
                "bench_policy_runs": on_all, "compared_policy_runs": off_all,
                "throughput_lost_under_compared_policy": cost,
                "raw_jetstream": raw.map(|raw| json!({
                    "msg_per_sec": raw, "runs": raw_all, "seconds": args.seconds,
                    "payload_bytes": bus_payload_bytes(), "window": RAW_WINDOW,
                })),
                "airlock_to_raw_jetstream": ratio,
            })
        ),
        Format::Human => {
            if let Some(url) = &args.store {
                println!(
                    "distributed: {GATEWAYS} gateways, {SCHEDULERS} schedulers (`airlock serve --role …` child \
                     processes) on {url}, bus {} (stream {stream})",
                    args.bus
                );
            }
            let rate =
                if args.rate == 0 { "as fast as possible".to_owned() } else { format!("{}/s", args.rate) };
            println!(
                "load: {} submitters, {} workers, {}s per run, submits offered {rate}",
                args.submitters, args.workers, args.seconds
            );
            for (name, r, runs) in std::iter::once(("bench policy   ", &on, &on_all))
                .chain(off.as_ref().map(|o| ("compared policy", o, &off_all)))
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
                println!("throughput lost under the compared policy (medians): {:.1}%", cost * 100.0);
            }
            if let (Some(raw), Some(ratio)) = (raw, ratio) {
                println!(
                    "raw JetStream  median {raw:.0} msg/s (runs {raw_all:?}; {}-byte messages, publish with ack \
                     ({RAW_WINDOW} in flight) → pull → ack, {}s after each run)",
                    bus_payload_bytes(),
                    args.seconds
                );
                println!(
                    "Airlock / raw JetStream (medians): {ratio:.4} = {:.2}% ({:.0} jobs/s completed / {raw:.0} msg/s)",
                    ratio * 100.0,
                    on.completed_per_sec()
                );
            }
        }
    }
    Ok(())
}

fn e2e_run(
    runtime: &tokio::runtime::Runtime,
    args: &E2eArgs,
    policy: &str,
    interrupt: &mut Interrupt,
) -> Result<E2eResult, String> {
    let config = airlock_server::state::Config::default();
    let server = crate::inproc::start(runtime, "bench-e2e", policy, config)?;
    let addr = [server.addr.to_string()];
    let result = runtime.block_on(interrupt.guard(e2e_load(args, &addr, &addr, crate::inproc::ADMIN)));
    let _ = std::fs::remove_dir_all(&server.dir);
    result
}

/// One distributed run: its own replicas (stopped, and its schema dropped, on every return).
fn distributed_run(
    runtime: &tokio::runtime::Runtime,
    args: &E2eArgs,
    url: &str,
    run: usize,
    interrupt: &mut Interrupt,
) -> Result<E2eResult, String> {
    let result = start_cluster(url, &args.bus, run).and_then(|cluster| {
        let (gateways, schedulers) = (Cluster::addrs(&cluster.gateways), Cluster::addrs(&cluster.schedulers));
        runtime.block_on(interrupt.guard(e2e_load(args, &gateways, &schedulers, BENCH_ADMIN_KEY)))
    });
    // The replicas are stopped (the cluster was dropped), so none creates the stream again.
    let stream = stream_name(run);
    if let Err(e) = runtime.block_on(airlock_bus::delete_stream(&args.bus, &stream)) {
        eprintln!("warning: the JetStream stream {stream} was not deleted: {e}");
    }
    result
}

/// The JetStream stream of distributed run `run` of this process.
fn stream_name(run: usize) -> String {
    format!("AIRLOCK_E2E_{}_{run}", std::process::id())
}

/// Creates a key of tenant `bench` with one role; returns its secret.
async fn create_key(conn: &mut Conn, admin: &str, name: &str, role: &str) -> Result<String, String> {
    let body = json!({"tenant": "bench", "name": name, "roles": [role]}).to_string();
    let (status, reply) = conn.post("/api/v1/keys", admin, &body).await?;
    if status != 201 {
        return Err(format!("cannot create the {name} key ({status}): {reply}"));
    }
    serde_json::from_str::<serde_json::Value>(&reply)
        .ok()
        .and_then(|v| v.get("key").and_then(serde_json::Value::as_str).map(str::to_owned))
        .ok_or_else(|| format!("no key in the response to creating the {name} key: {reply}"))
}

/// One end-to-end load on servers sharing one store: submitter `i` uses `gateways[i % n]`, worker
/// `i` uses `schedulers[i % m]` (in process, both are the one server).
async fn e2e_load(
    args: &E2eArgs,
    gateways: &[String],
    schedulers: &[String],
    admin: &str,
) -> Result<E2eResult, String> {
    let pick = |addrs: &[String], i: usize| {
        addrs.get(i % addrs.len().max(1)).cloned().ok_or_else(|| "no server to connect to".to_owned())
    };
    // On a gateway: schedulers serve only the worker protocol.
    let mut setup = Conn::open(&pick(gateways, 0)?).await?;
    let agent = create_key(&mut setup, admin, "agent", "submitter").await?;
    let worker = create_key(&mut setup, admin, "worker", "worker").await?;

    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.seconds);
    let next = Arc::new(AtomicU64::new(0));
    let mut submitters = Vec::new();
    for i in 0..args.submitters.max(1) {
        let plan = Plan { next: Arc::clone(&next), rate: args.rate, started, deadline };
        submitters.push(tokio::spawn(submit_jobs(pick(gateways, i)?, agent.clone(), plan)));
    }
    let drain_until = deadline + Duration::from_secs(5);
    let mut workers = Vec::new();
    for i in 0..args.workers.max(1) {
        workers.push(tokio::spawn(claim_and_complete(
            pick(schedulers, i)?,
            worker.clone(),
            deadline,
            drain_until,
        )));
    }
    let mut sent = std::collections::HashMap::new();
    for s in submitters {
        for (id, at) in s.await.map_err(|e| format!("a submitter failed: {e}"))?? {
            sent.insert(id, at);
        }
    }
    let mut latencies = Vec::new();
    let mut completed_in_window = 0;
    for w in workers {
        for (id, claimed_at, done_at) in w.await.map_err(|e| format!("a worker failed: {e}"))?? {
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

/// When the submitters send: submit number `next` at `started + next / rate` (or at once with
/// rate 0), until `deadline`.
struct Plan {
    next: Arc<AtomicU64>,
    rate: u64,
    started: Instant,
    deadline: Instant,
}

/// One submitter: the ids of its accepted jobs, each with its intended send time.
async fn submit_jobs(addr: String, key: String, plan: Plan) -> Result<Vec<(String, Instant)>, String> {
    let mut conn = Conn::open(&addr).await?;
    let mut sent = Vec::new();
    loop {
        let i = plan.next.fetch_add(1, Ordering::Relaxed);
        let intended = if plan.rate > 0 {
            plan.started + Duration::from_secs_f64(i as f64 / plan.rate as f64)
        } else {
            Instant::now()
        };
        if intended >= plan.deadline {
            break;
        }
        if plan.rate > 0 {
            tokio::time::sleep_until(intended.into()).await;
        }
        let body = json!({"topic": "infra.vm.create", "env": "production", "payload": {"n": i}}).to_string();
        let (status, reply) = conn.post("/api/v1/jobs", &key, &body).await?;
        if status == 202 {
            let id = serde_json::from_str::<serde_json::Value>(&reply)
                .ok()
                .and_then(|v| v.get("job_id").and_then(serde_json::Value::as_str).map(str::to_owned))
                .unwrap_or_default();
            sent.push((id, intended));
        }
    }
    Ok(sent)
}

/// One worker: claims (long-poll) and completes until the queue stays empty after `deadline`, or
/// `drain_until`. Returns each completed job's id, claim time and completion time.
async fn claim_and_complete(
    addr: String,
    key: String,
    deadline: Instant,
    drain_until: Instant,
) -> Result<Vec<(String, Instant, Instant)>, String> {
    let mut conn = Conn::open(&addr).await?;
    let mut claimed = Vec::new();
    while Instant::now() < drain_until {
        let (status, reply) = conn.post("/api/v1/workers/claim", &key, "{\"wait_ms\": 200}").await?;
        if status == 204 {
            if Instant::now() > deadline {
                break;
            }
            continue;
        }
        let at = Instant::now();
        let claim: serde_json::Value =
            serde_json::from_str(&reply).map_err(|e| format!("bad claim reply ({status}): {e}: {reply}"))?;
        let id = claim.get("job_id").and_then(serde_json::Value::as_str).unwrap_or_default().to_owned();
        let token = claim.get("lease_token").and_then(serde_json::Value::as_str).unwrap_or_default();
        let body = json!({"lease_token": token, "result": {"ok": true}}).to_string();
        let (status, _) = conn.post(&format!("/api/v1/workers/jobs/{id}/complete"), &key, &body).await?;
        if status == 200 {
            claimed.push((id, at, Instant::now()));
        }
    }
    Ok(claimed)
}
