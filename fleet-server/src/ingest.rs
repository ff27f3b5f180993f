//! MQTT ingestion: subscribes to every device's telemetry, status and update events,
//! decodes them and writes them in batches. Each QoS 1 message is acknowledged only after
//! its batch has committed, so a server that dies mid-batch loses nothing the broker will
//! not send again.
//!
//! The first connection's client also publishes install and configuration commands,
//! and each status that turns a device online is passed on so the commands it missed
//! are sent again.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use fleet_wire::{DeviceState, EventKind, Status, topic};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, Publish, QoS};
use tokio::sync::{mpsc, watch};
use tracing::Instrument;

use crate::metrics::{CLOCK_SKEW_LIMIT_MS, Outcome, ServerMetrics};
use crate::store::remote_config::ReceivedConfigAck;
use crate::store::updates::ReceivedEvent;
use crate::store::{Received, Record, Store};

/// Largest number of messages written in one transaction.
pub const MAX_BATCH: usize = 512;
/// Yields without a new message after which a batch stops waiting for the rest of a
/// burst.
const BURST_IDLE_YIELDS: u32 = 2;
/// Messages decoded but not yet written; when full, reading from the broker pauses.
const QUEUE_CAPACITY: usize = 4096;
/// First and largest wait between reconnection attempts to the broker.
const RECONNECT_DELAY_MIN: Duration = Duration::from_secs(1);
const RECONNECT_DELAY_MAX: Duration = Duration::from_secs(30);

/// Address of the broker the ingester subscribes to.
#[derive(Clone)]
pub struct BrokerAddress {
    pub host: String,
    pub port: u16,
    /// TCP, or TLS with its certificates already loaded.
    pub transport: rumqttc::Transport,
}

/// Session settings of the ingester on the broker.
#[derive(Debug, Clone)]
pub struct IngestOptions {
    /// MQTT client id. The broker keeps this client's session (subscriptions and
    /// unacknowledged QoS 1 messages) while it is away, so a restarted server with the
    /// same id receives what it missed. Two running servers must not share an id.
    pub client_id: String,
    /// Shared-subscription group: servers in the same group split the telemetry
    /// between them through `$share/GROUP/...` subscriptions.
    pub shared_group: Option<String>,
    /// Discard the broker session on disconnect instead of resuming it.
    pub clean_session: bool,
    pub credentials: Option<fleet_wire::MqttCredentials>,
    /// Broker connections that receive telemetry, at least 1. A broker sends each
    /// connection only a few unacknowledged QoS 1 messages at a time (Mosquitto's
    /// `max_inflight_messages`, 20 by default), and nothing is acknowledged before its
    /// batch commits, so one connection caps a batch at that many messages. Several
    /// connections in one shared-subscription group multiply the window.
    pub connections: usize,
}

/// Started ingestion.
#[derive(Debug)]
pub struct Ingest {
    pub tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Client of the first connection, for publishing commands.
    pub commands: AsyncClient,
}

