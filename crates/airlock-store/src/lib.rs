//! The store: every durable fact of Airlock (keys, snapshots, jobs and their history,
//! approvals, idempotency keys, throttle budgets, the audit chain) behind one trait, so that
//! the gateway and scheduler run unchanged on the embedded SQLite file or on PostgreSQL
//! ([`PgStore`]). Implementations keep each operation atomic: a submit's job, approval request,
//! idempotency key, budget and audit record are committed together or not at all.

mod codec;
mod pg_tls;
mod postgres;
mod sqlite;

use std::collections::BTreeMap;

use airlock_core::Millis;
use airlock_core::approval::Status;
use airlock_core::audit::{Draft, Record};
use airlock_core::breaker::{Admission, BreakerConfig, BreakerState};
use airlock_core::ids::{ApprovalId, JobId, KeyId, TenantId};
use airlock_core::role::Roles;
use airlock_core::state::{InvalidTransition, JobState};

pub use airlock_core::moves::{ApprovalChange, Move, Submission};
pub use airlock_core::record::{ApprovalRecord, Budget, DispatchState, GateDecision, JobRecord, Lease};
pub use codec::Applied;
pub use postgres::PgStore;
pub use sqlite::{DATABASE_FILE, SqliteStore};

/// What can go wrong in the store, by what the caller can do about it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The object does not exist (or belongs to another tenant).
    #[error("not found")]
    NotFound,
    /// A state change the job's lifecycle does not allow.
    #[error(transparent)]
    InvalidTransition(#[from] InvalidTransition),
    /// Someone else changed the object first; read it again and retry.
    #[error("conflict: {0}")]
    Conflict(String),
    /// The store cannot serve now; retrying later may work.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// Stored data is not what this version of Airlock expects.
    #[error("corrupt stored data: {0}")]
    Corrupt(String),
    /// The write was decided under a policy snapshot that is no longer the active one: nothing
    /// was written; decide again under the active snapshot.
    #[error("the decision was made under a superseded snapshot; version {active} is active")]
    Stale {
        /// The active snapshot's version at the commit.
        active: u64,
    },
}

/// An API key as stored: never the secret, only its hash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyRecord {
    /// The public id, also the first part of the key.
    pub id: KeyId,
    /// The tenant the key acts in.
    pub tenant: TenantId,
    /// The key's name; unique within its tenant.
    pub name: String,
    /// What it may do.
    pub roles: Roles,
    /// SHA-256 of the secret part.
    pub secret_hash: [u8; 32],
    /// When it was created.
    pub created_at: Millis,
    /// When it was revoked, if it was.
    pub revoked_at: Option<Millis>,
    /// The person the key authenticates as, when it is not the name: one person may hold several
    /// keys, and quorum and self-approval compare principals (SPEC 7).
    pub principal: Option<String>,
}

impl KeyRecord {
    /// Whether the key is a live admin of the platform tenant: the keys of which at least one
    /// must remain, so that nobody can lock every administrator out.
    pub fn is_live_platform_admin(&self) -> bool {
        self.revoked_at.is_none()
            && self.tenant.as_str() == TenantId::PLATFORM
            && self.roles.allows(airlock_core::role::Role::Admin)
    }

    /// The principal the key authenticates as: its `principal`, or else its name.
    pub fn principal(&self) -> &str {
        self.principal.as_deref().unwrap_or(&self.name)
    }
}

/// A published policy version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotRecord {
    /// 1, 2, 3, … in publish order.
    pub version: u64,
    /// The snapshot hash.
    pub hash: String,
    /// The policy text as published.
    pub source: String,
    /// When it was published.
    pub created_at: Millis,
    /// Who published it.
    pub created_by: String,
    /// Why, e.g. `rollback to version 2`.
    pub note: Option<String>,
    /// Whether it is the active snapshot.
    pub active: bool,
}

/// One step of a job's history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    /// Position in the job's history, from 1.
    pub seq: u32,
    /// The state before (`None` for creation).
    pub from: Option<JobState>,
    /// The state after.
    pub to: JobState,
    /// When.
    pub at: Millis,
    /// Who or what caused it.
    pub actor: String,
    /// Why.
    pub reason: String,
}

/// A remembered accepted submission.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdempotencyRecord {
    /// The job hash it was accepted with.
    pub job_hash: String,
    /// The job it created.
    pub job_id: JobId,
    /// The HTTP status that was returned.
    pub status: u16,
    /// The body that was returned.
    pub body: String,
    /// When.
    pub created_at: Millis,
}

/// What became of a submission.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SubmitOutcome {
    /// Stored.
    Accepted,
    /// The idempotency key was already used with the same job hash: the original response.
    Replay(IdempotencyRecord),
    /// The idempotency key was already used with a different job hash.
    KeyReused(IdempotencyRecord),
    /// A budget refused; nothing was stored but an audit record.
    Throttled {
        /// When a token will be available.
        retry_after_ms: u64,
    },
}

