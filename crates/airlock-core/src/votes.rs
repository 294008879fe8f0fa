//! What happens to an approval request (SPEC 7): an approver's vote or rejection ([`cast`]),
//! its expiry ([`expire`]) and a stale request's replacement ([`replace_stale`]), each as the
//! [`ApprovalChange`] its commit applies through [`crate::moves::plan_approval_change`]. The
//! server loads the request and its job, checks the binding under the active snapshot, and
//! hands the change to the store; everything decided in between is here.

use serde_json::{Value, json};

use crate::Millis;
use crate::approval::{self, Request, Stale, Status, Vote, VoteError};
use crate::audit::{Draft, Kind};
use crate::decided::{Decided, merge};
use crate::ids::ApprovalId;
use crate::moves::ApprovalChange;
use crate::record::{ApprovalRecord, JobRecord};
use crate::state::{Event, JobState};

/// What an approver decides.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ballot<'a> {
    /// Approve (one vote toward the quorum).
    Approve,
    /// Reject, with an optional comment kept in the audit record.
    Reject {
        /// The approver's comment.
        comment: Option<&'a str>,
    },
}

/// An approver's decision on a request, with what it is checked against.
#[derive(Clone, Debug)]
pub struct Cast<'a> {
    /// The request as read.
    pub record: &'a ApprovalRecord,
    /// Its job as read.
    pub job: &'a JobRecord,
    /// The decision.
    pub ballot: Ballot<'a>,
    /// The approver's principal.
    pub approver: &'a str,
    /// The request's binding, checked under the active snapshot (an approval needs it to hold).
    pub binding: Result<(), Stale>,
    /// The active snapshot's version: the commit of an approval must find it still active.
    pub snapshot_version: u64,
    /// When.
    pub at: Millis,
}

/// What a decision comes to.
#[derive(Clone, Debug)]
pub enum Counted {
    /// The change to commit; `remaining`: approvals still needed after an approval (0 when the
    /// quorum is reached and the job goes to the queue), `None` for a rejection.
    Change {
        /// The change.
        change: Box<ApprovalChange>,
        /// Approvals still needed.
        remaining: Option<u32>,
    },
    /// An approval of a request whose binding broke: nothing is counted; the request is to be
    /// expired or replaced ([`expire`], [`replace_stale`]).
    Stale(Stale),
}

/// Why a decision is refused outright.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The request was already decided.
    #[error("the approval request is `{0}`")]
    NotPending(Status),
    /// The job no longer waits for an approval.
    #[error("the job is `{0}`, not awaiting approval")]
    NotAwaiting(JobState),
    /// The approver submitted the job: decisions on a job are never its submitter's.
    #[error("`{0}` submitted this job and cannot decide on it")]
    SelfApproval(String),
    /// The vote was not counted (the approver already approved).
    #[error(transparent)]
    Vote(VoteError),
}

/// An approver's decision (SPEC 7): refused unless the request is pending, the job awaits
/// approval and the approver is not the submitter (in that order); an approval whose binding
/// broke is [`Counted::Stale`]; otherwise the change, with its audit record, the job's event
/// when it decides the request, and (for an approval) the snapshot its commit must find active.
pub fn cast(c: Cast<'_>) -> Result<Counted, Refused> {
    let record = c.record;
    if record.request.status != Status::Pending {
        return Err(Refused::NotPending(record.request.status));
    }
    if c.job.state != JobState::AwaitingApproval {
        return Err(Refused::NotAwaiting(c.job.state));
    }
    if c.approver == record.request.requested_by {
        return Err(Refused::SelfApproval(c.approver.to_owned()));
    }
    let mut request = record.request.clone();
    match c.ballot {
        Ballot::Approve => {
            if let Err(stale) = c.binding {
                return Ok(Counted::Stale(stale));
            }
            let vote = approval::approve(&mut request, c.approver).map_err(Refused::Vote)?;
            let approvers = request.approvers.clone();
            let mut change = change(record, request, c.approver, c.at);
            change.decided_under = Some(c.snapshot_version);
            let remaining = match vote {
                Vote::QuorumReached => {
                    change.job_event = Some(Event::Approved);
                    change.audit.push(draft(
                        record,
                        c.approver,
                        c.at,
                        Kind::ApprovalApproved,
                        json!({"approvers": approvers}),
                    ));
                    0
                }
                Vote::Counted { remaining } => {
                    change.audit.push(draft(
                        record,
                        c.approver,
                        c.at,
                        Kind::ApprovalVote,
                        json!({"remaining": remaining}),
                    ));
                    remaining
                }
            };
            Ok(Counted::Change { change: Box::new(change), remaining: Some(remaining) })
        }
        Ballot::Reject { comment } => {
            approval::reject(&mut request, c.approver).map_err(Refused::Vote)?;
            let mut change = change(record, request, c.approver, c.at);
            change.job_event = Some(Event::Rejected);
            change.audit.push(draft(
                record,
                c.approver,
                c.at,
                Kind::ApprovalRejected,
                json!({"comment": comment}),
            ));
            Ok(Counted::Change { change: Box::new(change), remaining: None })
        }
    }
}