/// Starts the MQTT connections and the writer; all run until `shutdown` turns true.
/// The writer sends the id of each device whose status turns online to `online`.
pub fn spawn(
    broker: BrokerAddress,
    ingest: IngestOptions,
    store: Store,
    metrics: Arc<ServerMetrics>,
    online: mpsc::UnboundedSender<String>,
    shutdown: watch::Receiver<bool>,
) -> Ingest {
    let connections = ingest.connections.max(1);
    // Connections of one server split the telemetry through a shared subscription;
    // servers in a configured group share it with each other as well.
    let shared_group = match (&ingest.shared_group, connections) {
        (Some(group), _) => Some(group.clone()),
        (None, 1) => None,
        (None, _) => Some(ingest.client_id.clone()),
    };
    let connected: Arc<[AtomicBool]> = (0..connections).map(|_| AtomicBool::new(false)).collect();
    let (queue_tx, queue_rx) = mpsc::channel(QUEUE_CAPACITY);
    let mut clients = Vec::with_capacity(connections);
    let mut acks = Vec::with_capacity(connections);
    let mut ack_tasks = Vec::with_capacity(connections);
    let mut tasks = Vec::with_capacity(2 * connections + 1);
    for index in 0..connections {
        // The first connection keeps the plain client id, so a server that had one
        // connection resumes its session after an upgrade.
        let client_id = match index {
            0 => ingest.client_id.clone(),
            _ => format!("{}-{index}", ingest.client_id),
        };
        let mut options = MqttOptions::new(client_id, broker.host.clone(), broker.port);
        options.set_transport(broker.transport.clone());
        options.set_keep_alive(Duration::from_secs(15));
        options.set_manual_acks(true);
        options.set_clean_session(ingest.clean_session);
        if let Some(credentials) = &ingest.credentials {
            options.set_credentials(credentials.username.clone(), credentials.password.clone());
        }
        options.set_max_packet_size(
            fleet_wire::MAX_PAYLOAD_BYTES + 1024,
            fleet_wire::MAX_PAYLOAD_BYTES + 1024,
        );
        let (client, eventloop) = AsyncClient::new(options, 1024);
        clients.push(client.clone());
        let (ack_tx, ack_rx) = mpsc::unbounded_channel();
        acks.push(ack_tx);
        ack_tasks.push(tokio::spawn(send_acks(client.clone(), index, ack_rx)));
        let connection = Connection {
            index,
            client,
            broker: format!("{}:{}", broker.host, broker.port),
            shared_group: shared_group.clone(),
            connected: connected.clone(),
        };
        tasks.push(tokio::spawn(read_broker(
            eventloop,
            connection,
            queue_tx.clone(),
            metrics.clone(),
            shutdown.clone(),
        )));
    }
    let commands = clients[0].clone();
    let writer = Writer {
        acks,
        store,
        metrics,
        online,
    };
    tasks.push(tokio::spawn(write_batches(queue_rx, writer)));
    // Shutdown waits for the tasks in this order, so each acknowledgement task's wait
    // starts once the writer has queued its last acknowledgement.
    tasks.extend(ack_tasks);
    Ingest { tasks, commands }
}

/// One of the ingester's broker connections.
struct Connection {
    /// Position among the connections; only the first subscribes to status.
    index: usize,
    client: AsyncClient,
    /// `HOST:PORT` of the broker, for logs.
    broker: String,
    shared_group: Option<String>,
    /// Whether each connection is up; the server counts as connected when all are.
    connected: Arc<[AtomicBool]>,
}

impl Connection {
    fn set_connected(&self, up: bool, metrics: &ServerMetrics) {
        self.connected[self.index].store(up, Ordering::SeqCst);
        let all = self
            .connected
            .iter()
            .all(|flag| flag.load(Ordering::SeqCst));
        metrics.broker_connected.set(i64::from(all));
    }
}

/// A decoded message to store.
enum Message {
    /// Telemetry or status, written in batches.
    Record(Record),
    /// An update event, written one at a time after its batch.
    Event(ReceivedEvent),
    /// A configuration acknowledgement, written one at a time after its batch.
    ConfigAck(ReceivedConfigAck),
}

/// A received message waiting for its batch, with the packet to acknowledge.
///
/// Every publish, including ones that are dropped, goes through the same queue, because
/// MQTT 3.1.1 requires QoS 1 acknowledgements in the order the messages arrived.
struct Pending {
    message: Option<Message>,
    publish: Publish,
    /// Index of the connection that received it, which must acknowledge it.
    connection: usize,
}

