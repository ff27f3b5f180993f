//! The load generator against a real fleet server with its embedded broker, started in
//! this process on free ports: every message is stored exactly once.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fleet_loadgen::{LoadConfig, LoadReport, Throttle};
use fleet_server::broker::ClientAccess;
use fleet_server::metrics::Outcome;
use fleet_server::{BrokerMode, Server};
use fleet_wire::Encoding;
use support::StoreCheck;

/// Starts a server with the embedded broker on a free port and waits until it ingests.
///
/// The load generator sends for many devices over each connection, which no device
/// credential allows, so the broker admits anonymous clients here.
async fn start(dir: &tempfile::TempDir, name: &str) -> Server {
    let broker = BrokerMode::Embedded {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        access: ClientAccess::AllowAnonymous,
    };
    let client_id = format!("fleet-test-{}-{name}", std::process::id());
    let database = dir.path().join("fleet.db");
    let server = support::start_server(broker, database.to_str().unwrap(), &client_id)
        .await
        .expect("server starts");
    support::wait_until_ingesting(&server, &format!("probe-{name}"))
        .await
        .expect("server ingests probe messages");
    server
}

/// Returns a configuration for the server's broker.
fn load_config(server: &Server, prefix: &str, devices: usize, rate: f64) -> LoadConfig {
    let (host, port) = support::broker_address(server).unwrap();
    let mut config = LoadConfig::new(prefix, devices, rate, Duration::from_secs(30));
    config.broker_host = host;
    config.broker_port = port;
    config
}

