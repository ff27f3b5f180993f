//! The web console in a real browser: Chromium, driven over WebDriver by chromedriver,
//! logs in through the console's form, runs the page's script against the live API and
//! renders a row per device. Also checks the API's JSON errors and its authentication.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Process, Workspace, free_port, path_str, unique_device_id, wait_for};
use fantoccini::{Client, ClientBuilder, Locator};

/// Finds a program: the path in environment variable `variable`, else the first of
/// `names` on the PATH.
fn find_program(variable: &str, names: &[&str], install: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(variable) {
        return PathBuf::from(path);
    }
    for name in names {
        let found = Command::new("which").arg(name).output();
        if let Ok(output) = found
            && output.status.success()
        {
            return PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
        }
    }
    panic!("{} not found: {install} or set {variable}", names[0]);
}

fn chromium() -> PathBuf {
    find_program(
        "FLEET_CHROMIUM",
        &["chromium", "chromium-browser", "google-chrome"],
        "apt-get install chromium",
    )
}

fn chromedriver() -> PathBuf {
    find_program(
        "FLEET_CHROMEDRIVER",
        &["chromedriver"],
        "apt-get install chromium-driver",
    )
}

/// A headless Chromium session behind its own chromedriver on a free port.
struct Browser {
    client: Client,
    _driver: Process,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn start() -> Browser {
        let port = free_port();
        let child = Command::new(chromedriver())
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let driver = Process {
            name: "chromedriver".into(),
            child,
        };
        wait_for(Duration::from_secs(20), "chromedriver to listen", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        });
        let profile = tempfile::tempdir().unwrap();
        let options = serde_json::json!({
            "binary": chromium(),
            "args": [
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                format!("--user-data-dir={}", profile.path().display()),
            ],
        });
        let mut capabilities = serde_json::Map::new();
        capabilities.insert("goog:chromeOptions".into(), options);
        let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(capabilities)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .expect("WebDriver session with Chromium");
        Browser {
            client,
            _driver: driver,
            _profile: profile,
        }
    }

    async fn wait_for_css(&self, selector: &str) -> fantoccini::elements::Element {
        self.client
            .wait()
            .at_most(Duration::from_secs(20))
            .for_element(Locator::Css(selector))
            .await
            .unwrap_or_else(|error| panic!("{selector} never appeared: {error}"))
    }

    /// Fills and submits the console's login form.
    async fn log_in(&self, username: &str, password: &str) {
        let form = self.wait_for_css("#login:not([hidden])").await;
        for (field, value) in [("username", username), ("password", password)] {
            let input = form.find(Locator::Id(field)).await.unwrap();
            input.clear().await.unwrap();
            input.send_keys(value).await.unwrap();
        }
        form.find(Locator::Id("login-submit"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
    }

    async fn text_of(&self, selector: &str) -> String {
        self.client
            .find(Locator::Css(selector))
            .await
            .unwrap_or_else(|error| panic!("{selector}: {error}"))
            .text()
            .await
            .unwrap()
    }
}

/// Sets an operator's password with `fleet server set-operator-password`.
fn set_operator_password(workspace: &Workspace, database: &str, name: &str, password: &str) {
    let file = workspace.path(&format!("{name}-password"));
    std::fs::write(&file, format!("{password}\n")).unwrap();
    let output = common::fleet(&[
        "server",
        "set-operator-password",
        name,
        "--password-file",
        path_str(&file),
        "--database",
        database,
    ]);
    assert!(
        output.status.success(),
        "set-operator-password: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_logs_in_and_lists_devices() {
    let workspace = Workspace::new();
    let mqtt_port = free_port();
    let server = workspace.start_server(None, mqtt_port);
    set_operator_password(
        &workspace,
        &server.database,
        "alice",
        "correct horse battery",
    );
    let broker = format!("mqtt://127.0.0.1:{mqtt_port}");
    let id = unique_device_id("console");
    let _device = workspace.start_device(&id, &broker, &["--rate", "100", "--interval", "0.5"]);
    let api = server.api.clone();
    let device_id = id.clone();
    tokio::task::spawn_blocking(move || {
        wait_for(Duration::from_secs(60), "telemetry from the device", || {
            api.device(&device_id)
                .filter(|d| d["labeled"].as_i64().unwrap_or(0) >= 50)
        })
    })
    .await
    .unwrap();

    let browser = Browser::start().await;
    browser
        .client
        .goto(&format!("{}/", server.base))
        .await
        .unwrap();
    browser.log_in("alice", "wrong password!").await;
    wait_for_text(&browser, "#login-error", "invalid user name or password").await;

    browser.log_in("alice", "correct horse battery").await;
    let row = browser
        .wait_for_css(&format!("tr[data-device=\"{id}\"]"))
        .await;
    let cells = row.text().await.unwrap();
    assert!(cells.contains("online"), "{cells}");
    assert!(cells.contains("digit-cnn 1.0.0"), "{cells}");
    assert!(cells.contains(" %"), "no accuracy percentage in {cells}");
    assert!(cells.contains(" ms"), "no latency in {cells}");
    wait_for_text(&browser, "#summary", "1 of 1 devices online").await;
    assert_eq!(browser.text_of("#operator").await, "alice");

    browser
        .client
        .find(Locator::Id("logout"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    browser.wait_for_css("#login:not([hidden])").await;
    browser.client.refresh().await.unwrap();
    browser.wait_for_css("#login:not([hidden])").await;
    browser.client.clone().close().await.unwrap();
}

/// Waits until the element's text contains `expected`.
async fn wait_for_text(browser: &Browser, selector: &str, expected: &str) {
    let started = std::time::Instant::now();
    loop {
        let text = browser.text_of(selector).await;
        if text.contains(expected) {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{selector} shows {text:?}, not {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Returns the status and JSON body of a request the server rejects.
fn rejection(request: ureq::Request) -> (u16, serde_json::Value) {
    let url = request.url().to_owned();
    match request.call() {
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
        let request = ureq::get(&format!("{}{path}", server.base))
            .set("Authorization", &format!("Bearer {}", server.token));
        let (status, body) = rejection(request);
        assert_eq!(status, expected_status, "{path}: {body}");
        let message = body["error"].as_str().unwrap_or_default();
        assert!(message.contains(expected_text), "{path}: {body}");
    }
}
