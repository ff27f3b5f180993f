//! The MQTT session: connects with a last will, keeps reconnecting with backoff,
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

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use fleet_wire::{DeviceState, ModelRef, Status, topic};
use rumqttc::{
    AsyncClient, ClientError, Event, EventLoop, LastWill, Outgoing, Packet, QoS,
    SubscribeReasonCode,
};
use tokio::sync::{mpsc, watch};

use crate::config::DeviceConfig;

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
    let mut options = fleet_mqtt::options(
        format!("fleet-device-{}", config.device_id),
        &config.broker,
        &config.broker_tls,
    )
    .with_context(|| format!("invalid TLS settings for broker {}", config.broker))?;
    options.set_keep_alive(KEEPALIVE);
    if let Some(credentials) = &config.credentials {
        options.set_credentials(credentials.username.clone(), credentials.password.clone());
    }
    options.set_max_packet_size(config.max_packet_bytes, config.max_packet_bytes);
    let will = status_payload(config, None, DeviceState::Offline)?;
    options.set_last_will(LastWill::new(
        topic::device_topic(&config.device_id, topic::TopicKind::Status),
        will,
        QoS::AtLeastOnce,
        true,
    ));
    let (client, eventloop) = AsyncClient::new(options, REQUEST_CAPACITY);
    Ok((Publisher::new(client), eventloop))
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
    client: AsyncClient,
    tracker: Arc<Mutex<Tracker>>,
}

impl Publisher {
    fn new(client: AsyncClient) -> Publisher {
        Publisher {
            client,
            tracker: Arc::default(),
        }
    }

    /// Queues a QoS 1 publish without waiting; fails when the client's queue is full.
    pub fn publish(
        &self,
        topic: &str,
        kind: PublishKind,
        retain: bool,
        payload: Vec<u8>,
    ) -> Result<(), ClientError> {
        let mut tracker = self.lock();
        self.client
            .try_publish(topic, QoS::AtLeastOnce, retain, payload)?;
        tracker.requested.push_back(kind);
        Ok(())
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
        let mut tracker = self.lock();
        // `clean` moves requests still in the channel into `pending`, so clearing
        // `pending` removes them too; holding the lock keeps new ones out meanwhile.
        eventloop.clean();
        eventloop.pending.clear();
        // `clean` keeps a publish that waits on a packet id in use. That id's ack never
        // comes on a new connection, and rumqttc sends nothing new while one waits.
        eventloop.state.collision = None;
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
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                tracing::info!(code = ?ack.code, after_failures = failures, "connected to broker");
                connected_at = Some(Instant::now());
                let _ = events.send(SessionEvent::Connected);
                // The server repeats missed commands as soon as it receives the online
                // status, and a clean session holds no subscription yet, so the status
                // waits for the broker to confirm the command subscription.
                if let Err(error) = publisher
                    .client
                    .try_subscribe(&session.command_topic, QoS::AtLeastOnce)
                {
                    tracing::warn!(%error, topic = %session.command_topic, "command subscription not queued");
                    publish_online(&publisher, &session);
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                if ack
                    .return_codes
                    .iter()
                    .any(|code| matches!(code, SubscribeReasonCode::Failure))
                {
                    tracing::warn!(topic = %session.command_topic, "broker rejected the command subscription, so no commands will arrive");
                }
                publish_online(&publisher, &session);
            }
            Ok(Event::Incoming(Packet::Publish(message))) => {
                if message.topic == session.command_topic {
                    let _ = session.commands.send(message.payload.to_vec());
                } else {
                    tracing::debug!(topic = %message.topic, "message on an unexpected topic ignored");
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

/// Returns the size in bytes of an MQTT 3.1.1 QoS 1 PUBLISH packet, headers included,
/// as rumqttc measures it against the maximum packet size.
pub fn publish_packet_size(topic: &str, payload_len: usize) -> usize {
    // Topic with its 2-byte length, then the 2-byte packet id, then the payload.
    let remaining = 2 + topic.len() + 2 + payload_len;
    let length_bytes = match remaining {
        0..128 => 1,
        128..16_384 => 2,
        16_384..2_097_152 => 3,
        _ => 4,
    };
    1 + length_bytes + remaining
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
fn trace_event(publisher: &Publisher, events: &mpsc::UnboundedSender<SessionEvent>, event: Event) {
    match event {
        Event::Outgoing(Outgoing::Publish(pkid)) => publisher.sent(pkid),
        Event::Outgoing(Outgoing::AwaitAck(pkid)) => publisher.collided(pkid),
        Event::Incoming(Packet::PubAck(ack)) => {
            if let Some(PublishKind::Telemetry { position }) = publisher.acked(ack.pkid) {
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
                Ok(Event::Outgoing(Outgoing::Disconnect)) => break,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packet_size_matches_rumqttc() {
        let topic = "fleet/v1/pi-07/telemetry";
        for payload_len in [0, 1, 90, 100, 16_350, 16_400, 70_000, 2_100_000] {
            let mut publish =
                rumqttc::Publish::new(topic, QoS::AtLeastOnce, vec![0u8; payload_len]);
            // The event loop assigns the packet id before it checks the size.
            publish.pkid = 1;
            assert_eq!(
                publish_packet_size(topic, payload_len),
                publish.size(),
                "payload of {payload_len} bytes"
            );
        }
    }
}
