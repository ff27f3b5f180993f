//! Hard-sample routes through a real server: device uploads with authentication,
//! deduplication by content hash, input checks, the size limit, and the operator's list
//! and content routes. The store's sample SQL on both databases is covered in
//! `store.rs`.

use std::time::Duration;

mod fleet_support;
mod gateway_support;

use fleet_server::samples::SampleSettings;
use fleet_support::TestServer;
use fleet_wire::sample::SampleMetadata;
use reqwest::StatusCode;
use serde_json::Value;
use sha2::{Digest, Sha256};

const PNG_SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";
const JPEG_SIGNATURE: &[u8] = b"\xff\xd8\xff\xe0";

/// A fleet server on free ports with an operator token and devices `dev-1` and `dev-2`.
struct SampleServer {
    inner: TestServer,
    dev1: String,
    dev2: String,
}

impl std::ops::Deref for SampleServer {
    type Target = TestServer;

    fn deref(&self) -> &TestServer {
        &self.inner
    }
}

/// A response's status, headers and body.
struct Reply {
    status: StatusCode,
    headers: reqwest::header::HeaderMap,
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    /// Returns the `error` message of a JSON error body.
    fn error(&self) -> String {
        self.json()["error"].as_str().unwrap_or_default().to_owned()
    }
}

impl SampleServer {
    async fn start(settings: SampleSettings) -> SampleServer {
        let inner = TestServer::start_with(|config| config.samples = settings).await;
        SampleServer {
            dev1: inner.device_secret.clone(),
            dev2: inner.second_device_secret.clone(),
            inner,
        }
    }

    async fn send(&self, request: reqwest::RequestBuilder, token: Option<&str>) -> Reply {
        let request = match token {
            Some(token) => request.bearer_auth(token),
            None => request,
        };
        let response = request.send().await.expect("send request");
        Reply {
            status: response.status(),
            headers: response.headers().clone(),
            body: response.bytes().await.expect("read body").to_vec(),
        }
    }

    /// Posts `bytes` with `content_type` and the query parameters of `metadata`.
    async fn upload_raw(
        &self,
        query: &[(&str, String)],
        content_type: &str,
        bytes: Vec<u8>,
        token: Option<&str>,
    ) -> Reply {
        let request = self
            .http
            .post(format!("{}/api/samples", self.base))
            .query(query)
            .header("content-type", content_type)
            .body(bytes);
        self.send(request, token).await
    }

    /// Uploads a PNG sample as described by `metadata`.
    async fn upload(&self, metadata: &SampleMetadata, bytes: &[u8], token: &str) -> Reply {
        self.upload_raw(
            &metadata.query_pairs(),
            "image/png",
            bytes.to_vec(),
            Some(token),
        )
        .await
    }

    async fn get(&self, path: &str, token: Option<&str>) -> Reply {
        let request = self.http.get(format!("{}{path}", self.base));
        self.send(request, token).await
    }

