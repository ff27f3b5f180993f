//! A load generator that simulates a fleet of devices speaking the real protocol: each
//! simulated device publishes [`fleet_wire::Telemetry`] on `fleet/v1/{device}/telemetry`
//! at QoS 1, with its own sequence numbers starting at 1, at a steady rate.
//!
//! Devices are spread over a smaller number of MQTT connections, so 10,000 devices do
//! not need 10,000 sockets. Each connection then carries several device ids, unlike
//! real agents, which connect one each with their own last will. The generator sends
//! telemetry only, no status messages, so a server lists the simulated devices in the
//! state `unknown`.
//!
//! [`run`] is the whole generator; the `fleet-loadgen` binary and the `ingest`
//! benchmark both call it.

mod connection;
mod device;

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, bail};
use fleet_wire::Encoding;
use tokio::sync::Semaphore;
use tokio::time::Instant;

pub use device::{INFERENCES_PER_SECOND, SimulatedDevice};

use crate::connection::{ConnectionPlan, Totals};

/// Maximum number of connections [`LoadConfig::new`] picks by default.
pub const DEFAULT_MAX_CONNECTIONS: usize = 100;
/// Interval between progress lines in the log.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(5);
/// How often the flow-control gate reads the consumer's progress.
const THROTTLE_POLL_INTERVAL: Duration = Duration::from_millis(1);

/// Settings of one load run.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    pub broker_host: String,
    pub broker_port: u16,
    /// Number of simulated devices.
    pub devices: usize,
    /// MQTT connections the devices are spread over, round robin. Each connection
    /// carries several device ids when there are fewer connections than devices.
    pub connections: usize,
    /// Device ids are `{device_prefix}-1` to `{device_prefix}-{devices}`.
    pub device_prefix: String,
    /// First topic levels, `fleet/v1` for the fleet server; a message goes to
    /// `{topic_prefix}/{device}/telemetry`.
    pub topic_prefix: String,
    /// Messages per second per device; 0 sends as fast as the broker accepts them.
    pub rate: f64,
    /// Messages each device sends; `None` sends until `duration` ends.
    pub messages_per_device: Option<u64>,
    /// Time limit of the sending phase. Sending stops when it ends even if devices
    /// have not sent `messages_per_device` yet.
    pub duration: Duration,
    pub encoding: Encoding,
    /// How long to wait for outstanding PubAcks after the last message was sent.
    pub ack_timeout: Duration,
    /// Seed of the simulated devices' profiles and measurements.
    pub seed: u64,
    /// Optional flow control that pauses sending while a consumer falls behind.
    pub throttle: Option<Throttle>,
}

impl LoadConfig {
    /// Returns a configuration for `devices` devices at `rate` messages per second each,
    /// sending for `duration`, with the defaults of the command line: the broker at
    /// 127.0.0.1:1883, at most [`DEFAULT_MAX_CONNECTIONS`] connections, postcard, and a
    /// 10 s wait for PubAcks.
    pub fn new(device_prefix: &str, devices: usize, rate: f64, duration: Duration) -> LoadConfig {
        LoadConfig {
            broker_host: "127.0.0.1".into(),
            broker_port: 1883,
            devices,
            connections: devices.clamp(1, DEFAULT_MAX_CONNECTIONS),
            device_prefix: device_prefix.into(),
            topic_prefix: fleet_wire::topic::PREFIX.into(),
            rate,
            messages_per_device: None,
            duration,
            encoding: Encoding::Postcard,
            ack_timeout: Duration::from_secs(10),
            seed: 1,
            throttle: None,
        }
    }

