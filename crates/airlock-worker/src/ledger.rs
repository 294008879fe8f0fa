//! The effect ledger (SPEC 8): a side effect keyed by the job's idempotency key runs at most
//! once across retries and worker restarts, and later calls get the recorded result back.
//!
//! The ledger is one append-only file of JSON lines, `{"key", "result", "recorded_at_ms"}`,
//! each written with one `write` and made durable with `fsync` before `once` returns. Opening
//! it reads every line into memory and takes an exclusive lock on the file, so two worker
//! processes can never append to the same ledger; a worker that restarts on the same file
//! (the lock dies with the process) sees everything the previous one recorded.
//!
//! # What "at most once" covers, and the crash window
//!
//! `once` runs the effect, then records its result. A crash (or `kill -9`, or power loss)
//! after the effect took place and before the record reached the disk leaves no record, so the
//! retry runs the effect again. No local ledger can close that window: the effect and the
//! record are two writes to two systems. Close it downstream: pass [`Job::effect_key`] (the
//! submitter's idempotency key) to the system the effect changes, as its own idempotency key
//! or request id, or as a tag you look up before creating (e.g. a VM named or labelled by the
//! key). The repeated call is then recognised there and answers with the first call's result.
//! The ledger makes the repeat rare (only that window); the downstream key makes it harmless.
//!
//! Failures are not recorded: an effect that returns `Err` runs again on the next call, so an
//! effect should fail only when it did not take place (or when doing it again is harmless).
//! The ledger covers retries that run on the same ledger file: a retry claimed by a worker on
//! another machine does not see it, which is one more reason to pass the key downstream.
//! The file only grows; keep one per tenant and worker, and delete it when every job it names
//! has finished (for example after the server's idempotency retention, 30 days by default).
//!
//! [`Job::effect_key`]: crate::Job::effect_key

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

/// An error opening or writing the ledger.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// The file cannot be opened, read, locked or made durable.
    #[error("cannot open the effect ledger `{path}`: {source}")]
    Open {
        /// The ledger file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Another process holds the ledger.
    #[error("the effect ledger `{path}` is in use by another process (one ledger per worker process)")]
    Locked {
        /// The ledger file.
        path: PathBuf,
    },
    /// A line other than a torn last one is not a record; the file is left alone.
    #[error("the effect ledger `{path}` is damaged at line {line}: {message}")]
    Damaged {
        /// The ledger file.
        path: PathBuf,
        /// The 1-based line.
        line: usize,
        /// What is wrong with it.
        message: String,
    },
    /// A record could not be appended or made durable.
    #[error("cannot write the effect ledger `{path}`: {source}")]
    Write {
        /// The ledger file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Why [`EffectLedger::once`] did not return a recorded result.
#[derive(Debug)]
pub enum OnceError<E> {
    /// The effect failed; nothing was recorded, and the next call runs it again.
    Effect(E),
    /// The effect ran and returned `result`, but recording it failed: a retry would run the
    /// effect again. Usually best reported as a success (the effect did happen) so the job is
    /// not retried at all.
    Unrecorded {
        /// What the effect returned.
        result: Value,
        /// Why it was not recorded.
        source: LedgerError,
    },
}

impl<E: std::fmt::Display> std::fmt::Display for OnceError<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Effect(e) => e.fmt(f),
            Self::Unrecorded { source, .. } => write!(f, "the effect ran but was not recorded: {source}"),
        }
    }
}

impl<E: std::error::Error + 'static> std::error::Error for OnceError<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Effect(e) => Some(e),
            Self::Unrecorded { source, .. } => Some(source),
        }
    }
}

/// A durable record of side effects that took place, by key. See the module docs for what it
/// guarantees.
#[derive(Debug)]
pub struct EffectLedger {
    path: PathBuf,
    inner: Mutex<Inner>,
    /// Signalled when a key stops running, for callers waiting on the same key.
    idle: Condvar,
}

#[derive(Debug)]
struct Inner {
    file: File,
    /// Bytes of whole records in the file: where a failed append is cut back to.
    len: u64,
    done: HashMap<String, Value>,
    running: HashSet<String>,
}

