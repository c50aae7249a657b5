//! Who is asking. Producers of the Batch API carry a key (`Authorization: Bearer sd-…`); the
//! dashboard's operators sign in with its token (`dashboard/auth.rs`). Secrets are compared in
//! constant time and never logged, echoed or stored in the clear: a key is stored as its SHA-256
//! hash next to a short prefix that is not secret (it names the key in `keys list` and finds
//! its row); the hash of the key given is then compared with the stored one in constant time.

use axum::extract::{FromRef, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap};
use rand::distr::{Alphanumeric, SampleString};
use sha2::{Digest, Sha256};
use sqlx::PgPool;

use super::api::ApiError;
use super::Problem;

/// Equal, in time that depends only on the lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let mut diff = 0u8;
    for (x, y) in a.iter().zip(b) {
        diff |= x ^ y;
    }
    std::hint::black_box(diff) == 0
}

/// Every producer key starts so.
pub const KEY_START: &str = "sd-";
/// Characters after `sd-` that name the key's row (not secret).
const PREFIX_LEN: usize = 8;
/// Random characters after the prefix (alphanumeric: about 190 bits).
const SECRET_LEN: usize = 32;

/// A new key: the key itself (shown once), its prefix and its hash (stored).
pub struct NewKey {
    pub key: String,
    pub prefix: String,
    pub hash: Vec<u8>,
}

/// Makes a random key `sd-<prefix><secret>`.
pub fn new_key() -> NewKey {
    let mut rng = rand::rng();
    let prefix = Alphanumeric.sample_string(&mut rng, PREFIX_LEN).to_ascii_lowercase();
    let secret = Alphanumeric.sample_string(&mut rng, SECRET_LEN);
    let key = format!("{KEY_START}{prefix}{secret}");
    NewKey {
        hash: hash_key(&key),
        prefix,
        key,
    }
}

/// The SHA-256 of a key, as stored.
pub fn hash_key(key: &str) -> Vec<u8> {
    Sha256::digest(key.as_bytes()).to_vec()
}

/// The prefix of a key as given, if it has the shape of one.
fn prefix_of(key: &str) -> Option<&str> {
    let rest = key.strip_prefix(KEY_START)?;
    (rest.len() == PREFIX_LEN + SECRET_LEN && rest.is_ascii()).then(|| &rest[..PREFIX_LEN])
}

/// The bearer token of a request, if any.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// The producer a request of the API comes from: the name of its (live) key. A request without
/// one is refused 401 before its handler runs. Keys are looked up on every request, so a
/// revoked key is refused from the moment `keys revoke` commits.
#[derive(Debug, Clone)]
pub struct Producer {
    pub name: String,
}

impl<S> FromRequestParts<S> for Producer
where
    PgPool: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Some(given) = bearer(&parts.headers) else {
            return Err(Problem::Unauthorized(
                "You didn't provide an API key. Send it as `Authorization: Bearer sd-...` (the SDKs' api_key); \
                 `sheepdog keys create NAME` makes one."
                    .into(),
            )
            .into());
        };
        let wrong = || -> ApiError {
            Problem::Unauthorized(
                "Incorrect API key provided (unknown or revoked). `sheepdog keys list` shows the live keys.".into(),
            )
            .into()
        };
        let Some(prefix) = prefix_of(given) else {
            return Err(wrong());
        };
        let pool = PgPool::from_ref(state);
        let candidates = crate::store::api::live_keys_by_prefix(&pool, prefix).await?;
        let hash = hash_key(given);
        // Every row with this prefix is compared (there is one, unless prefixes collide), each in
        // constant time.
        let mut found = None;
        for (name, stored) in candidates {
            if constant_time_eq(&stored, &hash) {
                found = Some(name);
            }
        }
        found.map(|name| Producer { name }).ok_or_else(wrong)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_have_their_shape_and_hash() {
        let k = new_key();
        assert!(k.key.starts_with("sd-"));
        assert_eq!(prefix_of(&k.key), Some(k.prefix.as_str()));
        assert_eq!(k.hash, hash_key(&k.key));
        assert_ne!(new_key().key, k.key);
        assert_eq!(prefix_of("sd-short"), None);
        assert_eq!(prefix_of("sk-0123456789012345678901234567890123456789"), None);
    }

    #[test]
    fn bearer_tokens() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert(header::AUTHORIZATION, "Bearer sd-abc".parse().unwrap());
        assert_eq!(bearer(&h), Some("sd-abc"));
        h.insert(header::AUTHORIZATION, "Basic xyz".parse().unwrap());
        assert_eq!(bearer(&h), None);
    }

    #[test]
    fn constant_time_eq_is_eq() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
