//! HTTP authentication: operator login and logout, console session cookies, and the
//! middleware that lets only operators reach the JSON API.
//!
//! A request is authenticated by `Authorization: Bearer TOKEN` (an API token, a session
//! token, or a device secret) or by the console's `fleet_session` cookie. Operator
//! routes return 401 without either and 403 to a device; the bundle download route
//! admits devices as well.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Json, extract::rejection::JsonRejection};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use serde::Deserialize;

use super::{AccessError, Principal};
use crate::api::{ApiError, ApiState};

/// Name of the console's session cookie.
pub const SESSION_COOKIE: &str = "fleet_session";
/// How long a console login lasts.
pub const SESSION_LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// Login attempts allowed per operator name and minute, against password guessing.
const LOGINS_PER_MINUTE: u32 = 10;
/// Names tracked by the login limiter before idle ones are dropped.
const LIMITER_MAX_KEYS: usize = 10_000;

/// Throttles login attempts per operator name.
#[derive(Debug, Clone)]
pub struct LoginLimiter {
    limiter: Arc<DefaultKeyedRateLimiter<String>>,
}

impl Default for LoginLimiter {
    fn default() -> Self {
        let per_minute = NonZeroU32::new(LOGINS_PER_MINUTE).expect("nonzero constant");
        LoginLimiter {
            limiter: Arc::new(RateLimiter::keyed(Quota::per_minute(per_minute))),
        }
    }
}

impl LoginLimiter {
    /// Counts an attempt for `name`; returns how long to wait when over the limit.
    fn check(&self, name: &str) -> Result<(), Duration> {
        if self.limiter.len() > LIMITER_MAX_KEYS {
            self.limiter.retain_recent();
        }
        self.limiter
            .check_key(&name.to_owned())
            .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
    }
}

impl From<AccessError> for ApiError {
    fn from(error: AccessError) -> ApiError {
        match error {
            AccessError::Store(error) => error.into(),
            other => {
                tracing::error!(error = %other, "access check failed");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "access check failed; see the server log",
                )
            }
        }
    }
}

/// Body of `POST /api/login`.
#[derive(Debug, Deserialize)]
pub struct LoginRequest {
    pub username: String,
    pub password: String,
}

/// Checks an operator's password and starts a console session: the response sets the
/// session cookie and also returns the session token for clients without cookies.
pub async fn login(
    State(state): State<ApiState>,
    body: Result<Json<LoginRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(request) = body.map_err(|rejection| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("invalid login request: {}", rejection.body_text()),
        )
    })?;
    if let Err(wait) = state.login_limiter.check(&request.username) {
        state.metrics.login_throttled.inc();
        let retry_after = wait.as_secs().max(1);
        let mut response = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!("too many login attempts; retry in {retry_after} s"),
        )
        .into_response();
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
        return Ok(response);
    }
    let store = &state.store;
    if !super::check_operator_password(store, &request.username, &request.password).await? {
        state.metrics.login_failed.inc();
        tracing::warn!(operator = %request.username, "login failed");
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid user name or password",
        ));
    }
    let token = super::new_secret()?;
    let expires_ms = crate::unix_millis() + SESSION_LIFETIME.as_millis() as u64;
    store
        .put_session(&super::sha256_hex(&token), &request.username, expires_ms)
        .await?;
    tracing::info!(operator = %request.username, "operator logged in");
    let cookie = format!(
        "{SESSION_COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}",
        SESSION_LIFETIME.as_secs()
    );
    let body = serde_json::json!({ "operator": request.username, "token": token });
    Ok(([(header::SET_COOKIE, cookie)], Json(body)).into_response())
}

/// Ends the session that authenticated the request and clears the cookie.
pub async fn logout(
    State(state): State<ApiState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    if let Some(token) = request_token(&headers) {
        state
            .store
            .delete_session(&super::sha256_hex(token))
            .await?;
    }
    let cookie = format!("{SESSION_COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0");
    Ok(([(header::SET_COOKIE, cookie)], StatusCode::NO_CONTENT).into_response())
}

