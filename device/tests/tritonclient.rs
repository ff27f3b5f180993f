//! The local inference API driven by Triton's Python HTTP client, the client most
//! Open Inference Protocol users have. Skipped, with the reason printed, until
//! `scripts/setup-python-clients` has created `target/python-clients`.

mod common;

use std::process::Command;

use common::{ApiServer, digit_bundle, repo};
use fleet_device::model::SharedModel;

#[test]
fn tritonclient_drives_the_api() {
    let python = repo().join("target/python-clients/bin/python");
    if !python.exists() {
        println!(
            "skipped: {} is missing; run scripts/setup-python-clients to create it",
            python.display()
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bundle = digit_bundle(dir.path());
    let model = SharedModel::load(&bundle.bundle).expect("load the digit-cnn model");
    let server = ApiServer::start(model);

    let output = Command::new(&python)
        .arg(repo().join("device/tests/python/oip_client.py"))
        .arg(server.address.to_string())
        .arg(repo().join("models/digit-cnn/reference"))
        .output()
        .expect("run the Python client");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "tritonclient checks failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    println!("{stdout}");
}
