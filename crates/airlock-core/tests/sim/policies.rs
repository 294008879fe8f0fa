//! The snapshots the simulator publishes between: the seed article's three rules, a tightened
//! version that keeps one rule byte-for-byte and adds a quorum rule next to it, and a lockdown
//! that edits that rule and denies by default. Together they make every Gate B outcome
//! reachable and make approvals go stale under both snapshot and rule binding.

use airlock_policy::Policy;

const SEED_ARTICLE: &str = r#"
version: v1
defaults:
  decision: allow
risk:
  high: ["infra.resource.delete", "infra.cluster.*", "infra.security_group.*"]
rules:
  - id: deny-prod-public-ingress
    when:
      topic: infra.security_group.update
      env: production
      cidr: "0.0.0.0/0"
    decision: deny
    reason: public ingress in production is never allowed
  - id: require-approval-prod-delete
    when: { topic: infra.resource.delete, env: production }
    decision: require_human
  - id: throttle-bulk-recreate
    when: { topic: infra.cluster.recreate, env: production }
    decision: throttle
    limit: { rate: 1, per: 10m, key: [tenant, topic] }
"#;

const TIGHTENED: &str = r#"
version: v1
defaults:
  decision: allow
risk:
  high: ["infra.resource.delete", "infra.cluster.*", "infra.security_group.*"]
rules:
  - id: deny-prod-public-ingress
    when:
      topic: infra.security_group.update
      env: production
      cidr: "0.0.0.0/0"
    decision: deny
    reason: public ingress in production is never allowed
  - id: require-approval-prod-delete
    when: { topic: infra.resource.delete, env: production }
    decision: require_human
  - id: second-approver-team-b-delete
    when: { topic: infra.resource.delete, env: production, labels: { team: b } }
    decision: require_human
    approvals: 2
  - id: deny-any-public-ingress
    when: { topic: infra.security_group.update, cidr: "0.0.0.0/0" }
    decision: deny
  - id: throttle-updates
    when: { topic: infra.resource.update }
    decision: throttle
    limit: { rate: 2, per: 1m, key: [tenant] }
  - id: throttle-bulk-recreate
    when: { topic: infra.cluster.recreate, env: production }
    decision: throttle
    limit: { rate: 1, per: 10m, key: [tenant, topic] }
"#;

const LOCKDOWN: &str = r#"
version: v1
defaults:
  decision: deny
rules:
  - id: allow-reads
    when: { topic: "infra.*.read" }
    decision: allow
  - id: allow-staging
    when: { env: staging }
    decision: allow
  - id: require-approval-prod-delete
    when: { topic: [infra.resource.delete, infra.resource.update], env: production }
    decision: require_human
  - id: require-approval-cluster
    when: { topic: "infra.cluster.*", env: production }
    decision: require_human
"#;

/// The snapshots, compiled once for every seed: index 0 is active when a run starts.
pub fn compile_all() -> Vec<Policy> {
    [SEED_ARTICLE, TIGHTENED, LOCKDOWN]
        .iter()
        .map(|text| match airlock_policy::compile(text) {
            Ok((policy, _warnings)) => policy,
            Err(errors) => panic!("a simulator policy does not compile: {errors:?}"),
        })
        .collect()
}
