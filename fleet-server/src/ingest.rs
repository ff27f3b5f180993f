//! MQTT ingestion: subscribes to every device's telemetry and status, decodes them and
//! writes them in batches. Each QoS 1 message is acknowledged only after its batch has
//! committed, so a server that dies mid-batch loses nothing the broker will not send
//! again.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use fleet_wire::{Status, Telemetry, topic};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, Publish, QoS};
use tokio::sync::{mpsc, watch};

use crate::store::{Received, Record, Store};

/// Largest number of messages written in one transaction.
const MAX_BATCH: usize = 512;
/// Messages decoded but not yet written; when full, reading from the broker pauses.
const QUEUE_CAPACITY: usize = 4096;
/// Wait between reconnection attempts to the broker.
const RECONNECT_DELAY: Duration = Duration::from_secs(1);

/// Counters exposed by the API.
#[derive(Debug, Default)]
pub struct IngestCounters {
    pub stored: AtomicU64,
    pub duplicates: AtomicU64,
    /// Messages that could not be decoded or did not match their topic.
    pub rejected: AtomicU64,
    pub write_errors: AtomicU64,
}

/// Address of the broker the ingester subscribes to.
#[derive(Debug, Clone)]
pub struct BrokerAddress {
    pub host: String,
    pub port: u16,
}

/// Starts the MQTT client and the writer; both run until `shutdown` turns true.
pub fn spawn(
    broker: BrokerAddress,
    store: Store,
    counters: Arc<IngestCounters>,
    shutdown: watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let client_id = format!(
        "fleet-server-{}-{}",
        std::process::id(),
        crate::unix_millis() % 100_000
    );
    let mut options = MqttOptions::new(client_id, broker.host, broker.port);
    options.set_keep_alive(Duration::from_secs(15));
    options.set_manual_acks(true);
    options.set_max_packet_size(
        fleet_wire::MAX_PAYLOAD_BYTES + 1024,
        fleet_wire::MAX_PAYLOAD_BYTES + 1024,
    );
    let (client, eventloop) = AsyncClient::new(options, 1024);
    let (queue_tx, queue_rx) = mpsc::channel(QUEUE_CAPACITY);
    vec![
        tokio::spawn(read_broker(
            eventloop,
            client.clone(),
            queue_tx,
            counters.clone(),
            shutdown,
        )),
        tokio::spawn(write_batches(queue_rx, client, store, counters)),
    ]
}

/// A received message waiting for its batch, with the packet to acknowledge.
///
/// Every publish, including ones that are dropped, goes through the same queue, because
/// MQTT 3.1.1 requires QoS 1 acknowledgements in the order the messages arrived.
struct Pending {
    record: Option<Record>,
    publish: Publish,
}

async fn read_broker(
    mut eventloop: EventLoop,
    client: AsyncClient,
    queue: mpsc::Sender<Pending>,
    counters: Arc<IngestCounters>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let event = tokio::select! {
            event = eventloop.poll() => event,
            _ = shutdown.changed() => break,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                tracing::info!("ingest connected to broker");
                subscribe(&client).await;
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                let record = decode(&publish, &counters);
                if queue.send(Pending { record, publish }).await.is_err() {
                    tracing::error!("telemetry writer stopped; message left unacknowledged");
                }
            }
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(%error, "ingest lost the broker, reconnecting");
                tokio::time::sleep(RECONNECT_DELAY).await;
            }
        }
    }
    let _ = client.try_disconnect();
}

async fn subscribe(client: &AsyncClient) {
    for kind in [topic::TopicKind::Telemetry, topic::TopicKind::Status] {
        let filter = topic::all_devices(kind);
        if let Err(error) = client.subscribe(&filter, QoS::AtLeastOnce).await {
            tracing::error!(%error, %filter, "subscribe failed");
        }
    }
}

/// Turns a publish into a store record, or `None` for messages that are dropped
/// (counted and logged) or carry nothing to store.
fn decode(publish: &Publish, counters: &IngestCounters) -> Option<Record> {
    let received_ms = crate::unix_millis();
    let Some((device_id, kind)) = topic::parse(&publish.topic) else {
        reject(counters, publish, "not a fleet topic");
        return None;
    };
    match kind {
        topic::TopicKind::Telemetry => match fleet_wire::decode::<Telemetry>(&publish.payload) {
            Ok(telemetry) if telemetry.device_id == device_id => {
                Some(Record::Telemetry(Received {
                    telemetry,
                    received_ms,
                }))
            }
            Ok(telemetry) => {
                let reason = format!("payload names device {:?}", telemetry.device_id);
                reject(counters, publish, &reason);
                None
            }
            Err(error) => {
                reject(counters, publish, &error.to_string());
                None
            }
        },
        // An empty retained payload only clears the retained message.
        topic::TopicKind::Status if publish.payload.is_empty() => None,
        topic::TopicKind::Status => match fleet_wire::decode::<Status>(&publish.payload) {
            Ok(status) if status.device_id == device_id => Some(Record::Status {
                status,
                received_ms,
            }),
            Ok(status) => {
                let reason = format!("payload names device {:?}", status.device_id);
                reject(counters, publish, &reason);
                None
            }
            Err(error) => {
                reject(counters, publish, &error.to_string());
                None
            }
        },
        topic::TopicKind::Events | topic::TopicKind::Command => None,
    }
}

/// Counts a dropped message and logs it, at most one line per 100 rejections after
/// the first ten.
fn reject(counters: &IngestCounters, publish: &Publish, reason: &str) {
    let count = counters.rejected.fetch_add(1, Ordering::Relaxed) + 1;
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

async fn write_batches(
    mut queue: mpsc::Receiver<Pending>,
    client: AsyncClient,
    store: Store,
    counters: Arc<IngestCounters>,
) {
    let mut batch: Vec<Pending> = Vec::with_capacity(MAX_BATCH);
    while queue.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let records: Vec<Record> = batch.iter().filter_map(|p| p.record.clone()).collect();
        loop {
            match store.apply_batch(&records).await {
                Ok(outcome) => {
                    counters
                        .stored
                        .fetch_add(outcome.stored as u64, Ordering::Relaxed);
                    counters
                        .duplicates
                        .fetch_add(outcome.duplicates as u64, Ordering::Relaxed);
                    tracing::debug!(
                        stored = outcome.stored,
                        duplicates = outcome.duplicates,
                        "batch committed"
                    );
                    break;
                }
                Err(error) => {
                    // Nothing is acknowledged until the write succeeds, so retrying
                    // keeps every message; the broker holds back new ones meanwhile.
                    counters.write_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(
                        error = format!("{:#}", anyhow::Error::from(error)),
                        records = records.len(),
                        "batch not stored, retrying"
                    );
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
        for pending in batch.drain(..) {
            if let Err(error) = client.ack(&pending.publish).await {
                tracing::warn!(%error, "acknowledgement not sent");
            }
        }
    }
}