/// A pending request past its time, expired by the system; its job too, when `awaiting`
/// (the job still waits on this request).
pub fn expire(record: &ApprovalRecord, awaiting: bool, at: Millis) -> ApprovalChange {
    let request = Request { status: Status::Expired, ..record.request.clone() };
    let mut change = change(record, request, "system", at);
    change.job_event = awaiting.then_some(Event::ApprovalExpired);
    change.audit.push(draft(record, "system", at, Kind::ApprovalExpired, json!({})));
    change
}

/// A request whose binding broke (`stale`, other than its expiry), recorded as stale, and a
/// fresh request bound to the job as it is and to the snapshot that decided it again
/// (`decided`), opened as `replacement_id` for `ttl_ms`; the commit must find that snapshot
/// still active.
#[expect(clippy::too_many_arguments, reason = "each is a distinct input of the replacement")]
pub fn replace_stale(
    record: &ApprovalRecord,
    job: &JobRecord,
    stale: &Stale,
    decided: &Decided<'_>,
    replacement_id: ApprovalId,
    ttl_ms: Millis,
    at: Millis,
    actor: &str,
) -> ApprovalChange {
    let fresh = decided.request(job.to_policy_job().hash(), record.request.requested_by.clone(), at, ttl_ms);
    let replacement = ApprovalRecord::open(replacement_id, job.tenant.clone(), job.id.clone(), fresh);
    let request = Request { status: Status::Stale, ..record.request.clone() };
    let mut change = change(record, request, actor, at);
    change.decided_under = Some(decided.version);
    let data = json!({"reason": stale.to_string(), "replaced_by": replacement.id.as_str()});
    change.audit.push(draft(record, actor, at, Kind::ApprovalStale, data));
    change.replacement = Some(replacement);
    change
}

/// The change of `record` to `request` by `actor`, expecting the request as it was read.
fn change(record: &ApprovalRecord, request: Request, actor: &str, at: Millis) -> ApprovalChange {
    ApprovalChange {
        tenant: record.tenant.clone(),
        id: record.id.clone(),
        expected_status: record.request.status,
        expected_approvers: record.request.approvers.len(),
        request,
        job_event: None,
        replacement: None,
        audit: Vec::new(),
        at,
        actor: actor.to_owned(),
        decided_under: None,
    }
}

