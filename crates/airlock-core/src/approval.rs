//! Approvals bound to what was approved (SPEC 7): the job hash, the snapshot hash and the
//! deciding rules. An approval whose binding no longer holds does not count, however many
//! humans signed it.

use std::fmt;
use std::str::FromStr;

use airlock_policy::{Job, Policy};

use crate::Millis;

/// What an approval stays bound to besides the job.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Binding {
    /// The whole snapshot: any publish makes pending approvals stale.
    #[default]
    Snapshot,
    /// Only the deciding rules' content: a publish that leaves them unchanged keeps approvals.
    Rule,
}

impl FromStr for Binding {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "snapshot" => Ok(Self::Snapshot),
            "rule" => Ok(Self::Rule),
            other => Err(format!("unknown approval binding `{other}`; expected `snapshot` or `rule`")),
        }
    }
}

/// Where an approval request stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Status {
    /// Waiting for approvers.
    Pending,
    /// Reached its quorum.
    Approved,
    /// Someone rejected it.
    Rejected,
    /// Outlived its TTL.
    Expired,
    /// Its binding broke; a new request replaced it.
    Stale,
}

impl Status {
    /// Every status.
    pub const ALL: [Status; 5] = [Self::Pending, Self::Approved, Self::Rejected, Self::Expired, Self::Stale];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Approved => "approved",
            Self::Rejected => "rejected",
            Self::Expired => "expired",
            Self::Stale => "stale",
        }
    }
}

impl FromStr for Status {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|s| s.as_str() == text)
            .ok_or_else(|| format!("unknown approval status `{text}`"))
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What an approval request is bound to and who has signed it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// The job hash at request time.
    pub job_hash: String,
    /// The snapshot that asked for a human.
    pub snapshot_hash: String,
    /// The deciding rules, in file order.
    pub rule_ids: Vec<String>,
    /// Their content hashes, in the same order.
    pub rule_hashes: Vec<String>,
    /// The job's submitter, who may never approve it.
    pub requested_by: String,
    /// When the request was made.
    pub created_at: Millis,
    /// When it stops counting.
    pub expires_at: Millis,
    /// Approvals needed.
    pub quorum: u32,
    /// Who approved so far, in order.
    pub approvers: Vec<String>,
    /// Where it stands.
    pub status: Status,
}

impl Request {
    /// A pending request, bound to `job_hash` and to the rules of `policy` that decided
    /// `evaluation` (`require_human`), with the largest quorum any of them asks for. The one way
    /// every path (Gate A, Gate B, a stale approval's replacement) opens a request.
    pub fn pending(
        policy: &Policy,
        evaluation: &airlock_policy::Evaluation,
        job_hash: String,
        requested_by: String,
        now: Millis,
        ttl_ms: Millis,
    ) -> Self {
        let deciding: Vec<_> = evaluation.deciding.iter().filter_map(|i| policy.rule(*i)).collect();
        Self {
            job_hash,
            snapshot_hash: policy.hash().to_owned(),
            rule_ids: deciding.iter().map(|r| r.id.clone()).collect(),
            rule_hashes: deciding.iter().map(|r| r.hash.clone()).collect(),
            requested_by,
            created_at: now,
            expires_at: now + ttl_ms,
            quorum: deciding.iter().map(|r| r.approvals).max().unwrap_or(1),
            approvers: Vec::new(),
            status: Status::Pending,
        }
    }
}

/// Why a binding no longer holds.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Stale {
    /// The job's content no longer hashes to what was approved.
    #[error("the job changed: its hash is `{now}`, the approval was for `{was}`")]
    JobChanged {
        /// Hash at request time.
        was: String,
        /// Hash now.
        now: String,
    },
    /// Another snapshot is active.
    #[error("the policy changed: snapshot `{now}` is active, the approval was for `{was}`")]
    SnapshotChanged {
        /// Snapshot at request time.
        was: String,
        /// Active snapshot.
        now: String,
    },
    /// A rule deciding now is not one the approval covered unchanged (rule binding).
    #[error("rule `{rule_id}` now decides this job and the approval did not cover it as it is")]
    RuleChanged {
        /// The rule.
        rule_id: String,
    },
    /// A rule deciding now needs more approvers than signed (rule binding).
    #[error("rule `{rule_id}` now needs {needed} approver(s); the approval has {have}")]
    QuorumRaised {
        /// The rule.
        rule_id: String,
        /// Approvers it needs.
        needed: u32,
        /// Approvers who signed.
        have: u32,
    },
    /// The request outlived its TTL.
    #[error("the approval request expired")]
    Expired,
}

