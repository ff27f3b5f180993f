//! Cloud fallback of the local inference API against a stand-in cloud: an HTTP server on
//! a free loopback port that serves Open Inference Protocol requests, and can be made
//! to fail or stall.

mod common;

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::post;
use serde_json::{Value, json};

use common::{ApiServer, Reference, digit_bundle};
use fleet_device::api::breaker::BreakerState;
use fleet_device::api::{ApiState, Fallback, FallbackCounters, FallbackPolicy};
use fleet_device::model::{SharedModel, top1};
use fleet_device::settings::LiveSettings;

const TOKEN: &str = "device-secret";
/// Model the stand-in cloud returns 404 for.
const MISSING_MODEL: &str = "missing";

/// Behaviour of the stand-in cloud.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Mode {
    Answer = 0,
    Fail = 1,
    Stall = 2,
}

/// Requests the stand-in cloud received, and its behaviour.
#[derive(Debug, Default)]
struct CloudState {
    mode: AtomicU8,
    requests: AtomicUsize,
    last_authorization: Mutex<Option<String>>,
    last_content_type: Mutex<Option<String>>,
    last_body: Mutex<Vec<u8>>,
}

/// The stand-in cloud, serving until the test process ends.
struct Cloud {
    address: SocketAddr,
    state: Arc<CloudState>,
}

impl Cloud {
    fn start() -> Cloud {
        let state = Arc::new(CloudState::default());
        let app = Router::new()
            .route("/v2/models/{name}/infer", post(cloud_infer))
            .with_state(state.clone());
        let (runtime, listener, address) = common::bind_loopback(1);
        // Not stopped at the end: a stalled request would hold up a graceful stop.
        std::thread::spawn(move || runtime.block_on(axum::serve(listener, app).into_future()));
        Cloud { address, state }
    }

    fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    fn set_mode(&self, mode: Mode) {
        self.state.mode.store(mode as u8, Ordering::SeqCst);
    }

    fn requests(&self) -> usize {
        self.state.requests.load(Ordering::SeqCst)
    }
}

async fn cloud_infer(
    State(cloud): State<Arc<CloudState>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    cloud.requests.fetch_add(1, Ordering::SeqCst);
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|value| value.to_str().ok())
            .map(str::to_string)
    };
    *cloud.last_authorization.lock().unwrap() = header("authorization");
    *cloud.last_content_type.lock().unwrap() = header("content-type");
    *cloud.last_body.lock().unwrap() = body.to_vec();
    if name == MISSING_MODEL {
        return (StatusCode::NOT_FOUND, "model not found").into_response();
    }
    match cloud.mode.load(Ordering::SeqCst) {
        0 => Json(json!({
            "model_name": name,
            "model_version": "cloud-1",
            "outputs": [{"name": "top1_class", "datatype": "INT64", "shape": [1], "data": [7]}],
        }))
        .into_response(),
        1 => (StatusCode::SERVICE_UNAVAILABLE, "replicas down").into_response(),
        _ => {
            tokio::time::sleep(Duration::from_secs(60)).await;
            StatusCode::SERVICE_UNAVAILABLE.into_response()
        }
    }
}

/// The status, the headers that the fallback sets, and the body as JSON.
struct Answer {
    status: u16,
    source: Option<String>,
    reason: Option<String>,
    fallback: Option<String>,
    body: Value,
}

fn infer(server: &ApiServer, body: &Value) -> Answer {
    let response = match ureq::post(&server.url("/v2/models/digit-cnn/infer")).send_json(body) {
        Ok(response) => response,
        Err(ureq::Error::Status(_, response)) => response,
        Err(error) => panic!("request failed: {error}"),
    };
    let header = |name: &str| response.header(name).map(str::to_string);
    Answer {
        status: response.status(),
        source: header("fleet-inference-source"),
        reason: header("fleet-fallback-reason"),
        fallback: header("fleet-fallback"),
        body: response.into_json().expect("a JSON body"),
    }
}

