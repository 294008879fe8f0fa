//! The simulated world: a virtual clock, an in-memory model of the store (each job a
//! `JobRecord`, every change of it a core `Move` applied with `JobRecord::apply`: Gate B's
//! through `plan_dispatch`, workers' and the lapsed-lease sweep's through `plan_finish`, fenced
//! by the move's precondition as the stores fence them, approvers' votes, rejections, expiries
//! and stale requests through `plan_approval_change`, the rest through `plan_transition` and
//! `plan_operator_retry`), a safety service with scheduled faults behind the real `Breaker`,
//! Gate A and Gate B driven by real compiled policies and `dispatch::gate_b`, workers, approvers
//! and a lossy network. One seed, one run; nothing here reads a clock or iterates a hash map.

use std::collections::{BTreeMap, BTreeSet};

use airlock_core::Millis;
use airlock_core::approval::{self, Binding, Request, Stale, Status, VoteError};
use airlock_core::audit::{Draft, Kind};
use airlock_core::breaker::{Admission, Breaker, BreakerConfig, BreakerState};
use airlock_core::decided::{Decided, Gate};
use airlock_core::defaults::{APPROVAL_TTL_MS, GATE_B_CLIENT_TIMEOUT_MS, LEASE_MS};
use airlock_core::dispatch::{self, Action, AfterAttempt, ApprovalState, Caps, FailMode, Safety};
use airlock_core::ids::{ApprovalId, JobId, TenantId};
use airlock_core::moves::{
    Answer, ApprovalChange, ApprovalWrite, Dispatch, DispatchAction, Finish, GateB, LeaseCheck, Move,
    plan_approval_change, plan_dispatch, plan_finish, plan_gate_b, plan_operator_retry, plan_transition,
};
use airlock_core::record::{self, ApprovalRecord, Budget, DispatchState, GateDecision, JobRecord};
use airlock_core::state::{Event, JobState};
use airlock_core::throttle::{self, Bucket, Take};
use airlock_core::votes::{self, Ballot, Cast, Counted, Refused};
use airlock_policy::{Decision, Evaluation, Job, Policy};
use serde_json::json;

use super::coverage::Coverage;
use super::rng::Rng;

/// What a step returns: `Err` is an invariant violation, already formatted with seed, step
/// and job.
pub type Outcome = Result<(), String>;

/// Where the virtual clock starts: 2025-01-01T00:00:00Z.
const EPOCH: Millis = 1_735_689_600_000;
/// Rounds the drain may take before the run counts as stuck.
const DRAIN_ROUNDS: u32 = 2_000;
/// Topics the workload submits; the first three are high risk (SPEC 3.1's `risk.high`).
const TOPICS: [&str; 5] = [
    "infra.resource.delete",
    "infra.cluster.recreate",
    "infra.security_group.update",
    "infra.resource.update",
    "infra.dns.read",
];
const HIGH_RISK_TOPICS: usize = 3;
const ENVS: [&str; 2] = ["production", "staging"];
const TENANTS: [&str; 2] = ["acme", "globex"];
const PRINCIPALS: [&str; 2] = ["agent-1", "agent-2"];
const APPROVERS: [&str; 3] = ["alice", "bob", "carol"];

/// How much to print.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TraceMode {
    /// Nothing (the 10,000-seed sweep).
    Off,
    /// Every event, as it happens (a replayed seed).
    Print,
    /// Every event, kept for the caller (to show the tail of a failing seed).
    Keep,
}

/// Which fail mode Gate B uses for a job when the safety check is unavailable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailPolicy {
    /// Closed everywhere (the default).
    Closed,
    /// Open everywhere (high risk explicitly forced).
    Open,
    /// Open, overridden to closed for high-risk topics.
    OpenExceptHighRisk,
}

/// One run's knobs, drawn from the seed: half the seeds use the defaults, half use short caps
/// and times so that dead-lettering, breaker cycles and expiries actually happen.
#[derive(Clone, Debug)]
pub struct Config {
    pub(super) caps: Caps,
    pub(super) breaker: BreakerConfig,
    pub(super) fail: FailPolicy,
    pub(super) binding: Binding,
    pub(super) lease_ms: Millis,
    pub(super) approval_ttl_ms: Millis,
    pub(super) loss_per_mille: u64,
    pub(super) dup_per_mille: u64,
    pub(super) jobs_max: usize,
    pub(super) steps: u32,
    pub(super) workers: usize,
    /// Invariants beyond the brief, each of which the core fails today.
    pub(super) strict: Strict,
    /// A deliberate defect in the driver, to prove that the invariants catch it.
    pub(super) sabotage: Option<Sabotage>,
}

/// What a run checks beyond the defaults, and whether its driver is deliberately broken.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Options {
    /// Invariants beyond the brief.
    pub strict: Strict,
    /// A deliberate defect.
    pub sabotage: Option<Sabotage>,
}

/// Defects a careless scheduler could have; the checker must catch each within a few hundred
/// seeds, or its invariants are vacuous.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sabotage {
    /// Leases a job that Gate B denied.
    LeaseOnDeny,
    /// Acts on a decision made under a snapshot that is no longer active.
    ActOnOldSnapshot,
    /// Honours a duplicated claim with a second lease.
    SecondLease,
    /// Requeues instead of dead-lettering when scheduling attempts run out.
    IgnoreCaps,
}

/// Invariants stronger than the ones every run checks, switched on one at a time by the tests
/// that demonstrate a core bug, so that the main sweep stays a regression test meanwhile.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Strict {
    /// A rule-bound approval must cover every rule that asks for a human now, with that rule's
    /// quorum (SPEC 6: "the deciding rules' content hashes are unchanged"; SPEC 7: quorum per
    /// rule).
    pub rule_coverage: bool,
    /// A throttle budget never admits more than `burst + rate × elapsed / per` in any window of
    /// the high-water clock, whatever the wall clock does (SPEC 3.4).
    pub budgets: bool,
}

impl Config {
    fn draw(rng: &mut Rng) -> Self {
        let caps = if rng.percent(50) {
            Caps::default()
        } else {
            Caps {
                scheduling_attempts_max: rng.range_u32(2, 6),
                execution_attempts_max: rng.range_u32(1, 3),
                backoff_base_ms: rng.range(100, 1_000) as u64,
                backoff_cap_ms: rng.range(2_000, 8_000) as u64,
            }
        };
        let breaker = if rng.percent(50) {
            BreakerConfig::default()
        } else {
            BreakerConfig {
                failures_to_open: rng.range_u32(1, 3),
                open_ms: rng.range(300, 5_000) as u64,
                probes: rng.range_u32(1, 3),
            }
        };
        let fail = match rng.below(3) {
            0 => FailPolicy::Closed,
            1 => FailPolicy::Open,
            _ => FailPolicy::OpenExceptHighRisk,
        };
        let binding = if rng.percent(50) { Binding::Snapshot } else { Binding::Rule };
        let lease_ms = if rng.percent(50) { LEASE_MS as Millis } else { rng.range(2_000, 10_000) };
        let approval_ttl_ms = if rng.percent(50) { APPROVAL_TTL_MS } else { rng.range(5_000, 120_000) };
        Self {
            caps,
            breaker,
            fail,
            binding,
            lease_ms,
            approval_ttl_ms,
            loss_per_mille: rng.below(80),
            dup_per_mille: rng.below(120),
            jobs_max: rng.range(8, 40) as usize,
            steps: rng.range_u32(150, 400),
            workers: rng.range(1, 4) as usize,
            strict: Strict::default(),
            sabotage: None,
        }
    }
}