/// Filters for listing jobs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JobFilter {
    /// Only jobs in this state.
    pub state: Option<JobState>,
    /// Only jobs with this topic.
    pub topic: Option<String>,
    /// Only jobs in this env.
    pub env: Option<String>,
    /// Only jobs with an id after this one (pagination cursor).
    pub after: Option<JobId>,
    /// Only jobs created at or after this time.
    pub since: Option<Millis>,
    /// Only jobs created before this time.
    pub until: Option<Millis>,
    /// At most this many.
    pub limit: u32,
}

/// What became of a dispatch.
#[derive(Clone, Debug, PartialEq)]
pub enum DispatchOutcome {
    /// Applied; the job as it is now.
    Applied(Box<JobRecord>),
    /// A Gate B budget refused the lease; the job was requeued, uncounted, until it refills.
    Throttled {
        /// When a token will be available.
        retry_after_ms: u64,
    },
    /// The job was no longer queued (claimed, cancelled or changed by someone else).
    Gone,
}

/// What a heartbeat found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Heartbeat {
    /// The lease runs until then.
    Extended {
        /// The new expiry.
        expires_at: Millis,
    },
    /// The job was cancelled: stop work.
    Cancelled,
}

/// Something another process did that this one should act on now rather than at its next poll.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreEvent {
    /// A job became dispatchable (submitted, approved, requeued, retried).
    Work,
    /// A snapshot was published or rolled back.
    Policy,
    /// An API key was revoked.
    Keys,
}

/// Audit records for a caller to page through.
#[derive(Clone, Debug, Default)]
pub struct AuditPage {
    /// Records in chain order.
    pub records: Vec<Record>,
    /// The chain head: last sequence number and hash.
    pub head: Option<(u64, String)>,
}

/// One tenant's figures at a glance (the console's overview and inbox header).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TenantOverview {
    /// Jobs per state.
    pub jobs: BTreeMap<JobState, u64>,
    /// Pending approval requests, counted exactly.
    pub pending_approvals: u64,
    /// When the oldest pending request was made.
    pub oldest_pending_at: Option<Millis>,
    /// Dead-lettered jobs not discarded.
    pub dlq_depth: u64,
    /// Submissions Gate A accepted with the safety check unavailable (fail open), since the
    /// time asked for.
    pub fail_open_gate_a: u64,
    /// Dispatches Gate B let through with the safety check unavailable, since the time asked for.
    pub fail_open_gate_b: u64,
}

/// A tenant's pending approval requests in a few numbers: any change to the inbox changes at
/// least one of them. A new request is the newest; a resolution lowers the count unless a new
/// request arrived too, which changes the newest; a vote changes the votes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApprovalSummary {
    /// Pending requests.
    pub pending: u64,
    /// When the oldest pending request was made.
    pub oldest_created_at: Option<Millis>,
    /// The newest pending request.
    pub newest_id: Option<ApprovalId>,
    /// Votes cast on pending requests.
    pub votes: u64,
}

/// How far out of time order audit records of one tenant may be appended (each is stamped when
/// its decision is made, just before its commit): a search for "records since T" by sequence
/// number starts at the first record stamped at or after T minus this.
pub const AUDIT_ORDER_SLACK_MS: Millis = 60_000;

/// What marks a fail-open decision in an audit record's data (as stored: compact JSON).
pub const FAIL_OPEN_MARKS: [&str; 2] = ["%\"gate_a_bypassed\":true%", "%\"gate_b_bypassed\":true%"];
/// The conflict message of revoking the last live platform admin key.
pub const LAST_PLATFORM_ADMIN: &str = "the last platform admin key cannot be revoked; create another first";

/// Every durable operation Airlock needs. One of the two I/O seams (the other is the bus).
#[async_trait::async_trait]
pub trait Store: Send + Sync {
    /// Creates a key and audits it in the key's tenant.
    async fn create_key(&self, key: KeyRecord, audit: Draft) -> Result<(), StoreError>;
    /// A key by id, revoked or not.
    async fn key(&self, id: &KeyId) -> Result<Option<KeyRecord>, StoreError>;
    /// A key by the SHA-256 of its secret, revoked or not: how requests authenticate.
    async fn key_by_secret(&self, secret_hash: &[u8; 32]) -> Result<Option<KeyRecord>, StoreError>;
    /// Keys, of one tenant or all.
    async fn keys(&self, tenant: Option<&TenantId>) -> Result<Vec<KeyRecord>, StoreError>;
    /// Replaces a key's stored hash `from` with `to` (a key re-hashed with the server's
    /// pepper); `NotFound` when the key no longer has `from`.
    async fn rehash_key(&self, id: &KeyId, from: &[u8; 32], to: &[u8; 32]) -> Result<(), StoreError>;
    /// Revokes a key; `NotFound` when it does not exist or is already revoked, and
    /// [`StoreError::Conflict`] with [`LAST_PLATFORM_ADMIN`] when it is the last live platform
    /// admin key (checked in the revoking transaction, so two concurrent revocations of the last
    /// two cannot both pass).
    async fn revoke_key(&self, id: &KeyId, at: Millis, audit: Draft) -> Result<KeyRecord, StoreError>;

