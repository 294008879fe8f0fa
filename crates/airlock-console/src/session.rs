//! Server-side sessions. The browser holds only a random session id in an `HttpOnly`,
//! `SameSite=Strict` cookie; the map holds the SHA-256 of that id, the API key the person signed
//! in with (never sent back to the browser), and the session's CSRF token. Sign-in forms get
//! their own short-lived token, so that the login form is protected against CSRF as well.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// Name of the session cookie.
pub const SESSION_COOKIE: &str = "airlock_session";
/// Name of the cookie that pairs a sign-in form with the browser that loaded it.
pub const LOGIN_COOKIE: &str = "airlock_login";

/// How long a sign-in form stays valid.
const LOGIN_TOKEN_TTL: Duration = Duration::from_secs(15 * 60);
/// Open sign-in forms kept before the oldest are dropped (each costs a few bytes).
const LOGIN_TOKENS_MAX: usize = 10_000;

/// Who a session belongs to and what it may do, as the API told at sign-in.
#[derive(Clone, Debug)]
pub struct Session {
    /// The API key the person signed in with.
    pub key: String,
    /// The key's principal.
    pub principal: String,
    /// The key's tenant.
    pub tenant: String,
    /// The key's roles, by wire name.
    pub roles: Vec<String>,
    /// The token every state-changing form of this session carries.
    pub csrf: String,
    created: Instant,
    last_seen: Instant,
}

impl Session {
    /// Whether the key has `role` (admin has every role).
    pub fn has(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role || r == "admin")
    }
}

/// Why a session could not be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// No cookie, or an id this process never issued.
    Missing,
    /// It timed out (idle or absolute) and was removed.
    Expired,
}

/// Every live session of this process, and the open sign-in forms.
pub struct Sessions {
    sessions: Mutex<HashMap<[u8; 32], Session>>,
    login_tokens: Mutex<HashMap<[u8; 32], Instant>>,
    idle: Duration,
    absolute: Duration,
}

fn digest(text: &str) -> [u8; 32] {
    Sha256::digest(text.as_bytes()).into()
}

