//! The web console in a real browser: headless Chromium loads the page, runs its
//! script against the live API and renders a row per device.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::{Workspace, free_port, unique_device_id, wait_for};

/// Finds Chromium: `FLEET_CHROMIUM`, else `chromium` or `google-chrome` on the PATH.
fn chromium() -> PathBuf {
    if let Some(path) = std::env::var_os("FLEET_CHROMIUM") {
        return PathBuf::from(path);
    }
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        let found = Command::new("which").arg(name).output();
        if let Ok(output) = found
            && output.status.success()
        {
            return PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
        }
    }
    panic!("Chromium not found: install it (apt-get install chromium) or set FLEET_CHROMIUM");
}

/// Loads `url` in headless Chromium, lets its scripts run, and returns the DOM.
fn rendered_dom(url: &str) -> String {
    let profile = tempfile::tempdir().unwrap();
    let output = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=5000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(url)
        .output()
        .expect("run Chromium");
    assert!(
        output.status.success(),
        "Chromium failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn console_lists_live_devices() {
    let workspace = Workspace::new();
    let mqtt_port = free_port();
    let server = workspace.start_server(None, mqtt_port);
    let broker = format!("mqtt://127.0.0.1:{mqtt_port}");
    let id = unique_device_id("console");
    let _device = workspace.start_device(&id, &broker, &["--rate", "100", "--interval", "0.5"]);
    wait_for(Duration::from_secs(60), "telemetry from the device", || {
        server
            .device(&id)
            .filter(|d| d["labeled"].as_i64().unwrap_or(0) >= 50)
    });

    let dom = rendered_dom(&format!("{}/", server.base));
    let row_start = dom
        .find(&format!("data-device=\"{id}\""))
        .unwrap_or_else(|| panic!("no row for {id} in the rendered console:\n{dom}"));
    let row = &dom[row_start
        ..dom[row_start..]
            .find("</tr>")
            .map_or(dom.len(), |end| row_start + end)];
    assert!(row.contains(">online<"), "{row}");
    assert!(row.contains("digit-cnn 1.0.0"), "{row}");
    assert!(row.contains(" %<"), "no accuracy percentage in {row}");
    assert!(row.contains(" ms<"), "no latency in {row}");
    assert!(
        dom.contains("1 of 1 devices online"),
        "summary line missing:\n{dom}"
    );
}

/// Returns the status and JSON body of a request the server rejects.
fn rejection(url: &str) -> (u16, serde_json::Value) {
    match ureq::get(url).call() {
        Err(ureq::Error::Status(status, response)) => (status, response.into_json().unwrap()),
        other => panic!("{url} was not rejected: {other:?}"),
    }
}

#[test]
fn api_errors_are_json() {
    let workspace = Workspace::new();
    let mqtt_port = free_port();
    let server = workspace.start_server(None, mqtt_port);
    let id = unique_device_id("api");
    let broker = format!("mqtt://127.0.0.1:{mqtt_port}");
    let _device = workspace.start_device(&id, &broker, &["--interval", "0.2"]);
    wait_for(Duration::from_secs(60), "the device", || server.device(&id));

    let cases = [
        (
            format!("/api/devices/{id}/telemetry?limit=abc"),
            400,
            "invalid query",
        ),
        (
            format!("/api/devices/{id}/telemetry?limit=0"),
            400,
            "limit must be between",
        ),
        (
            "/api/devices/nobody/telemetry".to_string(),
            404,
            "not found",
        ),
    ];
    for (path, expected_status, expected_text) in cases {
        let (status, body) = rejection(&format!("{}{path}", server.base));
        assert_eq!(status, expected_status, "{path}: {body}");
        let message = body["error"].as_str().unwrap_or_default();
        assert!(message.contains(expected_text), "{path}: {body}");
    }
}