    async fn metric(&self, sample: &str) -> Option<f64> {
        let text = self.get("/metrics", None).await.body;
        String::from_utf8_lossy(&text).lines().find_map(|line| {
            line.strip_prefix(sample)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
    }
}

/// Returns PNG-signed bytes that differ for each `seed`.
fn png_bytes(seed: u8) -> Vec<u8> {
    let mut bytes = PNG_SIGNATURE.to_vec();
    bytes.extend(std::iter::repeat_n(seed, 32));
    bytes
}

/// Returns metadata of `bytes` as device `device_id` would send it.
fn metadata_for(device_id: &str, model: &str, bytes: &[u8]) -> SampleMetadata {
    SampleMetadata {
        device_id: device_id.into(),
        model_name: model.into(),
        model_version: "1.0.0".into(),
        predicted_class: 3,
        predicted_label: "three".into(),
        confidence: 0.42,
        true_class: Some(5),
        source: "t10k-images-idx3-ubyte.gz#17".into(),
        device_time_ms: 1_700_000_000_000,
        sha256: hex::encode(Sha256::digest(bytes)),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_needs_the_matching_device_credential() {
    let server = SampleServer::start(SampleSettings::default()).await;
    let bytes = png_bytes(1);
    let metadata = metadata_for("dev-1", "digit-cnn", &bytes);

    let anonymous = server
        .upload_raw(&metadata.query_pairs(), "image/png", bytes.clone(), None)
        .await;
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);

    let wrong = server.upload(&metadata, &bytes, "not-a-secret").await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);

    let operator = server.upload(&metadata, &bytes, &server.token).await;
    assert_eq!(operator.status, StatusCode::FORBIDDEN);
    assert!(
        operator.error().contains("device credentials"),
        "{}",
        operator.error()
    );

    let other_device = server.upload(&metadata, &bytes, &server.dev2).await;
    assert_eq!(other_device.status, StatusCode::FORBIDDEN);
    assert!(
        other_device.error().contains("\"dev-1\"") && other_device.error().contains("\"dev-2\""),
        "{}",
        other_device.error()
    );

    let listed = server.get("/api/samples", Some(&server.token)).await;
    assert_eq!(
        listed.json(),
        Value::Array(Vec::new()),
        "nothing was stored"
    );
    assert_eq!(
        server
            .metric("fleet_sample_uploads_total{outcome=\"rejected\"}")
            .await,
        Some(1.0),
        "only the mismatched device reached the handler's checks"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_content_returns_the_first_record() {
    let server = SampleServer::start(SampleSettings::default()).await;
    let bytes = png_bytes(2);
    let metadata = metadata_for("dev-1", "digit-cnn", &bytes);

    let first = server.upload(&metadata, &bytes, &server.dev1).await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.json());
    let record = first.json();
    assert_eq!(record["sha256"], metadata.sha256.as_str());
    assert_eq!(record["device_id"], "dev-1");
    assert_eq!(record["model_name"], "digit-cnn");
    assert_eq!(record["model_version"], "1.0.0");
    assert_eq!(record["predicted_class"], 3);
    assert_eq!(record["predicted_label"], "three");
    assert_eq!(record["true_class"], 5);
    assert_eq!(record["source"], "t10k-images-idx3-ubyte.gz#17");
    assert_eq!(record["device_time_ms"], 1_700_000_000_000_i64);
    assert_eq!(record["content_type"], "image/png");
    assert_eq!(record["size"], bytes.len());
    let confidence = record["confidence"].as_f64().unwrap();
    assert!((confidence - 0.42).abs() < 1e-6, "{confidence}");

    let again = server.upload(&metadata, &bytes, &server.dev1).await;
    assert_eq!(again.status, StatusCode::OK, "{}", again.json());
    assert_eq!(
        again.json(),
        record,
        "the stored record is returned unchanged"
    );

    // Another device with the same content gets the first device's record.
    let from_dev2 = metadata_for("dev-2", "digit-cnn", &bytes);
    let shared = server.upload(&from_dev2, &bytes, &server.dev2).await;
    assert_eq!(shared.status, StatusCode::OK);
    assert_eq!(shared.json()["device_id"], "dev-1");

    let file = server
        .dir
        .path()
        .join("fleet-samples")
        .join(format!("{}.png", metadata.sha256));
    assert_eq!(std::fs::read(&file).unwrap(), bytes);
    let files = std::fs::read_dir(server.dir.path().join("fleet-samples"))
        .unwrap()
        .count();
    assert_eq!(files, 1, "one file per content, no temporary files left");

    let stored = "fleet_sample_uploads_total{outcome=\"stored\"}";
    let duplicate = "fleet_sample_uploads_total{outcome=\"duplicate\"}";
    assert_eq!(server.metric(stored).await, Some(1.0));
    assert_eq!(server.metric(duplicate).await, Some(2.0));
}

/// An upload that the server must reject, with the expected status and message.
struct BadUpload<'a> {
    case: &'a str,
    query: Vec<(&'a str, String)>,
    content_type: &'a str,
    body: Vec<u8>,
    status: StatusCode,
    /// Text the error message must contain.
    expected: &'a str,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_uploads_name_the_problem() {
    let server = SampleServer::start(SampleSettings::default()).await;
    let bytes = png_bytes(3);
    let metadata = metadata_for("dev-1", "digit-cnn", &bytes);
    let pairs = metadata.query_pairs();
    let without = |name: &str| -> Vec<(&str, String)> {
        pairs.iter().filter(|(n, _)| *n != name).cloned().collect()
    };
    let replaced = |name: &str, value: &str| -> Vec<(&str, String)> {
        pairs
            .iter()
            .map(|(n, v)| {
                (
                    *n,
                    if *n == name {
                        value.to_owned()
                    } else {
                        v.clone()
                    },
                )
            })
            .collect()
    };
    let mut with_unknown = pairs.clone();
    with_unknown.push(("colour", "blue".into()));
    let mut jpeg = JPEG_SIGNATURE.to_vec();
    jpeg.extend([0u8; 16]);
    let jpeg_sha = hex::encode(Sha256::digest(&jpeg));

    let cases = [
        BadUpload {
            case: "missing model name",
            query: without("model_name"),
            content_type: "image/png",
            body: bytes.clone(),
            status: StatusCode::BAD_REQUEST,
            expected: "model_name",
        },
        BadUpload {
            case: "confidence above 1",
            query: replaced("confidence", "1.5"),
            content_type: "image/png",
            body: bytes.clone(),
            status: StatusCode::BAD_REQUEST,
            expected: "confidence",
        },
        BadUpload {
            case: "confidence not a number",
            query: replaced("confidence", "high"),
            content_type: "image/png",
            body: bytes.clone(),
            status: StatusCode::BAD_REQUEST,
            expected: "confidence",
        },
        BadUpload {
            case: "empty model version",
            query: replaced("model_version", ""),
            content_type: "image/png",
            body: bytes.clone(),
            status: StatusCode::BAD_REQUEST,
            expected: "model_version",
        },
        BadUpload {
            case: "unknown parameter",
            query: with_unknown,
            content_type: "image/png",
            body: bytes.clone(),
            status: StatusCode::BAD_REQUEST,
            expected: "colour",
        },
        BadUpload {
            case: "unsupported content type",
            query: pairs.clone(),
            content_type: "text/plain",
            body: bytes.clone(),
            status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
            expected: "text/plain",
        },
        BadUpload {
            case: "JPEG bytes sent as PNG",
            query: replaced("sha256", &jpeg_sha),
            content_type: "image/png",
            body: jpeg,
            status: StatusCode::BAD_REQUEST,
            expected: "does not match its content type image/png",
        },
        BadUpload {
            case: "empty body",
            query: pairs.clone(),
            content_type: "image/png",
            body: Vec::new(),
            status: StatusCode::BAD_REQUEST,
            expected: "empty",
        },
        BadUpload {
            case: "hash of other bytes",
            query: replaced("sha256", &"ab".repeat(32)),
            content_type: "image/png",
            body: bytes.clone(),
            status: StatusCode::BAD_REQUEST,
            expected: "hashes to",
        },
    ];
    for BadUpload {
        case,
        query,
        content_type,
        body,
        status,
        expected,
    } in cases
    {
        let reply = server
            .upload_raw(&query, content_type, body, Some(&server.dev1))
            .await;
        assert_eq!(reply.status, status, "{case}: {}", reply.error());
        assert!(
            reply.error().contains(expected),
            "{case}: {:?} lacks {expected:?}",
            reply.error()
        );
    }
    let listed = server.get("/api/samples", Some(&server.token)).await;
    assert_eq!(
        listed.json(),
        Value::Array(Vec::new()),
        "nothing was stored"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_upload_is_rejected_with_413() {
    let server = SampleServer::start(SampleSettings {
        max_sample_bytes: 1024,
        ..SampleSettings::default()
    })
    .await;
    let mut bytes = PNG_SIGNATURE.to_vec();
    bytes.resize(2000, 7);
    let metadata = metadata_for("dev-1", "digit-cnn", &bytes);
    let reply = server.upload(&metadata, &bytes, &server.dev1).await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(reply.error().contains("1024"), "{}", reply.error());

    bytes.truncate(1024);
    let metadata = metadata_for("dev-1", "digit-cnn", &bytes);
    let reply = server.upload(&metadata, &bytes, &server.dev1).await;
    assert_eq!(
        reply.status,
        StatusCode::CREATED,
        "a sample at the limit fits"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_list_and_read_samples() {
    let server = SampleServer::start(SampleSettings::default()).await;
    let uploads = [
        ("dev-1", "digit-cnn", 10),
        ("dev-1", "digit-student", 11),
        ("dev-2", "digit-cnn", 12),
    ];
    let mut hashes = Vec::new();
    for (device, model, seed) in uploads {
        let bytes = png_bytes(seed);
        let metadata = metadata_for(device, model, &bytes);
        let secret = if device == "dev-1" {
            &server.dev1
        } else {
            &server.dev2
        };
        let reply = server.upload(&metadata, &bytes, secret).await;
        assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.error());
        hashes.push(metadata.sha256);
        // Distinct receive times make the newest-first order certain.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let sha_list = |reply: &Reply| -> Vec<String> {
        reply
            .json()
            .as_array()
            .expect("a JSON array")
            .iter()
            .map(|record| record["sha256"].as_str().unwrap().to_owned())
            .collect()
    };
    let token = Some(server.token.as_str());
    let all = server.get("/api/samples", token).await;
    assert_eq!(all.status, StatusCode::OK);
    assert_eq!(
        sha_list(&all),
        [hashes[2].as_str(), &hashes[1], &hashes[0]],
        "newest first"
    );
    let by_device = server.get("/api/samples?device=dev-2", token).await;
    assert_eq!(sha_list(&by_device), [hashes[2].as_str()]);
    let by_model = server.get("/api/samples?model=digit-cnn", token).await;
    assert_eq!(sha_list(&by_model), [hashes[2].as_str(), &hashes[0]]);
    let both = server
        .get("/api/samples?device=dev-1&model=digit-cnn", token)
        .await;
    assert_eq!(sha_list(&both), [hashes[0].as_str()]);
    let limited = server.get("/api/samples?limit=1", token).await;
    assert_eq!(sha_list(&limited), [hashes[2].as_str()]);
    let zero = server.get("/api/samples?limit=0", token).await;
    assert_eq!(zero.status, StatusCode::BAD_REQUEST);
    assert!(zero.error().contains("limit"), "{}", zero.error());

    let content = server
        .get(&format!("/api/samples/{}", hashes[1]), token)
        .await;
    assert_eq!(content.status, StatusCode::OK);
    assert_eq!(content.body, png_bytes(11));
    assert_eq!(content.headers["content-type"], "image/png");
    assert_eq!(content.headers["x-content-type-options"], "nosniff");

    let unknown = server
        .get(&format!("/api/samples/{}", "cd".repeat(32)), token)
        .await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    let invalid = server.get("/api/samples/not-a-hash", token).await;
    assert_eq!(invalid.status, StatusCode::BAD_REQUEST);
    assert!(invalid.error().contains("SHA-256"), "{}", invalid.error());

    let as_device = server.get("/api/samples", Some(&server.dev1)).await;
    assert_eq!(as_device.status, StatusCode::FORBIDDEN);
    let anonymous = server.get("/api/samples", None).await;
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);
    let content_as_device = server
        .get(&format!("/api/samples/{}", hashes[0]), Some(&server.dev1))
        .await;
    assert_eq!(content_as_device.status, StatusCode::FORBIDDEN);
    server.inner.server.shutdown().await;
}
