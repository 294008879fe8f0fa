//! Authentication and roles (SPEC 11). A key is `ak_` + 64 hex digits; only the SHA-256 of it
//! is stored, requests are matched by that hash, and the stored and computed hashes are
//! compared in constant time. The key alone determines the tenant, the principal (the key's
//! name) and the roles.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use airlock_core::ids::{KeyId, TenantId};
use airlock_core::role::{Role, Roles};
use airlock_store::KeyRecord;
use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use sha2::{Digest, Sha256};

use crate::error::ApiError;
use crate::state::AppState;

/// The authenticated caller of a request.
#[derive(Clone, Debug)]
pub struct Caller {
    /// The key used.
    pub key_id: KeyId,
    /// The tenant it acts in.
    pub tenant: TenantId,
    /// Who it is: the key's name.
    pub principal: String,
    /// What it may do.
    pub roles: Roles,
}

impl Caller {
    /// Refuses the request unless the key has `role` (admin has every role).
    pub fn require(&self, role: Role) -> Result<(), ApiError> {
        if self.roles.allows(role) {
            Ok(())
        } else {
            Err(ApiError::forbidden(format!(
                "this key (`{}`) lacks the `{}` role; it has `{}`",
                self.principal,
                role.as_str(),
                self.roles
            )))
        }
    }

    /// Refuses a read unless the key has `role` or the viewer role.
    pub fn require_read(&self, role: Role) -> Result<(), ApiError> {
        if self.roles.reads(role) { Ok(()) } else { self.require(role) }
    }

    /// Whether this is an admin of the platform tenant, who manages every tenant.
    pub fn is_platform_admin(&self) -> bool {
        self.tenant.as_str() == TenantId::PLATFORM && self.roles.allows(Role::Admin)
    }

    /// Refuses the request unless the caller is a platform admin.
    pub fn require_platform_admin(&self) -> Result<(), ApiError> {
        if self.is_platform_admin() {
            Ok(())
        } else {
            Err(ApiError::forbidden("only an admin of the `platform` tenant may do this"))
        }
    }
}

/// How long a looked-up key is trusted without asking the store again. A revocation in this
/// process clears the cache at once, and one in another process does too when the store
/// notifies it (PostgreSQL `NOTIFY`); this bounds the delay when a notification is lost.
const KEY_CACHE_TTL: Duration = Duration::from_secs(1);

/// Keys cached before the cache is emptied and starts over.
const KEY_CACHE_MAX: usize = 10_000;

/// Live keys recently looked up, by the hash of their secret: every request authenticates, and
/// without this each one would cost a store round trip.
#[derive(Default)]
pub struct KeyCache(Mutex<HashMap<[u8; 32], (Caller, Instant)>>);

impl KeyCache {
    fn get(&self, hash: &[u8; 32]) -> Option<Caller> {
        let cache = self.0.lock().ok()?;
        let (caller, at) = cache.get(hash)?;
        (at.elapsed() < KEY_CACHE_TTL).then(|| caller.clone())
    }

    fn put(&self, hash: [u8; 32], caller: Caller) {
        if let Ok(mut cache) = self.0.lock() {
            if cache.len() >= KEY_CACHE_MAX {
                cache.clear();
            }
            cache.insert(hash, (caller, Instant::now()));
        }
    }

    /// Forgets every key: one was revoked.
    pub fn clear(&self) {
        if let Ok(mut cache) = self.0.lock() {
            cache.clear();
        }
    }
}

/// SHA-256 of a presented key: how keys were stored before the pepper, and still are without
/// one.
pub fn hash_key(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// How keys are hashed for storage and lookup: HMAC-SHA256 with a server secret (the pepper)
/// kept outside the store, so that a copy of the database does not let anyone test guesses of
/// a human-chosen key offline; plain SHA-256 without one. A key stored before the pepper was
/// introduced is accepted once by its plain hash and re-hashed with the pepper.
#[derive(Clone, Debug, Default)]
pub struct KeyHasher {
    pepper: Option<ring::hmac::Key>,
}

/// Bytes of a generated pepper.
const PEPPER_BYTES: usize = 32;

impl KeyHasher {
    /// Hashing with `secret` as the pepper.
    pub fn peppered(secret: &[u8]) -> Self {
        Self { pepper: Some(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret)) }
    }

    /// Reads the pepper at `path`, or generates one there (mode 0600) when the file does not
    /// exist.
    pub fn load_or_create(path: &std::path::Path) -> Result<Self, String> {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        if !path.exists() {
            let mut secret = [0u8; PEPPER_BYTES];
            getrandom::fill(&mut secret).map_err(|e| format!("cannot generate a key pepper: {e}"))?;
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .and_then(|mut f| f.write_all(&secret))
                .map_err(|e| format!("cannot create the key pepper `{}`: {e}", path.display()))?;
        }
        let secret = std::fs::read(path)
            .map_err(|e| format!("cannot read the key pepper `{}`: {e}", path.display()))?;
        if secret.len() < 16 {
            return Err(format!("the key pepper `{}` is shorter than 16 bytes", path.display()));
        }
        Ok(Self::peppered(&secret))
    }

    /// Whether a pepper is in use.
    pub fn is_peppered(&self) -> bool {
        self.pepper.is_some()
    }

    /// The stored form of a key.
    pub fn hash(&self, key: &str) -> [u8; 32] {
        match &self.pepper {
            None => hash_key(key),
            Some(pepper) => {
                let mut out = [0u8; 32];
                out.copy_from_slice(ring::hmac::sign(pepper, key.as_bytes()).as_ref());
                out
            }
        }
    }
}