/// An audit record about the request (its subject), naming its job.
fn draft(record: &ApprovalRecord, actor: &str, at: Millis, kind: Kind, data: Value) -> Draft {
    let mut full = json!({"job_id": record.job_id.as_str()});
    merge(&mut full, data);
    Draft { at, kind, subject: record.id.as_str().to_owned(), actor: actor.to_owned(), data: full }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing, reason = "a test fails by panicking")]

    use super::*;

    const POLICY: &str = "version: v1\nrules:\n  - id: del\n    when: { topic: t }\n    decision: require_human\n    approvals: 2\n";

    fn job() -> JobRecord {
        crate::moves::tests::job(JobState::AwaitingApproval)
    }

    fn request(j: &JobRecord) -> ApprovalRecord {
        let (policy, _) = airlock_policy::compile(POLICY).unwrap();
        let evaluation = policy.evaluate(&j.to_policy_job());
        let decided = Decided { policy: &policy, version: 1, evaluation: &evaluation, plan: None };
        let request = decided.request(j.to_policy_job().hash(), "agent".into(), 1, 1_000);
        ApprovalRecord::open(ApprovalId::generate(1, [2; 10]), j.tenant.clone(), j.id.clone(), request)
    }

    fn cast_by<'a>(
        record: &'a ApprovalRecord,
        j: &'a JobRecord,
        who: &'a str,
        ballot: Ballot<'a>,
    ) -> Cast<'a> {
        Cast { record, job: j, ballot, approver: who, binding: Ok(()), snapshot_version: 4, at: 50 }
    }

    #[test]
    fn votes_count_to_the_quorum_under_the_snapshot_they_were_checked_under() {
        let j = job();
        let mut record = request(&j);
        let Counted::Change { change, remaining } =
            cast(cast_by(&record, &j, "alice", Ballot::Approve)).unwrap()
        else {
            panic!("counted")
        };
        assert_eq!((remaining, change.job_event, change.decided_under), (Some(1), None, Some(4)));
        assert_eq!(change.audit[0].kind, Kind::ApprovalVote);
        assert_eq!(change.audit[0].data["job_id"], j.id.as_str());
        record.request = change.request;
        assert_eq!(
            cast(cast_by(&record, &j, "alice", Ballot::Approve)).unwrap_err(),
            Refused::Vote(VoteError::AlreadyApproved("alice".into()))
        );
        let Counted::Change { change, remaining } =
            cast(cast_by(&record, &j, "bob", Ballot::Approve)).unwrap()
        else {
            panic!("counted")
        };
        assert_eq!((remaining, change.job_event), (Some(0), Some(Event::Approved)));
        assert_eq!((change.request.status, change.expected_approvers), (Status::Approved, 1));
    }

    #[test]
    fn decisions_are_refused_in_order_and_never_the_submitters() {
        let mut j = job();
        let mut record = request(&j);
        assert_eq!(
            cast(cast_by(&record, &j, "agent", Ballot::Reject { comment: None })).unwrap_err(),
            Refused::SelfApproval("agent".into())
        );
        j.state = JobState::Cancelled;
        assert_eq!(
            cast(cast_by(&record, &j, "agent", Ballot::Approve)).unwrap_err(),
            Refused::NotAwaiting(JobState::Cancelled)
        );
        record.request.status = Status::Rejected;
        assert_eq!(
            cast(cast_by(&record, &j, "agent", Ballot::Approve)).unwrap_err(),
            Refused::NotPending(Status::Rejected)
        );
    }

    #[test]
    fn a_broken_binding_stops_an_approval_but_not_a_rejection() {
        let j = job();
        let record = request(&j);
        let stale = || Err(Stale::Expired);
        let approve = Cast { binding: stale(), ..cast_by(&record, &j, "bob", Ballot::Approve) };
        assert!(matches!(cast(approve), Ok(Counted::Stale(Stale::Expired))));
        let reject =
            Cast { binding: stale(), ..cast_by(&record, &j, "bob", Ballot::Reject { comment: Some("no") }) };
        let Ok(Counted::Change { change, remaining: None }) = cast(reject) else { panic!("a rejection") };
        assert_eq!((change.job_event, change.decided_under), (Some(Event::Rejected), None));
        assert_eq!(change.audit[0].data["comment"], "no");
    }

    #[test]
    fn expiry_and_replacement_are_the_systems_and_the_snapshots() {
        let j = job();
        let record = request(&j);
        let expiry = expire(&record, false, 70);
        assert_eq!(
            (expiry.request.status, expiry.job_event, expiry.actor.as_str()),
            (Status::Expired, None, "system")
        );
        assert_eq!(expire(&record, true, 70).job_event, Some(Event::ApprovalExpired));

        let (policy, _) = airlock_policy::compile(POLICY).unwrap();
        let evaluation = policy.evaluate(&j.to_policy_job());
        let decided = Decided { policy: &policy, version: 9, evaluation: &evaluation, plan: None };
        let stale = Stale::Expired;
        let id = ApprovalId::generate(80, [5; 10]);
        let change = replace_stale(&record, &j, &stale, &decided, id.clone(), 1_000, 80, "bob");
        let fresh = change.replacement.as_ref().unwrap();
        assert_eq!((&fresh.id, fresh.request.created_at, fresh.request.quorum), (&id, 80, 2));
        assert_eq!(fresh.request.requested_by, "agent", "still the submitter's request");
        assert_eq!((change.request.status, change.decided_under), (Status::Stale, Some(9)));
        assert_eq!(change.audit[0].data["replaced_by"], id.as_str());
    }
}
