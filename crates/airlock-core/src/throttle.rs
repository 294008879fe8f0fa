//! Token buckets for `throttle` rules (SPEC 3.4): a bucket holds at most `burst` tokens and
//! refills `rate` per `per`; a new bucket starts full. Pure: the caller loads the bucket, passes
//! the time, and stores what comes back.

use airlock_policy::{Job, Limit, LimitKey};

use crate::Millis;

/// A bucket's state.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Bucket {
    /// Tokens available at `updated_at`.
    pub tokens: f64,
    /// When `tokens` was computed.
    pub updated_at: Millis,
}

/// The outcome of asking a bucket for one token.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Take {
    /// Admitted; store this bucket.
    Admitted(Bucket),
    /// Refused; one token will be available after this many milliseconds.
    Refused {
        /// Time until a token is available.
        retry_after_ms: u64,
    },
}

/// Takes one token from `bucket` (a missing bucket is full) at `now`.
pub fn take(bucket: Option<Bucket>, limit: &Limit, now: Millis) -> Take {
    let capacity = f64::from(limit.burst.max(1));
    let per_ms = (limit.per_secs.max(1) * 1000) as f64;
    let refill_per_ms = f64::from(limit.rate.max(1)) / per_ms;
    // A clock that steps back never moves the bucket back: time already refilled once is
    // never refilled again.
    let (current, now) = match bucket {
        None => (capacity, now),
        Some(b) => {
            let now = now.max(b.updated_at);
            let elapsed = (now - b.updated_at) as f64;
            ((b.tokens + elapsed * refill_per_ms).min(capacity), now)
        }
    };
    if current >= 1.0 {
        Take::Admitted(Bucket { tokens: current - 1.0, updated_at: now })
    } else {
        let retry_after_ms = ((1.0 - current) / refill_per_ms).ceil().max(1.0) as u64;
        Take::Refused { retry_after_ms }
    }
}

/// The bucket key for a job under a limit, scoped by the rule: `rule-id|tenant=acme|topic=x`.
pub fn bucket_key(rule_id: &str, limit: &Limit, job: &Job) -> String {
    let mut key = rule_id.to_owned();
    for part in &limit.key {
        let (name, value) = match part {
            LimitKey::Tenant => ("tenant", job.tenant.as_str()),
            LimitKey::Topic => ("topic", job.topic.as_str()),
            LimitKey::Env => ("env", job.env.as_str()),
            LimitKey::Principal => ("principal", job.principal.as_str()),
        };
        key.push('|');
        key.push_str(name);
        key.push('=');
        key.push_str(value);
    }
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(rate: u32, per_secs: u64, burst: u32) -> Limit {
        Limit { rate, per_secs, burst, key: vec![LimitKey::Tenant, LimitKey::Topic] }
    }

    fn admitted(t: Take) -> Bucket {
        match t {
            Take::Admitted(b) => b,
            Take::Refused { retry_after_ms } => panic!("refused, retry after {retry_after_ms} ms"),
        }
    }

    #[test]
    fn one_per_ten_minutes() {
        let l = limit(1, 600, 1);
        let b = admitted(take(None, &l, 0));
        assert_eq!(take(Some(b), &l, 1_000), Take::Refused { retry_after_ms: 599_000 });
        admitted(take(Some(b), &l, 600_000));
    }

    #[test]
    fn burst_then_refill_rate() {
        let l = limit(10, 1, 3);
        let mut b = None;
        for _ in 0..3 {
            b = Some(admitted(take(b, &l, 0)));
        }
        assert_eq!(take(b, &l, 0), Take::Refused { retry_after_ms: 100 });
        admitted(take(b, &l, 100));
    }

    #[test]
    fn a_clock_going_backwards_adds_nothing() {
        let l = limit(1, 60, 1);
        let b = admitted(take(None, &l, 10_000));
        assert!(matches!(take(Some(b), &l, 0), Take::Refused { .. }));
        // Two per minute: a step back must not let the same stretch refill twice.
        let l = limit(2, 60, 2);
        let b = admitted(take(None, &l, 100_000));
        let b = admitted(take(Some(b), &l, 100_000));
        let b = admitted(take(Some(b), &l, 130_000));
        assert_eq!(b.updated_at, 130_000);
        assert!(matches!(take(Some(b), &l, 120_000), Take::Refused { .. }), "stepping back refills nothing");
    }
}
