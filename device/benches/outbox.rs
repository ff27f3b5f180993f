//! Outbox benchmark: append throughput under each fsync policy, and the time the real
//! agent takes to send a telemetry backlog through Mosquitto at a set drain rate.
//!
//! ```sh
//! cargo bench -p fleet-device --bench outbox --profile dev            # both parts
//! cargo bench -p fleet-device --bench outbox --profile dev -- append  # one part
//! ```
//!
//! The dev profile builds dependencies optimised (the workspace sets opt-level 3 for
//! them) and this crate without optimisation, which avoids a release build of tract.
//! Needs `mosquitto` on the PATH for the drain part; it starts its own on a free port.

#[path = "../tests/common/mod.rs"]
mod common;

use std::fs;
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fleet_device::outbox::{FsyncPolicy, Outbox, OutboxOptions};
use fleet_wire::{Encoding, LatencyHistogram, ModelRef, SystemStats, Telemetry};
use rumqttc::{Client, Event, MqttOptions, Packet, QoS};

/// Backlogs to drain: (description, records, drain rate in records per second).
const DRAINS: [(&str, u64, f64); 3] = [
    ("10 min at 1 msg / 2 s (demo)", 300, 10.0),
    ("10 min at 10 msg/s", 6_000, 200.0),
    ("10 min at 10 msg/s", 6_000, 100_000.0),
];

fn main() {
    // `cargo bench` passes `--bench`; a bare word picks one part.
    let part = std::env::args().skip(1).find(|arg| !arg.starts_with('-'));
    if part.as_deref().is_none_or(|part| part == "append") {
        print_append_table();
    }
    if part.as_deref().is_none_or(|part| part == "drain") {
        print_drain_table();
    }
}

fn print_append_table() {
    println!(
        "== append throughput (payload {} bytes)",
        telemetry_payload(1).len()
    );
    println!("| fsync policy | records | seconds | records/s |");
    println!("|---|--:|--:|--:|");
    for (policy, records) in [
        (FsyncPolicy::EveryRecord, 2_000),
        (FsyncPolicy::Interval(Duration::from_millis(1000)), 200_000),
        (FsyncPolicy::Never, 200_000),
    ] {
        let seconds = append_seconds(policy, records);
        println!(
            "| {policy} | {records} | {seconds:.2} | {:.0} |",
            records as f64 / seconds
        );
    }
    println!();
}

fn print_drain_table() {
    println!("== backlog drain through the agent and Mosquitto");
    println!(
        "| backlog | records | drain rate /s | seconds, first to last | expected (n-1)/rate |"
    );
    println!("|---|--:|--:|--:|--:|");
    for (description, records, rate) in DRAINS {
        let seconds = drain_seconds(records, rate);
        println!(
            "| {description} | {records} | {rate} | {seconds:.2} | {:.2} |",
            (records - 1) as f64 / rate
        );
    }
}

/// Builds a postcard telemetry message like the agent's, with plausible counters.
fn telemetry_payload(seq: u64) -> Vec<u8> {
    let mut latency = LatencyHistogram::default();
    for micros in [350, 380, 410, 900] {
        latency.record_micros(micros);
    }
    let telemetry = Telemetry {
        device_id: "bench-device".into(),
        seq,
        device_time_ms: 1_796_000_000_000 + seq * 2_000,
        interval_ms: 2_000,
        model: ModelRef {
            name: "digit-cnn".into(),
            version: "1.0.0".into(),
        },
        inferences: 40,
        input_errors: 0,
        labeled: 40,
        correct: 39,
        confidence_sum: 38.7,
        low_confidence: 1,
        latency,
        system: SystemStats {
            cpu_percent: 23.5,
            process_memory_bytes: 41_000_000,
            memory_used_bytes: 2_100_000_000,
            memory_total_bytes: 8_000_000_000,
            temperature_celsius: Some(48.0),
        },
        fallback: Default::default(),
    };
    fleet_wire::encode(&telemetry, Encoding::Postcard).expect("encode telemetry")
}