impl EffectLedger {
    /// Opens (or creates) the ledger file and reads what it records. A torn last line, left by
    /// a crash in the middle of an append, is cut off: that record was never acknowledged.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, LedgerError> {
        let path = path.as_ref().to_path_buf();
        let open_error = |source| LedgerError::Open { path: path.clone(), source };
        let mut file =
            OpenOptions::new().read(true).append(true).create(true).open(&path).map_err(open_error)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => return Err(LedgerError::Locked { path }),
            Err(TryLockError::Error(e)) => return Err(open_error(e)),
        }
        // Make the file's directory entry durable too, or a fresh ledger could vanish.
        if let Some(dir) = path.parent().map(|p| if p.as_os_str().is_empty() { Path::new(".") } else { p }) {
            File::open(dir).and_then(|d| d.sync_all()).map_err(open_error)?;
        }
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(open_error)?;
        let (done, mut len) = parse(&path, &bytes)?;
        let whole = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
        if len < whole {
            tracing::warn!(path = %path.display(), bytes = whole - len, "effect ledger: cut off a torn last record");
            file.set_len(len).and_then(|()| file.sync_data()).map_err(open_error)?;
        } else if bytes.last().is_some_and(|b| *b != b'\n') {
            file.write_all(b"\n").and_then(|()| file.sync_data()).map_err(open_error)?;
            len = len.saturating_add(1);
        }
        Ok(Self {
            path,
            inner: Mutex::new(Inner { file, len, done, running: HashSet::new() }),
            idle: Condvar::new(),
        })
    }

    /// Runs `effect` unless a result is recorded under `key`, records what it returns, and
    /// returns it; a key already recorded returns the recorded result without running anything.
    /// A call for a key that is running on another thread waits for it. Calling `once` with
    /// the same key from inside its own effect deadlocks.
    pub fn once<E>(
        &self,
        key: &str,
        effect: impl FnOnce() -> Result<Value, E>,
    ) -> Result<Value, OnceError<E>> {
        {
            let mut inner = self.lock();
            loop {
                if let Some(result) = inner.done.get(key) {
                    return Ok(result.clone());
                }
                if inner.running.insert(key.to_owned()) {
                    break;
                }
                inner = self.idle.wait(inner).unwrap_or_else(PoisonError::into_inner);
            }
        }
        let _running = Running { ledger: self, key };
        let result = effect().map_err(OnceError::Effect)?;
        match self.record(key, &result) {
            Ok(()) => Ok(result),
            Err(source) => Err(OnceError::Unrecorded { result, source }),
        }
    }

    /// The result recorded under `key`, if any.
    pub fn get(&self, key: &str) -> Option<Value> {
        self.lock().done.get(key).cloned()
    }

    /// How many keys are recorded.
    pub fn len(&self) -> usize {
        self.lock().done.len()
    }

    /// Whether nothing is recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The ledger file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The lock is never held across user code, so a poisoned lock still guards whole data.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn record(&self, key: &str, result: &Value) -> Result<(), LedgerError> {
        let at_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis());
        let mut line = json!({"key": key, "result": result, "recorded_at_ms": at_ms}).to_string();
        line.push('\n');
        let mut inner = self.lock();
        let written = inner.file.write_all(line.as_bytes()).and_then(|()| inner.file.sync_data());
        if let Err(source) = written {
            // Cut a partial line back off so the next append starts on a line of its own.
            let len = inner.len;
            let _ = inner.file.set_len(len);
            return Err(LedgerError::Write { path: self.path.clone(), source });
        }
        inner.len = inner.len.saturating_add(u64::try_from(line.len()).unwrap_or(u64::MAX));
        inner.done.insert(key.to_owned(), result.clone());
        Ok(())
    }
}

/// Marks a key as running; dropping it (also when the effect panics) lets waiters in.
struct Running<'a> {
    ledger: &'a EffectLedger,
    key: &'a str,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.ledger.lock().running.remove(self.key);
        self.ledger.idle.notify_all();
    }
}

