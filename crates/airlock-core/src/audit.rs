//! The audit trail: one append-only hash chain per tenant. Each record holds the previous
//! record's hash, and its own hash covers its content and that link, so editing, deleting or
//! reordering any record breaks verification from that point on.

use serde_json::{Value, json};

use crate::Millis;

/// The `prev_hash` of a tenant's first record.
pub const GENESIS: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000000";

/// What an audit record says happened. Stored, hashed and shown as its dotted name
/// ([`Kind::as_str`]), which never changes once released: the hash chain covers it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Gate A decided a submit (allow, throttle, require_human; a deny is audited too).
    GateADecision,
    /// Gate A could not reach the safety check and applied the fail mode.
    GateAUnavailable,
    /// A job was accepted and stored.
    JobSubmitted,
    /// A job changed state outside a gate decision (expiry, cancel, retry, dead letter).
    JobTransition,
    /// Gate B decided a dispatch.
    GateBDecision,
    /// Gate B's throttle held a dispatch back.
    GateBThrottled,
    /// No worker took a job's topic; the attempt was counted.
    SchedulerNoWorker,
    /// An approval request reached its quorum.
    ApprovalApproved,
    /// One approver's vote, short of the quorum.
    ApprovalVote,
    /// An approval request was rejected.
    ApprovalRejected,
    /// A vote was refused: the binding no longer holds.
    ApprovalStale,
    /// An approval request outlived its TTL.
    ApprovalExpired,
    /// An API key was created.
    KeyCreated,
    /// An API key was revoked.
    KeyRevoked,
    /// A platform admin key was minted offline (`airlock admin recover`).
    KeyRecovered,
    /// A fault was injected into the safety check (testing fail modes).
    SafetyFaultInjected,
    /// A policy snapshot was published (or rolled back to).
    PolicyPublished,
    /// A dead-letter entry was discarded.
    DlqDiscarded,
}

impl Kind {
    /// Every kind, in declaration order.
    pub const ALL: [Kind; 18] = [
        Kind::GateADecision,
        Kind::GateAUnavailable,
        Kind::JobSubmitted,
        Kind::JobTransition,
        Kind::GateBDecision,
        Kind::GateBThrottled,
        Kind::SchedulerNoWorker,
        Kind::ApprovalApproved,
        Kind::ApprovalVote,
        Kind::ApprovalRejected,
        Kind::ApprovalStale,
        Kind::ApprovalExpired,
        Kind::KeyCreated,
        Kind::KeyRevoked,
        Kind::KeyRecovered,
        Kind::SafetyFaultInjected,
        Kind::PolicyPublished,
        Kind::DlqDiscarded,
    ];

    /// The dotted name, e.g. `gate_a.decision`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::GateADecision => "gate_a.decision",
            Kind::GateAUnavailable => "gate_a.unavailable",
            Kind::JobSubmitted => "job.submitted",
            Kind::JobTransition => "job.transition",
            Kind::GateBDecision => "gate_b.decision",
            Kind::GateBThrottled => "gate_b.throttled",
            Kind::SchedulerNoWorker => "scheduler.no_worker",
            Kind::ApprovalApproved => "approval.approved",
            Kind::ApprovalVote => "approval.vote",
            Kind::ApprovalRejected => "approval.rejected",
            Kind::ApprovalStale => "approval.stale",
            Kind::ApprovalExpired => "approval.expired",
            Kind::KeyCreated => "key.created",
            Kind::KeyRevoked => "key.revoked",
            Kind::KeyRecovered => "key.recovered",
            Kind::SafetyFaultInjected => "safety.fault_injected",
            Kind::PolicyPublished => "policy.published",
            Kind::DlqDiscarded => "dlq.discarded",
        }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A stored kind this version of Airlock does not know.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown audit record kind `{0}`")]
pub struct UnknownKind(pub String);

impl std::str::FromStr for Kind {
    type Err = UnknownKind;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Kind::ALL.into_iter().find(|k| k.as_str() == text).ok_or_else(|| UnknownKind(text.to_owned()))
    }
}

/// An audit record before it is linked into a chain.
#[derive(Clone, Debug, PartialEq)]
pub struct Draft {
    /// When it happened.
    pub at: Millis,
    /// What happened.
    pub kind: Kind,
    /// What it happened to: a job, approval, snapshot or key id.
    pub subject: String,
    /// Who did it: a principal, or `system`.
    pub actor: String,
    /// The details, as JSON.
    pub data: Value,
}

/// A linked record.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    /// The tenant whose chain this is.
    pub tenant: String,
    /// Position in the chain, from 1.
    pub seq: u64,
    /// The content.
    pub draft: Draft,
    /// The previous record's hash ([`GENESIS`] for the first).
    pub prev_hash: String,
    /// This record's hash.
    pub hash: String,
}

