//! The fleet server: takes in device telemetry over MQTT, keeps the fleet in SQLite and
//! serves the JSON API and the web console. It also stores signed bundle archives and
//! rolls them out to devices as over-the-air updates ([`updates`]), keeps the hard
//! samples devices upload ([`samples`]), and sets devices' settings remotely
//! ([`remote_config`]).
//!
//! By default it embeds an MQTT broker (rumqttd), so one process is the whole back end.
//! With [`BrokerMode::External`] it subscribes to an existing broker such as Mosquitto.

pub mod access;
pub mod api;
pub mod broker;
pub mod cli;
pub mod gateway;
mod ingest;
pub mod logging;
pub mod metrics;
pub mod remote_config;
pub mod replica;
pub mod samples;
pub mod store;
pub mod updates;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::watch;

pub use ingest::MAX_BATCH as MAX_INGEST_BATCH;
pub use metrics::ServerMetrics;
pub use store::Store;

/// Source of device traffic.
#[derive(Debug, Clone)]
pub enum BrokerMode {
    /// Start rumqttd in this process, behind a proxy listening on this address (port 0
    /// picks one) that authenticates clients and enforces their topic rules.
    Embedded {
        listen: SocketAddr,
        access: broker::ClientAccess,
    },
    /// Subscribe to an existing broker over `connections` connections (see
    /// [`DEFAULT_INGEST_CONNECTIONS`]).
    External {
        url: fleet_mqtt::BrokerUrl,
        /// CA and client certificate files for an `mqtts://` URL.
        tls: fleet_mqtt::TlsFiles,
        connections: usize,
    },
}

/// Ingest connections to an external broker unless configured otherwise. More
/// connections widen the window of unacknowledged messages (see `--ingest-connections`),
/// but on a 2-core machine shared with Mosquitto four were not faster than one.
pub const DEFAULT_INGEST_CONNECTIONS: usize = 1;

/// How long shutdown waits for each task to finish its work.
const SHUTDOWN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Settings of a server instance.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub http_listen: SocketAddr,
    pub broker: BrokerMode,
    /// Fleet state location: a SQLite file path (`sqlite://PATH` or a plain path,
    /// created if missing) or a `postgres://` URL.
    pub database: String,
    /// MQTT client id of the ingester; see [`ServerConfig::default_client_id`].
    pub mqtt_client_id: String,
    /// Shared-subscription group for running several servers on one broker.
    pub shared_group: Option<String>,
    /// Discard the broker session on disconnect instead of resuming it.
    pub clean_session: bool,
    /// User name and password of the ingester on the broker, when it requires them.
    pub mqtt_credentials: Option<fleet_wire::MqttCredentials>,
    /// Raw telemetry older than this is rolled into hourly rows; `None` keeps it all.
    pub telemetry_retention: Option<Duration>,
    /// Bundle folder, signature check and archive URLs of over-the-air updates.
    pub updates: updates::UpdateSettings,
    /// Sample folder and size limit of hard-sample uploads.
    pub samples: samples::SampleSettings,
}

impl ServerConfig {
    /// Returns `fleet-server-HOSTNAME-PORT`, unique per host and HTTP port, so a
    /// restarted server resumes its own broker session.
    pub fn default_client_id(http_listen: SocketAddr) -> String {
        let host = std::fs::read_to_string("/etc/hostname")
            .map(|name| name.trim().to_string())
            .unwrap_or_else(|_| "localhost".into());
        format!("fleet-server-{host}-{}", http_listen.port())
    }
}

/// A started server; dropping it does not stop it, [`Server::shutdown`] does.
#[derive(Debug)]
pub struct Server {
    /// Address the HTTP API and console listen on.
    pub http_addr: SocketAddr,
    /// Address devices connect to: the embedded broker's or the external one's.
    pub mqtt_addr: String,
    pub store: Store,
    pub metrics: Arc<ServerMetrics>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    gateway: Option<gateway::Gateway>,
}

