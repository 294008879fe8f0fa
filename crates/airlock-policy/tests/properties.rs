//! Property tests of the policy engine (STYLE "Tests"): evaluation is total and deterministic,
//! adding a deny never relaxes a decision, reformatting never changes the hash while a
//! semantic edit always does, SPEC 3.3 precedence holds, and the rule index never changes a
//! result. Policies are generated as a small AST and rendered to YAML in many styles; jobs
//! are generated as JSON. Each property is a `check_*` function, also called on fixed inputs
//! by the named tests at the end of the file.

#![allow(clippy::expect_used, clippy::indexing_slicing, clippy::panic, reason = "a test fails by panicking")]

use airlock_policy::limits::PATH_FANOUT_MAX;
use airlock_policy::{Decision, Evaluation, Job, Mode, Policy, Verdict, compile};
use proptest::prelude::*;
use proptest::test_runner::Config;
use serde_json::{Value, json};

// ---------------------------------------------------------------------------------------------
// Vocabulary: small on purpose, so that generated rules and jobs often meet.

const TOPICS: [&str; 7] = [
    "infra.vm.delete",
    "infra.vm.stop",
    "infra.vm.read",
    "infra.db.delete",
    "infra.sg.update",
    "infra.cluster.recreate",
    "app.deploy",
];
const TOPIC_GLOBS: [&str; 7] =
    ["infra.*", "infra.**", "infra.vm.*", "**.delete", "infra.*.read", "*.deploy", "infra.**.delete"];
const ENVS: [&str; 3] = ["production", "staging", "dev"];
const ENV_GLOBS: [&str; 3] = ["prod*", "*", "st*"];
const TENANTS: [&str; 3] = ["acme", "globex", "initech"];
const PRINCIPALS: [&str; 3] = ["alice@example.com", "bot-7", "ci:deployer"];
const LABEL_NAMES: [&str; 3] = ["team", "tier", "ticket"];
const LABEL_VALUES: [&str; 4] = ["core", "web", "1", "CHG-42"];
const WORDS: [&str; 5] = ["pci", "web", "prod-db", "eu-west", "x"];
const ADDRESSES: [&str; 6] =
    ["10.1.2.3", "10.0.0.0/16", "0.0.0.0/0", "192.168.1.0/24", "2001:db8::1", "::/0"];
const NETWORKS: [&str; 6] =
    ["10.0.0.0/8", "0.0.0.0/0", "192.168.0.0/16", "2001:db8::/32", "::/0", "10.1.2.3"];
const REGEXES: [&str; 4] = ["^infra\\.", "delete$", "^bot-[0-9]+$", "(?i)PROD"];
const RISK_CLASSES: [&str; 2] = ["high", "low"];

fn config(cases: u32) -> Config {
    // No regression files: this crate's directory is not the place for them, and a failure
    // prints its shrunk input. PROPTEST_RNG_SEED replays a run.
    Config { cases, failure_persistence: None, max_shrink_iters: 2_000, ..Config::default() }
}

// ---------------------------------------------------------------------------------------------
// A YAML value tree, and the policy AST that renders to it.

#[derive(Clone, Debug, PartialEq)]
enum Y {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Seq(Vec<Y>),
    /// Entries, and whether their order carries meaning (only `risk`: the first class wins).
    Map(Vec<(String, Y)>, bool),
}

fn s(text: &str) -> Y {
    Y::Str(text.to_owned())
}

fn map(entries: Vec<(&str, Y)>) -> Y {
    Y::Map(entries.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(), false)
}

#[derive(Clone, Debug)]
struct PolicyAst {
    default: Option<Decision>,
    risk: Vec<(String, Vec<String>)>,
    rules: Vec<RuleAst>,
}

#[derive(Clone, Debug)]
struct RuleAst {
    id: String,
    when: When,
    decision: Decision,
    /// `None` leaves `mode` out (enforce).
    mode: Option<Mode>,
    reason: Option<String>,
    /// Rendered only on a throttle rule.
    limit: Option<Y>,
    /// Rendered only on a require_human rule.
    approvals: Option<i64>,
}

/// A `when` map. Keys are unique by construction: one entry per reserved key at most.
#[derive(Clone, Debug, Default)]
struct When {
    names: Vec<(&'static str, Y)>,
    labels: Vec<(String, Y)>,
    payload: Vec<(String, Y)>,
    shorthand: Vec<(String, Y)>,
    all: Option<Vec<When>>,
    any: Option<Vec<When>>,
    not: Option<Box<When>>,
}

impl When {
    fn to_yaml(&self) -> Y {
        let mut entries: Vec<(String, Y)> =
            self.names.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect();
        if !self.labels.is_empty() {
            entries.push(("labels".into(), Y::Map(self.labels.clone(), false)));
        }
        if !self.payload.is_empty() {
            entries.push(("payload".into(), Y::Map(self.payload.clone(), false)));
        }
        entries.extend(self.shorthand.iter().cloned());
        if let Some(all) = &self.all {
            entries.push(("all".into(), Y::Seq(all.iter().map(When::to_yaml).collect())));
        }
        if let Some(any) = &self.any {
            entries.push(("any".into(), Y::Seq(any.iter().map(When::to_yaml).collect())));
        }
        if let Some(not) = &self.not {
            entries.push(("not".into(), not.to_yaml()));
        }
        Y::Map(entries, false)
    }
}

impl RuleAst {
    fn to_yaml(&self) -> Y {
        let mut entries =
            vec![("id", s(&self.id)), ("when", self.when.to_yaml()), ("decision", s(self.decision.as_str()))];
        if let Some(mode) = self.mode {
            entries.push(("mode", s(mode.as_str())));
        }
        if let Some(reason) = &self.reason {
            entries.push(("reason", s(reason)));
        }
        if let (Some(limit), Decision::Throttle) = (&self.limit, self.decision) {
            entries.push(("limit", limit.clone()));
        }
        if let (Some(n), Decision::RequireHuman) = (self.approvals, self.decision) {
            entries.push(("approvals", Y::Int(n)));
        }
        map(entries)
    }
}

impl PolicyAst {
    fn to_yaml(&self) -> Y {
        let mut entries = vec![("version", s("v1"))];
        if let Some(default) = self.default {
            entries.push(("defaults", map(vec![("decision", s(default.as_str()))])));
        }
        if !self.risk.is_empty() {
            let classes = self
                .risk
                .iter()
                .map(|(name, topics)| (name.clone(), Y::Seq(topics.iter().map(|t| s(t)).collect())))
                .collect();
            entries.push(("risk", Y::Map(classes, true)));
        }
        entries.push(("rules", Y::Seq(self.rules.iter().map(RuleAst::to_yaml).collect())));
        map(entries)
    }

