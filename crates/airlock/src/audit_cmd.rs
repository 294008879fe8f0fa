//! `airlock audit verify`: checks every tenant's audit hash chain. Offline against a data
//! directory (`--data`; works whether or not the server runs, thanks to WAL), so that a
//! verification never depends on the process whose records it checks. With the signed
//! checkpoints of `serve --audit-export` and the audit key's public key, it also catches what
//! the chains alone cannot: a truncated chain, a deleted tenant, a rewritten and recomputed one.

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
        /// The audit key's public key (hex, as `serve --audit-key` prints it, or a file holding it).
        #[arg(long, requires = "checkpoints")]
        public_key: Option<String>,
        /// A directory of signed checkpoints (`serve --audit-export`): every chain must still
        /// pass through every signed head.
        #[arg(long, requires = "public_key")]
        checkpoints: Option<PathBuf>,
    },
}

/// A checkpoint file's name, and its signed heads or why it does not verify.
type Checked = (String, Result<airlock_server::checkpoint::Heads, String>);

/// Every checkpoint file in `dir`, checked with `public_key` (hex, or a file holding it).
fn read_checkpoints(dir: &std::path::Path, public_key: &str) -> Result<Vec<Checked>, String> {
    let key = match std::fs::read_to_string(public_key) {
        Ok(text) => text.trim().to_owned(),
        Err(_) => public_key.trim().to_owned(),
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| format!("cannot read `{}`: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("checkpoint-") && n.ends_with(".json"))
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(format!("no checkpoint-*.json in `{}`", dir.display()));
    }
    Ok(files
        .into_iter()
        .map(|path| {
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let checked = std::fs::read_to_string(&path)
                .map_err(|e| e.to_string())
                .and_then(|text| serde_json::from_str(&text).map_err(|e| format!("not JSON: {e}")))
                .and_then(|value| airlock_server::checkpoint::verify(&key, &value))
                .map(|(_, heads)| heads);
            (name, checked)
        })
        .collect())
}

pub fn run(command: AuditCommand) -> ExitCode {
    let AuditCommand::Verify { data, format, public_key, checkpoints } = command;
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
        let mut signed = Vec::new();
        if let (Some(dir), Some(key)) = (&checkpoints, &public_key) {
            for (name, checked) in read_checkpoints(dir, key)? {
                let problems = match checked {
                    Err(e) => vec![format!("does not verify: {e}")],
                    Ok(heads) => airlock_server::checkpoint::check_against(&store, &heads)
                        .await
                        .map_err(|e| e.to_string())?,
                };
                signed.push(json!({"checkpoint": name, "ok": problems.is_empty(), "problems": problems}));
            }
        }
        Ok::<_, String>((results, signed))
    });
    let (results, signed) = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let ok = results.iter().chain(&signed).all(|r| r["ok"] == true);
    match format {
        Format::Json => println!("{}", json!({"ok": ok, "tenants": results, "checkpoints": signed})),
        Format::Human => {
            for r in &results {
                let tenant = r["tenant"].as_str().unwrap_or("?");
                if r["ok"] == true {
                    println!("{tenant}: ok, {} record(s)", r["records"]);
                } else {
                    println!("{tenant}: BROKEN: {}", r["error"].as_str().unwrap_or("?"));
                }
            }
            for c in &signed {
                let name = c["checkpoint"].as_str().unwrap_or("?");
                let problems: Vec<&str> =
                    c["problems"].as_array().into_iter().flatten().filter_map(|p| p.as_str()).collect();
                if problems.is_empty() {
                    println!("{name}: ok, every signed head is in the store");
                } else {
                    for problem in problems {
                        println!("{name}: BROKEN: {problem}");
                    }
                }
            }
            println!("{}", if ok { "audit chains verify" } else { "audit verification FAILED" });
        }
    }
    if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}
