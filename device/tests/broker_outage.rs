//! End to end with a real broker: a Mosquitto on a free port is stopped while the agent
//! reports and started again, and every telemetry message still arrives, in order.
//!
//! The subscriber keeps a persistent session (clean session off, QoS 1) and Mosquitto
//! keeps sessions across its restart, so messages the agent sends before the subscriber
//! is back are queued for it rather than lost on the subscriber's side.

mod common;

use std::fs;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fleet_device::outbox::{Outbox, OutboxOptions};
use fleet_wire::Telemetry;
use rumqttc::{Client, Event, MqttOptions, Packet, QoS};

use common::{digit_bundle, repo};

/// A Mosquitto process with a config in a temporary folder; killed when dropped.
struct Mosquitto {
    config: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl Mosquitto {
    fn start(dir: &Path) -> Mosquitto {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("find a free port")
            .port();
        let data = dir.join("mosquitto-data");
        fs::create_dir_all(&data).unwrap();
        // Started as root, Mosquitto drops to user `mosquitto`, which cannot write to a
        // temporary folder owned by root.
        let running_as_root = fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
        let config = dir.join("mosquitto.conf");
        fs::write(
            &config,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n\
                 persistence_location {}/\nmax_queued_messages 100000\n\
                 log_dest file {}\n{}",
                data.display(),
                dir.join("mosquitto.log").display(),
                if running_as_root { "user root\n" } else { "" },
            ),
        )
        .unwrap();
        let mut broker = Mosquitto {
            config,
            port,
            child: None,
        };
        broker.restart();
        broker
    }

    fn restart(&mut self) {
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mosquitto (apt-get install mosquitto)");
        self.child = Some(child);
        wait_for(Duration::from_secs(10), "mosquitto to listen", || {
            TcpStream::connect(("127.0.0.1", self.port)).is_ok()
        });
    }

    /// Stops the broker with SIGTERM, which makes it save its sessions.
    fn stop(&mut self) {
        let mut child = self.child.take().expect("mosquitto runs");
        terminate(&mut child, "mosquitto");
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Sends SIGTERM and waits for the process to exit.
fn terminate(child: &mut Child, name: &str) -> std::process::ExitStatus {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -TERM {name} failed");
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(20) {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{name} did not exit within 20 s of SIGTERM");
}

fn wait_for(timeout: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Telemetry sequence numbers in arrival order, duplicates included.
type Received = Arc<Mutex<Vec<u64>>>;

/// Subscribes to the device's telemetry with a persistent session and records every
/// sequence number, reconnecting whenever the broker goes away.
fn subscribe(port: u16, device_id: &str) -> (Received, Arc<Mutex<bool>>) {
    let mut options = MqttOptions::new(format!("outage-test-{device_id}"), "127.0.0.1", port);
    options.set_clean_session(false);
    options.set_keep_alive(Duration::from_secs(5));
    let (client, mut connection) = Client::new(options, 100);
    let topic = fleet_wire::topic::device_topic(device_id, fleet_wire::topic::TopicKind::Telemetry);
    let received = Received::default();
    let subscribed = Arc::new(Mutex::new(false));
    let (seqs, ready) = (received.clone(), subscribed.clone());
    std::thread::spawn(move || {
        for event in connection.iter() {
            match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    client.subscribe(&topic, QoS::AtLeastOnce).unwrap();
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => *ready.lock().unwrap() = true,
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    let telemetry: Telemetry =
                        fleet_wire::decode(&publish.payload).expect("decode telemetry");
                    seqs.lock().unwrap().push(telemetry.seq);
                }
                Ok(_) => {}
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    });
    (received, subscribed)
}

fn max_seq(received: &Received) -> u64 {
    received.lock().unwrap().iter().copied().max().unwrap_or(0)
}

/// Returns the sequence numbers in order of first arrival.
fn first_arrivals(received: &[u64]) -> Vec<u64> {
    let mut seen = std::collections::HashSet::new();
    received
        .iter()
        .copied()
        .filter(|seq| seen.insert(*seq))
        .collect()
}

/// Finds the address the agent logged for its inference API.
fn api_address(log: &Path) -> Option<SocketAddr> {
    let text = fs::read_to_string(log).ok()?;
    let line = text
        .lines()
        .find(|line| line.contains("inference API listening"))?;
    let start = line.find("address=")? + "address=".len();
    line[start..].split_whitespace().next()?.parse().ok()
}

#[test]
fn telemetry_survives_broker_restart_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Mosquitto::start(dir.path());
    let device_id = format!("outage-{}", std::process::id());
    let (received, subscribed) = subscribe(broker.port, &device_id);
    wait_for(Duration::from_secs(10), "the subscription", || {
        *subscribed.lock().unwrap()
    });

    let bundle = digit_bundle(dir.path());
    let state = dir.path().join("state");
    let log = dir.path().join("agent.log");
    let mnist = repo().join("models/mnist");
    let mut agent = Command::new(env!("CARGO_BIN_EXE_fleet-device"))
        .args(["--device-id", &device_id])
        .args(["--broker", &format!("mqtt://127.0.0.1:{}", broker.port)])
        .arg("--bundle")
        .arg(&bundle.bundle.dir)
        .arg("--public-key")
        .arg(&bundle.public_key)
        .arg("--input")
        .arg(mnist.join("t10k-images-idx3-ubyte.gz"))
        .arg("--labels")
        .arg(mnist.join("t10k-labels-idx1-ubyte.gz"))
        .arg("--state-dir")
        .arg(&state)
        .args(["--shard", "0/50", "--rate", "20", "--interval", "0.2"])
        .args(["--drain-rate", "20", "--api-listen", "127.0.0.1:0"])
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .expect("start fleet-device");

    wait_for(Duration::from_secs(120), "the first telemetry", || {
        max_seq(&received) >= 5
    });
    // The inference API responds while the agent's own loop uses the same model.
    let address = api_address(&log).expect("the agent logs its API address");
    let health = ureq::get(&format!("http://{address}/v2/health/ready")).call();
    assert_eq!(health.map(|r| r.status()).ok(), Some(200));

    broker.stop();
    let before_outage = max_seq(&received);
    std::thread::sleep(Duration::from_secs(3));
    broker.restart();
    wait_for(
        Duration::from_secs(60),
        "telemetry after the outage",
        || max_seq(&received) >= before_outage + 30,
    );

    let status = terminate(&mut agent, "fleet-device");
    let agent_log = fs::read_to_string(&log).unwrap_or_default();
    assert!(status.success(), "agent exited with {status}:\n{agent_log}");
    let last: u64 = fs::read_to_string(state.join("telemetry.seq"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    wait_for(Duration::from_secs(30), "every message", || {
        first_arrivals(&received.lock().unwrap()).len() as u64 >= last
    });

    let arrivals = received.lock().unwrap().clone();
    let firsts = first_arrivals(&arrivals);
    assert_eq!(
        firsts,
        (1..=last).collect::<Vec<_>>(),
        "messages missing or out of order"
    );
    assert!(
        agent_log.contains("sending telemetry backlog"),
        "the agent did not report a backlog after the outage:\n{agent_log}"
    );
    println!(
        "{last} messages, {} duplicates, {} built after the broker stopped",
        arrivals.len() as u64 - last,
        last.saturating_sub(before_outage),
    );
    for line in agent_log.lines().filter(|line| line.contains("backlog")) {
        println!("agent: {line}");
    }

    let outbox = Outbox::open(&state.join("outbox"), OutboxOptions::default()).unwrap();
    assert_eq!(outbox.stats().pending_records, 0, "{:?}", outbox.stats());
}
