//! A plan as one job and its changes as jobs of their own: the plan job carries the normalised
//! changes as its payload, and its decision is the most restrictive of its changes' decisions
//! under one snapshot, so that Gate A, Gate B and `airlock plan check` decide it alike.

use std::collections::BTreeMap;

use airlock_policy::{Decision, Evaluation, Explanation, Job, Policy, RuleIdx};
use serde_json::{Map, Value, json};

use crate::plan::{Action, Plan};

/// The topic of a plan job: the apply of a whole plan.
pub const PLAN_TOPIC: &str = "tf.plan.apply";
/// Label naming the Terraform workspace.
pub const LABEL_WORKSPACE: &str = "tf_workspace";
/// Label naming the saved plan file the worker applies, relative to its directory.
pub const LABEL_PLAN_FILE: &str = "tf_plan_file";

/// What a submission says besides the plan.
#[derive(Clone, Debug, Default)]
pub struct Submission {
    /// The target environment.
    pub env: String,
    /// The Terraform workspace, when known.
    pub workspace: Option<String>,
    /// `sha256:` of the binary plan file, or of the plan JSON when there is none.
    pub plan_hash: String,
    /// The plan file's name, for the worker that applies it.
    pub plan_file: Option<String>,
    /// The retry key; `plan:<plan_hash>` when not given.
    pub idempotency_key: Option<String>,
}

/// The plan job of `plan`: topic [`PLAN_TOPIC`], payload `{format_version,
/// terraform_version, changes}`, bound to the plan hash.
pub fn plan_job(plan: Plan, tenant: &str, principal: &str, submission: Submission) -> Job {
    let mut labels = BTreeMap::new();
    if let Some(workspace) = submission.workspace {
        labels.insert(LABEL_WORKSPACE.to_owned(), workspace);
    }
    if let Some(file) = submission.plan_file {
        labels.insert(LABEL_PLAN_FILE.to_owned(), file);
    }
    // Moved, not copied: `json!` would serialize the changes into a second tree.
    let changes: Vec<Value> = plan.changes.into_iter().map(|c| c.payload).collect();
    let mut payload = Map::new();
    payload.insert("format_version".into(), Value::String(plan.format_version));
    payload.insert("terraform_version".into(), plan.terraform_version.map_or(Value::Null, Value::String));
    payload.insert("changes".into(), Value::Array(changes));
    let idempotency_key =
        submission.idempotency_key.unwrap_or_else(|| format!("plan:{}", submission.plan_hash));
    Job {
        tenant: tenant.to_owned(),
        principal: principal.to_owned(),
        topic: PLAN_TOPIC.to_owned(),
        env: submission.env,
        labels,
        payload: Value::Object(payload),
        plan_hash: Some(submission.plan_hash),
        idempotency_key: Some(idempotency_key),
    }
}

/// Whether `job` is a plan job, decided per change.
pub fn is_plan_job(job: &Job) -> bool {
    job.topic == PLAN_TOPIC
}

/// One change's decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChangeDecision {
    /// The resource address.
    pub address: String,
    /// What the change does.
    pub action: Action,
    /// The topic it was evaluated under.
    pub topic: String,
    /// Its decision.
    pub evaluation: Evaluation,
}

/// A plan job's decision and each change's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanEvaluation {
    /// The most restrictive decision over the changes; its deciding rules are those of every
    /// change with that decision, in file order, without repeats.
    pub evaluation: Evaluation,
    /// Each change's decision, in plan order.
    pub changes: Vec<ChangeDecision>,
    /// Why the job's payload could not be read as changes (then the decision is `deny`).
    pub malformed: Option<String>,
}