/// A new random key.
pub fn generate_key() -> Result<String, ApiError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(ApiError::internal)?;
    let mut key = String::with_capacity(3 + 64);
    key.push_str("ak_");
    for b in bytes {
        key.push_str(&format!("{b:02x}"));
    }
    Ok(key)
}

/// Compares two digests without an early exit.
pub(crate) fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn unauthorized(message: &str) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
}

/// Length of the window in which failed authentications from one source are counted.
const AUTH_FAILURE_WINDOW: Duration = Duration::from_secs(60);

/// Sources tracked at once; past it, sources whose window ended are forgotten first.
const AUTH_FAILURE_SOURCES_MAX: usize = 65_536;

/// How many characters of a presented key a log line shows: the `ak_` prefix and a few hex
/// digits, enough to tell keys apart in an investigation and far too few to use.
const LOGGED_KEY_CHARS: usize = 7;

/// Failed authentications per source address in the current window: a source past
/// `auth_failures_per_minute` gets 429 for every key it presents until the window ends, so
/// that guessing keys from one address stops after a burst (IPv6 sources count per /64).
#[derive(Default)]
pub struct AuthFailures(Mutex<HashMap<IpAddr, (Instant, u32)>>);

/// The address a source is counted under.
fn source_of(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut octets = v6.octets();
                octets.iter_mut().skip(8).for_each(|o| *o = 0);
                IpAddr::from(octets)
            }
        },
        v4 => v4,
    }
}

impl AuthFailures {
    /// When the source is over the limit: how long until its window ends.
    fn blocked(&self, source: IpAddr, limit: u32, now: Instant) -> Option<Duration> {
        let failures = self.0.lock().ok()?;
        let (start, count) = failures.get(&source)?;
        let ends = *start + AUTH_FAILURE_WINDOW;
        (*count >= limit && ends > now).then(|| ends - now)
    }

    /// Counts one failure.
    fn record(&self, source: IpAddr, now: Instant) {
        let Ok(mut failures) = self.0.lock() else { return };
        if failures.len() >= AUTH_FAILURE_SOURCES_MAX && !failures.contains_key(&source) {
            failures.retain(|_, (start, _)| *start + AUTH_FAILURE_WINDOW > now);
            if failures.len() >= AUTH_FAILURE_SOURCES_MAX {
                failures.clear();
            }
        }
        let entry = failures.entry(source).or_insert((now, 0));
        if entry.0 + AUTH_FAILURE_WINDOW <= now {
            *entry = (now, 0);
        }
        entry.1 = entry.1.saturating_add(1);
    }
}

/// Why a presented key was refused.
enum Refusal {
    /// The header is not `Bearer <key>`, or no key has that secret, or it was revoked.
    Failed(ApiError, Option<KeyId>),
    /// Not the key's fault (the store failed).
    Other(ApiError),
}

