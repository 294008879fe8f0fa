//! `airlock serve`: the embedded mode. One process, one SQLite file under `--data`, no other
//! service. On first start the policy comes from `--policy` (or the seed example) and the
//! platform admin key from `AIRLOCK_ADMIN_KEY` (or is generated and printed once).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use airlock_server::state::Config;
use airlock_store::{PgStore, SqliteStore, Store};
use clap::Args;

/// The policy a fresh install starts with when `--policy` is not given.
const SEED_POLICY: &str = include_str!("../../../examples/policies/seed.yaml");

/// The key pepper's file in an embedded data directory (next to the database, not in it).
pub const KEY_PEPPER_FILE: &str = "key-pepper";

/// How often approvals are checked for expiry and leases for lapses.
const SWEEP_PERIOD: Duration = Duration::from_secs(1);

/// Where state lives.
enum Mode {
    /// One SQLite file in a directory; one process.
    Embedded {
        /// The directory.
        data: PathBuf,
    },
    /// PostgreSQL, shared by every process.
    Distributed {
        /// The connection URL.
        url: String,
    },
}

impl Mode {
    fn of(args: &ServeArgs) -> Result<Self, String> {
        match &args.store {
            None => Ok(Self::Embedded { data: args.data.clone() }),
            Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                Ok(Self::Distributed { url: url.clone() })
            }
            Some(other) => Err(format!("`--store {other}` is not a postgres:// URL")),
        }
    }
}

/// The roles one process can take.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Role {
    /// Gateway, scheduler and (unless `--safety-url`) the safety check.
    All,
    /// Gate A and the API for people and agents (no worker protocol).
    Gateway,
    /// The worker protocol (Gate B), the lease and approval sweeps.
    Scheduler,
    /// Only the safety service, for `--safety-url` of the other processes.
    Safety,
}

