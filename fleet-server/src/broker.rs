//! The embedded MQTT broker (rumqttd), used when no external broker is configured.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::Context;

/// How long startup waits for the broker to accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Starts rumqttd for MQTT 3.1.1 on `listen` (port 0 picks a free port) in a background
/// thread and returns the address it accepts connections on.
///
/// rumqttd's `Broker::start` blocks for the life of the broker and has no stop call,
/// so the broker lives until the process exits.
pub fn start_embedded(listen: SocketAddr, max_payload_bytes: usize) -> anyhow::Result<SocketAddr> {
    let listen = resolve_port(listen)?;
    // rumqttd has no defaults for its settings, so the whole configuration is spelled
    // out and deserialized, as its own config file would be.
    let text = format!(
        r#"
        id = 0
        [router]
        id = 0
        max_connections = 20000
        max_outgoing_packet_count = 1000
        max_segment_size = 104857600
        max_segment_count = 10

        [v4.1]
        name = "v4-1"
        listen = "{listen}"
        next_connection_delay_ms = 0
        [v4.1.connections]
        connection_timeout_ms = 60000
        max_payload_size = {max_payload_bytes}
        max_inflight_count = 500
        dynamic_filters = true
        "#
    );
    let config: rumqttd::Config =
        toml::from_str(&text).context("invalid embedded broker settings")?;
    let mut broker = rumqttd::Broker::new(config);
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            if let Err(error) = broker.start() {
                tracing::error!(%error, "embedded MQTT broker stopped");
            }
        })
        .context("failed to start the embedded broker thread")?;
    wait_until_accepting(listen)?;
    tracing::info!(%listen, "embedded MQTT broker listening");
    Ok(listen)
}

/// Checks that `listen` is free and replaces port 0 with a port that is free now.
///
/// rumqttd binds in its own thread and only logs a failure, and the readiness check
/// below would then connect to whatever already listens there, such as a Mosquitto.
/// Binding here first turns that into an error. Another process could still take the
/// port in the moment between this check and rumqttd's bind.
fn resolve_port(listen: SocketAddr) -> anyhow::Result<SocketAddr> {
    let probe = TcpListener::bind(listen).map_err(|error| {
        if error.kind() == std::io::ErrorKind::AddrInUse {
            anyhow::anyhow!(
                "MQTT address {listen} is already in use, perhaps by another broker: use \
                 that broker with --broker mqtt://{listen}, or pick another --mqtt-listen"
            )
        } else {
            anyhow::Error::new(error).context(format!("failed to bind {listen}"))
        }
    })?;
    Ok(probe.local_addr()?)
}

fn wait_until_accepting(address: SocketAddr) -> anyhow::Result<()> {
    let started = Instant::now();
    while started.elapsed() < READY_TIMEOUT {
        if TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    anyhow::bail!(
        "the embedded MQTT broker did not accept connections on {address} within {}s; is the port in use?",
        READY_TIMEOUT.as_secs()
    )
}
