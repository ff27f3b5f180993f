//! Helpers shared by the integration tests and the `ingest` benchmark: a fleet server
//! started in this process, a probe that waits until it ingests, and an exact check of
//! what it stored against what the load generator sent.

// Each test crate and the benchmark use a different subset of these helpers.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, bail};
use fleet_loadgen::{DeviceCount, SimulatedDevice};
use fleet_server::metrics::Outcome;
use fleet_server::{BrokerMode, Server, ServerConfig, Store};
use rumqttc::{AsyncClient, Event, MqttOptions, QoS};
use tokio::time::Instant;

/// How long [`wait_until_ingesting`] keeps probing.
const PROBE_TIMEOUT: Duration = Duration::from_secs(20);
const PROBE_INTERVAL: Duration = Duration::from_millis(100);

/// Starts a fleet server on `database`, a SQLite file path or a `postgres://` URL, with
/// the HTTP API on a free port.
///
/// The server's broker session is clean, so a shared broker keeps nothing for it after
/// the run. `client_id` must still be unique among running servers, because a broker
/// closes an existing connection when a second client uses its id.
pub async fn start_server(
    broker: BrokerMode,
    database: &str,
    client_id: &str,
) -> anyhow::Result<Server> {
    let config = ServerConfig {
        http_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        broker,
        database: database.into(),
        mqtt_client_id: client_id.into(),
        shared_group: None,
        clean_session: true,
        mqtt_credentials: None,
        // Keep raw rows, which the checks read back.
        telemetry_retention: None,
        updates: Default::default(),
        samples: Default::default(),
    };
    Server::start(config).await
}

/// Messages the server has stored since it started, counted over every device.
pub fn stored_total(server: &Server) -> u64 {
    server.metrics.total(Outcome::Stored)
}

/// Splits the server's `HOST:PORT` broker address.
pub fn broker_address(server: &Server) -> anyhow::Result<(String, u16)> {
    let url = fleet_mqtt::BrokerUrl::parse(&server.mqtt_addr)?;
    Ok((url.host, url.port))
}

/// Publishes telemetry of the probe device `probe_id` until the server has stored one
/// of its messages, so a load that starts afterwards finds the server subscribed.
/// Returns the number of probe messages sent; the last one may be stored after this
/// returns.
pub async fn wait_until_ingesting(server: &Server, probe_id: &str) -> anyhow::Result<u64> {
    let (host, port) = broker_address(server)?;
    let mut options = MqttOptions::new(format!("{probe_id}-client"), host, port);
    options.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(options, 16);
    // The event loop runs until the Disconnect goes out or the connection fails.
    let mut connection = tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return Ok(()),
                Ok(_) => {}
                Err(error) => return Err(error),
            }
        }
    });
    let mut device = SimulatedDevice::new(
        probe_id.into(),
        fleet_wire::topic::PREFIX,
        Duration::from_secs(1),
        0,
    );
    let before = stored_total(server);
    let deadline = Instant::now() + PROBE_TIMEOUT;
    while stored_total(server) == before {
        if connection.is_finished() {
            let error = match connection.await {
                Ok(Err(error)) => error.to_string(),
                _ => "the connection closed".into(),
            };
            bail!("probe connection to {} failed: {error}", server.mqtt_addr);
        }
        if Instant::now() >= deadline {
            connection.abort();
            bail!(
                "the fleet server stored none of {} probe messages within {} s",
                device.sent(),
                PROBE_TIMEOUT.as_secs()
            );
        }
        let telemetry = device.next_telemetry(fleet_loadgen::unix_millis());
        let payload = fleet_wire::encode(&telemetry, fleet_wire::Encoding::Postcard)?;
        client
            .publish(device.topic(), QoS::AtLeastOnce, false, payload)
            .await
            .context("failed to queue a probe message")?;
        device.mark_sent();
        tokio::time::sleep(PROBE_INTERVAL).await;
    }
    let _ = client.disconnect().await;
    if tokio::time::timeout(Duration::from_secs(2), &mut connection)
        .await
        .is_err()
    {
        connection.abort();
    }
    Ok(device.sent())
}

/// Progress of [`wait_for_stored`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitOutcome {
    /// The server stored at least the expected number of messages.
    Reached,
    /// The stored count stopped growing for the quiet period.
    Stalled,
    /// The time limit ended the wait.
    TimedOut,
}

/// Waits until the server's stored count reaches `target`, stops growing for `quiet`,
/// or `limit` passes.
pub async fn wait_for_stored(
    server: &Server,
    target: u64,
    quiet: Duration,
    limit: Duration,
) -> WaitOutcome {
    wait_for_count(|| stored_total(server), target, quiet, limit).await
}