fn sample_body(reference: &Reference, index: usize) -> Value {
    json!({
        "id": format!("sample-{index}"),
        "inputs": [{
            "name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32",
            "data": reference.input(index),
        }],
    })
}

fn model(dir: &tempfile::TempDir) -> SharedModel {
    let bundle = digit_bundle(dir.path());
    SharedModel::load(&bundle.bundle).expect("load the digit-cnn model")
}

/// Returns the top-1 confidence of every reference sample.
fn confidences(model: &SharedModel, reference: &Reference) -> Vec<f32> {
    (0..Reference::SAMPLES)
        .map(|index| {
            let rows = model.run(1, reference.input(index)).expect("run the model");
            top1(&model.info().confidences(&rows[0])).1
        })
        .collect()
}

fn serve_with_fallback(
    model: SharedModel,
    cloud: &Cloud,
    policy: FallbackPolicy,
) -> (ApiServer, Arc<FallbackCounters>) {
    let counters = Arc::new(FallbackCounters::default());
    let fallback = Fallback::new(cloud.url(), Some(TOKEN.into()), policy, counters.clone());
    let state = ApiState::new(model).with_fallback(fallback);
    (ApiServer::start_with(state), counters)
}

#[test]
fn low_confidence_goes_to_the_cloud() {
    let dir = tempfile::tempdir().unwrap();
    let model = model(&dir);
    let reference = Reference::load();
    let confidences = confidences(&model, &reference);
    let (unsure, _) = confidences
        .iter()
        .enumerate()
        .min_by(|a, b| a.1.total_cmp(b.1))
        .unwrap();
    let (sure, _) = confidences
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .unwrap();
    assert!(
        confidences[unsure] < confidences[sure],
        "the reference samples all have confidence {}",
        confidences[sure]
    );
    let threshold = (confidences[unsure] + confidences[sure]) / 2.0;

    let cloud = Cloud::start();
    let policy = FallbackPolicy {
        threshold: Some(threshold),
        ..FallbackPolicy::default()
    };
    let (server, counters) = serve_with_fallback(model, &cloud, policy);

    let sent = sample_body(&reference, unsure);
    let answer = infer(&server, &sent);
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.source.as_deref(), Some("cloud"));
    assert_eq!(answer.reason.as_deref(), Some("low_confidence"));
    assert_eq!(answer.body["model_version"], "cloud-1");
    assert_eq!(answer.body["outputs"][0]["data"], json!([7]));
    assert_eq!(cloud.requests(), 1);
    let authorization = cloud.state.last_authorization.lock().unwrap().clone();
    assert_eq!(authorization, Some(format!("Bearer {TOKEN}")));
    let content_type = cloud.state.last_content_type.lock().unwrap().clone();
    assert_eq!(content_type.as_deref(), Some("application/json"));
    // Both sides parse the same text, so floats compare equal after parsing.
    let forwarded: Value = serde_json::from_slice(&cloud.state.last_body.lock().unwrap()).unwrap();
    let sent_text = serde_json::to_vec(&sent).unwrap();
    assert_eq!(
        forwarded,
        serde_json::from_slice::<Value>(&sent_text).unwrap()
    );

    let answer = infer(&server, &sample_body(&reference, sure));
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.source.as_deref(), Some("local"));
    assert_eq!(answer.fallback, None);
    assert_eq!(answer.body["model_version"], "1.0.0");
    assert!(answer.body.get("parameters").is_none(), "{}", answer.body);
    assert_eq!(cloud.requests(), 1);

    let counts = counters.snapshot();
    assert_eq!(counts.low_confidence, 1);
    assert_eq!(counts.cloud_unavailable, 0);
}

