//! Data-driven diagnostics: every `test_data/check/NAME.yaml` is compiled and its rendered
//! errors or warnings compared with `NAME.expected`. Run with `UPDATE_EXPECT=1` to rewrite
//! the expectations after an intended change, then review the diff.

#![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic, reason = "a test fails by panicking")]

use std::path::{Path, PathBuf};

fn render(name: &str, text: &str) -> String {
    let (verdict, diagnostics) = match airlock_policy::compile(text) {
        Ok((policy, warnings)) => (format!("ok: {} rule(s)", policy.rules().len()), warnings),
        Err(errors) => (format!("rejected: {} error(s)", errors.len()), errors),
    };
    let mut out = String::new();
    for d in diagnostics {
        out.push_str(&d.render(name));
        out.push('\n');
    }
    out.push_str(&verdict);
    out.push('\n');
    out
}

fn cases() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("test_data/check");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 10, "expected the check cases in {}", dir.display());
    files
}

#[test]
fn diagnostics_match_expectations() {
    let update = std::env::var_os("UPDATE_EXPECT").is_some();
    let mut mismatches = Vec::new();
    for file in cases() {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let actual = render(&name, &std::fs::read_to_string(&file).unwrap());
        let expected_path = file.with_extension("expected");
        if update {
            std::fs::write(&expected_path, &actual).unwrap();
            continue;
        }
        let expected = std::fs::read_to_string(&expected_path).unwrap_or_default();
        if actual != expected {
            mismatches.push(format!("--- {name}\nexpected:\n{expected}actual:\n{actual}"));
        }
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}

#[test]
fn oversize_policy_is_refused_before_parsing() {
    let mut text = String::from("version: v1\nrules: []\n");
    text.push_str(&"#".repeat(airlock_policy::limits::POLICY_BYTES_MAX));
    let errors = airlock_policy::compile(&text).unwrap_err();
    assert_eq!(errors.len(), 1);
    assert!(errors[0].message.contains("the limit is"), "{}", errors[0].message);
}