fn append_seconds(fsync: FsyncPolicy, records: u64) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let options = OutboxOptions {
        fsync,
        max_bytes: 256 * 1024 * 1024,
        ..OutboxOptions::default()
    };
    let mut outbox = Outbox::open(dir.path(), options).unwrap();
    let payload = telemetry_payload(1);
    let started = Instant::now();
    for _ in 0..records {
        outbox.append(&payload).unwrap();
    }
    outbox.close().unwrap();
    started.elapsed().as_secs_f64()
}

/// Fills an agent's outbox with `records` messages, starts the agent against a fresh
/// Mosquitto, and returns the seconds from the first to the last message a subscriber
/// receives.
fn drain_seconds(records: u64, rate: f64) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let (mut broker, port) = start_mosquitto(dir.path());
    let device_id = "bench-device";
    let arrivals = subscribe(port, device_id);

    let state = dir.path().join("state");
    let mut outbox = Outbox::open(&state.join("outbox"), OutboxOptions::default()).unwrap();
    for seq in 1..=records {
        outbox.append(&telemetry_payload(seq)).unwrap();
    }
    outbox.close().unwrap();
    fs::write(state.join("telemetry.seq"), format!("{records}\n")).unwrap();

    let bundle = common::digit_bundle(dir.path());
    let mnist = common::repo().join("models/mnist");
    let mut agent = Command::new(env!("CARGO_BIN_EXE_fleet-device"))
        .args(["--device-id", device_id])
        .args(["--broker", &format!("mqtt://127.0.0.1:{port}")])
        .arg("--bundle")
        .arg(&bundle.bundle.dir)
        .arg("--public-key")
        .arg(&bundle.public_key)
        .arg("--input")
        .arg(mnist.join("t10k-images-idx3-ubyte.gz"))
        .arg("--state-dir")
        .arg(&state)
        .args(["--shard", "0/100", "--rate", "1", "--interval", "3600"])
        .args(["--drain-rate", &rate.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start fleet-device");

    let timeout = Duration::from_secs_f64(120.0 + records as f64 / rate * 2.0);
    let started = Instant::now();
    while (arrivals.lock().unwrap().len() as u64) < records {
        assert!(started.elapsed() < timeout, "backlog not drained in time");
        std::thread::sleep(Duration::from_millis(20));
    }
    let times = arrivals.lock().unwrap().clone();
    let _ = Command::new("kill")
        .args(["-TERM", &agent.id().to_string()])
        .status();
    let _ = agent.wait();
    let _ = broker.kill();
    let _ = broker.wait();
    (times[records as usize - 1] - times[0]).as_secs_f64()
}

fn start_mosquitto(dir: &Path) -> (Child, u16) {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .unwrap()
        .port();
    let config = dir.join("mosquitto.conf");
    fs::write(
        &config,
        format!("listener {port} 127.0.0.1\nallow_anonymous true\n"),
    )
    .unwrap();
    let child = Command::new("mosquitto")
        .arg("-c")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start mosquitto");
    let started = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "mosquitto did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    (child, port)
}

/// Records the arrival time of every telemetry message of `device_id`.
fn subscribe(port: u16, device_id: &str) -> Arc<Mutex<Vec<Instant>>> {
    let options = MqttOptions::new("outbox-bench-subscriber", "127.0.0.1", port);
    let (client, mut connection) = Client::new(options, 100);
    let topic = fleet_wire::topic::device_topic(device_id, fleet_wire::topic::TopicKind::Telemetry);
    let arrivals = Arc::new(Mutex::new(Vec::new()));
    let (times, subscribed) = (arrivals.clone(), Arc::new(Mutex::new(false)));
    let ready = subscribed.clone();
    std::thread::spawn(move || {
        for event in connection.iter() {
            match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    client.subscribe(&topic, QoS::AtLeastOnce).unwrap();
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => *ready.lock().unwrap() = true,
                Ok(Event::Incoming(Packet::Publish(_))) => {
                    times.lock().unwrap().push(Instant::now());
                }
                Ok(_) => {}
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    });
    while !*subscribed.lock().unwrap() {
        std::thread::sleep(Duration::from_millis(20));
    }
    arrivals
}