/// Returns who the request is authenticated as.
pub async fn whoami(request: Request) -> Json<serde_json::Value> {
    let body = match request.extensions().get::<Principal>() {
        Some(Principal::Operator { name }) => serde_json::json!({ "operator": name }),
        Some(Principal::Device { id }) => serde_json::json!({ "device": id }),
        Some(Principal::Ingester { name }) => serde_json::json!({ "ingester": name }),
        None => serde_json::json!({}),
    };
    Json(body)
}

/// Middleware for operator routes: 401 without valid credentials, 403 for devices and
/// ingesters; on success the [`Principal`] is added to the request's extensions.
pub async fn require_operator(
    State(state): State<ApiState>,
    mut request: Request,
    next: Next,
) -> Result<Response, Response> {
    let principal = authenticate(&state, request.headers())
        .await
        .map_err(IntoResponse::into_response)?;
    match principal {
        Some(principal @ Principal::Operator { .. }) => {
            request.extensions_mut().insert(principal);
            Ok(next.run(request).await)
        }
        Some(_) => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "this route is for operators; device credentials cannot use it",
        )
        .into_response()),
        None => Err(unauthorized(&state)),
    }
}

/// Middleware for routes open to every authenticated principal, devices included: 401
/// without valid credentials; on success the [`Principal`] is added to the request's
/// extensions.
pub async fn require_principal(
    State(state): State<ApiState>,
    mut request: Request,
    next: Next,
) -> Result<Response, Response> {
    let principal = authenticate(&state, request.headers())
        .await
        .map_err(IntoResponse::into_response)?;
    let Some(principal) = principal else {
        return Err(unauthorized(&state));
    };
    request.extensions_mut().insert(principal);
    Ok(next.run(request).await)
}

/// Counts a request without valid credentials and returns its 401 response.
fn unauthorized(state: &ApiState) -> Response {
    state.metrics.unauthorized_requests.inc();
    let mut response = ApiError::new(
        StatusCode::UNAUTHORIZED,
        "authentication required: log in or send Authorization: Bearer TOKEN",
    )
    .into_response();
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

async fn authenticate(
    state: &ApiState,
    headers: &HeaderMap,
) -> Result<Option<Principal>, ApiError> {
    let Some(token) = request_token(headers) else {
        return Ok(None);
    };
    Ok(super::principal_for_token(&state.store, token).await?)
}

/// Returns the bearer token of the request, else the value of its session cookie.
fn request_token(headers: &HeaderMap) -> Option<&str> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(str::trim);
    if bearer.is_some() {
        return bearer;
    }
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .find_map(|pair| pair.trim().strip_prefix(SESSION_COOKIE)?.strip_prefix('='))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(header::HeaderName, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(name.clone(), HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[test]
    fn request_token_prefers_bearer() {
        let both = headers(&[
            (header::AUTHORIZATION, "Bearer abc"),
            (header::COOKIE, "fleet_session=xyz"),
        ]);
        assert_eq!(request_token(&both), Some("abc"));
    }

    #[test]
    fn request_token_finds_session_cookie() {
        let cookies = headers(&[(header::COOKIE, "theme=dark; fleet_session=xyz; other=1")]);
        assert_eq!(request_token(&cookies), Some("xyz"));
        let lookalike = headers(&[(header::COOKIE, "fleet_session_old=abc")]);
        assert_eq!(request_token(&lookalike), None);
        assert_eq!(request_token(&HeaderMap::new()), None);
    }

    #[test]
    fn login_limiter_throttles_one_name() {
        let limiter = LoginLimiter::default();
        for _ in 0..LOGINS_PER_MINUTE {
            assert!(limiter.check("alice").is_ok());
        }
        let wait = limiter.check("alice").unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(60),
            "{wait:?}"
        );
        assert!(limiter.check("bob").is_ok());
    }
}