    /// Checks every value and every device id.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.devices == 0 {
            bail!("invalid device count 0: simulate at least one device");
        }
        if self.connections == 0 || self.connections > self.devices {
            bail!(
                "invalid connection count {}: expected 1 to the device count, {}",
                self.connections,
                self.devices
            );
        }
        if !(self.rate.is_finite() && self.rate >= 0.0) {
            bail!(
                "invalid rate {}: expected messages per second per device, 0 or more",
                self.rate
            );
        }
        if self.messages_per_device == Some(0) {
            bail!("invalid message count 0: send at least one message per device");
        }
        if self.duration.is_zero() {
            bail!("invalid duration 0: the sending phase needs a time limit");
        }
        if self.topic_prefix.is_empty()
            || self.topic_prefix.contains(['+', '#'])
            || self.topic_prefix.ends_with('/')
        {
            bail!(
                "invalid topic prefix {:?}: expected topic levels without wildcards or a trailing '/', such as fleet/v1",
                self.topic_prefix
            );
        }
        // The longest id is the last one; every shorter one uses the same characters.
        fleet_wire::topic::validate_device_id(&self.device_id(self.devices))
            .map_err(anyhow::Error::msg)
            .context("invalid device prefix")?;
        if let Some(throttle) = &self.throttle
            && throttle.max_unconsumed == 0
        {
            bail!("invalid throttle: max_unconsumed must be at least 1");
        }
        Ok(())
    }

    /// Returns the id of device `number`, counted from 1.
    pub fn device_id(&self, number: usize) -> String {
        format!("{}-{number}", self.device_prefix)
    }

    /// Time each message's counters cover: the time between a device's messages, or
    /// 1 s when sending is not paced, so message sizes do not depend on the send rate.
    pub fn report_interval(&self) -> Duration {
        if self.rate > 0.0 {
            Duration::from_secs_f64(1.0 / self.rate)
        } else {
            Duration::from_secs(1)
        }
    }
}

/// Flow control against a consumer's progress: a message is sent only while fewer than
/// `max_unconsumed` messages are sent but not yet counted by `consumed`.
///
/// It keeps a broker's queue for a slow subscriber from overflowing. Mosquitto 2.0, for
/// example, drops QoS 1 messages for a subscriber once 1,000 are queued for it
/// (`max_queued_messages`).
#[derive(Clone)]
pub struct Throttle {
    /// Messages the consumer has processed since the run started.
    pub consumed: Arc<dyn Fn() -> u64 + Send + Sync>,
    pub max_unconsumed: u64,
}

impl fmt::Debug for Throttle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Throttle")
            .field("consumed", &(self.consumed)())
            .field("max_unconsumed", &self.max_unconsumed)
            .finish()
    }
}

/// Messages one simulated device sent, numbered 1 to `sent`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceCount {
    pub device_id: String,
    pub sent: u64,
}

/// Results of a load run.
#[derive(Debug, Clone)]
pub struct LoadReport {
    /// Every device with the number of messages it sent.
    pub devices: Vec<DeviceCount>,
    /// Messages handed to the MQTT client.
    pub sent: u64,
    /// Messages the broker acknowledged with a PubAck.
    pub acknowledged: u64,
    /// Messages the configuration asked for, when it set a count per device.
    pub expected: Option<u64>,
    /// Payload bytes of the sent messages.
    pub payload_bytes: u64,
    /// Time from the start of sending to the last message sent.
    pub send_duration: Duration,
    /// Time from the start of sending to the last PubAck.
    pub ack_duration: Duration,
    /// Broker connections that failed after the first connect and were reopened.
    pub connection_errors: u64,
    /// Target rate of the whole fleet in messages per second; `None` when unpaced.
    pub target_rate: Option<f64>,
}

impl LoadReport {
    /// Messages sent per second over the sending phase.
    pub fn send_rate(&self) -> f64 {
        per_second(self.sent, self.send_duration)
    }

    /// PubAcks received per second, from the start of sending to the last one.
    pub fn ack_rate(&self) -> f64 {
        per_second(self.acknowledged, self.ack_duration)
    }