/// Waits until `count` reaches `target`, stops growing for `quiet`, or `limit` passes.
pub async fn wait_for_count(
    count: impl Fn() -> u64,
    target: u64,
    quiet: Duration,
    limit: Duration,
) -> WaitOutcome {
    let deadline = Instant::now() + limit;
    let mut last_count = count();
    let mut last_change = Instant::now();
    loop {
        let current = count();
        if current >= target {
            return WaitOutcome::Reached;
        }
        let now = Instant::now();
        if current != last_count {
            last_count = current;
            last_change = now;
        } else if now - last_change >= quiet {
            return WaitOutcome::Stalled;
        }
        if now >= deadline {
            return WaitOutcome::TimedOut;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What the store holds for the devices of one load run, compared with what they sent.
#[derive(Debug, Clone, Default)]
pub struct StoreCheck {
    /// Messages the devices sent.
    pub sent: u64,
    /// Distinct (device, seq) pairs stored with a seq the device sent.
    pub stored: u64,
    /// Sent messages that are not stored.
    pub lost: u64,
    /// Deliveries the server recognised as already stored.
    pub duplicates: u64,
    /// Missing sequence numbers between each device's lowest and highest stored ones.
    pub gaps: u64,
    /// Stored rows with a seq the device never sent.
    pub unexpected: u64,
    /// Receive time minus device time of every stored message, in milliseconds.
    pub lags_ms: Vec<i64>,
}

/// Reads every device of `devices` back from the store and counts stored, lost,
/// duplicate and unexpected messages exactly, by (device, seq).
pub async fn check_store(store: &Store, devices: &[DeviceCount]) -> anyhow::Result<StoreCheck> {
    // A window that starts in the future, so the listing skips merging histograms.
    let summaries = store
        .devices(fleet_loadgen::unix_millis() + 3_600_000, Duration::ZERO)
        .await
        .context("failed to list devices")?;
    let summaries: HashMap<&str, _> = summaries.iter().map(|d| (d.id.as_str(), d)).collect();
    let mut check = StoreCheck::default();
    for device in devices {
        check.sent += device.sent;
        let Some(summary) = summaries.get(device.device_id.as_str()) else {
            check.lost += device.sent;
            continue;
        };
        check.duplicates += summary.duplicates as u64;
        check.gaps += summary.gaps as u64;
        let limit = u32::try_from(device.sent + 10).unwrap_or(u32::MAX);
        let rows = store
            .telemetry(&device.device_id, limit)
            .await
            .with_context(|| format!("failed to read telemetry of {}", device.device_id))?
            .unwrap_or_default();
        let mut stored = 0;
        for row in &rows {
            if (1..=device.sent as i64).contains(&row.seq) {
                stored += 1;
            } else {
                check.unexpected += 1;
            }
            check.lags_ms.push(row.received_ms - row.device_time_ms);
        }
        check.stored += stored;
        check.lost += device.sent - stored;
    }
    Ok(check)
}

/// Returns the value at fraction `quantile` of `sorted` by the nearest-rank method.
pub fn percentile<T: Copy>(sorted: &[T], quantile: f64) -> Option<T> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (quantile * sorted.len() as f64).ceil().max(1.0) as usize;
    Some(sorted[rank.min(sorted.len()) - 1])
}

/// A Mosquitto started on a free loopback port, killed when dropped.
#[derive(Debug)]
pub struct Mosquitto {
    pub port: u16,
    child: std::process::Child,
    /// Holds the configuration file while Mosquitto runs.
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    /// Starts Mosquitto with `settings` after its listener line; `settings` needs
    /// `allow_anonymous true` for the load generator.
    pub fn start(settings: &str) -> anyhow::Result<Mosquitto> {
        use std::os::unix::fs::PermissionsExt;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .context("failed to find a free port for Mosquitto")?
            .port();

        let dir = tempfile::tempdir()?;
        let config = dir.path().join("mosquitto.conf");
        std::fs::write(&config, format!("listener {port} 127.0.0.1\n{settings}"))?;
        // Mosquitto started as root switches to the `mosquitto` user, which must be able
        // to read its configuration.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644))?;

        let child = std::process::Command::new("mosquitto")
            .arg("-c")
            .arg(&config)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|error| match error.kind() {
                std::io::ErrorKind::NotFound => anyhow::anyhow!(
                    "mosquitto not found on PATH: install it with `apt-get install mosquitto`"
                ),
                _ => anyhow::Error::from(error).context("failed to start mosquitto"),
            })?;
        Ok(Mosquitto {
            port,
            child,
            _dir: dir,
        })
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
