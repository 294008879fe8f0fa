//! The circuit breaker around the safety check (SPEC 6): closed until `failures_to_open`
//! consecutive failures, then open for `open_ms`, then half-open admitting at most `probes`
//! calls; a probe success closes it, a probe failure re-opens it. A state machine: the caller
//! passes the time in and reports each call's outcome.

use crate::Millis;
use crate::defaults::{BREAKER_FAILURES_TO_OPEN, BREAKER_HALF_OPEN_PROBES, BREAKER_OPEN_MS};

/// The breaker's numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Consecutive failures that open the breaker.
    pub failures_to_open: u32,
    /// How long it stays open, in milliseconds.
    pub open_ms: u64,
    /// Calls admitted while half-open.
    pub probes: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failures_to_open: BREAKER_FAILURES_TO_OPEN,
            open_ms: BREAKER_OPEN_MS,
            probes: BREAKER_HALF_OPEN_PROBES,
        }
    }
}

/// Where the breaker is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls flow; counting consecutive failures.
    Closed {
        /// Failures in a row so far.
        failures: u32,
    },
    /// Calls are refused until `until`.
    Open {
        /// When it turns half-open.
        until: Millis,
    },
    /// Up to `probes` calls are let through to test the service.
    HalfOpen {
        /// Probes admitted so far.
        admitted: u32,
    },
}

impl BreakerState {
    /// The state as a stored pair: a kind and its number (failures, open-until, probes).
    pub fn encode(self) -> (&'static str, i64) {
        match self {
            Self::Closed { failures } => ("closed", i64::from(failures)),
            Self::Open { until } => ("open", until),
            Self::HalfOpen { admitted } => ("half_open", i64::from(admitted)),
        }
    }

    /// The state from a stored pair; `None` for a pair no version of Airlock writes.
    pub fn decode(kind: &str, value: i64) -> Option<Self> {
        let count = || u32::try_from(value).ok();
        match kind {
            "closed" => Some(Self::Closed { failures: count()? }),
            "open" => Some(Self::Open { until: value }),
            "half_open" => Some(Self::HalfOpen { admitted: count()? }),
            _ => None,
        }
    }

    /// The value of `airlock_safety_circuit_state`: 0 closed, 1 half-open, 2 open.
    pub fn gauge(self) -> u8 {
        match self {
            Self::Closed { .. } => 0,
            Self::HalfOpen { .. } => 1,
            Self::Open { .. } => 2,
        }
    }
}

/// The breaker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Breaker {
    config: BreakerConfig,
    state: BreakerState,
}

/// Whether a call may go ahead.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Go ahead (a normal call).
    Call,
    /// Go ahead as a half-open probe.
    Probe,
    /// Refused: the circuit is open (or the half-open probes are all out).
    Refused,
}

impl Breaker {
    /// A closed breaker.
    pub fn new(config: BreakerConfig) -> Self {
        Self { config, state: BreakerState::Closed { failures: 0 } }
    }

    /// A breaker whose state was stored (shared by several processes through a store).
    pub fn restore(config: BreakerConfig, state: BreakerState) -> Self {
        Self { config, state }
    }

    /// The state to store, exactly as held (not advanced to any time).
    pub fn saved(&self) -> BreakerState {
        self.state
    }

    /// The current state as of `now` (an expired open period reads as half-open).
    pub fn state(&self, now: Millis) -> BreakerState {
        match self.state {
            BreakerState::Open { until } if now >= until => BreakerState::HalfOpen { admitted: 0 },
            other => other,
        }
    }

    /// Asks to make a call at `now`.
    pub fn admit(&mut self, now: Millis) -> Admission {
        self.state = self.state(now);
        match &mut self.state {
            BreakerState::Closed { .. } => Admission::Call,
            BreakerState::Open { .. } => Admission::Refused,
            BreakerState::HalfOpen { admitted } if *admitted < self.config.probes => {
                *admitted += 1;
                Admission::Probe
            }
            BreakerState::HalfOpen { .. } => Admission::Refused,
        }
    }

    /// Reports that an admitted call succeeded.
    pub fn success(&mut self, now: Millis) {
        self.state = match self.state(now) {
            BreakerState::Open { until } => BreakerState::Open { until },
            _ => BreakerState::Closed { failures: 0 },
        };
    }

    /// Reports that an admitted call failed.
    pub fn failure(&mut self, now: Millis) {
        let open = BreakerState::Open {
            until: now.saturating_add(i64::try_from(self.config.open_ms).unwrap_or(i64::MAX)),
        };
        self.state = match self.state(now) {
            BreakerState::Closed { failures } if failures + 1 >= self.config.failures_to_open => open,
            BreakerState::Closed { failures } => BreakerState::Closed { failures: failures + 1 },
            BreakerState::HalfOpen { .. } => open,
            BreakerState::Open { until } => BreakerState::Open { until },
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_three_failures_and_probes_after_thirty_seconds() {
        let mut b = Breaker::new(BreakerConfig::default());
        for t in 0..2 {
            assert_eq!(b.admit(t), Admission::Call);
            b.failure(t);
        }
        assert_eq!(b.state(2), BreakerState::Closed { failures: 2 });
        assert_eq!(b.admit(2), Admission::Call);
        b.failure(2);
        assert_eq!(b.state(3), BreakerState::Open { until: 30_002 });
        assert_eq!(b.admit(30_001), Admission::Refused);
        for _ in 0..3 {
            assert_eq!(b.admit(30_002), Admission::Probe);
        }
        assert_eq!(b.admit(30_002), Admission::Refused, "at most three probes");
        b.success(30_003);
        assert_eq!(b.admit(30_004), Admission::Call);
    }

    #[test]
    fn a_failed_probe_reopens() {
        let mut b = Breaker::new(BreakerConfig { failures_to_open: 1, open_ms: 100, probes: 2 });
        b.admit(0);
        b.failure(0);
        assert_eq!(b.admit(100), Admission::Probe);
        b.failure(101);
        assert_eq!(b.state(150), BreakerState::Open { until: 201 });
        assert_eq!(b.state(201).gauge(), 1);
    }

    #[test]
    fn stored_states_round_trip() {
        for state in [
            BreakerState::Closed { failures: 2 },
            BreakerState::Open { until: 99 },
            BreakerState::HalfOpen { admitted: 1 },
        ] {
            let (kind, value) = state.encode();
            assert_eq!(BreakerState::decode(kind, value), Some(state));
            let b = Breaker::restore(BreakerConfig::default(), state);
            assert_eq!(b.saved(), state);
        }
        assert_eq!(BreakerState::decode("ajar", 0), None);
    }

    #[test]
    fn a_success_resets_the_count() {
        let mut b = Breaker::new(BreakerConfig::default());
        b.failure(0);
        b.failure(1);
        b.success(2);
        b.failure(3);
        assert_eq!(b.state(4), BreakerState::Closed { failures: 1 });
    }
}