async fn authenticate(token: &str, state: &AppState) -> Result<Caller, Refusal> {
    let hasher = &state.config().key_hasher;
    let presented = hasher.hash(token);
    if let Some(caller) = state.keys().get(&presented) {
        return Ok(caller);
    }
    let store = state.store();
    let mut key = store.key_by_secret(&presented).await.map_err(|e| Refusal::Other(e.into()))?;
    if key.is_none() && hasher.is_peppered() {
        // A key stored before the pepper: accepted by its plain hash once, then re-hashed.
        let legacy = hash_key(token);
        if let Some(old) = store.key_by_secret(&legacy).await.map_err(|e| Refusal::Other(e.into()))?
            && constant_time_eq(&old.secret_hash, &legacy)
        {
            store.rehash_key(&old.id, &legacy, &presented).await.map_err(|e| Refusal::Other(e.into()))?;
            tracing::info!(key_id = %old.id, "key re-hashed with the pepper");
            key = Some(KeyRecord { secret_hash: presented, ..old });
        }
    }
    let key = key.ok_or_else(|| Refusal::Failed(unauthorized("unknown API key"), None))?;
    if !constant_time_eq(&key.secret_hash, &presented) {
        return Err(Refusal::Failed(unauthorized("unknown API key"), None));
    }
    if key.revoked_at.is_some() {
        return Err(Refusal::Failed(unauthorized("this API key was revoked"), Some(key.id)));
    }
    let principal = key.principal().to_owned();
    let caller = Caller { key_id: key.id, tenant: key.tenant, principal, roles: key.roles };
    state.keys().put(presented, caller.clone());
    Ok(caller)
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let header = parts
            .headers
            .get(header::AUTHORIZATION)
            .ok_or_else(|| unauthorized("missing `Authorization: Bearer <key>` header"))?;
        let source = parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|c| source_of(c.0.ip()));
        let limit = state.config().auth_failures_per_minute;
        let now = Instant::now();
        if let Some(wait) = source.and_then(|s| state.auth_failures().blocked(s, limit, now)) {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_auth_failures",
                format!("more than {limit} failed authentications from this address in a minute; wait"),
            )
            .retry_after(wait.as_secs() + 1));
        }
        let token = header.to_str().ok().and_then(|h| h.strip_prefix("Bearer ")).map(str::trim);
        let outcome = match token.filter(|t| !t.is_empty()) {
            None => {
                Err(Refusal::Failed(unauthorized("the `Authorization` header must be `Bearer <key>`"), None))
            }
            Some(token) => authenticate(token, state).await,
        };
        match outcome {
            Ok(caller) => Ok(caller),
            Err(Refusal::Other(e)) => Err(e),
            Err(Refusal::Failed(e, key_id)) => {
                let shown: String = token.unwrap_or_default().chars().take(LOGGED_KEY_CHARS).collect();
                tracing::warn!(
                    source = %source.map_or_else(|| "unknown".to_owned(), |s| s.to_string()),
                    key_prefix = %shown,
                    key_id = %key_id.map_or_else(String::new, |id| id.to_string()),
                    "authentication failed"
                );
                if let Some(source) = source {
                    state.auth_failures().record(source, now);
                }
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_block_a_source_for_the_rest_of_its_window() {
        let failures = AuthFailures::default();
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(failures.blocked(a, 3, t0), None);
            failures.record(a, t0);
        }
        assert_eq!(failures.blocked(a, 3, t0 + Duration::from_secs(10)), Some(Duration::from_secs(50)));
        assert_eq!(failures.blocked(b, 3, t0), None, "per source");
        assert_eq!(failures.blocked(a, 3, t0 + AUTH_FAILURE_WINDOW), None, "the window ends");
        failures.record(a, t0 + AUTH_FAILURE_WINDOW);
        assert_eq!(failures.blocked(a, 3, t0 + AUTH_FAILURE_WINDOW), None, "a new window starts at 1");
    }

    #[test]
    fn sources_are_addresses_and_ipv6_prefixes() {
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(source_of(mapped), "10.0.0.1".parse::<IpAddr>().unwrap());
        let v6: IpAddr = "2001:db8:1:2:3:4:5:6".parse().unwrap();
        assert_eq!(source_of(v6), "2001:db8:1:2::".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn a_pepper_changes_every_hash() {
        let plain = KeyHasher::default();
        let (a, b) = (KeyHasher::peppered(b"0123456789abcdef"), KeyHasher::peppered(b"fedcba9876543210"));
        assert_eq!(plain.hash("ak_x"), hash_key("ak_x"));
        assert_ne!(a.hash("ak_x"), hash_key("ak_x"));
        assert_ne!(a.hash("ak_x"), b.hash("ak_x"));
        assert_eq!(a.hash("ak_x"), KeyHasher::peppered(b"0123456789abcdef").hash("ak_x"));
    }

    #[test]
    fn keys_are_random_and_hashes_compare() {
        let a = generate_key().unwrap();
        let b = generate_key().unwrap();
        assert_ne!(a, b);
        assert!(a.starts_with("ak_") && a.len() == 67);
        assert!(constant_time_eq(&hash_key(&a), &hash_key(&a)));
        assert!(!constant_time_eq(&hash_key(&a), &hash_key(&b)));
    }
}
