//! The MQTT session: connects with a last will, keeps reconnecting with backoff, and
//! publishes the retained online status after every connection.

use std::time::Duration;

use fleet_wire::{DeviceState, ModelRef, Status, topic};
use rumqttc::{AsyncClient, Event, EventLoop, LastWill, MqttOptions, Outgoing, Packet, QoS};
use tokio::sync::watch;

use crate::config::DeviceConfig;

/// Keepalive interval; a silent link is noticed after about 1.5 times this.
const KEEPALIVE: Duration = Duration::from_secs(10);
/// First and largest wait between reconnection attempts.
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(15);
/// Requests the client buffers while the event loop is busy or disconnected.
const REQUEST_CAPACITY: usize = 256;

/// Builds the client and its event loop; nothing connects until the loop is polled.
pub fn connect(config: &DeviceConfig) -> anyhow::Result<(AsyncClient, EventLoop)> {
    let mut options = MqttOptions::new(
        format!("fleet-device-{}", config.device_id),
        config.broker_host.clone(),
        config.broker_port,
    );
    options.set_keep_alive(KEEPALIVE);
    if let Some(credentials) = &config.credentials {
        options.set_credentials(credentials.username.clone(), credentials.password.clone());
    }
    options.set_max_packet_size(
        fleet_wire::MAX_PAYLOAD_BYTES + 1024,
        fleet_wire::MAX_PAYLOAD_BYTES + 1024,
    );
    let will = status_payload(config, None, DeviceState::Offline)?;
    options.set_last_will(LastWill::new(
        topic::device_topic(&config.device_id, topic::TopicKind::Status),
        will,
        QoS::AtLeastOnce,
        true,
    ));
    Ok(AsyncClient::new(options, REQUEST_CAPACITY))
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

/// The broker address for log lines, and the retained status messages the session
/// publishes.
#[derive(Debug, Clone)]
pub struct StatusMessages {
    /// `HOST:PORT` of the broker.
    pub broker: String,
    pub topic: String,
    pub online: Vec<u8>,
    pub offline: Vec<u8>,
}

/// How long a clean shutdown waits for queued messages to reach the broker.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(3);

/// Polls the event loop until `shutdown` turns true, reconnecting with exponential
/// backoff and jitter, and sends the online status retained after each connection.
/// On shutdown it sends the offline status and a clean disconnect after everything
/// already queued.
pub async fn drive(
    mut eventloop: EventLoop,
    client: AsyncClient,
    status: StatusMessages,
    connected: watch::Sender<bool>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = BACKOFF_MIN;
    let mut failures = 0u64;
    loop {
        let event = tokio::select! {
            event = eventloop.poll() => event,
            _ = shutdown.changed() => break,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                tracing::info!(code = ?ack.code, after_failures = failures, "connected to broker");
                backoff = BACKOFF_MIN;
                failures = 0;
                connected.send_replace(true);
                let publish = client.try_publish(
                    &status.topic,
                    QoS::AtLeastOnce,
                    true,
                    status.online.clone(),
                );
                if let Err(error) = publish {
                    tracing::warn!(%error, "online status not queued");
                }
            }
            Ok(_) => {}
            Err(error) => {
                connected.send_replace(false);
                failures += 1;
                // Log the first failures and then every tenth, so a long outage does not
                // flood the log.
                if failures <= 3 || failures.is_multiple_of(10) {
                    tracing::warn!(%error, broker = %status.broker, failures, retry_in_ms = backoff.as_millis() as u64, "broker connection failed, retrying");
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
    flush_and_disconnect(&mut eventloop, &client, &status).await;
    connected.send_replace(false);
}

async fn flush_and_disconnect(
    eventloop: &mut EventLoop,
    client: &AsyncClient,
    status: &StatusMessages,
) {
    let queued = client
        .try_publish(
            &status.topic,
            QoS::AtLeastOnce,
            true,
            status.offline.clone(),
        )
        .and_then(|()| client.try_disconnect());
    if let Err(error) = queued {
        tracing::warn!(%error, "offline status not queued; the broker will publish the last will");
    }
    let deadline = tokio::time::sleep(FLUSH_TIMEOUT);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            event = eventloop.poll() => match event {
                Ok(Event::Outgoing(Outgoing::Disconnect)) => break,
                Ok(_) => {}
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