async fn read_broker(
    mut eventloop: EventLoop,
    connection: Connection,
    queue: mpsc::Sender<Pending>,
    metrics: Arc<ServerMetrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut reconnect_delay = RECONNECT_DELAY_MIN;
    let mut failures = 0u64;
    loop {
        let event = tokio::select! {
            event = eventloop.poll() => event,
            _ = shutdown.changed() => break,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                tracing::info!(
                    connection = connection.index,
                    session_present = ack.session_present,
                    "ingest connected to broker"
                );
                connection.set_connected(true, &metrics);
                reconnect_delay = RECONNECT_DELAY_MIN;
                failures = 0;
                subscribe(&connection).await;
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                let message = decode(&publish, &metrics);
                metrics.queue_depth.inc();
                let pending = Pending {
                    message,
                    publish,
                    connection: connection.index,
                };
                if queue.send(pending).await.is_err() {
                    tracing::error!("telemetry writer stopped; message left unacknowledged");
                }
            }
            Ok(_) => {}
            Err(error) => {
                connection.set_connected(false, &metrics);
                failures += 1;
                // Log the first failures and then every tenth, so a long outage does not
                // flood the log.
                if failures <= 3 || failures.is_multiple_of(10) {
                    tracing::warn!(
                        %error,
                        broker = %connection.broker,
                        connection = connection.index,
                        failures,
                        retry_in_ms = reconnect_delay.as_millis() as u64,
                        "ingest cannot reach the broker, retrying"
                    );
                }
                tokio::select! {
                    _ = tokio::time::sleep(reconnect_delay) => {}
                    _ = shutdown.changed() => break,
                }
                reconnect_delay = (reconnect_delay * 2).min(RECONNECT_DELAY_MAX);
            }
        }
    }
    let _ = connection.client.try_disconnect();
}

/// Subscribes to telemetry and update events, through the shared group when there is
/// one, and, on the first connection only, to status.
///
/// Status stays an ordinary subscription: brokers do not send retained messages to
/// shared subscriptions, and every replica applying every status change is harmless.
async fn subscribe(connection: &Connection) {
    let shared = |filter: String| match &connection.shared_group {
        Some(group) => format!("$share/{group}/{filter}"),
        None => filter,
    };
    let mut filters = vec![
        shared(topic::all_devices(topic::TopicKind::Telemetry)),
        shared(topic::all_devices(topic::TopicKind::Events)),
    ];
    if connection.index == 0 {
        filters.push(topic::all_devices(topic::TopicKind::Status));
    }
    for filter in filters {
        if let Err(error) = connection.client.subscribe(&filter, QoS::AtLeastOnce).await {
            tracing::error!(%error, %filter, "subscribe failed");
        }
    }
}

/// Turns a publish into a message to store, or `None` for messages that are dropped
/// (counted and logged) or carry nothing to store.
fn decode(publish: &Publish, metrics: &ServerMetrics) -> Option<Message> {
    let received_ms = crate::unix_millis();
    let Some((device_id, kind)) = topic::parse(&publish.topic) else {
        reject(metrics, publish, "not a fleet topic");
        return None;
    };
    match kind {
        topic::TopicKind::Telemetry => match fleet_wire::decode_telemetry(&publish.payload) {
            Ok(telemetry) if telemetry.device_id == device_id => {
                record_lag(metrics, telemetry.device_time_ms, received_ms);
                // NOTE: a message the broker delivers twice is counted twice here, while
                // the store keeps it once.
                metrics.count_fallbacks(&telemetry.fallback);
                Some(Message::Record(Record::Telemetry(Received {
                    telemetry,
                    received_ms,
                })))
            }
            Ok(telemetry) => {
                let reason = format!("payload names device {:?}", telemetry.device_id);
                reject(metrics, publish, &reason);
                None
            }
            Err(error) => {
                reject(metrics, publish, &error.to_string());
                None
            }
        },
        // An empty retained payload only clears the retained message.
        topic::TopicKind::Status if publish.payload.is_empty() => None,
        topic::TopicKind::Status => match fleet_wire::decode::<Status>(&publish.payload) {
            Ok(status) if status.device_id == device_id => Some(Message::Record(Record::Status {
                status,
                received_ms,
            })),
            Ok(status) => {
                let reason = format!("payload names device {:?}", status.device_id);
                reject(metrics, publish, &reason);
                None
            }
            Err(error) => {
                reject(metrics, publish, &error.to_string());
                None
            }
        },
        topic::TopicKind::Events => decode_event(publish, device_id, received_ms, metrics),
        topic::TopicKind::Command => None,
    }
}

