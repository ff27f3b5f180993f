//! Cross-process test of the inference gateway: the real `fleet server
//! --gateway-config` starting `fleet replica` processes, driven over HTTP with the
//! credentials the `fleet server` administration commands issue.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::free_port;

const SAMPLE_LEN: usize = 784;
const CLASSES: usize = 10;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn fleet(args: &[&str]) -> Output {
    let output = Command::new(env!("CARGO_BIN_EXE_fleet"))
        .args(args)
        .current_dir(repo())
        .output()
        .expect("run fleet");
    assert!(
        output.status.success(),
        "fleet {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

/// The server process, killed when the test ends, pass or fail.
struct ServerProcess(Child);

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn read_f32(path: &Path) -> Vec<f32> {
    std::fs::read(path)
        .expect("read reference file")
        .chunks_exact(4)
        .map(|chunk| f32::from_le_bytes(chunk.try_into().unwrap()))
        .collect()
}

fn body(inputs: &[f32], index: usize) -> serde_json::Value {
    serde_json::json!({"inputs": [{
        "name": "input",
        "shape": [1, 1, 28, 28],
        "datatype": "FP32",
        "data": &inputs[index * SAMPLE_LEN..(index + 1) * SAMPLE_LEN],
    }]})
}

/// Sends a request and returns its status, headers of interest and JSON body.
fn call(
    request: ureq::Request,
    body: Option<&serde_json::Value>,
) -> (u16, Option<String>, serde_json::Value) {
    let result = match body {
        Some(body) => request.send_json(body.clone()),
        None => request.call(),
    };
    let response = match result {
        Ok(response) => response,
        Err(ureq::Error::Status(_, response)) => response,
        Err(error) => panic!("request failed: {error}"),
    };
    let status = response.status();
    let retry_after = response.header("retry-after").map(str::to_owned);
    let json = response.into_json().unwrap_or(serde_json::Value::Null);
    (status, retry_after, json)
}

/// Posts `body` to the digit model over a plain socket: headers and the first 8 KiB,
/// a pause, then the rest in pieces of 4 KiB, as a slow client would. Returns the
/// response's status line, or what failed.
fn send_slowly(address: &str, token: &str, body: &[u8]) -> String {
    use std::io::{BufRead, BufReader, Write};

    let mut stream = std::net::TcpStream::connect(address).expect("connect to the gateway");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    let head = format!(
        "POST /v2/models/digit-cnn/infer HTTP/1.1\r\nHost: {address}\r\n\
         Authorization: Bearer {token}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n",
        body.len()
    );
    let (first, rest) = body.split_at(8192);
    stream.write_all(head.as_bytes()).expect("send headers");
    stream.write_all(first).expect("send the first part");
    std::thread::sleep(Duration::from_millis(300));
    // A gateway that responded and closed before reading the body makes this write
    // fail, which is how HTTP clients that send first and read second saw no 413.
    for piece in rest.chunks(4096) {
        if let Err(error) = stream.write_all(piece) {
            return format!("failed to send the rest of the body: {error}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut status_line = String::new();
    match BufReader::new(stream).read_line(&mut status_line) {
        Ok(_) => status_line,
        Err(error) => format!("no response: {error}"),
    }
}

fn wait_for<T>(timeout: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let started = Instant::now();
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            started.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn process_alive(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| !stat.contains(") Z "))
        .unwrap_or(false)
}

/// Creates a key pair, a signed digit-cnn bundle, a client token, a device secret and a
/// gateway config in `dir`, and returns the config's path, the token and the secret.
fn prepare(dir: &Path, database: &str) -> (PathBuf, String, String) {
    let keys = dir.join("keys");
    fleet(&["compress", "keygen", "--out", path_str(&keys)]);
    let bundle = dir.join("bundle");
    let recipe = repo().join("models/digit-cnn/bundle.toml");
    fleet(&[
        "compress",
        "bundle",
        path_str(&recipe),
        "--key",
        path_str(&keys.join("fleet.key")),
        "--out",
        path_str(&bundle),
        "--skip-evaluation",
    ]);
    let token_file = dir.join("client.token");
    fleet(&[
        "server",
        "create-token",
        "client",
        "--database",
        database,
        "--out",
        path_str(&token_file),
    ]);
    let secrets = dir.join("secrets");
    fleet(&[
        "server",
        "provision-device",
        "dev-1",
        "--database",
        database,
        "--out",
        path_str(&secrets),
    ]);
    let token = std::fs::read_to_string(token_file)
        .unwrap()
        .trim()
        .to_owned();
    let secret = std::fs::read_to_string(secrets.join("dev-1.secret"))
        .unwrap()
        .trim()
        .to_owned();
    let config = dir.join("gateway.toml");
    let toml = "[limits]\nmax_body_bytes = 16384\nrate_per_second = 1\nburst = 40\n\n\
                [[models]]\nname = \"digit-cnn\"\nbundle = \"bundle\"\npublic_key = \"keys/fleet.pub\"\n\
                [models.replicas]\nmin = 2\nmax = 2\n";
    std::fs::write(&config, toml).unwrap();
    (config, token, secret)
}

#[test]
fn gateway_serves_through_replica_processes() {
    let dir = tempfile::tempdir().unwrap();
    let database = path_str(&dir.path().join("fleet.db")).to_owned();
    let (config, token, device_secret) = prepare(dir.path(), &database);
    let http = format!("127.0.0.1:{}", free_port());
    let mqtt = format!("127.0.0.1:{}", free_port());
    let child = Command::new(env!("CARGO_BIN_EXE_fleet"))
        .args([
            "server",
            "--http",
            &http,
            "--mqtt-listen",
            &mqtt,
            "--mqtt-clean-session",
        ])
        .args([
            "--database",
            &database,
            "--gateway-config",
            path_str(&config),
        ])
        .stdin(Stdio::null())
        .spawn()
        .expect("start fleet server");
    let mut server = ServerProcess(child);
    let base = format!("http://{http}");
    let bearer = |value: &str| format!("Bearer {value}");

    let backends = wait_for(Duration::from_secs(90), "two ready replicas", || {
        assert!(
            server.0.try_wait().unwrap().is_none(),
            "fleet server exited"
        );
        // The server may not listen yet, so a connection error means "not yet".
        let response = ureq::get(&format!("{base}/api/gateway/backends"))
            .set("Authorization", &bearer(&token))
            .call()
            .ok()?;
        let status = response.status();
        let json: serde_json::Value = response.into_json().ok()?;
        let list = json["digit-cnn"]["backends"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let ready = list.iter().filter(|b| b["state"] == "ready").count();
        (status == 200 && ready == 2).then_some(list)
    });
    let (status, _, _) = call(ureq::get(&format!("{base}/v2/health/ready")), None);
    assert_eq!(status, 200);

    let reference = repo().join("models/digit-cnn/reference");
    let inputs = read_f32(&reference.join("inputs.f32"));
    let logits = read_f32(&reference.join("outputs.f32"));
    let infer_url = format!("{base}/v2/models/digit-cnn/infer");
    let infer = |auth: Option<&str>, body: &serde_json::Value| {
        let mut request = ureq::post(&infer_url);
        if let Some(auth) = auth {
            request = request.set("Authorization", &bearer(auth));
        }
        call(request, Some(body))
    };

    // 200 for a client token and a device secret, spread over both replicas.
    for index in 0..12 {
        let credential = if index % 2 == 0 {
            &token
        } else {
            &device_secret
        };
        let (status, _, answer) = infer(Some(credential), &body(&inputs, index));
        assert_eq!(status, 200, "{answer}");
        let data = answer["outputs"][0]["data"]
            .as_array()
            .expect("output data");
        for class in 0..CLASSES {
            let found = data[class].as_f64().unwrap() as f32;
            let expected = logits[index * CLASSES + class];
            assert!(
                (found - expected).abs() < 1e-3,
                "sample {index}: {found} vs {expected}"
            );
        }
    }
    let request =
        ureq::get(&format!("{base}/api/gateway/backends")).set("Authorization", &bearer(&token));
    let (_, _, json) = call(request, None);
    let served: Vec<u64> = json["digit-cnn"]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["served"].as_u64().unwrap())
        .collect();
    assert_eq!(served.iter().sum::<u64>(), 12, "{json}");
    assert!(served.iter().all(|&count| count > 0), "{served:?}");

    // 401, 404, 400 with the input named, 413.
    let (status, _, answer) = infer(None, &body(&inputs, 0));
    assert_eq!(status, 401, "{answer}");
    let (status, _, _) = infer(Some("wrong"), &body(&inputs, 0));
    assert_eq!(status, 401);
    let request =
        ureq::post(&format!("{base}/v2/models/nope/infer")).set("Authorization", &bearer(&token));
    let (status, _, answer) = call(request, Some(&body(&inputs, 0)));
    assert_eq!(status, 404, "{answer}");
    let mut wrong = body(&inputs, 0);
    wrong["inputs"][0]["shape"] = serde_json::json!([1, 784]);
    let (status, _, answer) = infer(Some(&token), &wrong);
    assert_eq!(status, 400);
    assert!(
        answer["error"].as_str().unwrap().contains("\"input\""),
        "{answer}"
    );
    let large = serde_json::json!({"inputs": [{
        "name": "input", "shape": [8, 1, 28, 28], "datatype": "FP32",
        "data": &inputs[..8 * SAMPLE_LEN],
    }]});
    let (status, _, answer) = infer(Some(&token), &large);
    assert_eq!(status, 413, "{answer}");
    let status_line = send_slowly(&http, &token, &serde_json::to_vec(&large).unwrap());
    assert!(status_line.starts_with("HTTP/1.1 413"), "{status_line}");

    // 429 with Retry-After once the device's burst of 40 is spent.
    let mut throttled = None;
    for _ in 0..41 {
        let (status, retry_after, _) = infer(Some(&device_secret), &wrong);
        if status == 429 {
            throttled = retry_after;
            break;
        }
    }
    assert_eq!(throttled.as_deref(), Some("1"));

    // SIGTERM stops the server and, with it, both replicas.
    let pids: Vec<u64> = backends
        .iter()
        .map(|b| b["pid"].as_u64().unwrap())
        .collect();
    let status = Command::new("kill")
        .args(["-TERM", &server.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = wait_for(Duration::from_secs(30), "the server to exit", || {
        server.0.try_wait().unwrap()
    });
    assert!(exit.success(), "{exit}");
    wait_for(Duration::from_secs(15), "the replicas to exit", || {
        pids.iter().all(|&pid| !process_alive(pid)).then_some(())
    });
}
