//! The semantics the gates rely on, written once against `dyn Store`: transactional submit,
//! idempotency conflicts, all-or-nothing budgets, the lifecycle table, optimistic approval
//! changes, the audit chain, and durability across a reopen. Every store implementation must
//! pass these: the embedded SQLite store always, and PostgreSQL on a fresh schema per test at
//! `AIRLOCK_TEST_POSTGRES_URL` (default `postgres://postgres@127.0.0.1:5432/test`). Outside CI
//! an unreachable PostgreSQL skips with a notice; with `CI=true` it fails the test.

#![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic, reason = "a test fails by panicking")]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU32, Ordering};

use airlock_core::approval::{Request, Status};
use airlock_core::audit::{self, Draft, Kind};
use airlock_core::ids::{ApprovalId, JobId, KeyId, TenantId};
use airlock_core::moves::{
    Dispatch, DispatchAction, Finish, LeaseCheck, plan_approval_change, plan_discard, plan_dispatch,
    plan_finish, plan_operator_retry, plan_transition,
};
use airlock_core::role::{Role, Roles};
use airlock_core::state::{Event, JobState};
use airlock_policy::{Decision, Limit, LimitKey};
use airlock_store::{
    Applied, ApprovalChange, ApprovalRecord, Budget, DispatchOutcome, DispatchState, GateDecision, JobFilter,
    JobRecord, KeyRecord, Lease, PgStore, SqliteStore, Store, StoreError, Submission, SubmitOutcome,
};
use serde_json::json;

static NEXT: AtomicU8 = AtomicU8::new(1);

/// The moves the tests below make most, each planned by the core and given to
/// [`Store::apply`], as the server's handlers do.
trait Moves {
    async fn dispatch(&self, d: Dispatch) -> Result<DispatchOutcome, StoreError>;
    #[expect(clippy::too_many_arguments, reason = "the parts of a fenced finish")]
    async fn finish(
        &self,
        t: &TenantId,
        id: &JobId,
        token: &str,
        live_at: Option<i64>,
        finish: Finish,
        at: i64,
        actor: &str,
    ) -> Result<JobRecord, StoreError>;
    async fn transition(
        &self,
        t: &TenantId,
        id: &JobId,
        event: Event,
        at: i64,
        actor: &str,
        reason: &str,
    ) -> Result<JobRecord, StoreError>;
    async fn retry_dead_letter(
        &self,
        t: &TenantId,
        id: &JobId,
        at: i64,
        actor: &str,
    ) -> Result<JobRecord, StoreError>;
    async fn discard_dead_letter(
        &self,
        t: &TenantId,
        id: &JobId,
        at: i64,
        actor: &str,
    ) -> Result<JobRecord, StoreError>;
}

impl Moves for Arc<dyn Store> {
    async fn dispatch(&self, d: Dispatch) -> Result<DispatchOutcome, StoreError> {
        self.apply(plan_dispatch(d)).await?.dispatched()
    }

    async fn finish(
        &self,
        t: &TenantId,
        id: &JobId,
        token: &str,
        live_at: Option<i64>,
        finish: Finish,
        at: i64,
        actor: &str,
    ) -> Result<JobRecord, StoreError> {
        let lease = LeaseCheck { token: token.into(), live_at };
        self.apply(plan_finish(t.clone(), id.clone(), lease, finish, at, actor.into())).await?.finished()
    }

    async fn transition(
        &self,
        t: &TenantId,
        id: &JobId,
        event: Event,
        at: i64,
        actor: &str,
        reason: &str,
    ) -> Result<JobRecord, StoreError> {
        self.apply(plan_transition(t.clone(), id.clone(), event, at, actor.into(), reason.into()))
            .await?
            .finished()
    }

    async fn retry_dead_letter(
        &self,
        t: &TenantId,
        id: &JobId,
        at: i64,
        actor: &str,
    ) -> Result<JobRecord, StoreError> {
        let job = self.job(t, id).await?.ok_or(StoreError::NotFound)?;
        self.apply(plan_operator_retry(&job, at, actor.into())).await?.finished()
    }

    async fn discard_dead_letter(
        &self,
        t: &TenantId,
        id: &JobId,
        at: i64,
        actor: &str,
    ) -> Result<JobRecord, StoreError> {
        let job = self.job(t, id).await?.ok_or(StoreError::NotFound)?;
        self.apply(plan_discard(&job, at, actor.into())).await?.finished()
    }
}

fn random() -> [u8; 10] {
    [NEXT.fetch_add(1, Ordering::Relaxed); 10]
}

fn temp_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "airlock-store-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

static SCHEMAS: AtomicU32 = AtomicU32::new(1);

/// A fresh PostgreSQL schema for one test, dropped with this guard.
struct PgSchema {
    base: String,
    name: String,
}

impl PgSchema {
    /// `None` (with a notice) when PostgreSQL is unreachable outside CI; in CI, a failure.
    async fn create() -> Option<Self> {
        let base = std::env::var("AIRLOCK_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
        let connected = tokio_postgres::connect(&base, tokio_postgres::NoTls).await;
        let client = match connected.map_err(|e| match std::error::Error::source(&e) {
            Some(cause) => format!("{e}: {cause}"),
            None => e.to_string(),
        }) {
            Ok((client, connection)) => {
                tokio::spawn(connection);
                client
            }
            Err(e) if std::env::var("CI").is_ok_and(|ci| ci == "true") => panic!(
                "PostgreSQL at AIRLOCK_TEST_POSTGRES_URL (`{base}`) is unreachable: {e}; CI must run the \
                 PostgreSQL conformance tests, so start PostgreSQL before them"
            ),
            Err(e) => {
                eprintln!("notice: skipping the PostgreSQL store, `{base}` is unreachable: {e}");
                return None;
            }
        };
        let name = format!("airlock_test_{}_{}", std::process::id(), SCHEMAS.fetch_add(1, Ordering::Relaxed));
        client
            .batch_execute(&format!("DROP SCHEMA IF EXISTS {name} CASCADE; CREATE SCHEMA {name}"))
            .await
            .unwrap();
        Some(Self { base, name })
    }

    /// The URL of a store whose connections see only this schema; they are named after it, so
    /// that dropping the schema can end those still open.
    fn url(&self) -> String {
        let separator = if self.base.contains('?') { '&' } else { '?' };
        format!(
            "{}{separator}options=-csearch_path%3D{}&application_name={}",
            self.base, self.name, self.name
        )
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        // Drop is synchronous: drop the schema from a thread with its own runtime.
        let (base, name) = (self.base.clone(), self.name.clone());
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async {
                if let Ok((client, connection)) = tokio_postgres::connect(&base, tokio_postgres::NoTls).await
                {
                    tokio::spawn(connection);
                    // The test's runtime is blocked in this drop: a store's connection caught in
                    // a transaction (its sealer, say) would hold its locks forever.
                    let _ = client
                        .execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1", &[&name])
                        .await;
                    let _ = client.batch_execute(&format!("DROP SCHEMA IF EXISTS {name} CASCADE")).await;
                }
            });
        })
        .join();
    }
}

async fn stores() -> Vec<(String, Arc<dyn Store>, Option<PgSchema>)> {
    let mut stores: Vec<(String, Arc<dyn Store>, Option<PgSchema>)> =
        vec![("sqlite".into(), Arc::new(SqliteStore::open(&temp_dir()).unwrap()), None)];
    if let Some(schema) = PgSchema::create().await {
        let store = PgStore::connect(&schema.url()).await.unwrap();
        stores.push(("postgres".into(), Arc::new(store), Some(schema)));
    }
    stores
}

fn tenant(name: &str) -> TenantId {
    name.parse().unwrap()
}

fn draft(kind: Kind, subject: &str) -> Draft {
    Draft {
        at: 1,
        kind,
        subject: subject.into(),
        actor: "tester".into(),
        data: json!({"outcome": "accepted"}),
    }
}

fn job(t: &TenantId, state: JobState, at: i64) -> JobRecord {
    JobRecord {
        id: JobId::generate(at, random()),
        tenant: t.clone(),
        principal: "agent".into(),
        topic: "infra.resource.delete".into(),
        env: "production".into(),
        labels: BTreeMap::from([("team".into(), "core".into())]),
        payload: json!({"id": "vm-1", "nested": [1, 2.5, null]}),
        plan_hash: None,
        idempotency_key: None,
        job_hash: format!("sha256:{at}"),
        state,
        gate_a: GateDecision {
            decision: Decision::Allow,
            rule_ids: vec![],
            reason: "ok".into(),
            snapshot_hash: "sha256:s".into(),
            snapshot_version: 1,
            at,
            bypassed: false,
        },
        approval_id: None,
        created_at: at,
        updated_at: at,
        dispatch: DispatchState::default(),
    }
}

fn submission(job: JobRecord) -> Submission {
    let subject = job.id.to_string();
    Submission {
        job,
        approval: None,
        idempotency: None,
        budgets: vec![],
        audit: draft(Kind::JobSubmitted, &subject),
        decided_under: None,
    }
}

async fn verify_chain(store: &dyn Store, t: &TenantId) -> Result<u64, audit::Broken> {
    let page = store.audit(t, 0, 10_000).await.unwrap();
    audit::verify(t.as_str(), &page.records, page.head.as_ref().map(|(s, h)| (*s, h.as_str())))
}

#[tokio::test]
async fn submit_writes_everything_together() {
    for (name, store, _schema) in stores().await {
        let t = tenant("acme");
        let mut j = job(&t, JobState::AwaitingApproval, 1_000);
        let approval = ApprovalRecord {
            id: ApprovalId::generate(1_000, random()),
            tenant: t.clone(),
            job_id: j.id.clone(),
            request: Request {
                job_hash: j.job_hash.clone(),
                snapshot_hash: "sha256:s".into(),
                rule_ids: vec!["r".into()],
                rule_hashes: vec!["sha256:r".into()],
                requested_by: "agent".into(),
                created_at: 1_000,
                expires_at: 2_000,
                quorum: 1,
                approvers: vec![],
                status: Status::Pending,
            },
            decided_at: None,
            decided_by: None,
        };
        j.approval_id = Some(approval.id.clone());
        j.idempotency_key = Some("k1".into());
        let mut s = submission(j.clone());
        s.approval = Some(approval.clone());
        s.idempotency = Some(("k1".into(), 202, "{\"job_id\":1}".into()));
        assert_eq!(store.submit(s, 0).await.unwrap(), SubmitOutcome::Accepted, "{name}");
        assert_eq!(store.job(&t, &j.id).await.unwrap().unwrap(), j, "{name}: the job round-trips");
        assert_eq!(store.approval(&t, &approval.id).await.unwrap().unwrap(), approval, "{name}");
        let remembered = store.idempotency(&t, "k1", 0).await.unwrap().unwrap();
        assert_eq!((remembered.status, remembered.body.as_str()), (202, "{\"job_id\":1}"));
        let history = store.history(&t, &j.id).await.unwrap();
        assert_eq!((history.len(), history[0].from, history[0].to), (1, None, JobState::AwaitingApproval));
        assert_eq!(verify_chain(&*store, &t).await, Ok(1), "{name}");
        assert!(store.job(&tenant("other"), &j.id).await.unwrap().is_none(), "{name}: tenants are isolated");
    }
}

