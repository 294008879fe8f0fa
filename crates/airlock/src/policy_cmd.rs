//! `airlock policy ...`: the offline policy tools (check, simulate, explain, test), which read
//! files, call the policy engine and print; and the server-side ones (publish, rollback,
//! snapshots, diff), which `client_cmd` sends to a running server.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use airlock_policy::cases;
use airlock_policy::limits::POLICY_BYTES_MAX;
use airlock_policy::{Decision, Diagnostic, Evaluation, Job, Policy, Verdict};
use clap::{Args, Subcommand};
use serde_json::{Value, json};

use crate::Format;

#[derive(Subcommand)]
pub enum PolicyCommand {
    /// Validate a policy; print its snapshot hash, or every error with its line and column.
    Check {
        /// The policy file.
        file: PathBuf,
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// The decision a policy gives one job: decision, deciding rules, reason, snapshot.
    Simulate {
        #[command(flatten)]
        input: JobInput,
        /// Exit 2 on deny and 3 on require_human, for CI.
        #[arg(long)]
        exit_code: bool,
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// Every rule's verdict on one job, and why.
    Explain {
        #[command(flatten)]
        input: JobInput,
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// Run test cases against a policy; exit 1 if any fails.
    Test {
        /// The policy file.
        file: PathBuf,
        /// One or more cases files: job cases (`job:`) and plan cases (`plan:` a plan JSON file,
        /// relative to the cases file, with `env`, `expect` and optional per-change `changes`).
        #[arg(required = true)]
        cases: Vec<PathBuf>,
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// Publish a policy file on a server as the new active snapshot (platform admin).
    Publish(crate::client_cmd::PublishArgs),
    /// Re-activate an earlier snapshot version on a server, as a new version (platform admin).
    Rollback(crate::client_cmd::RollbackArgs),
    /// List a server's policy snapshots, newest first.
    Snapshots(crate::client_cmd::SnapshotsArgs),
    /// The stored jobs whose decision a candidate policy file would change (operator).
    Diff(crate::client_cmd::DiffArgs),
}

#[derive(Args)]
pub struct JobInput {
    /// The policy file.
    #[arg(long)]
    policy: PathBuf,
    /// The job as JSON, or `@FILE` to read it from a file (`@-` for stdin).
    #[arg(long)]
    job: String,
}

/// A failure already reported to the user; the command exits 1.
pub(crate) struct Reported;

pub fn run(command: PolicyCommand) -> ExitCode {
    let result = match command {
        PolicyCommand::Check { file, format } => check(&file, format),
        PolicyCommand::Simulate { input, exit_code, format } => simulate(&input, exit_code, format),
        PolicyCommand::Explain { input, format } => explain(&input, format),
        PolicyCommand::Test { file, cases, format } => test(&file, &cases, format),
        PolicyCommand::Publish(args) => Ok(crate::client_cmd::publish(&args)),
        PolicyCommand::Rollback(args) => Ok(crate::client_cmd::rollback(&args)),
        PolicyCommand::Snapshots(args) => Ok(crate::client_cmd::snapshots(&args)),
        PolicyCommand::Diff(args) => Ok(crate::client_cmd::diff(&args)),
    };
    result.unwrap_or(ExitCode::FAILURE)
}

fn read_text(path: &Path, what: &str) -> Result<String, Reported> {
    let fail = |message: String| {
        eprintln!("error: cannot read {what} `{}`: {message}", path.display());
        Reported
    };
    let size = std::fs::metadata(path).map_err(|e| fail(e.to_string()))?.len();
    if size > POLICY_BYTES_MAX as u64 {
        return Err(fail(format!("{size} bytes is over the {POLICY_BYTES_MAX}-byte limit")));
    }
    let bytes = std::fs::read(path).map_err(|e| fail(e.to_string()))?;
    String::from_utf8(bytes).map_err(|_| fail("not valid UTF-8".into()))
}

fn print_diagnostics(file: &Path, diagnostics: &[Diagnostic]) {
    for d in diagnostics {
        eprintln!("{}", d.render(&file.display().to_string()));
    }
}

fn diagnostics_json(file: &Path, diagnostics: &[Diagnostic]) -> Value {
    Value::Array(
        diagnostics
            .iter()
            .map(|d| {
                json!({
                    "file": file.display().to_string(),
                    "line": d.span.line,
                    "col": d.span.col,
                    "severity": d.severity.as_str(),
                    "message": d.message,
                    "help": d.help,
                })
            })
            .collect(),
    )
}

/// Compiles a policy file, reporting errors (and, in human format, warnings) to stderr.
pub(crate) fn load_policy(file: &Path, format: Format) -> Result<(Policy, Vec<Diagnostic>), Reported> {
    let text = read_text(file, "policy")?;
    match airlock_policy::compile(&text) {
        Ok(compiled) => Ok(compiled),
        Err(errors) => {
            match format {
                Format::Human => {
                    print_diagnostics(file, &errors);
                    eprintln!("{}: {} error(s)", file.display(), errors.len());
                }
                Format::Json => print_json(&json!({"ok": false, "errors": diagnostics_json(file, &errors)})),
            }
            Err(Reported)
        }
    }
}

pub(crate) fn print_json(value: &Value) {
    println!("{}", serde_json::to_string_pretty(value).unwrap_or_default());
}

fn check(file: &Path, format: Format) -> Result<ExitCode, Reported> {
    let (policy, warnings) = load_policy(file, format)?;
    match format {
        Format::Human => {
            print_diagnostics(file, &warnings);
            println!(
                "{}: ok, {} rule(s), {} warning(s)\nsnapshot {}",
                file.display(),
                policy.rules().len(),
                warnings.len(),
                policy.hash()
            );
        }
        Format::Json => print_json(&json!({
            "ok": true,
            "snapshot": policy.hash(),
            "rules": policy.rules().len(),
            "warnings": diagnostics_json(file, &warnings),
        })),
    }
    Ok(ExitCode::SUCCESS)
}

fn load_job(spec: &str) -> Result<Job, Reported> {
    let (bytes, source) = match spec.strip_prefix('@') {
        Some("-") => {
            let mut buffer = Vec::new();
            std::io::stdin().read_to_end(&mut buffer).map_err(|e| {
                eprintln!("error: cannot read the job from stdin: {e}");
                Reported
            })?;
            (buffer, "stdin".to_owned())
        }
        Some(path) => {
            let text = read_text(Path::new(path), "job")?;
            (text.into_bytes(), format!("`{path}`"))
        }
        None => (spec.as_bytes().to_vec(), "--job".to_owned()),
    };
    Job::from_slice(&bytes).map_err(|errors| {
        for e in errors {
            eprintln!("error: invalid job in {source}: {e}");
        }
        Reported
    })
}

fn print_evaluation(policy: &Policy, job: &Job, evaluation: &Evaluation) {
    let ids = policy.ids(&evaluation.deciding);
    println!("decision  {}", evaluation.decision);
    println!("rules     {}", if ids.is_empty() { "(default)".to_owned() } else { ids.join(", ") });
    println!("reason    {}", policy.reason(evaluation));
    println!("snapshot  {}", policy.hash());
    println!("job hash  {}", job.hash());
    if !evaluation.audit.is_empty() {
        println!("audit     {} (would have decided; not enforced)", policy.ids(&evaluation.audit).join(", "));
    }
    for (idx, error) in &evaluation.errors {
        let id = policy.rule(*idx).map_or("?", |r| r.id.as_str());
        println!("error     rule `{id}`: {error} (counted as matched: fail closed)");
    }
}

fn simulate(input: &JobInput, exit_code: bool, format: Format) -> Result<ExitCode, Reported> {
    let (policy, _) = load_policy(&input.policy, format)?;
    let job = load_job(&input.job)?;
    let evaluation = policy.evaluate(&job);
    match format {
        Format::Human => print_evaluation(&policy, &job, &evaluation),
        Format::Json => print_json(&airlock_server::wire::evaluation(&policy, &job, &evaluation)),
    }
    Ok(match (exit_code, evaluation.decision) {
        (true, Decision::Deny) => ExitCode::from(2),
        (true, Decision::RequireHuman) => ExitCode::from(3),
        _ => ExitCode::SUCCESS,
    })
}

fn explain(input: &JobInput, format: Format) -> Result<ExitCode, Reported> {
    let (policy, _) = load_policy(&input.policy, format)?;
    let job = load_job(&input.job)?;
    let explanation = policy.explain(&job);
    match format {
        Format::Human => {
            print_evaluation(&policy, &job, &explanation.evaluation);
            println!();
            let width = policy.rules().iter().map(|r| r.id.len()).max().unwrap_or(0);
            for (rule, verdict) in policy.rules().iter().zip(&explanation.verdicts) {
                let (mark, detail) = match verdict {
                    Verdict::Matched => ("match", "every condition held".to_owned()),
                    Verdict::NotMatched(why) => ("no   ", why.clone()),
                    Verdict::Error(e) => ("error", e.clone()),
                };
                let mode = if rule.mode == airlock_policy::Mode::Audit { " (audit)" } else { "" };
                println!("{mark}  {:<width$}  {:<13}  {detail}{mode}", rule.id, rule.decision.as_str());
            }
        }
        Format::Json => {
            print_json(&airlock_server::wire::explanation(&policy, &job, &explanation));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A case of a `policy test` file: a job, or a plan file.
enum AnyCase {
    Job(cases::Case),
    Plan(airlock_plan::cases::Case),
}

/// How a plan case failed, if it did; its plan path is relative to `base`.
fn plan_failure(policy: &Policy, case: &airlock_plan::cases::Case, base: &Path) -> Option<cases::Failure> {
    let expected = match &case.changes {
        Some(changes) => format!("{} ({} change decision(s) listed)", case.expect, changes.len()),
        None => case.expect.to_string(),
    };
    let failure =
        |actual: String| cases::Failure { name: case.name.clone(), span: case.span, expected, actual };
    let Ok((plan, _)) = crate::plan_cmd::read_plan(&base.join(&case.plan)) else {
        return Some(failure(format!("the plan `{}` could not be read (above)", case.plan)));
    };
    let differences = airlock_plan::cases::run(policy, case, plan);
    (!differences.is_empty()).then(|| failure(differences.join("; ")))
}

fn test(file: &Path, case_files: &[PathBuf], format: Format) -> Result<ExitCode, Reported> {
    let (policy, _) = load_policy(file, format)?;
    let mut total = 0usize;
    let mut failed = Vec::new();
    let mut invalid = false;
    for case_file in case_files {
        let text = read_text(case_file, "cases file")?;
        // A case with `plan:` is a plan case (a plan file and the decisions it must get).
        let parsed = cases::parse_with(&text, |entry, errors| {
            if entry.get("plan").is_some() {
                airlock_plan::cases::plan_case(entry, errors).map(AnyCase::Plan)
            } else {
                cases::job_case(entry, errors).map(AnyCase::Job)
            }
        });
        let parsed = match parsed {
            Ok(parsed) => parsed,
            Err(errors) => {
                print_diagnostics(case_file, &errors);
                invalid = true;
                continue;
            }
        };
        total += parsed.len();
        let base = case_file.parent().unwrap_or(Path::new("."));
        for case in &parsed {
            let failures = match case {
                AnyCase::Job(case) => cases::run(&policy, std::slice::from_ref(case)),
                AnyCase::Plan(case) => plan_failure(&policy, case, base).into_iter().collect(),
            };
            failed.extend(failures.into_iter().map(|f| (case_file.display().to_string(), f)));
        }
    }
    match format {
        Format::Human => {
            for (file, f) in &failed {
                println!(
                    "{file}:{}:{}: FAIL {}\n  expected: {}\n  actual:   {}",
                    f.span.line, f.span.col, f.name, f.expected, f.actual
                );
            }
            println!("{} case(s), {} passed, {} failed", total, total - failed.len(), failed.len());
        }
        Format::Json => print_json(&json!({
            "cases": total,
            "failed": failed.iter().map(|(file, f)| json!({
                "file": file, "line": f.span.line, "name": f.name, "expected": f.expected, "actual": f.actual,
            })).collect::<Vec<_>>(),
        })),
    }
    Ok(if failed.is_empty() && !invalid { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
