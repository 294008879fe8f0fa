//! The benchmark jobs: a fixed, seeded mix of jobs that match no rule, one rule and several
//! rules of a [`RuleSet`], as the raw JSON every engine starts from, each with the outcome the
//! generator's own reading of the rules expects.

use std::collections::HashMap;
use std::fmt;

use serde_json::{Map, Value, json};

use crate::rng::Rng;
use crate::ruleset::{Rule, RuleSet, Scalar, VOCABULARY};
use crate::{Outcome, conclude};

/// Jobs per rule set.
pub const JOBS: usize = 64;

/// How many jobs should match no rule, one rule, and two or more.
const MIX: [usize; 3] = [16, 32, 16];

/// Candidates drawn before the mix gives up on a kind the rule set cannot produce (the seed's
/// rules never match together) and takes whatever comes.
const CANDIDATES_MAX: usize = 100_000;

const SEED: u64 = 0x0b5e_55ed_0000_0064;
const TENANTS: [&str; 4] = ["acme", "globex", "initech", "umbrella"];
const TEAMS: [&str; 3] = ["payments", "search", "platform"];
const TAGS: [&str; 3] = ["nightly", "batch", "canary"];

/// One benchmark job.
pub struct BenchJob {
    /// The job document, as a client would send it.
    pub raw: Vec<u8>,
    /// How many rules match it.
    pub matched: usize,
    /// The decision and deciding rules SPEC 3.3 gives, by the generator's reading.
    pub expected: Outcome,
}

/// What the jobs of a set look like, for the benchmark's log.
pub struct Mix {
    counts: [usize; 3],
    matched_max: usize,
}

impl fmt::Display for Mix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [none, one, several] = self.counts;
        write!(
            f,
            "{none} jobs match no rule, {one} match one, {several} match several (at most {})",
            self.matched_max
        )
    }
}

/// Summarizes a set of jobs.
pub fn mix(jobs: &[BenchJob]) -> Mix {
    let mut counts = [0; 3];
    for job in jobs {
        counts[job.matched.min(2)] += 1;
    }
    Mix { counts, matched_max: jobs.iter().map(|j| j.matched).max().unwrap_or(0) }
}

/// The fields rules test.
struct Fields {
    topic: String,
    env: &'static str,
    payload: Vec<(&'static str, Scalar)>,
}

/// [`JOBS`] jobs for `set`, always the same ones for the same set.
pub fn for_rules(set: &RuleSet) -> Vec<BenchJob> {
    let mut rng = Rng::new(SEED);
    let mut siblings: HashMap<(&str, &str), Vec<&Rule>> = HashMap::new();
    for rule in &set.rules {
        siblings.entry((rule.topic.as_str(), rule.env)).or_default().push(rule);
    }
    let mut jobs = Vec::with_capacity(JOBS);
    let mut wanted = MIX;
    for attempt in 0.. {
        if jobs.len() == JOBS {
            break;
        }
        let fields = candidate(set, &siblings, &mut rng);
        let matching: Vec<u32> = (0..)
            .zip(&set.rules)
            .filter(|(_, r)| r.matches(&fields.topic, fields.env, &fields.payload))
            .map(|(idx, _)| idx)
            .collect();
        let kind = matching.len().min(2);
        if wanted[kind] == 0 && attempt < CANDIDATES_MAX {
            continue;
        }
        wanted[kind] = wanted[kind].saturating_sub(1);
        let expected = conclude(matching.iter().map(|&idx| (idx, set.rules[idx as usize].decision)), 0);
        let raw = document(&fields, jobs.len(), &mut rng);
        jobs.push(BenchJob { raw, matched: matching.len(), expected });
    }
    jobs
}

/// A job built around a random rule: its own conditions, those of other rules on the same
/// topic and env, or one of them broken so that it misses.
fn candidate(set: &RuleSet, siblings: &HashMap<(&str, &str), Vec<&Rule>>, rng: &mut Rng) -> Fields {
    let base = rng.pick(&set.rules);
    let mut fields = Fields { topic: base.topic.clone(), env: base.env, payload: base.payload.clone() };
    match rng.below(4) {
        0 => match rng.below(3) {
            0 => {
                let stem = base.topic.rsplit_once('.').map_or(base.topic.as_str(), |(stem, _)| stem);
                fields.topic = format!("{stem}.read");
            }
            1 => fields.env = if base.env == "production" { "staging" } else { "production" },
            _ => {
                if let Some((name, value)) = fields.payload.first_mut() {
                    let values = VOCABULARY.iter().find(|(n, _)| n == name).map_or(&[][..], |(_, v)| *v);
                    if let Some(other) = values.iter().find(|v| *v != value) {
                        *value = *other;
                    }
                }
            }
        },
        1 => {
            let group = siblings.get(&(base.topic.as_str(), base.env)).map_or(&[][..], Vec::as_slice);
            for _ in 0..3 {
                let other = rng.pick(group);
                let compatible = other
                    .payload
                    .iter()
                    .all(|(name, value)| fields.payload.iter().all(|(n, v)| n != name || v == value));
                if compatible {
                    for field in &other.payload {
                        if !fields.payload.contains(field) {
                            fields.payload.push(*field);
                        }
                    }
                }
            }
        }
        _ => {}
    }
    for (name, values) in VOCABULARY {
        if rng.below(3) == 0 && fields.payload.iter().all(|(n, _)| *n != name) {
            fields.payload.push((name, *rng.pick(values)));
        }
    }
    fields
}

/// The JSON document: the tested fields plus what real jobs carry besides.
fn document(fields: &Fields, n: usize, rng: &mut Rng) -> Vec<u8> {
    let mut payload: Map<String, Value> =
        fields.payload.iter().map(|(name, value)| ((*name).to_owned(), value.json())).collect();
    payload.insert("request_id".into(), json!(format!("req-{n:06}")));
    payload.insert("size_gb".into(), json!(rng.below(500)));
    payload.insert("tags".into(), json!(&TAGS[..1 + rng.below(TAGS.len())]));
    let job = json!({
        "tenant": rng.pick(&TENANTS),
        "principal": format!("agent-{}@acme.io", rng.below(20)),
        "topic": fields.topic,
        "env": fields.env,
        "labels": {"team": rng.pick(&TEAMS), "ticket": format!("OPS-{}", 1000 + n)},
        "payload": payload,
    });
    serde_json::to_vec(&job).unwrap_or_else(|e| panic!("a job document always serializes: {e}"))
}