#[tokio::test]
async fn idempotency_keys_replay_or_conflict() {
    for (name, store, _schema) in stores().await {
        let t = tenant("acme");
        let first = job(&t, JobState::Queued, 10);
        let mut s = submission(first.clone());
        s.idempotency = Some(("key".into(), 202, "original".into()));
        assert_eq!(store.submit(s, 0).await.unwrap(), SubmitOutcome::Accepted);

        let mut same = job(&t, JobState::Queued, 11);
        same.job_hash = first.job_hash.clone();
        let mut s = submission(same.clone());
        s.idempotency = Some(("key".into(), 202, "second".into()));
        match store.submit(s, 0).await.unwrap() {
            SubmitOutcome::Replay(r) => {
                assert_eq!((r.body.as_str(), &r.job_id), ("original", &first.id), "{name}")
            }
            other => panic!("{name}: expected a replay, got {other:?}"),
        }
        assert!(store.job(&t, &same.id).await.unwrap().is_none(), "{name}: a replay stores nothing");

        let different = job(&t, JobState::Queued, 12);
        let mut s = submission(different);
        s.idempotency = Some(("key".into(), 202, "third".into()));
        assert!(matches!(store.submit(s, 0).await.unwrap(), SubmitOutcome::KeyReused(_)), "{name}");

        // Outside retention the key is forgotten and may be used again.
        let later = job(&t, JobState::Queued, 13);
        let mut s = submission(later);
        s.idempotency = Some(("key".into(), 202, "fourth".into()));
        assert_eq!(store.submit(s, 11).await.unwrap(), SubmitOutcome::Accepted, "{name}");

        // Keys are per tenant.
        let other = tenant("other");
        let mut s = submission(job(&other, JobState::Queued, 14));
        s.idempotency = Some(("key".into(), 202, "x".into()));
        assert_eq!(store.submit(s, 0).await.unwrap(), SubmitOutcome::Accepted, "{name}");
    }
}

#[tokio::test]
async fn budgets_admit_all_or_nothing() {
    for (name, store, _schema) in stores().await {
        let t = tenant("acme");
        let one_per_minute = Limit { rate: 1, per_secs: 60, burst: 1, key: vec![LimitKey::Tenant] };
        let roomy = Limit { rate: 100, per_secs: 1, burst: 100, key: vec![LimitKey::Tenant] };
        let budgets = |at: i64| -> Submission {
            let mut s = submission(job(&t, JobState::Queued, at));
            s.budgets = vec![
                Budget { key: "a|roomy".into(), limit: roomy.clone() },
                Budget { key: "a|tight".into(), limit: one_per_minute.clone() },
            ];
            s
        };
        assert_eq!(store.submit(budgets(1_000), 0).await.unwrap(), SubmitOutcome::Accepted, "{name}");
        let refused = store.submit(budgets(2_000), 0).await.unwrap();
        assert_eq!(refused, SubmitOutcome::Throttled { retry_after_ms: 59_000 }, "{name}");
        assert_eq!(store.jobs(&t, &JobFilter { limit: 10, ..JobFilter::default() }).await.unwrap().len(), 1);
        assert_eq!(store.submit(budgets(61_000), 0).await.unwrap(), SubmitOutcome::Accepted, "{name}");
        // The refused attempt charged neither bucket; its audit record is in the chain.
        assert_eq!(verify_chain(&*store, &t).await, Ok(3), "{name}");
        let page = store.audit(&t, 0, 10).await.unwrap();
        assert_eq!(page.records[1].draft.data["outcome"], "throttled");
    }
}

#[tokio::test]
async fn transitions_follow_the_table() {
    for (name, store, _schema) in stores().await {
        let t = tenant("acme");
        let j = job(&t, JobState::Queued, 5);
        store.submit(submission(j.clone()), 0).await.unwrap();
        let cancelled =
            store.transition(&t, &j.id, Event::Cancel, 6, "op", "no longer needed").await.unwrap();
        assert_eq!(cancelled.state, JobState::Cancelled, "{name}");
        let again = store.transition(&t, &j.id, Event::Cancel, 7, "op", "twice").await;
        assert!(matches!(again, Err(StoreError::InvalidTransition(_))), "{name}: {again:?}");
        let other = store.transition(&tenant("other"), &j.id, Event::Cancel, 7, "op", "x").await;
        assert!(matches!(other, Err(StoreError::NotFound)), "{name}");
        let history = store.history(&t, &j.id).await.unwrap();
        assert_eq!(history.iter().map(|h| h.to).collect::<Vec<_>>(), [JobState::Queued, JobState::Cancelled]);
        assert_eq!(history[1].reason, "no longer needed");
        assert_eq!(verify_chain(&*store, &t).await, Ok(2), "{name}");
        let counts = store.job_counts().await.unwrap();
        assert_eq!(counts.get(&JobState::Cancelled), Some(&1));
    }
}

#[tokio::test]
async fn approval_changes_are_optimistic_and_move_the_job() {
    for (name, store, _schema) in stores().await {
        let t = tenant("acme");
        let mut j = job(&t, JobState::AwaitingApproval, 100);
        let id = ApprovalId::generate(100, random());
        j.approval_id = Some(id.clone());
        let request = Request {
            job_hash: j.job_hash.clone(),
            snapshot_hash: "sha256:s".into(),
            rule_ids: vec![],
            rule_hashes: vec![],
            requested_by: "agent".into(),
            created_at: 100,
            expires_at: 200,
            quorum: 1,
            approvers: vec![],
            status: Status::Pending,
        };
        let mut s = submission(j.clone());
        s.approval = Some(ApprovalRecord {
            id: id.clone(),
            tenant: t.clone(),
            job_id: j.id.clone(),
            request: request.clone(),
            decided_at: None,
            decided_by: None,
        });
        store.submit(s, 0).await.unwrap();
        assert_eq!(store.pending_approvals().await.unwrap(), 1);
        assert_eq!(store.expired_approvals(199, 10).await.unwrap().len(), 0);
        assert_eq!(store.expired_approvals(200, 10).await.unwrap().len(), 1);
        let approved =
            Request { approvers: vec!["alice".into()], status: Status::Approved, ..request.clone() };
        let change = ApprovalChange {
            tenant: t.clone(),
            id: id.clone(),
            expected_status: Status::Pending,
            expected_approvers: 0,
            request: approved,
            job_event: Some(Event::Approved),
            replacement: None,
            audit: vec![draft(Kind::ApprovalApproved, id.as_str())],
            at: 150,
            actor: "alice".into(),
            decided_under: None,
        };
        let record = store.change_approval(change.clone()).await.unwrap();
        assert_eq!(
            (record.request.status, record.decided_by.as_deref()),
            (Status::Approved, Some("alice")),
            "{name}"
        );
        assert_eq!(store.job(&t, &j.id).await.unwrap().unwrap().state, JobState::Queued, "{name}");
        let stale = store.change_approval(change).await;
        assert!(matches!(stale, Err(StoreError::Conflict(_))), "{name}: a second identical change conflicts");
        assert_eq!(store.approvals(&t, Some(Status::Pending), None, 10).await.unwrap().len(), 0);
        assert_eq!(store.approvals(&t, Some(Status::Approved), None, 10).await.unwrap().len(), 1);
        assert_eq!(verify_chain(&*store, &t).await, Ok(3), "{name}");

        // Gate B finds the approval no longer binding: a fresh request replaces it, the old one
        // is recorded as stale, and the job waits again.
        let fresh = ApprovalRecord {
            id: ApprovalId::generate(160, random()),
            tenant: t.clone(),
            job_id: j.id.clone(),
            request: Request { created_at: 160, expires_at: 260, ..request.clone() },
            decided_at: None,
            decided_by: None,
        };
        let dispatch = Dispatch {
            tenant: t.clone(),
            job_id: j.id.clone(),
            action: DispatchAction::NeedsApproval { replacement: fresh.clone() },
            gate_b: Some(j.gate_a.clone()),
            at: 160,
            audit: draft(Kind::GateBDecision, j.id.as_str()),
            decided_under: None,
        };
        let waiting = match store.dispatch(dispatch).await.unwrap() {
            DispatchOutcome::Applied(job) => job,
            other => panic!("{name}: expected a fresh approval request, got {other:?}"),
        };
        assert_eq!(
            (waiting.state, waiting.approval_id.as_ref()),
            (JobState::AwaitingApproval, Some(&fresh.id))
        );
        assert_eq!(*waiting, store.job(&t, &j.id).await.unwrap().unwrap(), "{name}: returned as stored");
        assert_eq!(store.approval(&t, &fresh.id).await.unwrap(), Some(fresh), "{name}");
        let old = store.approval(&t, &id).await.unwrap().unwrap();
        assert_eq!(
            (old.request.status, old.decided_by.as_deref()),
            (Status::Stale, Some("system")),
            "{name}"
        );
        assert_eq!(verify_chain(&*store, &t).await, Ok(5), "{name}");

        // The job's audit records include its approval requests' (their subject is the request).
        let records = store.job_audit(&t, &j.id, 100).await.unwrap();
        let seqs: Vec<u64> = records.iter().map(|r| r.seq).collect();
        assert!(seqs.is_sorted(), "{name}: in chain order: {seqs:?}");
        assert!(
            records.iter().any(|r| r.draft.kind == Kind::ApprovalApproved && r.draft.subject == id.as_str()),
            "{name}: the approval's record is the job's too: {records:?}"
        );
        assert_eq!(store.job_audit(&t, &j.id, 1).await.unwrap().len(), 1, "{name}: at most `limit`");
    }
}

#[tokio::test]
async fn keys_snapshots_and_durability_across_reopen() {
    let dir = temp_dir();
    keys_snapshots_and_durability(async || Box::new(SqliteStore::open(&dir).unwrap()) as Box<dyn Store>)
        .await;
}

#[tokio::test]
async fn keys_snapshots_and_durability_across_reconnect_postgres() {
    let Some(schema) = PgSchema::create().await else { return };
    let url = schema.url();
    keys_snapshots_and_durability(async || Box::new(PgStore::connect(&url).await.unwrap()) as Box<dyn Store>)
        .await;
}