    /// Messages sent but not acknowledged by the broker before the ack timeout.
    pub fn unacknowledged(&self) -> u64 {
        self.sent.saturating_sub(self.acknowledged)
    }
}

fn per_second(count: u64, duration: Duration) -> f64 {
    if duration.is_zero() {
        return 0.0;
    }
    count as f64 / duration.as_secs_f64()
}

/// Runs the simulated fleet: opens every connection, sends until each device has sent
/// its messages or the duration ends, waits up to the ack timeout for outstanding
/// PubAcks, and disconnects.
///
/// Fails when the configuration is invalid or a connection cannot be opened. Later
/// connection failures are retried until the time limits and reported in
/// [`LoadReport::connection_errors`].
pub async fn run(config: LoadConfig) -> anyhow::Result<LoadReport> {
    config.validate()?;
    let plans = plan_connections(&config);
    let totals = Arc::new(Totals::default());
    let mut connections = Vec::with_capacity(plans.len());
    for plan in plans {
        connections.push(connection::Connection::open(&config, plan, totals.clone()));
    }
    for connection in &mut connections {
        connection.wait_connected().await.with_context(|| {
            format!(
                "failed to connect to the MQTT broker at {}:{}",
                config.broker_host, config.broker_port
            )
        })?;
    }
    tracing::info!(
        devices = config.devices,
        connections = connections.len(),
        rate = config.rate,
        broker = %format!("{}:{}", config.broker_host, config.broker_port),
        "load started"
    );

    let start = Instant::now();
    let stop_at = start + config.duration;
    let gate = config
        .throttle
        .clone()
        .map(|throttle| start_throttle(throttle, stop_at));
    let progress = tokio::spawn(log_progress(totals.clone()));
    let connection_count = connections.len();
    let mut tasks = Vec::with_capacity(connection_count);
    for (index, connection) in connections.into_iter().enumerate() {
        let schedule = Schedule::new(&config, index, connection_count, start);
        let permits = gate.as_ref().map(|(permits, _)| permits.clone());
        tasks.push(tokio::spawn(connection.run(
            schedule,
            stop_at,
            config.ack_timeout,
            permits,
            config.encoding,
        )));
    }

    let mut devices = Vec::with_capacity(config.devices);
    let mut outcome = connection::Outcome::default();
    for task in tasks {
        let finished = task.await.context("a connection task panicked")?;
        outcome.add(&finished);
        devices.extend(finished.devices);
    }
    progress.abort();
    if let Some((_, task)) = gate {
        task.abort();
    }
    devices.sort_by_key(|d| device_number(&d.device_id));

    let report = LoadReport {
        devices,
        sent: totals.sent.load(Ordering::Relaxed),
        acknowledged: totals.acknowledged.load(Ordering::Relaxed),
        expected: config
            .messages_per_device
            .map(|count| count * config.devices as u64),
        payload_bytes: outcome.payload_bytes,
        send_duration: outcome.last_sent.map_or(Duration::ZERO, |t| t - start),
        ack_duration: outcome
            .last_acknowledged
            .map_or(Duration::ZERO, |t| t - start),
        connection_errors: outcome.connection_errors,
        target_rate: (config.rate > 0.0).then_some(config.rate * config.devices as f64),
    };
    tracing::info!(
        sent = report.sent,
        acknowledged = report.acknowledged,
        "load finished"
    );
    Ok(report)
}

/// Parses the number after the last `-` of a device id, for sorting the report.
fn device_number(device_id: &str) -> u64 {
    device_id
        .rsplit_once('-')
        .and_then(|(_, number)| number.parse().ok())
        .unwrap_or(0)
}

