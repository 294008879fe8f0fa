//! Prometheus metrics under the names of SPEC section 12, kept in a small in-process
//! registry and rendered as text on `/metrics`. Topic labels are capped so that agents
//! inventing topics cannot grow the registry without bound.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::Mutex;

use airlock_policy::Decision;

/// Distinct `topic` label values kept; later topics are reported as `other`.
const TOPIC_LABELS_MAX: usize = 1_000;

/// Histogram bucket bounds, in seconds.
const BUCKETS: [f64; 14] =
    [0.000_01, 0.000_05, 0.000_1, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 5.0];

/// Every metric this process exports: name, type and help.
pub const FAMILIES: [(&str, &str, &str); 21] = [
    (
        "airlock_gate_decisions_total",
        "counter",
        "Decisions made at each gate; a throttle as throttle_admitted or throttle_refused once its budget answered, a fail-open pass as bypassed.",
    ),
    (
        "airlock_gateway_fail_open_total",
        "counter",
        "Submissions accepted by Gate A while the safety check was unavailable (fail open).",
    ),
    (
        "airlock_scheduler_input_fail_open_total",
        "counter",
        "Dispatches by Gate B while the safety check was unavailable (fail open).",
    ),
    ("airlock_safety_check_failures_total", "counter", "Safety checks that failed, by gate and reason."),
    ("airlock_policy_eval_seconds", "histogram", "Time to evaluate the policy for one job."),
    ("airlock_jobs", "gauge", "Jobs in each state."),
    ("airlock_approvals_pending", "gauge", "Approval requests waiting for a human."),
    ("airlock_approval_wait_seconds", "histogram", "Time from approval request to decision."),
    ("airlock_approvals_stale_total", "counter", "Approval requests whose binding broke."),
    ("airlock_idempotent_replays_total", "counter", "Submissions answered from an idempotency key."),
    (
        "airlock_submissions_without_idempotency_key_total",
        "counter",
        "Accepted submissions that carried no idempotency key, by topic (the release-gate report).",
    ),
    ("airlock_http_requests_total", "counter", "HTTP requests by method, route and status."),
    (
        "airlock_claim_looks_total",
        "counter",
        "Looks at the queue by worker claims; a waiting claim looks again when woken, not on a timer.",
    ),
    ("airlock_http_request_seconds", "histogram", "HTTP request latency by route."),
    ("airlock_audit_records_total", "counter", "Audit records appended by this process."),
    ("airlock_safety_circuit_state", "gauge", "Safety-check circuit breaker: 0 closed, 1 half-open, 2 open."),
    ("airlock_policy_snapshot_version", "gauge", "Version of the active policy snapshot."),
    (
        "airlock_scheduling_attempts_total",
        "counter",
        "Failed scheduling attempts at Gate B, by topic and reason.",
    ),
    ("airlock_dead_lettered_total", "counter", "Jobs dead-lettered, by topic and reason."),
    ("airlock_dlq_depth", "gauge", "Dead-lettered jobs not yet retried or discarded."),
    (
        "airlock_policy_audit_matches_total",
        "counter",
        "Matches of `mode: audit` rules: what they would have decided, never enforced.",
    ),
];

