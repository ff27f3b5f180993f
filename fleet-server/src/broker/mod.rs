//! The embedded MQTT broker (rumqttd), used when no external broker is configured.
//!
//! Clients reach it through [`proxy`], which authenticates them and enforces the topic
//! rules; rumqttd itself listens on a loopback port that only the proxy and the
//! server's own ingester can log in to.

pub mod proxy;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::watch;

use crate::ServerMetrics;
use crate::store::Store;
pub use proxy::ClientAccess;

/// User name of the server's own ingester on the embedded broker.
pub const INTERNAL_INGESTER: &str = "fleet-server-internal";

/// A running embedded broker.
#[derive(Debug, Clone)]
pub struct EmbeddedBroker {
    /// Address clients connect to: the proxy.
    pub listen: SocketAddr,
    /// rumqttd's own loopback address, for the server's ingester.
    pub internal: SocketAddr,
    /// Password of [`INTERNAL_INGESTER`] on `internal`.
    pub internal_password: Arc<str>,
}

/// Settings of [`start`].
#[derive(Debug, Clone)]
pub struct EmbeddedSettings {
    pub listen: SocketAddr,
    pub max_payload_bytes: usize,
    pub access: ClientAccess,
}

/// Starts rumqttd on a free loopback port and the authenticating proxy on
/// `settings.listen` (port 0 picks a free port). The proxy stops accepting when
/// `shutdown` turns true; rumqttd lives until the process exits.
pub async fn start(
    settings: EmbeddedSettings,
    store: Store,
    metrics: Arc<ServerMetrics>,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<EmbeddedBroker> {
    let public = TcpListener::bind(settings.listen).map_err(|error| {
        if error.kind() == std::io::ErrorKind::AddrInUse {
            anyhow::anyhow!(
                "MQTT address {} is already in use, perhaps by another broker: use that \
                 broker with --broker mqtt://{}, or pick another --mqtt-listen",
                settings.listen,
                settings.listen
            )
        } else {
            anyhow::Error::new(error).context(format!("failed to bind {}", settings.listen))
        }
    })?;
    public.set_nonblocking(true)?;
    let public = tokio::net::TcpListener::from_std(public)?;
    let listen = public.local_addr()?;

    let internal_password: Arc<str> = crate::access::new_secret()?.into();
    let internal = start_rumqttd(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        settings.max_payload_bytes,
        internal_password.clone(),
    )?;
    let context = proxy::ProxyContext {
        upstream: internal,
        upstream_password: internal_password.clone(),
        access: settings.access,
        max_packet_bytes: settings.max_payload_bytes,
        store,
        metrics,
    };
    tokio::spawn(proxy::serve(public, context, shutdown));
    if settings.access == ClientAccess::AllowAnonymous {
        tracing::warn!(
            %listen,
            "embedded MQTT broker accepts clients without credentials and applies no topic rules to them"
        );
    }
    tracing::info!(%listen, %internal, "embedded MQTT broker listening");
    Ok(EmbeddedBroker {
        listen,
        internal,
        internal_password,
    })
}

/// How long startup waits for the broker to accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Starts rumqttd for MQTT 3.1.1 on `listen` (port 0 picks a free port) in a background
/// thread, accepting only logins with `password`, and returns its address.
///
/// rumqttd's `Broker::start` blocks for the life of the broker and has no stop call,
/// so the broker lives until the process exits.
fn start_rumqttd(
    listen: SocketAddr,
    max_payload_bytes: usize,
    password: Arc<str>,
) -> anyhow::Result<SocketAddr> {
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
    let mut config: rumqttd::Config =
        toml::from_str(&text).context("invalid embedded broker settings")?;
    let expected = crate::access::sha256_hex(&password);
    for server in config
        .v4
        .iter_mut()
        .flat_map(|servers| servers.values_mut())
    {
        let expected = expected.clone();
        // Compared as digests, so the comparison's timing reveals nothing about the secret.
        server.set_auth_handler(move |_client_id, _username, password: String| {
            let matches = crate::access::sha256_hex(&password) == expected;
            async move { matches }
        });
    }
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
    Ok(listen)
}

/// Replaces port 0 in `listen` with a port that is free now.
///
/// rumqttd binds in its own thread and only logs a failure, so the port is picked here.
/// Another process could still take it in the moment between this check and rumqttd's
/// bind; the ingester and the proxy would then fail to log in there and keep retrying.
fn resolve_port(listen: SocketAddr) -> anyhow::Result<SocketAddr> {
    let probe = TcpListener::bind(listen)
        .with_context(|| format!("failed to bind the internal broker address {listen}"))?;
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
