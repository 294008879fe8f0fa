//! A compiled policy, its rule index, and the two questions asked of it: what is the decision
//! for this job (`evaluate`, the hot path), and why (`explain`, every rule's verdict).

use rustc_hash::FxHashMap;
use serde_json::Value;

use crate::eval::{self, Ctx, EvalError};
use crate::glob::Glob;
use crate::job::Job;
use crate::model::{Cond, Decision, Field, Mode, RiskClass, Rule, TerraformTopic, Test};
use crate::schema::{PayloadSchemas, Violation};

/// A compiled policy: immutable, hashed, indexed.
#[derive(Debug)]
pub struct Policy {
    default: Decision,
    default_reason: Option<String>,
    risk: Vec<RiskClass>,
    rules: Vec<Rule>,
    terraform: Vec<TerraformTopic>,
    schemas: PayloadSchemas,
    index: Index,
    hash: String,
}

/// Position of a rule in its policy (file order).
pub type RuleIdx = u32;

/// The decision for one job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Evaluation {
    /// The decision to apply.
    pub decision: Decision,
    /// Enforced rules that matched with that decision, in file order; the first one is the
    /// deciding rule. Empty when no rule matched and the default applies.
    pub deciding: Vec<RuleIdx>,
    /// Audit-mode rules that matched ("would have decided"), in file order.
    pub audit: Vec<RuleIdx>,
    /// Rules whose evaluation failed; each counted as matched when its decision is more
    /// restrictive than `allow` (fail closed).
    pub errors: Vec<(RuleIdx, EvalError)>,
}

/// One rule's verdict on one job, for `explain`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Every condition held.
    Matched,
    /// This condition failed.
    NotMatched(String),
    /// Evaluation failed; the rule counts as matched when it could restrict.
    Error(String),
}

/// Every rule's verdict plus the decision.
#[derive(Clone, Debug)]
pub struct Explanation {
    /// The decision, exactly as [`Policy::evaluate`] gives it.
    pub evaluation: Evaluation,
    /// One verdict per rule, in file order.
    pub verdicts: Vec<Verdict>,
}

impl Policy {
    pub(crate) fn new(
        default: Decision,
        default_reason: Option<String>,
        risk: Vec<RiskClass>,
        rules: Vec<Rule>,
        terraform: Vec<TerraformTopic>,
        schemas: PayloadSchemas,
        hash: String,
    ) -> Self {
        let index = Index::build(&rules);
        Self { default, default_reason, risk, rules, terraform, schemas, index, hash }
    }

    /// How `payload` breaks the payload schemas of `topic` (`schemas:`): every violation,
    /// empty when it conforms or no schema's pattern matches the topic.
    pub fn payload_violations(&self, topic: &str, payload: &Value) -> Vec<Violation> {
        self.schemas.violations(topic, payload)
    }

    /// The topic a Terraform change of `resource_type` with `action` (`create`, `update`,
    /// `delete`, `replace`, ...) is evaluated under: the first `terraform.topics` entry that
    /// matches, else `tf.<type>.<action>`.
    pub fn terraform_topic(&self, resource_type: &str, action: &str) -> String {
        let whole = format!("{resource_type}.{action}");
        for entry in &self.terraform {
            if entry.whole {
                if entry.pattern.matches(&whole) {
                    return entry.topic.clone();
                }
            } else if entry.pattern.matches(resource_type) {
                return format!("{}.{action}", entry.topic);
            }
        }
        format!("tf.{whole}")
    }

    /// The snapshot hash: `sha256:` + hex of the canonical form.
    pub fn hash(&self) -> &str {
        &self.hash
    }

    /// The rules, in file order.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// One rule by position.
    pub fn rule(&self, idx: RuleIdx) -> Option<&Rule> {
        self.rules.get(idx as usize)
    }

    /// The decision when no rule matches.
    pub fn default_decision(&self) -> Decision {
        self.default
    }

    /// The risk classes, in file order.
    pub fn risk_classes(&self) -> &[RiskClass] {
        &self.risk
    }

