//! `airlock bench https`: what TLS costs the listener, measured in one run. One in-process
//! server is served twice, on plain HTTP and on HTTPS (`--tls-cert`/`--tls-key`), and the same
//! load runs against each: authenticated `GET /api/v1/jobs?limit=1` on keep-alive connections,
//! then the same with a new connection (a TLS handshake) per request.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use airlock_server::state::Config;
use airlock_store::{SqliteStore, Store};
use clap::Args;
use rustls::pki_types::ServerName;
use rustls::pki_types::pem::PemObject as _;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

#[derive(Args)]
pub struct HttpsArgs {
    /// The server certificate (PEM); it must be valid for `localhost`. A self-signed one is
    /// trusted as its own CA.
    #[arg(long)]
    tls_cert: PathBuf,
    /// Its private key (PEM).
    #[arg(long)]
    tls_key: PathBuf,
    /// How long each of the four measurements runs, in seconds.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Client connections at once.
    #[arg(long, default_value_t = 16)]
    connections: usize,
}

/// The admin key of the benchmark's server.
const ADMIN: &str = "bench-https-admin-key-0123456789";

pub async fn https(args: HttpsArgs) -> Result<(), String> {
    let dir = std::env::temp_dir().join(format!("airlock-bench-https-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir).map_err(|e| e.to_string())?);
    let active = airlock_server::load_policy(&*store, ("the seed", crate::inproc::SEED))
        .await
        .map_err(|e| e.to_string())?;
    airlock_server::bootstrap_admin(&*store, Some(ADMIN.into())).await.map_err(|e| e.to_string())?;
    let state = airlock_server::app_state(store, active, Config::default());
    let files = airlock_server::tls::TlsFiles {
        cert: args.tls_cert.clone(),
        key: args.tls_key.clone(),
        client_ca: None,
    };
    let tls = airlock_server::tls::TlsConfig::load(files)?;
    let client = client_config(&args.tls_cert)?;
    let mut targets = Vec::new();
    for (tls, client) in [(None, None), (Some(tls), Some(client))] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(|e| e.to_string())?;
        targets.push((listener.local_addr().map_err(|e| e.to_string())?, client));
        let (router, limits) = (airlock_server::router(state.clone()), state.config().http.clone());
        tokio::spawn(airlock_server::listener::serve(listener, router, limits, tls, std::future::pending()));
    }
    let seconds = Duration::from_secs(args.seconds);
    println!(
        "bench https: GET /api/v1/jobs?limit=1 with a key, {} connections, {} s per measurement",
        args.connections, args.seconds
    );
    for (reuse, label) in [(true, "keep-alive"), (false, "new connection per request")] {
        for (addr, tls) in &targets {
            let scheme = if tls.is_some() { "https" } else { "http " };
            let rate = load(*addr, tls.clone(), reuse, args.connections, seconds).await?;
            println!("  {scheme} {label:<27} {rate:>9.0} requests/s");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn client_config(cert: &PathBuf) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for der in rustls::pki_types::CertificateDer::pem_file_iter(cert).map_err(|e| e.to_string())? {
        roots.add(der.map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Requests per second over `connections` clients for `duration`.
async fn load(
    addr: std::net::SocketAddr,
    tls: Option<Arc<rustls::ClientConfig>>,
    reuse: bool,
    connections: usize,
    duration: Duration,
) -> Result<f64, String> {
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + duration;
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let (tls, done) = (tls.clone(), Arc::clone(&done));
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
                tcp.set_nodelay(true).map_err(|e| e.to_string())?;
                match &tls {
                    None => requests(tcp, reuse, deadline, &done).await?,
                    Some(config) => {
                        let name = ServerName::try_from("localhost").map_err(|e| e.to_string())?;
                        let stream = tokio_rustls::TlsConnector::from(Arc::clone(config))
                            .connect(name, tcp)
                            .await
                            .map_err(|e| format!("TLS handshake: {e}"))?;
                        requests(stream, reuse, deadline, &done).await?;
                    }
                }
            }
            Ok::<(), String>(())
        }));
    }
    for task in tasks {
        task.await.map_err(|e| e.to_string())??;
    }
    Ok(done.load(Ordering::Relaxed) as f64 / duration.as_secs_f64())
}

/// Requests on one connection: until `deadline` with `reuse`, else one.
async fn requests<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    reuse: bool,
    deadline: Instant,
    done: &AtomicU64,
) -> Result<(), String> {
    let request = format!(
        "GET /api/v1/jobs?limit=1 HTTP/1.1\r\nhost: localhost\r\nauthorization: Bearer {ADMIN}\r\n{}\r\n",
        if reuse { "" } else { "connection: close\r\n" }
    );
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        stream.write_all(request.as_bytes()).await.map_err(|e| e.to_string())?;
        let mut seen = 0;
        loop {
            let n = stream.read(buf.get_mut(seen..).unwrap_or_default()).await.map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("the server closed the connection mid-response".into());
            }
            seen += n;
            let text = String::from_utf8_lossy(buf.get(..seen).unwrap_or_default());
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                if !head.starts_with("HTTP/1.1 200") {
                    return Err(format!("unexpected answer: {head}"));
                }
                let length = head
                    .lines()
                    .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length: ").map(str::to_owned))
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .ok_or("no content-length")?;
                if body.len() >= length {
                    break;
                }
            }
        }
        done.fetch_add(1, Ordering::Relaxed);
        if !reuse || Instant::now() >= deadline {
            return Ok(());
        }
    }
}