/// Checks that `request` still binds `job` under `active`: not expired, the job hash
/// (recomputed from the job's content) unchanged, and the same snapshot, or, with rule
/// binding, every rule deciding now covered by the approval unchanged and with its quorum.
pub fn check_binding(
    request: &Request,
    job: &Job,
    active: &Policy,
    binding: Binding,
    now: Millis,
) -> Result<(), Stale> {
    if now >= request.expires_at {
        return Err(Stale::Expired);
    }
    let job_hash = job.hash();
    if request.job_hash != job_hash {
        return Err(Stale::JobChanged { was: request.job_hash.clone(), now: job_hash });
    }
    match binding {
        Binding::Snapshot if request.snapshot_hash != active.hash() => {
            Err(Stale::SnapshotChanged { was: request.snapshot_hash.clone(), now: active.hash().to_owned() })
        }
        Binding::Snapshot => Ok(()),
        Binding::Rule => {
            let (evaluation, _) = airlock_plan::evaluate_any(active, job);
            let have = u32::try_from(request.approvers.len()).unwrap_or(u32::MAX);
            for rule in evaluation.deciding.iter().filter_map(|i| active.rule(*i)) {
                let covered = request
                    .rule_ids
                    .iter()
                    .zip(&request.rule_hashes)
                    .any(|(id, hash)| *id == rule.id && *hash == rule.hash);
                if !covered {
                    return Err(Stale::RuleChanged { rule_id: rule.id.clone() });
                }
                // An approved request must carry every deciding rule's quorum (a pending one
                // is still collecting votes).
                if request.status == Status::Approved && have < rule.approvals {
                    return Err(Stale::QuorumRaised {
                        rule_id: rule.id.clone(),
                        needed: rule.approvals,
                        have,
                    });
                }
            }
            Ok(())
        }
    }
}

/// The result of a counted approval.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vote {
    /// Counted; this many more are needed.
    Counted {
        /// Approvals still needed.
        remaining: u32,
    },
    /// The quorum is reached: the job may go to the queue.
    QuorumReached,
}

/// Why an approval was not counted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum VoteError {
    /// The approver submitted the job.
    #[error("`{0}` submitted this job and cannot approve it")]
    SelfApproval(String),
    /// The approver already approved.
    #[error("`{0}` has already approved this job")]
    AlreadyApproved(String),
    /// The request is no longer pending.
    #[error("the approval request is `{0}`, not pending")]
    NotPending(Status),
}

/// Records `approver`'s approval on a request whose binding was just checked.
pub fn approve(request: &mut Request, approver: &str) -> Result<Vote, VoteError> {
    if request.status != Status::Pending {
        return Err(VoteError::NotPending(request.status));
    }
    if approver == request.requested_by {
        return Err(VoteError::SelfApproval(approver.to_owned()));
    }
    if request.approvers.iter().any(|a| a == approver) {
        return Err(VoteError::AlreadyApproved(approver.to_owned()));
    }
    request.approvers.push(approver.to_owned());
    let count = u32::try_from(request.approvers.len()).unwrap_or(u32::MAX);
    if count >= request.quorum {
        request.status = Status::Approved;
        Ok(Vote::QuorumReached)
    } else {
        Ok(Vote::Counted { remaining: request.quorum - count })
    }
}

