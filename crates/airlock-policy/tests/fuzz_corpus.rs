//! Runs the fuzz seed corpus (`fuzz/corpus/{parse,eval}`) through the fuzz targets' own code on
//! every `cargo test`, without nightly or cargo-fuzz, so that a seed that breaks the engine is
//! caught in CI and the seeds stay meaningful (`bad-*` files are the only ones refused).

#![allow(clippy::expect_used, clippy::indexing_slicing, clippy::panic, reason = "a test fails by panicking")]

use std::fs;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use airlock_policy::{Job, compile};

/// The fuzz targets' bodies, exactly as the fuzzer runs them.
#[path = "../../../fuzz/src/lib.rs"]
mod targets;

fn corpus(target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus").join(target);
    let entries = fs::read_dir(&dir).unwrap_or_else(|e| panic!("corpus `{}` is missing: {e}", dir.display()));
    let mut files: Vec<PathBuf> = entries.map(|e| e.expect("readable corpus entry").path()).collect();
    files.retain(|p| p.is_file());
    files.sort();
    assert!(!files.is_empty(), "corpus `{}` is empty", dir.display());
    files
}

fn is_bad(path: &Path) -> bool {
    path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("bad-"))
}

/// Runs `target` on every file of its corpus and reports every file that panics, at once.
fn check(target: &str, run: fn(&[u8])) {
    let mut failures = Vec::new();
    for path in corpus(target) {
        let data = fs::read(&path).expect("readable corpus file");
        if let Err(payload) = panic::catch_unwind(AssertUnwindSafe(|| run(&data))) {
            let message = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default();
            failures.push(format!("{}: {message}", path.display()));
        }
    }
    assert!(failures.is_empty(), "fuzz target `{target}` failed on:\n{}", failures.join("\n"));
}

#[test]
fn parse_corpus_never_panics() {
    check("parse", targets::parse);
}

#[test]
fn eval_corpus_agrees_with_explain() {
    check("eval", targets::eval);
}

/// A seed that the engine silently refuses exercises nothing past the parser, so each seed
/// says by its name whether it is meant to be refused.
#[test]
fn only_bad_parse_seeds_are_refused() {
    for path in corpus("parse") {
        let text = fs::read_to_string(&path).expect("UTF-8 seed");
        let result = compile(&text);
        assert_eq!(result.is_err(), is_bad(&path), "{}: {:?}", path.display(), result.err());
    }
}

#[test]
fn only_bad_eval_seeds_skip_evaluation() {
    for path in corpus("eval") {
        let data = fs::read(&path).expect("readable seed");
        let (policy, job) =
            targets::split(&data).unwrap_or_else(|| panic!("{}: no `---job---` line", path.display()));
        let reaches = compile(&policy).is_ok() && Job::from_slice(job).is_ok();
        assert_eq!(reaches, !is_bad(&path), "{}", path.display());
    }
}