/// The records in `bytes`, and the length of the part made of whole records.
fn parse(path: &Path, bytes: &[u8]) -> Result<(HashMap<String, Value>, u64), LedgerError> {
    let mut done = HashMap::new();
    let mut whole = 0usize;
    let mut rest = bytes;
    let mut line_no = 0;
    while !rest.is_empty() {
        line_no += 1;
        let (line, complete) = match rest.iter().position(|b| *b == b'\n') {
            Some(end) => (rest.get(..end).unwrap_or_default(), true),
            None => (rest, false),
        };
        let record = match std::str::from_utf8(line).map_err(|e| e.to_string()).and_then(read_record) {
            Ok(record) => record,
            // A crash mid-append leaves a prefix of a record without its newline: cut it off.
            Err(_) if !complete => break,
            Err(message) => {
                return Err(LedgerError::Damaged { path: path.to_path_buf(), line: line_no, message });
            }
        };
        if !complete {
            // The whole record but not its newline: it was written, so it counts (keeping it is
            // the side that never repeats an effect); the next append needs the newline first.
            break;
        }
        if let Some((key, result)) = record {
            done.entry(key).or_insert(result);
        }
        whole += line.len() + 1;
        rest = rest.get(line.len() + 1..).unwrap_or_default();
    }
    let mut len = u64::try_from(whole).unwrap_or(u64::MAX);
    if whole < bytes.len()
        && let Some(tail) = bytes.get(whole..)
        && let Ok(Some((key, result))) =
            std::str::from_utf8(tail).map_err(|e| e.to_string()).and_then(read_record)
    {
        done.entry(key).or_insert(result);
        // Keep it and let `open` append the missing newline.
        len = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
    }
    Ok((done, len))
}