    fn default_decision(&self) -> Decision {
        self.default.unwrap_or(Decision::Allow)
    }

    /// The same policy with only rule `idx`: what that rule does on its own.
    fn alone(&self, idx: usize) -> PolicyAst {
        PolicyAst { default: self.default, risk: self.risk.clone(), rules: vec![self.rules[idx].clone()] }
    }

    fn text(&self) -> String {
        render(&self.to_yaml(), &Style::CANONICAL)
    }
}

// ---------------------------------------------------------------------------------------------
// Rendering: one tree, many equivalent texts.

#[derive(Clone, Copy, Debug)]
enum Flow {
    Never,
    Sometimes,
    Always,
}

#[derive(Clone, Copy, Debug)]
struct Style {
    /// Drives every per-node choice below, so that a style is reproducible.
    seed: u64,
    flow: Flow,
    /// Quote strings even where a plain scalar would do.
    quote_all: bool,
    /// Pick a random quoting for each string (plain where safe, single or double quotes).
    quote_random: bool,
    comments: bool,
    blank_lines: bool,
    /// Shuffle the keys of every map whose order carries no meaning.
    shuffle: bool,
    /// `~` for null, `True` for true, hex or `+` integers, exponent floats.
    alt_scalars: bool,
}

impl Style {
    const CANONICAL: Style = Style {
        seed: 0,
        flow: Flow::Never,
        quote_all: false,
        quote_random: false,
        comments: false,
        blank_lines: false,
        shuffle: false,
        alt_scalars: false,
    };
}

fn render(tree: &Y, style: &Style) -> String {
    let mut renderer = Renderer { style: *style, rng: style.seed ^ 0x9e37_79b9_7f4a_7c15 };
    let mut lines = Vec::new();
    if renderer.comments {
        lines.push("# generated policy".to_owned());
    }
    match tree {
        Y::Map(entries, ordered) if !renderer.inline(tree) => {
            renderer.map_lines(entries, *ordered, 0, false, &mut lines);
        }
        other => lines.push(renderer.flow(other)),
    }
    lines.push(String::new());
    lines.join("\n")
}

struct Renderer {
    style: Style,
    rng: u64,
}

impl std::ops::Deref for Renderer {
    type Target = Style;
    fn deref(&self) -> &Style {
        &self.style
    }
}

impl Renderer {
    /// splitmix64: enough randomness for layout choices, and reproducible from the seed.
    fn next(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn coin(&mut self) -> bool {
        self.next() & 1 == 1
    }

    fn inline(&mut self, value: &Y) -> bool {
        match value {
            Y::Seq(items) if !items.is_empty() => self.flow_choice(),
            Y::Map(entries, _) if !entries.is_empty() => self.flow_choice(),
            _ => true,
        }
    }

    fn flow_choice(&mut self) -> bool {
        match self.flow {
            Flow::Never => false,
            Flow::Always => true,
            Flow::Sometimes => self.coin(),
        }
    }

    fn order<'a>(&mut self, entries: &'a [(String, Y)], ordered: bool) -> Vec<&'a (String, Y)> {
        let mut out: Vec<&(String, Y)> = entries.iter().collect();
        if self.shuffle && !ordered {
            for i in (1..out.len()).rev() {
                let j = (self.next() % (i as u64 + 1)) as usize;
                out.swap(i, j);
            }
        }
        out
    }

    fn map_lines(
        &mut self,
        entries: &[(String, Y)],
        ordered: bool,
        indent: usize,
        in_seq: bool,
        lines: &mut Vec<String>,
    ) {
        for (i, (key, value)) in self.order(entries, ordered).into_iter().enumerate() {
            let opens_item = in_seq && i == 0;
            if !opens_item {
                if self.blank_lines && self.coin() {
                    lines.push(String::new());
                }
                if self.comments && self.coin() {
                    lines.push(format!("{}# about `{key}`", " ".repeat(indent)));
                }
            }
            let prefix =
                if opens_item { format!("{}- ", " ".repeat(indent - 2)) } else { " ".repeat(indent) };
            let key = self.string(key);
            let trailing = if self.comments && self.coin() { "   # note" } else { "" };
            if self.inline(value) {
                let text = self.flow(value);
                lines.push(format!("{prefix}{key}: {text}{trailing}"));
            } else {
                lines.push(format!("{prefix}{key}:{trailing}"));
                self.block(value, indent + 2, lines);
            }
        }
    }

    fn block(&mut self, value: &Y, indent: usize, lines: &mut Vec<String>) {
        match value {
            Y::Map(entries, ordered) => self.map_lines(entries, *ordered, indent, false, lines),
            Y::Seq(items) => {
                for item in items {
                    if self.inline(item) {
                        let text = self.flow(item);
                        lines.push(format!("{}- {text}", " ".repeat(indent)));
                    } else if let Y::Map(entries, ordered) = item {
                        self.map_lines(entries, *ordered, indent + 2, true, lines);
                    } else {
                        lines.push(format!("{}-", " ".repeat(indent)));
                        self.block(item, indent + 2, lines);
                    }
                }
            }
            scalar => {
                let text = self.flow(scalar);
                lines.push(format!("{}{text}", " ".repeat(indent)));
            }
        }
    }

    fn flow(&mut self, value: &Y) -> String {
        match value {
            Y::Null => (if self.alt_scalars && self.coin() { "~" } else { "null" }).to_owned(),
            Y::Bool(b) => match (b, self.alt_scalars && self.coin()) {
                (true, false) => "true".into(),
                (true, true) => "True".into(),
                (false, false) => "false".into(),
                (false, true) => "FALSE".into(),
            },
            Y::Int(i) => match (self.alt_scalars, self.next() % 3) {
                (true, 0) if *i >= 0 => format!("0x{i:x}"),
                (true, 1) if *i >= 0 => format!("+{i}"),
                _ => i.to_string(),
            },
            Y::Float(f) => {
                if self.alt_scalars && self.coin() {
                    format!("{f:e}")
                } else {
                    format!("{f:?}")
                }
            }
            Y::Str(text) => self.string(text),
            Y::Seq(items) => {
                let items: Vec<String> = items.iter().map(|i| self.flow(i)).collect();
                format!("[{}]", items.join(", "))
            }
            Y::Map(entries, ordered) => {
                let entries: Vec<String> = self
                    .order(entries, *ordered)
                    .into_iter()
                    .map(|(k, v)| format!("{}: {}", self.string(k), self.flow(v)))
                    .collect();
                format!("{{{}}}", entries.join(", "))
            }
        }
    }

