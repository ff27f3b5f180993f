//! One MQTT connection of the generator and the simulated devices that share it: a task
//! that polls the rumqttc event loop and counts PubAcks, and the send loop that paces
//! the devices' messages.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, anyhow};
use fleet_wire::Encoding;
use rumqttc::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS};
use tokio::sync::{Semaphore, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::{DeviceCount, LoadConfig, Schedule, SimulatedDevice};

/// How long the first connection attempt may take, including the broker's ConnAck.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Wait before reconnecting after the broker connection failed.
const RECONNECT_DELAY: Duration = Duration::from_secs(1);
/// Keepalive interval of each connection.
const KEEPALIVE: Duration = Duration::from_secs(30);
/// Publish requests the client queues before `publish` waits for the event loop.
const REQUEST_CAPACITY: usize = 64;
/// How often the end of the send loop checks whether every PubAck has arrived.
const ACK_POLL_INTERVAL: Duration = Duration::from_millis(5);
/// How long a connection may take to send its Disconnect and stop.
const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Runs of the generator in this process, so connections of consecutive runs get
/// distinct client ids.
static RUNS: AtomicU64 = AtomicU64::new(0);

/// Returns the client ids of one run's connections: unique per process and per run,
/// because a broker closes an existing session when a second client uses its id.
pub(crate) fn client_ids(connections: usize) -> Vec<String> {
    let run = RUNS.fetch_add(1, Ordering::Relaxed);
    let pid = std::process::id();
    (0..connections)
        .map(|index| format!("fleet-loadgen-{pid}-{run}-{index}"))
        .collect()
}

/// The devices assigned to one connection.
#[derive(Debug)]
pub(crate) struct ConnectionPlan {
    pub client_id: String,
    pub devices: Vec<SimulatedDevice>,
}

/// Counters of a whole run, summed over its connections.
#[derive(Debug, Default)]
pub(crate) struct Totals {
    pub sent: AtomicU64,
    pub acknowledged: AtomicU64,
}

/// Counters and times that one connection's event loop task records.
#[derive(Debug, Default)]
struct ConnectionState {
    acknowledged: AtomicU64,
    last_acknowledged: Mutex<Option<Instant>>,
    connection_errors: AtomicU64,
    /// Set once sending and the wait for PubAcks are over, so a failing connection is
    /// no longer reopened.
    finished: AtomicBool,
}

/// Results of one connection.
#[derive(Debug)]
pub(crate) struct Finished {
    pub devices: Vec<DeviceCount>,
    pub payload_bytes: u64,
    pub last_sent: Option<Instant>,
    pub last_acknowledged: Option<Instant>,
    pub connection_errors: u64,
}

/// Results of all connections of a run.
#[derive(Debug, Default)]
pub(crate) struct Outcome {
    pub payload_bytes: u64,
    pub last_sent: Option<Instant>,
    pub last_acknowledged: Option<Instant>,
    pub connection_errors: u64,
}

impl Outcome {
    pub(crate) fn add(&mut self, finished: &Finished) {
        self.payload_bytes += finished.payload_bytes;
        self.last_sent = self.last_sent.max(finished.last_sent);
        self.last_acknowledged = self.last_acknowledged.max(finished.last_acknowledged);
        self.connection_errors += finished.connection_errors;
    }
}

/// An open MQTT connection with its devices, before sending starts.
#[derive(Debug)]
pub(crate) struct Connection {
    client_id: String,
    client: AsyncClient,
    devices: Vec<SimulatedDevice>,
    state: Arc<ConnectionState>,
    totals: Arc<Totals>,
    connected: Option<oneshot::Receiver<Result<(), ConnectionError>>>,
    eventloop: Option<JoinHandle<()>>,
}

impl Connection {
    /// Creates the client and starts polling its event loop, which connects.
    pub(crate) fn open(
        config: &LoadConfig,
        plan: ConnectionPlan,
        totals: Arc<Totals>,
    ) -> Connection {
        let mut options = MqttOptions::new(
            plan.client_id.clone(),
            config.broker_host.clone(),
            config.broker_port,
        );
        options.set_keep_alive(KEEPALIVE);
        options.set_max_packet_size(
            fleet_wire::MAX_PAYLOAD_BYTES + 1024,
            fleet_wire::MAX_PAYLOAD_BYTES + 1024,
        );
        let (client, eventloop) = AsyncClient::new(options, REQUEST_CAPACITY);
        let state = Arc::new(ConnectionState::default());
        let (connected_tx, connected_rx) = oneshot::channel();
        let task = tokio::spawn(drive(
            eventloop,
            plan.client_id.clone(),
            state.clone(),
            totals.clone(),
            connected_tx,
        ));
        Connection {
            client_id: plan.client_id,
            client,
            devices: plan.devices,
            state,
            totals,
            connected: Some(connected_rx),
            eventloop: Some(task),
        }
    }

    /// Waits for the broker's ConnAck, or returns the error of the first attempt.
    pub(crate) async fn wait_connected(&mut self) -> anyhow::Result<()> {
        let Some(connected) = self.connected.take() else {
            return Ok(());
        };
        let result = tokio::time::timeout(CONNECT_TIMEOUT, connected)
            .await
            .map_err(|_| {
                anyhow!(
                    "client {} got no ConnAck within {} s",
                    self.client_id,
                    CONNECT_TIMEOUT.as_secs()
                )
            })?
            .map_err(|_| anyhow!("the event loop of client {} stopped", self.client_id))?;
        result.with_context(|| format!("client {} failed to connect", self.client_id))
    }

    /// Sends the devices' messages on `schedule` until each has sent its share or
    /// `stop_at` passes, waits up to `ack_timeout` for the outstanding PubAcks, and
    /// disconnects.
    ///
    /// With `permits`, each message first takes one permit, which the flow-control
    /// gate hands out as the consumer catches up.
    pub(crate) async fn run(
        mut self,
        schedule: Schedule,
        stop_at: Instant,
        ack_timeout: Duration,
        permits: Option<Arc<Semaphore>>,
        encoding: Encoding,
    ) -> Finished {
        let device_count = self.devices.len() as u64;
        let mut sent = 0u64;
        let mut payload_bytes = 0u64;
        let mut last_sent = None;
        while !schedule.is_done(sent) {
            match schedule.due(sent) {
                Some(due) if due >= stop_at => break,
                Some(due) => tokio::time::sleep_until(due).await,
                None if Instant::now() >= stop_at => break,
                None => {}
            }
            if let Some(permits) = &permits {
                match tokio::time::timeout_at(stop_at, permits.acquire()).await {
                    Ok(Ok(permit)) => permit.forget(),
                    _ => break,
                }
            }
            let device = &mut self.devices[(sent % device_count) as usize];
            let telemetry = device.next_telemetry(crate::unix_millis());
            let payload = match fleet_wire::encode(&telemetry, encoding) {
                Ok(payload) => payload,
                Err(error) => {
                    tracing::error!(%error, device_id = device.device_id(), "telemetry could not be encoded");
                    break;
                }
            };
            let bytes = payload.len() as u64;
            let publish = self
                .client
                .publish(device.topic(), QoS::AtLeastOnce, false, payload);
            match tokio::time::timeout_at(stop_at, publish).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => {
                    tracing::error!(%error, client_id = %self.client_id, "the MQTT client stopped; this connection sends no more");
                    break;
                }
                // The client's queue stayed full until the end of the run.
                Err(_) => break,
            }
            device.mark_sent();
            sent += 1;
            payload_bytes += bytes;
            last_sent = Some(Instant::now());
            self.totals.sent.fetch_add(1, Ordering::Relaxed);
        }

        let ack_deadline = Instant::now() + ack_timeout;
        while self.state.acknowledged.load(Ordering::Relaxed) < sent
            && Instant::now() < ack_deadline
        {
            tokio::time::sleep(ACK_POLL_INTERVAL).await;
        }
        self.state.finished.store(true, Ordering::Relaxed);
        self.disconnect().await;

        Finished {
            devices: self
                .devices
                .iter()
                .map(|device| DeviceCount {
                    device_id: device.device_id().to_string(),
                    sent: device.sent(),
                })
                .collect(),
            payload_bytes,
            last_sent,
            last_acknowledged: *self
                .state
                .last_acknowledged
                .lock()
                .expect("no thread panics while holding the lock"),
            connection_errors: self.state.connection_errors.load(Ordering::Relaxed),
        }
    }

    /// Queues a Disconnect and waits for the event loop to send it, aborting the loop
    /// when it does not stop in time.
    async fn disconnect(&mut self) {
        let queued = tokio::time::timeout(DISCONNECT_TIMEOUT, self.client.disconnect()).await;
        if !matches!(queued, Ok(Ok(()))) {
            tracing::debug!(client_id = %self.client_id, "disconnect not queued");
        }
        if let Some(mut task) = self.eventloop.take()
            && tokio::time::timeout(DISCONNECT_TIMEOUT, &mut task)
                .await
                .is_err()
        {
            tracing::warn!(client_id = %self.client_id, "connection did not close in time and was aborted");
            task.abort();
        }
    }
}