/// How the safety service behaves for calls started now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Health {
    /// Answers within milliseconds.
    Up,
    /// Refuses connections at once.
    Down,
    /// Never answers within the client timeout.
    Slow,
    /// Answers, but late (within the timeout): long enough for a publish to land mid-call.
    Sluggish,
    /// Alternates up and down every `period_ms`.
    Flapping { period_ms: Millis },
}

/// A lease as the store holds it, its token a number here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Lease {
    pub(super) token: u64,
    pub(super) expires_at: Millis,
}

/// A job as the store holds it.
pub(super) struct SimJob {
    pub(super) job: Job,
    /// The job hash, computed from the stored content once: the content never changes.
    pub(super) hash: String,
    /// The record the stores would hold, changed only by core moves.
    pub(super) record: JobRecord,
    /// The safety check in flight for it, if any (a claimed job is not offered again).
    pub(super) checking: Option<u64>,
    /// Approval requests, newest last.
    pub(super) requests: Vec<Request>,
    /// Marked `gate_b_bypassed`.
    pub(super) bypassed: bool,
    /// Accepted successful completions.
    pub(super) successes: u32,
    pub(super) high_risk: bool,
}

impl SimJob {
    pub(super) fn state(&self) -> JobState {
        self.record.state
    }

    pub(super) fn scheduling_attempts(&self) -> u32 {
        self.record.dispatch.scheduling_attempts
    }

    pub(super) fn execution_attempts(&self) -> u32 {
        self.record.dispatch.execution_attempts
    }

    pub(super) fn not_before(&self) -> Millis {
        self.record.dispatch.not_before
    }

    /// The lease on the record: a job that left `leased` by success, failure or cancellation
    /// keeps it, as in the stores, but no store honours it any more (the move's precondition
    /// asks for `leased`).
    pub(super) fn lease(&self) -> Option<Lease> {
        let lease = self.record.dispatch.lease.as_ref()?;
        Some(Lease { token: lease.token.parse().unwrap_or(u64::MAX), expires_at: lease.expires_at })
    }
}

/// What Gate B recorded when it granted a lease, for the invariant check of the same step.
#[derive(Clone, Debug)]
pub(super) struct Grant {
    pub(super) job: usize,
    pub(super) token: u64,
    /// The safety check had no answer.
    pub(super) unavailable: bool,
    pub(super) bypassed: bool,
    pub(super) fail_mode: FailMode,
    /// The decision and the snapshot it was made under, when there was one.
    pub(super) decision: Option<(Decision, String)>,
    /// The approval the lease relied on (`require_human`).
    pub(super) approval: Option<Request>,
    /// Gate B's budgets admitted it now.
    pub(super) charged_now: bool,
}

/// A safety check in flight.
#[derive(Clone, Copy, Debug)]
struct Check {
    id: u64,
    job: usize,
    worker: usize,
    due: Millis,
    answered: bool,
    timed_out: bool,
}

/// What a worker reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Report {
    Success,
    Retryable,
    Permanent,
}

/// A message on the wire.
#[derive(Clone, Copy, Debug)]
enum Msg {
    /// Claim response: the scheduler hands a lease to a worker.
    Grant { worker: usize, job: usize, token: u64 },
    /// Worker to store.
    Complete { job: usize, token: u64, report: Report },
    /// Worker to store.
    Heartbeat { job: usize, token: u64 },
}

#[derive(Clone, Copy, Debug)]
struct Envelope {
    due: Millis,
    seq: u64,
    dup: bool,
    msg: Msg,
}

/// One execution a worker believes it holds.
#[derive(Clone, Copy, Debug)]
struct Task {
    job: usize,
    token: u64,
}

struct Worker {
    alive: bool,
    tasks: Vec<Task>,
}

/// The world of one seed.
pub struct World<'p> {
    pub(super) seed: u64,
    pub(super) policies: &'p [Policy],
    rng: Rng,
    pub(super) cfg: Config,
    pub(super) now: Millis,
    /// Per throttle bucket: the latest time it was stored at, and its admissions on that
    /// clock (which, unlike the wall clock, never goes back).
    admissions: BTreeMap<String, (Millis, Vec<Millis>)>,
    pub(super) step: u32,
    /// Index of the active snapshot.
    pub(super) active: usize,
    version: u32,
    /// The snapshot the (remote) safety service evaluates with; it learns of a publish late.
    svc_known: usize,
    svc_pending: Option<(usize, Millis)>,
    health: Health,
    health_until: Millis,
    pub(super) breaker: Breaker,
    /// Probes admitted in the current half-open period, counted here, not by the breaker.
    pub(super) probes_in_period: u32,
    pub(super) jobs: Vec<SimJob>,
    workers: Vec<Worker>,
    checks: Vec<Check>,
    mail: Vec<Envelope>,
    buckets: BTreeMap<String, Bucket>,
    /// Every lease token the store would honour, with its job: the lease ledger.
    pub(super) live: BTreeMap<u64, usize>,
    /// `live` as of the previous check.
    pub(super) prev_live: BTreeSet<u64>,
    /// Leases granted in this step.
    pub(super) grants: Vec<Grant>,
    /// (job, token) pairs whose completion was applied.
    accepted: BTreeSet<(usize, u64)>,
    next_token: u64,
    next_check: u64,
    next_seq: u64,
    draining: bool,
    trace: TraceMode,
    /// Kept trace lines (`TraceMode::Keep`).
    pub lines: Vec<String>,
    /// A violation found where no `Result` could carry it (breaker bookkeeping).
    pub(super) pending_violation: Option<String>,
    /// What the run exercised.
    pub cov: Coverage,
}

macro_rules! trace {
    ($w:expr, $($arg:tt)*) => {
        if $w.trace != TraceMode::Off {
            let line = format!($($arg)*);
            $w.emit(line);
        }
    };
}

/// Runs one seed to the end and checks every invariant after every step.
pub fn run(
    seed: u64,
    policies: &[Policy],
    trace: TraceMode,
    options: Options,
) -> (Result<Coverage, String>, Vec<String>) {
    let mut world = World::new(seed, policies, trace);
    world.cfg.strict = options.strict;
    world.cfg.sabotage = options.sabotage;
    let result = world.run_all().map(|()| world.cov);
    (result, std::mem::take(&mut world.lines))
}

impl<'p> World<'p> {
    fn new(seed: u64, policies: &'p [Policy], trace: TraceMode) -> Self {
        let mut rng = Rng::new(seed);
        let cfg = Config::draw(&mut rng);
        let workers = (0..cfg.workers).map(|_| Worker { alive: true, tasks: Vec::new() }).collect();
        Self {
            seed,
            policies,
            rng,
            breaker: Breaker::new(cfg.breaker),
            cfg,
            now: EPOCH,
            admissions: BTreeMap::new(),
            step: 0,
            active: 0,
            version: 1,
            svc_known: 0,
            svc_pending: None,
            health: Health::Up,
            health_until: EPOCH,
            probes_in_period: 0,
            jobs: Vec::new(),
            workers,
            checks: Vec::new(),
            mail: Vec::new(),
            buckets: BTreeMap::new(),
            live: BTreeMap::new(),
            prev_live: BTreeSet::new(),
            grants: Vec::new(),
            accepted: BTreeSet::new(),
            next_token: 1,
            next_check: 1,
            next_seq: 0,
            draining: false,
            trace,
            lines: Vec::new(),
            pending_violation: None,
            cov: Coverage::default(),
        }
    }

