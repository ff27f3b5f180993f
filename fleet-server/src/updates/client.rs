//! A blocking client of the operator routes, used by the `fleet-server bundle`,
//! `fleet-server update` and `fleet-server config` commands. The configuration calls are
//! in [`crate::remote_config::client`].
//!
//! It uses reqwest's blocking client, so call it from a plain thread or from
//! `tokio::task::spawn_blocking`, never directly inside an async task.

use std::io::{Seek, Write};
use std::path::Path;
use std::time::Duration;

use reqwest::blocking::{Body, Client, RequestBuilder};
use reqwest::header::{CONTENT_TYPE, HeaderValue};
use serde::de::DeserializeOwned;

use super::http::{CreateUpdates, CreatedUpdates, UpdateDetail};
use crate::store::updates::{BundleRecord, UpdateRecord};

/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a request other than an upload may take in all.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Errors of [`FleetClient`] calls.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid server URL {url:?}: expected http://HOST:PORT or https://...")]
    InvalidServer { url: String },
    #[error("invalid API token: {reason}")]
    InvalidToken { reason: String },
    #[error("invalid update id {id:?}: expected letters, digits, '-' and '_'")]
    InvalidUpdateId { id: String },
    #[error("invalid device id: {reason}")]
    InvalidDeviceId { reason: String },
    #[error("failed to pack the bundle in {dir}")]
    Pack {
        dir: String,
        #[source]
        source: fleet_bundle::BundleError,
    },
    #[error("failed to write the archive to a temporary file")]
    TempFile(#[source] std::io::Error),
    #[error("request to {url} failed")]
    Request {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{url} returned {status}: {message}")]
    Status {
        url: String,
        status: u16,
        message: String,
    },
    #[error("{url} returned a response that is not the expected JSON")]
    InvalidResponse {
        url: String,
        #[source]
        source: serde_json::Error,
    },
}

/// Result of [`FleetClient::upload_bundle`].
#[derive(Debug, Clone)]
pub struct Uploaded {
    pub bundle: BundleRecord,
    /// False when the server already stored an archive with the same SHA-256.
    pub created: bool,
}

/// Client of one fleet server, authenticated with an API token.
#[derive(Debug, Clone)]
pub struct FleetClient {
    base: String,
    authorization: HeaderValue,
    http: Client,
}

impl FleetClient {
    /// Creates a client of the server at `server` (such as `http://127.0.0.1:8080`) that
    /// sends `token` as its bearer token.
    pub fn new(server: &str, token: &str) -> Result<FleetClient, ClientError> {
        if !(server.starts_with("http://") || server.starts_with("https://")) {
            return Err(ClientError::InvalidServer {
                url: server.to_owned(),
            });
        }
        let mut authorization = HeaderValue::from_str(&format!("Bearer {}", token.trim()))
            .map_err(|_| ClientError::InvalidToken {
                reason: "it contains characters not allowed in an HTTP header".into(),
            })?;
        authorization.set_sensitive(true);
        let http = Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(None)
            .build()
            .map_err(|source| ClientError::Request {
                url: server.to_owned(),
                source,
            })?;
        Ok(FleetClient {
            base: server.trim_end_matches('/').to_owned(),
            authorization,
            http,
        })
    }

    /// Packs the bundle in `dir` into a temporary archive file and uploads it.
    ///
    /// The upload has no overall timeout, because a large archive over a slow link may
    /// take long; only connecting is limited.
    pub fn upload_bundle(&self, dir: &Path) -> Result<Uploaded, ClientError> {
        let mut file = tempfile::tempfile().map_err(ClientError::TempFile)?;
        {
            let mut writer = std::io::BufWriter::new(&mut file);
            fleet_bundle::archive::pack(dir, &mut writer).map_err(|source| ClientError::Pack {
                dir: dir.display().to_string(),
                source,
            })?;
            writer.flush().map_err(ClientError::TempFile)?;
        }
        file.rewind().map_err(ClientError::TempFile)?;

        let url = format!("{}/api/bundles", self.base);
        let request = self
            .http
            .post(&url)
            .header(CONTENT_TYPE, "application/x-tar")
            .body(Body::from(file));
        let (status, bundle) = self.send_json::<BundleRecord>(&url, request)?;
        Ok(Uploaded {
            bundle,
            created: status == reqwest::StatusCode::CREATED,
        })
    }

    /// Lists the stored bundles, newest first.
    pub fn bundles(&self) -> Result<Vec<BundleRecord>, ClientError> {
        let url = format!("{}/api/bundles", self.base);
        let request = self.http.get(&url).timeout(REQUEST_TIMEOUT);
        Ok(self.send_json(&url, request)?.1)
    }

    /// Starts updates as `POST /api/updates` describes.
    pub fn create_updates(&self, request: &CreateUpdates) -> Result<CreatedUpdates, ClientError> {
        let url = format!("{}/api/updates", self.base);
        let body = serde_json::to_vec(request).map_err(|source| ClientError::InvalidResponse {
            url: url.clone(),
            source,
        })?;
        let request = self
            .http
            .post(&url)
            .header(CONTENT_TYPE, "application/json")
            .body(body)
            .timeout(REQUEST_TIMEOUT);
        Ok(self.send_json(&url, request)?.1)
    }

    /// Lists the latest `limit` updates, newest first, of one device or of all.
    pub fn updates(
        &self,
        device_id: Option<&str>,
        limit: u32,
    ) -> Result<Vec<UpdateRecord>, ClientError> {
        let url = format!("{}/api/updates", self.base);
        let mut request = self
            .http
            .get(&url)
            .query(&[("limit", limit.to_string())])
            .timeout(REQUEST_TIMEOUT);
        if let Some(device_id) = device_id {
            request = request.query(&[("device", device_id)]);
        }
        Ok(self.send_json(&url, request)?.1)
    }

    /// Returns one update with its events.
    pub fn update(&self, id: &str) -> Result<UpdateDetail, ClientError> {
        if id.is_empty()
            || !id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(ClientError::InvalidUpdateId { id: id.to_owned() });
        }
        let url = format!("{}/api/updates/{id}", self.base);
        let request = self.http.get(&url).timeout(REQUEST_TIMEOUT);
        Ok(self.send_json(&url, request)?.1)
    }

    /// Sends a request to `path` under the server's base URL, with `body` as JSON when
    /// given, and decodes the JSON response as [`FleetClient::send_json`] does.
    pub(crate) fn call_json<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&impl serde::Serialize>,
    ) -> Result<T, ClientError> {
        let url = format!("{}{path}", self.base);
        let mut request = self.http.request(method, &url).timeout(REQUEST_TIMEOUT);
        if let Some(body) = body {
            let bytes =
                serde_json::to_vec(body).map_err(|source| ClientError::InvalidResponse {
                    url: url.clone(),
                    source,
                })?;
            request = request.header(CONTENT_TYPE, "application/json").body(bytes);
        }
        Ok(self.send_json(&url, request)?.1)
    }

    /// Sends a request with the token and decodes a successful response's JSON body;
    /// an error status becomes [`ClientError::Status`] with the server's message.
    fn send_json<T: DeserializeOwned>(
        &self,
        url: &str,
        request: RequestBuilder,
    ) -> Result<(reqwest::StatusCode, T), ClientError> {
        let request_error = |source| ClientError::Request {
            url: url.to_owned(),
            source,
        };
        let response = request
            .header(reqwest::header::AUTHORIZATION, self.authorization.clone())
            .send()
            .map_err(request_error)?;
        let status = response.status();
        let bytes = response.bytes().map_err(request_error)?;
        if !status.is_success() {
            return Err(ClientError::Status {
                url: url.to_owned(),
                status: status.as_u16(),
                message: error_message(&bytes),
            });
        }
        let value =
            serde_json::from_slice(&bytes).map_err(|source| ClientError::InvalidResponse {
                url: url.to_owned(),
                source,
            })?;
        Ok((status, value))
    }
}

/// Returns the `error` field of a JSON error body, or the body as text.
fn error_message(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|value| value.get("error")?.as_str().map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_owned())
}
