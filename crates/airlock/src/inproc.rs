//! An Airlock server inside this process, on a fresh data directory and a loopback port: what
//! `airlock demo` and `airlock bench e2e` run against.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use airlock_server::state::{AppState, Config};
use airlock_store::{SqliteStore, Store};

/// The policy an in-process server starts with.
pub const SEED: &str = include_str!("../../../examples/policies/seed.yaml");

/// The platform admin key of an in-process server.
pub const ADMIN: &str = "inproc-admin-key-0123456789";

/// A started server.
pub struct Server {
    /// Its shared state (for fault injection).
    pub state: AppState,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its data directory.
    pub dir: PathBuf,
}

/// Starts a server with `policy` on `runtime`; `name` keeps the data directories of several
/// servers of one process apart.
pub fn start(
    runtime: &tokio::runtime::Runtime,
    name: &str,
    policy: &str,
    config: Config,
) -> Result<Server, String> {
    let dir = std::env::temp_dir().join(format!("airlock-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    runtime.block_on(async {
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir).map_err(|e| e.to_string())?);
        let active = airlock_server::load_policy(&*store, ("the start-up policy", policy))
            .await
            .map_err(|e| e.to_string())?;
        airlock_server::bootstrap_admin(&*store, Some(ADMIN.into())).await.map_err(|e| e.to_string())?;
        let state = airlock_server::app_state(store, active, config);
        airlock_server::spawn_sweeps(state.clone(), Duration::from_millis(100));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(|e| e.to_string())?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let app = airlock_server::router(state.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok(Server { state, addr, dir })
    })
}
