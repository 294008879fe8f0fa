//! The outbox relay and the bus subscriber of distributed mode (`serve --bus nats://…`).
//!
//! The relay drains the store's transactional outbox: each round publishes one wake-up per
//! tenant to JetStream (the round's job ids) and deletes the rows only after the publish was
//! acknowledged, so a crash in between publishes them again (a duplicate wake-up, harmless:
//! claims read PostgreSQL and lock the job row). The subscriber turns each bus message into a
//! wake-up of this process's claim loops.

use std::collections::BTreeMap;
use std::time::Duration;

use airlock_bus::NatsBus;

use crate::state::AppState;

/// Rows drained per round.
const BATCH: u32 = 256;

/// How often the relay looks at the outbox when this process queued nothing (rows written by
/// replicas without a relay, or by a relay that died before publishing them).
const IDLE_POLL: Duration = Duration::from_millis(250);

/// The shortest time from one round's start to the next's. A round alone on an idle relay
/// starts at once; under load the rows of this long gather into one round, whose one message
/// per tenant then wakes every scheduler (each message costs the bus a publish, a delivery and
/// an ack per scheduler, and the store two statements).
const ROUND_MIN: Duration = Duration::from_millis(10);

/// How long the relay waits after the bus or the store failed.
const RETRY_DELAY: Duration = Duration::from_millis(500);

/// Test-only fault: exit right after a job is committed and before its wake-up is published.
const FAULT_CRASH_AFTER_COMMIT: &str = "AIRLOCK_FAULT_CRASH_AFTER_COMMIT";

/// Exit status of the fault above.
const FAULT_EXIT: i32 = 86;

/// Starts the relay: drains the outbox to `bus` for the life of the process.
pub fn spawn_relay(state: AppState, bus: NatsBus) {
    let crash_after_commit = std::env::var_os(FAULT_CRASH_AFTER_COMMIT).is_some_and(|v| v == "1");
    tokio::spawn(async move {
        loop {
            let started = tokio::time::Instant::now();
            let delay = match drain(&state, &bus, crash_after_commit).await {
                Ok(BATCH_FULL) => continue,
                Ok(_) => IDLE_POLL,
                Err(e) => {
                    tracing::warn!(error = %e, "outbox relay failed; retrying");
                    tokio::time::sleep(RETRY_DELAY).await;
                    continue;
                }
            };
            // A commit during the round left a permit: the next wait returns at once.
            let _ = tokio::time::timeout(delay, state.relay_wake().notified()).await;
            tokio::time::sleep_until(started + ROUND_MIN).await;
        }
    });
}

/// The row count meaning "there may be more".
const BATCH_FULL: usize = BATCH as usize;

/// One round: the rows published and deleted.
async fn drain(state: &AppState, bus: &NatsBus, crash_after_commit: bool) -> Result<usize, String> {
    let rows = state.store().outbox_take(BATCH).await.map_err(|e| e.to_string())?;
    if rows.is_empty() {
        return Ok(0);
    }
    if crash_after_commit {
        eprintln!("fault {FAULT_CRASH_AFTER_COMMIT}: exiting before publishing {} wake-up(s)", rows.len());
        std::process::exit(FAULT_EXIT);
    }
    let mut by_tenant: BTreeMap<&str, (Vec<i64>, Vec<&str>)> = BTreeMap::new();
    for (id, tenant, job) in &rows {
        let (ids, jobs) = by_tenant.entry(tenant).or_default();
        ids.push(*id);
        jobs.push(job);
    }
    let publishes = by_tenant.iter().map(|(tenant, (_, jobs))| bus.publish(tenant, jobs));
    let results = futures_util::future::join_all(publishes).await;
    let mut acked = Vec::with_capacity(rows.len());
    let mut failure = None;
    for ((ids, _), result) in by_tenant.into_values().zip(results) {
        match result {
            Ok(()) => acked.extend(ids),
            Err(e) => failure = Some(e),
        }
    }
    state.store().outbox_done(&acked).await.map_err(|e| e.to_string())?;
    match failure {
        Some(e) => Err(e.to_string()),
        None => Ok(rows.len()),
    }
}

/// Starts consuming the bus as consumer `group`: each message wakes this process's claim loops,
/// which then read the store.
pub fn spawn_subscriber(state: AppState, bus: &NatsBus, group: String) {
    bus.subscribe(group, move || state.work().wake());
}