    /// The risk classes a topic is in: every class with a matching pattern, in name order.
    pub fn classes_of<'a>(&'a self, topic: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.risk.iter().filter(move |c| c.topics.iter().any(|g| g.matches(topic))).map(|c| c.name.as_str())
    }

    /// Whether a topic is in the named risk class.
    pub fn in_class(&self, topic: &str, class: &str) -> bool {
        self.classes_of(topic).any(|c| c == class)
    }

    /// The decision for `job` (SPEC 3.3): the most restrictive matching enforced rule wins,
    /// ties go to file order, no match gives the default.
    pub fn evaluate(&self, job: &Job) -> Evaluation {
        self.evaluate_with(&mut Ctx::new(job, self))
    }

    /// [`Policy::evaluate`] of `job` as if `payload` were its payload: a caller that holds the
    /// payload elsewhere (a plan's change inside its plan job) lends it instead of copying it
    /// into a job.
    pub fn evaluate_on(&self, job: &Job, payload: &Value) -> Evaluation {
        self.evaluate_with(&mut Ctx::new(job, self).on(payload))
    }

    /// [`Policy::evaluate_on`] under a deadline, as [`Policy::evaluate_within`].
    pub fn evaluate_within_on(
        &self,
        job: &Job,
        payload: &Value,
        time_left: &mut dyn FnMut() -> bool,
    ) -> Option<Evaluation> {
        let mut ctx = Ctx::within(job, self, time_left).on(payload);
        let evaluation = self.evaluate_with(&mut ctx);
        (!ctx.out_of_time).then_some(evaluation)
    }

    /// [`Policy::evaluate`] under a deadline: `time_left` is asked every few field tests, and
    /// once it answers `false` evaluation stops and there is no decision (`None`). The engine
    /// reads no clock; the caller's closure does.
    pub fn evaluate_within(&self, job: &Job, time_left: &mut dyn FnMut() -> bool) -> Option<Evaluation> {
        let mut ctx = Ctx::within(job, self, time_left);
        let evaluation = self.evaluate_with(&mut ctx);
        (!ctx.out_of_time).then_some(evaluation)
    }

    fn evaluate_with(&self, ctx: &mut Ctx<'_>) -> Evaluation {
        let mut matched: Vec<RuleIdx> = Vec::new();
        let mut errors = Vec::new();
        self.index.candidates(ctx.job, |idx| {
            let Some(rule) = self.rule(idx) else { return };
            match eval::all(&rule.when, ctx) {
                Ok(true) => matched.push(idx),
                Ok(false) => {}
                Err(e) => {
                    errors.push((idx, e));
                    if rule.decision > Decision::Allow {
                        matched.push(idx);
                    }
                }
            }
        });
        matched.sort_unstable();
        errors.sort_unstable_by_key(|(idx, _)| *idx);
        self.conclude(matched, errors)
    }

    fn conclude(&self, matched: Vec<RuleIdx>, errors: Vec<(RuleIdx, EvalError)>) -> Evaluation {
        let mut audit = Vec::new();
        let mut decision = None;
        let mut deciding = Vec::new();
        for idx in matched {
            let Some(rule) = self.rule(idx) else { continue };
            if rule.mode == Mode::Audit {
                audit.push(idx);
                continue;
            }
            match decision {
                Some(d) if rule.decision < d => {}
                Some(d) if rule.decision == d => deciding.push(idx),
                _ => {
                    decision = Some(rule.decision);
                    deciding.clear();
                    deciding.push(idx);
                }
            }
        }
        Evaluation { decision: decision.unwrap_or(self.default), deciding, audit, errors }
    }

    /// Every rule's verdict, without the index, and the decision those verdicts give.
    pub fn explain(&self, job: &Job) -> Explanation {
        self.explain_with(&mut Ctx::new(job, self))
    }

    /// [`Policy::explain`] under a deadline, as [`Policy::evaluate_within`]: `None` when
    /// `time_left` answered `false` before every rule was explained.
    pub fn explain_within(&self, job: &Job, time_left: &mut dyn FnMut() -> bool) -> Option<Explanation> {
        let mut ctx = Ctx::within(job, self, time_left);
        let explanation = self.explain_with(&mut ctx);
        (!ctx.out_of_time).then_some(explanation)
    }

    fn explain_with(&self, ctx: &mut Ctx<'_>) -> Explanation {
        let mut matched = Vec::new();
        let mut errors = Vec::new();
        let mut verdicts = Vec::with_capacity(self.rules.len());
        for (idx, rule) in (0..).zip(&self.rules) {
            let verdict = match eval::why_not(&rule.when, ctx) {
                Ok(None) => {
                    matched.push(idx);
                    Verdict::Matched
                }
                Ok(Some(reason)) => Verdict::NotMatched(reason),
                Err(e) => {
                    errors.push((idx, e));
                    if rule.decision > Decision::Allow {
                        matched.push(idx);
                    }
                    Verdict::Error(e.to_string())
                }
            };
            verdicts.push(verdict);
        }
        Explanation { evaluation: self.conclude(matched, errors), verdicts }
    }

    /// The reason to show for an evaluation: the deciding rule's, or a generated one.
    pub fn reason(&self, evaluation: &Evaluation) -> String {
        match evaluation.deciding.first().and_then(|idx| self.rule(*idx)) {
            Some(rule) => rule.reason.clone().unwrap_or_else(|| format!("rule `{}` matched", rule.id)),
            None => self
                .default_reason
                .clone()
                .unwrap_or_else(|| format!("no rule matched; default decision is `{}`", self.default)),
        }
    }

    /// Rules that may match every job `idx` matches, judged by topic: the only ones worth
    /// testing for shadowing.
    pub(crate) fn shadow_candidates(&self, idx: RuleIdx) -> Vec<RuleIdx> {
        let mut out = Vec::new();
        let Some(rule) = self.rule(idx) else {
            return out;
        };
        let topics = exact_names(&rule.when, &Field::Topic);
        if let Some(topic) = topics.as_ref().and_then(|t| t.first())
            && let Some(envs) = self.index.by_topic.get(*topic)
        {
            envs.all(&mut out);
        }
        let own_glob = single_glob(&rule.when, &Field::Topic);
        for (glob, envs) in &self.index.by_topic_glob {
            let covers = match (&topics, own_glob) {
                (Some(topics), _) => topics.iter().all(|t| glob.matches(t)),
                (None, Some(own)) => own == glob,
                (None, None) => false,
            };
            if covers {
                envs.all(&mut out);
            }
        }
        self.index.any_topic.all(&mut out);
        out.retain(|i| *i != idx);
        out
    }

    /// Ids of the given rules.
    pub fn ids(&self, rules: &[RuleIdx]) -> Vec<&str> {
        rules.iter().filter_map(|idx| self.rule(*idx)).map(|r| r.id.as_str()).collect()
    }
}