    fn string(&mut self, text: &str) -> String {
        let choice = if self.quote_all {
            1 + self.next() % 2
        } else if self.quote_random {
            self.next() % 3
        } else {
            0
        };
        match choice {
            0 if plain_safe(text) => text.to_owned(),
            2 if !text.chars().any(char::is_control) => format!("'{}'", text.replace('\'', "''")),
            _ => serde_json::to_string(text).expect("a string serializes"),
        }
    }
}

/// Whether `text` reads back as the same string when written as a plain YAML scalar, in block
/// and flow context alike.
fn plain_safe(text: &str) -> bool {
    let reserved = ["null", "Null", "NULL", "true", "True", "TRUE", "false", "False", "FALSE"];
    text.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && text.chars().all(|c| c.is_ascii_alphanumeric() || "_.-/@*".contains(c))
        && !reserved.contains(&text)
}

// ---------------------------------------------------------------------------------------------
// Strategies.

fn pick(options: &'static [&'static str]) -> impl Strategy<Value = Y> + Clone {
    prop::sample::select(options).prop_map(s)
}

fn decision() -> impl Strategy<Value = Decision> + Clone {
    prop::sample::select(Decision::ALL.to_vec())
}

/// 1 to 3 names, duplicates allowed: policy authors repeat themselves.
fn name_list(names: &'static [&'static str]) -> impl Strategy<Value = Y> + Clone {
    prop::collection::vec(pick(names), 1..=3).prop_map(Y::Seq)
}

/// A value test on a name field: a name or glob, a list of them, or an operator map.
fn name_test(names: &'static [&'static str], globs: &'static [&'static str]) -> BoxedStrategy<Y> {
    let any_name = prop_oneof![3 => pick(names), 1 => pick(globs)];
    let op = prop_oneof![
        name_list(globs).prop_map(|v| ("glob", v)),
        name_list(names).prop_map(|v| ("in", v)),
        name_list(names).prop_map(|v| ("not_in", v)),
        pick(&REGEXES).prop_map(|v| ("regex", v)),
        any::<bool>().prop_map(|b| ("exists", Y::Bool(b))),
        pick(&["vm", "prod", "a"]).prop_map(|v| ("contains", v)),
    ];
    prop_oneof![
        4 => pick(names),
        2 => any_name.clone(),
        2 => prop::collection::vec(any_name, 1..=3).prop_map(Y::Seq),
        2 => ops(op),
    ]
    .boxed()
}

