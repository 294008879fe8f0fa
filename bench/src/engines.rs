//! The three engines behind one [`Outcome`]: Airlock, Cedar and Rego (regorus), each loaded
//! from its rendering of a [`RuleSet`] and each deciding either from a job it has already
//! parsed or from raw JSON bytes; and [`check_agreement`], which must pass before any timing.

use std::collections::HashMap;
use std::num::NonZeroUsize;

use airlock_policy::{Decision, Job, Policy};
use cedar_policy::{Authorizer, Context, Entities, EntityUid, PolicyId, PolicySet, Request};
use regorus::utils::limits::PolicyLengthConfig;

use crate::jobs::BenchJob;
use crate::ruleset::RuleSet;
use crate::{Outcome, conclude};

/// Airlock's compiled policy.
pub struct Airlock {
    policy: Policy,
}

impl Airlock {
    /// Compiles the set's YAML.
    pub fn new(set: &RuleSet) -> Self {
        match airlock_policy::compile(&set.yaml) {
            Ok((policy, _warnings)) => Self { policy },
            Err(errors) => panic!("airlock refuses policy `{}`: {}", set.name, list(&errors)),
        }
    }

    /// Parses and validates a job document.
    pub fn parse(raw: &[u8]) -> Job {
        Job::from_slice(raw).unwrap_or_else(|errors| panic!("airlock refuses a job: {}", list(&errors)))
    }

    /// The decision for a parsed job.
    pub fn decide(&self, job: &Job) -> Outcome {
        let evaluation = self.policy.evaluate(job);
        Outcome {
            decision: evaluation.decision,
            deciding: evaluation.deciding,
            errors: evaluation.errors.len(),
        }
    }

    /// The decision for a job document.
    pub fn decide_raw(&self, raw: &[u8]) -> Outcome {
        self.decide(&Self::parse(raw))
    }

    /// Ids of rules, as Airlock read them from the YAML.
    pub fn ids(&self, rules: &[u32]) -> Vec<&str> {
        self.policy.ids(rules)
    }
}

/// Cedar's policy set, one `permit` per rule, and a fixed principal, action and resource: the
/// job travels as the request context.
pub struct Cedar {
    policies: PolicySet,
    entities: Entities,
    authorizer: Authorizer,
    principal: EntityUid,
    action: EntityUid,
    resource: EntityUid,
    /// Position and decision of each policy, from its `@id` and `@decision` annotations.
    rules: HashMap<PolicyId, (u32, Decision)>,
}

