//! What every request handler shares: the store, the safety check with the active snapshot,
//! the configuration and the metrics. The clock and randomness are read here, at the edge, and
//! passed into the pure core as values.

use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use airlock_core::Millis;
use airlock_core::approval::Binding;
use airlock_core::breaker::{Breaker, BreakerConfig};
use airlock_core::defaults;
use airlock_core::dispatch::Caps;
pub use airlock_core::dispatch::FailMode;
use airlock_policy::glob::Glob;
use airlock_policy::{Evaluation, Job, Policy};
use airlock_store::Store;

use crate::error::ApiError;
use crate::metrics::Metrics;

/// One gate's fail mode, overridable per topic pattern and per risk class.
#[derive(Clone, Debug, Default)]
pub struct FailModes {
    /// The gate's mode.
    pub default: FailMode,
    /// Per-topic overrides; the first matching pattern wins over everything else.
    pub topics: Vec<(Glob, FailMode)>,
    /// Per-risk-class overrides; when a topic is in several classes, `closed` wins.
    pub risk: Vec<(String, FailMode)>,
}

impl FailModes {
    /// The mode for a topic in the given risk classes.
    pub fn for_topic(&self, topic: &str, classes: &[&str]) -> FailMode {
        if let Some((_, mode)) = self.topics.iter().find(|(g, _)| g.matches(topic)) {
            return *mode;
        }
        let by_class: Vec<FailMode> = self
            .risk
            .iter()
            .filter(|(class, _)| classes.contains(&class.as_str()))
            .map(|(_, m)| *m)
            .collect();
        if by_class.contains(&FailMode::Closed) {
            FailMode::Closed
        } else if by_class.contains(&FailMode::Open) {
            FailMode::Open
        } else {
            self.default
        }
    }

    /// Whether any setting opens a gate for `high`-risk topics (`high` lists the class's patterns).
    fn reaches_high(&self, high: &[&str]) -> Vec<String> {
        let mut reaches = Vec::new();
        if self.default == FailMode::Open {
            reaches.push("the default fail mode is `open`".to_owned());
        }
        if self.risk.iter().any(|(c, m)| c == "high" && *m == FailMode::Open) {
            reaches.push("risk class `high` is set to `open`".to_owned());
        }
        for (glob, mode) in &self.topics {
            if *mode == FailMode::Open && high.iter().any(|t| glob.matches(t) || glob.as_str() == *t) {
                reaches.push(format!("topic pattern `{glob}` is `open` and covers high-risk topics"));
            }
        }
        reaches
    }
}

/// Gate A's settings; defaults from SPEC 13.
#[derive(Clone, Debug)]
pub struct Config {
    /// Gate A's fail modes.
    pub gate_a_fail: FailModes,
    /// Gate A evaluation timeout.
    pub gate_a_timeout: Duration,
    /// Approval TTL.
    pub approval_ttl_ms: Millis,
    /// What approvals stay bound to.
    pub approval_binding: Binding,
    /// How long idempotency keys are remembered.
    pub idempotency_retention_ms: Millis,
    /// Topics whose submissions must carry an idempotency key.
    pub require_idempotency_key: Vec<Glob>,
    /// Whether `POST /api/v1/admin/faults` exists (tests and drills only).
    pub fault_injection: bool,
    /// Gate B's fail modes.
    pub gate_b_fail: FailModes,
    /// Let `open` apply to `high`-risk topics (refused at start otherwise).
    pub force_fail_open_high_risk: bool,
    /// Gate B's safety client timeout.
    pub gate_b_timeout: Duration,
    /// The breaker around Gate B's safety check.
    pub breaker: BreakerConfig,
    /// Keep the breaker in the store, shared by every process on it (distributed mode with a
    /// remote safety service), rather than in this process.
    pub shared_breaker: bool,
    /// Attempt caps and backoff.
    pub caps: Caps,
    /// Per-topic execution attempt caps; the first matching pattern wins. Configured patterns
    /// come before the built-in `mcp.**` → 1.
    pub execution_attempts_topics: Vec<(Glob, u32)>,
    /// Lease length.
    pub lease_ms: u64,
    /// Heartbeat interval workers are told to keep.
    pub heartbeat_ms: u64,
    /// Worker pools: name and the topics routed to it.
    pub pools: Vec<(String, Vec<Glob>)>,
    /// The token the safety service requires (`--role safety`); `None` elsewhere.
    pub safety_token: Option<String>,
    /// Where the safety check runs when it is not in this process (`--safety-url`).
    pub remote_safety: Option<crate::remote_safety::RemoteSafety>,
    /// The key the safety service signs its answers with (`--role safety --safety-answer-key`).
    pub safety_answer_key: Option<Arc<crate::remote_safety::AnswerSigner>>,
    /// The listener's timeouts and limits.
    pub http: crate::listener::HttpLimits,
    /// What a dry-run with a candidate policy may cost.
    pub dry_run: DryRunLimits,
    /// Failed authentications from one source address in a minute before it gets 429.
    pub auth_failures_per_minute: u32,
    /// Whether `/metrics` needs a valid key (`metrics.require_key`).
    pub metrics_require_key: bool,
    /// How often signed audit checkpoints are exported (`audit.checkpoint_ms`).
    pub audit_checkpoint: Duration,
    /// How API keys are hashed (with the server's key pepper, or plain).
    pub key_hasher: crate::auth::KeyHasher,
}

