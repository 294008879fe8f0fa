//! `airlock plan ...`: Terraform/OpenTofu plans. `check` is the offline CI step (one decision
//! per resource change, exit 0/2/3, SARIF for code-scanning UIs), `test` runs plan cases, and
//! `submit` sends a plan to a server as one plan job bound to the plan hash.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use airlock_plan::{PLAN_BYTES_MAX, Plan, PlanEvaluation, Submission};
use airlock_policy::{Decision, Policy};
use clap::{Args, Subcommand, ValueEnum};
use serde_json::{Value, json};

use crate::Format;
use crate::policy_cmd::{Reported, load_policy, print_json};

/// Exit codes of `plan check` and `plan test`.
pub const CHECK_EXIT_CODES: &str = "Exit status:\n  \
    0  allow or throttle (for `test`: every case passed)\n  \
    1  bad input: not a plan, an invalid policy, a failed case\n  \
    2  deny: at least one change is denied\n  \
    3  require_human: at least one change needs an approval, none is denied";

#[derive(Subcommand)]
pub enum PlanCommand {
    /// Decide every resource change of a plan offline (the CI step).
    #[command(after_help = CHECK_EXIT_CODES)]
    Check(CheckArgs),
    /// Run plan cases (plan files and the decisions they must get) against a policy.
    #[command(after_help = CHECK_EXIT_CODES)]
    Test {
        /// The policy file.
        policy: PathBuf,
        /// One or more plan cases files; plan paths in them are relative to the file.
        #[arg(required = true)]
        cases: Vec<PathBuf>,
    },
    /// Submit a plan to a server through Gate A as one plan job.
    #[command(after_help = crate::client_cmd::SUBMIT_EXIT_CODES)]
    Submit(SubmitArgs),
}

/// How `plan check` prints.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum CheckFormat {
    /// One line per change, then the summary.
    #[default]
    Table,
    /// One JSON document.
    Json,
    /// SARIF 2.1.0, for code-scanning UIs: one result per change that is not allowed.
    Sarif,
}

#[derive(Args)]
pub struct CheckArgs {
    /// The plan: the output of `terraform show -json PLANFILE` (or `tofu show -json`).
    plan: PathBuf,
    /// The policy file.
    #[arg(long)]
    policy: PathBuf,
    /// The environment the plan is for, e.g. `production`.
    #[arg(long)]
    env: String,
    /// The Terraform workspace (label `tf_workspace` of every change).
    #[arg(long)]
    workspace: Option<String>,
    /// The binary plan file, to print the hash a submission would be bound to.
    #[arg(long, value_name = "PATH")]
    plan_file: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t)]
    format: CheckFormat,
}

#[derive(Args)]
pub struct SubmitArgs {
    /// The plan: the output of `terraform show -json PLANFILE`.
    plan: PathBuf,
    /// The saved binary plan (`terraform plan -out FILE`): the job is bound to its sha256, and
    /// a worker with `--terraform` applies only a file with that hash.
    #[arg(long, value_name = "PATH")]
    plan_file: Option<PathBuf>,
    /// The environment, e.g. `production`.
    #[arg(long)]
    env: String,
    /// The Terraform workspace.
    #[arg(long)]
    workspace: Option<String>,
    /// The retry key [default: `plan:<plan hash>`, so submitting the same plan again replays].
    #[arg(long, value_name = "KEY")]
    idempotency_key: Option<String>,
    #[command(flatten)]
    connection: crate::client_cmd::Connection,
}

pub fn run(command: PlanCommand) -> ExitCode {
    let result = match command {
        PlanCommand::Check(args) => check(&args),
        PlanCommand::Test { policy, cases } => test(&policy, &cases),
        PlanCommand::Submit(args) => submit(&args),
    };
    result.unwrap_or(ExitCode::FAILURE)
}

/// Reads a file of at most `max` bytes, refusing a larger one before reading it.
fn read_bounded(path: &Path, what: &str, max: usize) -> Result<Vec<u8>, Reported> {
    let fail = |message: String| {
        eprintln!("error: {what} `{}`: {message}", path.display());
        Reported
    };
    let size = std::fs::metadata(path).map_err(|e| fail(format!("cannot read it: {e}")))?.len();
    if size > max as u64 {
        return Err(fail(format!("it is {size} bytes; the limit is {max} (is this a plan JSON?)")));
    }
    std::fs::read(path).map_err(|e| fail(format!("cannot read it: {e}")))
}

