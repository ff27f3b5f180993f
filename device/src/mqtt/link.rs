//! The MQTT client and event loop for either protocol version the agent speaks, behind
//! one interface.
//!
//! MQTT 3.1.1 works with every broker, including the fleet server's embedded one. MQTT 5
//! adds two things a shared broker needs. Each publish carries its content type, so a
//! subscriber can distinguish postcard from JSON without guessing. The broker states its maximum
//! packet size in the CONNACK, so the agent learns the limit instead of being
//! disconnected by it.

use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::{
    ConnAckProperties, LastWillProperties, Packet as Packet5, PublishProperties,
    SubscribeReasonCode as ReasonCode5,
};
use rumqttc::{Event, Outgoing, Packet, QoS, SubscribeReasonCode};

/// MQTT protocol version of the agent's broker connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MqttVersion {
    #[default]
    V311,
    V5,
}

impl std::str::FromStr for MqttVersion {
    type Err = String;

    fn from_str(text: &str) -> Result<MqttVersion, String> {
        match text {
            "3.1.1" => Ok(MqttVersion::V311),
            "5" => Ok(MqttVersion::V5),
            other => Err(format!(
                "invalid MQTT version {other:?}: expected 3.1.1 or 5"
            )),
        }
    }
}

impl std::fmt::Display for MqttVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MqttVersion::V311 => "3.1.1",
            MqttVersion::V5 => "5",
        })
    }
}

/// Connection settings that both versions share.
pub struct LinkOptions {
    pub client_id: String,
    pub broker: fleet_mqtt::BrokerUrl,
    pub transport: rumqttc::Transport,
    pub keep_alive: Duration,
    pub credentials: Option<(String, String)>,
    /// Largest packet sent or accepted, in bytes.
    pub max_packet_bytes: usize,
    /// Retained message the broker publishes when the connection is lost.
    pub will: Will,
    /// Requests the client buffers while the event loop is busy or disconnected.
    pub request_capacity: usize,
}

impl std::fmt::Debug for LinkOptions {
    // rumqttc's transport has no Debug impl. The broker URL shows whether it is TLS.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkOptions")
            .field("client_id", &self.client_id)
            .field("broker", &self.broker)
            .field("keep_alive", &self.keep_alive)
            .field("max_packet_bytes", &self.max_packet_bytes)
            .field("will", &self.will)
            .finish_non_exhaustive()
    }
}

/// The last will: topic, payload and its content type.
#[derive(Debug)]
pub struct Will {
    pub topic: String,
    pub payload: Vec<u8>,
    pub content_type: &'static str,
}

/// Creates the client and its event loop; nothing connects until the loop is polled.
pub fn new(version: MqttVersion, options: LinkOptions) -> (Client, EventLoop) {
    match version {
        MqttVersion::V311 => {
            let mut mqtt = rumqttc::MqttOptions::new(
                options.client_id,
                options.broker.host,
                options.broker.port,
            );
            mqtt.set_transport(options.transport);
            mqtt.set_keep_alive(options.keep_alive);
            if let Some((username, password)) = options.credentials {
                mqtt.set_credentials(username, password);
            }
            mqtt.set_max_packet_size(options.max_packet_bytes, options.max_packet_bytes);
            mqtt.set_last_will(rumqttc::LastWill::new(
                options.will.topic,
                options.will.payload,
                QoS::AtLeastOnce,
                true,
            ));
            let (client, eventloop) = rumqttc::AsyncClient::new(mqtt, options.request_capacity);
            (Client::V311(client), EventLoop::V311(Box::new(eventloop)))
        }
        MqttVersion::V5 => {
            let mut mqtt = rumqttc::v5::MqttOptions::new(
                options.client_id,
                options.broker.host,
                options.broker.port,
            );
            mqtt.set_transport(options.transport);
            mqtt.set_keep_alive(options.keep_alive);
            if let Some((username, password)) = options.credentials {
                mqtt.set_credentials(username, password);
            }
            // Tells the broker the largest packet this agent accepts. The largest it may
            // send is the broker's, from the CONNACK.
            mqtt.set_max_packet_size(Some(options.max_packet_bytes as u32));
            let properties = LastWillProperties {
                delay_interval: None,
                payload_format_indicator: None,
                message_expiry_interval: None,
                content_type: Some(options.will.content_type.to_owned()),
                response_topic: None,
                correlation_data: None,
                user_properties: Vec::new(),
            };
            mqtt.set_last_will(rumqttc::v5::mqttbytes::v5::LastWill::new(
                options.will.topic,
                options.will.payload,
                rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                true,
                Some(properties),
            ));
            let (client, eventloop) = rumqttc::v5::AsyncClient::new(mqtt, options.request_capacity);
            (Client::V5(client), EventLoop::V5(Box::new(eventloop)))
        }
    }
}