impl Server {
    /// Starts the server as [`Server::start`] does, with the inference gateway's routes
    /// on the same HTTP listener when `gateway` is given.
    pub async fn start_with_gateway(
        config: ServerConfig,
        gateway: Option<gateway::GatewayConfig>,
    ) -> anyhow::Result<Server> {
        Server::start_inner(config, gateway).await
    }

    /// Returns the inference gateway, when the server runs one.
    pub fn gateway(&self) -> Option<&gateway::Gateway> {
        self.gateway.as_ref()
    }

    /// Opens the database, starts the broker when embedded, the ingester and the HTTP
    /// server, and returns once all of them accept work.
    pub async fn start(config: ServerConfig) -> anyhow::Result<Server> {
        Server::start_inner(config, None).await
    }

    async fn start_inner(
        config: ServerConfig,
        gateway: Option<gateway::GatewayConfig>,
    ) -> anyhow::Result<Server> {
        let store = Store::open(&config.database).await?;
        let bundle_dir = config.updates.resolve_bundle_dir(&config.database);
        let archives = updates::archives::ArchiveStore::open(&bundle_dir).with_context(|| {
            format!("failed to open the bundle folder {}", bundle_dir.display())
        })?;
        let sample_dir = config.samples.resolve_sample_dir(&config.database);
        let sample_files = samples::files::SampleFiles::open(&sample_dir).with_context(|| {
            format!("failed to open the sample folder {}", sample_dir.display())
        })?;
        let public_key = match &config.updates.public_key {
            Some(path) => Some(fleet_bundle::PublicKey::read(path).with_context(|| {
                format!("failed to read the bundle public key {}", path.display())
            })?),
            None => None,
        };
        let (shutdown, shutdown_rx) = watch::channel(false);
        let metrics = Arc::new(ServerMetrics::new());
        let mut credentials = config.mqtt_credentials.clone();
        let (broker, mqtt_addr, connections) = match &config.broker {
            BrokerMode::Embedded { listen, access } => {
                let settings = broker::EmbeddedSettings {
                    listen: *listen,
                    max_payload_bytes: fleet_wire::MAX_PAYLOAD_BYTES + 1024,
                    access: *access,
                };
                let embedded = broker::start(
                    settings,
                    store.clone(),
                    metrics.clone(),
                    shutdown_rx.clone(),
                )
                .await?;
                credentials = Some(fleet_wire::MqttCredentials {
                    username: broker::INTERNAL_INGESTER.into(),
                    password: embedded.internal_password.to_string(),
                });
                let internal = ingest::BrokerAddress {
                    host: embedded.internal.ip().to_string(),
                    port: embedded.internal.port(),
                    transport: rumqttc::Transport::Tcp,
                };
                // rumqttd is configured with a window of 500 messages per
                // connection, so one connection is enough.
                (internal, embedded.listen.to_string(), 1)
            }
            BrokerMode::External {
                url,
                tls,
                connections,
            } => (
                ingest::BrokerAddress {
                    host: url.host.clone(),
                    port: url.port,
                    transport: fleet_mqtt::transport(url, tls)
                        .with_context(|| format!("invalid TLS settings for broker {url}"))?,
                },
                url.to_string(),
                *connections,
            ),
        };

        let ingest_options = ingest::IngestOptions {
            client_id: config.mqtt_client_id.clone(),
            shared_group: config.shared_group.clone(),
            clean_session: config.clean_session,
            credentials,
            connections,
        };
        let (online_tx, online_rx) = tokio::sync::mpsc::unbounded_channel();
        let ingest::Ingest {
            mut tasks,
            commands,
        } = ingest::spawn(
            broker,
            ingest_options,
            store.clone(),
            metrics.clone(),
            online_tx,
            shutdown_rx.clone(),
        );

        let listener = tokio::net::TcpListener::bind(config.http_listen)
            .await
            .with_context(|| format!("failed to listen for HTTP on {}", config.http_listen))?;
        let http_addr = listener.local_addr()?;
        let public_url = match &config.updates.public_url {
            Some(url) => url.clone(),
            None => format!("http://{http_addr}"),
        };
        if config.updates.public_url.is_none() && http_addr.ip().is_unspecified() {
            tracing::warn!(
                %public_url,
                "devices cannot download bundles from an unspecified address; set --public-url"
            );
        }
        let publisher = updates::commands::CommandPublisher::new(commands, public_url);
        let updates = Arc::new(updates::Updates {
            store: store.clone(),
            archives,
            public_key,
            max_bundle_bytes: config.updates.max_bundle_bytes,
            publisher: publisher.clone(),
            metrics: metrics.clone(),
        });
        let remote_config = Arc::new(remote_config::RemoteConfigs::new(
            store.clone(),
            publisher,
            metrics.clone(),
        ));
        tasks.push(tokio::spawn(resend_on_online(
            updates.clone(),
            remote_config.clone(),
            online_rx,
            shutdown_rx.clone(),
        )));
        let mut app = api::router(api::ApiState {
            store: store.clone(),
            metrics: metrics.clone(),
            login_limiter: Default::default(),
            updates,
            remote_config,
            samples: Arc::new(samples::Samples {
                store: store.clone(),
                files: sample_files,
                max_sample_bytes: config.samples.max_sample_bytes,
                metrics: metrics.clone(),
            }),
        });
        let gateway = match gateway {
            Some(gateway) => {
                let started =
                    gateway::Gateway::start(gateway, store.clone(), metrics.gateway.clone())
                        .await
                        .context("failed to start the inference gateway")?;
                app = app.merge(started.router());
                Some(started)
            }
            None => None,
        };
        if let Some(retention) = config.telemetry_retention {
            tasks.push(tokio::spawn(downsample_periodically(
                store.clone(),
                retention,
                shutdown_rx.clone(),
            )));
        }
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
        tracing::info!(
            %http_addr,
            %mqtt_addr,
            database = %store::redact_password(&config.database),
            bundle_dir = %bundle_dir.display(),
            sample_dir = %sample_dir.display(),
            "fleet server started"
        );
        Ok(Server {
            http_addr,
            mqtt_addr,
            store,
            metrics,
            shutdown,
            tasks,
            gateway,
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
        if let Some(gateway) = self.gateway {
            gateway.shutdown().await;
        }
        tracing::info!("fleet server stopped");
    }
}

/// How often raw telemetry past its retention is rolled into hourly rows.
const DOWNSAMPLE_INTERVAL: Duration = Duration::from_secs(600);

/// Rolls raw telemetry older than `retention` into hourly rows now and then every
/// [`DOWNSAMPLE_INTERVAL`] until shutdown. Replicas may all run it: the store makes
/// concurrent runs count each raw row once.
async fn downsample_periodically(
    store: Store,
    retention: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut ticker = tokio::time::interval(DOWNSAMPLE_INTERVAL);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.changed() => return,
        }
        let cutoff = unix_millis().saturating_sub(retention.as_millis() as u64);
        match store.downsample(cutoff).await {
            Ok(outcome) => tracing::info!(
                raw_rows = outcome.raw_rows,
                hourly_rows = outcome.hourly_rows,
                "old telemetry downsampled"
            ),
            Err(error) => tracing::error!(
                error = format!("{:#}", anyhow::Error::from(error)),
                "downsampling failed, retrying at the next interval"
            ),
        }
    }
}

/// Sends each device id received on `online` the commands it may have missed, until
/// shutdown: those of its unfinished updates and its pending configuration change.
/// Ingestion sends a device id each time that device's status turns online.
async fn resend_on_online(
    updates: Arc<updates::Updates>,
    remote_config: Arc<remote_config::RemoteConfigs>,
    mut online: tokio::sync::mpsc::UnboundedReceiver<String>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let device_id = tokio::select! {
            device_id = online.recv() => match device_id {
                Some(device_id) => device_id,
                None => return,
            },
            _ = shutdown.changed() => return,
        };
        updates::commands::resend_unfinished(&updates, &device_id).await;
        remote_config::commands::resend_pending(&remote_config, &device_id).await;
    }
}

/// Milliseconds since the Unix epoch by the server clock.
pub fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
