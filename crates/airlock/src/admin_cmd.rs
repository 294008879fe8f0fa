//! `airlock admin recover --data DIR`: the way back in when every platform admin key is lost.
//! It runs offline, against the embedded store's data directory, so it needs what an attacker
//! on the network does not have (access to the files); it mints a new platform admin key,
//! prints it once, and records the recovery in the platform tenant's audit chain.

use std::path::PathBuf;
use std::process::ExitCode;

use airlock_store::SqliteStore;
use clap::Subcommand;

#[derive(Subcommand)]
pub enum AdminCommand {
    /// Mint a new platform admin key in a data directory (offline; audited as `key.recovered`).
    Recover {
        /// The embedded store's data directory.
        #[arg(long)]
        data: PathBuf,
        /// The server's key pepper, if it is not `DATA/key-pepper`.
        #[arg(long)]
        key_pepper: Option<PathBuf>,
    },
}

pub fn run(command: AdminCommand) -> ExitCode {
    let AdminCommand::Recover { data, key_pepper } = command;
    let pepper = key_pepper.unwrap_or_else(|| data.join(crate::serve_cmd::KEY_PEPPER_FILE));
    let hasher = if pepper.exists() {
        match airlock_server::auth::KeyHasher::load_or_create(&pepper) {
            Ok(hasher) => hasher,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        airlock_server::auth::KeyHasher::default()
    };
    if !data.join(airlock_store::DATABASE_FILE).exists() {
        eprintln!("error: no Airlock store in `{}`", data.display());
        return ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let minted = runtime.block_on(async {
        let store = SqliteStore::open(&data).map_err(|e| e.to_string())?;
        airlock_server::keys::recover_admin(&store, &hasher, airlock_server::state::now_ms())
            .await
            .map_err(|e| format!("cannot mint the key: {e:?}"))
    });
    match minted {
        Ok((id, secret)) => {
            println!("recovered platform admin key {id} (shown once; store it now): {secret}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
