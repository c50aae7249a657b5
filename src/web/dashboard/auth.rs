//! Who may act. Without `SHEEPDOG_DASHBOARD_TOKEN` nobody: no action is shown and every POST
//! is refused (403). With it, whoever signs in with the token (compared in constant time) gets a
//! session: a random id in an HttpOnly, SameSite=Strict cookie, kept in this process only (a
//! restart signs everyone out), and a random CSRF token every form of the session carries,
//! also compared in constant time. The token itself is never shown, logged or echoed.

use std::collections::HashMap;
use std::sync::Mutex;

use axum::http::{header, HeaderMap};
use rand::RngCore;
use secrecy::{ExposeSecret, SecretString};

use super::PageError;
use crate::web::auth::constant_time_eq;
use crate::web::Problem;

pub const COOKIE: &str = "sheepdog_session";
pub const CLEAR_COOKIE: &str = "sheepdog_session=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0";
/// Sessions kept at most; the oldest go first.
const MAX_SESSIONS: usize = 1000;

pub struct Auth {
    token: Option<SecretString>,
    /// session id → (CSRF token, when it was made).
    sessions: Mutex<HashMap<String, (String, std::time::Instant)>>,
}

/// What the page shows to whoever asked.
pub struct Viewer {
    /// Actions exist on this dashboard (a token is set).
    pub actions_enabled: bool,
    /// Signed in: the CSRF token the forms carry.
    pub csrf: Option<String>,
}

impl Viewer {
    pub fn can_act(&self) -> bool {
        self.actions_enabled && self.csrf.is_some()
    }
}

fn random_hex() -> String {
    let mut b = [0u8; 32];
    rand::rng().fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Auth {
    pub fn new(token: Option<SecretString>) -> Auth {
        Auth {
            token: token.filter(|t| !t.expose_secret().is_empty()),
            sessions: Mutex::new(HashMap::new()),
        }
    }

    pub fn enabled(&self) -> bool {
        self.token.is_some()
    }

    /// A new session's Set-Cookie value if `given` is the token.
    pub fn sign_in(&self, given: &str) -> Option<String> {
        let token = self.token.as_ref()?;
        if !constant_time_eq(token.expose_secret().as_bytes(), given.as_bytes()) {
            return None;
        }
        let id = random_hex();
        let mut s = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        if s.len() >= MAX_SESSIONS {
            if let Some(oldest) = s.iter().min_by_key(|(_, (_, at))| *at).map(|(k, _)| k.clone()) {
                s.remove(&oldest);
            }
        }
        s.insert(id.clone(), (random_hex(), std::time::Instant::now()));
        Some(format!("{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict"))
    }

    pub fn sign_out(&self, headers: &HeaderMap) {
        if let Some(id) = session_id(headers) {
            self.sessions.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
        }
    }

    /// The session's CSRF token, if the request carries a live session.
    fn csrf_of(&self, headers: &HeaderMap) -> Option<String> {
        self.token.as_ref()?;
        let id = session_id(headers)?;
        let s = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        // Looked up by the id itself: a HashMap probe compares hashes first, and the id is 256
        // random bits, so timing tells nothing usable about other sessions.
        s.get(&id).map(|(csrf, _)| csrf.clone())
    }

    pub fn viewer(&self, headers: &HeaderMap) -> Viewer {
        Viewer {
            actions_enabled: self.enabled(),
            csrf: self.csrf_of(headers),
        }
    }

    /// A POST may act: a token is set, the session is live and the form's CSRF token is its.
    pub fn authorize(&self, headers: &HeaderMap, csrf: Option<&str>) -> Result<(), PageError> {
        if !self.enabled() {
            return Err(Problem::Forbidden("this dashboard is read-only (no SHEEPDOG_DASHBOARD_TOKEN)".into()).into());
        }
        let Some(expected) = self.csrf_of(headers) else {
            return Err(Problem::Forbidden("sign in first".into()).into());
        };
        match csrf {
            Some(given) if constant_time_eq(expected.as_bytes(), given.as_bytes()) => Ok(()),
            _ => Err(Problem::Forbidden("the form's CSRF token is missing or wrong".into()).into()),
        }
    }
}

fn session_id(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_in_needs_the_token_and_posts_need_the_csrf_token() {
        let none = Auth::new(None);
        assert!(none.sign_in("").is_none());
        assert!(none.authorize(&HeaderMap::new(), None).is_err());

        let a = Auth::new(Some(SecretString::from("s3cret")));
        assert!(a.sign_in("s3cre").is_none());
        assert!(a.sign_in("s3cret!").is_none());
        let cookie = a.sign_in("s3cret").unwrap();
        assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"));
        assert!(!cookie.contains("s3cret"));
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, cookie.split(';').next().unwrap().parse().unwrap());
        let csrf = a.viewer(&h).csrf.unwrap();
        assert!(a.authorize(&h, Some(&csrf)).is_ok());
        assert!(a.authorize(&h, None).is_err());
        assert!(a.authorize(&h, Some("x")).is_err());
        assert!(a.authorize(&HeaderMap::new(), Some(&csrf)).is_err());
        a.sign_out(&h);
        assert!(a.authorize(&h, Some(&csrf)).is_err());
    }
}
