//! Identifiers as types, so that a job id can never be passed where an approval id is meant.
//! Generated ids are time-ordered (48 bits of milliseconds, then 80 random bits, in Crockford
//! base32), so that listing by id is listing by creation time.

use std::fmt;
use std::str::FromStr;

use crate::Millis;

const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
const ENCODED_LEN: usize = 26;

/// An id could not be parsed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("`{text}` is not a valid {kind} id")]
pub struct IdError {
    text: String,
    kind: &'static str,
}

fn encode(now: Millis, random: [u8; 10]) -> String {
    let time = u128::try_from(now.max(0)).unwrap_or(0) & ((1 << 48) - 1);
    let mut bits = time << 80;
    for (i, byte) in random.iter().enumerate() {
        bits |= u128::from(*byte) << (72 - 8 * i);
    }
    let mut out = String::with_capacity(ENCODED_LEN);
    for i in (0..ENCODED_LEN).rev() {
        let digit = ((bits >> (5 * i)) & 31) as usize;
        out.push(char::from(ALPHABET.get(digit).copied().unwrap_or(b'0')));
    }
    out
}

fn valid_body(body: &str) -> bool {
    body.len() == ENCODED_LEN && body.bytes().all(|b| ALPHABET.contains(&b))
}

macro_rules! generated_id {
    ($(#[$doc:meta])* $name:ident, $prefix:literal, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(String);

        impl $name {
            /// A new id for something created at `now`, from 10 random bytes.
            pub fn generate(now: Millis, random: [u8; 10]) -> Self {
                Self(format!("{}{}", $prefix, encode(now, random)))
            }

            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $name {
            type Err = IdError;

            fn from_str(text: &str) -> Result<Self, IdError> {
                match text.strip_prefix($prefix) {
                    Some(body) if valid_body(body) => Ok(Self(text.to_owned())),
                    _ => Err(IdError { text: text.chars().take(64).collect(), kind: $kind }),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

generated_id!(
    /// A job.
    JobId, "job_", "job"
);
generated_id!(
    /// An approval request.
    ApprovalId, "apr_", "approval"
);
generated_id!(
    /// An API key (the public half; the secret is never stored).
    KeyId, "key_", "key"
);

/// A tenant: the unit of isolation. Every object belongs to exactly one.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TenantId(String);

impl TenantId {
    /// The tenant of the platform admin key.
    pub const PLATFORM: &'static str = "platform";

    /// The tenant name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for TenantId {
    type Err = IdError;

    /// Tenants are 1 to 64 lowercase letters, digits, `-` and `_`.
    fn from_str(text: &str) -> Result<Self, IdError> {
        let ok = !text.is_empty()
            && text.len() <= 64
            && text.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if ok {
            Ok(Self(text.to_owned()))
        } else {
            Err(IdError { text: text.chars().take(64).collect(), kind: "tenant" })
        }
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_sort_by_time() {
        let a = JobId::generate(1_700_000_000_000, [0xff; 10]);
        let b = JobId::generate(1_700_000_000_001, [0; 10]);
        assert!(a < b, "{a} < {b}");
        assert_eq!(a.as_str().len(), 4 + ENCODED_LEN);
        assert_eq!(a.as_str().parse::<JobId>().unwrap(), a);
        assert!(a.as_str().parse::<ApprovalId>().is_err(), "prefixes keep kinds apart");
        assert!("job_short".parse::<JobId>().is_err());
        assert!("job_0000000000000000000000000U".parse::<JobId>().is_err(), "U is not Crockford");
    }

    #[test]
    fn tenants_are_validated() {
        assert!("acme-prod".parse::<TenantId>().is_ok());
        assert!("Acme".parse::<TenantId>().is_err());
        assert!("".parse::<TenantId>().is_err());
        assert!("a/b".parse::<TenantId>().is_err());
    }
}