/// Reads the run's messages back from the store, waiting up to 30 s for all of them.
async fn stored(server: &Server, report: &LoadReport) -> StoreCheck {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let check = support::check_store(&server.store, &report.devices)
            .await
            .expect("store readable");
        if check.lost == 0 || tokio::time::Instant::now() >= deadline {
            return check;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(&dir, "once").await;
    let mut config = load_config(&server, "lg-once", 20, 20.0);
    config.connections = 4;
    config.messages_per_device = Some(10);

    let report = fleet_loadgen::run(config).await.expect("load runs");
    assert_eq!(report.sent, 200);
    assert_eq!(report.acknowledged, 200);
    assert_eq!(report.expected, Some(200));
    assert_eq!(report.devices.len(), 20);
    assert!(
        report.devices.iter().all(|d| d.sent == 10),
        "{:?}",
        report.devices
    );
    assert_eq!(report.devices[0].device_id, "lg-once-1");
    assert_eq!(report.devices[19].device_id, "lg-once-20");

    let check = stored(&server, &report).await;
    assert_eq!(check.sent, 200);
    assert_eq!(check.stored, 200);
    assert_eq!(check.lost, 0);
    assert_eq!(check.duplicates, 0);
    assert_eq!(check.gaps, 0);
    assert_eq!(check.unexpected, 0);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_unpaced_on_one_connection() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(&dir, "json").await;
    let mut config = load_config(&server, "lg-json", 3, 0.0);
    config.connections = 1;
    config.messages_per_device = Some(5);
    config.encoding = Encoding::Json;

    let report = fleet_loadgen::run(config).await.expect("load runs");
    assert_eq!(report.sent, 15);
    assert_eq!(report.acknowledged, 15);
    assert_eq!(report.target_rate, None);
    let check = stored(&server, &report).await;
    assert_eq!(check.stored, 15);
    assert_eq!(check.lost, 0);
    assert_eq!(check.duplicates, 0);

    // The messages carry a second of simulated inference each.
    let rows = server
        .store
        .telemetry("lg-json-2", 10)
        .await
        .unwrap()
        .expect("device known");
    let seqs: Vec<i64> = rows.iter().map(|row| row.seq).collect();
    assert_eq!(seqs, [5, 4, 3, 2, 1]);
    for row in &rows {
        assert_eq!(row.interval_ms, 1_000);
        assert!(row.inferences > 0, "no inferences in seq {}", row.seq);
        assert_eq!(row.model_name, "digit-cnn");
        assert!(row.latency_p50_us.is_some());
        assert!(row.memory_total_bytes.is_some());
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duration_bounds_a_paced_run() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(&dir, "duration").await;
    // Two devices on their own connections at 10 messages/s for 1 s: each message is
    // due before the end only for seq 1 to 10.
    let mut config = load_config(&server, "lg-duration", 2, 10.0);
    config.duration = Duration::from_secs(1);

    let report = fleet_loadgen::run(config).await.expect("load runs");
    assert_eq!(report.expected, None);
    assert!(report.sent > 0);
    for device in &report.devices {
        assert!(
            device.sent <= 10,
            "{} sent {}",
            device.device_id,
            device.sent
        );
    }
    assert_eq!(report.acknowledged, report.sent);
    let check = stored(&server, &report).await;
    assert_eq!(check.stored, report.sent);
    assert_eq!(check.gaps, 0);
    server.shutdown().await;
}

#[tokio::test]
async fn unreachable_broker_is_an_error() {
    // Bind and release a port so that nothing listens on it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut config = LoadConfig::new("lg-none", 2, 1.0, Duration::from_secs(1));
    config.broker_port = port;
    let error = fleet_loadgen::run(config).await.unwrap_err();
    let message = format!("{error:#}");
    assert!(
        message.contains(&format!(
            "failed to connect to the MQTT broker at 127.0.0.1:{port}"
        )),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttle_caps_unconsumed_messages() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(&dir, "throttle").await;
    // A consumer that never reports progress lets exactly `max_unconsumed` through.
    let mut config = load_config(&server, "lg-stuck", 5, 0.0);
    config.messages_per_device = Some(20);
    config.duration = Duration::from_millis(500);
    config.throttle = Some(Throttle {
        consumed: Arc::new(|| 0),
        max_unconsumed: 7,
    });
    let report = fleet_loadgen::run(config).await.expect("load runs");
    assert_eq!(report.sent, 7);
    assert_eq!(report.expected, Some(100));

    // The server's stored count as progress lets every message through.
    let metrics = server.metrics.clone();
    let baseline = support::stored_total(&server);
    let mut config = load_config(&server, "lg-flow", 5, 0.0);
    config.messages_per_device = Some(20);
    config.throttle = Some(Throttle {
        consumed: Arc::new(move || metrics.total(Outcome::Stored) - baseline),
        max_unconsumed: 10,
    });
    let report = fleet_loadgen::run(config).await.expect("load runs");
    assert_eq!(report.sent, 100);
    let check = stored(&server, &report).await;
    assert_eq!(check.stored, 100);
    assert_eq!(check.lost, 0);
    server.shutdown().await;
}

/// A broker that sends without an in-flight limit, as a fleet's Mosquitto is set up.
const UNLIMITED_BROKER: &str = "allow_anonymous true
persistence false
max_inflight_messages 0
max_queued_messages 1000000
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlog_beyond_ingest_queue_drains() {
    let mosquitto = support::Mosquitto::start(UNLIMITED_BROKER).expect("mosquitto starts");
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerMode::External {
        url: fleet_mqtt::BrokerUrl {
            host: "127.0.0.1".into(),
            port: mosquitto.port,
            tls: false,
        },
        tls: fleet_mqtt::TlsFiles::default(),
        connections: 1,
    };
    let database = dir.path().join("fleet.db");
    let client_id = format!("fleet-test-{}-backlog", std::process::id());
    let server = support::start_server(broker, database.to_str().unwrap(), &client_id)
        .await
        .expect("server starts");
    support::wait_until_ingesting(&server, "probe-backlog")
        .await
        .expect("server ingests probe messages");

    // Sent unthrottled, the messages reach the server faster than it commits them, so
    // its queue of received messages fills while the acknowledgements pile up.
    let mut config = load_config(&server, "lg-backlog", 20, 0.0);
    config.messages_per_device = Some(1_000);
    let report = fleet_loadgen::run(config).await.expect("load runs");
    assert_eq!(report.sent, 20_000);

    let check = stored(&server, &report).await;
    assert_eq!(check.stored, 20_000);
    assert_eq!(check.lost, 0);
    assert_eq!(check.duplicates, 0);
    server.shutdown().await;
}
