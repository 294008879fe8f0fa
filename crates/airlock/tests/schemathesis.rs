//! The served OpenAPI document against the real binary, with schemathesis (PyPI) generating
//! requests from it: any 5xx, any status the document does not list, and any response that
//! breaks its schema fail the test. `.ci/run` installs a pinned schemathesis under
//! `~/.cache/airlock`; `AIRLOCK_SCHEMATHESIS` points at another executable. A missing
//! schemathesis fails the test, never skips it.

#![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic, reason = "a test fails by panicking")]

use std::process::Command;

mod support;

const ADMIN: &str = "schemathesis-admin-key-0123456789";

/// Seconds each key's run may spend generating requests.
const RUN_SECS: &str = "25";

/// What a response is checked for.
const CHECKS: &str =
    "not_a_server_error,status_code_conformance,response_schema_conformance,content_type_conformance";

/// The schemathesis executable.
fn schemathesis() -> String {
    let default =
        format!("{}/.cache/airlock/venv-schemathesis/bin/schemathesis", std::env::var("HOME").unwrap());
    let bin = std::env::var("AIRLOCK_SCHEMATHESIS").unwrap_or(default);
    let ok = Command::new(&bin).arg("--version").output().is_ok_and(|o| o.status.success());
    assert!(ok, "`{bin}` does not run: run .ci/run's schemathesis block or set AIRLOCK_SCHEMATHESIS");
    bin
}

/// Runs schemathesis against `addr`'s document with `key`; panics with its report on a failure.
fn run(bin: &str, addr: &str, key: &str, seed: &str) {
    let output = Command::new(bin)
        .args(["run", &format!("http://{addr}/api/v1/openapi.json")])
        .args(["--header", &format!("Authorization: Bearer {key}")])
        .args(["--checks", CHECKS, "--max-time", RUN_SECS, "--seed", seed, "--workers", "1"])
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let report =
        format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    // Its report ends with the summary; the generated cases before it can be long.
    let tail: String = report.chars().rev().take(20_000).collect::<Vec<_>>().into_iter().rev().collect();
    assert!(output.status.success(), "schemathesis found failures:\n{tail}");
    assert!(report.contains(" passed"), "schemathesis ran no test case:\n{report}");
}

#[test]
fn schemathesis_finds_no_server_error_or_undocumented_answer() {
    let bin = schemathesis();
    let dir = support::temp_dir("schemathesis");
    let config = dir.join("config.yaml");
    // Generated requests without a key would otherwise lock the run's address out for a minute.
    std::fs::write(&config, "auth: { failures_per_minute: 100000 }\n").unwrap();
    let data = dir.join("store");
    let (_server, addr) = support::airlock(
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--data",
            data.to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
        ],
        &[("AIRLOCK_ADMIN_KEY", ADMIN)],
    );
    let submitter = support::key(&addr, ADMIN, "acme", "agent", &["submitter"]);
    run(&bin, &addr, ADMIN, "1");
    run(&bin, &addr, &submitter, "2");
}