/// The job of the `i`th change of a plan job under `policy`'s topic map, without its payload:
/// the change is lent to the evaluation where it lies. On a malformed change, why.
fn change_job(policy: &Policy, job: &Job, i: usize, change: &Value) -> Result<(String, Action, Job), String> {
    let text = |key: &str| change.get(key).and_then(Value::as_str);
    let missing = if text("address").is_none() {
        Some("address")
    } else if text("type").is_none() {
        Some("type")
    } else if text("action").and_then(Action::parse).is_none() {
        Some("action")
    } else {
        None
    };
    if let Some(key) = missing {
        return Err(format!("`payload.changes[{i}].{key}` is missing or not a string"));
    }
    let (address, resource_type) = (text("address").unwrap_or_default(), text("type").unwrap_or_default());
    let action = text("action").and_then(Action::parse).unwrap_or(Action::Create);
    let mut labels = BTreeMap::new();
    labels.insert("tf_address".to_owned(), address.to_owned());
    if let Some(module) = text("module_address") {
        labels.insert("tf_module".to_owned(), module.to_owned());
    }
    labels.insert("tf_provider".to_owned(), text("provider_name").unwrap_or_default().to_owned());
    if let Some(workspace) = job.labels.get(LABEL_WORKSPACE) {
        labels.insert(LABEL_WORKSPACE.to_owned(), workspace.clone());
    }
    let topic = policy.terraform_topic(resource_type, action.as_str());
    let change_job = Job {
        tenant: job.tenant.clone(),
        principal: job.principal.clone(),
        topic,
        env: job.env.clone(),
        labels,
        payload: Value::Null,
        plan_hash: job.plan_hash.clone(),
        idempotency_key: None,
    };
    Ok((address.to_owned(), action, change_job))
}

/// One change of a plan job with every rule's verdict on it.
#[derive(Clone, Debug)]
pub struct ChangeExplanation {
    /// The resource address.
    pub address: String,
    /// The change as the job it was decided as (topic, labels, payload).
    pub job: Job,
    /// Every rule's verdict, and the decision.
    pub explanation: Explanation,
}

/// Every rule's verdict on each of the first `max` changes of a plan job, in plan order; empty
/// when the payload is not a list of changes (its decision is `deny`, with why, by
/// [`evaluate`]). Each explained change's payload is copied into its job: `max` bounds that.
pub fn explain(policy: &Policy, job: &Job, max: usize) -> Vec<ChangeExplanation> {
    let Some(changes) = job.payload.get("changes").and_then(Value::as_array) else {
        return Vec::new();
    };
    changes
        .iter()
        .take(max)
        .enumerate()
        .map_while(|(i, change)| {
            let (address, _, mut job) = change_job(policy, job, i, change).ok()?;
            job.payload = change.clone();
            let explanation = policy.explain(&job);
            Some(ChangeExplanation { address, job, explanation })
        })
        .collect()
}

/// Evaluates every change of a plan job. Each change is evaluated where it lies in the job's
/// payload (`Policy::evaluate_on`), so that a large plan is never copied.
pub fn evaluate(policy: &Policy, job: &Job) -> PlanEvaluation {
    decide(policy, job, &mut |change_job, change| Some(policy.evaluate_on(change_job, change)))
        .unwrap_or_else(|| PlanEvaluation {
            evaluation: deny(),
            changes: Vec::new(),
            malformed: Some("the evaluation stopped".into()),
        })
}

/// Any job's decision: a plan job's over its changes (with each change's), any other job's
/// by the policy alone. What every gate, approval check and dry run asks.
pub fn evaluate_any(policy: &Policy, job: &Job) -> (Evaluation, Option<PlanEvaluation>) {
    if is_plan_job(job) {
        let plan = evaluate(policy, job);
        (plan.evaluation.clone(), Some(plan))
    } else {
        (policy.evaluate(job), None)
    }
}

/// [`evaluate_any`] under a deadline: `None` once `time_left` answers `false`.
pub fn evaluate_any_within(
    policy: &Policy,
    job: &Job,
    time_left: &mut dyn FnMut() -> bool,
) -> Option<(Evaluation, Option<PlanEvaluation>)> {
    if is_plan_job(job) {
        let plan = evaluate_within(policy, job, time_left)?;
        Some((plan.evaluation.clone(), Some(plan)))
    } else {
        policy.evaluate_within(job, time_left).map(|e| (e, None))
    }
}

/// [`evaluate`] under one deadline for the whole plan: `None` once `time_left` answers `false`.
pub fn evaluate_within(
    policy: &Policy,
    job: &Job,
    time_left: &mut dyn FnMut() -> bool,
) -> Option<PlanEvaluation> {
    decide(policy, job, &mut |change_job, change| {
        policy.evaluate_within_on(change_job, change, &mut *time_left)
    })
}

fn deny() -> Evaluation {
    Evaluation { decision: Decision::Deny, deciding: Vec::new(), audit: Vec::new(), errors: Vec::new() }
}