    /// Publishes a policy as the next version and makes it active.
    async fn publish(
        &self,
        hash: &str,
        source: &str,
        note: Option<&str>,
        at: Millis,
        actor: &str,
    ) -> Result<SnapshotRecord, StoreError>;
    /// The active snapshot, if any was ever published.
    async fn active_snapshot(&self) -> Result<Option<SnapshotRecord>, StoreError>;
    /// Every snapshot, newest first.
    async fn snapshots(&self) -> Result<Vec<SnapshotRecord>, StoreError>;
    /// One snapshot.
    async fn snapshot(&self, version: u64) -> Result<Option<SnapshotRecord>, StoreError>;

    /// The remembered response for an idempotency key, if it is within retention.
    async fn idempotency(
        &self,
        tenant: &TenantId,
        key: &str,
        retained_since: Millis,
    ) -> Result<Option<IdempotencyRecord>, StoreError>;
    /// Stores an admitted submission atomically: re-checks the idempotency key, takes every
    /// budget, writes the job, approval request, key and audit record.
    async fn submit(
        &self,
        submission: Submission,
        retained_since: Millis,
    ) -> Result<SubmitOutcome, StoreError>;
    /// Appends an audit record alone (denied, throttled, unavailable). With `decided_under`,
    /// only if that snapshot version is still the active one ([`StoreError::Stale`] otherwise).
    async fn append_audit(
        &self,
        tenant: &TenantId,
        draft: Draft,
        decided_under: Option<u64>,
    ) -> Result<(), StoreError>;

    /// A job of a tenant.
    async fn job(&self, tenant: &TenantId, id: &JobId) -> Result<Option<JobRecord>, StoreError>;
    /// Jobs of a tenant, by id.
    async fn jobs(&self, tenant: &TenantId, filter: &JobFilter) -> Result<Vec<JobRecord>, StoreError>;
    /// A job's history, oldest first.
    async fn history(&self, tenant: &TenantId, id: &JobId) -> Result<Vec<Transition>, StoreError>;
    /// Per topic of a tenant: accepted submissions, and how many carried no idempotency key
    /// (the release-gate report of SPEC 8), by topic.
    async fn idempotency_report(&self, tenant: &TenantId) -> Result<Vec<(String, u64, u64)>, StoreError>;
    /// Counts of jobs per state, across tenants.
    async fn job_counts(&self) -> Result<BTreeMap<JobState, u64>, StoreError>;
    /// One tenant's figures; fail-open counts are those recorded at or after `since`.
    async fn overview(&self, tenant: &TenantId, since: Millis) -> Result<TenantOverview, StoreError>;

    /// An approval request of a tenant.
    async fn approval(
        &self,
        tenant: &TenantId,
        id: &ApprovalId,
    ) -> Result<Option<ApprovalRecord>, StoreError>;
    /// Approval requests of a tenant, optionally by status, by id.
    async fn approvals(
        &self,
        tenant: &TenantId,
        status: Option<Status>,
        after: Option<&ApprovalId>,
        limit: u32,
    ) -> Result<Vec<ApprovalRecord>, StoreError>;
    /// A tenant's pending requests in a few numbers.
    async fn approval_summary(&self, tenant: &TenantId) -> Result<ApprovalSummary, StoreError>;
    /// Pending requests across tenants.
    async fn pending_approvals(&self) -> Result<u64, StoreError>;
    /// Pending requests past their expiry, across tenants.
    async fn expired_approvals(&self, now: Millis, limit: u32) -> Result<Vec<ApprovalRecord>, StoreError>;
    /// Applies a decided change to a request, and to its job, atomically.
    async fn change_approval(&self, change: ApprovalChange) -> Result<ApprovalRecord, StoreError>;

    /// The oldest queued job of a tenant whose `not_before` has passed and that no claim holds,
    /// now held by the caller for `hold_ms`: until then no other `hold_next` (of any process on
    /// this store) returns it, so claims never run Gate B on the same job. A hold needs no
    /// release: dispatching the job ends it, and a claimer that died leaves it to lapse.
    async fn hold_next(
        &self,
        tenant: &TenantId,
        now: Millis,
        hold_ms: u64,
    ) -> Result<Option<JobRecord>, StoreError>;

