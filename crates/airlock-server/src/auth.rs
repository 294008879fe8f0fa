//! Authentication and roles (SPEC 11). A key is `ak_` + 64 hex digits; only the SHA-256 of it
//! is stored, requests are matched by that hash, and the stored and computed hashes are
//! compared in constant time. The key alone determines the tenant, the principal (the key's
//! name) and the roles.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use airlock_core::ids::{KeyId, TenantId};
use airlock_core::role::{Role, Roles};
use axum::extract::FromRequestParts;
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

/// SHA-256 of a presented key.
pub fn hash_key(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
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

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let header = parts
            .headers
            .get(header::AUTHORIZATION)
            .ok_or_else(|| unauthorized("missing `Authorization: Bearer <key>` header"))?;
        let token = header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| unauthorized("the `Authorization` header must be `Bearer <key>`"))?;
        let presented = hash_key(token);
        if let Some(caller) = state.keys().get(&presented) {
            return Ok(caller);
        }
        let key =
            state.store().key_by_secret(&presented).await?.ok_or_else(|| unauthorized("unknown API key"))?;
        if !constant_time_eq(&key.secret_hash, &presented) {
            return Err(unauthorized("unknown API key"));
        }
        if key.revoked_at.is_some() {
            return Err(unauthorized("this API key was revoked"));
        }
        let principal = key.principal().to_owned();
        let caller = Caller { key_id: key.id, tenant: key.tenant, principal, roles: key.roles };
        state.keys().put(presented, caller.clone());
        Ok(caller)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
