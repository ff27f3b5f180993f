//! Agent and server against a Mosquitto that requires a user name and password: the
//! right credentials get telemetry through, a wrong password is refused and retried.

mod common;

use std::fs;
use std::process::Command;
use std::time::Duration;

use common::{Process, Workspace, free_port, path_str, unique_device_id, wait_for};

/// Writes a Mosquitto password file with one entry per (user, password) pair.
fn write_password_file(path: &std::path::Path, users: &[(&str, &str)]) {
    for (index, (user, password)) in users.iter().enumerate() {
        let mut command = Command::new("mosquitto_passwd");
        command.arg("-b");
        if index == 0 {
            command.arg("-c");
        }
        let status = command
            .arg(path)
            .args([user, password])
            .status()
            .expect("run mosquitto_passwd");
        assert!(status.success(), "mosquitto_passwd failed for {user}");
    }
}

/// Starts a Mosquitto with password authentication on a free port.
fn start_mosquitto(dir: &std::path::Path, users: &[(&str, &str)]) -> (Process, u16) {
    let passwords = dir.join("passwd");
    write_password_file(&passwords, users);
    let settings = format!(
        "allow_anonymous false\npassword_file {}\n",
        passwords.display()
    );
    common::start_mosquitto(dir, &settings)
}

#[test]
fn credentials_are_required_and_used() {
    let workspace = Workspace::new();
    let broker_dir = tempfile::tempdir().unwrap();
    let device = unique_device_id("authed");
    let (_mosquitto, port) = start_mosquitto(
        broker_dir.path(),
        &[
            ("fleet-server", "server-secret"),
            (&device, "device-secret"),
        ],
    );
    let broker = format!("mqtt://127.0.0.1:{port}");
    for (name, secret) in [
        ("server", "server-secret"),
        ("device", "device-secret"),
        ("wrong", "guess"),
    ] {
        fs::write(workspace.path(name), format!("{secret}\n")).unwrap();
    }

    let http = format!("127.0.0.1:{}", free_port());
    let token = common::create_api_token(
        path_str(&workspace.path("fleet.db")),
        &workspace.path("token"),
    );
    let server = Command::new(env!("CARGO_BIN_EXE_fleet"))
        .args([
            "server",
            "--broker",
            &broker,
            "--http",
            &http,
            "--mqtt-clean-session",
        ])
        .args(["--mqtt-username", "fleet-server"])
        .args(["--mqtt-password-file", path_str(&workspace.path("server"))])
        .args(["--database", path_str(&workspace.path("fleet.db"))])
        .spawn()
        .unwrap();
    let _server = Process {
        name: "fleet server".into(),
        child: server,
    };
    let api = common::Api {
        base: format!("http://{http}"),
        token,
    };
    // /healthz turns 200 only once the ingester has logged in to the broker.
    wait_for(Duration::from_secs(30), "the server to log in", || {
        ureq::get(&format!("{}/healthz", api.base)).call().ok()
    });

    let password_file = workspace.path("device");
    let _agent = workspace.start_device(
        &device,
        &broker,
        &[
            "--interval",
            "0.3",
            "--username",
            &device,
            "--password-file",
            path_str(&password_file),
        ],
    );
    wait_for(
        Duration::from_secs(60),
        "telemetry through the authenticated broker",
        || {
            api.device(&device)
                .filter(|d| d["inferences"].as_i64().unwrap_or(0) > 0)
        },
    );

    let intruder = unique_device_id("intruder");
    let log = workspace.path("intruder.log");
    let child = Command::new(env!("CARGO_BIN_EXE_fleet"))
        .args([
            "device",
            "--device-id",
            &intruder,
            "--broker",
            &broker,
            "--interval",
            "0.3",
        ])
        .args([
            "--username",
            &intruder,
            "--password-file",
            path_str(&workspace.path("wrong")),
        ])
        .args(["--bundle", path_str(&workspace.bundle())])
        .args(["--public-key", path_str(&workspace.public_key())])
        .args([
            "--input",
            path_str(&common::repo().join("models/mnist/t10k-images-idx3-ubyte.gz")),
        ])
        .args(["--state-dir", path_str(&workspace.path("state/intruder"))])
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut intruder_process = Process {
        name: "intruder".into(),
        child,
    };
    let started = std::time::Instant::now();
    loop {
        let text = fs::read_to_string(&log).unwrap_or_default();
        // Mosquitto rejects a wrong password with CONNACK code 5, "not authorized".
        if text.contains("NotAuthorized") {
            break;
        }
        let waited = started.elapsed();
        assert!(
            waited < Duration::from_secs(30),
            "no refused login in the agent log:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        intruder_process.is_running(),
        "the agent gave up instead of retrying"
    );
    assert!(
        api.device(&intruder).is_none(),
        "telemetry got through with a wrong password"
    );
}