#[derive(Args)]
pub struct ServeArgs {
    /// What this process runs: everything, or only the safety service.
    #[arg(long, value_enum, default_value_t = Role::All)]
    role: Role,
    /// Call the safety service at this URL (`http://host:port`, or `https://host:port` with
    /// `--safety-ca`) instead of evaluating in process; the token comes from
    /// `AIRLOCK_SAFETY_TOKEN`.
    #[arg(long)]
    safety_url: Option<String>,
    /// The CA (PEM) that signed the `https://` safety service's certificate; only it is trusted.
    #[arg(long, requires = "safety_url")]
    safety_ca: Option<PathBuf>,
    /// A client certificate (PEM) for a safety service that verifies callers (its
    /// `--tls-client-ca`); needs `--safety-key`.
    #[arg(long, requires_all = ["safety_ca", "safety_key"])]
    safety_cert: Option<PathBuf>,
    /// The private key of `--safety-cert` (PEM).
    #[arg(long, requires = "safety_cert")]
    safety_key: Option<PathBuf>,
    /// The safety service's answer key (64 hex digits, printed by `--role safety
    /// --safety-answer-key`): answers not signed with it count as the service unavailable.
    #[arg(long, requires = "safety_url")]
    safety_public_key: Option<String>,
    /// With `--role safety`: sign every answer with this Ed25519 key (PKCS#8), generated (mode
    /// 0600) when the file does not exist; its public key is printed.
    #[arg(long)]
    safety_answer_key: Option<PathBuf>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Directory for the embedded store.
    #[arg(long, default_value = "./airlock-data")]
    data: PathBuf,
    /// Keep state in PostgreSQL instead (`postgres://user@host:port/db`): distributed mode,
    /// where any number of processes share one store. Replaces `--data`.
    #[arg(long)]
    store: Option<String>,
    /// With `--store postgres://…`: also carry job wake-ups on NATS JetStream
    /// (`nats://host:port`, or `tls://host:port` over TLS), drained from the store's
    /// transactional outbox.
    #[arg(long)]
    bus: Option<String>,
    /// Trust only this CA (PEM) for the `--bus` server's certificate (TLS is then required).
    #[arg(long, requires = "bus")]
    bus_ca: Option<PathBuf>,
    /// A client certificate (PEM) for a `--bus` server that verifies clients; needs `--bus-key`.
    #[arg(long, requires_all = ["bus", "bus_key"])]
    bus_cert: Option<PathBuf>,
    /// The private key of `--bus-cert` (PEM).
    #[arg(long, requires = "bus_cert")]
    bus_key: Option<PathBuf>,
    /// The JetStream stream for `--bus` (one per deployment sharing a NATS server).
    #[arg(long, default_value = airlock_bus::DEFAULT_STREAM, hide = true)]
    bus_stream: String,
    /// Policy to publish on first start (default: the seed example). Ignored once a policy is stored.
    #[arg(long)]
    policy: Option<PathBuf>,
    /// YAML file with the other settings (fail modes, approval TTL and binding, idempotency).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Enable `POST /api/v1/admin/faults`, which makes the safety check fail (tests and drills only).
    #[arg(long)]
    enable_fault_injection: bool,
    /// Accept a fail-open setting that reaches `high`-risk topics (refused otherwise).
    #[arg(long)]
    force_fail_open_high_risk: bool,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
    /// End a console session after this many seconds without a request (default 30 min).
    #[arg(long, default_value_t = airlock_core::defaults::CONSOLE_SESSION_IDLE_MS / 1000)]
    console_idle_secs: u64,
    /// Serve HTTPS with this certificate chain (PEM); needs `--tls-key`. SIGHUP reloads both.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key of `--tls-cert` (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (PEM): mutual TLS for every client.
    #[arg(long, requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Sign audit chain heads with this Ed25519 key (PKCS#8), kept outside the store;
    /// generated (mode 0600) when the file does not exist. Its public key is printed.
    #[arg(long)]
    audit_key: Option<PathBuf>,
    /// Export signed checkpoints of every audit chain head into this directory (outside the
    /// store), for `airlock audit verify --checkpoints`. Needs `--audit-key`.
    #[arg(long, requires = "audit_key")]
    audit_export: Option<PathBuf>,
    /// The secret API key hashes are peppered with (HMAC-SHA256), kept outside the store;
    /// generated (mode 0600) when the file does not exist. Default: `DATA/key-pepper` in the
    /// embedded mode; with `--store`, give every replica the same file (without one, keys are
    /// stored as plain SHA-256).
    #[arg(long)]
    key_pepper: Option<PathBuf>,
}

/// The audit signer from `--audit-key`, and whether its key was generated now.
type Signer = (Arc<airlock_server::checkpoint::AuditSigner>, bool);

fn audit_signer(args: &ServeArgs) -> Result<Option<Signer>, String> {
    let Some(path) = &args.audit_key else { return Ok(None) };
    let (signer, created) = airlock_server::checkpoint::AuditSigner::load_or_create(path)?;
    Ok(Some((Arc::new(signer), created)))
}

/// The listener's TLS from the flags, reloaded on SIGHUP; `None` without `--tls-cert`.
fn tls_of(args: &ServeArgs) -> Result<Option<airlock_server::tls::TlsConfig>, String> {
    let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) else { return Ok(None) };
    let files = airlock_server::tls::TlsFiles {
        cert: cert.clone(),
        key: key.clone(),
        client_ca: args.tls_client_ca.clone(),
    };
    let tls = airlock_server::tls::TlsConfig::load(files)?;
    let reloading = tls.clone();
    let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(|e| format!("cannot watch SIGHUP: {e}"))?;
    tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            match reloading.reload() {
                Ok(()) => tracing::info!("TLS certificate and key reloaded"),
                Err(e) => {
                    tracing::error!(error = %e, "TLS reload failed; the previous certificate stays in use")
                }
            }
        }
    });
    Ok(Some(tls))
}