    /// Queued jobs of a tenant whose `not_before` has passed, oldest first, skipping `offset`.
    async fn dispatchable(
        &self,
        tenant: &TenantId,
        now: Millis,
        offset: u32,
        limit: u32,
    ) -> Result<Vec<JobRecord>, StoreError>;
    /// The earliest `not_before` later than `now` of the tenant's queued jobs: when one becomes
    /// dispatchable with nothing announcing it (a backoff or a throttle delay ending), so that a
    /// claim with nothing to lease sleeps until then instead of polling.
    async fn next_due(&self, tenant: &TenantId, now: Millis) -> Result<Option<Millis>, StoreError>;

    /// Commits a move of the job it names (Gate B's dispatch, a worker's or the sweep's end of
    /// an attempt, a cancellation, an operator's retry or discard), atomically: locks and loads
    /// the job, checks the move's precondition and, in the same transaction, that the snapshot
    /// it was decided under is still the active one ([`StoreError::Stale`] otherwise), takes its
    /// budgets (a refusal commits [`Move::throttled`] instead), and writes the changed fields,
    /// the history step, the approval requests and the audit records. A claim's hold on the
    /// job ends with it.
    async fn apply(&self, mv: Move) -> Result<Applied, StoreError>;
    /// Extends, at `now`, a lease held under `token` until `expires_at`; `Conflict` when the
    /// token is not the live lease's or the lease lapsed before `now`.
    async fn heartbeat(
        &self,
        tenant: &TenantId,
        id: &JobId,
        token: &str,
        now: Millis,
        expires_at: Millis,
    ) -> Result<Heartbeat, StoreError>;
    /// Leased jobs whose lease lapsed before `now`, across tenants.
    async fn lapsed_leases(&self, now: Millis, limit: u32) -> Result<Vec<JobRecord>, StoreError>;
    /// Dead-lettered jobs of a tenant not yet discarded, by id.
    async fn dead_letters(
        &self,
        tenant: &TenantId,
        topic: Option<&str>,
        after: Option<&JobId>,
        limit: u32,
    ) -> Result<Vec<JobRecord>, StoreError>;
    /// Dead-lettered jobs not discarded, across tenants.
    async fn dlq_depth(&self) -> Result<u64, StoreError>;

    /// Notifications from other processes sharing this store, when the store has them (the
    /// embedded store serves one process and has none). Missing one only delays: every
    /// process also polls.
    fn events(&self) -> Option<tokio::sync::broadcast::Receiver<StoreEvent>> {
        None
    }

    /// Up to `limit` rows of the transactional outbox, oldest first, as `(id, tenant, job_id)`:
    /// wake-ups owed to the job bus for jobs that became queued. The rows stay until
    /// [`Store::outbox_done`], and are this caller's for a few seconds: other relays skip them
    /// until then. The embedded store has no outbox (and no bus) and returns none.
    async fn outbox_take(&self, limit: u32) -> Result<Vec<(i64, String, String)>, StoreError> {
        let _ = limit;
        Ok(Vec::new())
    }

    /// Deletes outbox rows whose wake-ups the bus acknowledged.
    async fn outbox_done(&self, ids: &[i64]) -> Result<(), StoreError> {
        let _ = ids;
        Ok(())
    }

    /// Deletes outbox rows older than `before`: a wake-up nobody relayed is worthless once
    /// every claim has polled past it, and without a bus nobody relays them.
    async fn outbox_prune(&self, before: Millis) -> Result<u64, StoreError> {
        let _ = before;
        Ok(0)
    }

    /// The circuit breaker shared by every process on this store: asks it to admit a call at
    /// `now`, atomically (so that replicas together let at most `config.probes` probes through).
    async fn breaker_admit(&self, config: BreakerConfig, now: Millis) -> Result<Admission, StoreError>;
    /// Reports an admitted call's outcome to the shared breaker; its state after.
    async fn breaker_report(
        &self,
        config: BreakerConfig,
        now: Millis,
        success: bool,
    ) -> Result<BreakerState, StoreError>;
    /// The shared breaker's state as of `now`.
    async fn breaker_state(&self, now: Millis) -> Result<BreakerState, StoreError>;

    /// A tenant's audit records after `after_seq`, and the chain head.
    async fn audit(&self, tenant: &TenantId, after_seq: u64, limit: u32) -> Result<AuditPage, StoreError>;
    /// The audit records about one job (its submit, every gate decision, every transition) and
    /// its approval requests (votes, rejection, staleness, expiry), in chain order, at most
    /// `limit`.
    async fn job_audit(&self, tenant: &TenantId, id: &JobId, limit: u32) -> Result<Vec<Record>, StoreError>;
    /// Tenants with an audit chain.
    async fn audit_tenants(&self) -> Result<Vec<TenantId>, StoreError>;
}
