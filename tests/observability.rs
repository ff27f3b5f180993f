//! Traces over OTLP/HTTP to a collector, and JSON log lines, from a real server process.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::{Process, Workspace, free_port, unique_device_id, wait_for};

/// Accepts OTLP/HTTP export requests on a free port, replies 200 and passes each body
/// on. Returns the traces URL and the receiving end.
fn fake_collector() -> (String, mpsc::Receiver<Vec<u8>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1/traces", listener.local_addr().unwrap());
    let (bodies, received) = mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut content_length = 0;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    content_length = value.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0; content_length];
            if reader.read_exact(&mut body).is_ok() {
                let _ = bodies.send(body);
            }
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
        }
    });
    (url, received)
}

#[test]
fn spans_reach_the_otlp_collector() {
    let (collector, bodies) = fake_collector();
    let workspace = Workspace::new();
    let mqtt_port = free_port();
    let http = format!("127.0.0.1:{}", free_port());
    let server = Command::new(env!("CARGO_BIN_EXE_fleet"))
        .args([
            "server",
            "--http",
            &http,
            "--mqtt-clean-session",
            "--otlp-endpoint",
            &collector,
        ])
        .args(["--mqtt-listen", &format!("127.0.0.1:{mqtt_port}")])
        .arg("--database")
        // The embedded broker's database, in which start_device provisions the agent.
        .arg(workspace.embedded_database(mqtt_port))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _server = Process {
        name: "fleet server".into(),
        child: server,
    };
    wait_for(Duration::from_secs(30), "the server", || {
        ureq::get(&format!("http://{http}/healthz")).call().ok()
    });
    let id = unique_device_id("traced");
    let _device = workspace.start_device(
        &id,
        &format!("mqtt://127.0.0.1:{mqtt_port}"),
        &["--rate", "50", "--interval", "0.3"],
    );

    // The batch span processor exports every few seconds.
    let body = wait_for(
        Duration::from_secs(60),
        "an export containing an ingest span",
        || {
            let body = bodies.recv_timeout(Duration::from_millis(500)).ok()?;
            let text = String::from_utf8_lossy(&body).into_owned();
            text.contains("ingest_batch").then_some(text)
        },
    );
    assert!(
        body.contains("fleet-server"),
        "service name missing from the export"
    );
}

#[test]
fn json_logs_are_one_object_per_line() {
    let workspace = Workspace::new();
    let http = format!("127.0.0.1:{}", free_port());
    let mut server = Command::new(env!("CARGO_BIN_EXE_fleet"))
        .args([
            "server",
            "--http",
            &http,
            "--mqtt-clean-session",
            "--log-format",
            "json",
        ])
        .args(["--mqtt-listen", &format!("127.0.0.1:{}", free_port())])
        .arg("--database")
        .arg(workspace.path("fleet.db"))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = server.stderr.take().unwrap();
    let mut process = Process {
        name: "fleet server".into(),
        child: server,
    };
    wait_for(Duration::from_secs(30), "the server", || {
        ureq::get(&format!("http://{http}/healthz")).call().ok()
    });
    assert!(process.terminate().success());

    let lines: Vec<String> = BufReader::new(stderr)
        .lines()
        .map_while(Result::ok)
        .collect();
    assert!(!lines.is_empty(), "no log lines");
    for line in &lines {
        let value: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(value["level"].is_string(), "{line}");
        assert!(value["timestamp"].is_string(), "{line}");
    }
    assert!(
        lines
            .iter()
            .any(|line| line.contains("\"message\":\"fleet server started\"")),
        "{lines:#?}"
    );
}