/// The hash of a record's content and link.
pub fn hash(tenant: &str, seq: u64, draft: &Draft, prev_hash: &str) -> String {
    let canonical = json!({
        "tenant": tenant,
        "seq": seq,
        "at": draft.at,
        "kind": draft.kind.as_str(),
        "subject": draft.subject,
        "actor": draft.actor,
        "data": draft.data,
        "prev_hash": prev_hash,
    });
    airlock_policy::job::sha256_tagged(&airlock_policy::jcs::to_vec(&canonical))
}

/// Links `draft` after the chain head `(seq, hash)` (`None` for an empty chain).
pub fn seal(tenant: &str, head: Option<(u64, &str)>, draft: Draft) -> Record {
    let (seq, prev_hash) = match head {
        Some((seq, hash)) => (seq + 1, hash.to_owned()),
        None => (1, GENESIS.to_owned()),
    };
    let hash = hash(tenant, seq, &draft, &prev_hash);
    Record { tenant: tenant.to_owned(), seq, draft, prev_hash, hash }
}

/// Where and why a chain stopped verifying.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("audit chain of `{tenant}` broken at record {seq}: {reason}")]
pub struct Broken {
    /// The tenant.
    pub tenant: String,
    /// The first record that does not verify (or where one is missing).
    pub seq: u64,
    /// What is wrong.
    pub reason: String,
}

/// Verifies a tenant's records in sequence order against the stored chain head. Returns the
/// number of records verified.
pub fn verify<'a>(
    tenant: &str,
    records: impl IntoIterator<Item = &'a Record>,
    head: Option<(u64, &str)>,
) -> Result<u64, Broken> {
    let broken = |seq: u64, reason: String| Broken { tenant: tenant.to_owned(), seq, reason };
    let mut expected_seq = 1u64;
    let mut prev = GENESIS.to_owned();
    for record in records {
        if record.seq != expected_seq {
            return Err(broken(
                expected_seq,
                format!("expected record {expected_seq}, found {}", record.seq),
            ));
        }
        if record.prev_hash != prev {
            return Err(broken(record.seq, "its link does not match the previous record's hash".into()));
        }
        if hash(tenant, record.seq, &record.draft, &record.prev_hash) != record.hash {
            return Err(broken(record.seq, "its content does not match its hash".into()));
        }
        prev = record.hash.clone();
        expected_seq += 1;
    }
    let count = expected_seq - 1;
    match head {
        None if count == 0 => Ok(0),
        Some((seq, hash)) if seq == count && hash == prev => Ok(count),
        Some((seq, _)) => {
            Err(broken(count + 1, format!("the chain head is record {seq}, but {count} record(s) verify")))
        }
        None => Err(broken(1, "records exist but the chain has no head".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: u64) -> Vec<Record> {
        let mut out: Vec<Record> = Vec::new();
        for i in 0..n {
            let head = out.last().map(|r| (r.seq, r.hash.as_str()));
            let draft = Draft {
                at: i as i64,
                kind: Kind::JobTransition,
                subject: format!("job_{i}"),
                actor: "system".into(),
                data: json!({"to": "queued"}),
            };
            let record = seal("acme", head, draft);
            out.push(record);
        }
        out
    }

    fn head(records: &[Record]) -> Option<(u64, &str)> {
        records.last().map(|r| (r.seq, r.hash.as_str()))
    }

    #[test]
    fn an_untouched_chain_verifies() {
        let records = chain(5);
        assert_eq!(verify("acme", &records, head(&records)), Ok(5));
        assert_eq!(verify("acme", &[], None), Ok(0));
    }

    #[test]
    fn edits_deletions_reorders_and_truncation_are_detected() {
        let records = chain(5);
        let h = head(&records);

        let mut edited = records.clone();
        edited[2].draft.data = json!({"to": "succeeded"});
        assert_eq!(verify("acme", &edited, h).unwrap_err().seq, 3);

        let mut deleted = records.clone();
        deleted.remove(1);
        assert_eq!(verify("acme", &deleted, h).unwrap_err().seq, 2);

        let mut reordered = records.clone();
        reordered.swap(1, 2);
        assert_eq!(verify("acme", &reordered, h).unwrap_err().seq, 2);

        let truncated = &records[..4];
        assert!(verify("acme", truncated, h).is_err());

        assert!(verify("other-tenant", &records, h).is_err(), "the tenant is part of every hash");
    }

    #[test]
    fn kinds_round_trip_by_name_and_unknown_names_are_refused() {
        let names: std::collections::HashSet<&str> = Kind::ALL.iter().map(|k| k.as_str()).collect();
        assert_eq!(names.len(), Kind::ALL.len(), "two kinds share a name");
        for kind in Kind::ALL {
            assert_eq!(kind.as_str().parse::<Kind>(), Ok(kind));
        }
        assert_eq!("gate_c.decision".parse::<Kind>(), Err(UnknownKind("gate_c.decision".into())));
    }
}