/// A request the client could not queue, because its queue is full or the event loop
/// has stopped.
#[derive(Debug, thiserror::Error)]
#[error("MQTT request not queued: {0}")]
pub struct RequestError(String);

/// The client half: queues requests for the event loop without waiting.
#[derive(Debug, Clone)]
pub enum Client {
    V311(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

impl Client {
    /// Queues a QoS 1 publish. `content_type` goes out with MQTT 5 only.
    pub fn try_publish(
        &self,
        topic: &str,
        retain: bool,
        payload: Vec<u8>,
        content_type: &'static str,
    ) -> Result<(), RequestError> {
        match self {
            Client::V311(client) => client
                .try_publish(topic, QoS::AtLeastOnce, retain, payload)
                .map_err(|error| RequestError(error.to_string())),
            Client::V5(client) => {
                let properties = PublishProperties {
                    content_type: Some(content_type.to_owned()),
                    ..PublishProperties::default()
                };
                client
                    .try_publish_with_properties(
                        topic,
                        rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                        retain,
                        payload,
                        properties,
                    )
                    .map_err(|error| RequestError(error.to_string()))
            }
        }
    }

    /// Queues a QoS 1 subscription.
    pub fn try_subscribe(&self, topic: &str) -> Result<(), RequestError> {
        match self {
            Client::V311(client) => client
                .try_subscribe(topic, QoS::AtLeastOnce)
                .map_err(|error| RequestError(error.to_string())),
            Client::V5(client) => client
                .try_subscribe(topic, rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
                .map_err(|error| RequestError(error.to_string())),
        }
    }

    /// Queues a clean disconnect after the requests already queued.
    pub fn try_disconnect(&self) -> Result<(), RequestError> {
        match self {
            Client::V311(client) => client
                .try_disconnect()
                .map_err(|error| RequestError(error.to_string())),
            Client::V5(client) => client
                .try_disconnect()
                .map_err(|error| RequestError(error.to_string())),
        }
    }
}

/// An event of either version's loop that the session acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEvent {
    /// The broker accepted the connection; with MQTT 5 it may state the largest packet
    /// it accepts.
    Connected { broker_max_packet: Option<u32> },
    /// The broker acknowledged a subscription; `rejected` when it refused a topic.
    Subscribed { rejected: bool },
    /// A message arrived on a subscribed topic.
    Message { topic: String, payload: Vec<u8> },
    /// The event loop sent the oldest queued publish with this packet id.
    Sent(u16),
    /// The oldest queued publish waits until this packet id is acknowledged.
    Waiting(u16),
    /// The broker acknowledged the publish with this packet id.
    Acked(u16),
    /// The clean disconnect went out.
    Disconnected,
    /// Anything else: pings, the agent's own subscribe packets.
    Other,
}

/// The event loop half, polled by the session.
pub enum EventLoop {
    // Both boxed: the loops are hundreds of bytes and differ in size.
    V311(Box<rumqttc::EventLoop>),
    V5(Box<rumqttc::v5::EventLoop>),
}

impl std::fmt::Debug for EventLoop {
    // rumqttc's event loops have no Debug impl.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let version = match self {
            EventLoop::V311(_) => MqttVersion::V311,
            EventLoop::V5(_) => MqttVersion::V5,
        };
        write!(f, "EventLoop(MQTT {version})")
    }
}

impl EventLoop {
    /// Returns the next event; an error means the connection is lost, and polling again
    /// reconnects.
    pub async fn poll(&mut self) -> Result<LinkEvent, String> {
        match self {
            EventLoop::V311(eventloop) => {
                let event = eventloop.poll().await.map_err(|error| error.to_string())?;
                Ok(match event {
                    Event::Incoming(Packet::ConnAck(_)) => LinkEvent::Connected {
                        broker_max_packet: None,
                    },
                    Event::Incoming(Packet::SubAck(ack)) => LinkEvent::Subscribed {
                        rejected: ack
                            .return_codes
                            .iter()
                            .any(|code| matches!(code, SubscribeReasonCode::Failure)),
                    },
                    Event::Incoming(Packet::Publish(message)) => LinkEvent::Message {
                        topic: message.topic,
                        payload: message.payload.to_vec(),
                    },
                    Event::Incoming(Packet::PubAck(ack)) => LinkEvent::Acked(ack.pkid),
                    Event::Outgoing(outgoing) => outgoing_event(outgoing),
                    Event::Incoming(_) => LinkEvent::Other,
                })
            }
            EventLoop::V5(eventloop) => {
                let event = eventloop.poll().await.map_err(|error| error.to_string())?;
                Ok(match event {
                    rumqttc::v5::Event::Incoming(Packet5::ConnAck(ack)) => LinkEvent::Connected {
                        broker_max_packet: ack
                            .properties
                            .and_then(|p: ConnAckProperties| p.max_packet_size),
                    },
                    rumqttc::v5::Event::Incoming(Packet5::SubAck(ack)) => LinkEvent::Subscribed {
                        rejected: ack
                            .return_codes
                            .iter()
                            .any(|code| !matches!(code, ReasonCode5::Success(_))),
                    },
                    rumqttc::v5::Event::Incoming(Packet5::Publish(message)) => LinkEvent::Message {
                        topic: String::from_utf8_lossy(&message.topic).into_owned(),
                        payload: message.payload.to_vec(),
                    },
                    rumqttc::v5::Event::Incoming(Packet5::PubAck(ack)) => {
                        LinkEvent::Acked(ack.pkid)
                    }
                    rumqttc::v5::Event::Outgoing(outgoing) => outgoing_event(outgoing),
                    rumqttc::v5::Event::Incoming(_) => LinkEvent::Other,
                })
            }
        }
    }

