//! The fleet server: takes in device telemetry over MQTT, keeps the fleet in SQLite and
//! serves the JSON API and the web console.
//!
//! By default it embeds an MQTT broker (rumqttd), so one process is the whole back end.
//! With [`BrokerMode::External`] it subscribes to an existing broker such as Mosquitto.

pub mod api;
mod broker;
pub mod cli;
mod ingest;
pub mod store;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use tokio::sync::watch;

pub use ingest::IngestCounters;
pub use store::Store;

/// Source of device traffic.
#[derive(Debug, Clone)]
pub enum BrokerMode {
    /// Start rumqttd in this process, listening on this address (port 0 picks one).
    Embedded { listen: SocketAddr },
    /// Subscribe to an existing broker.
    External { host: String, port: u16 },
}

/// How long shutdown waits for each task to finish its work.
const SHUTDOWN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Settings of a server instance.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub http_listen: SocketAddr,
    pub broker: BrokerMode,
    /// SQLite database file, created if missing.
    pub database: PathBuf,
}

/// A started server; dropping it does not stop it, [`Server::shutdown`] does.
#[derive(Debug)]
pub struct Server {
    /// Address the HTTP API and console listen on.
    pub http_addr: SocketAddr,
    /// Address devices connect to: the embedded broker's or the external one's.
    pub mqtt_addr: String,
    pub store: Store,
    pub counters: Arc<IngestCounters>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Server {
    /// Opens the database, starts the broker when embedded, the ingester and the HTTP
    /// server, and returns once all of them accept work.
    pub async fn start(config: ServerConfig) -> anyhow::Result<Server> {
        let store = Store::open_sqlite(&config.database)
            .await
            .with_context(|| format!("failed to open database {}", config.database.display()))?;
        let broker = match &config.broker {
            BrokerMode::Embedded { listen } => {
                let address =
                    broker::start_embedded(*listen, fleet_wire::MAX_PAYLOAD_BYTES + 1024)?;
                ingest::BrokerAddress {
                    host: address.ip().to_string(),
                    port: address.port(),
                }
            }
            BrokerMode::External { host, port } => ingest::BrokerAddress {
                host: host.clone(),
                port: *port,
            },
        };
        let mqtt_addr = format!("{}:{}", broker.host, broker.port);

        let (shutdown, shutdown_rx) = watch::channel(false);
        let counters = Arc::new(IngestCounters::default());
        let mut tasks = ingest::spawn(broker, store.clone(), counters.clone(), shutdown_rx.clone());

        let listener = tokio::net::TcpListener::bind(config.http_listen)
            .await
            .with_context(|| format!("failed to listen for HTTP on {}", config.http_listen))?;
        let http_addr = listener.local_addr()?;
        let app = api::router(api::ApiState {
            store: store.clone(),
            counters: counters.clone(),
        });
        let mut http_shutdown = shutdown_rx;
        tasks.push(tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = http_shutdown.changed().await;
                })
                .await;
            if let Err(error) = served {
                tracing::error!(%error, "HTTP server failed");
            }
        }));
        tracing::info!(%http_addr, %mqtt_addr, database = %config.database.display(), "fleet server started");
        Ok(Server {
            http_addr,
            mqtt_addr,
            store,
            counters,
            shutdown,
            tasks,
        })
    }

    /// Stops reading from the broker, lets the writer store and acknowledge what was
    /// already received, stops the HTTP server, and waits for all of it.
    pub async fn shutdown(self) {
        self.shutdown.send_replace(true);
        for mut task in self.tasks {
            if tokio::time::timeout(SHUTDOWN_TIMEOUT, &mut task)
                .await
                .is_err()
            {
                tracing::warn!("a server task did not stop in time and was aborted");
                task.abort();
            }
        }
        tracing::info!("fleet server stopped");
    }
}

/// Milliseconds since the Unix epoch by the server clock.
pub fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
