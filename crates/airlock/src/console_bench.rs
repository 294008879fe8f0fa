//! `airlock bench console`: the console's speed with a full store. It builds, in this process,
//! the service `airlock serve` runs (SQLite store in a fresh directory, the API with the console
//! mounted), fills it through the API with `--jobs` jobs of which `--pending` await approval,
//! signs in as an approver, and measures:
//! - server time of the inbox's first page and of the jobs list (paged), each request handled
//!   by the router in process, so the figure is the server's work without a network;
//! - live-update latency: with an event stream open over loopback TCP, the time from a
//!   submit's 202 to the `change` event, and to the refreshed inbox counting the new request.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use clap::Args;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tower::ServiceExt as _;

const ADMIN: &str = "bench-console-admin-key-000001";

#[derive(Args)]
pub struct ConsoleBenchArgs {
    /// Jobs stored before measuring.
    #[arg(long, default_value_t = 100_000)]
    jobs: usize,
    /// Of those, jobs awaiting approval (each with a pending approval request).
    #[arg(long, default_value_t = 10_000)]
    pending: usize,
    /// Requests timed per page.
    #[arg(long, default_value_t = 50)]
    samples: usize,
    /// Submits whose live update is timed.
    #[arg(long, default_value_t = 20)]
    live: usize,
    /// Directory for the store (default: a fresh one under the system temp dir).
    #[arg(long)]
    data: Option<PathBuf>,
}

/// Runs the benchmark.
pub async fn run(args: ConsoleBenchArgs) -> Result<(), String> {
    if args.pending > args.jobs {
        return Err(format!("`--pending {}` is more than `--jobs {}`", args.pending, args.jobs));
    }
    let dir = args.data.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!(
            "airlock-bench-console-{}-{}",
            std::process::id(),
            airlock_server::state::now_ms()
        ))
    });
    let store: Arc<dyn airlock_store::Store> =
        Arc::new(airlock_store::SqliteStore::open(&dir).map_err(|e| e.to_string())?);
    let seed = include_str!("../../../examples/policies/seed.yaml");
    let active =
        airlock_server::load_policy(&*store, ("the seed policy", seed)).await.map_err(|e| e.to_string())?;
    airlock_server::bootstrap_admin(&*store, Some(ADMIN.into())).await.map_err(|e| e.to_string())?;
    let state = airlock_server::app_state(store, active, airlock_server::state::Config::default());
    let (_closing, closed) = tokio::sync::watch::channel(false);
    let app = airlock_console::with_console(
        airlock_server::router_for(state, airlock_server::ProcessRole::All),
        airlock_console::Settings::new(closed),
    );
    let key = |name: &'static str, roles: &'static [&'static str]| {
        let app = app.clone();
        async move {
            let body = json!({"tenant": "acme", "name": name, "roles": roles});
            let (status, reply) = api(&app, Method::POST, "/api/v1/keys", ADMIN, Some(body)).await?;
            if status != StatusCode::CREATED {
                return Err(format!("creating key `{name}`: {status} {reply}"));
            }
            reply
                .get("key")
                .and_then(Value::as_str)
                .map(str::to_owned)
                .ok_or_else(|| "no key in the answer".to_owned())
        }
    };
    let agent = key("agent", &["submitter"]).await?;
    let alice = key("alice", &["approver", "operator"]).await?;

    println!("filling {} ({} jobs, {} awaiting approval)…", dir.display(), args.jobs, args.pending);
    let filled = Instant::now();
    fill(&app, &agent, args.jobs, args.pending).await?;
    println!("filled in {:.1} s", filled.elapsed().as_secs_f64());

    let cookie = sign_in(&app, &alice).await?;
    let pages = [
        ("inbox, first page (25 requests)", "/inbox".to_owned()),
        ("inbox, filtered by topic and env", "/inbox?topic=infra.resource.delete&env=production".to_owned()),
        ("inbox, filtered by deciding rule", "/inbox?rule=require-approval-prod-delete".to_owned()),
        ("jobs list, first page (50)", "/jobs".to_owned()),
        ("jobs list, state=queued", "/jobs?state=queued".to_owned()),
        ("overview", "/overview".to_owned()),
    ];
    println!("server time per page ({} requests each, in process):", args.samples);
    for (name, path) in &pages {
        let mut times = Vec::with_capacity(args.samples);
        for _ in 0..args.samples {
            let started = Instant::now();
            let (status, body) = page(&app, path, &cookie).await?;
            times.push(started.elapsed());
            if status != StatusCode::OK || !body.contains("<main") {
                return Err(format!("`{path}` answered {status}"));
            }
        }
        times.sort();
        println!(
            "  {name:<36} p50 {:>7.2} ms  p95 {:>7.2} ms  max {:>7.2} ms",
            ms(percentile(&times, 0.50)),
            ms(percentile(&times, 0.95)),
            ms(times.last().copied().unwrap_or_default())
        );
    }
    live(&app, &agent, &alice, &cookie, args.live).await
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let at = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(at).copied().unwrap_or_default()
}

