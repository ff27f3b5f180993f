//! The MQTT session, over MQTT 3.1.1 or 5 ([`link`]): connects with a last will, keeps
//! reconnecting with backoff,
//! subscribes to the device's command topic after every connection and then publishes
//! the retained online status, hands commands to the updater, and traces each PUBACK back to
//! the outbox record it acknowledges.
//!
//! rumqttc reports a publish only by its packet id, which the event loop assigns when it
//! sends the packet. [`Publisher`] therefore records the kind of each request in request
//! order, and the session pairs that list with the `Outgoing::Publish(pkid)` events,
//! which come in the same order. After a connection error the session discards rumqttc's own retransmit
//! queue together with that list (under one lock, so no request slips between them), and
//! the forwarder sends the unacknowledged records again from the outbox.

pub mod link;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use fleet_wire::{DeviceState, ModelRef, Status, topic};
use tokio::sync::{mpsc, watch};

use crate::config::DeviceConfig;
use link::{Client, LinkEvent, RequestError};
pub use link::{EventLoop, MqttVersion};

/// Keepalive interval; a silent link is noticed after about 1.5 times this.
const KEEPALIVE: Duration = Duration::from_secs(10);
/// First and largest wait between reconnection attempts.
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(15);
/// How long a connection must last before a failure starts the backoff from its minimum.
const STABLE_CONNECTION: Duration = Duration::from_secs(10);
/// Requests the client buffers while the event loop is busy or disconnected.
const REQUEST_CAPACITY: usize = 256;
/// How long a clean shutdown waits for the offline status and the disconnect to go out.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(3);

/// Builds the client and its event loop; nothing connects until the loop is polled.
pub fn connect(config: &DeviceConfig) -> anyhow::Result<(Publisher, EventLoop)> {
    let transport = fleet_mqtt::transport(&config.broker, &config.broker_tls)
        .with_context(|| format!("invalid TLS settings for broker {}", config.broker))?;
    let will = status_payload(config, None, DeviceState::Offline)?;
    let options = link::LinkOptions {
        client_id: format!("fleet-device-{}", config.device_id),
        broker: config.broker.clone(),
        transport,
        keep_alive: KEEPALIVE,
        credentials: config
            .credentials
            .as_ref()
            .map(|c| (c.username.clone(), c.password.clone())),
        max_packet_bytes: config.max_packet_bytes,
        will: link::Will {
            topic: topic::device_topic(&config.device_id, topic::TopicKind::Status),
            content_type: fleet_wire::content_type(&will),
            payload: will,
        },
        request_capacity: REQUEST_CAPACITY,
    };
    let (client, eventloop) = link::new(config.mqtt_version, options);
    let publisher = Publisher::new(client, config.mqtt_version, config.max_packet_bytes);
    Ok((publisher, eventloop))
}

/// Encodes a status message for this device.
pub fn status_payload(
    config: &DeviceConfig,
    model: Option<&ModelRef>,
    state: DeviceState,
) -> anyhow::Result<Vec<u8>> {
    let status = Status {
        device_id: config.device_id.clone(),
        state,
        model: model.cloned(),
        agent_version: env!("CARGO_PKG_VERSION").into(),
        device_time_ms: crate::unix_millis(),
    };
    Ok(fleet_wire::encode(&status, config.encoding)?)
}

/// The broker address for log lines, the retained status messages the session
/// publishes, and where commands go.
#[derive(Debug)]
pub struct SessionConfig {
    /// `HOST:PORT` of the broker.
    pub broker: String,
    pub status_topic: String,
    /// The current status payloads; an update replaces them when it switches models.
    pub status: watch::Receiver<StatusPayloads>,
    /// `fleet/v1/{device}/cmd`, subscribed at QoS 1 after every connection.
    pub command_topic: String,
    /// Receives the payload of every message on the command topic.
    pub commands: mpsc::UnboundedSender<Vec<u8>>,
}

/// Encoded status messages for the model in use.
#[derive(Debug, Clone)]
pub struct StatusPayloads {
    pub online: Vec<u8>,
    pub offline: Vec<u8>,
}

impl StatusPayloads {
    pub fn new(config: &DeviceConfig, model: &ModelRef) -> anyhow::Result<StatusPayloads> {
        Ok(StatusPayloads {
            online: status_payload(config, Some(model), DeviceState::Online)?,
            offline: status_payload(config, Some(model), DeviceState::Offline)?,
        })
    }
}

/// Content of a QoS 1 publish, kept so its PUBACK can be traced back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishKind {
    /// A telemetry record at this outbox position.
    Telemetry { position: u64 },
    /// A retained status message.
    Status,
}

/// Connection change or acknowledgement, sent by the session to the forwarder in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionEvent {
    /// The broker accepted the connection.
    Connected,
    /// The connection was lost; publishes not acknowledged by then were discarded.
    Disconnected,
    /// The broker acknowledged the telemetry record at this outbox position.
    Acked { position: u64 },
}