    /// Drops every publish not yet acknowledged: those queued in the client, those the
    /// loop would resend, and one waiting on a packet id in use, whose acknowledgement
    /// never comes on a new connection.
    pub fn discard_unacknowledged(&mut self) {
        match self {
            EventLoop::V311(eventloop) => {
                // `clean` moves requests still in the channel into `pending`, so clearing
                // `pending` removes them too.
                eventloop.clean();
                eventloop.pending.clear();
                eventloop.state.collision = None;
            }
            EventLoop::V5(eventloop) => {
                eventloop.clean();
                eventloop.pending.clear();
                eventloop.state.collision = None;
            }
        }
    }
}

fn outgoing_event(outgoing: Outgoing) -> LinkEvent {
    match outgoing {
        Outgoing::Publish(pkid) => LinkEvent::Sent(pkid),
        Outgoing::AwaitAck(pkid) => LinkEvent::Waiting(pkid),
        Outgoing::Disconnect => LinkEvent::Disconnected,
        _ => LinkEvent::Other,
    }
}

/// Returns the size in bytes of a QoS 1 PUBLISH packet, headers included, as rumqttc
/// measures it against the maximum packet size. MQTT 5 adds the properties: here only
/// the content type.
pub fn publish_packet_size(
    version: MqttVersion,
    topic: &str,
    content_type: &str,
    payload_len: usize,
) -> usize {
    // Topic with its 2-byte length, then the 2-byte packet id, then the payload.
    let mut remaining = 2 + topic.len() + 2 + payload_len;
    if version == MqttVersion::V5 {
        // Property identifier and the 2-byte string length, then the content type,
        // after the properties' own variable-length size.
        let properties = 1 + 2 + content_type.len();
        remaining += varint_len(properties) + properties;
    }
    1 + varint_len(remaining) + remaining
}

/// Bytes of MQTT's variable-length encoding of `value`.
fn varint_len(value: usize) -> usize {
    match value {
        0..128 => 1,
        128..16_384 => 2,
        16_384..2_097_152 => 3,
        _ => 4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOPIC: &str = "fleet/v1/pi-07/telemetry";
    const CONTENT_TYPE: &str = "application/vnd.fleet.v1+postcard";
    const PAYLOAD_LENGTHS: [usize; 8] = [0, 1, 90, 100, 16_350, 16_400, 70_000, 2_100_000];

    #[test]
    fn packet_size_matches_rumqttc_3_1_1() {
        for payload_len in PAYLOAD_LENGTHS {
            let mut publish =
                rumqttc::Publish::new(TOPIC, QoS::AtLeastOnce, vec![0u8; payload_len]);
            // The event loop assigns the packet id before it checks the size.
            publish.pkid = 1;
            assert_eq!(
                publish_packet_size(MqttVersion::V311, TOPIC, CONTENT_TYPE, payload_len),
                publish.size(),
                "payload of {payload_len} bytes"
            );
        }
    }

    #[test]
    fn packet_size_matches_rumqttc_5() {
        for payload_len in PAYLOAD_LENGTHS {
            let properties = PublishProperties {
                content_type: Some(CONTENT_TYPE.to_owned()),
                ..PublishProperties::default()
            };
            let mut publish = rumqttc::v5::mqttbytes::v5::Publish::new(
                TOPIC,
                rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                vec![0u8; payload_len],
                Some(properties),
            );
            publish.pkid = 1;
            assert_eq!(
                publish_packet_size(MqttVersion::V5, TOPIC, CONTENT_TYPE, payload_len),
                publish.size(),
                "payload of {payload_len} bytes"
            );
        }
    }

    #[test]
    fn version_parses_both_spellings() {
        assert_eq!("3.1.1".parse(), Ok(MqttVersion::V311));
        assert_eq!("5".parse(), Ok(MqttVersion::V5));
        for wrong in ["6", "3", "4", "5.0", " 5"] {
            let error = wrong.parse::<MqttVersion>().unwrap_err();
            assert!(error.contains("3.1.1 or 5"), "{wrong}: {error}");
        }
    }
}