/// Turns an update event or a configuration acknowledgement into a message to store, or
/// `None` when it is dropped.
fn decode_event(
    publish: &Publish,
    device_id: &str,
    received_ms: u64,
    metrics: &ServerMetrics,
) -> Option<Message> {
    let event = match fleet_wire::decode::<fleet_wire::Event>(&publish.payload) {
        Ok(event) => event,
        Err(error) => {
            reject(metrics, publish, &error.to_string());
            return None;
        }
    };
    if event.device_id != device_id {
        let reason = format!("payload names device {:?}", event.device_id);
        reject(metrics, publish, &reason);
        return None;
    }
    match event.kind {
        EventKind::Update(update) => Some(Message::Event(ReceivedEvent {
            device_id: event.device_id,
            device_time_ms: event.device_time_ms,
            received_ms,
            event: update,
        })),
        EventKind::Config(ack) => Some(Message::ConfigAck(ReceivedConfigAck {
            device_id: event.device_id,
            device_time_ms: event.device_time_ms,
            received_ms,
            ack,
        })),
    }
}

/// Observes how late a message arrived by the device's clock and counts a skewed clock.
fn record_lag(metrics: &ServerMetrics, device_time_ms: u64, received_ms: u64) {
    let lag_ms = received_ms as i64 - device_time_ms as i64;
    metrics
        .ingest_lag_seconds
        .observe(lag_ms.max(0) as f64 / 1000.0);
    if lag_ms.abs() > CLOCK_SKEW_LIMIT_MS {
        metrics.clock_skewed.inc();
    }
}

/// Counts a dropped message and logs it, at most one line per 100 rejections after
/// the first ten.
fn reject(metrics: &ServerMetrics, publish: &Publish, reason: &str) {
    metrics.count(Outcome::Rejected, 1);
    let count = metrics.total(Outcome::Rejected);
    if count <= 10 || count.is_multiple_of(100) {
        tracing::warn!(
            topic = %publish.topic,
            bytes = publish.payload.len(),
            reason,
            rejected_total = count,
            "message dropped"
        );
    }
}

/// State of the writer besides its queue.
struct Writer {
    /// Acknowledgement queues of the connections, by index.
    acks: Vec<mpsc::UnboundedSender<Publish>>,
    store: Store,
    metrics: Arc<ServerMetrics>,
    /// Receives the id of each device whose status turned online.
    online: mpsc::UnboundedSender<String>,
}

/// Writes queued messages in batches and then queues the acknowledgement of each for
/// the connection that received it, in arrival order.
async fn write_batches(mut queue: mpsc::Receiver<Pending>, writer: Writer) {
    let mut batch: Vec<Pending> = Vec::with_capacity(MAX_BATCH);
    while queue.recv_many(&mut batch, MAX_BATCH).await > 0 {
        gather_burst(&mut queue, &mut batch).await;
        // Moved out rather than cloned: only the publish is needed for the acknowledgement.
        let mut records = Vec::with_capacity(batch.len());
        let mut events = Vec::new();
        let mut config_acks = Vec::new();
        for message in batch.iter_mut().filter_map(|p| p.message.take()) {
            match message {
                Message::Record(record) => records.push(record),
                Message::Event(event) => events.push(event),
                Message::ConfigAck(ack) => config_acks.push(ack),
            }
        }
        if !records.is_empty() {
            write_records(&writer, &records).await;
        }
        for event in &events {
            write_event(&writer, event).await;
        }
        for ack in &config_acks {
            write_config_ack(&writer, ack).await;
        }
        for record in &records {
            if let Record::Status { status, .. } = record
                && status.state == DeviceState::Online
            {
                // The receiver lives as long as the server; after shutdown, nothing is
                // left to resend.
                let _ = writer.online.send(status.device_id.clone());
            }
        }

        writer.metrics.queue_depth.dec_by(batch.len() as i64);
        for pending in batch.drain(..) {
            // The acknowledgement task outlives this writer unless shutdown aborted it.
            // A message left unacknowledged then comes again from the broker.
            let _ = writer.acks[pending.connection].send(pending.publish);
        }
    }
}

/// Sends the acknowledgements the writer queues for one connection, in order.
///
/// Sending one waits for room in the client's request channel, which only the
/// connection's reading task empties. That task in turn waits for room in the writer's
/// queue whenever the broker delivers faster than the store commits. A writer that sent
/// acknowledgements itself would then wait on its own queue, and ingestion would stop.
async fn send_acks(
    client: AsyncClient,
    connection: usize,
    mut acks: mpsc::UnboundedReceiver<Publish>,
) {
    while let Some(publish) = acks.recv().await {
        if let Err(error) = client.ack(&publish).await {
            tracing::warn!(%error, connection, topic = %publish.topic, "acknowledgement not sent");
        }
    }
}