/// Publishes handed to the client and not yet acknowledged.
#[derive(Debug, Default)]
struct Tracker {
    /// Requests in the client's channel, oldest first, not yet sent.
    requested: VecDeque<PublishKind>,
    /// Sent publishes by packet id.
    sent: HashMap<u16, PublishKind>,
    /// A publish whose packet id was still in use; rumqttc sends it after that id's ack.
    collided: Option<(u16, PublishKind)>,
}

/// The MQTT client with the bookkeeping that traces acknowledgements back.
#[derive(Debug, Clone)]
pub struct Publisher {
    client: Client,
    tracker: Arc<Mutex<Tracker>>,
    version: MqttVersion,
    /// The configured maximum packet size.
    configured_max_packet: usize,
    /// The maximum packet size in force: the configured one, or the broker's when an
    /// MQTT 5 broker states a smaller one.
    max_packet: Arc<AtomicUsize>,
}

impl Publisher {
    fn new(client: Client, version: MqttVersion, max_packet_bytes: usize) -> Publisher {
        Publisher {
            client,
            tracker: Arc::default(),
            version,
            configured_max_packet: max_packet_bytes,
            max_packet: Arc::new(AtomicUsize::new(max_packet_bytes)),
        }
    }

    /// Queues a QoS 1 publish without waiting; fails when the client's queue is full.
    /// With MQTT 5 the payload's content type goes with it.
    pub fn publish(
        &self,
        topic: &str,
        kind: PublishKind,
        retain: bool,
        payload: Vec<u8>,
    ) -> Result<(), RequestError> {
        let mut tracker = self.lock();
        let content_type = fleet_wire::content_type(&payload);
        self.client
            .try_publish(topic, retain, payload, content_type)?;
        tracker.requested.push_back(kind);
        Ok(())
    }

    /// Returns the largest packet the broker takes, in bytes.
    pub fn max_packet_bytes(&self) -> usize {
        self.max_packet.load(Ordering::Relaxed)
    }

    /// Returns whether the broker's CONNACK set a limit below the configured one.
    pub fn limit_from_broker(&self) -> bool {
        self.max_packet_bytes() < self.configured_max_packet
    }

    /// Returns the size of the PUBLISH packet that carries `payload` on `topic`.
    pub fn packet_size(&self, topic: &str, payload: &[u8]) -> usize {
        let content_type = fleet_wire::content_type(payload);
        link::publish_packet_size(self.version, topic, content_type, payload.len())
    }

    /// Applies the maximum packet size an MQTT 5 broker stated in its CONNACK.
    fn broker_max_packet(&self, broker_max: Option<u32>) {
        let limit = match broker_max {
            Some(broker_max) => self.configured_max_packet.min(broker_max as usize),
            None => self.configured_max_packet,
        };
        let previous = self.max_packet.swap(limit, Ordering::Relaxed);
        if limit != previous {
            tracing::info!(
                broker_max_packet_bytes = broker_max,
                configured_max_packet_bytes = self.configured_max_packet,
                max_packet_bytes = limit,
                "maximum packet size set from the broker's CONNACK"
            );
        }
    }

    fn lock(&self) -> MutexGuard<'_, Tracker> {
        // The tracker contains plain collections that no panic leaves half-updated.
        self.tracker.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records that the event loop sent the oldest requested publish with `pkid`.
    fn sent(&self, pkid: u16) {
        let mut tracker = self.lock();
        let kind = match tracker.collided {
            Some((collided, kind)) if collided == pkid => {
                tracker.collided = None;
                Some(kind)
            }
            _ => tracker.requested.pop_front(),
        };
        match kind {
            Some(kind) => {
                tracker.sent.insert(pkid, kind);
            }
            None => tracing::debug!(pkid, "publish sent that the agent did not request"),
        }
    }

    /// Records that the oldest requested publish waits for `pkid` to be acknowledged.
    fn collided(&self, pkid: u16) {
        let mut tracker = self.lock();
        if let Some(kind) = tracker.requested.pop_front() {
            tracker.collided = Some((pkid, kind));
        }
    }

    /// Returns what the publish acknowledged with `pkid` carried.
    fn acked(&self, pkid: u16) -> Option<PublishKind> {
        self.lock().sent.remove(&pkid)
    }

    /// Discards every publish not yet acknowledged, in the tracker and in the event loop,
    /// so nothing is sent again behind the forwarder's back.
    fn discard_unacknowledged(&self, eventloop: &mut EventLoop) {
        // Holding the lock keeps new requests out while the loop drops the old ones.
        let mut tracker = self.lock();
        eventloop.discard_unacknowledged();
        *tracker = Tracker::default();
    }
}