async fn api(
    app: &Router,
    method: Method,
    uri: &str,
    key: &str,
    body: Option<Value>,
) -> Result<(StatusCode, Value), String> {
    let request = Request::builder()
        .method(method)
        .uri(uri)
        .header(header::AUTHORIZATION, format!("Bearer {key}"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(body.map_or_else(Body::empty, |b| Body::from(b.to_string())))
        .map_err(|e| e.to_string())?;
    let response = app.clone().oneshot(request).await.map_err(|e| e.to_string())?;
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), 16 << 20).await.map_err(|e| e.to_string())?;
    Ok((status, serde_json::from_slice(&bytes).unwrap_or(Value::Null)))
}

async fn page(app: &Router, path: &str, cookie: &str) -> Result<(StatusCode, String), String> {
    let request = Request::builder()
        .uri(path)
        .header(header::COOKIE, cookie)
        .body(Body::empty())
        .map_err(|e| e.to_string())?;
    let response = app.clone().oneshot(request).await.map_err(|e| e.to_string())?;
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), 16 << 20).await.map_err(|e| e.to_string())?;
    Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
}

/// Submits `jobs` jobs, `pending` of them requiring approval, spread evenly, 8 at a time.
async fn fill(app: &Router, agent: &str, jobs: usize, pending: usize) -> Result<(), String> {
    let workers = 8;
    let mut tasks = Vec::new();
    for w in 0..workers {
        let (app, agent) = (app.clone(), agent.to_owned());
        tasks.push(tokio::spawn(async move {
            for i in (w..jobs).step_by(workers) {
                // Every `jobs / pending`-th job needs a human.
                let human = pending > 0 && i % (jobs / pending).max(1) == 0 && i / (jobs / pending).max(1) < pending;
                let job = if human {
                    json!({"topic": "infra.resource.delete", "env": "production", "payload": {"resource": format!("r-{i}")}})
                } else {
                    json!({"topic": "infra.vm.create", "env": "staging", "payload": {"vm": format!("vm-{i}")}})
                };
                let (status, reply) = api(&app, Method::POST, "/api/v1/jobs", &agent, Some(job)).await?;
                if status != StatusCode::ACCEPTED {
                    return Err(format!("submit {i}: {status} {reply}"));
                }
            }
            Ok::<(), String>(())
        }));
    }
    for t in tasks {
        t.await.map_err(|e| e.to_string())??;
    }
    Ok(())
}

