//! `airlock worker --terraform DIR`: governed apply. A plan job is applied only from a plan file
//! whose sha256 is the job's `plan_hash` (the hash its approvals are bound to) and whose changes,
//! read back with `terraform show -json FILE`, are exactly the changes that were decided (the
//! job's payload): a plan JSON that does not describe the plan file is refused. The verified
//! bytes are copied to a private file first, so that swapping the file after the check cannot
//! change what is shown or applied. Runs `terraform apply -input=false -no-color FILE` (or
//! `tofu`) in DIR; the effect ledger keeps a retried job from applying twice.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};

use airlock_plan::{LABEL_PLAN_FILE, PLAN_BYTES_MAX, PLAN_TOPIC, Plan};
use airlock_worker::{Job, Outcome};
use serde_json::{Value, json};

use crate::worker_cmd::Capture;

/// The plan file applied when the job's labels name none.
pub const PLAN_FILE_DEFAULT: &str = "tfplan";
/// How much of the end of `terraform apply`'s output the result keeps.
pub const OUTPUT_TAIL_BYTES: usize = 64 * 1024;

/// Where and with what plans are applied.
pub struct Apply {
    /// The Terraform working directory.
    pub dir: PathBuf,
    /// `terraform` or `tofu` (or a path to either).
    pub bin: String,
}

/// A child process's end: status, stdout (its tail), stderr (its tail).
pub type Ran = (ExitStatus, Vec<u8>, Vec<u8>);

impl Apply {
    /// Checks the plan file against the job's hash and its changes against the decided ones
    /// and, when both match, applies it; `run` runs each command (honouring cancellation) and
    /// keeps its stdout as `Capture` says. Every refusal is a final failure: a retry would find
    /// the same file.
    pub fn run(&self, job: &Job, mut run: impl FnMut(Command, Capture) -> Result<Ran, Outcome>) -> Outcome {
        let verified = match self.verify(job) {
            Ok(verified) => verified,
            Err(why) => return Outcome::Failed(why),
        };
        let (name, plan_hash, bytes) = verified;
        // The bytes that were hashed are the bytes applied.
        let private_name = format!(".airlock-apply-{}.tfplan", job.id);
        let private = self.dir.join(&private_name);
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&private)
            .and_then(|mut f| f.write_all(&bytes).and_then(|()| f.sync_all()));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&private);
            return Outcome::Retryable(format!(
                "cannot write the verified plan to `{}`: {e}",
                private.display()
            ));
        }
        if let Err(outcome) = self.check_changes(job, &private_name, &mut run) {
            let _ = std::fs::remove_file(&private);
            return outcome;
        }
        let mut command = Command::new(&self.bin);
        command.current_dir(&self.dir).args(["apply", "-input=false", "-no-color", &private_name]);
        let ran = run(command, Capture::Tail(OUTPUT_TAIL_BYTES));
        let _ = std::fs::remove_file(&private);
        let (status, stdout, stderr) = match ran {
            Ok(ran) => ran,
            Err(outcome) => return outcome,
        };
        let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
        match status.code() {
            Some(0) => Outcome::Success(json!({
                "applied": true,
                "plan_file": name,
                "plan_hash": plan_hash,
                "output": text(&stdout),
                "output_truncated": stdout.len() >= OUTPUT_TAIL_BYTES,
            })),
            code => {
                let how = code.map_or_else(|| "was killed".to_owned(), |c| format!("exited {c}"));
                let tail = text(&stderr);
                Outcome::Failed(format!("`{} apply` {how}: {}", self.bin, tail.trim()))
            }
        }
    }

    /// Reads the plan file (`name` in the working directory) back with `show -json` and
    /// compares its changes with the job's payload, the changes that were decided.
    fn check_changes(
        &self,
        job: &Job,
        name: &str,
        run: &mut impl FnMut(Command, Capture) -> Result<Ran, Outcome>,
    ) -> Result<(), Outcome> {
        let refuse = |why: String| Outcome::Failed(format!("{why}; refusing to apply, nothing was applied"));
        let decided = job
            .payload
            .get("changes")
            .and_then(Value::as_array)
            .ok_or_else(|| refuse("the job's payload has no `changes` list".into()))?;
        let mut command = Command::new(&self.bin);
        command.current_dir(&self.dir).args(["show", "-json", name]);
        let (status, stdout, stderr) = run(command, Capture::Head(PLAN_BYTES_MAX + 1))?;
        let show = format!("`{} show -json`", self.bin);
        if status.code() != Some(0) {
            let how = status.code().map_or_else(|| "was killed".to_owned(), |c| format!("exited {c}"));
            let tail = String::from_utf8_lossy(&stderr);
            return Err(refuse(format!("{show} of the plan file {how}: {}", tail.trim())));
        }
        let shown = Plan::parse(&stdout).map_err(|e| refuse(format!("{show} of the plan file: {e}")))?;
        let differences = airlock_plan::compare::differences(decided, &shown.changes);
        if differences.is_empty() {
            return Ok(());
        }
        Err(refuse(format!(
            "the plan file does not hold the changes that were decided ({} of them differ): {}",
            differences.len(),
            airlock_plan::compare::describe(&differences)
        )))
    }

    /// The plan file's name, the job's plan hash, and the file's bytes once they hash to it.
    fn verify(&self, job: &Job) -> Result<(String, String, Vec<u8>), String> {
        if job.topic != PLAN_TOPIC {
            return Err(format!(
                "`{}` is not a plan job ({PLAN_TOPIC}); --terraform applies plans only",
                job.topic
            ));
        }
        let plan_hash = job
            .to_json()
            .get("plan_hash")
            .and_then(Value::as_str)
            .ok_or("the job has no `plan_hash`; refusing to apply an unbound plan")?
            .to_owned();
        let name = job.labels.get(LABEL_PLAN_FILE).map_or(PLAN_FILE_DEFAULT, String::as_str);
        if name.is_empty() || name.contains('/') || name.contains('\\') || name == "." || name == ".." {
            return Err(format!("the plan file `{name}` must be a file name in the working directory"));
        }
        let path = self.dir.join(name);
        let bytes = std::fs::read(&path)
            .map_err(|e| format!("cannot read the plan file `{}`: {e}", path.display()))?;
        let found = airlock_plan::plan_hash(&bytes);
        if found != plan_hash {
            return Err(format!(
                "the plan file `{}` has {found}, but the job (and its approvals) are bound to {plan_hash}; \
                 refusing to apply a plan that was not the one decided",
                path.display()
            ));
        }
        Ok((name.to_owned(), plan_hash, bytes))
    }
}

/// The ledger a `--terraform` worker uses when `--ledger` names none: in the working
/// directory, so that a restarted worker finds what was applied there.
pub fn default_ledger(dir: &Path) -> PathBuf {
    dir.join(".airlock-apply-ledger.jsonl")
}
