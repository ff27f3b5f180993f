//! Bearer-token authentication of gateway requests, with a short-lived cache in front
//! of the store so the hot path does not query the database for every inference.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::access::{self, AccessError, Principal};
use crate::store::Store;

/// How long a looked-up principal is reused. A revoked token keeps working for at most
/// this long at the gateway.
pub const CACHE_TTL: Duration = Duration::from_secs(5);
/// Cached principals kept before the cache is cleared.
const CACHE_MAX_ENTRIES: usize = 10_000;

/// Resolves bearer tokens to principals.
#[derive(Debug)]
pub struct Authenticator {
    store: Store,
    /// Principals by SHA-256 of the token, so the cache contains no secrets.
    cache: Mutex<HashMap<String, (Principal, Instant)>>,
}

impl Authenticator {
    pub fn new(store: Store) -> Authenticator {
        Authenticator {
            store,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// Returns the principal of `token`, or `None` for an unknown token. Unknown tokens
    /// are not cached, so a newly issued token works at once.
    pub async fn principal(&self, token: &str) -> Result<Option<Principal>, AccessError> {
        let digest = access::sha256_hex(token);
        if let Some(principal) = self.cached(&digest) {
            return Ok(Some(principal));
        }
        let principal = access::principal_for_token(&self.store, token).await?;
        if let Some(principal) = &principal {
            let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            if cache.len() >= CACHE_MAX_ENTRIES {
                cache.clear();
            }
            cache.insert(digest, (principal.clone(), Instant::now()));
        }
        Ok(principal)
    }

    fn cached(&self, digest: &str) -> Option<Principal> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let (principal, at) = cache.get(digest)?;
        (at.elapsed() < CACHE_TTL).then(|| principal.clone())
    }
}

/// Returns the rate-limit key of a principal: `device:ID` or `client:NAME`.
pub fn limiter_key(principal: &Principal) -> String {
    match principal {
        Principal::Device { id } => format!("device:{id}"),
        Principal::Operator { name } => format!("client:{name}"),
        Principal::Ingester { name } => format!("ingester:{name}"),
    }
}

/// Returns the token of an `Authorization: Bearer TOKEN` header.
pub fn bearer_token(headers: &axum::http::HeaderMap) -> Option<&str> {
    let value = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use axum::http::{HeaderMap, HeaderValue, header};

    use super::*;

    #[test]
    fn bearer_token_needs_the_bearer_scheme() {
        let mut headers = HeaderMap::new();
        assert_eq!(bearer_token(&headers), None);
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer abc"),
        );
        assert_eq!(bearer_token(&headers), Some("abc"));
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer  abc "),
        );
        assert_eq!(bearer_token(&headers), Some("abc"));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer_token(&headers), None);
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer "));
        assert_eq!(bearer_token(&headers), None);
    }
}