/// Rules bucketed by the exact topics and envs they require, so that a decision only looks at
/// rules that can match: cost grows with the rules that share the job's topic and env, not
/// with the size of the policy.
#[derive(Debug, Default)]
struct Index {
    by_topic: FxHashMap<Box<str>, EnvIndex>,
    /// Rules whose topic test is a single glob, grouped by that glob.
    by_topic_glob: Vec<(Glob, EnvIndex)>,
    /// Rules with no topic test, or one the index cannot key on.
    any_topic: EnvIndex,
}

#[derive(Debug, Default)]
struct EnvIndex {
    by_env: FxHashMap<Box<str>, Vec<RuleIdx>>,
    any_env: Vec<RuleIdx>,
}

impl EnvIndex {
    fn insert(&mut self, envs: Option<Vec<&str>>, idx: RuleIdx) {
        match envs {
            Some(mut envs) => {
                envs.sort_unstable();
                envs.dedup();
                for env in envs {
                    self.by_env.entry(env.into()).or_default().push(idx);
                }
            }
            None => self.any_env.push(idx),
        }
    }

    fn all(&self, out: &mut Vec<RuleIdx>) {
        out.extend(self.by_env.values().flatten());
        out.extend(&self.any_env);
    }

    fn candidates(&self, env: &str, f: &mut impl FnMut(RuleIdx)) {
        if let Some(rules) = self.by_env.get(env) {
            rules.iter().copied().for_each(&mut *f);
        }
        self.any_env.iter().copied().for_each(f);
    }
}

impl Index {
    fn build(rules: &[Rule]) -> Self {
        let mut index = Self::default();
        for (idx, rule) in (0..).zip(rules) {
            let envs = exact_names(&rule.when, &Field::Env);
            if let Some(mut topics) = exact_names(&rule.when, &Field::Topic) {
                topics.sort_unstable();
                topics.dedup();
                for topic in topics {
                    index.by_topic.entry(topic.into()).or_default().insert(envs.clone(), idx);
                }
            } else if let Some(glob) = single_glob(&rule.when, &Field::Topic) {
                match index.by_topic_glob.iter_mut().find(|(g, _)| g == glob) {
                    Some((_, envs_index)) => envs_index.insert(envs, idx),
                    None => {
                        let mut envs_index = EnvIndex::default();
                        envs_index.insert(envs, idx);
                        index.by_topic_glob.push((glob.clone(), envs_index));
                    }
                }
            } else {
                index.any_topic.insert(envs, idx);
            }
        }
        index
    }

    /// Calls `f` once for every rule that may match `job`, in no particular order.
    fn candidates(&self, job: &Job, mut f: impl FnMut(RuleIdx)) {
        if let Some(envs) = self.by_topic.get(job.topic.as_str()) {
            envs.candidates(&job.env, &mut f);
        }
        for (glob, envs) in &self.by_topic_glob {
            if glob.matches(&job.topic) {
                envs.candidates(&job.env, &mut f);
            }
        }
        self.any_topic.candidates(&job.env, &mut f);
    }
}

/// The literal names a top-level condition requires of `field`, when it requires one of a
/// fixed set (`topic: a` or `topic: [a, b]`).
fn exact_names<'a>(when: &'a [Cond], field: &Field) -> Option<Vec<&'a str>> {
    when.iter().find_map(|cond| match cond {
        Cond::Field { field: f, tests, .. } if f == field => match tests.as_slice() {
            [Test::Globs(globs)] if globs.iter().all(Glob::is_literal) => {
                Some(globs.iter().map(Glob::as_str).collect())
            }
            _ => None,
        },
        _ => None,
    })
}

fn single_glob<'a>(when: &'a [Cond], field: &Field) -> Option<&'a Glob> {
    when.iter().find_map(|cond| match cond {
        Cond::Field { field: f, tests, .. } if f == field => match tests.as_slice() {
            [Test::Globs(globs)] => match globs.as_slice() {
                [glob] => Some(glob),
                _ => None,
            },
            _ => None,
        },
        _ => None,
    })
}