/// Assigns device `n` (counted from 0) to connection `n % connections`, so connection
/// sizes differ by at most one.
fn plan_connections(config: &LoadConfig) -> Vec<ConnectionPlan> {
    let mut plans: Vec<ConnectionPlan> = connection::client_ids(config.connections)
        .into_iter()
        .map(|client_id| ConnectionPlan {
            client_id,
            devices: Vec::new(),
        })
        .collect();
    let interval = config.report_interval();
    for number in 1..=config.devices {
        let seed = config.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ number as u64;
        let device = SimulatedDevice::new(
            config.device_id(number),
            &config.topic_prefix,
            interval,
            seed,
        );
        plans[(number - 1) % config.connections]
            .devices
            .push(device);
    }
    plans
}

/// Send times of one connection's messages.
///
/// A connection with `k` devices at `rate` messages per second each sends one message
/// every `1 / (k * rate)` seconds, cycling through its devices. Connection `c` of `C`
/// starts `c / C` of that period late, so the connections interleave and the fleet
/// sends at an even pace instead of in bursts.
///
/// NOTE: a connection that falls behind, because the broker or this process is slow,
/// sends its overdue messages back to back until it catches up.
#[derive(Debug, Clone)]
pub(crate) struct Schedule {
    start: Instant,
    /// Seconds between messages of this connection; `None` when unpaced.
    period: Option<f64>,
    offset: f64,
    /// Messages this connection sends in total, when a count per device is set.
    limit: Option<u64>,
}

impl Schedule {
    fn new(config: &LoadConfig, index: usize, connections: usize, start: Instant) -> Schedule {
        let devices =
            config.devices / connections + usize::from(index < config.devices % connections);
        let period = (config.rate > 0.0).then(|| 1.0 / (devices as f64 * config.rate));
        Schedule {
            start,
            period,
            offset: period.map_or(0.0, |p| p * index as f64 / connections as f64),
            limit: config.messages_per_device.map(|m| m * devices as u64),
        }
    }

    /// Returns when message `index` of the connection is due; `None` when unpaced.
    pub(crate) fn due(&self, index: u64) -> Option<Instant> {
        let period = self.period?;
        Some(self.start + Duration::from_secs_f64(self.offset + index as f64 * period))
    }

    /// Returns whether the connection has sent every message requested of it.
    pub(crate) fn is_done(&self, sent: u64) -> bool {
        self.limit.is_some_and(|limit| sent >= limit)
    }
}

/// Starts the flow-control gate: a semaphore with `max_unconsumed` permits, to which a
/// task adds one permit for every message the consumer reports, until `stop_at`.
fn start_throttle(
    throttle: Throttle,
    stop_at: Instant,
) -> (Arc<Semaphore>, tokio::task::JoinHandle<()>) {
    let max_unconsumed = usize::try_from(throttle.max_unconsumed)
        .unwrap_or(Semaphore::MAX_PERMITS)
        .min(Semaphore::MAX_PERMITS);
    let permits = Arc::new(Semaphore::new(max_unconsumed));
    let gate = permits.clone();
    // Read the starting count before any message goes out; read inside the task, it
    // could already include consumed messages whose permits would then never return.
    let mut counted = (throttle.consumed)();
    let task = tokio::spawn(async move {
        let mut ticker = tokio::time::interval(THROTTLE_POLL_INTERVAL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while Instant::now() < stop_at {
            ticker.tick().await;
            let consumed = (throttle.consumed)();
            if consumed > counted {
                let added = usize::try_from(consumed - counted).unwrap_or(usize::MAX);
                gate.add_permits(added.min(Semaphore::MAX_PERMITS - gate.available_permits()));
                counted = consumed;
            }
        }
    });
    (permits, task)
}

async fn log_progress(totals: Arc<Totals>) {
    let mut ticker = tokio::time::interval(PROGRESS_INTERVAL);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        tracing::info!(
            sent = totals.sent.load(Ordering::Relaxed),
            acknowledged = totals.acknowledged.load(Ordering::Relaxed),
            "load progress"
        );
    }
}