/// Writes through one store, drops it, and reads everything back through a fresh one.
async fn keys_snapshots_and_durability(open: impl AsyncFn() -> Box<dyn Store>) {
    let t = tenant("acme");
    let key = KeyRecord {
        id: KeyId::generate(1, random()),
        tenant: t.clone(),
        name: "ci-bot".into(),
        roles: [Role::Submitter, Role::Approver].into_iter().collect::<Roles>(),
        secret_hash: [7; 32],
        created_at: 1,
        revoked_at: None,
        principal: Some("carol".into()),
    };
    let j = job(&t, JobState::Queued, 9);
    {
        let store = open().await;
        store.create_key(key.clone(), draft(Kind::KeyCreated, key.id.as_str())).await.unwrap();
        let duplicate = KeyRecord { id: KeyId::generate(2, random()), ..key.clone() };
        assert!(matches!(
            store.create_key(duplicate, draft(Kind::KeyCreated, "x")).await,
            Err(StoreError::Conflict(m)) if m.contains("ci-bot")
        ));
        let v1 = store.publish("sha256:one", "version: v1\n", None, 2, "admin").await.unwrap();
        let v2 = store
            .publish("sha256:two", "version: v1\nrules: []\n", Some("second"), 3, "admin")
            .await
            .unwrap();
        assert_eq!((v1.version, v2.version), (1, 2));
        store.submit(submission(j.clone()), 0).await.unwrap();
    }
    let store = open().await;
    assert_eq!(store.key(&key.id).await.unwrap().unwrap(), key);
    assert_eq!(store.active_snapshot().await.unwrap().unwrap().hash, "sha256:two");
    let all = store.snapshots().await.unwrap();
    assert_eq!(all.iter().map(|s| (s.version, s.active)).collect::<Vec<_>>(), [(2, true), (1, false)]);
    assert_eq!(store.job(&t, &j.id).await.unwrap().unwrap(), j);
    let revoked = store.revoke_key(&key.id, 10, draft(Kind::KeyRevoked, key.id.as_str())).await.unwrap();
    assert_eq!(revoked.revoked_at, Some(10));
    assert!(matches!(
        store.revoke_key(&key.id, 11, draft(Kind::KeyRevoked, "x")).await,
        Err(StoreError::NotFound)
    ));
    assert_eq!(verify_chain(&*store, &t).await, Ok(3), "key created, job submitted, key revoked");
    let platform = tenant(TenantId::PLATFORM);
    assert_eq!(verify_chain(&*store, &platform).await, Ok(2), "two publishes");
    assert_eq!(store.audit_tenants().await.unwrap(), [t, platform]);
}

#[tokio::test]
async fn concurrent_submits_group_commit_and_chain_in_order() {
    for (name, store, _schema) in stores().await {
        let t = tenant("acme");
        let mut handles = Vec::new();
        for i in 0..200 {
            let store = Arc::clone(&store);
            let j = job(&t, JobState::Queued, 1_000 + i);
            handles.push(tokio::spawn(async move { store.submit(submission(j), 0).await }));
        }
        for h in handles {
            assert_eq!(h.await.unwrap().unwrap(), SubmitOutcome::Accepted, "{name}");
        }
        let listed = store.jobs(&t, &JobFilter { limit: 500, ..JobFilter::default() }).await.unwrap();
        assert_eq!(listed.len(), 200, "{name}");
        assert_eq!(verify_chain(&*store, &t).await, Ok(200), "{name}");
        let filter = JobFilter { limit: 50, after: Some(listed[49].id.clone()), ..JobFilter::default() };
        let page = store.jobs(&t, &filter).await.unwrap();
        assert_eq!(page[0].id, listed[50].id, "{name}: cursors continue where the page ended");
    }
}

/// Dispatches and finishes arriving together may share a transaction (group commit): each
/// still succeeds or fails on its own, and two writes to one job still see each other.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_dispatches_and_finishes_succeed_or_fail_alone() {
    for (name, store, _schema) in stores().await {
        let t = tenant("acme");
        let jobs: Vec<JobRecord> = (0..40).map(|i| job(&t, JobState::Queued, 100 + i)).collect();
        for j in &jobs {
            store.submit(submission(j.clone()), 0).await.unwrap();
        }
        let lease = |j: &JobRecord, token: String| Dispatch {
            tenant: t.clone(),
            job_id: j.id.clone(),
            action: DispatchAction::Lease {
                lease: Lease { token, expires_at: 10_000, worker: "w".into() },
                budgets: vec![],
            },
            gate_b: Some(j.gate_a.clone()),
            at: 200,
            audit: draft(Kind::GateBDecision, j.id.as_str()),
            decided_under: None,
        };
        // Job 20 is dispatched twice at once (adjacent, so that a group commit would take both):
        // one lease, one `Gone`.
        let mut dispatches: Vec<Dispatch> =
            jobs.iter().enumerate().map(|(i, j)| lease(j, format!("t{i}"))).collect();
        dispatches.insert(21, lease(&jobs[20], "t20-again".into()));
        let handles: Vec<_> = dispatches
            .into_iter()
            .map(|d| {
                let store = Arc::clone(&store);
                tokio::spawn(async move { store.dispatch(d).await })
            })
            .collect();
        let mut applied = 0;
        for h in handles {
            match h.await.unwrap().unwrap() {
                DispatchOutcome::Applied(job) => {
                    assert_eq!(job.state, JobState::Leased, "{name}");
                    applied += 1;
                }
                DispatchOutcome::Gone => {}
                other => panic!("{name}: unexpected {other:?}"),
            }
        }
        assert_eq!(applied, jobs.len(), "{name}: every job leased once");
        let token20 = store.job(&t, &jobs[20].id).await.unwrap().unwrap().dispatch.lease.unwrap().token;

        // Job 30 is finished twice at once, job 2 under a token that is not its lease's.
        let mut finishes: Vec<(usize, String)> = (0..jobs.len()).map(|i| (i, format!("t{i}"))).collect();
        finishes[20].1 = token20;
        finishes[2].1 = "not-the-lease".into();
        finishes.insert(31, (30, "t30".into()));
        let handles: Vec<_> = finishes
            .into_iter()
            .map(|(i, token)| {
                let (store, t, id) = (Arc::clone(&store), t.clone(), jobs[i].id.clone());
                tokio::spawn(async move {
                    let done = Finish::Succeeded { result: json!(i) };
                    (i, store.finish(&t, &id, &token, None, done, 300, "w").await)
                })
            })
            .collect();
        let mut succeeded = BTreeMap::new();
        for h in handles {
            let (i, finished) = h.await.unwrap();
            match finished {
                Ok(job) => *succeeded.entry(i).or_insert(0) += u32::from(job.state == JobState::Succeeded),
                Err(StoreError::Conflict(_)) => assert!(i == 30 || i == 2, "{name}: job {i} refused"),
                Err(e) => panic!("{name}: job {i}: {e}"),
            }
        }
        assert_eq!(succeeded.len(), jobs.len() - 1, "{name}: all but job 2 succeeded: {succeeded:?}");
        assert!(succeeded.values().all(|n| *n == 1), "{name}: job 30 completed once: {succeeded:?}");
        for (i, j) in jobs.iter().enumerate() {
            let stored = store.job(&t, &j.id).await.unwrap().unwrap();
            let expected = if i == 2 { JobState::Leased } else { JobState::Succeeded };
            assert_eq!(stored.state, expected, "{name}: job {i}");
        }
        // Each job: its submit, its lease (transition and Gate B), its success (not job 2's).
        let records = u64::try_from(4 * jobs.len() - 1).unwrap();
        assert_eq!(verify_chain(&*store, &t).await, Ok(records), "{name}");
    }
}