/// The budget of a dry-run (simulate, explain, diff) with a candidate policy (config section
/// `dry_run:`); defaults from the one defaults table.
#[derive(Clone, Debug)]
pub struct DryRunLimits {
    /// Largest body carrying a candidate, in bytes.
    pub candidate_bytes_max: usize,
    /// Time to compile the candidate and evaluate the job, together.
    pub budget: Duration,
    /// Total compiled size of the candidate's regexes, in bytes.
    pub regex_bytes_max: usize,
}

impl Default for DryRunLimits {
    fn default() -> Self {
        Self {
            candidate_bytes_max: defaults::CANDIDATE_BODY_BYTES_MAX,
            budget: Duration::from_millis(defaults::CANDIDATE_BUDGET_MS),
            regex_bytes_max: defaults::POLICY_REGEX_BYTES_MAX,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            gate_a_fail: FailModes::default(),
            gate_a_timeout: Duration::from_millis(defaults::GATE_A_TIMEOUT_MS),
            approval_ttl_ms: defaults::APPROVAL_TTL_MS,
            approval_binding: Binding::Snapshot,
            idempotency_retention_ms: defaults::IDEMPOTENCY_RETENTION_MS,
            require_idempotency_key: Vec::new(),
            fault_injection: false,
            gate_b_fail: FailModes::default(),
            force_fail_open_high_risk: false,
            gate_b_timeout: Duration::from_millis(defaults::GATE_B_CLIENT_TIMEOUT_MS),
            breaker: BreakerConfig::default(),
            shared_breaker: false,
            caps: Caps::default(),
            // A tool call through the MCP proxy runs once: the agent asks again to run it again.
            execution_attempts_topics: Glob::new(defaults::MCP_TOPICS)
                .into_iter()
                .map(|glob| (glob, defaults::MCP_EXECUTION_ATTEMPTS_MAX))
                .collect(),
            lease_ms: defaults::LEASE_MS,
            heartbeat_ms: defaults::HEARTBEAT_MS,
            pools: Vec::new(),
            safety_token: None,
            remote_safety: None,
            safety_answer_key: None,
            http: crate::listener::HttpLimits::default(),
            dry_run: DryRunLimits::default(),
            auth_failures_per_minute: defaults::AUTH_FAILURES_PER_MINUTE,
            metrics_require_key: false,
            audit_checkpoint: Duration::from_millis(defaults::AUDIT_CHECKPOINT_MS),
            key_hasher: crate::auth::KeyHasher::default(),
        }
    }
}

impl Config {
    /// The caps for a topic: the configured ones, with the topic's execution-attempt override.
    pub fn caps_for(&self, topic: &str) -> Caps {
        let execution_attempts_max = self
            .execution_attempts_topics
            .iter()
            .find(|(g, _)| g.matches(topic))
            .map_or(self.caps.execution_attempts_max, |(_, n)| *n);
        Caps { execution_attempts_max, ..self.caps }
    }

