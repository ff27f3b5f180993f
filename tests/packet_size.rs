//! A record larger than the broker's maximum packet size: Mosquitto closes the connection
//! of a client that sends one, so the agent must set it aside instead of sending it on
//! every reconnect while the records behind it wait.

mod common;

use std::time::{Duration, Instant};

use common::{Workspace, unique_device_id};
use fleet_wire::topic;
use rumqttc::{Client, Event, MqttOptions, Packet, QoS};

#[test]
fn oversized_record_does_not_block_telemetry() {
    let workspace = Workspace::new();
    let device_id = unique_device_id("packet-size");

    let oversized = common::oversized_command(&device_id);
    let (payload, command_topic, max_packet) =
        (oversized.payload, oversized.topic, oversized.max_packet);

    let broker_dir = tempfile::tempdir().unwrap();
    let (_mosquitto, port) = common::start_mosquitto(
        broker_dir.path(),
        &format!("allow_anonymous true\nmax_packet_size {max_packet}\n"),
    );
    let broker = format!("mqtt://127.0.0.1:{port}");

    let mut options = MqttOptions::new(unique_device_id("packet-size-observer"), "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(5));
    options.set_max_packet_size(max_packet, max_packet);
    let (client, mut connection) = Client::new(options, 16);
    client
        .subscribe(format!("fleet/v1/{device_id}/#"), QoS::AtLeastOnce)
        .unwrap();

    let max_packet_flag = max_packet.to_string();
    let _agent = workspace.start_device(
        &device_id,
        &broker,
        &["--interval", "0.2", "--max-packet-bytes", &max_packet_flag],
    );

    let telemetry_topic = topic::device_topic(&device_id, topic::TopicKind::Telemetry);
    let events_topic = topic::device_topic(&device_id, topic::TopicKind::Events);
    let mut telemetry_before = 0;
    let mut telemetry_after = 0;
    // Events after the command; the only one the agent has for it is oversized.
    let mut events = 0;
    let mut command_sent = false;
    let deadline = Instant::now() + Duration::from_secs(60);
    for notification in connection.iter() {
        assert!(
            Instant::now() < deadline,
            "timed out: {telemetry_before} telemetry messages before the command, \
             {telemetry_after} after"
        );
        let Ok(Event::Incoming(Packet::Publish(message))) = notification else {
            continue;
        };
        if message.topic == events_topic && command_sent {
            events += 1;
        } else if message.topic == telemetry_topic {
            if command_sent {
                telemetry_after += 1;
            } else {
                telemetry_before += 1;
            }
        }
        if telemetry_before >= 3 && !command_sent {
            client
                .publish(&command_topic, QoS::AtLeastOnce, false, payload.clone())
                .unwrap();
            command_sent = true;
        }
        if telemetry_after >= 10 {
            break;
        }
    }
    assert_eq!(events, 0, "the oversized event reached the broker");
    assert!(telemetry_after >= 10, "telemetry stopped after the command");
}

#[test]
fn broker_closing_at_once_slows_reconnects() {
    let workspace = Workspace::new();
    let device_id = unique_device_id("packet-backoff");

    // JSON telemetry is several hundred bytes, so this broker closes the connection on
    // the first record the agent sends, right after accepting the connection.
    let broker_dir = tempfile::tempdir().unwrap();
    let (_mosquitto, port) = common::start_mosquitto(
        broker_dir.path(),
        "allow_anonymous true\nmax_packet_size 400\n",
    );
    let broker = format!("mqtt://127.0.0.1:{port}");

    let mut options = MqttOptions::new(unique_device_id("backoff-observer"), "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(5));
    let (client, mut connection) = Client::new(options, 16);
    let status_topic = topic::device_topic(&device_id, topic::TopicKind::Status);
    client.subscribe(&status_topic, QoS::AtLeastOnce).unwrap();

    let _agent = workspace.start_device(
        &device_id,
        &broker,
        &["--interval", "0.2", "--encoding", "json"],
    );

    // Each connection publishes the online status and ends with the offline last will.
    // Retrying every 250 ms would give about 80 messages in 10 s; a backoff that doubles
    // from 250 ms gives about 12.
    let watch = Duration::from_secs(10);
    let started = Instant::now();
    let mut statuses = 0;
    for notification in connection.iter() {
        if started.elapsed() > watch {
            break;
        }
        if let Ok(Event::Incoming(Packet::Publish(message))) = notification
            && message.topic == status_topic
        {
            statuses += 1;
        }
    }
    assert!(
        statuses >= 2,
        "the agent never connected: {statuses} statuses"
    );
    assert!(
        statuses <= 24,
        "{statuses} status messages in {watch:?}: the agent reconnects without backing off"
    );
}