#[tokio::test]
async fn leases_are_fenced_and_dead_letters_come_back() {
    for (name, store, _schema) in stores().await {
        let t = tenant("acme");
        let j = job(&t, JobState::Queued, 100);
        store.submit(submission(j.clone()), 0).await.unwrap();
        let lease = |token: &str, budgets: Vec<Budget>| Dispatch {
            tenant: t.clone(),
            job_id: j.id.clone(),
            action: DispatchAction::Lease {
                lease: Lease { token: token.into(), expires_at: 1_000, worker: "w".into() },
                budgets,
            },
            gate_b: Some(j.gate_a.clone()),
            at: 200,
            audit: draft(Kind::GateBDecision, j.id.as_str()),
            decided_under: None,
        };
        // A Gate B budget that refuses requeues the job until it refills, uncounted.
        let tight = Limit { rate: 1, per_secs: 60, burst: 1, key: vec![LimitKey::Tenant] };
        store.submit(submission(job(&t, JobState::Queued, 150)), 0).await.unwrap();
        let mut first = lease("t0", vec![Budget { key: "b|tight".into(), limit: tight.clone() }]);
        first.job_id = store.dispatchable(&t, 150, 1, 1).await.unwrap()[0].id.clone();
        assert!(matches!(store.dispatch(first).await.unwrap(), DispatchOutcome::Applied(_)), "{name}");
        let throttled =
            store.dispatch(lease("t1", vec![Budget { key: "b|tight".into(), limit: tight }])).await;
        assert_eq!(throttled.unwrap(), DispatchOutcome::Throttled { retry_after_ms: 60_000 }, "{name}");
        assert!(
            store.dispatchable(&t, 60_199, 0, 10).await.unwrap().is_empty(),
            "{name}: not before the refill"
        );
        let ready = store.dispatchable(&t, 60_200, 0, 10).await.unwrap();
        assert_eq!(ready.iter().map(|r| &r.id).collect::<Vec<_>>(), [&j.id], "{name}");

        let leased = match store.dispatch(lease("t2", vec![])).await.unwrap() {
            DispatchOutcome::Applied(job) => job,
            other => panic!("{name}: expected a lease, got {other:?}"),
        };
        assert_eq!((leased.state, leased.dispatch.execution_attempts), (JobState::Leased, 1), "{name}");
        let stored = |store: Arc<dyn Store>| {
            let (t, id) = (t.clone(), j.id.clone());
            async move { store.job(&t, &id).await.unwrap().unwrap() }
        };
        assert_eq!(
            *leased,
            stored(Arc::clone(&store)).await,
            "{name}: what dispatch returns is what it stored"
        );
        assert_eq!(store.dispatch(lease("t3", vec![])).await.unwrap(), DispatchOutcome::Gone, "{name}");
        let wrong = store.heartbeat(&t, &j.id, "t3", 300, 2_000).await;
        assert!(matches!(wrong, Err(StoreError::Conflict(_))), "{name}: {wrong:?}");
        let extended = store.heartbeat(&t, &j.id, "t2", 300, 2_000).await.unwrap();
        assert_eq!(extended, airlock_store::Heartbeat::Extended { expires_at: 2_000 }, "{name}");
        let beaten = stored(Arc::clone(&store)).await;
        assert_eq!(
            (beaten.dispatch.lease.as_ref().map(|l| l.expires_at), beaten.updated_at, beaten.state),
            (Some(2_000), 300, JobState::Leased),
            "{name}: the core's heartbeat move, applied"
        );
        // The other job's lease (until 1 000) lapsed; this one's runs until 2 000.
        assert_eq!(store.lapsed_leases(2_000, 10).await.unwrap().len(), 1, "{name}");
        assert_eq!(store.lapsed_leases(2_001, 10).await.unwrap().len(), 2, "{name}");
        let late = store.heartbeat(&t, &j.id, "t2", 2_001, 3_000).await;
        assert!(matches!(late, Err(StoreError::Conflict(_))), "{name}: a lapsed lease is not extended");

        let retried = store
            .finish(&t, &j.id, "t2", Some(400), Finish::Retry { error: "boom".into() }, 400, "w")
            .await
            .unwrap();
        assert_eq!((retried.state, retried.dispatch.lease.as_ref()), (JobState::Queued, None), "{name}");
        assert_eq!(retried, stored(Arc::clone(&store)).await, "{name}");
        let stale =
            store.finish(&t, &j.id, "t2", None, Finish::Succeeded { result: json!(1) }, 401, "w").await;
        assert!(matches!(stale, Err(StoreError::Conflict(_))), "{name}: a late worker changes nothing");

        assert!(matches!(store.dispatch(lease("t4", vec![])).await.unwrap(), DispatchOutcome::Applied(_)));
        let dead = store
            .finish(
                &t,
                &j.id,
                "t4",
                Some(500),
                Finish::DeadLetter { reason: "out of attempts".into() },
                500,
                "w",
            )
            .await
            .unwrap();
        assert_eq!(dead.state, JobState::DeadLettered, "{name}");
        assert_eq!(dead, stored(Arc::clone(&store)).await, "{name}");
        assert_eq!(store.dlq_depth().await.unwrap(), 1, "{name}");
        assert_eq!(store.dead_letters(&t, Some("infra.resource.delete"), None, 10).await.unwrap().len(), 1);
        let back = store.retry_dead_letter(&t, &j.id, 600, "op").await.unwrap();
        assert_eq!(
            (back.state, back.dispatch.execution_attempts, back.dispatch.dead_letter_reason.clone()),
            (JobState::Queued, 0, None),
            "{name}"
        );
        assert_eq!(back, stored(Arc::clone(&store)).await, "{name}");
        let backoff = Dispatch {
            action: DispatchAction::Requeue { not_before: 650, counted: true },
            ..lease("t5", vec![])
        };
        match store.dispatch(backoff).await.unwrap() {
            DispatchOutcome::Applied(job) => {
                assert_eq!((job.state, job.dispatch.scheduling_attempts), (JobState::Queued, 1), "{name}");
                assert_eq!(*job, stored(Arc::clone(&store)).await, "{name}");
            }
            other => panic!("{name}: expected a requeue, got {other:?}"),
        }
        let requeue =
            Dispatch { action: DispatchAction::DeadLetter { reason: "again".into() }, ..lease("t5", vec![]) };
        match store.dispatch(requeue).await.unwrap() {
            DispatchOutcome::Applied(job) => assert_eq!(*job, stored(Arc::clone(&store)).await, "{name}"),
            other => panic!("{name}: expected a dead letter, got {other:?}"),
        }
        let discarded = store.discard_dead_letter(&t, &j.id, 700, "op").await.unwrap();
        assert_eq!(discarded.dispatch.discarded_at, Some(700), "{name}");
        assert_eq!(store.dlq_depth().await.unwrap(), 0, "{name}");
        let again = store.retry_dead_letter(&t, &j.id, 800, "op").await;
        assert!(matches!(again, Err(StoreError::Conflict(_))), "{name}: {again:?}");
        let states: Vec<JobState> = store.history(&t, &j.id).await.unwrap().iter().map(|h| h.to).collect();
        let (queued, leased, dead) = (JobState::Queued, JobState::Leased, JobState::DeadLettered);
        assert_eq!(states, [queued, leased, queued, leased, dead, queued, queued, dead], "{name}");
        assert!(verify_chain(&*store, &t).await.is_ok(), "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_replicas_keep_one_chain_and_lease_once() {
    let Some(schema) = PgSchema::create().await else { return };
    let url = schema.url();
    // Both replicas migrate the fresh schema at once: the advisory lock makes it happen once.
    let (a, b) = tokio::join!(PgStore::connect(&url), PgStore::connect(&url));
    let replicas: [Arc<dyn Store>; 2] = [Arc::new(a.unwrap()), Arc::new(b.unwrap())];
    let t = tenant("acme");

    let mut handles = Vec::new();
    for i in 0..100_i64 {
        let store = Arc::clone(&replicas[usize::from(i % 2 == 1)]);
        let j = job(&t, JobState::Queued, 10_000 + i);
        handles.push(tokio::spawn(async move { store.submit(submission(j), 0).await }));
    }
    // One idempotency key submitted from both replicas at once: one job, the rest replays.
    let same_hash = job(&t, JobState::Queued, 20_000).job_hash;
    let mut keyed = Vec::new();
    for i in 0..10_i64 {
        let store = Arc::clone(&replicas[usize::from(i % 2 == 1)]);
        let mut j = job(&t, JobState::Queued, 20_000 + i);
        j.job_hash = same_hash.clone();
        let mut s = submission(j);
        s.idempotency = Some(("shared-key".into(), 202, format!("body {i}")));
        keyed.push(tokio::spawn(async move { store.submit(s, 0).await }));
    }
    for h in handles {
        assert_eq!(h.await.unwrap().unwrap(), SubmitOutcome::Accepted);
    }
    let mut accepted = 0;
    for h in keyed {
        match h.await.unwrap().unwrap() {
            SubmitOutcome::Accepted => accepted += 1,
            SubmitOutcome::Replay(_) => {}
            other => panic!("expected accepted or replay, got {other:?}"),
        }
    }
    assert_eq!(accepted, 1, "one submit wins the idempotency key");
    for replica in &replicas {
        assert_eq!(verify_chain(&**replica, &t).await, Ok(101), "one chain, seen alike from both replicas");
    }

    // Both replicas lease the same queued jobs at once: each job goes to exactly one.
    let queued = replicas[0].dispatchable(&t, i64::MAX, 0, 1_000).await.unwrap();
    assert_eq!(queued.len(), 101);
    let mut leases = Vec::new();
    for (i, j) in queued.iter().take(30).enumerate() {
        for (r, replica) in replicas.iter().enumerate() {
            let replica = Arc::clone(replica);
            let dispatch = Dispatch {
                tenant: t.clone(),
                job_id: j.id.clone(),
                action: DispatchAction::Lease {
                    lease: Lease {
                        token: format!("token-{r}-{i}"),
                        expires_at: 90_000,
                        worker: format!("w{r}"),
                    },
                    budgets: vec![],
                },
                gate_b: Some(j.gate_a.clone()),
                at: 30_000,
                audit: draft(Kind::GateBDecision, j.id.as_str()),
                decided_under: None,
            };
            leases.push((j.id.clone(), tokio::spawn(async move { replica.dispatch(dispatch).await })));
        }
    }
    let mut applied: BTreeMap<JobId, Vec<String>> = BTreeMap::new();
    for (id, h) in leases {
        match h.await.unwrap().unwrap() {
            DispatchOutcome::Applied(job) => {
                assert_eq!(job.state, JobState::Leased);
                applied.entry(id).or_default().push(job.dispatch.lease.unwrap().token);
            }
            DispatchOutcome::Gone => {}
            other => panic!("expected applied or gone, got {other:?}"),
        }
    }
    assert_eq!(applied.len(), 30, "every job was leased");
    for (id, tokens) in &applied {
        assert_eq!(tokens.len(), 1, "job `{id}` was leased twice: {tokens:?}");
        let stored = replicas[1].job(&t, id).await.unwrap().unwrap();
        assert_eq!(stored.dispatch.execution_attempts, 1);
        assert_eq!(stored.dispatch.lease.unwrap().token, tokens[0]);
    }
    // Each applied lease wrote its decision and its transition.
    assert_eq!(verify_chain(&*replicas[1], &t).await, Ok(101 + 30 * 2));
}

#[tokio::test]
async fn the_shared_breaker_opens_after_failures_and_limits_probes() {
    use airlock_core::breaker::{Admission, BreakerConfig, BreakerState};
    let config = BreakerConfig { failures_to_open: 3, open_ms: 100, probes: 3 };
    for (name, store, _schema) in stores().await {
        assert_eq!(store.breaker_state(0).await.unwrap(), BreakerState::Closed { failures: 0 }, "{name}");
        for t in 0..3 {
            assert_eq!(store.breaker_admit(config, t).await.unwrap(), Admission::Call, "{name}");
            store.breaker_report(config, t, false).await.unwrap();
        }
        assert_eq!(store.breaker_state(5).await.unwrap(), BreakerState::Open { until: 102 }, "{name}");
        assert_eq!(store.breaker_admit(config, 50).await.unwrap(), Admission::Refused, "{name}");
        let admitted: Vec<Admission> = futures_admit(&store, config, 102, 6).await;
        assert_eq!(admitted.iter().filter(|a| **a == Admission::Probe).count(), 3, "{name}: {admitted:?}");
        store.breaker_report(config, 103, true).await.unwrap();
        assert_eq!(
            store.breaker_admit(config, 104).await.unwrap(),
            Admission::Call,
            "{name}: a probe success closes it"
        );
    }
}

/// `n` concurrent admissions at `now`.
async fn futures_admit(
    store: &Arc<dyn Store>,
    config: airlock_core::breaker::BreakerConfig,
    now: i64,
    n: usize,
) -> Vec<airlock_core::breaker::Admission> {
    let handles: Vec<_> = (0..n)
        .map(|_| {
            let store = Arc::clone(store);
            tokio::spawn(async move { store.breaker_admit(config, now).await.unwrap() })
        })
        .collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

#[tokio::test]
async fn postgres_replicas_share_one_breaker() {
    use airlock_core::breaker::{Admission, BreakerConfig};
    let Some(schema) = PgSchema::create().await else { return };
    let url = schema.url();
    let (a, b) = tokio::join!(PgStore::connect(&url), PgStore::connect(&url));
    let replicas: [Arc<dyn Store>; 2] = [Arc::new(a.unwrap()), Arc::new(b.unwrap())];
    let config = BreakerConfig { failures_to_open: 3, open_ms: 100, probes: 3 };
    for t in 0..3 {
        let replica = &replicas[t % 2];
        replica.breaker_admit(config, 0).await.unwrap();
        replica.breaker_report(config, 0, false).await.unwrap();
    }
    assert_eq!(
        replicas[1].breaker_admit(config, 10).await.unwrap(),
        Admission::Refused,
        "opened once, for both"
    );
    let (left, right) = tokio::join!(
        futures_admit(&replicas[0], config, 100, 5),
        futures_admit(&replicas[1], config, 100, 5)
    );
    let probes = left.iter().chain(&right).filter(|a| **a == Admission::Probe).count();
    assert_eq!(probes, 3, "half-open probes across replicas: {left:?} {right:?}");
}

#[tokio::test]
async fn the_outbox_holds_wake_ups_until_relayed_or_pruned() {
    for (name, store, schema) in stores().await {
        let t = tenant("acme");
        store.submit(submission(job(&t, JobState::Queued, 1_000)), 0).await.unwrap();
        store.submit(submission(job(&t, JobState::Queued, 2_000)), 0).await.unwrap();
        let taken = store.outbox_take(10).await.unwrap();
        if schema.is_none() {
            assert!(taken.is_empty(), "{name}: one process needs no outbox");
            continue;
        }
        assert_eq!(taken.len(), 2, "{name}: written with the jobs");
        assert!(store.outbox_take(10).await.unwrap().is_empty(), "{name}: taken rows are one relay's");
        store.outbox_done(&[taken[0].0]).await.unwrap();
        assert_eq!(store.outbox_prune(1_500).await.unwrap(), 0, "{name}: the remaining row is newer");
        assert_eq!(store.outbox_prune(i64::MAX).await.unwrap(), 1, "{name}");
        assert!(store.outbox_take(10).await.unwrap().is_empty(), "{name}");
    }
}

#[tokio::test]
async fn the_idempotency_report_counts_submissions_without_keys_per_topic() {
    for (name, store, _schema) in stores().await {
        let t = tenant("acme");
        let mut keyed = job(&t, JobState::Queued, 1);
        keyed.topic = "infra.a".into();
        keyed.idempotency_key = Some("k".into());
        let mut bare = job(&t, JobState::Queued, 2);
        bare.topic = "infra.a".into();
        let mut other = job(&t, JobState::Queued, 3);
        other.topic = "infra.b".into();
        for j in [keyed, bare, other] {
            store.submit(submission(j), 0).await.unwrap();
        }
        store.submit(submission(job(&tenant("globex"), JobState::Queued, 4)), 0).await.unwrap();
        let report = store.idempotency_report(&t).await.unwrap();
        assert_eq!(report, [("infra.a".to_owned(), 2, 1), ("infra.b".to_owned(), 1, 1)], "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_seals_audit_records_a_dead_replica_left_pending() {
    let Some(schema) = PgSchema::create().await else { return };
    let url = schema.url();
    let store = PgStore::connect(&url).await.unwrap();
    let t = tenant("acme");
    store.submit(submission(job(&t, JobState::Queued, 1_000)), 0).await.unwrap();
    // A replica that committed a record and died before its sealer ran left it pending.
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    client
        .execute(
            "INSERT INTO audit_pending (tenant, at, kind, subject, actor, data)
             VALUES ('acme', 2000, 'job.transition', 'j', 'dead-replica', '{\"to\":\"queued\"}')",
            &[],
        )
        .await
        .unwrap();
    // Nothing reads the chain (a read seals first): the live replica's sealer takes it alone.
    let mut sealed = 0;
    for _ in 0..50 {
        let row = client.query_opt("SELECT seq FROM audit_heads WHERE tenant = 'acme'", &[]).await.unwrap();
        sealed = row.map_or(0, |r| r.get::<_, i64>(0));
        if sealed == 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(sealed, 2, "the pending record was chained by the periodic sealer");
    let pending: i64 = client.query_one("SELECT COUNT(*) FROM audit_pending", &[]).await.unwrap().get(0);
    assert_eq!(pending, 0);
    let page = store.audit(&t, 0, 10).await.unwrap();
    assert_eq!(page.records[1].draft.actor, "dead-replica", "chained after the record committed before it");
    assert_eq!(verify_chain(&store, &t).await, Ok(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn claim_holds_hand_each_job_to_one_claim_until_they_lapse() {
    for (name, store, _schema) in stores().await {
        let t = tenant("acme");
        let mut ids = Vec::new();
        for i in 0..20 {
            let j = job(&t, JobState::Queued, 100 + i);
            ids.push(j.id.clone());
            store.submit(submission(j), 0).await.unwrap();
        }
        // Twenty claims at once, each holding one job: every job goes to exactly one of them.
        let mut claims = Vec::new();
        for _ in 0..20 {
            let (store, t) = (Arc::clone(&store), t.clone());
            claims.push(tokio::spawn(async move { store.hold_next(&t, 1_000, 5_000).await }));
        }
        let mut held = Vec::new();
        for c in claims {
            held.push(c.await.unwrap().unwrap().expect("a job for every claim").id);
        }
        held.sort();
        held.dedup();
        assert_eq!(held.len(), 20, "{name}: no job was held twice");
        assert_eq!(store.hold_next(&t, 1_000, 5_000).await.unwrap(), None, "{name}: all are held");

        // Dispatching a job ends its hold: a denied job is gone, a requeued one is held again
        // when due; the others come back once their holds lapse, oldest first.
        let dispatch = |id: &JobId, action| Dispatch {
            tenant: t.clone(),
            job_id: id.clone(),
            action,
            gate_b: Some(job(&t, JobState::Queued, 100).gate_a),
            at: 1_001,
            audit: draft(Kind::GateBDecision, id.as_str()),
            decided_under: None,
        };
        let denied = store.dispatch(dispatch(&ids[0], DispatchAction::Deny)).await.unwrap();
        assert!(matches!(denied, DispatchOutcome::Applied(_)), "{name}");
        let backoff = DispatchAction::Requeue { not_before: 1_002, counted: true };
        let requeued = store.dispatch(dispatch(&ids[5], backoff)).await.unwrap();
        assert!(matches!(requeued, DispatchOutcome::Applied(_)), "{name}");
        assert_eq!(store.hold_next(&t, 1_001, 5_000).await.unwrap(), None, "{name}: not due yet");
        assert_eq!(store.next_due(&t, 1_001).await.unwrap(), Some(1_002), "{name}: when it is due");
        assert_eq!(store.next_due(&t, 1_002).await.unwrap(), None, "{name}: nothing due later");
        assert_eq!(store.next_due(&tenant("other"), 0).await.unwrap(), None, "{name}: per tenant");
        let due = store.hold_next(&t, 1_002, 5_000).await.unwrap().unwrap();
        assert_eq!(due.id, ids[5], "{name}: the requeued job, no longer held");
        assert_eq!(store.hold_next(&t, 5_999, 5_000).await.unwrap(), None, "{name}: held until 6 000");
        let again = store.hold_next(&t, 6_000, 5_000).await.unwrap().unwrap();
        assert_eq!(again.id, ids[1], "{name}: the oldest queued job, its hold lapsed");
        assert_eq!(store.hold_next(&tenant("other"), 6_000, 5_000).await.unwrap(), None, "{name}");
    }
}

/// A replica's claims look for the next job from where they last found one (a floor, so that
/// they do not read every dead index entry the queue left behind); a job behind that floor
/// which comes free, here because another replica's hold on it lapsed, is still held again
/// within a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_claims_find_a_job_behind_their_floor_within_a_second() {
    let Some(schema) = PgSchema::create().await else { return };
    let url = schema.url();
    let (one, two) = (PgStore::connect(&url).await.unwrap(), PgStore::connect(&url).await.unwrap());
    let t = tenant("acme");
    let jobs: Vec<JobRecord> = (0..100).map(|i| job(&t, JobState::Queued, 100 + i)).collect();
    for j in &jobs {
        one.submit(submission(j.clone()), 0).await.unwrap();
    }
    let first = one.hold_next(&t, 1_000, 1_000).await.unwrap().unwrap();
    assert_eq!(first.id, jobs[0].id);
    // Replica two finds the first job held and sets its floor at the second.
    let second = two.hold_next(&t, 1_000, 60_000).await.unwrap().unwrap();
    assert_eq!(second.id, jobs[1].id);
    // At 2 000 replica one's hold has lapsed. Replica two's claims, one every 20 ms, take the
    // jobs after its floor (about 2 s of them) until the floor expires, then the first job.
    let started = std::time::Instant::now();
    let mut after_floor = 0;
    loop {
        let held = two.hold_next(&t, 2_000, 60_000).await.unwrap().expect("jobs are left");
        if held.id == jobs[0].id {
            break;
        }
        after_floor += 1;
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let waited = started.elapsed();
    assert!(waited < std::time::Duration::from_millis(1_500), "the first job came back after {waited:?}");
    assert!(after_floor < jobs.len() - 2, "the floor expired before the jobs after it ran out");
}

/// SPEC 6, linearizable policy: a write carries the snapshot version it was decided under, and
/// the commit refuses it, writing nothing, once another version is active; writes decided under
/// the active one commit, alone or in a group with refused ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_decided_under_a_superseded_snapshot_are_refused() {
    for (name, store, _schema) in stores().await {
        let t = tenant("acme");
        store.publish("sha256:one", "version: v1\n", None, 1, "admin").await.unwrap();
        store.publish("sha256:two", "version: v1\nrules: []\n", None, 2, "admin").await.unwrap();
        fn stale<T>(result: Result<T, StoreError>) -> bool {
            matches!(result, Err(StoreError::Stale { active: 2 }))
        }

        let refused = job(&t, JobState::Queued, 100);
        let mut under_one = submission(refused.clone());
        under_one.decided_under = Some(1);
        assert!(stale(store.submit(under_one, 0).await), "{name}: a 202 under version 1");
        assert_eq!(store.job(&t, &refused.id).await.unwrap(), None, "{name}: nothing stored");
        let denial = draft(Kind::GateADecision, "-");
        assert!(stale(store.append_audit(&t, denial.clone(), Some(1)).await), "{name}: a deny under 1");
        assert_eq!(verify_chain(&*store, &t).await, Ok(0), "{name}: not even an audit record");
        store.append_audit(&t, denial, Some(2)).await.unwrap();

        let jobs: Vec<JobRecord> = (0..20).map(|i| job(&t, JobState::Queued, 200 + i)).collect();
        for j in &jobs {
            let mut s = submission(j.clone());
            s.decided_under = Some(2);
            assert_eq!(store.submit(s, 0).await.unwrap(), SubmitOutcome::Accepted, "{name}");
        }
        let tight = Limit { rate: 1, per_secs: 60, burst: 10, key: vec![LimitKey::Tenant] };
        let lease = |i: usize, j: &JobRecord| Dispatch {
            tenant: t.clone(),
            job_id: j.id.clone(),
            action: DispatchAction::Lease {
                lease: Lease { token: format!("t{i}"), expires_at: 10_000, worker: "w".into() },
                budgets: vec![Budget { key: "b|shared".into(), limit: tight.clone() }],
            },
            gate_b: Some(j.gate_a.clone()),
            at: 300,
            audit: draft(Kind::GateBDecision, j.id.as_str()),
            // Even jobs were decided under the superseded version.
            decided_under: Some(if i.is_multiple_of(2) { 1 } else { 2 }),
        };
        let handles: Vec<_> = jobs
            .iter()
            .enumerate()
            .map(|(i, j)| {
                let (store, d) = (Arc::clone(&store), lease(i, j));
                tokio::spawn(async move { (i, store.dispatch(d).await) })
            })
            .collect();
        for h in handles {
            let (i, outcome) = h.await.unwrap();
            let stored = store.job(&t, &jobs[i].id).await.unwrap().unwrap();
            if i.is_multiple_of(2) {
                assert!(
                    matches!(outcome, Err(StoreError::Stale { active: 2 })),
                    "{name}: job {i}: {outcome:?}"
                );
                assert_eq!(
                    (stored.state, stored.dispatch.lease),
                    (JobState::Queued, None),
                    "{name}: job {i}"
                );
            } else {
                assert!(matches!(outcome, Ok(DispatchOutcome::Applied(_))), "{name}: job {i}: {outcome:?}");
                assert_eq!(stored.state, JobState::Leased, "{name}: job {i}");
            }
        }
        // One audit record for the deny; per job its submit; per lease a transition and Gate B's
        // decision. The ten leases took the budget's ten tokens, the refused dispatches none.
        assert_eq!(verify_chain(&*store, &t).await, Ok(1 + 20 + 2 * 10), "{name}");
        let mut eleventh = submission(job(&t, JobState::Queued, 400));
        eleventh.budgets = vec![Budget { key: "b|shared".into(), limit: tight.clone() }];
        assert!(
            matches!(store.submit(eleventh, 0).await.unwrap(), SubmitOutcome::Throttled { .. }),
            "{name}: the budget is spent"
        );
    }
}

fn pending_request(j: &mut JobRecord, at: i64, quorum: u32) -> ApprovalRecord {
    let id = ApprovalId::generate(at, random());
    j.approval_id = Some(id.clone());
    ApprovalRecord {
        id,
        tenant: j.tenant.clone(),
        job_id: j.id.clone(),
        request: Request {
            job_hash: j.job_hash.clone(),
            snapshot_hash: "sha256:s".into(),
            rule_ids: vec!["r".into()],
            rule_hashes: vec!["sha256:r".into()],
            requested_by: "agent".into(),
            created_at: at,
            expires_at: at + 1_000_000,
            quorum,
            approvers: vec![],
            status: Status::Pending,
        },
        decided_at: None,
        decided_by: None,
    }
}

#[tokio::test]
async fn overview_and_approval_summary_count_one_tenant_exactly() {
    for (name, store, _schema) in stores().await {
        let (t, other) = (tenant("acme"), tenant("other"));
        let mut requests = Vec::new();
        for (who, at, quorum) in [(&t, 100, 2), (&t, 300, 1), (&other, 50, 1)] {
            let mut j = job(who, JobState::AwaitingApproval, at);
            let approval = pending_request(&mut j, at, quorum);
            let mut s = submission(j);
            s.approval = Some(approval.clone());
            store.submit(s, 0).await.unwrap();
            requests.push(approval);
        }
        let mut bypassed = submission(job(&t, JobState::Queued, 400));
        bypassed.audit.at = 5_000;
        bypassed.audit.data = json!({"outcome": "accepted", "fail_mode": "open", "gate_a_bypassed": true});
        store.submit(bypassed, 0).await.unwrap();
        let mut old = submission(job(&t, JobState::Queued, 10));
        old.audit.data = json!({"outcome": "accepted", "gate_a_bypassed": true});
        store.submit(old, 0).await.unwrap();

        let summary = store.approval_summary(&t).await.unwrap();
        assert_eq!((summary.pending, summary.oldest_created_at), (2, Some(100)), "{name}");
        assert_eq!(summary.newest_id.as_ref(), Some(&requests[1].id), "{name}");
        assert_eq!(summary.votes, 0, "{name}");

        // A vote keeps the request pending but changes the summary; a decision removes it.
        let vote = |record: &ApprovalRecord, status: Status, event: Option<Event>, at: i64| ApprovalChange {
            tenant: t.clone(),
            id: record.id.clone(),
            expected_status: Status::Pending,
            expected_approvers: 0,
            request: Request { approvers: vec!["alice".into()], status, ..record.request.clone() },
            job_event: event,
            replacement: None,
            audit: vec![draft(Kind::ApprovalVote, record.id.as_str())],
            at,
            actor: "alice".into(),
            decided_under: None,
        };
        store.change_approval(vote(&requests[0], Status::Pending, None, 150)).await.unwrap();
        let voted = store.approval_summary(&t).await.unwrap();
        assert_eq!((voted.votes, voted.pending), (1, 2), "{name}");
        store
            .change_approval(vote(&requests[1], Status::Approved, Some(Event::Approved), 350))
            .await
            .unwrap();
        let decided = store.approval_summary(&t).await.unwrap();
        assert_eq!((decided.pending, decided.votes), (1, 1), "{name}");

        let o = store.overview(&t, 1_000).await.unwrap();
        assert_eq!(o.jobs.get(&JobState::AwaitingApproval), Some(&1), "{name}: {o:?}");
        assert_eq!(o.jobs.get(&JobState::Queued), Some(&3), "{name}: {o:?}");
        assert_eq!((o.pending_approvals, o.oldest_pending_at), (1, Some(100)), "{name}");
        assert_eq!(
            (o.dlq_depth, o.fail_open_gate_a, o.fail_open_gate_b),
            (0, 1, 0),
            "{name}: only the last hour"
        );
        // A window far into the chain: found by searching the sequence, counted exactly.
        for at in [200_000, 300_000] {
            let mut d = draft(Kind::GateBDecision, "job");
            d.at = at;
            d.data = json!({"outcome": "bypassed", "gate_b_bypassed": true});
            store.append_audit(&t, d, None).await.unwrap();
        }
        let recent = store.overview(&t, 250_000).await.unwrap();
        assert_eq!((recent.fail_open_gate_a, recent.fail_open_gate_b), (0, 1), "{name}");
        let wider = store.overview(&t, 150_000).await.unwrap();
        assert_eq!((wider.fail_open_gate_a, wider.fail_open_gate_b), (0, 2), "{name}");
        let theirs = store.overview(&other, 0).await.unwrap();
        assert_eq!((theirs.pending_approvals, theirs.jobs.values().sum::<u64>()), (1, 1), "{name}");
    }
}

/// Issue 11: the last live platform admin key cannot be revoked, even by two revocations of the
/// last two racing each other; tenant admins and other platform keys are not counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_last_platform_admin_key_cannot_be_revoked() {
    for (name, store, _schema) in stores().await {
        let platform = tenant(TenantId::PLATFORM);
        let key = |tenant: &TenantId, name: &str, roles: &[Role]| KeyRecord {
            id: KeyId::generate(1, random()),
            tenant: tenant.clone(),
            name: name.into(),
            roles: roles.iter().copied().collect::<Roles>(),
            secret_hash: random_hash(),
            created_at: 1,
            revoked_at: None,
            principal: None,
        };
        let admins = [key(&platform, "admin-a", &[Role::Admin]), key(&platform, "admin-b", &[Role::Admin])];
        let others =
            [key(&platform, "ops", &[Role::Operator]), key(&tenant("acme"), "tenant-admin", &[Role::Admin])];
        for k in admins.iter().chain(&others) {
            store.create_key(k.clone(), draft(Kind::KeyCreated, k.id.as_str())).await.unwrap();
        }
        let revoke = |k: &KeyRecord| {
            let (store, id) = (Arc::clone(&store), k.id.clone());
            tokio::spawn(async move { store.revoke_key(&id, 5, draft(Kind::KeyRevoked, id.as_str())).await })
        };
        let (a, b) = (revoke(&admins[0]), revoke(&admins[1]));
        let results = [a.await.unwrap(), b.await.unwrap()];
        let refused = results
            .iter()
            .filter(|r| matches!(r, Err(StoreError::Conflict(m)) if m == airlock_store::LAST_PLATFORM_ADMIN))
            .count();
        assert_eq!((refused, results.iter().filter(|r| r.is_ok()).count()), (1, 1), "{name}: {results:?}");
        let live: Vec<KeyRecord> = store
            .keys(Some(&platform))
            .await
            .unwrap()
            .into_iter()
            .filter(KeyRecord::is_live_platform_admin)
            .collect();
        assert_eq!(live.len(), 1, "{name}");
        for k in &others {
            store.revoke_key(&k.id, 6, draft(Kind::KeyRevoked, k.id.as_str())).await.unwrap();
        }
    }
}

fn random_hash() -> [u8; 32] {
    [NEXT.fetch_add(1, Ordering::Relaxed); 32]
}

/// Issue 11: a key stored with its plain hash is re-hashed with the server's pepper, once.
#[tokio::test]
async fn a_key_is_rehashed_only_from_its_current_hash() {
    for (name, store, _schema) in stores().await {
        let key = KeyRecord {
            id: KeyId::generate(1, random()),
            tenant: tenant("acme"),
            name: "rehash".into(),
            roles: [Role::Submitter].into_iter().collect::<Roles>(),
            secret_hash: random_hash(),
            created_at: 1,
            revoked_at: None,
            principal: None,
        };
        store.create_key(key.clone(), draft(Kind::KeyCreated, key.id.as_str())).await.unwrap();
        let new = random_hash();
        store.rehash_key(&key.id, &key.secret_hash, &new).await.unwrap();
        assert_eq!(store.key_by_secret(&new).await.unwrap().map(|k| k.id), Some(key.id.clone()), "{name}");
        assert_eq!(store.key_by_secret(&key.secret_hash).await.unwrap(), None, "{name}");
        assert!(
            matches!(
                store.rehash_key(&key.id, &key.secret_hash, &random_hash()).await,
                Err(StoreError::NotFound)
            ),
            "{name}: a second re-hash from the old hash finds nothing"
        );
    }
}

/// Issue 11: `sslmode` in a PostgreSQL URL is honoured (`require`, `verify-ca`, `verify-full`
/// with `sslrootcert`), against the test server's own certificate (Debian's snakeoil, issued
/// for `localhost`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_connections_use_tls_as_sslmode_asks() {
    let Some(schema) = PgSchema::create().await else { return };
    let (client, connection) = tokio_postgres::connect(&schema.base, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let encrypted = async |url: &str| -> Result<bool, String> {
        // A dropped store's backends leave `pg_stat_activity` a moment after their sockets
        // close: wait them out, so that only this store's connections are read.
        for _ in 0..500 {
            let open = client
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
                    &[&schema.name],
                )
                .await
                .unwrap();
            if open.get::<_, i64>(0) == 0 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let store = PgStore::connect(url).await.map_err(|e| e.to_string())?;
        store.keys(None).await.map_err(|e| e.to_string())?;
        let row = client
            .query_one(
                "SELECT coalesce(bool_and(s.ssl), false) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
                 WHERE a.application_name = $1",
                &[&schema.name],
            )
            .await
            .unwrap();
        drop(store);
        Ok(row.get(0))
    };
    let root = "/etc/ssl/certs/ssl-cert-snakeoil.pem";
    let url = schema.url();
    assert_eq!(encrypted(&url).await, Ok(false), "no sslmode: in the clear, as before");
    assert_eq!(encrypted(&format!("{url}&sslmode=require")).await, Ok(true));
    let by_name = url.replace("127.0.0.1", "localhost");
    assert_eq!(encrypted(&format!("{by_name}&sslmode=verify-full&sslrootcert={root}")).await, Ok(true));
    assert_eq!(encrypted(&format!("{url}&sslmode=verify-ca&sslrootcert={root}")).await, Ok(true));
    let wrong_name = encrypted(&format!("{url}&sslmode=verify-full&sslrootcert={root}")).await;
    assert!(wrong_name.as_ref().is_err_and(|e| e.contains("cannot connect")), "{wrong_name:?}");
    let stranger = "/etc/ssl/certs/ca-certificates.crt";
    let untrusted = encrypted(&format!("{by_name}&sslmode=verify-full&sslrootcert={stranger}")).await;
    assert!(untrusted.is_err(), "a server certificate no given root signed was accepted");
    let missing = encrypted(&format!("{url}&sslmode=verify-full")).await;
    assert!(missing.as_ref().is_err_and(|e| e.contains("need `sslrootcert=FILE`")), "{missing:?}");
}

/// The write one row of [`every_move_kind_commits_the_same_record_and_chain_in_both_stores`]
/// makes.
#[derive(Clone)]
enum Input {
    Dispatch(Box<DispatchAction>, Option<u64>),
    /// Gate B needs a fresh approval of a job whose approved request went stale: the row's job
    /// is submitted with that request, and the dispatch replaces it.
    NeedsApproval,
    Finish {
        token: &'static str,
        live_at: Option<i64>,
        finish: Finish,
    },
    /// A move by an event alone (a cancellation).
    Transition(Event),
    /// An operator's retry from the DLQ.
    OperatorRetry,
    /// An operator's discard from the DLQ.
    Discard,
    /// A change of the job's pending request (quorum 2): `votes` approvers after it, read with
    /// `read` approvers; `replace` opens a fresh request.
    Approval {
        status: Status,
        votes: usize,
        event: Option<Event>,
        replace: bool,
        read: usize,
        decided_under: Option<u64>,
    },
}

/// How a row starts: the job as submitted, leased under `tok` until 1 000, leased and then
/// cancelled (a lease still on a job no longer leased), awaiting approval, or dead-lettered
/// after its lease (and then discarded from the DLQ).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Start {
    Queued,
    Leased,
    Cancelled,
    AwaitingApproval,
    DeadLettered,
    Discarded,
}

/// What a row's write must come to.
#[derive(Clone, Debug, PartialEq)]
enum Expect {
    Applied,
    Throttled(u64),
    Gone,
    Conflict,
    Stale,
    Invalid,
}

#[tokio::test]
async fn every_move_kind_commits_the_same_record_and_chain_in_both_stores() {
    let t = tenant("acme");
    let roomy = Limit { rate: 100, per_secs: 1, burst: 100, key: vec![LimitKey::Tenant] };
    let spent = Limit { rate: 1, per_secs: 60, burst: 1, key: vec![LimitKey::Tenant] };
    let lease = |token: &str, budgets: Vec<Budget>| DispatchAction::Lease {
        lease: Lease { token: token.into(), expires_at: 1_000, worker: "w".into() },
        budgets,
    };
    let finish = |token, live_at, finish| Input::Finish { token, live_at, finish };
    let rows: Vec<(&str, Start, Input, Expect)> = vec![
        (
            "lease",
            Start::Queued,
            Input::Dispatch(
                Box::new(lease("new", vec![Budget { key: "b|roomy".into(), limit: roomy }])),
                Some(1),
            ),
            Expect::Applied,
        ),
        (
            "lease over a spent budget",
            Start::Queued,
            Input::Dispatch(
                Box::new(lease("new", vec![Budget { key: "b|spent".into(), limit: spent.clone() }])),
                Some(1),
            ),
            Expect::Throttled(59_750),
        ),
        ("deny", Start::Queued, Input::Dispatch(Box::new(DispatchAction::Deny), Some(1)), Expect::Applied),
        ("needs approval", Start::Queued, Input::NeedsApproval, Expect::Applied),
        (
            "requeue, counted",
            Start::Queued,
            Input::Dispatch(Box::new(DispatchAction::Requeue { not_before: 900, counted: true }), None),
            Expect::Applied,
        ),
        (
            "requeue, uncounted",
            Start::Queued,
            Input::Dispatch(Box::new(DispatchAction::Requeue { not_before: 900, counted: false }), Some(1)),
            Expect::Applied,
        ),
        (
            "dead letter at gate b",
            Start::Queued,
            Input::Dispatch(Box::new(DispatchAction::DeadLetter { reason: "no_worker".into() }), None),
            Expect::Applied,
        ),
        (
            "succeed",
            Start::Leased,
            finish("tok", Some(500), Finish::Succeeded { result: json!({"ok": 1}) }),
            Expect::Applied,
        ),
        (
            "retry",
            Start::Leased,
            finish("tok", Some(500), Finish::Retry { error: "boom".into() }),
            Expect::Applied,
        ),
        (
            "fail",
            Start::Leased,
            finish("tok", Some(500), Finish::Failed { error: "bad".into() }),
            Expect::Applied,
        ),
        (
            "dead letter after attempts",
            Start::Leased,
            finish("tok", None, Finish::DeadLetter { reason: "out of attempts".into() }),
            Expect::Applied,
        ),
        (
            "dispatch of a leased job",
            Start::Leased,
            Input::Dispatch(Box::new(DispatchAction::Deny), Some(1)),
            Expect::Gone,
        ),
        (
            "finish under another token",
            Start::Leased,
            finish("other", Some(500), Finish::Failed { error: "x".into() }),
            Expect::Conflict,
        ),
        (
            "finish of a lapsed lease",
            Start::Leased,
            finish("tok", Some(1_001), Finish::Failed { error: "x".into() }),
            Expect::Conflict,
        ),
        (
            "finish of a cancelled job",
            Start::Cancelled,
            finish("tok", Some(500), Finish::Failed { error: "x".into() }),
            Expect::Conflict,
        ),
        (
            "dispatch under a superseded snapshot",
            Start::Queued,
            Input::Dispatch(Box::new(DispatchAction::Deny), Some(0)),
            Expect::Stale,
        ),
        ("cancel of a leased job", Start::Leased, Input::Transition(Event::Cancel), Expect::Applied),
        ("cancel of a dead letter", Start::DeadLettered, Input::Transition(Event::Cancel), Expect::Invalid),
        ("operator retry", Start::DeadLettered, Input::OperatorRetry, Expect::Applied),
        ("operator retry of a discarded job", Start::Discarded, Input::OperatorRetry, Expect::Conflict),
        ("discard", Start::DeadLettered, Input::Discard, Expect::Applied),
        ("discard of a discarded job", Start::Discarded, Input::Discard, Expect::Conflict),
        ("discard of a queued job", Start::Queued, Input::Discard, Expect::Conflict),
        (
            "vote short of the quorum",
            Start::AwaitingApproval,
            Input::Approval {
                status: Status::Pending,
                votes: 1,
                event: None,
                replace: false,
                read: 0,
                decided_under: Some(1),
            },
            Expect::Applied,
        ),
        (
            "approval",
            Start::AwaitingApproval,
            Input::Approval {
                status: Status::Approved,
                votes: 2,
                event: Some(Event::Approved),
                replace: false,
                read: 0,
                decided_under: Some(1),
            },
            Expect::Applied,
        ),
        (
            "rejection",
            Start::AwaitingApproval,
            Input::Approval {
                status: Status::Rejected,
                votes: 0,
                event: Some(Event::Rejected),
                replace: false,
                read: 0,
                decided_under: None,
            },
            Expect::Applied,
        ),
        (
            "stale request replaced",
            Start::AwaitingApproval,
            Input::Approval {
                status: Status::Stale,
                votes: 0,
                event: None,
                replace: true,
                read: 0,
                decided_under: Some(1),
            },
            Expect::Applied,
        ),
        (
            "expiry",
            Start::AwaitingApproval,
            Input::Approval {
                status: Status::Expired,
                votes: 0,
                event: Some(Event::ApprovalExpired),
                replace: false,
                read: 0,
                decided_under: None,
            },
            Expect::Applied,
        ),
        (
            "vote on a request read before another vote",
            Start::AwaitingApproval,
            Input::Approval {
                status: Status::Pending,
                votes: 1,
                event: None,
                replace: false,
                read: 1,
                decided_under: Some(1),
            },
            Expect::Conflict,
        ),
        (
            "approval under a superseded snapshot",
            Start::AwaitingApproval,
            Input::Approval {
                status: Status::Approved,
                votes: 2,
                event: Some(Event::Approved),
                replace: false,
                read: 0,
                decided_under: Some(0),
            },
            Expect::Stale,
        ),
    ];
    // The same jobs, requests and budgets in every store, so that records and chains compare.
    let jobs: Vec<JobRecord> = (0..rows.len()).map(|i| job(&t, JobState::Queued, 100 + i as i64)).collect();
    let mut requests = BTreeMap::new();
    let mut replacements = BTreeMap::new();
    for (i, (_, _, input, _)) in rows.iter().enumerate() {
        match input {
            Input::NeedsApproval => {
                let mut j = jobs[i].clone();
                let mut old = pending_request(&mut j, 100, 1);
                old.request.status = Status::Approved;
                requests.insert(i, (j, old));
                replacements.insert(i, pending_request(&mut jobs[i].clone(), 200, 1));
            }
            Input::Approval { replace, .. } => {
                let mut j = JobRecord { state: JobState::AwaitingApproval, ..jobs[i].clone() };
                let old = pending_request(&mut j, 100, 2);
                requests.insert(i, (j, old));
                if *replace {
                    replacements.insert(i, pending_request(&mut jobs[i].clone(), 200, 1));
                }
            }
            Input::Dispatch(..)
            | Input::Finish { .. }
            | Input::Transition(_)
            | Input::OperatorRetry
            | Input::Discard => {}
        }
    }
    // A submit that spends the budget of the throttled row.
    let mut spend = submission(job(&t, JobState::Queued, 50));
    spend.budgets = vec![Budget { key: "b|spent".into(), limit: spent.clone() }];
    let mut seen: Vec<(String, Vec<JobRecord>, Vec<String>)> = Vec::new();
    for (name, store, _schema) in stores().await {
        store.publish("sha256:one", "version: v1\n", None, 1, "admin").await.unwrap();
        assert_eq!(store.submit(spend.clone(), 0).await.unwrap(), SubmitOutcome::Accepted, "{name}");
        let mut finals = Vec::new();
        for (i, (row, start, input, expect)) in rows.iter().enumerate() {
            let (j, old) = match requests.get(&i) {
                Some((j, old)) => (j.clone(), Some(old.clone())),
                None => (jobs[i].clone(), None),
            };
            let mut s = submission(j.clone());
            s.approval = old;
            store.submit(s, 0).await.unwrap();
            if matches!(start, Start::Leased | Start::Cancelled | Start::DeadLettered | Start::Discarded) {
                let d = Dispatch {
                    tenant: t.clone(),
                    job_id: j.id.clone(),
                    action: lease("tok", vec![]),
                    gate_b: None,
                    at: 150,
                    audit: draft(Kind::GateBDecision, j.id.as_str()),
                    decided_under: None,
                };
                assert!(
                    matches!(store.dispatch(d).await.unwrap(), DispatchOutcome::Applied(_)),
                    "{name}: {row}"
                );
            }
            if *start == Start::Cancelled {
                store.transition(&t, &j.id, Event::Cancel, 160, "op", "cancelled").await.unwrap();
            }
            if matches!(start, Start::DeadLettered | Start::Discarded) {
                let dead = Finish::DeadLetter { reason: "out of attempts".into() };
                store.finish(&t, &j.id, "tok", Some(160), dead, 160, "w").await.unwrap();
            }
            if *start == Start::Discarded {
                store.discard_dead_letter(&t, &j.id, 170, "op").await.unwrap();
            }
            let before = store.job(&t, &j.id).await.unwrap().unwrap();
            let chain_before = verify_chain(&*store, &t).await.unwrap();
            let at = 300;
            let (plan, outcome) = match input.clone() {
                input @ (Input::Dispatch(..) | Input::NeedsApproval) => {
                    let (action, decided_under) = match (input, replacements.get(&i)) {
                        (Input::Dispatch(action, decided_under), _) => (*action, decided_under),
                        (_, Some(replacement)) => {
                            (DispatchAction::NeedsApproval { replacement: replacement.clone() }, Some(1))
                        }
                        (_, None) => panic!("{name}: {row}: no replacement request"),
                    };
                    let d = Dispatch {
                        tenant: t.clone(),
                        job_id: j.id.clone(),
                        action,
                        gate_b: Some(GateDecision { at, snapshot_version: 1, ..j.gate_a.clone() }),
                        at,
                        audit: draft(Kind::GateBDecision, j.id.as_str()),
                        decided_under,
                    };
                    let plan = plan_dispatch(d);
                    let outcome = match store.apply(plan.clone()).await.and_then(Applied::dispatched) {
                        Ok(DispatchOutcome::Applied(job)) => Ok(Some(*job)),
                        Ok(DispatchOutcome::Throttled { retry_after_ms }) => {
                            Err(Expect::Throttled(retry_after_ms))
                        }
                        Ok(DispatchOutcome::Gone) => Err(Expect::Gone),
                        Err(e) => Err(refusal(e)),
                    };
                    (Some(plan), outcome)
                }
                Input::Finish { token, live_at, finish } => {
                    let check = LeaseCheck { token: token.into(), live_at };
                    let plan = plan_finish(t.clone(), j.id.clone(), check, finish, at, "w".into());
                    let outcome = store.apply(plan.clone()).await.and_then(Applied::finished);
                    (Some(plan), outcome.map(Some).map_err(refusal))
                }
                Input::Transition(event) => {
                    let plan =
                        plan_transition(t.clone(), j.id.clone(), event, at, "op".into(), "by hand".into());
                    let outcome = store.apply(plan.clone()).await.and_then(Applied::finished);
                    (Some(plan), outcome.map(Some).map_err(refusal))
                }
                Input::OperatorRetry => {
                    let plan = plan_operator_retry(&before, at, "op".into());
                    let outcome = store.apply(plan.clone()).await.and_then(Applied::finished);
                    (Some(plan), outcome.map(Some).map_err(refusal))
                }
                Input::Discard => {
                    let plan = plan_discard(&before, at, "op".into());
                    let outcome = store.apply(plan.clone()).await.and_then(Applied::finished);
                    (Some(plan), outcome.map(Some).map_err(refusal))
                }
                Input::Approval { status, votes, event, replace: _, read, decided_under } => {
                    let current = store.approval(&t, &requests[&i].1.id).await.unwrap().unwrap();
                    let approvers = ["alice", "bob"].iter().take(votes).map(|a| (*a).to_owned()).collect();
                    let c = ApprovalChange {
                        tenant: t.clone(),
                        id: current.id.clone(),
                        expected_status: Status::Pending,
                        expected_approvers: read,
                        request: Request { approvers, status, ..current.request.clone() },
                        job_event: event,
                        replacement: replacements.get(&i).cloned(),
                        audit: vec![draft(Kind::ApprovalVote, current.id.as_str())],
                        at,
                        actor: "alice".into(),
                        decided_under,
                    };
                    match plan_approval_change(&current, c.clone()) {
                        Ok(plan) => {
                            let outcome = store.change_approval(c).await;
                            if let Ok(stored) = &outcome {
                                assert_eq!(*stored, plan.approval, "{name}: {row}: the core's request");
                                let read = store.approval(&t, &current.id).await.unwrap().unwrap();
                                assert_eq!(read, plan.approval, "{name}: {row}: stored as planned");
                            }
                            let outcome = match outcome {
                                Ok(_) => Ok(Some(store.job(&t, &j.id).await.unwrap().unwrap())),
                                Err(e) => {
                                    let unchanged = store.approval(&t, &current.id).await.unwrap().unwrap();
                                    assert_eq!(
                                        unchanged, current,
                                        "{name}: {row}: a refused change writes nothing"
                                    );
                                    Err(refusal(e))
                                }
                            };
                            (Some(plan.job), outcome)
                        }
                        Err(refused) => {
                            let outcome = store.change_approval(c).await;
                            assert!(
                                matches!(outcome, Err(StoreError::Conflict(_))),
                                "{name}: {row}: {refused}"
                            );
                            let unchanged = store.approval(&t, &current.id).await.unwrap().unwrap();
                            assert_eq!(unchanged, current, "{name}: {row}");
                            (None, Err(Expect::Conflict))
                        }
                    }
                }
            };
            let after = store.job(&t, &j.id).await.unwrap().unwrap();
            let chain_after = verify_chain(&*store, &t).await.unwrap();
            let mut expected = before.clone();
            match (expect, outcome) {
                (Expect::Applied, Ok(Some(returned))) => {
                    let plan = plan.unwrap();
                    let fields = expected.apply(&plan).unwrap();
                    assert!(!fields.is_empty() || plan.changes.is_empty(), "{name}: {row}");
                    assert_eq!(returned, expected, "{name}: {row}: the record is the core's move applied");
                    let records = u64::from(plan.transition.is_some()) + plan.audit.len() as u64;
                    assert_eq!(chain_after, chain_before + records, "{name}: {row}: transition and decision");
                }
                (Expect::Throttled(ms), Err(Expect::Throttled(got))) => {
                    assert_eq!(got, *ms, "{name}: {row}");
                    expected.apply(&plan.unwrap().throttled(got)).unwrap();
                    assert_eq!(chain_after, chain_before + 1, "{name}: {row}: the throttled decision only");
                }
                (Expect::Gone | Expect::Conflict | Expect::Stale | Expect::Invalid, Err(got)) => {
                    assert_eq!(&got, expect, "{name}: {row}");
                    assert_eq!(chain_after, chain_before, "{name}: {row}: a refused move audits nothing");
                }
                (expect, got) => panic!("{name}: {row}: expected {expect:?}, got {got:?}"),
            }
            assert_eq!(after, expected, "{name}: {row}: stored as applied");
            if let Some(replacement) = replacements.get(&i) {
                let old = &requests[&i].1;
                let stale = store.approval(&t, &old.id).await.unwrap().unwrap();
                assert_eq!(
                    (stale.request.status, stale.decided_at),
                    (Status::Stale, Some(at)),
                    "{name}: {row}"
                );
                let fresh = store.approval(&t, &replacement.id).await.unwrap().unwrap();
                assert_eq!(fresh, *replacement, "{name}: {row}");
                assert_eq!(after.approval_id.as_ref(), Some(&replacement.id), "{name}: {row}");
            }
            finals.push(after);
        }
        let chain = store.audit(&t, 0, 10_000).await.unwrap().records.into_iter().map(|r| r.hash).collect();
        seen.push((name, finals, chain));
    }
    if let [(first, records, chain), rest @ ..] = seen.as_slice() {
        for (other, other_records, other_chain) in rest {
            assert_eq!(records, other_records, "{first} and {other} store the same records");
            assert_eq!(chain, other_chain, "{first} and {other} chain the same audit records");
        }
    }
}

/// A refused write, as a row of the table expects it.
fn refusal(e: StoreError) -> Expect {
    match e {
        StoreError::Conflict(_) => Expect::Conflict,
        StoreError::Stale { .. } => Expect::Stale,
        StoreError::InvalidTransition(_) => Expect::Invalid,
        other => panic!("unexpected {other:?}"),
    }
}