impl Drop for Connection {
    /// Stops the event loop of a connection that never ran, such as when another
    /// connection of the run failed to connect.
    fn drop(&mut self) {
        if let Some(task) = self.eventloop.take() {
            task.abort();
        }
    }
}

/// Polls the event loop: reports the first connection result, counts PubAcks, and
/// reconnects after failures until the connection is finished or disconnected.
async fn drive(
    mut eventloop: EventLoop,
    client_id: String,
    state: Arc<ConnectionState>,
    totals: Arc<Totals>,
    connected: oneshot::Sender<Result<(), ConnectionError>>,
) {
    let mut connected = Some(connected);
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                if let Some(connected) = connected.take() {
                    let _ = connected.send(Ok(()));
                } else {
                    tracing::info!(%client_id, "reconnected to the broker");
                }
            }
            Ok(Event::Incoming(Packet::PubAck(_))) => {
                state.acknowledged.fetch_add(1, Ordering::Relaxed);
                totals.acknowledged.fetch_add(1, Ordering::Relaxed);
                *state
                    .last_acknowledged
                    .lock()
                    .expect("no thread panics while holding the lock") = Some(Instant::now());
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => break,
            Ok(_) => {}
            Err(error) => {
                if let Some(connected) = connected.take() {
                    let _ = connected.send(Err(error));
                    break;
                }
                if state.finished.load(Ordering::Relaxed) {
                    break;
                }
                let errors = state.connection_errors.fetch_add(1, Ordering::Relaxed) + 1;
                // The first failures and then every tenth, so an outage does not flood
                // the log.
                if errors <= 3 || errors.is_multiple_of(10) {
                    tracing::warn!(%client_id, %error, errors, "broker connection failed, reconnecting in 1 s");
                }
                tokio::time::sleep(RECONNECT_DELAY).await;
            }
        }
    }
}