/// Polls the event loop until `shutdown` turns true, reconnecting with exponential
/// backoff and jitter, and sends the online status retained after each connection.
/// Connections, losses and telemetry acknowledgements go to `events`. On shutdown it
/// sends the offline status and a clean disconnect after everything already queued.
pub async fn drive(
    mut eventloop: EventLoop,
    publisher: Publisher,
    session: SessionConfig,
    events: mpsc::UnboundedSender<SessionEvent>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = BACKOFF_MIN;
    let mut failures = 0u64;
    let mut connected_at: Option<Instant> = None;
    loop {
        let event = tokio::select! {
            event = eventloop.poll() => event,
            _ = shutdown.changed() => break,
        };
        match event {
            Ok(LinkEvent::Connected { broker_max_packet }) => {
                tracing::info!(after_failures = failures, "connected to broker");
                publisher.broker_max_packet(broker_max_packet);
                connected_at = Some(Instant::now());
                let _ = events.send(SessionEvent::Connected);
                // The server repeats missed commands as soon as it receives the online
                // status, and a clean session holds no subscription yet, so the status
                // waits for the broker to confirm the command subscription.
                if let Err(error) = publisher.client.try_subscribe(&session.command_topic) {
                    tracing::warn!(%error, topic = %session.command_topic, "command subscription not queued");
                    publish_online(&publisher, &session);
                }
            }
            Ok(LinkEvent::Subscribed { rejected }) => {
                if rejected {
                    tracing::warn!(topic = %session.command_topic, "broker rejected the command subscription, so no commands will arrive");
                }
                publish_online(&publisher, &session);
            }
            Ok(LinkEvent::Message { topic, payload }) => {
                if topic == session.command_topic {
                    let _ = session.commands.send(payload);
                } else {
                    tracing::debug!(%topic, "message on an unexpected topic ignored");
                }
            }
            Ok(event) => trace_event(&publisher, &events, event),
            Err(error) => {
                publisher.discard_unacknowledged(&mut eventloop);
                let _ = events.send(SessionEvent::Disconnected);
                // Only a connection that lasted resets the backoff: a broker that accepts
                // and then closes at once (a packet over its size limit, a second client
                // with the same id, an ACL rule) would otherwise be retried every 250 ms.
                let lasted = connected_at.take().map(|at| at.elapsed());
                if lasted.is_some_and(|lasted| lasted >= STABLE_CONNECTION) {
                    backoff = BACKOFF_MIN;
                    failures = 0;
                }
                failures += 1;
                // Log the first failures and then every tenth, so a long outage does not
                // flood the log.
                if failures <= 3 || failures.is_multiple_of(10) {
                    match lasted.filter(|&lasted| lasted < STABLE_CONNECTION) {
                        Some(lasted) => {
                            tracing::warn!(%error, broker = %session.broker, failures, connected_ms = lasted.as_millis() as u64, retry_in_ms = backoff.as_millis() as u64, "broker closed the connection soon after accepting it, retrying; check the broker's maximum packet size against --max-packet-bytes and that no other client uses this device id")
                        }
                        None => {
                            tracing::warn!(%error, broker = %session.broker, failures, retry_in_ms = backoff.as_millis() as u64, "broker connection failed, retrying")
                        }
                    }
                }
                let wait = jittered(backoff);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.changed() => break,
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
    flush_and_disconnect(&mut eventloop, &publisher, &session, &events).await;
}

/// Queues the retained online status of the model in use.
fn publish_online(publisher: &Publisher, session: &SessionConfig) {
    let online = session.status.borrow().online.clone();
    if let Err(error) = publisher.publish(&session.status_topic, PublishKind::Status, true, online)
    {
        tracing::warn!(%error, "online status not queued");
    }
}

/// Pairs sent publishes with packet ids and reports telemetry acknowledgements.
fn trace_event(
    publisher: &Publisher,
    events: &mpsc::UnboundedSender<SessionEvent>,
    event: LinkEvent,
) {
    match event {
        LinkEvent::Sent(pkid) => publisher.sent(pkid),
        LinkEvent::Waiting(pkid) => publisher.collided(pkid),
        LinkEvent::Acked(pkid) => {
            if let Some(PublishKind::Telemetry { position }) = publisher.acked(pkid) {
                let _ = events.send(SessionEvent::Acked { position });
            }
        }
        _ => {}
    }
}

async fn flush_and_disconnect(
    eventloop: &mut EventLoop,
    publisher: &Publisher,
    session: &SessionConfig,
    events: &mpsc::UnboundedSender<SessionEvent>,
) {
    let offline = session.status.borrow().offline.clone();
    let queued = publisher
        .publish(&session.status_topic, PublishKind::Status, true, offline)
        .and_then(|()| publisher.client.try_disconnect());
    if let Err(error) = queued {
        tracing::warn!(%error, "offline status not queued; the broker will publish the last will");
    }
    let deadline = tokio::time::sleep(FLUSH_TIMEOUT);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            event = eventloop.poll() => match event {
                Ok(LinkEvent::Disconnected) => break,
                Ok(event) => trace_event(publisher, events, event),
                Err(error) => {
                    tracing::debug!(%error, "connection closed while flushing");
                    break;
                }
            },
            () = &mut deadline => {
                tracing::warn!("timed out flushing messages to the broker");
                break;
            }
        }
    }
}

/// Returns `base` scaled by a random factor between 0.5 and 1.5, so devices that lost
/// the broker together do not reconnect in lockstep.
fn jittered(base: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let factor = 0.5 + f64::from(nanos % 1000) / 1000.0;
    base.mul_f64(factor)
}