/// 32 random bytes as hex.
pub fn random_token() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Compares two strings without an early exit on the first difference.
pub fn same_token(a: &str, b: &str) -> bool {
    let (a, b) = (digest(a), digest(b));
    a.iter().zip(&b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Sessions {
    /// Sessions ending after `idle` without a request, or `absolute` after sign-in.
    pub fn new(idle: Duration, absolute: Duration) -> Self {
        Self {
            sessions: Mutex::new(HashMap::new()),
            login_tokens: Mutex::new(HashMap::new()),
            idle,
            absolute,
        }
    }

    /// A new sign-in form token (also set as the [`LOGIN_COOKIE`]).
    pub fn issue_login_token(&self, now: Instant) -> Result<String, getrandom::Error> {
        let token = random_token()?;
        if let Ok(mut tokens) = self.login_tokens.lock() {
            tokens.retain(|_, issued| now.duration_since(*issued) < LOGIN_TOKEN_TTL);
            if tokens.len() >= LOGIN_TOKENS_MAX {
                tokens.clear();
            }
            tokens.insert(digest(&token), now);
        }
        Ok(token)
    }

    /// Whether a sign-in POST is genuine: the form's token equals the cookie's and was issued
    /// by this process within its TTL. A token is used once.
    pub fn take_login_token(&self, form: &str, cookie: &str, now: Instant) -> bool {
        if form.is_empty() || !same_token(form, cookie) {
            return false;
        }
        let Ok(mut tokens) = self.login_tokens.lock() else { return false };
        tokens.remove(&digest(form)).is_some_and(|issued| now.duration_since(issued) < LOGIN_TOKEN_TTL)
    }

    /// Opens a session; its id, to be set as the [`SESSION_COOKIE`].
    pub fn open(
        &self,
        key: String,
        principal: String,
        tenant: String,
        roles: Vec<String>,
        now: Instant,
    ) -> Result<String, getrandom::Error> {
        let id = random_token()?;
        let session =
            Session { key, principal, tenant, roles, csrf: random_token()?, created: now, last_seen: now };
        if let Ok(mut sessions) = self.sessions.lock() {
            let (idle, absolute) = (self.idle, self.absolute);
            sessions.retain(|_, s| live(s, now, idle, absolute));
            sessions.insert(digest(&id), session);
        }
        Ok(id)
    }

    /// The session of a cookie value, touched (its idle timer restarts).
    pub fn get(&self, id: &str, now: Instant) -> Result<Session, Lookup> {
        let Ok(mut sessions) = self.sessions.lock() else { return Err(Lookup::Missing) };
        let hash = digest(id);
        let Some(session) = sessions.get_mut(&hash) else { return Err(Lookup::Missing) };
        if !live(session, now, self.idle, self.absolute) {
            sessions.remove(&hash);
            return Err(Lookup::Expired);
        }
        session.last_seen = now;
        Ok(session.clone())
    }

    /// Whether a session is still live, without touching it: an open page's live updates must
    /// not keep an idle session alive.
    pub fn peek(&self, id: &str, now: Instant) -> bool {
        let Ok(sessions) = self.sessions.lock() else { return false };
        sessions.get(&digest(id)).is_some_and(|s| live(s, now, self.idle, self.absolute))
    }

    /// Ends a session (sign-out, or its key was refused by the API).
    pub fn close(&self, id: &str) {
        if let Ok(mut sessions) = self.sessions.lock() {
            sessions.remove(&digest(id));
        }
    }
}

fn live(s: &Session, now: Instant, idle: Duration, absolute: Duration) -> bool {
    now.duration_since(s.last_seen) < idle && now.duration_since(s.created) < absolute
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sessions() -> Sessions {
        Sessions::new(Duration::from_secs(60), Duration::from_secs(600))
    }

    #[test]
    fn sessions_expire_when_idle_and_absolutely() {
        let s = sessions();
        let t0 = Instant::now();
        let id = s.open("k".into(), "p".into(), "t".into(), vec!["approver".into()], t0).unwrap();
        assert!(s.peek(&id, t0 + Duration::from_secs(59)));
        assert!(!s.peek(&id, t0 + Duration::from_secs(60)), "peeking does not touch");
        assert!(s.get(&id, t0 + Duration::from_secs(59)).is_ok());
        // Touched at 59 s: alive at 118 s, gone at 120 s.
        assert!(s.get(&id, t0 + Duration::from_secs(118)).is_ok());
        assert_eq!(s.get(&id, t0 + Duration::from_secs(178)).unwrap_err(), Lookup::Expired);
        assert_eq!(s.get(&id, t0).unwrap_err(), Lookup::Missing);

        let id = s.open("k".into(), "p".into(), "t".into(), Vec::new(), t0).unwrap();
        for step in 1..=10 {
            let at = t0 + Duration::from_secs(step * 59);
            let alive = s.get(&id, at).is_ok();
            assert_eq!(alive, step * 59 < 600, "at {}s", step * 59);
        }
    }

    #[test]
    fn login_tokens_pair_with_their_cookie_once() {
        let s = sessions();
        let now = Instant::now();
        let token = s.issue_login_token(now).unwrap();
        assert!(!s.take_login_token(&token, "other", now));
        assert!(!s.take_login_token("", "", now));
        assert!(s.take_login_token(&token, &token, now));
        assert!(!s.take_login_token(&token, &token, now), "a token is used once");
        let late = s.issue_login_token(now).unwrap();
        assert!(!s.take_login_token(&late, &late, now + LOGIN_TOKEN_TTL));
    }

    #[test]
    fn roles_include_admin() {
        let s = sessions();
        let now = Instant::now();
        let id = s.open("k".into(), "p".into(), "t".into(), vec!["admin".into()], now).unwrap();
        let session = s.get(&id, now).unwrap();
        assert!(session.has("operator") && session.has("approver"));
        assert!(same_token(&session.csrf, &session.csrf.clone()));
        assert!(!same_token(&session.csrf, "x"));
    }
}