/// An operator map of one or two distinct operators.
fn ops(op: impl Strategy<Value = (&'static str, Y)> + Clone) -> impl Strategy<Value = Y> + Clone {
    prop::collection::vec(op, 1..=2).prop_map(|ops| map(dedup_keys(ops)))
}

fn risk_test() -> impl Strategy<Value = Y> + Clone {
    let class = pick(&RISK_CLASSES);
    prop_oneof![
        3 => class.clone(),
        1 => prop::collection::vec(class.clone(), 1..=2).prop_map(Y::Seq),
        1 => any::<bool>().prop_map(|b| map(vec![("exists", Y::Bool(b))])),
        1 => prop::collection::vec(class, 1..=2).prop_map(|v| map(vec![("not_in", Y::Seq(v))])),
    ]
}

fn label_test() -> impl Strategy<Value = Y> + Clone {
    let value = pick(&LABEL_VALUES);
    let op = prop_oneof![
        prop::collection::vec(value.clone(), 1..=2).prop_map(|v| ("in", Y::Seq(v))),
        prop::collection::vec(value.clone(), 1..=2).prop_map(|v| ("not_in", Y::Seq(v))),
        any::<bool>().prop_map(|b| ("exists", Y::Bool(b))),
        pick(&["^CHG-[0-9]+$", "o"]).prop_map(|v| ("regex", v)),
        pick(&["co*", "*"]).prop_map(|v| ("glob", v)),
        pick(&["CHG", "e"]).prop_map(|v| ("contains", v)),
    ];
    prop_oneof![3 => value.clone(), 1 => prop::collection::vec(value, 1..=2).prop_map(Y::Seq), 2 => ops(op)]
}

fn number() -> impl Strategy<Value = Y> + Clone {
    prop_oneof![
        (-2i64..60).prop_map(Y::Int),
        prop::sample::select(vec![0.5, 1.5, 10.0, 42.25, -3.75]).prop_map(Y::Float),
    ]
}

/// A payload path and a test that fits the values the generated jobs put there.
fn payload_test() -> impl Strategy<Value = (String, Y)> + Clone {
    let numeric = {
        let op = prop_oneof![
            number().prop_map(|n| ("gt", n)),
            number().prop_map(|n| ("gte", n)),
            number().prop_map(|n| ("lt", n)),
            number().prop_map(|n| ("lte", n)),
            prop::collection::vec(number(), 1..=3).prop_map(|v| ("in", Y::Seq(v))),
            prop::collection::vec(number(), 1..=2).prop_map(|v| ("not_in", Y::Seq(v))),
            any::<bool>().prop_map(|b| ("exists", Y::Bool(b))),
        ];
        let value = prop_oneof![2 => number(), 3 => ops(op)];
        (pick(&["count", "ratio", "rules[*].port", "rules[0].port"]), value)
    };
    let text = {
        let op = prop_oneof![
            prop::collection::vec(pick(&WORDS), 1..=2).prop_map(|v| ("in", Y::Seq(v))),
            pick(&WORDS).prop_map(|v| ("contains", v)),
            pick(&["^prod", "west$"]).prop_map(|v| ("regex", v)),
            pick(&["prod-*", "*"]).prop_map(|v| ("glob", v)),
            any::<bool>().prop_map(|b| ("exists", Y::Bool(b))),
        ];
        let value = prop_oneof![2 => pick(&WORDS), 1 => Just(Y::Null), 2 => ops(op)];
        (pick(&["owner", "name", "meta.region", "tags[*]", "tags[0]"]), value)
    };
    let list = (Just(s("tags")), pick(&WORDS).prop_map(|w| map(vec![("contains", w)])));
    let boolean = (Just(s("force")), any::<bool>().prop_map(Y::Bool));
    let network = {
        let nets = prop::collection::vec(pick(&NETWORKS), 1..=2).prop_map(Y::Seq);
        let op = prop_oneof![
            nets.clone().prop_map(|v| ("cidr_within", v)),
            nets.prop_map(|v| ("cidr_overlaps", v))
        ];
        let value = prop_oneof![1 => pick(&ADDRESSES), 3 => ops(op)];
        (pick(&["cidr", "rules[*].cidr"]), value)
    };
    prop_oneof![3 => numeric, 2 => text, 1 => list, 1 => boolean, 2 => network].prop_map(|(path, value)| {
        let Y::Str(path) = path else { unreachable!("paths are strings") };
        (path, value)
    })
}

fn dedup_keys<K: PartialEq + Clone>(mut entries: Vec<(K, Y)>) -> Vec<(K, Y)> {
    let mut seen = Vec::new();
    entries.retain(|(k, _)| {
        let fresh = !seen.contains(k);
        seen.push(k.clone());
        fresh
    });
    entries
}

/// Field tests of a `when`, without combinators.
fn flat_when(with_risk: bool) -> impl Strategy<Value = When> + Clone {
    let fields = prop_oneof![
        4 => name_test(&TOPICS, &TOPIC_GLOBS).prop_map(|v| ("topic", v)),
        3 => name_test(&ENVS, &ENV_GLOBS).prop_map(|v| ("env", v)),
        1 => name_test(&TENANTS, &["a*", "*"]).prop_map(|v| ("tenant", v)),
        1 => name_test(&PRINCIPALS, &["bot-*", "*"]).prop_map(|v| ("principal", v)),
    ];
    let name = if with_risk {
        prop_oneof![4 => fields, 1 => risk_test().prop_map(|v| ("risk", v))].boxed()
    } else {
        fields.boxed()
    };
    let label = (prop::sample::select(&LABEL_NAMES[..]).prop_map(str::to_owned), label_test());
    // Shorthand keys are single payload keys; dotted ones are covered by a named test below.
    let shorthand = prop_oneof![
        (Just("count".to_owned()), number()),
        (Just("owner".to_owned()), pick(&WORDS)),
        (Just("force".to_owned()), any::<bool>().prop_map(Y::Bool)),
        (Just("cidr".to_owned()), pick(&ADDRESSES)),
    ];
    (
        prop::collection::vec(name, 0..=2),
        prop::option::weighted(0.15, label),
        prop::collection::vec(payload_test(), 0..=1),
        prop::option::weighted(0.1, shorthand),
    )
        .prop_map(|(names, label, payload, shorthand)| When {
            names: dedup_keys(names),
            labels: label.into_iter().collect(),
            payload,
            shorthand: shorthand.into_iter().collect(),
            ..When::default()
        })
}

/// A `when`, with `all`, `any` and `not` nested up to two levels.
fn when(with_risk: bool) -> BoxedStrategy<When> {
    flat_when(with_risk)
        .prop_recursive(2, 12, 3, move |inner| {
            (
                flat_when(with_risk),
                prop::option::weighted(0.1, prop::collection::vec(inner.clone(), 1..=2)),
                prop::option::weighted(0.2, prop::collection::vec(inner.clone(), 0..=3)),
                prop::option::weighted(0.15, inner),
            )
                .prop_map(|(mut when, all, any, not)| {
                    when.all = all;
                    when.any = any;
                    when.not = not.map(Box::new);
                    when
                })
        })
        .boxed()
}

fn limit() -> impl Strategy<Value = Option<Y>> + Clone {
    let per = prop_oneof![pick(&["10m", "1h", "30s", "1d"]), (1i64..3600).prop_map(Y::Int)];
    let key = prop::collection::vec(pick(&["tenant", "topic", "env", "principal"]), 1..=3).prop_map(Y::Seq);
    prop::option::of(
        (1i64..10, prop::option::of(per), prop::option::of(1i64..20), prop::option::of(key)).prop_map(
            |(rate, per, burst, key)| {
                let mut entries = vec![("rate", Y::Int(rate))];
                entries.extend(per.map(|p| ("per", p)));
                entries.extend(burst.map(|b| ("burst", Y::Int(b))));
                entries.extend(key.map(|k| ("key", k)));
                map(entries)
            },
        ),
    )
}

fn rule(when: BoxedStrategy<When>) -> impl Strategy<Value = RuleAst> {
    let mode = prop_oneof![4 => Just(None), 1 => Just(Some(Mode::Enforce)), 2 => Just(Some(Mode::Audit))];
    let reason = prop::option::weighted(0.3, pick(&["because", "needs review: see #42"]));
    (when, decision(), mode, reason, limit(), prop::option::of(1i64..=3)).prop_map(
        |(when, decision, mode, reason, limit, approvals)| RuleAst {
            id: String::new(),
            when,
            decision,
            mode,
            reason: reason.map(|r| match r {
                Y::Str(text) => text,
                _ => unreachable!("reasons are strings"),
            }),
            limit,
            approvals,
        },
    )
}

fn risk() -> impl Strategy<Value = Vec<(String, Vec<String>)>> {
    let topics =
        || prop::collection::vec(prop::sample::select([&TOPICS[..], &TOPIC_GLOBS[..]].concat()), 0..=3);
    (topics(), topics()).prop_map(|(high, low)| {
        let owned = |v: Vec<&str>| v.into_iter().map(str::to_owned).collect();
        vec![("high".to_owned(), owned(high)), ("low".to_owned(), owned(low))]
    })
}

fn number_rules(mut rules: Vec<RuleAst>) -> Vec<RuleAst> {
    for (i, rule) in rules.iter_mut().enumerate() {
        rule.id = format!("r{i}");
    }
    rules
}

fn policy_with(rules: impl Strategy<Value = Vec<RuleAst>>) -> impl Strategy<Value = PolicyAst> {
    (prop::option::of(decision()), prop::option::weighted(0.7, risk()), rules).prop_map(
        |(default, risk, rules)| PolicyAst {
            default,
            risk: risk.unwrap_or_default(),
            rules: number_rules(rules),
        },
    )
}

/// A policy of up to eight rules of any shape. Risk conditions only appear with risk classes.
fn policy() -> impl Strategy<Value = PolicyAst> {
    any::<bool>().prop_flat_map(|with_risk| {
        let risk = if with_risk { risk().boxed() } else { Just(Vec::new()).boxed() };
        (prop::option::of(decision()), risk, prop::collection::vec(rule(when(with_risk)), 0..=8))
            .prop_map(|(default, risk, rules)| PolicyAst { default, risk, rules: number_rules(rules) })
    })
}

/// Many rules keyed on topic and env only, sharing and not sharing them, exact and glob: the
/// shapes the index buckets differently.
fn indexed_policy() -> impl Strategy<Value = PolicyAst> {
    let topic = prop_oneof![
        3 => pick(&TOPICS),
        2 => name_list(&TOPICS),
        2 => pick(&TOPIC_GLOBS),
        1 => pick(&TOPIC_GLOBS).prop_map(|g| map(vec![("glob", g)])),
        1 => name_list(&TOPIC_GLOBS),
        1 => name_list(&TOPICS).prop_map(|v| map(vec![("in", v)])),
    ];
    let env = prop_oneof![3 => pick(&ENVS), 2 => name_list(&ENVS), 1 => pick(&ENV_GLOBS)];
    let extra = prop::option::weighted(0.3, payload_test());
    let when = (prop::option::weighted(0.85, topic), prop::option::weighted(0.6, env), extra)
        .prop_map(|(topic, env, extra)| When {
            names: topic.map(|t| ("topic", t)).into_iter().chain(env.map(|e| ("env", e))).collect(),
            payload: extra.into_iter().collect(),
            ..When::default()
        })
        .boxed();
    policy_with(prop::collection::vec(rule(when), 10..=40))
}

fn job() -> impl Strategy<Value = Value> {
    let labels = prop::collection::btree_map(
        prop::sample::select(&LABEL_NAMES[..]),
        prop::sample::select(&LABEL_VALUES[..]),
        0..=2,
    );
    let count = prop_oneof![(-2i64..60).prop_map(|n| json!(n)), Just(json!(42.25)), Just(json!("5"))];
    let rules = prop::collection::vec(
        (prop::sample::select(&ADDRESSES[..]), prop_oneof![Just(22), Just(443), Just(8080)])
            .prop_map(|(cidr, port)| json!({"cidr": cidr, "port": port})),
        0..=2,
    );
    let payload = (
        prop::option::weighted(0.7, count),
        prop::option::weighted(0.5, prop::sample::select(vec![0.5, 1.5, 10.0])),
        prop::option::weighted(
            0.6,
            prop_oneof![prop::sample::select(&WORDS[..]).prop_map(|w| json!(w)), Just(Value::Null)],
        ),
        prop::option::weighted(0.6, prop::sample::select(&WORDS[..])),
        prop::option::weighted(0.6, any::<bool>()),
        prop::option::weighted(0.7, prop::sample::select(&ADDRESSES[..])),
        prop::option::weighted(0.7, prop::collection::vec(prop::sample::select(&WORDS[..]), 0..=3)),
        prop::option::weighted(0.7, rules),
        prop::option::weighted(0.5, prop::sample::select(&WORDS[..])),
    )
        .prop_map(|(count, ratio, owner, name, force, cidr, tags, rules, region)| {
            let mut payload = serde_json::Map::new();
            let mut put = |key: &str, value: Option<Value>| {
                if let Some(v) = value {
                    payload.insert(key.to_owned(), v);
                }
            };
            put("count", count);
            put("ratio", ratio.map(|r| json!(r)));
            put("owner", owner);
            put("name", name.map(|n| json!(n)));
            put("force", force.map(|f| json!(f)));
            put("cidr", cidr.map(|c| json!(c)));
            put("tags", tags.map(|t| json!(t)));
            put("rules", rules.map(Value::Array));
            put("meta", region.map(|r| json!({"region": r})));
            Value::Object(payload)
        });
    (
        prop::sample::select(&TOPICS[..]),
        prop::sample::select(&ENVS[..]),
        prop::sample::select(&TENANTS[..]),
        prop::sample::select(&PRINCIPALS[..]),
        labels,
        payload,
    )
        .prop_map(|(topic, env, tenant, principal, labels, payload)| {
            json!({"topic": topic, "env": env, "tenant": tenant, "principal": principal, "labels": labels, "payload": payload})
        })
}

fn style() -> impl Strategy<Value = Style> {
    (
        any::<u64>(),
        prop_oneof![Just(Flow::Never), Just(Flow::Sometimes), Just(Flow::Always)],
        any::<[bool; 6]>(),
    )
        .prop_map(
            |(seed, flow, [quote_all, quote_random, comments, blank_lines, shuffle, alt_scalars])| Style {
                seed,
                flow,
                quote_all,
                quote_random,
                comments,
                blank_lines,
                shuffle,
                alt_scalars,
            },
        )
}

// ---------------------------------------------------------------------------------------------
// Helpers shared by the checks.

fn compiled(text: &str) -> Policy {
    match compile(text) {
        Ok((policy, _warnings)) => policy,
        Err(errors) => {
            let errors: Vec<String> = errors.iter().map(ToString::to_string).collect();
            panic!("generated policy refused:\n{}\n--- policy ---\n{text}", errors.join("\n"))
        }
    }
}

fn job_of(value: &Value) -> Job {
    Job::from_json(value).unwrap_or_else(|e| panic!("generated job refused: {e:?}\n{value}"))
}

/// A decision with rule ids instead of positions, comparable across policies.
fn outcome(policy: &Policy, evaluation: &Evaluation) -> (Decision, Vec<String>, Vec<String>) {
    let ids = |rules: &[u32]| policy.ids(rules).into_iter().map(str::to_owned).collect();
    (evaluation.decision, ids(&evaluation.deciding), ids(&evaluation.audit))
}

/// Whether rule `idx` alone matches `job`; a rule that errors (a value its CIDR or numeric test
/// cannot read) counts as matched when it is more restrictive than `allow`: it fails closed.
fn matches_alone(ast: &PolicyAst, idx: usize, job: &Job) -> bool {
    let policy = compiled(&ast.alone(idx).text());
    match policy.explain(job).verdicts.as_slice() {
        [Verdict::Matched] => true,
        [Verdict::NotMatched(_)] => false,
        [Verdict::Error(_)] => ast.rules[idx].decision > Decision::Allow,
        other => panic!("rule `{}` alone gave {other:?}", ast.rules[idx].id),
    }
}

// ---------------------------------------------------------------------------------------------
// The properties.

/// Evaluation is total and deterministic, and `explain` gives exactly what `evaluate` gives.
fn check_total(text: &str, jobs: &[Value]) {
    let policy = compiled(text);
    let again = compiled(text);
    assert_eq!(policy.hash(), again.hash(), "compiling twice changed the hash");
    for value in jobs {
        let job = job_of(value);
        let first = policy.evaluate(&job);
        assert_eq!(first, policy.evaluate(&job), "evaluating twice differed for {value}");
        let bare = Job { payload: Value::Null, ..job.clone() };
        assert_eq!(
            policy.evaluate_on(&bare, &job.payload),
            first,
            "evaluating with the payload lent differed for {value}"
        );
        assert_eq!(first, again.evaluate(&job), "two compilations decided differently for {value}");
        let explanation = policy.explain(&job);
        assert_eq!(explanation.evaluation, first, "explain disagrees with evaluate for {value}\n{text}");
        assert_eq!(explanation.verdicts.len(), policy.rules().len());
        let _ = policy.reason(&first);
    }
}

/// Adding an enforced rule at `position` never relaxes a decision when it is a deny, nor when
/// its decision is at least the default or a rule already decided; an audit rule changes
/// nothing. A matching deny always gives deny.
fn check_added_rule(ast: &PolicyAst, mut added: RuleAst, position: usize, value: &Value) {
    let job = job_of(value);
    let before_policy = compiled(&ast.text());
    let before = before_policy.evaluate(&job);
    added.id = "added".into();
    let mut bigger = ast.clone();
    bigger.rules.insert(position.min(bigger.rules.len()), added.clone());
    let after_policy = compiled(&bigger.text());
    let after = after_policy.evaluate(&job);
    let context = || format!("job {value}\n--- before ---\n{}--- after ---\n{}", ast.text(), bigger.text());
    if added.mode == Some(Mode::Audit) {
        let (before_decision, before_deciding, _) = outcome(&before_policy, &before);
        let (after_decision, after_deciding, _) = outcome(&after_policy, &after);
        assert_eq!(
            (before_decision, before_deciding),
            (after_decision, after_deciding),
            "an audit rule changed the decision: {}",
            context()
        );
        return;
    }
    if added.decision == Decision::Deny
        || !before.deciding.is_empty()
        || added.decision >= ast.default_decision()
    {
        assert!(
            after.decision >= before.decision,
            "{:?} became {:?}: {}",
            before.decision,
            after.decision,
            context()
        );
    }
    if added.decision == Decision::Deny && matches_alone(&bigger, position.min(ast.rules.len()), &job) {
        assert_eq!(after.decision, Decision::Deny, "a matching deny did not deny: {}", context());
    }
}

/// The same AST in two styles has one hash, and decides every job the same.
fn check_reformat(ast: &PolicyAst, a: &Style, b: &Style, value: &Value) {
    let (text_a, text_b) = (render(&ast.to_yaml(), a), render(&ast.to_yaml(), b));
    let (policy_a, policy_b) = (compiled(&text_a), compiled(&text_b));
    assert_eq!(
        policy_a.hash(),
        policy_b.hash(),
        "reformatting changed the hash\n--- a ---\n{text_a}--- b ---\n{text_b}"
    );
    let job = job_of(value);
    assert_eq!(
        outcome(&policy_a, &policy_a.evaluate(&job)),
        outcome(&policy_b, &policy_b.evaluate(&job)),
        "reformatting changed the decision for {value}\n--- a ---\n{text_a}--- b ---\n{text_b}"
    );
}

/// A semantic edit of a policy.
#[derive(Clone, Copy, Debug)]
enum Edit {
    Decision(usize, Decision),
    Mode(usize),
    Reason(usize),
    Default(Decision),
    AddRule(usize),
    RemoveRule(usize),
    /// A new condition on rule `idx`, then the same condition with another value.
    Value(usize),
}

/// A semantic edit always changes the hash.
fn check_edit(ast: &PolicyAst, edit: Edit, style: &Style) {
    let rendered = |ast: &PolicyAst| render(&ast.to_yaml(), style);
    let mut before = ast.clone();
    let mut after = ast.clone();
    let n = ast.rules.len();
    match edit {
        Edit::Decision(i, d) if n > 0 && ast.rules[i % n].decision != d => after.rules[i % n].decision = d,
        Edit::Mode(i) if n > 0 => {
            let rule = &mut after.rules[i % n];
            rule.mode = match rule.mode {
                Some(Mode::Audit) => None,
                _ => Some(Mode::Audit),
            };
        }
        Edit::Reason(i) if n > 0 => {
            let rule = &mut after.rules[i % n];
            rule.reason = Some(format!("{} (edited)", rule.reason.as_deref().unwrap_or("reason")));
        }
        Edit::Default(d) if ast.default_decision() != d => after.default = Some(d),
        Edit::AddRule(i) => {
            let rule = RuleAst {
                id: "added".into(),
                when: When::default(),
                decision: Decision::Deny,
                mode: None,
                reason: None,
                limit: None,
                approvals: None,
            };
            after.rules.insert(i % (n + 1), rule);
        }
        Edit::RemoveRule(i) if n > 0 => {
            after.rules.remove(i % n);
        }
        Edit::Value(i) if n > 0 => {
            before.rules[i % n].when.shorthand.push(("edit_marker".into(), Y::Int(1)));
            after.rules[i % n].when.shorthand.push(("edit_marker".into(), Y::Int(2)));
        }
        _ => return,
    }
    let (text_before, text_after) = (rendered(&before), rendered(&after));
    assert_ne!(
        compiled(&text_before).hash(),
        compiled(&text_after).hash(),
        "{edit:?} kept the hash\n--- before ---\n{text_before}--- after ---\n{text_after}"
    );
}

/// SPEC 3.3: the decision is the most restrictive enforced rule that matches on its own (ties
/// to file order), or the default; audit rules are reported and never decide.
fn check_precedence(ast: &PolicyAst, value: &Value) {
    let job = job_of(value);
    let policy = compiled(&ast.text());
    let evaluation = policy.evaluate(&job);
    let matching: Vec<&RuleAst> =
        (0..ast.rules.len()).filter(|i| matches_alone(ast, *i, &job)).map(|i| &ast.rules[i]).collect();
    let (audit, enforced): (Vec<&RuleAst>, Vec<&RuleAst>) =
        matching.into_iter().partition(|r| r.mode == Some(Mode::Audit));
    let decision = enforced.iter().map(|r| r.decision).max().unwrap_or(ast.default_decision());
    let deciding: Vec<String> =
        enforced.iter().filter(|r| r.decision == decision).map(|r| r.id.clone()).collect();
    let audit: Vec<String> = audit.iter().map(|r| r.id.clone()).collect();
    assert_eq!(
        outcome(&policy, &evaluation),
        (decision, deciding, audit),
        "precedence broken for {value}\n{}",
        ast.text()
    );

    let mut without_audit = ast.clone();
    without_audit.rules.retain(|r| r.mode != Some(Mode::Audit));
    let policy_without = compiled(&without_audit.text());
    let (d, deciding, _) = outcome(&policy_without, &policy_without.evaluate(&job));
    let (d_all, deciding_all, _) = outcome(&policy, &evaluation);
    assert_eq!(
        (d, deciding),
        (d_all, deciding_all),
        "audit rules changed the decision for {value}\n{}",
        ast.text()
    );
}

/// The indexed `evaluate` agrees with `explain`, which walks every rule.
fn check_index(text: &str, jobs: &[Value]) {
    let policy = compiled(text);
    for value in jobs {
        let job = job_of(value);
        let indexed = policy.evaluate(&job);
        let walked = policy.explain(&job).evaluation;
        assert_eq!(
            outcome(&policy, &indexed),
            outcome(&policy, &walked),
            "the index changed the result for {value}\n{text}"
        );
        assert_eq!(indexed, walked, "the index changed the errors for {value}\n{text}");
    }
}

/// Two texts with one hash must decide every job the same way: the hash is what approvals and
/// the audit trail bind to.
fn check_same_hash_same_decision(a: &str, b: &str, value: &Value) {
    let (policy_a, policy_b) = (compiled(a), compiled(b));
    let job = job_of(value);
    let (decision_a, decision_b) = (policy_a.evaluate(&job).decision, policy_b.evaluate(&job).decision);
    assert!(
        policy_a.hash() != policy_b.hash() || decision_a == decision_b,
        "one hash `{}`, two decisions ({decision_a} and {decision_b}) for {value}\n--- a ---\n{a}\n--- b ---\n{b}",
        policy_a.hash()
    );
}

// ---------------------------------------------------------------------------------------------
// Generated cases. Case counts keep the whole file within a few seconds in a debug build.

proptest! {
    #![proptest_config(config(200))]

    #[test]
    fn evaluation_is_total_and_deterministic(ast in policy(), jobs in prop::collection::vec(job(), 1..=4)) {
        check_total(&ast.text(), &jobs);
    }

    #[test]
    fn any_style_compiles_to_the_same_total_engine(ast in policy(), style in style(), jobs in prop::collection::vec(job(), 1..=2)) {
        check_total(&render(&ast.to_yaml(), &style), &jobs);
    }
}

proptest! {
    #![proptest_config(config(150))]

    #[test]
    fn adding_a_rule_never_relaxes_a_deny(
        ast in policy(),
        added in rule(when(false)),
        position in 0usize..10,
        job in job(),
    ) {
        check_added_rule(&ast, added, position, &job);
    }

    #[test]
    fn adding_a_match_all_deny_always_denies(ast in policy(), position in 0usize..10, job in job()) {
        let deny = RuleAst {
            id: String::new(),
            when: When::default(),
            decision: Decision::Deny,
            mode: None,
            reason: None,
            limit: None,
            approvals: None,
        };
        check_added_rule(&ast, deny, position, &job);
    }
}

proptest! {
    #![proptest_config(config(150))]

    #[test]
    fn reformatting_never_changes_the_hash(ast in policy(), a in style(), b in style(), job in job()) {
        check_reformat(&ast, &a, &b, &job);
    }

    #[test]
    fn semantic_edits_change_the_hash(
        ast in policy(),
        edit in prop_oneof![
            (any::<usize>(), decision()).prop_map(|(i, d)| Edit::Decision(i, d)),
            any::<usize>().prop_map(Edit::Mode),
            any::<usize>().prop_map(Edit::Reason),
            decision().prop_map(Edit::Default),
            any::<usize>().prop_map(Edit::AddRule),
            any::<usize>().prop_map(Edit::RemoveRule),
            any::<usize>().prop_map(Edit::Value),
        ],
        style in style(),
    ) {
        check_edit(&ast, edit, &style);
    }
}

proptest! {
    #![proptest_config(config(100))]

    #[test]
    fn the_most_restrictive_enforced_match_decides(ast in policy(), job in job()) {
        check_precedence(&ast, &job);
    }

    #[test]
    fn the_index_never_changes_a_result(ast in indexed_policy(), jobs in prop::collection::vec(job(), 1..=6)) {
        check_index(&ast.text(), &jobs);
    }
}

// ---------------------------------------------------------------------------------------------
// Fixed inputs: the seed policy, and the engine bugs the properties found, each reduced to the
// smallest input that shows it.

const SEED: &str = include_str!("../../../examples/policies/seed.yaml");

#[test]
fn seed_policy_is_total_and_index_safe() {
    let jobs = [
        json!({"topic": "infra.security_group.update", "env": "production", "payload": {"cidr": "0.0.0.0/0"}}),
        json!({"topic": "infra.resource.delete", "env": "production"}),
        json!({"topic": "infra.cluster.recreate", "env": "production"}),
        json!({"topic": "infra.cluster.recreate", "env": "staging"}),
    ];
    check_total(SEED, &jobs);
    check_index(SEED, &jobs);
}

#[test]
fn seed_policy_hash_ignores_comments_layout_and_key_order() {
    let reformatted = r#"
{ rules: [
    { decision: deny, reason: "public ingress in production is never allowed",
      when: { cidr: '0.0.0.0/0', env: "production", topic: infra.security_group.update },
      id: deny-prod-public-ingress },
    { id: require-approval-prod-delete, decision: "require_human",
      when: { env: production, topic: infra.resource.delete } },
    { limit: { key: [topic, tenant], per: 10m, rate: 1 }, id: throttle-bulk-recreate,
      when: { env: production, topic: infra.cluster.recreate }, decision: throttle } ],
  risk: { high: ["infra.resource.delete", "infra.cluster.*", "infra.security_group.*"],
          medium: ["infra.resource.update"], low: ["infra.*.read"] },
  defaults: { decision: allow },
  version: v1 }
"#;
    assert_eq!(compiled(SEED).hash(), compiled(reformatted).hash());
}

/// BUG: a name repeated in a `topic` or `env` list puts the rule twice in the same index
/// bucket, so `evaluate` lists it twice among the deciding rules (and twice among errors),
/// while `explain` lists it once. Found by `the_index_never_changes_a_result`.
#[test]
fn index_counts_a_rule_once_when_a_name_repeats() {
    let job = [json!({"topic": "infra.vm.delete", "env": "production"})];
    check_index(
        "version: v1\nrules:\n  - id: r\n    when: { topic: [infra.vm.delete, infra.vm.delete] }\n    decision: deny\n",
        &job,
    );
    check_index(
        "version: v1\nrules:\n  - id: r\n    when: { env: [production, production] }\n    decision: deny\n",
        &job,
    );
}

fn fanout_job(topic: &str, tenant: &str) -> Value {
    json!({"topic": topic, "env": "production", "tenant": tenant, "payload": {"xs": vec![0; PATH_FANOUT_MAX + 1]}})
}

/// BUG: a rule whose payload path fails (fan-out past the limit) fails closed in `explain` but
/// is never evaluated by `evaluate`, because the index already ruled it out on its topic, so the
/// two disagree: `explain` says deny, `evaluate` says allow.
#[test]
fn index_agrees_with_explain_when_a_skipped_rule_would_error() {
    let text = "version: v1\nrules:\n  - id: r\n    when: { payload: { \"xs[*]\": 1 }, topic: other.topic }\n    decision: deny\n";
    check_index(text, &[fanout_job("infra.vm.delete", "acme")]);
}

/// BUG: whether a failing payload path fails the rule closed depends on the order the `when`
/// keys are written in (evaluation stops at the first false condition), while the hash ignores
/// that order: two policies with one hash decide deny and allow.
#[test]
fn condition_order_never_changes_a_decision() {
    let payload_first = "version: v1\nrules:\n  - id: r\n    when: { payload: { \"xs[*]\": 1 }, tenant: other }\n    decision: deny\n";
    let tenant_first = "version: v1\nrules:\n  - id: r\n    when: { tenant: other, payload: { \"xs[*]\": 1 } }\n    decision: deny\n";
    check_same_hash_same_decision(payload_first, tenant_first, &fanout_job("infra.vm.delete", "acme"));
}

/// BUG: a dotted shorthand key (`a.b: 1`) is compiled as the single payload key `"a.b"`, not as
/// the path `a.b`, although the compiler's own warning says it "is read as `payload.a.b`" and
/// its help text recommends `a.b: value` for nested fields. Its canonical form is the same as
/// `payload: { a.b: 1 }`, so the two share a hash and decide differently.
#[test]
fn dotted_shorthand_is_the_payload_path() {
    let shorthand = "version: v1\nrules:\n  - id: r\n    when: { a.b: 1 }\n    decision: deny\n";
    let explicit = "version: v1\nrules:\n  - id: r\n    when: { payload: { a.b: 1 } }\n    decision: deny\n";
    let job = json!({"topic": "t", "env": "e", "payload": {"a": {"b": 1}}});
    check_same_hash_same_decision(shorthand, explicit, &job);
    assert_eq!(compiled(shorthand).evaluate(&job_of(&job)).decision, Decision::Deny);
}

/// BUG: integer literals past 2^53 are canonicalised as doubles (RFC 8785), so `…993` and
/// `…992` hash the same, but equality compares them as exact integers and decides apart.
#[test]
fn integers_past_2_pow_53_that_decide_apart_hash_apart() {
    let a = "version: v1\nrules:\n  - id: r\n    when: { n: 9007199254740993 }\n    decision: deny\n";
    let b = "version: v1\nrules:\n  - id: r\n    when: { n: 9007199254740992 }\n    decision: deny\n";
    check_same_hash_same_decision(
        a,
        b,
        &json!({"topic": "t", "env": "e", "payload": {"n": 9_007_199_254_740_992_u64}}),
    );
}

/// BUG: the YAML 1.2 core schema's hex integers are `0x[0-9a-fA-F]+`; `0x-1` is a string, but
/// the reader hands the digits to `i64::from_str_radix`, which accepts a sign, and reads -1.
#[test]
fn signed_hex_is_a_string() {
    let text = "version: v1\nrules:\n  - id: r\n    when: { n: 0x-1 }\n    decision: deny\n";
    let policy = compiled(text);
    let as_string = job_of(&json!({"topic": "t", "env": "e", "payload": {"n": "0x-1"}}));
    let as_number = job_of(&json!({"topic": "t", "env": "e", "payload": {"n": -1}}));
    assert_eq!(policy.evaluate(&as_string).decision, Decision::Deny, "`0x-1` should be the string");
    assert_eq!(policy.evaluate(&as_number).decision, Decision::Allow, "`0x-1` should not be -1");
}

/// Runs `body` on a 2 MiB thread (the default for spawned threads and for tokio's workers) in
/// a child process that runs only test `name`, so that a stack overflow, which aborts the
/// whole process, fails that one test and not the rest of this file.
fn in_child_process(name: &str, body: impl FnOnce() + Send + 'static) {
    const CHILD: &str = "AIRLOCK_PROPERTIES_CHILD";
    if std::env::var(CHILD).as_deref() == Ok(name) {
        let thread = std::thread::Builder::new().stack_size(2 << 20).spawn(body).expect("a thread");
        thread.join().expect("the check passes");
        return;
    }
    let exe = std::env::current_exe().expect("the test binary");
    let output = std::process::Command::new(exe)
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD, name)
        .output()
        .expect("the child process runs");
    assert!(
        output.status.success(),
        "the child process failed ({}):\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
}

/// BUG: `yaml::parse` drives yaml-rust2's recursive `Parser::load`, which recurses once per
/// level of block nesting (only flow nesting has a limit there), and `YAML_DEPTH_MAX` is only
/// checked on the events that come out. 100,000 nested `- ` (200 KB, inside every size limit;
/// about 5,000 levels suffice in a release build) overflow the stack and abort the process
/// instead of giving "nesting deeper than 64 levels". `cases::parse` shares the reader.
#[test]
fn deep_block_nesting_is_refused_without_overflowing_the_stack() {
    in_child_process("deep_block_nesting_is_refused_without_overflowing_the_stack", || {
        let errors = compile(&"- ".repeat(100_000)).err().unwrap_or_default();
        assert!(errors.iter().any(|e| e.message.contains("nesting deeper")), "{errors:?}");
    });
}

/// BUG: `Glob::matches` recurses once per token (`match_tokens`), and nothing bounds the tokens
/// of a glob nor the length of the payload string it is matched against: a 60 KB `*a*a…` glob
/// on a payload field and a 30 KB string overflow the stack and abort the process, where
/// evaluation is documented as total.
#[test]
fn long_payload_globs_evaluate_without_overflowing_the_stack() {
    in_child_process("long_payload_globs_evaluate_without_overflowing_the_stack", || {
        let policy = |n: usize| {
            format!(
                "version: v1\nrules:\n  - id: r\n    when: {{ name: {{ glob: \"{}\" }} }}\n    decision: deny\n",
                "*a".repeat(n)
            )
        };
        // Past the documented bound the glob is refused at compile time, with a clear error...
        let too_long = compile(&policy(30_000)).unwrap_err();
        assert!(too_long[0].message.contains("wildcards"), "{too_long:?}");
        // ...and at the bound, matching a long value is cheap and needs little stack.
        let limit = airlock_policy::limits::GLOB_WILDCARDS_MAX;
        let job = json!({"topic": "t", "env": "e", "payload": {"name": "a".repeat(30_000)}});
        assert_eq!(compiled(&policy(limit)).evaluate(&job_of(&job)).decision, Decision::Deny);
    });
}