/// Reads and parses a plan file; the bytes come back for hashing.
pub(crate) fn read_plan(path: &Path) -> Result<(Plan, Vec<u8>), Reported> {
    let bytes = read_bounded(path, "plan", PLAN_BYTES_MAX)?;
    match Plan::parse(&bytes) {
        Ok(plan) => Ok((plan, bytes)),
        Err(e) => {
            eprintln!("error: plan `{}`: {e}", path.display());
            Err(Reported)
        }
    }
}

/// The hash a plan job is bound to: of the binary plan file when given, else of the JSON.
fn hash_of(json: &[u8], plan_file: Option<&Path>) -> Result<String, Reported> {
    match plan_file {
        None => Ok(airlock_plan::plan_hash(json)),
        Some(path) => std::fs::read(path).map(|bytes| airlock_plan::plan_hash(&bytes)).map_err(|e| {
            eprintln!("error: cannot read the plan file `{}`: {e}", path.display());
            Reported
        }),
    }
}

fn exit_code(decision: Decision) -> ExitCode {
    match decision {
        Decision::Deny => ExitCode::from(2),
        Decision::RequireHuman => ExitCode::from(3),
        Decision::Allow | Decision::Throttle => ExitCode::SUCCESS,
    }
}

fn check(args: &CheckArgs) -> Result<ExitCode, Reported> {
    let format = if args.format == CheckFormat::Json { Format::Json } else { Format::Human };
    let (policy, _) = load_policy(&args.policy, format)?;
    let (plan, bytes) = read_plan(&args.plan)?;
    let plan_hash = hash_of(&bytes, args.plan_file.as_deref())?;
    drop(bytes);
    let submission = Submission {
        env: args.env.trim().to_lowercase(),
        workspace: args.workspace.clone(),
        plan_hash: plan_hash.clone(),
        ..Submission::default()
    };
    let job = airlock_plan::plan_job(
        plan,
        airlock_policy::job::SIMULATION_TENANT,
        airlock_policy::job::SIMULATION_PRINCIPAL,
        submission,
    );
    let result = airlock_plan::evaluate(&policy, &job);
    match args.format {
        CheckFormat::Table => print_table(&policy, &result, &plan_hash),
        CheckFormat::Json => print_json(&json!({
            "decision": result.evaluation.decision.as_str(),
            "rule_ids": policy.ids(&result.evaluation.deciding),
            "reason": result.reason(&policy),
            "snapshot": policy.hash(),
            "plan_hash": plan_hash,
            "counts": result.counts(),
            "changes": result.changes_json(&policy),
        })),
        CheckFormat::Sarif => print_json(&sarif(&policy, &result, &args.plan)),
    }
    Ok(exit_code(result.evaluation.decision))
}

fn print_table(policy: &Policy, result: &PlanEvaluation, plan_hash: &str) {
    let rows: Vec<[String; 5]> = result
        .changes
        .iter()
        .map(|c| {
            let ids = policy.ids(&c.evaluation.deciding);
            [
                c.evaluation.decision.as_str().to_owned(),
                c.action.as_str().to_owned(),
                c.address.clone(),
                if ids.is_empty() { "(default)".to_owned() } else { ids.join(", ") },
                policy.reason(&c.evaluation),
            ]
        })
        .collect();
    if !rows.is_empty() {
        let headers = ["DECISION", "ACTION", "ADDRESS", "RULES", "REASON"];
        let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
        for row in &rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        let line = |cells: &[&str]| {
            let padded: Vec<String> =
                cells.iter().zip(&widths).map(|(cell, width)| format!("{cell:<width$}")).collect();
            println!("{}", padded.join("  ").trim_end());
        };
        line(&headers);
        for row in &rows {
            line(&row.each_ref().map(String::as_str));
        }
        println!();
    }
    let counts: Vec<String> = result.counts().iter().map(|(d, n)| format!("{n} {d}")).collect();
    println!("decision  {}", result.evaluation.decision);
    println!("reason    {}", result.reason(policy));
    println!("changes   {}", if counts.is_empty() { "none".to_owned() } else { counts.join(", ") });
    println!("snapshot  {}", policy.hash());
    println!("plan      {plan_hash}");
}