/// Records a rejection by `approver`. The submitter may not reject their own job either: a
/// rejection is a decision, and decisions on a job are never the submitter's.
pub fn reject(request: &mut Request, approver: &str) -> Result<(), VoteError> {
    if request.status != Status::Pending {
        return Err(VoteError::NotPending(request.status));
    }
    if approver == request.requested_by {
        return Err(VoteError::SelfApproval(approver.to_owned()));
    }
    request.status = Status::Rejected;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(text: &str) -> Policy {
        airlock_policy::compile(text).unwrap().0
    }

    const V1: &str = "version: v1\nrules:\n  - id: del\n    when: { topic: infra.resource.delete }\n    decision: require_human\n";
    const V2_OTHER_RULE: &str = "version: v1\nrules:\n  - id: del\n    when: { topic: infra.resource.delete }\n    decision: require_human\n  - id: x\n    when: { topic: x }\n    decision: deny\n";
    const V3_EDITED: &str = "version: v1\nrules:\n  - id: del\n    when: { topic: infra.resource.delete, env: production }\n    decision: require_human\n";

    fn job(topic: &str) -> Job {
        Job::from_json(&serde_json::json!({"topic": topic, "env": "production"})).unwrap()
    }

    fn request(p: &Policy) -> Request {
        Request {
            job_hash: job("infra.resource.delete").hash(),
            snapshot_hash: p.hash().into(),
            rule_ids: vec!["del".into()],
            rule_hashes: vec![p.rules()[0].hash.clone()],
            requested_by: "agent".into(),
            created_at: 0,
            expires_at: 1_000,
            quorum: 2,
            approvers: Vec::new(),
            status: Status::Pending,
        }
    }

    #[test]
    fn binding_follows_job_snapshot_rules_and_ttl() {
        let v1 = policy(V1);
        let mut r = request(&v1);
        r.approvers = vec!["alice".into()];
        let delete = job("infra.resource.delete");
        assert_eq!(check_binding(&r, &delete, &v1, Binding::Snapshot, 10), Ok(()));
        assert!(matches!(
            check_binding(&r, &job("infra.vm.delete"), &v1, Binding::Snapshot, 10),
            Err(Stale::JobChanged { .. })
        ));
        assert_eq!(check_binding(&r, &delete, &v1, Binding::Snapshot, 1_000), Err(Stale::Expired));
        let v2 = policy(V2_OTHER_RULE);
        assert!(matches!(
            check_binding(&r, &delete, &v2, Binding::Snapshot, 10),
            Err(Stale::SnapshotChanged { .. })
        ));
        assert_eq!(check_binding(&r, &delete, &v2, Binding::Rule, 10), Ok(()));
        let v3 = policy(V3_EDITED);
        assert_eq!(
            check_binding(&r, &delete, &v3, Binding::Rule, 10),
            Err(Stale::RuleChanged { rule_id: "del".into() })
        );
    }

    #[test]
    fn rule_binding_covers_every_rule_deciding_now_and_its_quorum() {
        let v1 = policy(V1);
        let mut r = request(&v1);
        r.approvers = vec!["alice".into()];
        let delete = job("infra.resource.delete");
        let added = policy(&format!(
            "{V1}  - id: two-people\n    when: {{ env: production }}\n    decision: require_human\n"
        ));
        assert_eq!(
            check_binding(&r, &delete, &added, Binding::Rule, 10),
            Err(Stale::RuleChanged { rule_id: "two-people".into() }),
            "a new deciding rule the approval never saw"
        );
        let quorum =
            policy(&V1.replace("decision: require_human", "decision: require_human\n    approvals: 2"));
        r.rule_hashes = vec![quorum.rules()[0].hash.clone()];
        assert_eq!(
            check_binding(&r, &delete, &quorum, Binding::Rule, 10),
            Ok(()),
            "pending: still collecting votes"
        );
        r.status = Status::Approved;
        assert_eq!(
            check_binding(&r, &delete, &quorum, Binding::Rule, 10),
            Err(Stale::QuorumRaised { rule_id: "del".into(), needed: 2, have: 1 })
        );
    }

    #[test]
    fn rule_binding_of_a_plan_job_follows_the_rules_deciding_its_changes() {
        let text = "version: v1\nrules:\n  - id: db-destroy\n    when: { topic: tf.aws_db_instance.delete }\n    decision: require_human\n";
        let v1 = policy(text);
        let plan = airlock_plan::Plan::parse(
            br#"{"format_version": "1.2", "resource_changes": [{"address": "aws_db_instance.main", "type": "aws_db_instance", "name": "main", "change": {"actions": ["delete"], "before": {}, "after": null}}]}"#,
        )
        .unwrap();
        let submission = airlock_plan::Submission {
            env: "production".into(),
            plan_hash: "sha256:00".into(),
            ..Default::default()
        };
        let plan_job = airlock_plan::plan_job(plan, "acme", "agent", submission);
        let evaluation = airlock_plan::evaluate(&v1, &plan_job).evaluation;
        let mut r = Request::pending(&v1, &evaluation, plan_job.hash(), "agent".into(), 0, 1_000);
        assert_eq!(r.rule_ids, ["db-destroy"]);
        r.status = Status::Approved;
        r.approvers = vec!["alice".into()];
        assert_eq!(check_binding(&r, &plan_job, &v1, Binding::Rule, 10), Ok(()));
        let edited = policy(&text.replace("require_human\n", "require_human\n    reason: edited\n"));
        assert_eq!(
            check_binding(&r, &plan_job, &edited, Binding::Rule, 10),
            Err(Stale::RuleChanged { rule_id: "db-destroy".into() }),
            "the rule deciding the plan's change changed"
        );
    }

    #[test]
    fn quorum_and_self_approval() {
        let v1 = policy(V1);
        let mut r = request(&v1);
        assert_eq!(approve(&mut r, "agent"), Err(VoteError::SelfApproval("agent".into())));
        assert_eq!(approve(&mut r, "alice"), Ok(Vote::Counted { remaining: 1 }));
        assert_eq!(approve(&mut r, "alice"), Err(VoteError::AlreadyApproved("alice".into())));
        assert_eq!(approve(&mut r, "bob"), Ok(Vote::QuorumReached));
        assert_eq!(r.status, Status::Approved);
        assert_eq!(approve(&mut r, "carol"), Err(VoteError::NotPending(Status::Approved)));
        assert_eq!(reject(&mut r, "carol"), Err(VoteError::NotPending(Status::Approved)));
    }
}