    /// Whether `pool` takes every topic: the pool `default` when no pools are configured.
    pub fn pool_takes_all(&self, pool: &str) -> bool {
        self.pools.is_empty() && pool == "default"
    }

    /// Whether `pool` takes `topic`. Without configured pools, the pool `default` takes all.
    pub fn pool_takes(&self, pool: &str, topic: &str) -> Option<bool> {
        if self.pools.is_empty() {
            return (pool == "default").then_some(true);
        }
        self.pools
            .iter()
            .find(|(name, _)| name == pool)
            .map(|(_, globs)| globs.iter().any(|g| g.matches(topic)))
    }

    /// Refuses a fail-open setting that reaches `high`-risk topics unless forced; returns the
    /// warnings to log when it is forced.
    pub fn check_fail_open(&self, policy: &Policy) -> Result<Vec<String>, String> {
        let high: Vec<&str> = policy
            .risk_classes()
            .iter()
            .filter(|c| c.name == "high")
            .flat_map(|c| c.topics.iter().map(Glob::as_str))
            .collect();
        let reaches: Vec<String> = if high.is_empty() {
            Vec::new()
        } else {
            let gate_a = self.gate_a_fail.reaches_high(&high).into_iter().map(|r| format!("Gate A: {r}"));
            gate_a
                .chain(self.gate_b_fail.reaches_high(&high).into_iter().map(|r| format!("Gate B: {r}")))
                .collect()
        };
        if reaches.is_empty() {
            return Ok(Vec::new());
        }
        let warnings: Vec<String> =
            reaches.into_iter().map(|r| format!("fail-open reaches high-risk topics: {r}")).collect();
        if self.force_fail_open_high_risk {
            Ok(warnings)
        } else {
            Err(format!("{}; pass --force-fail-open-high-risk to accept this", warnings.join("; ")))
        }
    }
}

/// The active snapshot, compiled.
#[derive(Debug)]
pub struct ActivePolicy {
    /// Its version.
    pub version: u64,
    /// The compiled policy (its hash is the snapshot hash).
    pub policy: Policy,
}

/// A failure injected into the safety check, for tests and outage drills.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Every check fails at once.
    Unavailable,
    /// Every check answers this late, under the snapshot active when it was asked (past the
    /// timeout, it times out).
    Slow(Duration),
}

/// Why the safety check could not answer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SafetyError {
    /// It failed.
    #[error("safety check unavailable: {0}")]
    Unavailable(String),
    /// It did not answer in time.
    #[error("safety check timed out after {0:?}")]
    Timeout(Duration),
}

impl SafetyError {
    /// The `reason` label of `airlock_safety_check_failures_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Unavailable(_) => "unavailable",
            Self::Timeout(_) => "timeout",
        }
    }
}

/// The in-process safety check: one policy evaluation against the active snapshot.
pub struct Safety {
    active: RwLock<Arc<ActivePolicy>>,
    fault: Mutex<Option<Fault>>,
    remote: Option<crate::remote_safety::RemoteSafety>,
}

/// A safety check's answer.
pub struct Checked {
    /// The snapshot it was made under.
    pub active: Arc<ActivePolicy>,
    /// The decision.
    pub evaluation: Evaluation,
    /// For a plan job decided in this process: every change's decision (`evaluation` is their
    /// most restrictive).
    pub plan: Option<airlock_plan::PlanEvaluation>,
    /// How long the evaluation took.
    pub elapsed: Duration,
}

impl Checked {
    /// The decision as the core records it.
    pub fn decided(&self) -> airlock_core::decided::Decided<'_> {
        airlock_core::decided::Decided {
            policy: &self.active.policy,
            version: self.active.version,
            evaluation: &self.evaluation,
            plan: self.plan.as_ref(),
        }
    }
}

impl Safety {
    /// A safety check starting with `active`, in this process or, with `remote`, in the
    /// safety service.
    pub fn new(active: ActivePolicy, remote: Option<crate::remote_safety::RemoteSafety>) -> Self {
        Self { active: RwLock::new(Arc::new(active)), fault: Mutex::new(None), remote }
    }

