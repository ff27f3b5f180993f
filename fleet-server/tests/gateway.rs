//! In-process tests of the inference gateway with real replica processes serving the
//! digit CNN: status codes, routing, retries, draining, autoscaling and throttling.

mod gateway_support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use gateway_support::{
    Reference, ReplicaProcess, TestBundle, TestGateway, assert_logits, fetch_text, kill_pid,
    metric, process_alive,
};

const READY_TIMEOUT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn status_codes_and_headers() {
    let bundle = TestBundle::new();
    let limits = "[limits]\nmax_body_bytes = 16384\nrate_per_second = 1\nburst = 30\n";
    let gateway = TestGateway::start(&bundle.config(limits, "")).await;
    gateway.wait_ready_backends(1, READY_TIMEOUT).await;
    let reference = Reference::load();
    let body = reference.body(&[0]);
    let token = gateway.token.as_str();

    // 200 with the reference logits, for an API token and for a device secret.
    let (status, headers, answer) = gateway.infer(Some(token), "digit-cnn", &body).await;
    assert_eq!(status, 200, "{answer}");
    assert_logits(&reference, &[0], &answer);
    assert_eq!(answer["id"], "test");
    let generated = headers["x-request-id"].to_str().unwrap();
    assert_eq!(generated.len(), 32, "{generated}");
    let device = gateway.device_secret.clone();
    let (status, _, answer) = gateway
        .infer(Some(&device), "digit-cnn", &reference.body(&[1, 2]))
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_logits(&reference, &[1, 2], &answer);

    // The client's request id comes back.
    let response = gateway
        .http
        .post(format!("{}/v2/models/digit-cnn/infer", gateway.base))
        .bearer_auth(token)
        .header("x-request-id", "client-id-7")
        .header("content-type", "application/json")
        .body(serde_json::to_vec(&body).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-request-id"], "client-id-7");

    // 401 without a token and with a wrong one, with WWW-Authenticate.
    let (status, headers, answer) = gateway.infer(None, "digit-cnn", &body).await;
    assert_eq!(status, 401);
    assert_eq!(headers["www-authenticate"], "Bearer");
    assert!(answer["error"].is_string(), "{answer}");
    let (status, _, answer) = gateway.infer(Some("not-a-token"), "digit-cnn", &body).await;
    assert_eq!(status, 401, "{answer}");
    let (status, _, _) = gateway.infer(None, "no-such-model", &body).await;
    assert_eq!(status, 401, "authentication comes before the model lookup");

    // 403 for an ingester credential.
    let ingester = gateway.ingester_secret.clone();
    let (status, _, answer) = gateway.infer(Some(&ingester), "digit-cnn", &body).await;
    assert_eq!(status, 403, "{answer}");

    // 404 for an unknown model.
    let (status, _, answer) = gateway.infer(Some(token), "no-such-model", &body).await;
    assert_eq!(status, 404);
    assert!(
        answer["error"].as_str().unwrap().contains("no-such-model"),
        "{answer}"
    );

    // 400 for a wrong shape, naming the input and the expected shape.
    let wrong_shape = serde_json::json!({"inputs": [{
        "name": "input", "shape": [1, 784], "datatype": "FP32", "data": reference.sample(0)
    }]});
    let (status, _, answer) = gateway.infer(Some(token), "digit-cnn", &wrong_shape).await;
    assert_eq!(status, 400);
    let message = answer["error"].as_str().unwrap();
    assert!(message.contains("\"input\""), "{message}");
    assert!(message.contains("[-1, 1, 28, 28]"), "{message}");

    // 400 for a wrong datatype and for a body that is not OIP JSON.
    let wrong_type = serde_json::json!({"inputs": [{
        "name": "input", "shape": [1, 1, 28, 28], "datatype": "INT32", "data": vec![0; 784]
    }]});
    let (status, _, answer) = gateway.infer(Some(token), "digit-cnn", &wrong_type).await;
    assert_eq!(status, 400);
    assert!(
        answer["error"].as_str().unwrap().contains("FP32"),
        "{answer}"
    );
    let (status, _, answer) = gateway
        .infer(Some(token), "digit-cnn", &serde_json::json!({"input": []}))
        .await;
    assert_eq!(status, 400, "{answer}");

    // 413 over the body limit: 8 samples are about 32 KB of JSON.
    let large = reference.body(&[0, 1, 2, 3, 4, 5, 6, 7]);
    let (status, _, answer) = gateway.infer(Some(token), "digit-cnn", &large).await;
    assert_eq!(status, 413);
    assert!(
        answer["error"].as_str().unwrap().contains("16384"),
        "{answer}"
    );

    // 429 with Retry-After once a principal's burst is spent; others are unaffected.
    let other = gateway.other_token.clone();
    let metadata_url = format!("{}/v2/models/digit-cnn", gateway.base);
    let mut throttled = None;
    for _ in 0..31 {
        let response = gateway
            .http
            .get(&metadata_url)
            .bearer_auth(&other)
            .send()
            .await
            .unwrap();
        if response.status() == 429 {
            throttled = Some(response);
            break;
        }
        assert_eq!(response.status(), 200);
    }
    let throttled = throttled.expect("the 31st request within the burst of 30 is throttled");
    assert_eq!(throttled.headers()["retry-after"], "1");
    let answer = gateway_support::json_body(throttled).await;
    assert!(
        answer["error"].as_str().unwrap().contains("rate limit"),
        "{answer}"
    );
    let (status, _, _) = gateway.infer(Some(token), "digit-cnn", &body).await;
    assert_eq!(status, 200, "another principal still gets through");

    // Only the accepted requests reached the replica: 1 + 1 (two samples) + 1 + 1.
    let backends = gateway.backends().await;
    let url = backends["backends"][0]["url"].as_str().unwrap().to_owned();
    let replica_metrics = fetch_text(&gateway.http, &format!("{url}/metrics")).await;
    assert_eq!(
        metric(&replica_metrics, "fleet_replica_requests_total"),
        Some(4.0)
    );

    let metrics = gateway.metrics().await;
    for code in ["200", "400", "401", "403", "413", "429"] {
        assert!(
            metrics.contains(&format!("model=\"digit-cnn\",code=\"{code}\"")),
            "no {code} count in:\n{metrics}"
        );
    }
    gateway.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metadata_index_and_health() {
    let bundle = TestBundle::new();
    let gateway = TestGateway::start(&bundle.config("", "")).await;
    let live = gateway
        .http
        .get(format!("{}/v2/health/live", gateway.base))
        .send()
        .await
        .unwrap();
    assert_eq!(live.status(), 200);
    gateway.wait_ready_backends(1, READY_TIMEOUT).await;
    let ready = gateway
        .http
        .get(format!("{}/v2/health/ready", gateway.base))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);

    let get = |path: &'static str| {
        let request = gateway
            .http
            .get(format!("{}{path}", gateway.base))
            .bearer_auth(&gateway.token);
        async move { gateway_support::json_body(request.send().await.unwrap()).await }
    };
    let metadata = get("/v2/models/digit-cnn").await;
    assert_eq!(metadata["name"], "digit-cnn");
    assert_eq!(
        metadata["inputs"][0]["shape"],
        serde_json::json!([-1, 1, 28, 28])
    );
    assert_eq!(metadata["outputs"][0]["name"], "logits");
    let index = get("/v2/models").await;
    assert_eq!(index["models"][0]["state"], "READY", "{index}");
    let model_ready = get("/v2/models/digit-cnn/ready").await;
    assert_eq!(model_ready["ready"], true);

    // The served version in the path, as Triton's clients send it, and another one.
    let version = metadata["versions"][0].as_str().unwrap().to_owned();
    let versioned = format!("/v2/models/digit-cnn/versions/{version}");
    let response = gateway
        .http
        .get(format!("{}{versioned}", gateway.base))
        .bearer_auth(&gateway.token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    // `infer` posts to /v2/models/{model}/infer, so the version goes into the model part.
    let reference = Reference::load();
    let token = Some(gateway.token.as_str());
    let model = format!("digit-cnn/versions/{version}");
    let (status, _, answer) = gateway.infer(token, &model, &reference.body(&[5])).await;
    assert_eq!(status, 200, "{answer}");
    assert_logits(&reference, &[5], &answer);
    let other = "digit-cnn/versions/9.9.9";
    let (status, _, error) = gateway.infer(token, other, &reference.body(&[5])).await;
    assert_eq!(status, 404);
    assert!(
        error["error"].as_str().unwrap().contains("\"9.9.9\""),
        "{error}"
    );
    gateway.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn routing_spreads_over_two_replicas() {
    let bundle = TestBundle::new();
    let extra = "[models.replicas]\nmin = 2\nmax = 2\n";
    let gateway = TestGateway::start(&bundle.config("", extra)).await;
    gateway.wait_ready_backends(2, READY_TIMEOUT).await;
    let reference = Reference::load();

    let gateway = Arc::new(gateway);
    let mut requests = Vec::new();
    for index in 0..16 {
        let gateway = gateway.clone();
        let body = reference.body(&[index]);
        requests.push(tokio::spawn(async move {
            gateway
                .infer(Some(&gateway.token), "digit-cnn", &body)
                .await
                .0
        }));
    }
    for request in requests {
        assert_eq!(request.await.unwrap(), 200);
    }
    let backends = gateway.backends().await;
    let served: Vec<u64> = backends["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["served"].as_u64().unwrap())
        .collect();
    assert_eq!(served.len(), 2, "{backends:#}");
    assert_eq!(served.iter().sum::<u64>(), 16);
    assert!(
        served.iter().all(|&count| count > 0),
        "one replica got nothing: {served:?}"
    );
    Arc::into_inner(gateway).unwrap().server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retry_after_replica_dies_and_crash_recovery() {
    let bundle = TestBundle::new();
    let mut external = ReplicaProcess::start(&bundle, &[]).await;
    let extra = format!(
        "external = [{:?}]\n[models.replicas]\nmin = 1\nmax = 1\n",
        external.url
    );
    let limits = "[routing]\nhealth_interval_ms = 60000\n";
    let gateway = TestGateway::start(&bundle.config(limits, &extra)).await;
    gateway.wait_ready_backends(2, READY_TIMEOUT).await;
    let reference = Reference::load();

    // The external replica dies. The health check would not notice for a minute, so
    // requests sent to it fail to connect and are retried on the local replica.
    external.kill().await;
    for index in 0..6 {
        let (status, _, answer) = gateway
            .infer(Some(&gateway.token), "digit-cnn", &reference.body(&[index]))
            .await;
        assert_eq!(status, 200, "request {index}: {answer}");
        assert_logits(&reference, &[index], &answer);
    }
    let metrics = gateway.metrics().await;
    let retries = metric(&metrics, "fleet_gateway_retries_total{model=\"digit-cnn\"}");
    assert!(retries.is_some_and(|count| count >= 1.0), "{metrics}");

    // The local replica crashes; the autoscaler starts a new one to keep min = 1, and
    // a request sent meanwhile waits for it.
    let backends = gateway.backends().await;
    let local = backends["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["kind"] == "local")
        .expect("a local replica")
        .clone();
    let pid = local["pid"].as_u64().unwrap();
    kill_pid(pid);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, _, answer) = gateway
        .infer(Some(&gateway.token), "digit-cnn", &reference.body(&[7]))
        .await;
    assert_eq!(status, 200, "{answer}");
    let backends = gateway.backends().await;
    let new_local = backends["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["kind"] == "local")
        .expect("a replacement replica")
        .clone();
    assert_ne!(new_local["pid"], local["pid"]);
    gateway.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn draining_loses_no_request() {
    let bundle = TestBundle::new();
    let extra = "[models.replicas]\nmin = 1\nmax = 2\n\
                 [models.batching]\nmax_queue_delay_microseconds = 100000\n\
                 [models.slo]\np95_ms = 100000\n\
                 [models.autoscaler]\ntarget_in_flight = 1000\nscale_down_cooldown_secs = 3600\n";
    let gateway = Arc::new(TestGateway::start(&bundle.config("", extra)).await);
    let model = gateway
        .server
        .gateway()
        .unwrap()
        .model("digit-cnn")
        .unwrap()
        .clone();
    model.scale_to(2);
    gateway.wait_ready_backends(2, READY_TIMEOUT).await;
    let pids: Vec<u64> = gateway.backends().await["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["pid"].as_u64().unwrap())
        .collect();
    let reference = Reference::load();

    let mut requests = Vec::new();
    for index in 0..30 {
        let gateway = gateway.clone();
        let body = reference.body(&[index % 16]);
        requests.push(tokio::spawn(async move {
            gateway
                .infer(Some(&gateway.token), "digit-cnn", &body)
                .await
        }));
    }
    // Requests wait up to 100 ms for their batch, so both replicas have some in flight
    // when one starts draining.
    tokio::time::sleep(Duration::from_millis(40)).await;
    let outstanding: usize = model.pool.backends().iter().map(|b| b.outstanding()).sum();
    model.scale_to(1);
    for (index, request) in requests.into_iter().enumerate() {
        let (status, _, answer) = request.await.unwrap();
        assert_eq!(status, 200, "request {index}: {answer}");
        assert_logits(&reference, &[index % 16], &answer);
    }
    assert!(
        outstanding > 0,
        "no request was in flight when draining began"
    );

    let started = Instant::now();
    loop {
        let backends = gateway.backends().await;
        let remaining = backends["backends"].as_array().unwrap().len();
        let stopped: Vec<u64> = pids
            .iter()
            .copied()
            .filter(|&pid| !process_alive(pid))
            .collect();
        if remaining == 1 && stopped.len() == 1 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "{backends:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Arc::into_inner(gateway).unwrap().server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn burst_scales_up() {
    let bundle = TestBundle::new();
    let extra = "[models.replicas]\nmin = 1\nmax = 3\n\
                 [models.batching]\nmax_queue_delay_microseconds = 20000\n\
                 [models.slo]\np95_ms = 100000\n\
                 [models.autoscaler]\ninterval_ms = 100\ntarget_in_flight = 2\n\
                 stable_window_secs = 4\npanic_window_secs = 1\nscale_up_cooldown_secs = 0.5\n";
    let limits = "[limits]\nrate_per_second = 10000\nburst = 10000\n";
    let gateway = Arc::new(TestGateway::start(&bundle.config(limits, extra)).await);
    gateway.wait_ready_backends(1, READY_TIMEOUT).await;
    let model = gateway
        .server
        .gateway()
        .unwrap()
        .model("digit-cnn")
        .unwrap()
        .clone();
    let reference = Reference::load();

    let started = Instant::now();
    while model.local_replicas() < 2 && started.elapsed() < Duration::from_secs(20) {
        let mut requests = Vec::new();
        for index in 0..40 {
            let gateway = gateway.clone();
            let body = reference.body(&[index % 16]);
            requests.push(tokio::spawn(async move {
                gateway
                    .infer(Some(&gateway.token), "digit-cnn", &body)
                    .await
                    .0
            }));
        }
        for request in requests {
            assert_eq!(request.await.unwrap(), 200);
        }
    }
    assert!(
        model.local_replicas() >= 2,
        "no scale-up within 20 s of bursts"
    );
    let metrics = gateway.metrics().await;
    let scaled_for_load = metrics.lines().any(|line| {
        line.starts_with("fleet_gateway_scale_decisions_total")
            && line.contains("direction=\"up\"")
            && !line.contains("reason=\"min_replicas\"")
    });
    assert!(
        scaled_for_load,
        "no load-driven scale-up decision in:\n{metrics}"
    );
    Arc::into_inner(gateway).unwrap().server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scale_to_zero_wakes_on_request() {
    let bundle = TestBundle::new();
    let extra = "[models.replicas]\nmin = 0\nmax = 1\nidle_before_zero_secs = 1\n\
                 [models.autoscaler]\ninterval_ms = 100\n";
    let gateway = TestGateway::start(&bundle.config("", extra)).await;
    let model = gateway
        .server
        .gateway()
        .unwrap()
        .model("digit-cnn")
        .unwrap()
        .clone();
    let reference = Reference::load();
    assert_eq!(model.local_replicas(), 0);
    let ready = gateway
        .http
        .get(format!("{}/v2/health/ready", gateway.base))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200, "a scale-to-zero model counts as ready");

    for round in 0..2 {
        let (status, _, answer) = gateway
            .infer(Some(&gateway.token), "digit-cnn", &reference.body(&[round]))
            .await;
        assert_eq!(status, 200, "round {round}: {answer}");
        assert_logits(&reference, &[round], &answer);
        let started = Instant::now();
        while model.local_replicas() > 0 || !model.pool.backends().is_empty() {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "no scale to zero"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let metrics = gateway.metrics().await;
    let wakes = metric(
        &metrics,
        "fleet_gateway_scale_decisions_total{model=\"digit-cnn\",direction=\"up\",reason=\"wake\"}",
    );
    let idles = metric(
        &metrics,
        "fleet_gateway_scale_decisions_total{model=\"digit-cnn\",direction=\"down\",reason=\"idle\"}",
    );
    assert_eq!(wakes, Some(2.0), "{metrics}");
    assert_eq!(idles, Some(2.0), "{metrics}");
    gateway.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replica_batches_concurrent_requests() {
    let bundle = TestBundle::new();
    let replica = ReplicaProcess::start(
        &bundle,
        &[
            "--max-batch-size",
            "8",
            "--max-queue-delay-microseconds",
            "200000",
        ],
    )
    .await;
    let reference = Reference::load();
    let http = reqwest::Client::new();
    let mut requests = Vec::new();
    for index in 0..16 {
        let request = http
            .post(format!("{}/v2/models/digit-cnn/infer", replica.url))
            .header("content-type", "application/json")
            .body(serde_json::to_vec(&reference.body(&[index])).unwrap());
        requests.push(tokio::spawn(async move {
            let response = request.send().await.unwrap();
            (
                response.status().as_u16(),
                gateway_support::json_body(response).await,
            )
        }));
    }
    for (index, request) in requests.into_iter().enumerate() {
        let (status, answer) = request.await.unwrap();
        assert_eq!(status, 200, "{answer}");
        assert_logits(&reference, &[index], &answer);
    }
    let metrics = fetch_text(&http, &format!("{}/metrics", replica.url)).await;
    let requests = metric(&metrics, "fleet_replica_requests_total").unwrap();
    let batches = metric(&metrics, "fleet_replica_batches_total").unwrap();
    let samples = metric(&metrics, "fleet_replica_batch_size_sum").unwrap();
    assert_eq!(requests, 16.0);
    assert_eq!(samples, 16.0);
    assert!(
        batches <= 8.0,
        "16 concurrent requests ran in {batches} batches\n{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn throttle_admits_no_second_burst() {
    let bundle = TestBundle::new();
    let limits = "[limits]\nrate_per_second = 10\nburst = 10\nlimiter_evict_interval_secs = 1\n";
    let gateway = TestGateway::start(&bundle.config(limits, "")).await;
    let url = format!("{}/v2/models/digit-cnn", gateway.base);
    let send_burst = || async {
        let mut admitted = 0;
        for _ in 0..10 {
            let response = gateway
                .http
                .get(&url)
                .bearer_auth(&gateway.token)
                .send()
                .await
                .unwrap();
            admitted += usize::from(response.status() == 200);
        }
        admitted
    };

    // A fixed one-second window would let both bursts through when they straddle its
    // boundary; the token bucket refills one request per 100 ms.
    let first = send_burst().await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let second = send_burst().await;
    assert_eq!(first, 10);
    assert!(second <= 2, "second burst admitted {second} of 10");

    // Idle keys are evicted by the timer, and the gauge follows.
    let throttle = gateway.server.gateway().unwrap().throttle().clone();
    assert_eq!(throttle.len(), 1);
    let started = Instant::now();
    while !throttle.is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "key not evicted"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    gateway.server.shutdown().await;
}

/// Sends `json` followed by `binary` with `Inference-Header-Content-Length`, as Triton's
/// client does, and returns the status, headers and body.
async fn infer_binary(
    gateway: &TestGateway,
    json: &serde_json::Value,
    binary: &[u8],
    json_length: Option<&str>,
) -> (u16, HeaderMap, Vec<u8>) {
    let json = serde_json::to_vec(json).unwrap();
    let length = json.len().to_string();
    let (body, _) = fleet_oip::join_body(json, [binary.to_vec()]);
    let response = gateway
        .http
        .post(format!("{}/v2/models/digit-cnn/infer", gateway.base))
        .bearer_auth(&gateway.token)
        .header("content-type", "application/octet-stream")
        .header(
            fleet_oip::JSON_LENGTH_HEADER,
            json_length.unwrap_or(&length),
        )
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    (status, headers, response.bytes().await.unwrap().to_vec())
}

/// Returns the message of a JSON error body.
fn error_message(body: &[u8]) -> String {
    let error: serde_json::Value = serde_json::from_slice(body).expect("JSON error body");
    error["error"].as_str().expect("error message").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn binary_tensors_in_and_out() {
    let bundle = TestBundle::new();
    let gateway = TestGateway::start(&bundle.config("", "")).await;
    gateway.wait_ready_backends(1, READY_TIMEOUT).await;
    let reference = Reference::load();
    let indices = [4, 9];
    let samples: Vec<f32> = indices
        .iter()
        .flat_map(|&i| reference.sample(i).to_vec())
        .collect();
    let binary = fleet_oip::encode_f32(&samples);
    let input = |size: usize| {
        serde_json::json!({"name": "input", "shape": [2, 1, 28, 28], "datatype": "FP32",
                           "parameters": {"binary_data_size": size}})
    };

    // Binary in, binary out: the logits follow the JSON part.
    let request = serde_json::json!({"inputs": [input(binary.len())],
                                     "parameters": {"binary_data_output": true}});
    let (status, headers, body) = infer_binary(&gateway, &request, &binary, None).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(headers["content-type"], "application/octet-stream");
    let json_length: usize = headers[fleet_oip::JSON_LENGTH_HEADER]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let head: serde_json::Value = serde_json::from_slice(&body[..json_length]).unwrap();
    let output = &head["outputs"][0];
    assert_eq!(
        output["parameters"]["binary_data_size"],
        2 * 10 * 4,
        "{head}"
    );
    assert!(output.get("data").is_none(), "{head}");
    let logits = fleet_oip::decode_f32("logits", &body[json_length..], 20).unwrap();
    let as_json =
        serde_json::json!({"outputs": [{"name": "logits", "shape": [2, 10], "data": logits}]});
    assert_logits(&reference, &indices, &as_json);

    // Binary in, JSON out.
    let request = serde_json::json!({"inputs": [input(binary.len())]});
    let (status, headers, body) = infer_binary(&gateway, &request, &binary, None).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert!(headers.get(fleet_oip::JSON_LENGTH_HEADER).is_none());
    let answer: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_logits(&reference, &indices, &answer);

    // A size that does not match the shape, bytes no input claims, and a JSON length
    // past the body are each a 400 naming what is wrong.
    let short = binary.len() - 4;
    let request = serde_json::json!({"inputs": [input(short)]});
    let (status, _, body) = infer_binary(&gateway, &request, &binary[..short], None).await;
    assert_eq!(status, 400);
    let error = error_message(&body);
    assert!(error.contains("input \"input\""), "{error}");
    assert!(error.contains(&format!("{short} bytes")), "{error}");

    let request = serde_json::json!({"inputs": [input(binary.len())]});
    let mut long = binary.clone();
    long.extend([0; 8]);
    let (status, _, body) = infer_binary(&gateway, &request, &long, None).await;
    assert_eq!(status, 400);
    let error = error_message(&body);
    assert!(error.contains("8 bytes of binary data"), "{error}");

    let (status, _, body) = infer_binary(&gateway, &request, &binary, Some("999999")).await;
    assert_eq!(status, 400);
    let error = error_message(&body);
    assert!(error.contains(fleet_oip::JSON_LENGTH_HEADER), "{error}");
    gateway.server.shutdown().await;
}

/// Starts an external OIP backend in the test process that records the headers it
/// receives and responds to each inference after `delay`, and returns its URL.
async fn start_recording_backend(seen: Arc<Mutex<Vec<HeaderMap>>>, delay: Duration) -> String {
    use axum::routing::{get, post};
    let infer = move |headers: HeaderMap| {
        let seen = seen.clone();
        async move {
            seen.lock().unwrap().push(headers);
            tokio::time::sleep(delay).await;
            axum::Json(serde_json::json!({
                "model_name": "digit-cnn",
                "outputs": [{"name": "logits", "shape": [1, 10], "datatype": "FP32",
                             "data": [0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]}]
            }))
        }
    };
    let app = axum::Router::new()
        .route("/v2/health/ready", get(|| async { "ok" }))
        .route("/v2/models/digit-cnn/infer", post(infer));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{address}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn request_id_and_traceparent_reach_the_backend() {
    let bundle = TestBundle::new();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let backend = start_recording_backend(seen.clone(), Duration::ZERO).await;
    let extra = format!("external = [{backend:?}]\n[models.replicas]\nmin = 0\nmax = 0\n");
    let limits = "[routing]\nhealth_interval_ms = 100\n";
    let gateway = TestGateway::start(&bundle.config(limits, &extra)).await;
    gateway.wait_ready_backends(1, READY_TIMEOUT).await;
    let reference = Reference::load();

    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let response = gateway
        .http
        .post(format!("{}/v2/models/digit-cnn/infer", gateway.base))
        .bearer_auth(&gateway.token)
        .header("x-request-id", "trace-test-1")
        .header("traceparent", traceparent)
        .header("tracestate", "vendor=value")
        .header("content-type", "application/json")
        .body(serde_json::to_vec(&reference.body(&[0])).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-request-id"], "trace-test-1");
    let (status, _, _) = gateway
        .infer(Some(&gateway.token), "digit-cnn", &reference.body(&[1]))
        .await;
    assert_eq!(status, 200);

    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0]["traceparent"], traceparent);
    assert_eq!(seen[0]["tracestate"], "vendor=value");
    assert_eq!(seen[0]["x-request-id"], "trace-test-1");
    assert!(
        seen[0].get("authorization").is_none(),
        "the client's token leaked to a backend"
    );
    let generated = seen[1]["traceparent"].to_str().unwrap();
    assert_eq!(generated.len(), 55, "{generated}");
    assert!(generated.starts_with("00-"), "{generated}");
    assert_eq!(seen[1]["x-request-id"].len(), 32);
    gateway.server.shutdown().await;
}

/// Returns the `gateway`, `queue` and `backend` durations of a `Server-Timing` header,
/// in ms.
fn server_timing(headers: &HeaderMap) -> (f64, f64, f64) {
    let value = headers["server-timing"].to_str().unwrap();
    let duration = |name: &str| -> f64 {
        value
            .split(',')
            .map(str::trim)
            .find_map(|entry| entry.strip_prefix(name)?.strip_prefix(";dur="))
            .unwrap_or_else(|| panic!("no {name} duration in {value:?}"))
            .parse()
            .unwrap()
    };
    (duration("gateway"), duration("queue"), duration("backend"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn server_timing_splits_request_time() {
    let bundle = TestBundle::new();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let delay = Duration::from_millis(200);
    let backend = start_recording_backend(seen.clone(), delay).await;
    let extra = format!("external = [{backend:?}]\n[models.replicas]\nmin = 0\nmax = 0\n");
    let limits = "[routing]\nhealth_interval_ms = 100\n";
    let gateway = TestGateway::start(&bundle.config(limits, &extra)).await;
    gateway.wait_ready_backends(1, READY_TIMEOUT).await;
    let reference = Reference::load();

    for samples in [&[0][..], &[1, 2]] {
        let started = Instant::now();
        let (status, headers, answer) = gateway
            .infer(Some(&gateway.token), "digit-cnn", &reference.body(samples))
            .await;
        let total_ms = started.elapsed().as_secs_f64() * 1e3;
        assert_eq!(status, 200, "{answer}");
        let (own, queued, waited) = server_timing(&headers);
        // The backend's sleep counts as backend time, not the gateway's.
        assert!(waited >= 200.0, "backend {waited} ms of a 200 ms response");
        assert!(own > 0.0, "gateway {own} ms");
        assert!(own < 100.0, "gateway {own} ms");
        // One request at a time never waits for room at the backend.
        assert!(queued < 100.0, "queue {queued} ms");
        let sum = own + queued + waited;
        assert!(
            sum <= total_ms,
            "{sum} ms of Server-Timing in {total_ms} ms"
        );
    }

    // Responses the gateway makes itself carry no Server-Timing.
    let token = Some(gateway.token.as_str());
    let not_oip = serde_json::json!({"input": []});
    for (token, model, body, expected) in [
        (None, "digit-cnn", reference.body(&[0]), 401),
        (token, "no-such-model", reference.body(&[0]), 404),
        (token, "digit-cnn", not_oip, 400),
    ] {
        let (status, headers, _) = gateway.infer(token, model, &body).await;
        assert_eq!(status, expected);
        assert!(headers.get("server-timing").is_none(), "on a {status}");
    }

    let metrics = gateway.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "fleet_gateway_overhead_seconds_count{model=\"digit-cnn\"}"
        ),
        Some(2.0),
        "{metrics}"
    );
    // Both requests' own times, each under 100 ms, without the backend's 200 ms.
    let own_total = metric(
        &metrics,
        "fleet_gateway_overhead_seconds_sum{model=\"digit-cnn\"}",
    )
    .expect("overhead sum");
    assert!(own_total > 0.0, "{own_total} s");
    assert!(own_total < 0.2, "{own_total} s");
    gateway.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn full_queue_answers_503_with_retry_after() {
    let bundle = TestBundle::new();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let backend = start_recording_backend(seen.clone(), Duration::from_millis(500)).await;
    // One request at the backend and one waiting; a third has no place.
    let extra = format!(
        "external = [{backend:?}]\n[models.replicas]\nmin = 0\nmax = 0\n\
         max_in_flight = 1\nmax_queued = 1\n"
    );
    let limits = "[routing]\nhealth_interval_ms = 100\n";
    let gateway = TestGateway::start(&bundle.config(limits, &extra)).await;
    gateway.wait_ready_backends(1, READY_TIMEOUT).await;
    let body = Reference::load().body(&[0]);

    let token = Some(gateway.token.as_str());
    let (a, b, c) = tokio::join!(
        gateway.infer(token, "digit-cnn", &body),
        gateway.infer(token, "digit-cnn", &body),
        gateway.infer(token, "digit-cnn", &body),
    );
    let mut statuses = [a.0, b.0, c.0];
    statuses.sort();
    assert_eq!(statuses, [200, 200, 503], "{a:?} {b:?} {c:?}");
    let (_, headers, answer) = [a, b, c]
        .into_iter()
        .find(|(status, _, _)| *status == 503)
        .unwrap();
    assert_eq!(headers.get("retry-after").unwrap(), "1");
    let message = answer["error"].as_str().unwrap();
    assert!(message.contains("digit-cnn"), "{message}");
    assert!(message.contains("waiting"), "{message}");
    assert_eq!(seen.lock().unwrap().len(), 2);

    let error = fleet_server::gateway::GatewayConfig::from_toml(
        &bundle.config("", "[models.replicas]\nmax_queued = 0\n"),
    )
    .unwrap_err();
    assert!(error.to_string().contains("replicas.max_queued"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_config_names_the_field() {
    let bundle = TestBundle::new();
    let config = bundle.config("[limits]\nrate_per_second = 0\n", "");
    let error = fleet_server::gateway::GatewayConfig::from_toml(&config).unwrap_err();
    assert!(
        error.to_string().contains("limits.rate_per_second"),
        "{error}"
    );

    let path = bundle.dir.path().join("gateway.toml");
    std::fs::write(
        &path,
        bundle.config("", "[models.replicas]\nmax_replicas = 2\n"),
    )
    .unwrap();
    let error = fleet_server::gateway::GatewayConfig::from_file(&path).unwrap_err();
    let message = error.to_string();
    assert!(message.contains("max_replicas"), "{message}");
    assert!(message.contains("gateway.toml"), "{message}");
}
