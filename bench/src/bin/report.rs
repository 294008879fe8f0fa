//! Prints the medians of the last `cargo bench --bench engines` run as the Markdown tables of
//! BENCHMARKS.md, with the ratios taken from that same run: `report [CRITERION_DIR]`
//! (default `$CARGO_TARGET_DIR/criterion`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

const POLICIES: [&str; 3] = ["seed-3", "rules-1000", "rules-10000"];
const INPUTS: [(&str, &str); 2] = [("parsed", "parsed job"), ("raw-json", "raw JSON")];
const ENGINES: [&str; 3] = ["airlock", "cedar", "rego"];

fn main() -> ExitCode {
    let dir = match std::env::args().nth(1) {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into()))
            .join("criterion"),
    };
    match tables(&dir) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

fn tables(dir: &Path) -> Result<String, String> {
    let mut out = String::from(
        "| policy | input | Airlock p50 | Cedar p50 | Rego p50 | Cedar ÷ Airlock | Rego ÷ Airlock |\n\
         |---|---|---:|---:|---:|---:|---:|\n",
    );
    for policy in POLICIES {
        for (input, label) in INPUTS {
            let [airlock, cedar, rego] =
                try_map(ENGINES, |engine| median_ns(&dir.join(policy).join(engine).join(input)))?;
            out.push_str(&format!(
                "| {policy} | {label} | {} | {} | {} | {:.1}x | {:.1}x |\n",
                duration(airlock),
                duration(cedar),
                duration(rego),
                cedar / airlock,
                rego / airlock
            ));
        }
    }
    out.push_str("\n| loading 10,000 rules | Airlock | Cedar | Rego |\n|---|---:|---:|---:|\n");
    let [airlock, cedar, rego] =
        try_map(ENGINES, |engine| median_ns(&dir.join("load-rules-10000").join(engine)))?;
    out.push_str(&format!("| p50 | {} | {} | {} |\n", duration(airlock), duration(cedar), duration(rego)));
    Ok(out)
}

fn try_map<const N: usize>(
    items: [&str; N],
    f: impl Fn(&str) -> Result<f64, String>,
) -> Result<[f64; N], String> {
    let mut out = [0.0; N];
    for (slot, item) in out.iter_mut().zip(items) {
        *slot = f(item)?;
    }
    Ok(out)
}

/// Criterion's median of the per-iteration times, in nanoseconds.
fn median_ns(bench: &Path) -> Result<f64, String> {
    let path = bench.join("new").join("estimates.json");
    let text =
        std::fs::read_to_string(&path).map_err(|e| format!("cannot read `{}`: {e}", path.display()))?;
    let estimates: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("`{}` is not JSON: {e}", path.display()))?;
    estimates["median"]["point_estimate"]
        .as_f64()
        .ok_or_else(|| format!("`{}` has no median", path.display()))
}

fn duration(ns: f64) -> String {
    match ns {
        ns if ns < 1e3 => format!("{ns:.0} ns"),
        ns if ns < 1e6 => format!("{:.2} µs", ns / 1e3),
        ns if ns < 1e9 => format!("{:.1} ms", ns / 1e6),
        ns => format!("{:.2} s", ns / 1e9),
    }
}