impl Cedar {
    /// Parses the set's Cedar rendering.
    pub fn new(set: &RuleSet) -> Self {
        let policies: PolicySet =
            set.cedar.parse().unwrap_or_else(|e| panic!("cedar refuses policy `{}`: {e}", set.name));
        let positions: HashMap<&str, u32> =
            (0..).zip(&set.rules).map(|(idx, r)| (r.id.as_str(), idx)).collect();
        let rules: HashMap<PolicyId, (u32, Decision)> = policies
            .policies()
            .map(|policy| {
                let annotation = |key: &str| {
                    policy
                        .annotation(key)
                        .unwrap_or_else(|| panic!("cedar policy `{}` has no `@{key}`", policy.id()))
                };
                let idx = positions.get(annotation("id")).copied();
                let decision = Decision::parse(annotation("decision"));
                match (idx, decision) {
                    (Some(idx), Some(decision)) => (policy.id().clone(), (idx, decision)),
                    _ => panic!("cedar policy `{}` names an unknown rule or decision", policy.id()),
                }
            })
            .collect();
        assert_eq!(rules.len(), set.rules.len(), "one cedar policy per rule of `{}`", set.name);
        let uid = |text: &str| -> EntityUid {
            text.parse().unwrap_or_else(|e| panic!("`{text}` is a valid cedar entity: {e}"))
        };
        Self {
            policies,
            entities: Entities::empty(),
            authorizer: Authorizer::new(),
            principal: uid(r#"Agent::"agent""#),
            action: uid(r#"Action::"submit""#),
            resource: uid(r#"Job::"job""#),
            rules,
        }
    }

    /// The request for a job document, its context built from the JSON.
    pub fn request(&self, raw: &[u8]) -> Request {
        let text = std::str::from_utf8(raw).unwrap_or_else(|e| panic!("a job document is UTF-8: {e}"));
        let context =
            Context::from_json_str(text, None).unwrap_or_else(|e| panic!("cedar refuses a job context: {e}"));
        Request::new(self.principal.clone(), self.action.clone(), self.resource.clone(), context, None)
            .unwrap_or_else(|e| panic!("cedar refuses a request: {e}"))
    }

    /// The decision for a prepared request.
    pub fn decide(&self, request: &Request) -> Outcome {
        let response = self.authorizer.is_authorized(request, &self.policies, &self.entities);
        let diagnostics = response.diagnostics();
        conclude(diagnostics.reason().map(|id| self.rules[id]), diagnostics.errors().count())
    }

    /// The decision for a job document.
    pub fn decide_raw(&self, raw: &[u8]) -> Outcome {
        self.decide(&self.request(raw))
    }
}

/// The rule that holds the ids of the matching rules.
const REGO_MATCHED: &str = "data.airlock.matched";

/// A regorus engine loaded with the set's Rego rendering.
pub struct Rego {
    engine: regorus::Engine,
    /// Position and decision of each rule, by id.
    rules: HashMap<String, (u32, Decision)>,
}

impl Rego {
    /// Loads the set's Rego rendering.
    pub fn new(set: &RuleSet) -> Self {
        let mut engine = regorus::Engine::new();
        // regorus caps one policy file at 1 MiB and 20,000 lines by default, and 10,000 rules
        // take more: lift the caps so that the same policy loads in every engine.
        engine.set_policy_length_config(PolicyLengthConfig {
            max_file_bytes: NonZeroUsize::MAX,
            max_lines: NonZeroUsize::MAX,
            ..PolicyLengthConfig::default()
        });
        engine
            .add_policy(format!("{}.rego", set.name), set.rego.clone())
            .unwrap_or_else(|e| panic!("regorus refuses policy `{}`: {e}", set.name));
        let rules = (0..).zip(&set.rules).map(|(idx, r)| (r.id.clone(), (idx, r.decision))).collect();
        Self { engine, rules }
    }

    /// The input value for a job document.
    pub fn input(raw: &[u8]) -> regorus::Value {
        let text = std::str::from_utf8(raw).unwrap_or_else(|e| panic!("a job document is UTF-8: {e}"));
        regorus::Value::from_json_str(text).unwrap_or_else(|e| panic!("regorus refuses a job: {e}"))
    }

    /// The decision for a parsed input (values are reference-counted: the clone is cheap).
    pub fn decide(&mut self, input: &regorus::Value) -> Outcome {
        self.decide_owned(input.clone())
    }

    /// The decision for a job document.
    pub fn decide_raw(&mut self, raw: &[u8]) -> Outcome {
        self.decide_owned(Self::input(raw))
    }

    fn decide_owned(&mut self, input: regorus::Value) -> Outcome {
        self.engine.set_input(input);
        let matched = self
            .engine
            .eval_rule(REGO_MATCHED.to_owned())
            .unwrap_or_else(|e| panic!("regorus fails on `{REGO_MATCHED}`: {e}"));
        match &matched {
            regorus::Value::Set(ids) => conclude(
                ids.iter().map(|id| match id {
                    regorus::Value::String(id) => self.rules[id.as_ref()],
                    other => panic!("`{REGO_MATCHED}` holds a non-string: {other}"),
                }),
                0,
            ),
            regorus::Value::Undefined => conclude([], 0),
            other => panic!("`{REGO_MATCHED}` is not a set: {other}"),
        }
    }
}

/// Panics, naming the set, the job and what differs, unless Airlock, Cedar and Rego, each from
/// a parsed job and from raw JSON, give the decision and deciding rule ids the generator
/// expects for every job, with no rule erroring.
pub fn check_agreement(set: &RuleSet, jobs: &[BenchJob], airlock: &Airlock, cedar: &Cedar, rego: &mut Rego) {
    for (n, job) in jobs.iter().enumerate() {
        let expected_ids: Vec<&str> = job.expected.deciding.iter().map(|&idx| set.id(idx)).collect();
        let decided = [
            ("airlock (parsed job)", airlock.decide(&Airlock::parse(&job.raw))),
            ("airlock (raw JSON)", airlock.decide_raw(&job.raw)),
            ("cedar (parsed job)", cedar.decide(&cedar.request(&job.raw))),
            ("cedar (raw JSON)", cedar.decide_raw(&job.raw)),
            ("rego (parsed job)", rego.decide(&Rego::input(&job.raw))),
            ("rego (raw JSON)", rego.decide_raw(&job.raw)),
        ];
        for (engine, outcome) in decided {
            let ids: Vec<&str> = if engine.starts_with("airlock") {
                airlock.ids(&outcome.deciding)
            } else {
                outcome.deciding.iter().map(|&idx| set.id(idx)).collect()
            };
            assert!(
                outcome.decision == job.expected.decision && ids == expected_ids && outcome.errors == 0,
                "engines disagree on policy `{}`, job {n} {}:\n  {engine} decides `{}` by {ids:?} with {} rule error(s)\n  expected `{}` by {expected_ids:?}",
                set.name,
                String::from_utf8_lossy(&job.raw),
                outcome.decision,
                outcome.errors,
                job.expected.decision,
            );
        }
    }
}

fn list(items: &[impl std::fmt::Display]) -> String {
    items.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
}
