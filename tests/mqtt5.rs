//! The agent over MQTT 5 against a real Mosquitto. Every publish carries the payload's
//! content type. The agent takes the broker's maximum packet size from the CONNACK, so a
//! record too large for the broker is set aside without `--max-packet-bytes`. The
//! embedded broker, which speaks 3.1.1 only, refuses MQTT 5 clients with a clear reason.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{Workspace, unique_device_id};
use fleet_wire::topic;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{Client, Event, MqttOptions};

#[test]
fn mqtt5_content_type_and_broker_packet_limit() {
    let workspace = Workspace::new();
    let postcard_device = unique_device_id("mqtt5-postcard");
    let json_device = unique_device_id("mqtt5-json");

    let oversized = common::oversized_command(&postcard_device);
    let (payload, command_topic, max_packet) =
        (oversized.payload, oversized.topic, oversized.max_packet);

    let broker_dir = tempfile::tempdir().unwrap();
    let (_mosquitto, port) = common::start_mosquitto(
        broker_dir.path(),
        &format!("allow_anonymous true\nmax_packet_size {max_packet}\n"),
    );
    let broker = format!("mqtt://127.0.0.1:{port}");

    let mut options = MqttOptions::new(unique_device_id("mqtt5-observer"), "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(5));
    options.set_max_packet_size(Some(max_packet as u32));
    let (client, mut connection) = Client::new(options, 16);
    client
        .subscribe("fleet/v1/#", QoS::AtLeastOnce)
        .expect("observer subscription queued");

    // Neither agent gets the broker's limit as a flag: the default --max-packet-bytes is
    // far above it, so the CONNACK is their only source.
    let _postcard_agent = workspace.start_device(
        &postcard_device,
        &broker,
        &["--interval", "0.2", "--mqtt-version", "5"],
    );
    let _json_agent = workspace.start_device(
        &json_device,
        &broker,
        &[
            "--interval",
            "0.2",
            "--mqtt-version",
            "5",
            "--encoding",
            "json",
        ],
    );

    // Content types seen per topic, and telemetry counted around the command.
    let mut content_types: BTreeMap<String, Option<String>> = BTreeMap::new();
    let telemetry_topic = topic::device_topic(&postcard_device, topic::TopicKind::Telemetry);
    let events_topic = topic::device_topic(&postcard_device, topic::TopicKind::Events);
    let mut telemetry_before = 0;
    let mut telemetry_after = 0;
    let mut events = 0;
    let mut command_sent = false;
    let deadline = Instant::now() + Duration::from_secs(60);
    for notification in connection.iter() {
        assert!(
            Instant::now() < deadline,
            "timed out: {telemetry_before} telemetry messages before the command, \
             {telemetry_after} after, content types {content_types:?}"
        );
        let Ok(Event::Incoming(Packet::Publish(message))) = notification else {
            continue;
        };
        let topic = String::from_utf8_lossy(&message.topic).into_owned();
        let content_type = message.properties.and_then(|p| p.content_type);
        content_types.insert(topic.clone(), content_type);
        if topic == events_topic && command_sent {
            events += 1;
        } else if topic == telemetry_topic {
            if command_sent {
                telemetry_after += 1;
            } else {
                telemetry_before += 1;
            }
        }
        if telemetry_before >= 3 && !command_sent {
            client
                .publish(&command_topic, QoS::AtLeastOnce, false, payload.clone())
                .expect("command queued");
            command_sent = true;
        }
        if telemetry_after >= 10 && content_types.len() >= 4 {
            break;
        }
    }

    assert_eq!(events, 0, "the oversized event reached the broker");
    assert!(telemetry_after >= 10, "telemetry stopped after the command");
    let postcard = Some(fleet_wire::CONTENT_TYPE_POSTCARD.to_owned());
    let json = Some(fleet_wire::CONTENT_TYPE_JSON.to_owned());
    for (device, expected) in [(&postcard_device, &postcard), (&json_device, &json)] {
        for kind in [topic::TopicKind::Telemetry, topic::TopicKind::Status] {
            let topic = topic::device_topic(device, kind);
            assert_eq!(
                content_types.get(&topic),
                Some(expected),
                "content type on {topic}"
            );
        }
    }
}

#[test]
fn embedded_broker_refuses_mqtt5_clearly() {
    let workspace = Workspace::new();
    let mqtt_port = common::free_port();
    let server = workspace.start_server(None, mqtt_port);
    let broker = format!("mqtt://127.0.0.1:{mqtt_port}");
    let device_id = unique_device_id("mqtt5-embedded");
    let _agent = workspace.start_device(&device_id, &broker, &["--mqtt-version", "5"]);

    // The embedded broker speaks MQTT 3.1.1: it rejects the agent's MQTT 5 CONNECT with
    // "unacceptable protocol version" and counts a refused login, every retry.
    common::wait_for(Duration::from_secs(30), "a refused MQTT 5 login", || {
        (server.metric("fleet_broker_logins_refused_total") >= 2.0).then_some(())
    });
    assert!(
        server.device(&device_id).is_none(),
        "an MQTT 5 agent got through the embedded broker"
    );
}