/// SARIF 2.1.0: one rule per deciding policy rule, one result per change that is not allowed,
/// located at the plan file and the resource address.
fn sarif(policy: &Policy, result: &PlanEvaluation, plan: &Path) -> Value {
    let mut rules: Vec<Value> = Vec::new();
    let mut rule_index = std::collections::BTreeMap::new();
    let mut results = Vec::new();
    for change in &result.changes {
        let level = match change.evaluation.decision {
            Decision::Allow => continue,
            Decision::Deny => "error",
            Decision::RequireHuman => "warning",
            Decision::Throttle => "note",
        };
        let ids = policy.ids(&change.evaluation.deciding);
        let rule_id = ids.first().map_or_else(|| "airlock.default".to_owned(), |id| (*id).to_owned());
        let index = *rule_index.entry(rule_id.clone()).or_insert_with(|| {
            let description = change
                .evaluation
                .deciding
                .first()
                .and_then(|i| policy.rule(*i))
                .and_then(|r| r.reason.clone())
                .unwrap_or_else(|| {
                    format!("the policy's default decision is `{}`", policy.default_decision())
                });
            rules.push(json!({
                "id": rule_id,
                "shortDescription": {"text": description},
                "properties": {"decision": change.evaluation.decision.as_str()},
            }));
            rules.len() - 1
        });
        results.push(json!({
            "ruleId": rule_id,
            "ruleIndex": index,
            "level": level,
            "message": {"text": format!(
                "{} `{}` ({}): {}",
                change.evaluation.decision,
                change.address,
                change.action.as_str(),
                policy.reason(&change.evaluation)
            )},
            "locations": [{
                "physicalLocation": {"artifactLocation": {"uri": plan.display().to_string()}},
                "logicalLocations": [{"fullyQualifiedName": change.address, "kind": "resource"}],
            }],
            "properties": {"decision": change.evaluation.decision.as_str(), "topic": change.topic, "rule_ids": ids},
        }));
    }
    json!({
        "$schema": "https://json.schemastore.org/sarif-2.1.0.json",
        "version": "2.1.0",
        "runs": [{
            "tool": {"driver": {
                "name": "airlock",
                "informationUri": "https://github.com/airlock/airlock",
                "version": env!("CARGO_PKG_VERSION"),
                "rules": rules,
            }},
            "results": results,
            "properties": {
                "decision": result.evaluation.decision.as_str(),
                "reason": result.reason(policy),
                "snapshot": policy.hash(),
            },
        }],
    })
}

fn test(policy_file: &Path, case_files: &[PathBuf]) -> Result<ExitCode, Reported> {
    let (policy, _) = load_policy(policy_file, Format::Human)?;
    let (mut total, mut failed, mut invalid) = (0usize, 0usize, false);
    for case_file in case_files {
        let bytes = read_bounded(case_file, "cases file", airlock_policy::limits::POLICY_BYTES_MAX)?;
        let text = String::from_utf8_lossy(&bytes);
        let cases = match airlock_plan::cases::parse(&text) {
            Ok(cases) => cases,
            Err(errors) => {
                for e in errors {
                    eprintln!("{}", e.render(&case_file.display().to_string()));
                }
                invalid = true;
                continue;
            }
        };
        let base = case_file.parent().unwrap_or(Path::new("."));
        for case in &cases {
            total += 1;
            let Ok((plan, _)) = read_plan(&base.join(&case.plan)) else {
                failed += 1;
                continue;
            };
            let differences = airlock_plan::cases::run(&policy, case, plan);
            if !differences.is_empty() {
                failed += 1;
                println!("{}:{}:{}: FAIL {}", case_file.display(), case.span.line, case.span.col, case.name);
                for d in differences {
                    println!("  {d}");
                }
            }
        }
    }
    println!("{total} case(s), {} passed, {failed} failed", total - failed);
    Ok(if failed == 0 && !invalid { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

fn submit(args: &SubmitArgs) -> Result<ExitCode, Reported> {
    // Checked here first, so that what is not a plan is named and nothing is sent.
    let (plan, bytes) = read_plan(&args.plan)?;
    let plan_hash = hash_of(&bytes, args.plan_file.as_deref())?;
    let plan_file =
        args.plan_file.as_deref().and_then(Path::file_name).map(|n| n.to_string_lossy().into_owned());
    eprintln!("plan {plan_hash}: {} change(s)", plan.changes.len());
    let text = String::from_utf8_lossy(&bytes);
    let params = [
        ("env", Some(args.env.clone())),
        ("workspace", args.workspace.clone()),
        // Without a plan file the server hashes the JSON it receives itself.
        ("plan_hash", args.plan_file.is_some().then_some(plan_hash)),
        ("plan_file", plan_file),
        ("idempotency_key", args.idempotency_key.clone()),
    ];
    Ok(crate::client_cmd::submit_plan(&args.connection, &params, &text))
}