#[test]
fn breaker_opens_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let model = model(&dir);
    let reference = Reference::load();
    let cloud = Cloud::start();
    let cooldown = Duration::from_millis(300);
    // With no request allowed to run locally, every request goes to the cloud first.
    let policy = FallbackPolicy {
        max_local_queue: Some(0),
        timeout: Duration::from_millis(500),
        breaker_failures: 2,
        breaker_cooldown: cooldown,
        ..FallbackPolicy::default()
    };
    let (server, counters) = serve_with_fallback(model, &cloud, policy);
    let fallback = || server.state.fallback().expect("a fallback");
    let body = sample_body(&reference, 0);
    let expected_class = reference.class_of(0) as i64;

    let assert_local_unavailable = |answer: &Answer| {
        assert_eq!(answer.status, 200, "{}", answer.body);
        assert_eq!(answer.source.as_deref(), Some("local"));
        assert_eq!(answer.fallback.as_deref(), Some("unavailable"));
        assert_eq!(answer.body["parameters"]["fleet_fallback"], "unavailable");
        assert_eq!(answer.body["parameters"]["fleet_inference_source"], "local");
        let top1 = answer.body["outputs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|output| output["name"] == "top1_class")
            .expect("a top1_class output");
        assert_eq!(top1["data"], json!([expected_class]));
    };

    cloud.set_mode(Mode::Fail);
    assert_local_unavailable(&infer(&server, &body));
    assert_eq!(cloud.requests(), 1);
    assert_eq!(
        fallback().breaker_state(),
        BreakerState::Closed { failures: 1 }
    );

    cloud.set_mode(Mode::Stall);
    assert_local_unavailable(&infer(&server, &body));
    assert_eq!(cloud.requests(), 2);
    assert!(
        matches!(fallback().breaker_state(), BreakerState::Open { .. }),
        "{:?}",
        fallback().breaker_state()
    );

    // Open: the local answer comes back without a request to the cloud.
    cloud.set_mode(Mode::Answer);
    assert_local_unavailable(&infer(&server, &body));
    assert_eq!(cloud.requests(), 2);

    // After the cool-down, one probe goes through and closes the breaker.
    std::thread::sleep(cooldown + Duration::from_millis(100));
    let answer = infer(&server, &body);
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.source.as_deref(), Some("cloud"));
    assert_eq!(answer.reason.as_deref(), Some("overloaded"));
    assert_eq!(cloud.requests(), 3);
    assert_eq!(
        fallback().breaker_state(),
        BreakerState::Closed { failures: 0 }
    );

    let answer = infer(&server, &body);
    assert_eq!(answer.source.as_deref(), Some("cloud"));
    assert_eq!(cloud.requests(), 4);

    let counts = counters.snapshot();
    assert_eq!(counts.overloaded, 5);
    assert_eq!(counts.cloud_unavailable, 3);
    assert_eq!(counts.cloud_rejected, 0);
}

#[test]
fn cloud_rejection_flags_the_local_answer() {
    let dir = tempfile::tempdir().unwrap();
    let model = model(&dir);
    let reference = Reference::load();
    let cloud = Cloud::start();
    let policy = FallbackPolicy {
        model: Some(MISSING_MODEL.into()),
        max_local_queue: Some(0),
        breaker_failures: 1,
        ..FallbackPolicy::default()
    };
    let (server, counters) = serve_with_fallback(model, &cloud, policy);

    for _ in 0..2 {
        let answer = infer(&server, &sample_body(&reference, 0));
        assert_eq!(answer.status, 200, "{}", answer.body);
        assert_eq!(answer.source.as_deref(), Some("local"));
        assert_eq!(answer.fallback.as_deref(), Some("rejected"));
    }
    let state = server.state.fallback().unwrap().breaker_state();
    assert_eq!(state, BreakerState::Closed { failures: 0 });
    assert_eq!(counters.snapshot().cloud_rejected, 2);
}

#[test]
fn invalid_request_is_not_forwarded() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = Cloud::start();
    let policy = FallbackPolicy {
        max_local_queue: Some(0),
        ..FallbackPolicy::default()
    };
    let (server, counters) = serve_with_fallback(model(&dir), &cloud, policy);
    let body = json!({
        "inputs": [{"name": "input", "shape": [1, 1, 28, 27], "datatype": "FP32",
                    "data": vec![0.0; 28 * 27]}],
    });
    let answer = infer(&server, &body);
    assert_eq!(answer.status, 400, "{}", answer.body);
    assert_eq!(cloud.requests(), 0);
    assert_eq!(counters.snapshot().overloaded, 0);
}