/// Adds to `batch` the messages that arrive right behind it. After a batch is
/// acknowledged the broker sends the next messages in one burst, microseconds apart, and
/// the writer wakes at the first. Yielding lets the connection tasks queue the rest, so
/// they share one transaction instead of costing one each. Two yields in a row that
/// bring nothing end the wait.
async fn gather_burst(queue: &mut mpsc::Receiver<Pending>, batch: &mut Vec<Pending>) {
    let mut idle_yields = 0;
    while batch.len() < MAX_BATCH && idle_yields < BURST_IDLE_YIELDS {
        tokio::task::yield_now().await;
        let before = batch.len();
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(pending) => batch.push(pending),
                Err(_) => break,
            }
        }
        idle_yields = if batch.len() == before {
            idle_yields + 1
        } else {
            0
        };
    }
}

/// Writes telemetry and status records in one transaction, retrying until it commits.
async fn write_records(writer: &Writer, records: &[Record]) {
    let metrics = &writer.metrics;
    let span = tracing::info_span!("ingest_batch", records = records.len());
    loop {
        let started = Instant::now();
        match writer
            .store
            .apply_batch(records)
            .instrument(span.clone())
            .await
        {
            Ok(outcome) => {
                metrics
                    .batch_seconds
                    .observe(started.elapsed().as_secs_f64());
                metrics.count(Outcome::Stored, outcome.stored as u64);
                metrics.count(Outcome::Duplicate, outcome.duplicates as u64);
                tracing::debug!(
                    stored = outcome.stored,
                    duplicates = outcome.duplicates,
                    "batch committed"
                );
                return;
            }
            Err(error) => {
                // Nothing is acknowledged until the write succeeds, so retrying keeps
                // every message; the broker holds back new ones meanwhile.
                metrics.write_errors.inc();
                tracing::error!(
                    error = format!("{:#}", anyhow::Error::from(error)),
                    records = records.len(),
                    "batch not stored, retrying"
                );
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Runs `write` until it commits, counting each failure and logging it with `on_error`,
/// as [`write_records`] does for batches.
async fn until_stored<T, F, Fut>(writer: &Writer, mut write: F, on_error: impl Fn(&str)) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, crate::store::StoreError>>,
{
    loop {
        match write().await {
            Ok(value) => return value,
            Err(error) => {
                writer.metrics.write_errors.inc();
                on_error(&format!("{:#}", anyhow::Error::from(error)));
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Stores one update event, retrying until it commits.
async fn write_event(writer: &Writer, received: &ReceivedEvent) {
    let event = &received.event;
    let outcome = until_stored(
        writer,
        || writer.store.record_update_event(received),
        |error| {
            tracing::error!(
                error,
                device_id = %received.device_id,
                update_id = %event.update_id,
                "update event not stored, retrying"
            )
        },
    )
    .await;
    writer.metrics.updates.count_event(outcome);
    tracing::info!(
        device_id = %received.device_id,
        update_id = %event.update_id,
        stage = event.stage.as_str(),
        ?outcome,
        detail = %event.detail,
        "update event stored"
    );
}

/// Stores one configuration acknowledgement, retrying until it commits.
async fn write_config_ack(writer: &Writer, received: &ReceivedConfigAck) {
    let ack = &received.ack;
    let outcome = until_stored(
        writer,
        || writer.store.record_config_ack(received),
        |error| {
            tracing::error!(
                error,
                device_id = %received.device_id,
                change_id = %ack.change_id,
                "configuration acknowledgement not stored, retrying"
            )
        },
    )
    .await;
    writer.metrics.remote_config.count_ack(outcome);
    tracing::info!(
        device_id = %received.device_id,
        change_id = %ack.change_id,
        applied = ack.applied,
        ?outcome,
        detail = %ack.detail,
        "configuration acknowledgement stored"
    );
}