    /// The active snapshot.
    pub fn active(&self) -> Arc<ActivePolicy> {
        match self.active.read() {
            Ok(guard) => Arc::clone(&guard),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Makes `active` the snapshot every later check uses, unless a later version is already
    /// active here: versions only move forward (a rollback is a new version), so two publishes
    /// answered out of order, or a publish racing the refresh sweep, never leave this process
    /// deciding under the older one. Whether it was activated.
    pub fn activate(&self, active: ActivePolicy) -> bool {
        let mut guard = match self.active.write() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        if active.version <= guard.version {
            return false;
        }
        *guard = Arc::new(active);
        true
    }

    /// Sets or clears the injected fault.
    pub fn inject(&self, fault: Option<Fault>) {
        if let Ok(mut guard) = self.fault.lock() {
            *guard = fault;
        }
    }

    fn fault(&self) -> Option<Fault> {
        self.fault.lock().ok().and_then(|f| *f)
    }

    /// Evaluates `job` against the active snapshot within `timeout`.
    pub async fn check(&self, job: &Job, timeout: Duration) -> Result<Checked, SafetyError> {
        let evaluate = async {
            // A slow check is asked under the snapshot active when it starts and answers late,
            // as a slow safety service does: the window in which a publish can supersede it.
            let active = self.active();
            match self.fault() {
                Some(Fault::Unavailable) => return Err(SafetyError::Unavailable("injected fault".into())),
                Some(Fault::Slow(delay)) => tokio::time::sleep(delay).await,
                None => {}
            }
            let started = Instant::now();
            let (evaluation, plan) = match &self.remote {
                // Evaluation is synchronous, so the timeout around this future could not stop
                // it: the engine asks this deadline as it goes and gives up past it.
                None => airlock_plan::evaluate_any_within(&active.policy, job, &mut || {
                    started.elapsed() < timeout
                })
                .ok_or(SafetyError::Timeout(timeout))?,
                Some(remote) => (remote.evaluate(job, active.version, &active.policy).await?, None),
            };
            Ok(Checked { active, evaluation, plan, elapsed: started.elapsed() })
        };
        tokio::time::timeout(timeout, evaluate).await.map_err(|_| SafetyError::Timeout(timeout))?
    }
}

/// Why the active snapshot could not be refreshed from the store.
#[derive(Debug, thiserror::Error)]
pub enum RefreshError {
    /// The store failed.
    #[error("store: {0}")]
    Store(#[from] airlock_store::StoreError),
    /// The stored snapshot does not compile (a newer Airlock published it?).
    #[error("stored snapshot {0} does not compile")]
    Policy(u64),
}

impl From<RefreshError> for ApiError {
    fn from(e: RefreshError) -> Self {
        match e {
            RefreshError::Store(e) => e.into(),
            RefreshError::Policy(_) => ApiError::internal(e),
        }
    }
}

/// Shared state of the HTTP service.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

struct Inner {
    store: Arc<dyn Store>,
    safety: Safety,
    config: Config,
    metrics: Metrics,
    breaker: Mutex<Breaker>,
    work: crate::claim_wait::Work,
    queued_here: tokio::sync::Notify,
    in_flight: Mutex<std::collections::HashSet<airlock_core::ids::JobId>>,
    snapshots: crate::remote_safety::Snapshots,
    keys: crate::auth::KeyCache,
    /// Held while the store's active snapshot is loaded and compiled, so that the claims that
    /// all found their decision stale at once compile it once.
    refreshing: tokio::sync::Mutex<()>,
    /// One permit per request being served (`http.in_flight_max`).
    in_flight_slots: tokio::sync::Semaphore,
    auth_failures: crate::auth::AuthFailures,
    claim_waits: crate::claim_wait::ClaimWaits,
}

impl AppState {
    /// State over a store, with `active` as the active snapshot.
    pub fn new(store: Arc<dyn Store>, active: ActivePolicy, config: Config) -> Self {
        let breaker = Mutex::new(Breaker::new(config.breaker));
        let remote = config.remote_safety.clone();
        let in_flight_slots = tokio::sync::Semaphore::new(config.http.in_flight_max);
        Self(Arc::new(Inner {
            store,
            safety: Safety::new(active, remote),
            config,
            metrics: Metrics::default(),
            breaker,
            work: crate::claim_wait::Work::default(),
            queued_here: tokio::sync::Notify::new(),
            in_flight: Mutex::new(std::collections::HashSet::new()),
            snapshots: crate::remote_safety::Snapshots::default(),
            keys: crate::auth::KeyCache::default(),
            refreshing: tokio::sync::Mutex::new(()),
            in_flight_slots,
            auth_failures: crate::auth::AuthFailures::default(),
            claim_waits: crate::claim_wait::ClaimWaits::default(),
        }))
    }

    /// Activates the store's active snapshot when this process decides under an older one
    /// (a publish on another replica, or one that raced this process's own). With `at_least`,
    /// only if this process is behind that version.
    pub async fn refresh_policy(&self, at_least: Option<u64>) -> Result<(), RefreshError> {
        let behind = |state: &Self| at_least.is_none_or(|v| state.safety().active().version < v);
        if !behind(self) {
            return Ok(());
        }
        let _refreshing = self.0.refreshing.lock().await;
        if !behind(self) {
            return Ok(());
        }
        let Some(stored) = self.store().active_snapshot().await? else { return Ok(()) };
        if stored.version <= self.safety().active().version {
            return Ok(());
        }
        let (policy, _) =
            airlock_policy::compile(&stored.source).map_err(|_| RefreshError::Policy(stored.version))?;
        if self.safety().activate(ActivePolicy { version: stored.version, policy }) {
            tracing::info!(version = stored.version, hash = %stored.hash, "activated a snapshot published elsewhere");
        }
        Ok(())
    }

    /// The slots of requests being served: a request that finds none is shed.
    pub fn in_flight_slots(&self) -> &tokio::sync::Semaphore {
        &self.0.in_flight_slots
    }

    /// Failed authentications by source address.
    pub fn auth_failures(&self) -> &crate::auth::AuthFailures {
        &self.0.auth_failures
    }

    /// Long-poll claims waiting, by key.
    pub(crate) fn claim_waits(&self) -> &crate::claim_wait::ClaimWaits {
        &self.0.claim_waits
    }

    /// Keys recently authenticated.
    pub fn keys(&self) -> &crate::auth::KeyCache {
        &self.0.keys
    }

    /// Snapshots compiled by the safety service, by version.
    pub fn snapshots(&self) -> &crate::remote_safety::Snapshots {
        &self.0.snapshots
    }

    /// Marks a job as being run through Gate B by this process, so that concurrent claims
    /// skip it instead of racing for it; `false` when another claim already has it.
    pub fn begin_dispatch(&self, id: &airlock_core::ids::JobId) -> bool {
        self.0.in_flight.lock().is_ok_and(|mut set| set.insert(id.clone()))
    }

    /// Ends what [`AppState::begin_dispatch`] began.
    pub fn end_dispatch(&self, id: &airlock_core::ids::JobId) {
        if let Ok(mut set) = self.0.in_flight.lock() {
            set.remove(id);
        }
    }

    /// The breaker around Gate B's safety check.
    pub fn breaker(&self) -> &Mutex<Breaker> {
        &self.0.breaker
    }

    /// What wakes claimers waiting for work (a job became dispatchable).
    pub fn work(&self) -> &crate::claim_wait::Work {
        &self.0.work
    }

    /// After this process committed a job as queued: wakes its claimers and its outbox relay.
    /// (Wake-ups from other processes wake only the claimers: their own relays publish.)
    pub fn queued_here(&self) {
        self.0.work.wake();
        self.0.queued_here.notify_one();
    }

    /// What the outbox relay waits for: a job this process queued.
    pub fn relay_wake(&self) -> &tokio::sync::Notify {
        &self.0.queued_here
    }

    /// The store.
    pub fn store(&self) -> &dyn Store {
        &*self.0.store
    }

    /// The safety check.
    pub fn safety(&self) -> &Safety {
        &self.0.safety
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.0.config
    }

    /// The metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.0.metrics
    }
}

/// The current time, read once per request.
pub fn now_ms() -> Millis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Ten random bytes for a new id.
pub fn random_bytes() -> Result<[u8; 10], ApiError> {
    let mut bytes = [0u8; 10];
    getrandom::fill(&mut bytes).map_err(ApiError::internal)?;
    Ok(bytes)
}