/// Milliseconds since the Unix epoch, the clock simulated devices put in their messages.
pub fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(devices: usize, connections: usize) -> LoadConfig {
        let mut config = LoadConfig::new("pi", devices, 2.0, Duration::from_secs(1));
        config.connections = connections;
        config
    }

    #[test]
    fn every_device_is_on_one_connection() {
        let plans = plan_connections(&config(10, 3));
        let sizes: Vec<usize> = plans.iter().map(|p| p.devices.len()).collect();
        assert_eq!(sizes, [4, 3, 3]);
        let mut ids: Vec<String> = plans
            .iter()
            .flat_map(|p| p.devices.iter().map(|d| d.device_id().to_string()))
            .collect();
        ids.sort_by_key(|id| device_number(id));
        let expected: Vec<String> = (1..=10).map(|n| format!("pi-{n}")).collect();
        assert_eq!(ids, expected);
    }

    #[test]
    fn default_connections_are_capped() {
        assert_eq!(
            LoadConfig::new("pi", 7, 1.0, Duration::from_secs(1)).connections,
            7
        );
        assert_eq!(
            LoadConfig::new("pi", 10_000, 1.0, Duration::from_secs(1)).connections,
            DEFAULT_MAX_CONNECTIONS
        );
    }

    #[test]
    fn schedules_interleave_connections() {
        let start = Instant::now();
        let config = config(4, 2);
        // Each connection has 2 devices at 2 messages/s: one message every 250 ms,
        // and the second connection starts 125 ms after the first.
        let first = Schedule::new(&config, 0, 2, start);
        let second = Schedule::new(&config, 1, 2, start);
        let millis = |due: Option<Instant>| (due.unwrap() - start).as_secs_f64() * 1e3;
        assert!((millis(first.due(0)) - 0.0).abs() < 1e-6);
        assert!((millis(first.due(1)) - 250.0).abs() < 1e-6);
        assert!((millis(second.due(0)) - 125.0).abs() < 1e-6);
        assert!((millis(second.due(2)) - 625.0).abs() < 1e-6);
    }

    #[test]
    fn unpaced_schedule_has_no_due_times() {
        let mut config = config(4, 2);
        config.rate = 0.0;
        config.messages_per_device = Some(3);
        let schedule = Schedule::new(&config, 0, 2, Instant::now());
        assert_eq!(schedule.due(5), None);
        assert!(!schedule.is_done(5));
        assert!(schedule.is_done(6));
    }

    #[test]
    fn uneven_connections_send_their_own_share() {
        let mut config = config(5, 2);
        config.messages_per_device = Some(10);
        let start = Instant::now();
        assert!(Schedule::new(&config, 0, 2, start).is_done(30));
        assert!(!Schedule::new(&config, 0, 2, start).is_done(29));
        assert!(Schedule::new(&config, 1, 2, start).is_done(20));
    }

    #[test]
    fn validate_rejects_bad_values() {
        type Change = fn(&mut LoadConfig);
        let cases: [(&str, Change); 7] = [
            ("no devices", |c| c.devices = 0),
            ("too many connections", |c| c.connections = 11),
            ("negative rate", |c| c.rate = -1.0),
            ("zero messages", |c| c.messages_per_device = Some(0)),
            ("zero duration", |c| c.duration = Duration::ZERO),
            ("wildcard topic", |c| c.topic_prefix = "fleet/+".into()),
            ("slash in prefix", |c| c.device_prefix = "a/b".into()),
        ];
        for (name, change) in cases {
            let mut config = config(10, 2);
            change(&mut config);
            assert!(config.validate().is_err(), "{name} accepted");
        }
        assert!(config(10, 2).validate().is_ok());
    }

    #[test]
    fn report_interval_follows_rate() {
        assert_eq!(config(1, 1).report_interval(), Duration::from_millis(500));
        let mut unpaced = config(1, 1);
        unpaced.rate = 0.0;
        assert_eq!(unpaced.report_interval(), Duration::from_secs(1));
    }
}