type Labels = Vec<(&'static str, String)>;

/// A gauge value computed at scrape time: name, labels, value.
pub type Gauge = (&'static str, Labels, f64);

#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

#[derive(Default)]
struct Registry {
    counters: BTreeMap<(&'static str, Labels), f64>,
    histograms: BTreeMap<(&'static str, Labels), Histogram>,
    topics: BTreeSet<String>,
}

/// The registry.
pub struct Metrics {
    registry: Mutex<Registry>,
}

/// Counters an alert may watch for each topic: created at 0 when the topic is first seen, so
/// that the first increment is a change `rate()` sees (a series born at 1 has no rate).
const PER_TOPIC_AT_ZERO: [&str; 2] =
    ["airlock_gateway_fail_open_total", "airlock_scheduler_input_fail_open_total"];

impl Default for Metrics {
    /// A registry whose unlabelled counters, and the labelled ones with known label values,
    /// exist at 0 from the start.
    fn default() -> Self {
        let mut registry = Registry::default();
        for name in ["airlock_approvals_stale_total", "airlock_idempotent_replays_total"] {
            registry.counters.insert((name, Vec::new()), 0.0);
        }
        for gate in ["a", "b"] {
            for reason in ["unavailable", "timeout"] {
                let labels = vec![("gate", gate.to_owned()), ("reason", reason.to_owned())];
                registry.counters.insert(("airlock_safety_check_failures_total", labels), 0.0);
            }
        }
        for name in PER_TOPIC_AT_ZERO {
            registry.counters.insert((name, vec![("topic", "other".to_owned())]), 0.0);
        }
        Self { registry: Mutex::new(registry) }
    }
}

fn labels(pairs: &[(&'static str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| (*k, (*v).to_owned())).collect()
}

impl Metrics {
    /// Adds 1 to a counter.
    pub fn inc(&self, name: &'static str, pairs: &[(&'static str, &str)]) {
        if let Ok(mut r) = self.registry.lock() {
            *r.counters.entry((name, labels(pairs))).or_default() += 1.0;
        }
    }

    /// Counts a gate's decision in `airlock_gate_decisions_total`, except a throttle, which
    /// [`Metrics::throttle_answered`] counts once its budget has answered.
    pub fn decided(&self, gate: &'static str, decision: Decision, topic_label: &str) {
        if decision != Decision::Throttle {
            self.inc(
                "airlock_gate_decisions_total",
                &[("gate", gate), ("decision", decision.as_str()), ("topic", topic_label)],
            );
        }
    }

    /// Counts a throttle decision once its budget answered: `throttle_admitted` when the work
    /// went on within the budget, `throttle_refused` when it did not (429 at Gate A, back to the
    /// queue at Gate B). Other decisions were counted by [`Metrics::decided`].
    pub fn throttle_answered(&self, gate: &'static str, decision: Decision, topic: &str, admitted: bool) {
        if decision == Decision::Throttle {
            let outcome = if admitted { "throttle_admitted" } else { "throttle_refused" };
            let topic = self.topic(topic);
            self.inc(
                "airlock_gate_decisions_total",
                &[("gate", gate), ("decision", outcome), ("topic", &topic)],
            );
        }
    }

    /// Records one observation, in seconds.
    pub fn observe(&self, name: &'static str, pairs: &[(&'static str, &str)], seconds: f64) {
        if let Ok(mut r) = self.registry.lock() {
            let h = r.histograms.entry((name, labels(pairs))).or_default();
            for (count, bound) in h.counts.iter_mut().zip(BUCKETS) {
                if seconds <= bound {
                    *count += 1;
                }
            }
            h.count += 1;
            h.sum += seconds;
        }
    }

    /// The label value for a topic: itself, or `other` once too many topics were seen.
    pub fn topic(&self, topic: &str) -> String {
        let Ok(mut r) = self.registry.lock() else { return "other".into() };
        if r.topics.contains(topic) {
            return topic.to_owned();
        }
        if r.topics.len() < TOPIC_LABELS_MAX {
            r.topics.insert(topic.to_owned());
            for name in PER_TOPIC_AT_ZERO {
                r.counters.entry((name, vec![("topic", topic.to_owned())])).or_insert(0.0);
            }
            return topic.to_owned();
        }
        "other".into()
    }

    /// The Prometheus text exposition, with the gauges computed by the caller.
    pub fn render(&self, gauges: &[Gauge]) -> String {
        let mut out = String::new();
        let Ok(r) = self.registry.lock() else { return out };
        for (name, kind, help) in FAMILIES {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for ((n, l), v) in r.counters.iter().filter(|((n, _), _)| *n == name) {
                let _ = writeln!(out, "{n}{} {v}", render_labels(l, None));
            }
            for ((n, l), v) in gauges.iter().filter(|(n, _, _)| *n == name).map(|(n, l, v)| ((n, l), v)) {
                let _ = writeln!(out, "{n}{} {v}", render_labels(l, None));
            }
            for ((n, l), h) in r.histograms.iter().filter(|((n, _), _)| *n == name) {
                for (count, bound) in h.counts.iter().zip(BUCKETS) {
                    let _ = writeln!(out, "{n}_bucket{} {count}", render_labels(l, Some(&bound.to_string())));
                }
                let _ = writeln!(out, "{n}_bucket{} {}", render_labels(l, Some("+Inf")), h.count);
                let _ = writeln!(out, "{n}_sum{} {}", render_labels(l, None), h.sum);
                let _ = writeln!(out, "{n}_count{} {}", render_labels(l, None), h.count);
            }
        }
        out
    }
}

fn render_labels(pairs: &[(&'static str, String)], le: Option<&str>) -> String {
    if pairs.is_empty() && le.is_none() {
        return String::new();
    }
    let mut parts: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}=\"{}\"", escape(v))).collect();
    if let Some(le) = le {
        parts.push(format!("le=\"{le}\""));
    }
    format!("{{{}}}", parts.join(","))
}

fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_gauges_and_histograms() {
        let m = Metrics::default();
        m.inc("airlock_gate_decisions_total", &[("gate", "a"), ("decision", "allow"), ("topic", "t\"x")]);
        m.inc("airlock_gate_decisions_total", &[("gate", "a"), ("decision", "allow"), ("topic", "t\"x")]);
        m.observe("airlock_policy_eval_seconds", &[], 0.000_02);
        let text = m.render(&[("airlock_jobs", vec![("state", "queued".into())], 3.0)]);
        assert!(
            text.contains("airlock_gate_decisions_total{gate=\"a\",decision=\"allow\",topic=\"t\\\"x\"} 2\n"),
            "{text}"
        );
        assert!(text.contains("airlock_jobs{state=\"queued\"} 3\n"), "{text}");
        assert!(text.contains("airlock_policy_eval_seconds_bucket{le=\"0.00001\"} 0\n"), "{text}");
        assert!(text.contains("airlock_policy_eval_seconds_bucket{le=\"0.00005\"} 1\n"), "{text}");
        assert!(text.contains("airlock_policy_eval_seconds_count 1\n"), "{text}");
        assert!(text.contains("# TYPE airlock_scheduler_input_fail_open_total counter"));
    }

    #[test]
    fn alerted_counters_exist_at_zero() {
        let m = Metrics::default();
        let text = m.render(&[]);
        assert!(
            text.contains("airlock_safety_check_failures_total{gate=\"b\",reason=\"timeout\"} 0\n"),
            "{text}"
        );
        assert!(text.contains("airlock_approvals_stale_total 0\n"), "{text}");
        assert!(!text.contains("topic=\"infra.vm.create\""), "{text}");
        m.topic("infra.vm.create");
        let text = m.render(&[]);
        assert!(
            text.contains("airlock_scheduler_input_fail_open_total{topic=\"infra.vm.create\"} 0\n"),
            "{text}"
        );
        assert!(text.contains("airlock_gateway_fail_open_total{topic=\"infra.vm.create\"} 0\n"), "{text}");
    }

    #[test]
    fn topic_labels_are_capped() {
        let m = Metrics::default();
        for i in 0..TOPIC_LABELS_MAX {
            assert_eq!(m.topic(&format!("t{i}")), format!("t{i}"));
        }
        assert_eq!(m.topic("one.more"), "other");
        assert_eq!(m.topic("t0"), "t0");
    }
}