pub fn run(args: ServeArgs) -> ExitCode {
    init_logging(args.log_json);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn serve(args: ServeArgs) -> Result<(), String> {
    let mut config = match &args.config {
        None => Config::default(),
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read `{}`: {e}", path.display()))?;
            crate::config::parse(&text).map_err(|errors| {
                errors.iter().map(|d| d.render(&path.display().to_string())).collect::<Vec<_>>().join("\n")
            })?
        }
    };
    config.fault_injection = args.enable_fault_injection;
    config.force_fail_open_high_risk = args.force_fail_open_high_risk;
    let token = || {
        std::env::var("AIRLOCK_SAFETY_TOKEN")
            .ok()
            .filter(|t| t.len() >= 16)
            .ok_or("the safety service needs AIRLOCK_SAFETY_TOKEN (16+ characters)".to_owned())
    };
    if args.role == Role::Safety {
        config.safety_token = Some(token()?);
    }
    if let Some(path) = &args.safety_answer_key {
        if args.role != Role::Safety {
            return Err("`--safety-answer-key` is for `--role safety`".into());
        }
        let (key, created) = airlock_server::remote_safety::AnswerSigner::load_or_create(path)?;
        let how = if created { "generated" } else { "loaded" };
        println!(
            "safety answer key {how} at {}; public key (for `--safety-public-key`): {}",
            path.display(),
            key.public_key_hex()
        );
        config.safety_answer_key = Some(Arc::new(key));
    }
    if let Some(url) = &args.safety_url {
        let trust = airlock_server::remote_safety::Trust {
            ca: args.safety_ca.clone(),
            client: args.safety_cert.clone().zip(args.safety_key.clone()),
            answer_key: args.safety_public_key.clone(),
        };
        config.remote_safety = Some(airlock_server::remote_safety::RemoteSafety::new(url, token()?, &trust)?);
    }

    let store: Arc<dyn Store> = match Mode::of(&args)? {
        Mode::Embedded { data } => Arc::new(SqliteStore::open(&data).map_err(|e| e.to_string())?),
        Mode::Distributed { url } => {
            // Replicas share the breaker of a remote safety service, their common dependency; an
            // in-process check times out on its own process's account, so each keeps its own.
            config.shared_breaker = config.remote_safety.is_some();
            let store = PgStore::connect(&url).await.map_err(|e| e.to_string())?;
            Arc::new(if args.bus.is_some() { store.bus_wakes() } else { store })
        }
    };
    let pepper = match (&args.key_pepper, Mode::of(&args)?) {
        (Some(path), _) => Some(path.clone()),
        (None, Mode::Embedded { data }) => Some(data.join(KEY_PEPPER_FILE)),
        (None, Mode::Distributed { .. }) => {
            tracing::warn!("no --key-pepper: API keys are stored as plain SHA-256");
            None
        }
    };
    if let Some(path) = pepper {
        config.key_hasher = airlock_server::auth::KeyHasher::load_or_create(&path)?;
    }
    let initial = match &args.policy {
        Some(path) => (
            path.display().to_string(),
            std::fs::read_to_string(path).map_err(|e| format!("cannot read `{}`: {e}", path.display()))?,
        ),
        None => ("the seed example policy".to_owned(), SEED_POLICY.to_owned()),
    };
    let active =
        airlock_server::load_policy(&*store, (&initial.0, &initial.1)).await.map_err(|e| e.to_string())?;
    for warning in config.check_fail_open(&active.policy)? {
        tracing::warn!("{warning}");
    }
    if args.role == Role::Safety {
        return serve_safety(args, store, active, config).await;
    }
    let admin_key = std::env::var("AIRLOCK_ADMIN_KEY").ok().filter(|k| !k.is_empty());
    if let Some(secret) = airlock_server::bootstrap_admin_with(&*store, admin_key, &config.key_hasher)
        .await
        .map_err(|e| e.to_string())?
    {
        println!("admin key (shown once; store it now): {secret}");
    }
    let (version, hash) = (active.version, active.policy.hash().to_owned());
    let state = airlock_server::app_state(Arc::clone(&store), active, config);
    airlock_server::spawn_sweeps(state.clone(), SWEEP_PERIOD);
    airlock_server::spawn_listener(state.clone());
    if let Some(url) = &args.bus {
        if args.store.is_none() {
            return Err("`--bus` needs `--store postgres://…` (the embedded mode has no bus)".into());
        }
        let tls = airlock_bus::BusTls {
            ca: args.bus_ca.clone(),
            client: args.bus_cert.clone().zip(args.bus_key.clone()),
        };
        let bus =
            airlock_bus::NatsBus::connect(url, &args.bus_stream, &tls).await.map_err(|e| e.to_string())?;
        airlock_server::relay::spawn_relay(state.clone(), bus.clone());
        if matches!(args.role, Role::All | Role::Scheduler) {
            // Every scheduler sees every wake-up: one durable consumer per process.
            let group = format!("airlock-{}-{}", std::process::id(), airlock_server::state::now_ms());
            airlock_server::relay::spawn_subscriber(state.clone(), &bus, group);
        }
    }
    let tls = tls_of(&args)?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    let signer = audit_signer(&args)?;
    if let (Some((signer, _)), Some(dir)) = (&signer, &args.audit_export) {
        let period = state.config().audit_checkpoint;
        airlock_server::checkpoint::spawn_exporter(
            Arc::clone(&store),
            Arc::clone(signer),
            dir.clone(),
            period,
        );
    }
    let role = match args.role {
        Role::Gateway => airlock_server::ProcessRole::Gateway,
        Role::Scheduler => airlock_server::ProcessRole::Scheduler,
        Role::All | Role::Safety => airlock_server::ProcessRole::All,
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    let place = match &args.store {
        Some(_) => "store postgres".to_owned(),
        None => format!("data {}", args.data.display()),
    };
    println!("airlock listening on {scheme}://{local} ({place}, policy version {version} {hash})");
    tracing::info!(%local, data = %args.data.display(), version, %hash, "serving");
    let limits = state.config().http.clone();
    if let Some((signer, created)) = &signer {
        let how = if *created { "generated" } else { "loaded" };
        let path = args.audit_key.as_deref().unwrap_or(std::path::Path::new(""));
        println!(
            "audit key {how} at {}; public key (for `audit verify --public-key`): {}",
            path.display(),
            signer.public_key_hex()
        );
    }
    let mut app = airlock_server::router_for(state, role);
    // Open console event streams end when shutdown begins, so that draining does not wait on them.
    let (closing, closed) = tokio::sync::watch::channel(false);
    if role != airlock_server::ProcessRole::Scheduler {
        let mut settings = airlock_console::Settings::new(closed);
        settings.session_idle = Duration::from_secs(args.console_idle_secs.max(1));
        settings.session_absolute = settings.session_absolute.max(settings.session_idle);
        settings.secure_cookies = tls.is_some();
        app = airlock_console::with_console(app, settings);
        tracing::info!(%local, "console at /");
    }
    let shutdown = async move {
        shutdown_signal().await;
        let _ = closing.send(true);
    };
    airlock_server::listener::serve(listener, app, limits, tls, shutdown).await;
    if let (Some((signer, _)), Some(dir)) = (&signer, &args.audit_export) {
        // The last word: every record of this process is under a signed head.
        let heads = airlock_server::checkpoint::heads(&*store).await.map_err(|e| e.to_string())?;
        airlock_server::checkpoint::export(signer, dir, airlock_server::state::now_ms(), &heads)?;
    }
    Ok(())
}

async fn serve_safety(
    args: ServeArgs,
    store: Arc<dyn Store>,
    active: airlock_server::state::ActivePolicy,
    config: Config,
) -> Result<(), String> {
    let version = active.version;
    let limits = config.http.clone();
    let tls = tls_of(&args)?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    let state = airlock_server::app_state(store, active, config);
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    println!(
        "airlock safety service listening on {scheme}://{local} (data {}, policy version {version})",
        args.data.display()
    );
    airlock_server::listener::serve(
        listener,
        airlock_server::safety_router(state),
        limits,
        tls,
        shutdown_signal(),
    )
    .await;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutdown requested; draining in-flight requests");
}