fn decide(
    policy: &Policy,
    job: &Job,
    evaluate: &mut dyn FnMut(&Job, &Value) -> Option<Evaluation>,
) -> Option<PlanEvaluation> {
    let malformed =
        |why: String| Some(PlanEvaluation { evaluation: deny(), changes: Vec::new(), malformed: Some(why) });
    let Some(changes) = job.payload.get("changes").and_then(Value::as_array) else {
        return malformed("`payload.changes` is not a list".into());
    };
    let mut decided = Vec::with_capacity(changes.len());
    for (i, change) in changes.iter().enumerate() {
        let (address, action, change_job) = match change_job(policy, job, i, change) {
            Ok(built) => built,
            Err(why) => return malformed(why),
        };
        let evaluation = evaluate(&change_job, change)?;
        decided.push(ChangeDecision { address, action, topic: change_job.topic, evaluation });
    }
    Some(PlanEvaluation { evaluation: aggregate(&decided), changes: decided, malformed: None })
}

/// The most restrictive decision; deciding rules of every change that has it.
fn aggregate(changes: &[ChangeDecision]) -> Evaluation {
    let decision = changes.iter().map(|c| c.evaluation.decision).max().unwrap_or(Decision::Allow);
    let mut deciding: Vec<RuleIdx> = Vec::new();
    let mut audit: Vec<RuleIdx> = Vec::new();
    let mut errors = Vec::new();
    for change in changes {
        if change.evaluation.decision == decision {
            deciding.extend(&change.evaluation.deciding);
        }
        audit.extend(&change.evaluation.audit);
        errors.extend(change.evaluation.errors.iter().copied());
    }
    for list in [&mut deciding, &mut audit] {
        list.sort_unstable();
        list.dedup();
    }
    errors.sort_unstable_by_key(|(idx, e)| (*idx, e.to_string()));
    errors.dedup();
    Evaluation { decision, deciding, audit, errors }
}

impl PlanEvaluation {
    /// Why, for humans: `no changes`, or how many changes have the decision and the first of
    /// them (by address) with its rule's reason. Independent of the order of the changes.
    pub fn reason(&self, policy: &Policy) -> String {
        if let Some(why) = &self.malformed {
            return format!("the plan job's payload is not a plan: {why}");
        }
        let decision = self.evaluation.decision;
        let mut deciding: Vec<&ChangeDecision> =
            self.changes.iter().filter(|c| c.evaluation.decision == decision).collect();
        deciding.sort_by(|a, b| (&a.address, &a.topic).cmp(&(&b.address, &b.topic)));
        let Some(first) = deciding.first() else { return "no changes".into() };
        let total = self.changes.len();
        let more = match deciding.len() {
            1 => String::new(),
            n => format!(" (and {} more)", n - 1),
        };
        format!(
            "{} of {total} changes {}: `{}`: {}{more}",
            deciding.len(),
            verb(decision),
            first.address,
            policy.reason(&first.evaluation)
        )
    }

    /// How many changes have each decision, by decision name.
    pub fn counts(&self) -> BTreeMap<&'static str, usize> {
        let mut counts = BTreeMap::new();
        for change in &self.changes {
            *counts.entry(change.evaluation.decision.as_str()).or_insert(0) += 1;
        }
        counts
    }

    /// Each change's decision as JSON: `{address, action, topic, decision, rule_ids, reason}`.
    pub fn changes_json(&self, policy: &Policy) -> Value {
        Value::Array(self.changes.iter().map(|c| change_json(c, policy)).collect())
    }
}

fn change_json(change: &ChangeDecision, policy: &Policy) -> Value {
    let mut o = Map::new();
    o.insert("address".into(), json!(change.address));
    o.insert("action".into(), json!(change.action.as_str()));
    o.insert("topic".into(), json!(change.topic));
    o.insert("decision".into(), json!(change.evaluation.decision.as_str()));
    o.insert("rule_ids".into(), json!(policy.ids(&change.evaluation.deciding)));
    o.insert("reason".into(), json!(policy.reason(&change.evaluation)));
    if !change.evaluation.audit.is_empty() {
        o.insert("audit_rule_ids".into(), json!(policy.ids(&change.evaluation.audit)));
    }
    if !change.evaluation.errors.is_empty() {
        let errors: Vec<Value> = change
            .evaluation
            .errors
            .iter()
            .map(|(i, e)| json!({"rule_id": policy.rule(*i).map(|r| r.id.as_str()), "error": e.to_string()}))
            .collect();
        o.insert("errors".into(), Value::Array(errors));
    }
    Value::Object(o)
}

fn verb(decision: Decision) -> &'static str {
    match decision {
        Decision::Allow => "are allowed",
        Decision::Throttle => "are throttled",
        Decision::RequireHuman => "require a human",
        Decision::Deny => "are denied",
    }
}
