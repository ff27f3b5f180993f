//! Drives the gateway with NVIDIA's Python `tritonclient[http]`, an independent Open
//! Inference Protocol client, with tensors as JSON and as binary data. Skipped, with the
//! reason printed, when the virtual environment from `scripts/setup-python-clients` is
//! missing.

mod gateway_support;

use std::time::Duration;

use gateway_support::{TestBundle, TestGateway};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tritonclient_infers_through_gateway() {
    let Some(python) = gateway_support::python_clients() else {
        return;
    };
    let bundle = TestBundle::new();
    let gateway = TestGateway::start(&bundle.config("", "")).await;
    gateway
        .wait_ready_backends(1, Duration::from_secs(60))
        .await;
    gateway_support::check_with_tritonclient(&python, &gateway).await;
    gateway.server.shutdown().await;
}
