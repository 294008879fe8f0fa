//! `airlock audit verify`: checks every tenant's audit hash chain. Offline against a data
//! directory (`--data`; works whether or not the server runs, thanks to WAL), so that a
//! verification never depends on the process whose records it checks.

use std::path::PathBuf;
use std::process::ExitCode;

use airlock_store::{SqliteStore, Store};
use clap::Subcommand;
use serde_json::json;

use crate::Format;

#[derive(Subcommand)]
pub enum AuditCommand {
    /// Verify the audit chains in a data directory; exit 1 if any record was edited, deleted or reordered.
    Verify {
        /// The embedded store's data directory.
        #[arg(long, default_value = "./airlock-data")]
        data: PathBuf,
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
}

pub fn run(command: AuditCommand) -> ExitCode {
    let AuditCommand::Verify { data, format } = command;
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
    let result = runtime.block_on(async {
        let store = SqliteStore::open(&data).map_err(|e| e.to_string())?;
        let mut results = Vec::new();
        for tenant in store.audit_tenants().await.map_err(|e| e.to_string())? {
            results.push(airlock_server::verify_tenant(&store, &tenant).await.map_err(|e| format!("{e:?}"))?);
        }
        Ok::<_, String>(results)
    });
    let results = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let ok = results.iter().all(|r| r["ok"] == true);
    match format {
        Format::Json => println!("{}", json!({"ok": ok, "tenants": results})),
        Format::Human => {
            for r in &results {
                let tenant = r["tenant"].as_str().unwrap_or("?");
                if r["ok"] == true {
                    println!("{tenant}: ok, {} record(s)", r["records"]);
                } else {
                    println!("{tenant}: BROKEN: {}", r["error"].as_str().unwrap_or("?"));
                }
            }
            println!("{}", if ok { "audit chains verify" } else { "audit verification FAILED" });
        }
    }
    if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}