/// Signs in through the console's form; the session cookie.
async fn sign_in(app: &Router, key: &str) -> Result<String, String> {
    let response = app
        .clone()
        .oneshot(Request::builder().uri("/login").body(Body::empty()).map_err(|e| e.to_string())?)
        .await
        .map_err(|e| e.to_string())?;
    let login_cookie = set_cookie(&response, "airlock_login")?;
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20).await.map_err(|e| e.to_string())?;
    let html = String::from_utf8_lossy(&bytes);
    let token = html
        .split("name=\"login_token\" value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .ok_or("no sign-in token in the form")?;
    let form = format!("login_token={token}&next=%2F&key={key}");
    let request = Request::builder()
        .method(Method::POST)
        .uri("/login")
        .header(header::COOKIE, login_cookie)
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from(form))
        .map_err(|e| e.to_string())?;
    let response = app.clone().oneshot(request).await.map_err(|e| e.to_string())?;
    set_cookie(&response, "airlock_session")
}

fn set_cookie(response: &axum::response::Response, name: &str) -> Result<String, String> {
    response
        .headers()
        .get_all(header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with(&format!("{name}=")))
        .and_then(|v| v.split(';').next())
        .map(str::to_owned)
        .ok_or_else(|| format!("no `{name}` cookie (status {})", response.status()))
}

/// Serves the app on loopback, opens the event stream, and times `rounds` submits' updates.
async fn live(
    app: &Router,
    agent: &str,
    agent_approver: &str,
    cookie: &str,
    rounds: usize,
) -> Result<(), String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let served = app.clone();
    let server = tokio::spawn(async move { axum::serve(listener, served).await });
    let mut stream = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let request = format!(
        "GET /events HTTP/1.1\r\nHost: {addr}\r\nCookie: {cookie}\r\nAccept: text/event-stream\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.map_err(|e| e.to_string())?;
    let mut lines = BufReader::new(stream).lines();
    next_change(&mut lines).await?;
    let (_, summary) = api(app, Method::GET, "/api/v1/approvals/summary", agent_approver, None).await?;
    let pending_before = summary.get("pending").and_then(Value::as_u64).ok_or("no pending count")? as usize;
    let (mut event, mut shown) = (Vec::new(), Vec::new());
    for i in 0..rounds {
        let job = json!({"topic": "infra.resource.delete", "env": "production", "payload": {"live": i}});
        let (status, reply) = api(app, Method::POST, "/api/v1/jobs", agent, Some(job)).await?;
        let accepted = Instant::now();
        if status != StatusCode::ACCEPTED {
            return Err(format!("live submit: {status} {reply}"));
        }
        next_change(&mut lines).await?;
        event.push(accepted.elapsed());
        // What the page does on `change`: fetch its live region, whose header counts the
        // pending requests (the first page lists the oldest, so the count is what moves).
        let (_, fragment) = page(app, "/inbox?fragment=1", cookie).await?;
        let expected = format!("id=\"pending-count\">{}<", pending_before + i + 1);
        if !fragment.contains(&expected) {
            return Err(format!("the refreshed inbox does not count {} pending", pending_before + i + 1));
        }
        shown.push(accepted.elapsed());
    }
    server.abort();
    event.sort();
    shown.sort();
    println!("live update after a submit's 202 ({rounds} submits, event stream over loopback):");
    for (name, times) in [("`change` event received", &event), ("refreshed inbox shows the job", &shown)] {
        println!(
            "  {name:<36} p50 {:>7.1} ms  p95 {:>7.1} ms  max {:>7.1} ms",
            ms(percentile(times, 0.50)),
            ms(percentile(times, 0.95)),
            ms(times.last().copied().unwrap_or_default())
        );
    }
    Ok(())
}

type Events = tokio::io::Lines<BufReader<tokio::net::TcpStream>>;

/// Reads the event stream until the next `change` event (5 s at most).
async fn next_change(lines: &mut Events) -> Result<(), String> {
    loop {
        match tokio::time::timeout(Duration::from_secs(5), lines.next_line()).await {
            Ok(Ok(Some(line))) if line.contains("event: change") => return Ok(()),
            Ok(Ok(Some(_))) => {}
            Ok(Ok(None)) => return Err("the event stream ended".to_owned()),
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err("no change event within 5 s".to_owned()),
        }
    }
}