/// One line: a record, or `None` for a blank line.
fn read_record(line: &str) -> Result<Option<(String, Value)>, String> {
    if line.trim().is_empty() {
        return Ok(None);
    }
    let value: Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    let key = value.get("key").and_then(Value::as_str).ok_or("no `key` string")?;
    let result = value.get("result").ok_or("no `result`")?;
    Ok(Some((key.to_owned(), result.clone())))
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::indexing_slicing,
        clippy::panic,
        reason = "a test fails by panicking"
    )]

    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    /// A fresh directory for one test, removed when dropped.
    struct Dir(PathBuf);

    impl Dir {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("airlock-ledger-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }

        fn file(&self) -> PathBuf {
            self.0.join("effects.jsonl")
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn count_runs(ledger: &EffectLedger, key: &str, runs: &AtomicU32, answer: Value) -> Value {
        ledger
            .once(key, || {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok::<_, String>(answer)
            })
            .unwrap()
    }

    #[test]
    fn an_effect_runs_once_per_key_and_later_calls_get_its_result() {
        let dir = Dir::new("once");
        let ledger = EffectLedger::open(dir.file()).unwrap();
        let runs = AtomicU32::new(0);
        assert_eq!(count_runs(&ledger, "k1", &runs, json!({"vm": 1})), json!({"vm": 1}));
        assert_eq!(count_runs(&ledger, "k1", &runs, json!({"vm": 2})), json!({"vm": 1}), "recorded");
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(count_runs(&ledger, "k2", &runs, json!("other")), json!("other"));
        assert_eq!((ledger.len(), runs.load(Ordering::SeqCst)), (2, 2));
    }

    #[test]
    fn records_survive_a_restart() {
        let dir = Dir::new("restart");
        let runs = AtomicU32::new(0);
        {
            let ledger = EffectLedger::open(dir.file()).unwrap();
            count_runs(&ledger, "k1", &runs, json!({"vm": "a", "n": 1.5}));
            count_runs(&ledger, "line\nbreak \"quoted\"", &runs, json!(null));
        }
        let ledger = EffectLedger::open(dir.file()).unwrap();
        assert_eq!(ledger.get("k1"), Some(json!({"vm": "a", "n": 1.5})));
        assert_eq!(count_runs(&ledger, "k1", &runs, json!("again")), json!({"vm": "a", "n": 1.5}));
        assert_eq!(count_runs(&ledger, "line\nbreak \"quoted\"", &runs, json!(1)), json!(null));
        assert_eq!(runs.load(Ordering::SeqCst), 2, "nothing ran again after the restart");
    }

    #[test]
    fn a_failed_effect_is_not_recorded_and_runs_again() {
        let dir = Dir::new("failed");
        let ledger = EffectLedger::open(dir.file()).unwrap();
        let failed = ledger.once("k", || Err::<Value, _>("quota exceeded"));
        assert!(matches!(failed, Err(OnceError::Effect("quota exceeded"))));
        assert!(ledger.is_empty());
        assert_eq!(ledger.once("k", || Ok::<_, String>(json!(7))).unwrap(), json!(7));
        drop(ledger);
        assert_eq!(EffectLedger::open(dir.file()).unwrap().get("k"), Some(json!(7)));
    }

    #[test]
    fn a_second_process_cannot_open_a_ledger_in_use() {
        let dir = Dir::new("locked");
        let first = EffectLedger::open(dir.file()).unwrap();
        // A second open file description conflicts just as a second process's would.
        assert!(matches!(EffectLedger::open(dir.file()), Err(LedgerError::Locked { .. })));
        drop(first);
        assert!(EffectLedger::open(dir.file()).is_ok(), "the lock goes with the holder");
    }

    #[test]
    fn a_torn_last_record_is_cut_off_and_a_whole_one_kept() {
        let dir = Dir::new("torn");
        let whole = "{\"key\":\"a\",\"result\":1}\n";
        std::fs::write(dir.file(), format!("{whole}{{\"key\":\"b\",\"res")).unwrap();
        {
            let ledger = EffectLedger::open(dir.file()).unwrap();
            assert_eq!((ledger.get("a"), ledger.get("b")), (Some(json!(1)), None));
            assert_eq!(ledger.once("c", || Ok::<_, String>(json!(3))).unwrap(), json!(3));
        }
        let text = std::fs::read_to_string(dir.file()).unwrap();
        assert!(text.starts_with(whole) && text.lines().count() == 2, "{text}");
        // A whole record whose newline did not make it counts as written.
        std::fs::write(dir.file(), "{\"key\":\"a\",\"result\":1}").unwrap();
        let ledger = EffectLedger::open(dir.file()).unwrap();
        assert_eq!(ledger.get("a"), Some(json!(1)));
        ledger.once("b", || Ok::<_, String>(json!(2))).unwrap();
        drop(ledger);
        let ledger = EffectLedger::open(dir.file()).unwrap();
        assert_eq!((ledger.get("a"), ledger.get("b")), (Some(json!(1)), Some(json!(2))));
    }

    #[test]
    fn a_damaged_line_in_the_middle_is_refused_not_guessed() {
        let dir = Dir::new("damaged");
        std::fs::write(dir.file(), "{\"key\":\"a\",\"result\":1}\nnot json\n{\"key\":\"b\",\"result\":2}\n")
            .unwrap();
        let Err(LedgerError::Damaged { line, .. }) = EffectLedger::open(dir.file()) else {
            panic!("opened a damaged ledger")
        };
        assert_eq!(line, 2);
        assert!(std::fs::read_to_string(dir.file()).unwrap().contains("not json"), "left alone");
    }

    #[test]
    fn concurrent_calls_for_one_key_run_the_effect_once() {
        let dir = Dir::new("concurrent");
        let ledger = Arc::new(EffectLedger::open(dir.file()).unwrap());
        let runs = Arc::new(AtomicU32::new(0));
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let (ledger, runs) = (Arc::clone(&ledger), Arc::clone(&runs));
                std::thread::spawn(move || {
                    ledger
                        .once("same", || {
                            runs.fetch_add(1, Ordering::SeqCst);
                            std::thread::yield_now();
                            Ok::<_, String>(json!(i))
                        })
                        .unwrap()
                })
            })
            .collect();
        let results: Vec<Value> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert!(results.iter().all(|r| *r == results[0]), "{results:?}");
    }

    #[test]
    fn a_panicking_effect_does_not_block_the_key() {
        let dir = Dir::new("panic");
        let ledger = EffectLedger::open(dir.file()).unwrap();
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _ = ledger.once("k", || -> Result<Value, String> { panic!("effect bug") });
        }));
        assert!(caught.is_err());
        assert_eq!(ledger.once("k", || Ok::<_, String>(json!(1))).unwrap(), json!(1));
    }
}