#[test]
fn remote_threshold_applies_to_next_request() {
    let dir = tempfile::tempdir().unwrap();
    let model = model(&dir);
    let reference = Reference::load();
    let confidences = confidences(&model, &reference);
    let (unsure, lowest) = confidences
        .iter()
        .copied()
        .enumerate()
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap();
    let cloud = Cloud::start();
    // No threshold among the flags: low confidence alone sends nothing to the cloud.
    let (settings, settings_rx) = tokio::sync::watch::channel(LiveSettings {
        confidence_threshold: 0.5,
        interval: Duration::from_secs(5),
        rate: None,
        drain_rate: 10.0,
        commit_timeout: Duration::from_secs(60),
        fallback_threshold: None,
    });
    let counters = Arc::new(FallbackCounters::default());
    let fallback = Fallback::new(
        cloud.url(),
        Some(TOKEN.into()),
        FallbackPolicy::default(),
        counters.clone(),
    )
    .with_settings(settings_rx);
    let server = ApiServer::start_with(ApiState::new(model).with_fallback(fallback));
    let body = sample_body(&reference, unsure);

    let answer = infer(&server, &body);
    assert_eq!(answer.source.as_deref(), Some("local"), "{}", answer.body);
    assert_eq!(cloud.requests(), 0);

    settings.send_modify(|settings| settings.fallback_threshold = Some(lowest + 0.01));
    let answer = infer(&server, &body);
    assert_eq!(answer.source.as_deref(), Some("cloud"), "{}", answer.body);
    assert_eq!(answer.reason.as_deref(), Some("low_confidence"));
    assert_eq!(cloud.requests(), 1);

    settings.send_modify(|settings| settings.fallback_threshold = Some(0.0));
    let answer = infer(&server, &body);
    assert_eq!(answer.source.as_deref(), Some("local"), "{}", answer.body);
    assert_eq!(cloud.requests(), 1);
    assert_eq!(counters.snapshot().low_confidence, 1);
}

/// A backend whose every run fails, as a model does on a broken accelerator.
struct FailingBackend {
    input_shape: Vec<usize>,
}

impl fleet_runtime::Backend for FailingBackend {
    fn name(&self) -> &'static str {
        "failing"
    }

    fn input_shape(&self) -> &[usize] {
        &self.input_shape
    }

    fn run(
        &mut self,
        _input: fleet_runtime::Tensor,
    ) -> Result<fleet_runtime::Tensor, fleet_runtime::RuntimeError> {
        Err(fleet_runtime::RuntimeError::Inference {
            backend: "failing",
            reason: "device lost".into(),
        })
    }
}

#[test]
fn local_failure_goes_to_the_cloud() {
    let dir = tempfile::tempdir().unwrap();
    let info = model(&dir).info().clone();
    let failing = SharedModel::with_backend(
        info,
        Box::new(FailingBackend {
            input_shape: vec![1, 1, 28, 28],
        }),
    );
    let reference = Reference::load();
    let cloud = Cloud::start();
    let (server, counters) = serve_with_fallback(failing, &cloud, FallbackPolicy::default());
    let body = sample_body(&reference, 0);

    let answer = infer(&server, &body);
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.source.as_deref(), Some("cloud"));
    assert_eq!(answer.reason.as_deref(), Some("local_error"));
    assert_eq!(answer.body["model_version"], "cloud-1");
    assert_eq!(cloud.requests(), 1);
    assert_eq!(counters.snapshot().local_error, 1);

    // With the cloud failing too, the error names both failures.
    cloud.set_mode(Mode::Fail);
    let answer = infer(&server, &body);
    assert!(answer.status >= 500, "{} {}", answer.status, answer.body);
    let message = answer.body["error"].as_str().unwrap_or_default();
    assert!(message.contains("device lost"), "{}", answer.body);
    assert!(
        message.contains("cloud fallback failed too"),
        "{}",
        answer.body
    );
    assert_eq!(counters.snapshot().cloud_unavailable, 1);
}