    fn run_all(&mut self) -> Outcome {
        trace!(self, "config: {:?}", self.cfg);
        for step in 1..=self.cfg.steps {
            self.step = step;
            self.grants.clear();
            self.random_event()?;
            self.check()?;
        }
        self.drain()?;
        self.check_end()
    }

    pub(super) fn emit(&mut self, line: String) {
        let line = format!("[step {:>4} t=+{:>9}ms] {line}", self.step, self.now - EPOCH);
        match self.trace {
            TraceMode::Off => {}
            TraceMode::Print => println!("{line}"),
            TraceMode::Keep => self.lines.push(line),
        }
    }

    /// A violation message naming the seed, the step and the job.
    pub(super) fn violation(&self, job: Option<usize>, what: &str) -> String {
        let job = job.map_or_else(|| "-".to_owned(), |j| format!("j{j}"));
        format!(
            "invariant violated: seed {}, step {}, t=+{}ms, job {job}: {what}",
            self.seed,
            self.step,
            self.now - EPOCH
        )
    }

    pub(super) fn active_policy(&self) -> &'p Policy {
        &self.policies[self.active]
    }

    /// Commits a core move to job `j`'s record, as a store does: its precondition, then
    /// `JobRecord::apply`. A refusal here is a bug, because only legitimate moves reach this
    /// function (lost and duplicated messages are fenced first).
    fn commit(&mut self, j: usize, mv: &Move) -> Outcome {
        let (from, held) = (self.jobs[j].state(), self.jobs[j].lease());
        if let Err(refusal) = mv.precondition.check(&self.jobs[j].record) {
            return Err(self.violation(Some(j), &format!("a legitimate move was refused: {refusal}")));
        }
        if let Err(e) = self.jobs[j].record.apply(mv) {
            return Err(self.violation(Some(j), &format!("the table refused a legitimate event: {e}")));
        }
        let to = self.jobs[j].state();
        let event = mv.transition.as_ref().map(|(event, _)| *event);
        trace!(self, "j{j}: {from} --{event:?}--> {to}");
        if to != JobState::Leased
            && let Some(lease) = held
        {
            self.live.remove(&lease.token);
        }
        Ok(())
    }

    /// Moves job `j` by `event` alone (approvals, expiry, cancellation), planned by the core.
    fn transition(&mut self, j: usize, event: Event) -> Outcome {
        let record = &self.jobs[j].record;
        let mv = plan_transition(
            record.tenant.clone(),
            record.id.clone(),
            event,
            self.now,
            "sim".into(),
            format!("{event:?}"),
        );
        self.commit(j, &mv)
    }

    /// Gate B's `action` on queued job `j`, planned by the core.
    fn dispatch(&self, j: usize, action: DispatchAction) -> Move {
        let record = &self.jobs[j].record;
        plan_dispatch(Dispatch {
            tenant: record.tenant.clone(),
            job_id: record.id.clone(),
            action,
            gate_b: None,
            at: self.now,
            audit: Draft {
                at: self.now,
                kind: Kind::GateBDecision,
                subject: record.id.as_str().to_owned(),
                actor: "sim".into(),
                data: json!({}),
            },
            decided_under: None,
        })
    }

    /// A worker's (or, without `live_at`, the lapsed-lease sweep's) end of the attempt under
    /// `token`, planned by the core.
    fn finish_move(&self, j: usize, token: u64, live_at: Option<Millis>, finish: Finish) -> Move {
        let record = &self.jobs[j].record;
        let lease = LeaseCheck { token: token.to_string(), live_at };
        plan_finish(record.tenant.clone(), record.id.clone(), lease, finish, self.now, "sim".into())
    }

    fn fail_mode_for(&self, j: usize) -> FailMode {
        match self.cfg.fail {
            FailPolicy::Closed => FailMode::Closed,
            FailPolicy::Open => FailMode::Open,
            FailPolicy::OpenExceptHighRisk if self.jobs[j].high_risk => FailMode::Closed,
            FailPolicy::OpenExceptHighRisk => FailMode::Open,
        }
    }

    // ---------------------------------------------------------------- the random schedule

    fn random_event(&mut self) -> Outcome {
        match self.rng.below(100) {
            0..=9 => self.submit(),
            10..=25 => self.claim_random(),
            26..=39 => self.deliver(),
            40..=53 => self.worker_act(),
            54..=59 => self.reap(),
            60..=67 => self.approver_act(),
            68..=77 => {
                let by = self.rng.range(0, 2_000);
                self.advance(by);
                Ok(())
            }
            78..=81 => {
                let by = self.rng.range(2_000, 40_000);
                self.advance(by);
                Ok(())
            }
            82 => {
                // A jump: sometimes past a default approval TTL, usually a few minutes.
                let by = if self.rng.percent(10) {
                    APPROVAL_TTL_MS + self.rng.range(0, 3_600_000)
                } else {
                    self.rng.range(60_000, 600_000)
                };
                self.cov.clock_jumps += 1;
                self.advance(by);
                Ok(())
            }
            83 => {
                let by = self.rng.range(1, 5_000);
                self.cov.clock_backwards += 1;
                self.advance(-by);
                Ok(())
            }
            84..=85 => {
                self.publish();
                Ok(())
            }
            86..=88 => {
                self.fault();
                Ok(())
            }
            89..=90 => {
                self.crash();
                Ok(())
            }
            91..=93 => {
                self.restart();
                Ok(())
            }
            94..=95 => self.cancel(),
            96 => self.operator_retry(),
            _ => self.deliver(),
        }
    }

    fn advance(&mut self, by: Millis) {
        self.now += by;
        trace!(self, "clock {}{by} ms", if by >= 0 { "+" } else { "" });
    }

    fn publish(&mut self) {
        let next = (self.active + 1 + self.rng.index(self.policies.len() - 1)) % self.policies.len();
        self.active = next;
        self.version += 1;
        let lag = self.rng.range(0, 3_000);
        self.svc_pending = Some((next, self.now + lag));
        self.cov.publishes += 1;
        trace!(
            self,
            "publish: snapshot v{} = policy #{next} ({}), the safety service learns of it in {lag} ms",
            self.version,
            self.active_policy().hash()
        );
    }

    fn fault(&mut self) {
        let (health, span) = match self.rng.below(5) {
            0 => (Health::Down, self.rng.range(2_000, 60_000)),
            1 => (Health::Slow, self.rng.range(2_000, 60_000)),
            2 => (Health::Sluggish, self.rng.range(2_000, 30_000)),
            3 => (Health::Flapping { period_ms: self.rng.range(300, 5_000) }, self.rng.range(5_000, 90_000)),
            _ => (Health::Up, 0),
        };
        self.health = health;
        self.health_until = self.now + span;
        trace!(self, "safety service: {health:?} for {span} ms");
    }

    fn health_now(&self) -> Health {
        if self.draining || self.now >= self.health_until { Health::Up } else { self.health }
    }

    fn crash(&mut self) {
        let alive: Vec<usize> = (0..self.workers.len()).filter(|&w| self.workers[w].alive).collect();
        if alive.is_empty() {
            return;
        }
        let w = self.rng.pick(&alive);
        let dropped = self.workers[w].tasks.len();
        self.workers[w].alive = false;
        self.workers[w].tasks.clear();
        self.cov.worker_crashes += 1;
        trace!(self, "worker w{w} crashes, abandoning {dropped} task(s)");
    }

    fn restart(&mut self) {
        let dead: Vec<usize> = (0..self.workers.len()).filter(|&w| !self.workers[w].alive).collect();
        if dead.is_empty() {
            return;
        }
        let w = self.rng.pick(&dead);
        self.workers[w].alive = true;
        trace!(self, "worker w{w} restarts");
    }

    // ---------------------------------------------------------------- Gate A

    fn draw_job(&mut self, n: usize) -> Job {
        let topic = self.rng.pick(&TOPICS);
        let mut labels = BTreeMap::new();
        labels.insert("team".to_owned(), if self.rng.percent(50) { "a" } else { "b" }.to_owned());
        let cidr = if self.rng.percent(40) { "0.0.0.0/0" } else { "10.0.0.0/8" };
        Job {
            tenant: self.rng.pick(&TENANTS).to_owned(),
            principal: self.rng.pick(&PRINCIPALS).to_owned(),
            topic: topic.to_owned(),
            env: self.rng.pick(&ENVS).to_owned(),
            labels,
            payload: json!({"cidr": cidr, "name": format!("r{n}")}),
            plan_hash: None,
            idempotency_key: Some(format!("key-{n}")),
        }
    }

    /// A request bound to the job, the active snapshot and its deciding rules (SPEC 7).
    fn request_for(&self, j: usize) -> Request {
        let policy = self.active_policy();
        let job = &self.jobs[j];
        let evaluation = policy.evaluate(&job.job);
        let deciding: Vec<_> = evaluation.deciding.iter().filter_map(|i| policy.rule(*i)).collect();
        Request {
            job_hash: job.hash.clone(),
            snapshot_hash: policy.hash().to_owned(),
            rule_ids: deciding.iter().map(|r| r.id.clone()).collect(),
            rule_hashes: deciding.iter().map(|r| r.hash.clone()).collect(),
            requested_by: job.job.principal.clone(),
            created_at: self.now,
            expires_at: self.now + self.cfg.approval_ttl_ms,
            quorum: deciding.iter().map(|r| r.approvals).max().unwrap_or(1),
            approvers: Vec::new(),
            status: Status::Pending,
        }
    }

    /// Takes one token from each budget the core planned, all or nothing, as a store does; on
    /// refusal, the longest wait.
    fn take_budgets(&mut self, budgets: &[Budget]) -> Result<(), u64> {
        let mut taken = Vec::new();
        let mut retry_after_ms = 0;
        for Budget { key, limit } in budgets {
            match throttle::take(self.buckets.get(key).copied(), limit, self.now) {
                Take::Admitted(bucket) => taken.push((key.clone(), bucket, limit)),
                Take::Refused { retry_after_ms: ms } => retry_after_ms = retry_after_ms.max(ms),
            }
        }
        if retry_after_ms > 0 {
            return Err(retry_after_ms);
        }
        for (key, bucket, limit) in taken {
            trace!(self, "budget `{key}` admits; stored {bucket:?}");
            self.audit_budget(&key, limit);
            self.buckets.insert(key, bucket);
        }
        Ok(())
    }

    /// Records an admission on the bucket's own monotonic clock (what a pure bucket can know:
    /// the time it was last stored at) and checks every window that ends now: since the `i`-th
    /// admission, at most `burst + rate × (now − t_i) / per` tokens can have been taken.
    fn audit_budget(&mut self, key: &str, limit: &airlock_policy::Limit) {
        let (clock, times) = self.admissions.entry(key.to_owned()).or_insert((self.now, Vec::new()));
        *clock = (*clock).max(self.now);
        let now = *clock;
        times.push(now);
        if !self.cfg.strict.budgets {
            return;
        }
        let per_ms = (limit.per_secs.max(1) * 1000) as f64;
        for (i, &since) in times.iter().enumerate() {
            let taken = (times.len() - i) as f64;
            let allowed =
                f64::from(limit.burst.max(1)) + f64::from(limit.rate.max(1)) * (now - since) as f64 / per_ms;
            if taken > allowed + 1e-9 {
                let what = format!(
                    "bucket `{key}` admitted {taken} in {} ms of its own clock; its budget \
                     (rate {} per {} s, burst {}) allows {allowed:.3}",
                    now - since,
                    limit.rate,
                    limit.per_secs,
                    limit.burst
                );
                self.pending_violation.get_or_insert(self.violation(None, &what));
                return;
            }
        }
    }

    fn submit(&mut self) -> Outcome {
        if self.jobs.len() >= self.cfg.jobs_max {
            return self.deliver();
        }
        let n = self.jobs.len();
        let job = self.draw_job(n);
        let policy = self.active_policy();
        let evaluation = policy.evaluate(&job);
        let what = format!("{} {} {} team={}", job.tenant, job.topic, job.env, job.labels["team"]);
        let state = match evaluation.decision {
            Decision::Deny => {
                self.cov.gate_a_denies += 1;
                trace!(self, "gate A: deny {what}");
                return Ok(());
            }
            Decision::Throttle => match self.take_budgets(
                &Decided { policy, version: self.active as u64, evaluation: &evaluation, plan: None }
                    .budgets(Gate::A, &job),
            ) {
                Ok(()) => JobState::Queued,
                Err(ms) => {
                    self.cov.gate_a_throttled += 1;
                    trace!(self, "gate A: throttle {what}, retry after {ms} ms");
                    return Ok(());
                }
            },
            Decision::Allow => JobState::Queued,
            Decision::RequireHuman => JobState::AwaitingApproval,
        };
        let high_risk = TOPICS.iter().take(HIGH_RISK_TOPICS).any(|t| *t == job.topic);
        let record = JobRecord {
            id: JobId::generate(self.now, [n as u8; 10]),
            tenant: job.tenant.parse::<TenantId>().map_err(|e| self.violation(None, &e.to_string()))?,
            principal: job.principal.clone(),
            topic: job.topic.clone(),
            env: job.env.clone(),
            labels: job.labels.clone(),
            payload: job.payload.clone(),
            plan_hash: job.plan_hash.clone(),
            idempotency_key: job.idempotency_key.clone(),
            job_hash: job.hash(),
            state,
            gate_a: GateDecision {
                decision: evaluation.decision,
                rule_ids: Vec::new(),
                reason: String::new(),
                snapshot_hash: policy.hash().to_owned(),
                snapshot_version: 0,
                at: self.now,
                bypassed: false,
            },
            approval_id: None,
            created_at: self.now,
            updated_at: self.now,
            dispatch: DispatchState { not_before: self.now, ..DispatchState::default() },
        };
        self.jobs.push(SimJob {
            hash: job.hash(),
            job,
            record,
            checking: None,
            requests: Vec::new(),
            bypassed: false,
            successes: 0,
            high_risk,
        });
        if state == JobState::AwaitingApproval {
            let request = self.request_for(n);
            self.jobs[n].requests.push(request);
        }
        self.cov.submitted += 1;
        trace!(self, "gate A: {} -> j{n} {state} ({what})", evaluation.decision);
        Ok(())
    }

    // ---------------------------------------------------------------- Gate B

    fn eligible(&self) -> Vec<usize> {
        (0..self.jobs.len())
            .filter(|&j| {
                let job = &self.jobs[j];
                job.state() == JobState::Queued && job.not_before() <= self.now && job.checking.is_none()
            })
            .collect()
    }

    fn claim_random(&mut self) -> Outcome {
        let ready: Vec<usize> = (0..self.workers.len())
            .filter(|&w| self.workers[w].alive && self.workers[w].tasks.len() < 2)
            .collect();
        let eligible = self.eligible();
        if ready.is_empty() || eligible.is_empty() {
            return self.deliver();
        }
        let worker = self.rng.pick(&ready);
        if self.rng.per_mille(self.cfg.loss_per_mille) {
            self.cov.lost_claims += 1;
            trace!(self, "w{worker}: claim request lost");
            return Ok(());
        }
        let j = self.rng.pick(&eligible);
        self.claim(worker, j)
    }

    /// Gate B starts: the breaker admits the call or refuses it, and the call is in flight
    /// until its answer (or timeout) is due.
    fn claim(&mut self, worker: usize, j: usize) -> Outcome {
        let admission = self.breaker_admit();
        trace!(self, "w{worker} claims j{j}: breaker says {admission:?}");
        if admission == Admission::Refused {
            self.cov.breaker_refusals += 1;
            if matches!(self.breaker.state(self.now), BreakerState::HalfOpen { .. }) {
                self.cov.probe_cap_refusals += 1;
            }
            return self.decide(j, worker, Safety::Unavailable("circuit open".into()), None);
        }
        let health = match self.health_now() {
            Health::Flapping { period_ms } if self.now.div_euclid(period_ms) % 2 == 1 => Health::Down,
            Health::Flapping { .. } => Health::Up,
            other => other,
        };
        let (answered, timed_out, latency) = match health {
            Health::Up | Health::Flapping { .. } => (true, false, self.rng.range(1, 50)),
            Health::Sluggish => (true, false, self.rng.range(500, GATE_B_CLIENT_TIMEOUT_MS as Millis - 1)),
            Health::Slow => (false, true, GATE_B_CLIENT_TIMEOUT_MS as Millis),
            Health::Down => (false, false, self.rng.range(1, 20)),
        };
        let id = self.next_check;
        self.next_check += 1;
        self.jobs[j].checking = Some(id);
        self.checks.push(Check { id, job: j, worker, due: self.now + latency, answered, timed_out });
        Ok(())
    }

    fn breaker_admit(&mut self) -> Admission {
        let admission = self.breaker.admit(self.now);
        if admission == Admission::Probe {
            self.probes_in_period += 1;
            self.cov.breaker_probes += 1;
            if self.probes_in_period > 1 {
                self.cov.concurrent_probes += 1;
            }
            if self.probes_in_period > self.cfg.breaker.probes.min(3) {
                let what = format!(
                    "{} half-open probes admitted in one half-open period (at most {})",
                    self.probes_in_period, self.cfg.breaker.probes
                );
                self.pending_violation.get_or_insert(self.violation(None, &what));
            }
        }
        self.observe_breaker();
        admission
    }

    /// Ends the half-open period whenever the breaker is seen closed or open.
    fn observe_breaker(&mut self) {
        if !matches!(self.breaker.state(self.now), BreakerState::HalfOpen { .. }) {
            self.probes_in_period = 0;
        }
    }

    fn breaker_report(&mut self, ok: bool) {
        let before = self.breaker.state(self.now);
        if ok {
            self.breaker.success(self.now);
        } else {
            self.breaker.failure(self.now);
        }
        let after = self.breaker.state(self.now);
        if matches!(after, BreakerState::Open { .. }) && !matches!(before, BreakerState::Open { .. }) {
            self.cov.breaker_openings += 1;
            trace!(self, "breaker opens: {before:?} -> {after:?}");
        }
        self.observe_breaker();
    }

    /// The safety service's view of the policy: it learns of a publish after a lag.
    fn service_snapshot(&mut self) -> usize {
        if let Some((idx, at)) = self.svc_pending
            && (self.now >= at || self.draining)
        {
            self.svc_known = idx;
            self.svc_pending = None;
        }
        self.svc_known
    }

    /// A safety answer (or timeout) arrives for a claim.
    fn finish_check(&mut self, check: Check) -> Outcome {
        let j = check.job;
        if self.jobs[j].checking == Some(check.id) {
            self.jobs[j].checking = None;
        }
        self.breaker_report(check.answered);
        if self.jobs[j].state() != JobState::Queued {
            self.cov.dropped_checks += 1;
            trace!(
                self,
                "check #{} for j{j} answers, but the job is {}: dropped",
                check.id,
                self.jobs[j].state()
            );
            return Ok(());
        }
        if !check.answered {
            let reason = if check.timed_out {
                format!("timeout after {GATE_B_CLIENT_TIMEOUT_MS} ms")
            } else {
                "connection refused".to_owned()
            };
            return self.decide(j, check.worker, Safety::Unavailable(reason), None);
        }
        let svc = self.service_snapshot();
        let superseded = svc != self.active && self.policies[svc].hash() != self.active_policy().hash();
        if superseded && self.cfg.sabotage != Some(Sabotage::ActOnOldSnapshot) {
            // The answer is for a snapshot that is no longer active: never act on it.
            self.cov.superseded_decisions += 1;
            trace!(
                self,
                "check #{} for j{j} answered under policy #{svc}, but #{} is active: re-queued",
                check.id,
                self.active
            );
            let mv = self.dispatch(j, DispatchAction::Requeue { not_before: self.now, counted: false });
            return self.commit(j, &mv);
        }
        let policies = self.policies;
        let policy = &policies[svc];
        let evaluation = policy.evaluate(&self.jobs[j].job);
        let approval = if evaluation.decision == Decision::RequireHuman {
            self.approval_state(j)
        } else {
            ApprovalState::Missing
        };
        trace!(self, "check #{} for j{j}: {} ({approval:?})", check.id, evaluation.decision);
        self.decide(
            j,
            check.worker,
            Safety::Decided(evaluation.decision, approval),
            Some((evaluation, policy, svc)),
        )
    }

    /// The newest approved request, checked against the active snapshot now.
    fn approval_state(&self, j: usize) -> ApprovalState {
        let job = &self.jobs[j];
        match job.requests.last() {
            Some(request) if request.status == Status::Approved => {
                match approval::check_binding(
                    request,
                    &job.job,
                    self.active_policy(),
                    self.cfg.binding,
                    self.now,
                ) {
                    Ok(()) => ApprovalState::Valid,
                    Err(stale) => ApprovalState::Stale(stale),
                }
            }
            _ => ApprovalState::Missing,
        }
    }

    /// Runs Gate B as the server does (`plan_gate_b`) and commits its move as a store does.
    /// `evaluated`: the evaluation behind a decision and the snapshot (and its index) it was
    /// made under.
    fn decide(
        &mut self,
        j: usize,
        worker: usize,
        safety: Safety,
        evaluated: Option<(Evaluation, &'p Policy, usize)>,
    ) -> Outcome {
        let jitter = 0.5 + self.rng.unit();
        let fail_mode = self.fail_mode_for(j);
        let unavailable = matches!(safety, Safety::Unavailable(_));
        let decision = match (&safety, &evaluated) {
            (Safety::Decided(d, _), Some((_, policy, _))) => Some((*d, policy.hash().to_owned())),
            _ => None,
        };
        let answer = match (safety, &evaluated) {
            (Safety::Decided(_, approval), Some((evaluation, policy, svc))) => {
                Answer::Decided(Decided { policy, version: *svc as u64, evaluation, plan: None }, approval)
            }
            (Safety::Unavailable(why), _) => Answer::Unavailable {
                why,
                snapshot_hash: self.active_policy().hash().to_owned(),
                snapshot_version: self.active as u64,
            },
            (Safety::Decided(..), None) => {
                return Err(self.violation(Some(j), "a decision without an evaluation"));
            }
        };
        let attempts = self.jobs[j].scheduling_attempts();
        let token = self.next_token;
        let lease = self.lease_for(worker);
        let (record, job) = (self.jobs[j].record.clone(), self.jobs[j].job.clone());
        let plan = plan_gate_b(GateB {
            job: &record,
            policy_job: &job,
            answer,
            fail_mode,
            caps: self.cfg.caps,
            jitter,
            lease: lease.clone(),
            approval_id: ApprovalId::generate(self.now, [j as u8; 10]),
            approval_ttl_ms: self.cfg.approval_ttl_ms,
            at: self.now,
            actor: format!("w{worker}"),
        });
        let (action, mv) = match (plan.action, self.cfg.sabotage) {
            (Action::Deny, Some(Sabotage::LeaseOnDeny)) => (
                Action::Lease { budgets: false, bypassed: false },
                self.dispatch(j, DispatchAction::Lease { lease, budgets: Vec::new() }),
            ),
            (Action::DeadLetter(reason), Some(Sabotage::IgnoreCaps)) => {
                let delay_ms = dispatch::backoff_ms(attempts + 1, &self.cfg.caps, jitter);
                let not_before = self.now + delay_ms as Millis;
                let mv = self.dispatch(j, DispatchAction::Requeue { not_before, counted: true });
                (Action::Requeue { delay_ms, counted: true, reason }, mv)
            }
            (action, _) => (action, plan.mv),
        };
        trace!(self, "gate B j{j} ({fail_mode:?}, {attempts} attempts): {action:?}");
        match action {
            Action::Lease { budgets, bypassed } => {
                // Every dispatch that would run the job is charged, retries included (SPEC 6),
                // with the budgets the core planned.
                if budgets && let Err(ms) = self.take_budgets(&mv.budgets) {
                    self.cov.throttle_deferrals += 1;
                    trace!(self, "j{j}: Gate B budget refuses, back in {ms} ms (uncounted)");
                    // The lease's move as a store commits it when a budget refuses.
                    return self.commit(j, &mv.throttled(ms));
                }
                let approval = match &decision {
                    Some((Decision::RequireHuman, _)) => self.jobs[j].requests.last().cloned(),
                    _ => None,
                };
                let grant = Grant {
                    job: j,
                    token: 0,
                    unavailable,
                    bypassed,
                    fail_mode,
                    decision,
                    approval,
                    charged_now: budgets,
                };
                self.lease(j, worker, token, &mv, grant)
            }
            Action::Deny => {
                self.cov.gate_b_denies += 1;
                self.commit(j, &mv)
            }
            Action::NeedsApproval(stale) => {
                self.cov.needs_approval += 1;
                if let Some(stale) = stale {
                    self.cov.stale_approvals += 1;
                    trace!(self, "j{j}: approval is stale: {stale}");
                    if let Some(old) = self.jobs[j].requests.last_mut() {
                        old.status = Status::Stale;
                    }
                }
                self.commit(j, &mv)?;
                let ApprovalWrite::Replace(replacement) = mv.approval else {
                    return Err(self.violation(Some(j), "a fresh approval without a request"));
                };
                self.jobs[j].requests.push(replacement.request);
                Ok(())
            }
            Action::Requeue { delay_ms, counted, reason } => {
                trace!(self, "j{j}: requeued for {delay_ms} ms: {reason}");
                self.commit(j, &mv)?;
                if counted {
                    self.cov.unavailable_requeues += 1;
                    self.check_backoff(j, delay_ms)?;
                }
                Ok(())
            }
            Action::DeadLetter(reason) => {
                self.cov.dead_letters += 1;
                trace!(self, "j{j}: dead-lettered: {reason}");
                self.commit(j, &mv)
            }
        }
    }

    /// The backoff the core chose must be `min(cap, base·2^(n-1))` scaled into [0.5, 1.5].
    fn check_backoff(&self, j: usize, delay_ms: u64) -> Outcome {
        let n = self.jobs[j].scheduling_attempts();
        let caps = &self.cfg.caps;
        let raw = (caps.backoff_base_ms as f64 * 2f64.powi(n.saturating_sub(1).min(40) as i32))
            .min(caps.backoff_cap_ms as f64);
        let delay = delay_ms as f64;
        if delay < (raw * 0.5).floor() || delay > (raw * 1.5).ceil() {
            return Err(self.violation(
                Some(j),
                &format!("backoff {delay_ms} ms after {n} failures is outside [0.5, 1.5] x {raw} ms"),
            ));
        }
        Ok(())
    }

    /// A fresh lease for `worker`, fenced by the next token.
    fn lease_for(&mut self, worker: usize) -> record::Lease {
        let token = self.next_token;
        self.next_token += 1;
        record::Lease {
            token: token.to_string(),
            expires_at: self.now + self.cfg.lease_ms,
            worker: format!("w{worker}"),
        }
    }

    /// Commits the lease `mv` hands out under `token`, recorded for the check.
    fn lease(&mut self, j: usize, worker: usize, token: u64, mv: &Move, mut grant: Grant) -> Outcome {
        self.commit(j, mv)?;
        let job = &mut self.jobs[j];
        if grant.bypassed {
            job.bypassed = true;
            self.cov.bypasses += 1;
        } else {
            self.cov.leases += 1;
        }
        self.live.insert(token, j);
        grant.token = token;
        trace!(self, "j{j}: leased to w{worker}, token {token}, expires in {} ms", self.cfg.lease_ms);
        self.grants.push(grant);
        // A duplicated claim commit (a retried store write): the table must refuse it.
        if self.rng.per_mille(self.cfg.dup_per_mille) {
            if self.cfg.sabotage == Some(Sabotage::SecondLease) {
                self.live.insert(self.next_token, j);
                self.next_token += 1;
            }
            match self.jobs[j].state().next(Event::Lease) {
                Ok(to) => {
                    return Err(
                        self.violation(Some(j), &format!("a duplicated claim leased the job again ({to})"))
                    );
                }
                Err(_) => {
                    self.cov.duplicate_claims_rejected += 1;
                    trace!(self, "j{j}: duplicated claim commit refused by the table");
                }
            }
        }
        let delay = self.rng.range(0, 200);
        self.send(Msg::Grant { worker, job: j, token }, delay);
        Ok(())
    }

    // ---------------------------------------------------------------- the wire

    fn send(&mut self, msg: Msg, delay: Millis) {
        if !self.draining && self.rng.per_mille(self.cfg.loss_per_mille) {
            self.cov.lost_messages += 1;
            trace!(self, "lost on the wire: {msg:?}");
            return;
        }
        let due = self.now + delay;
        self.mail.push(Envelope { due, seq: self.next_seq, dup: false, msg });
        self.next_seq += 1;
        if !self.draining && self.rng.per_mille(self.cfg.dup_per_mille) {
            self.cov.duplicated_messages += 1;
            let due = due + self.rng.range(0, 3_000);
            self.mail.push(Envelope { due, seq: self.next_seq, dup: true, msg });
            self.next_seq += 1;
        }
    }

    /// Delivers every safety answer and message that is due, in due order.
    fn deliver(&mut self) -> Outcome {
        loop {
            let check = self
                .checks
                .iter()
                .enumerate()
                .filter(|(_, c)| c.due <= self.now)
                .min_by_key(|(_, c)| (c.due, c.id))
                .map(|(i, c)| (i, c.due));
            let mail = self
                .mail
                .iter()
                .enumerate()
                .filter(|(_, m)| m.due <= self.now)
                .min_by_key(|(_, m)| (m.due, m.seq))
                .map(|(i, m)| (i, m.due));
            match (check, mail) {
                (None, None) => return Ok(()),
                (Some((i, c_due)), m) if m.is_none_or(|(_, m_due)| c_due <= m_due) => {
                    let check = self.checks.remove(i);
                    self.finish_check(check)?;
                }
                (_, Some((i, _))) => {
                    let envelope = self.mail.remove(i);
                    self.receive(envelope)?;
                }
                (Some(_), None) => unreachable!("handled by the guarded arm"),
            }
        }
    }

    fn receive(&mut self, envelope: Envelope) -> Outcome {
        let dup = if envelope.dup { " (duplicate)" } else { "" };
        match envelope.msg {
            Msg::Grant { worker, job, token } => {
                if self.workers[worker].alive {
                    trace!(self, "w{worker} receives lease j{job} token {token}{dup}");
                    self.workers[worker].tasks.push(Task { job, token });
                } else {
                    trace!(self, "w{worker} is down; lease j{job} token {token} goes nowhere{dup}");
                }
                Ok(())
            }
            Msg::Heartbeat { job: j, token } => {
                let now = self.now;
                let lease_ms = self.cfg.lease_ms;
                let job = &mut self.jobs[j];
                let state = job.state();
                match job.record.dispatch.lease.as_mut() {
                    Some(lease)
                        if state == JobState::Leased
                            && lease.token == token.to_string()
                            && now <= lease.expires_at =>
                    {
                        lease.expires_at = lease.expires_at.max(now + lease_ms);
                        trace!(self, "j{j}: heartbeat token {token} extends the lease{dup}");
                    }
                    _ => {
                        self.cov.stale_heartbeats += 1;
                        trace!(self, "j{j}: heartbeat with token {token} refused{dup}");
                    }
                }
                Ok(())
            }
            Msg::Complete { job: j, token, report } => self.complete(j, token, report, envelope.dup),
        }
    }

    /// The store applies a completion only under the current, unexpired lease token.
    fn complete(&mut self, j: usize, token: u64, report: Report, dup: bool) -> Outcome {
        let job = &self.jobs[j];
        // The fence is the finish move's precondition: leased, under this token, not lapsed.
        let fence = self.finish_move(j, token, Some(self.now), Finish::Succeeded { result: json!(null) });
        if fence.precondition.check(&job.record).is_err() {
            if self.accepted.contains(&(j, token)) {
                self.cov.duplicate_completions_rejected += 1;
            } else {
                self.cov.stale_token_completions_rejected += 1;
            }
            // The table agrees: no state but `leased` can take a completion.
            if job.state() != JobState::Leased && job.state().next(Event::Succeed).is_ok() {
                return Err(
                    self.violation(Some(j), &format!("the table lets a `{}` job succeed", job.state()))
                );
            }
            trace!(
                self,
                "j{j}: {report:?} with token {token} refused (job {}, lease {:?}){}",
                job.state(),
                job.lease(),
                if dup { " (duplicate)" } else { "" }
            );
            return Ok(());
        }
        self.accepted.insert((j, token));
        trace!(self, "j{j}: {report:?} with token {token} accepted{}", if dup { " (duplicate)" } else { "" });
        match report {
            Report::Success => {
                self.cov.successes += 1;
                self.jobs[j].successes += 1;
                self.commit(j, &fence)
            }
            Report::Retryable | Report::Permanent => {
                let retryable = report == Report::Retryable;
                if retryable {
                    self.cov.retryable_failures += 1;
                } else {
                    self.cov.permanent_failures += 1;
                }
                let attempts = self.jobs[j].execution_attempts();
                let next = dispatch::after_attempt(attempts, retryable, &self.cfg.caps, "worker failed");
                self.after(j, token, Some(self.now), next)
            }
        }
    }

    /// Ends the attempt under `token` as `next` says, through the core's finish move.
    fn after(&mut self, j: usize, token: u64, live_at: Option<Millis>, next: AfterAttempt) -> Outcome {
        trace!(self, "j{j}: after attempt {}: {next:?}", self.jobs[j].execution_attempts());
        let finish = match next {
            AfterAttempt::Retry => Finish::Retry { error: "attempt failed".into() },
            AfterAttempt::DeadLetter(reason) => {
                self.cov.dead_letters += 1;
                Finish::DeadLetter { reason }
            }
            AfterAttempt::Fail => Finish::Failed { error: "attempt failed".into() },
        };
        let mv = self.finish_move(j, token, live_at, finish);
        self.commit(j, &mv)
    }

    // ---------------------------------------------------------------- workers and people

    fn worker_act(&mut self) -> Outcome {
        let busy: Vec<usize> = (0..self.workers.len())
            .filter(|&w| self.workers[w].alive && !self.workers[w].tasks.is_empty())
            .collect();
        if busy.is_empty() {
            return self.claim_random();
        }
        let w = self.rng.pick(&busy);
        let t = self.rng.index(self.workers[w].tasks.len());
        let task = self.workers[w].tasks[t];
        let delay = self.rng.range(0, 2_000);
        let report = match self.rng.below(100) {
            0..=54 => Report::Success,
            55..=66 => Report::Retryable,
            67..=71 => Report::Permanent,
            72..=91 => {
                trace!(self, "w{w} heartbeats j{} token {}", task.job, task.token);
                self.send(Msg::Heartbeat { job: task.job, token: task.token }, delay);
                return Ok(());
            }
            _ => {
                trace!(self, "w{w} stalls on j{}", task.job);
                return Ok(());
            }
        };
        self.workers[w].tasks.remove(t);
        trace!(self, "w{w} reports {report:?} for j{} token {}", task.job, task.token);
        self.send(Msg::Complete { job: task.job, token: task.token, report }, delay);
        Ok(())
    }

    /// Expires leases and approval requests that are past their time.
    fn reap(&mut self) -> Outcome {
        for j in 0..self.jobs.len() {
            let job = &self.jobs[j];
            let attempts = job.execution_attempts();
            let request_due =
                job.requests.last().is_some_and(|r| r.status == Status::Pending && self.now >= r.expires_at);
            match (job.state(), job.lease()) {
                // Lapsed as the stores' sweep finds it: expired before now.
                (JobState::Leased, Some(lease)) if self.now > lease.expires_at => {
                    self.cov.lease_expiries += 1;
                    trace!(self, "j{j}: lease token {} expired", lease.token);
                    let next = dispatch::after_attempt(attempts, true, &self.cfg.caps, "lease expired");
                    self.after(j, lease.token, None, next)?;
                }
                (JobState::AwaitingApproval, _) if request_due => self.expire_request(j)?,
                _ => {}
            }
        }
        Ok(())
    }

    fn expire_request(&mut self, j: usize) -> Outcome {
        let Some(current) = self.current_request(j) else {
            return self.transition(j, Event::ApprovalExpired);
        };
        self.cov.expired_approvals += 1;
        trace!(self, "j{j}: approval request expired");
        self.change_approval(j, &current, votes::expire(&current, true, self.now))
    }

    /// Job `j`'s latest approval request as a store would hold it.
    fn current_request(&self, j: usize) -> Option<ApprovalRecord> {
        let n = self.jobs[j].requests.len();
        let request = self.jobs[j].requests.last()?.clone();
        let record = &self.jobs[j].record;
        Some(ApprovalRecord::open(self.request_id(j, n), record.tenant.clone(), record.id.clone(), request))
    }

    fn request_id(&self, j: usize, n: usize) -> ApprovalId {
        ApprovalId::generate(EPOCH + n as Millis, [j as u8; 10])
    }

    /// Commits a change of job `j`'s latest approval request (`current`) as the stores do:
    /// planned by the core's `plan_approval_change` against the request as it stands, then the
    /// job's move committed like any other; the request as planned, and a replacement it opens,
    /// become the job's.
    fn change_approval(&mut self, j: usize, current: &ApprovalRecord, change: ApprovalChange) -> Outcome {
        let plan = match plan_approval_change(current, change) {
            Ok(plan) => plan,
            Err(refusal) => {
                return Err(
                    self.violation(Some(j), &format!("a legitimate approval change was refused: {refusal}"))
                );
            }
        };
        self.commit(j, &plan.job)?;
        let requests = &mut self.jobs[j].requests;
        if let Some(latest) = requests.last_mut() {
            *latest = plan.approval.request;
        }
        if let ApprovalWrite::Open(fresh) = plan.job.approval {
            requests.push(fresh.request);
        }
        Ok(())
    }

    /// An approver decides on a waiting job's request, through the core's `votes::cast`, as the
    /// server's approvals handler does: the binding checked under the active snapshot first.
    fn approver_act(&mut self) -> Outcome {
        let waiting: Vec<usize> = (0..self.jobs.len())
            .filter(|&j| {
                self.jobs[j].state() == JobState::AwaitingApproval
                    && self.jobs[j].requests.last().is_some_and(|r| r.status == Status::Pending)
            })
            .collect();
        if waiting.is_empty() {
            return self.deliver();
        }
        let j = self.rng.pick(&waiting);
        let who = if self.rng.percent(10) {
            self.jobs[j].job.principal.clone()
        } else {
            self.rng.pick(&APPROVERS).to_owned()
        };
        let ballot = if self.rng.percent(15) { Ballot::Reject { comment: None } } else { Ballot::Approve };
        let Some(current) = self.current_request(j) else { return Ok(()) };
        let policy = self.active_policy();
        let job = &self.jobs[j];
        let cast = votes::cast(Cast {
            record: &current,
            job: &job.record,
            ballot,
            approver: &who,
            binding: approval::check_binding(&current.request, &job.job, policy, self.cfg.binding, self.now),
            snapshot_version: self.active as u64,
            at: self.now,
        });
        match cast {
            Ok(Counted::Change { change, remaining }) => {
                match remaining {
                    None => self.cov.approvals_rejected += 1,
                    Some(0) => self.cov.approvals_granted += 1,
                    Some(_) => {}
                }
                trace!(self, "j{j}: {who} decides ({ballot:?}); {remaining:?} more needed");
                self.change_approval(j, &current, *change)
            }
            Ok(Counted::Stale(Stale::Expired)) => {
                trace!(self, "j{j}: {who} tries to approve an expired request");
                self.expire_request(j)
            }
            Ok(Counted::Stale(stale)) => {
                self.cov.stale_approvals += 1;
                trace!(self, "j{j}: approval by {who} refused, binding broke: {stale}");
                let job = &self.jobs[j];
                let evaluation = policy.evaluate(&job.job);
                let version = self.active as u64;
                let decided = Decided { policy, version, evaluation: &evaluation, plan: None };
                let fresh_id = self.request_id(j, job.requests.len());
                let ttl_ms = self.cfg.approval_ttl_ms;
                let change = votes::replace_stale(
                    &current,
                    &job.record,
                    &stale,
                    &decided,
                    fresh_id,
                    ttl_ms,
                    self.now,
                    &who,
                );
                self.change_approval(j, &current, change)
            }
            Err(
                refused @ (Refused::NotPending(_)
                | Refused::NotAwaiting(_)
                | Refused::Vote(VoteError::NotPending(_))),
            ) => {
                Err(self
                    .violation(Some(j), &format!("a pending request of a waiting job refused: {refused}")))
            }
            Err(refused) => {
                self.cov.self_approvals_refused += u64::from(matches!(
                    refused,
                    Refused::SelfApproval(_) | Refused::Vote(VoteError::SelfApproval(_))
                ));
                trace!(self, "j{j}: decision by {who} refused: {refused}");
                Ok(())
            }
        }
    }

    fn cancel(&mut self) -> Outcome {
        let open: Vec<usize> = (0..self.jobs.len())
            .filter(|&j| {
                matches!(
                    self.jobs[j].state(),
                    JobState::AwaitingApproval | JobState::Queued | JobState::Leased
                )
            })
            .collect();
        if open.is_empty() {
            return Ok(());
        }
        let j = self.rng.pick(&open);
        self.cov.cancels += 1;
        self.transition(j, Event::Cancel)
    }

    fn operator_retry(&mut self) -> Outcome {
        let dead: Vec<usize> =
            (0..self.jobs.len()).filter(|&j| self.jobs[j].state() == JobState::DeadLettered).collect();
        if dead.is_empty() {
            return Ok(());
        }
        let j = self.rng.pick(&dead);
        self.cov.operator_retries += 1;
        // A new round through Gate B, with fresh attempt budgets, as the stores write it;
        // `commit` checks its precondition (dead-lettered, not discarded).
        let mv = plan_operator_retry(&self.jobs[j].record, self.now, "operator".into());
        self.commit(j, &mv)
    }

    // ---------------------------------------------------------------- the end of a run

    /// Faults stop; workers come back and finish what they get; the clock moves to each next
    /// deadline until nothing is queued, leased or in flight.
    fn drain(&mut self) -> Outcome {
        self.draining = true;
        for worker in &mut self.workers {
            worker.alive = true;
        }
        trace!(self, "drain: faults stop");
        for _ in 0..DRAIN_ROUNDS {
            self.step += 1;
            self.grants.clear();
            self.deliver()?;
            self.reap()?;
            let eligible = self.eligible();
            for (k, j) in eligible.into_iter().enumerate() {
                self.claim(k % self.workers.len(), j)?;
            }
            self.deliver()?;
            for w in 0..self.workers.len() {
                for task in std::mem::take(&mut self.workers[w].tasks) {
                    let delay = self.rng.range(0, 500);
                    self.send(
                        Msg::Complete { job: task.job, token: task.token, report: Report::Success },
                        delay,
                    );
                }
            }
            self.check()?;
            let busy = self.jobs.iter().any(|job| matches!(job.state(), JobState::Queued | JobState::Leased));
            if !busy && self.checks.is_empty() && self.mail.is_empty() {
                trace!(self, "drain: quiet");
                return Ok(());
            }
            let next = self
                .checks
                .iter()
                .map(|c| c.due)
                .chain(self.mail.iter().map(|m| m.due))
                .chain(
                    self.jobs
                        .iter()
                        .filter(|job| job.state() == JobState::Queued)
                        .map(|job| job.not_before()),
                )
                .chain(
                    self.jobs
                        .iter()
                        .filter(|job| job.state() == JobState::Leased)
                        .filter_map(|job| job.lease().map(|l| l.expires_at + 1)),
                )
                .chain(std::iter::once(match self.breaker.state(self.now) {
                    BreakerState::Open { until } => until,
                    _ => Millis::MAX,
                }))
                .filter(|&t| t > self.now)
                .min();
            self.now = next.unwrap_or(self.now + 1);
        }
        Err(self.violation(None, &format!("the system did not drain within {DRAIN_ROUNDS} rounds")))
    }
}
