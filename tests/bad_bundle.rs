//! The agent rejects a damaged or tampered bundle and names the check that failed.

mod common;

use std::fs;

use common::{Workspace, path_str};

/// Starts an agent on the workspace bundle and returns its exit status and stderr.
fn run_agent(workspace: &Workspace) -> (bool, String) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_fleet"))
        .args([
            "device",
            "--device-id",
            "tamper-test",
            "--broker",
            "mqtt://127.0.0.1:9",
        ])
        .args(["--bundle", path_str(&workspace.bundle())])
        .args(["--public-key", path_str(&workspace.public_key())])
        .args([
            "--input",
            path_str(&common::repo().join("models/mnist/t10k-images-idx3-ubyte.gz")),
        ])
        .args(["--state-dir", path_str(&workspace.path("state"))])
        .output()
        .expect("run fleet device");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn flipped_model_byte_is_rejected() {
    let workspace = Workspace::new();
    let model = workspace.bundle().join("model.onnx");
    let mut bytes = fs::read(&model).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    fs::write(&model, bytes).unwrap();

    let (ok, stderr) = run_agent(&workspace);
    assert!(!ok, "the agent accepted a modified model");
    assert!(
        stderr.contains("model.onnx") && stderr.contains("SHA-256"),
        "{stderr}"
    );
}

#[test]
fn manifest_edited_after_signing_is_rejected() {
    let workspace = Workspace::new();
    let manifest = workspace.bundle().join("manifest.json");
    let text = fs::read_to_string(&manifest)
        .unwrap()
        .replace("\"1.0.0\"", "\"9.9.9\"");
    fs::write(&manifest, text).unwrap();

    let (ok, stderr) = run_agent(&workspace);
    assert!(!ok, "the agent accepted an edited manifest");
    assert!(stderr.contains("signature check failed"), "{stderr}");
}

#[test]
fn truncated_and_missing_model_are_named() {
    let workspace = Workspace::new();
    let model = workspace.bundle().join("model.onnx");
    let bytes = fs::read(&model).unwrap();
    fs::write(&model, &bytes[..bytes.len() / 3]).unwrap();
    let (ok, stderr) = run_agent(&workspace);
    assert!(!ok);
    assert!(
        stderr.contains("model.onnx") && stderr.contains("truncated"),
        "{stderr}"
    );

    fs::remove_file(&model).unwrap();
    let (ok, stderr) = run_agent(&workspace);
    assert!(!ok);
    assert!(
        stderr.contains("model.onnx") && stderr.contains("missing"),
        "{stderr}"
    );
}

#[test]
fn compress_verify_reports_the_failed_check() {
    let workspace = Workspace::new();
    let bundle = workspace.bundle();
    let output = common::fleet(&[
        "compress",
        "verify",
        path_str(&bundle),
        "--public-key",
        path_str(&workspace.public_key()),
    ]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("ok: signature and 4 files verified"),
        "{stdout}"
    );
    assert!(
        stdout.contains("ok: self-test reproduced 4 reference outputs"),
        "{stdout}"
    );

    fs::write(bundle.join("labels.txt"), "tampered\n").unwrap();
    let output = common::fleet(&[
        "compress",
        "verify",
        path_str(&bundle),
        "--public-key",
        path_str(&workspace.public_key()),
    ]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("labels.txt"), "{stderr}");
}

/// A bundle signed by the right key whose model is not the one its self-test was
/// recorded with passes the signature check and fails the self-test.
#[test]
fn compress_verify_runs_the_self_test() {
    let workspace = Workspace::new();
    let original = fleet_bundle::Bundle::open_verified(
        &workspace.bundle(),
        &fleet_bundle::PublicKey::read(&workspace.public_key()).unwrap(),
    )
    .unwrap();
    let key = fleet_bundle::SecretKey::read(&workspace.path("keys/fleet.key")).unwrap();
    let swapped_model = common::repo().join("models/digit-student/digit-student.onnx");
    let files: Vec<fleet_bundle::BundleFile> = original
        .manifest
        .files
        .iter()
        .map(|entry| fleet_bundle::BundleFile {
            source: if entry.path == original.manifest.model.path {
                swapped_model.clone()
            } else {
                original.path_of(&entry.path)
            },
            path: entry.path.clone(),
        })
        .collect();
    let swapped = workspace.path("swapped");
    fleet_bundle::write_bundle(&swapped, original.manifest.clone(), &files, &key).unwrap();

    let output = common::fleet(&[
        "compress",
        "verify",
        path_str(&swapped),
        "--public-key",
        path_str(&workspace.public_key()),
    ]);
    assert!(
        !output.status.success(),
        "a swapped model passed its self-test"
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("ok: signature and 4 files verified"),
        "{stdout}"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("failed its self-test"), "{stderr}");
    assert!(stderr.contains("self-test sample 0"), "{stderr}");
}
