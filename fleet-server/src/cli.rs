//! Command-line flags of the server, shared by `fleet-server` and `fleet server`.

use std::net::SocketAddr;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};

use crate::access::admin::AdminCommand;
use crate::logging::LogFormat;
use crate::remote_config::cli::ConfigCommand;
use crate::samples::{DEFAULT_MAX_SAMPLE_BYTES, SampleSettings};
use crate::updates::cli::{BundleCommand, UpdateCommand};
use crate::updates::{DEFAULT_MAX_BUNDLE_BYTES, UpdateSettings};
use crate::{BrokerMode, Server, ServerConfig};

/// The server's command line: its flags, or one subcommand.
#[derive(Debug, Clone, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct ServerCommand {
    #[command(subcommand)]
    pub subcommand: Option<ServerSubcommand>,
    #[command(flatten)]
    pub args: ServerArgs,
}

/// Subcommands of the server: administration on the database, and bundle, update and
/// configuration commands that call a running server's HTTP API.
#[derive(Debug, Clone, Subcommand)]
pub enum ServerSubcommand {
    #[command(flatten)]
    Admin(AdminCommand),
    /// Upload and list bundle archives for over-the-air updates.
    #[command(subcommand)]
    Bundle(BundleCommand),
    /// Send bundles to devices and follow the updates.
    #[command(subcommand)]
    Update(UpdateCommand),
    /// Set and show the settings the server overrides on a device.
    #[command(subcommand)]
    Config(ConfigCommand),
}

impl ServerCommand {
    /// Runs the subcommand if there is one, else the server until SIGINT or SIGTERM.
    pub async fn run(self) -> anyhow::Result<()> {
        match self.subcommand {
            Some(ServerSubcommand::Admin(command)) => crate::access::admin::run(command).await,
            Some(ServerSubcommand::Bundle(command)) => {
                crate::updates::cli::run_bundle(command).await
            }
            Some(ServerSubcommand::Update(command)) => {
                crate::updates::cli::run_update(command).await
            }
            Some(ServerSubcommand::Config(command)) => {
                crate::remote_config::cli::run_config(command).await
            }
            None => run(self.args).await,
        }
    }
}

/// Flags of the fleet server.
#[derive(Debug, Clone, Args)]
pub struct ServerArgs {
    /// Address for the HTTP API and web console.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub http: SocketAddr,
    /// Use an existing MQTT broker instead of the embedded one, as mqtt://HOST:PORT, or
    /// mqtts://HOST:PORT for TLS.
    #[arg(long)]
    pub broker: Option<String>,
    /// PEM file with the CA certificates an mqtts:// broker's certificate must chain to
    /// [default: the operating system's trust store].
    #[arg(long, requires = "broker")]
    pub broker_ca: Option<PathBuf>,
    /// PEM client certificate for an mqtts:// broker that requires one; needs
    /// --broker-client-key.
    #[arg(long, requires = "broker_client_key")]
    pub broker_client_cert: Option<PathBuf>,
    /// PEM private key of --broker-client-cert.
    #[arg(long, requires = "broker_client_cert")]
    pub broker_client_key: Option<PathBuf>,
    /// Address the embedded broker listens on when --broker is not given.
    #[arg(long, default_value = "127.0.0.1:1883")]
    pub mqtt_listen: SocketAddr,
    /// Connections to the external broker that receive telemetry, split through a
    /// shared subscription. More connections allow larger write batches, because the
    /// broker limits unacknowledged messages per connection.
    #[arg(long, default_value_t = crate::DEFAULT_INGEST_CONNECTIONS, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=64), requires = "broker")]
    pub ingest_connections: usize,
    /// Let clients without credentials use the embedded broker, with no topic rules.
    /// Clients that send a user name are still checked. Only for closed test and
    /// benchmark setups; by default every client needs a credential from
    /// `provision-device` or `provision-ingester`.
    #[arg(long, conflicts_with = "broker")]
    pub allow_anonymous: bool,
    /// Fleet state: a SQLite file (a path or sqlite://PATH, created if missing) or a
    /// PostgreSQL URL (postgres://USER@HOST:PORT/DATABASE).
    #[arg(long, default_value = "fleet.db")]
    pub database: String,
    /// MQTT client id of the ingester. The broker keeps its session while the server is
    /// down and delivers what it missed after a restart with the same id. Replicas need
    /// different ids [default: fleet-server-HOSTNAME-HTTPPORT].
    #[arg(long)]
    pub mqtt_client_id: Option<String>,
    /// MQTT user name of the ingester, for a broker that requires one; the password is
    /// read from --mqtt-password-file.
    #[arg(long, requires = "mqtt_password_file")]
    pub mqtt_username: Option<String>,
    /// File whose first line is the ingester's MQTT password.
    #[arg(long, requires = "mqtt_username")]
    pub mqtt_password_file: Option<std::path::PathBuf>,
    /// Start a new broker session on every connection instead of resuming the last one.
    /// Meant for short-lived servers such as tests, which would otherwise leave sessions
    /// queueing messages on the broker after they exit.
    #[arg(long)]
    pub mqtt_clean_session: bool,
    /// Join this MQTT shared-subscription group, so several servers on one broker split
    /// the telemetry between them (`$share/GROUP/fleet/v1/+/telemetry`).
    #[arg(long)]
    pub shared_group: Option<String>,
    /// Roll raw telemetry older than this many hours into hourly rows per device; raw
    /// rows are kept forever when not given.
    #[arg(long)]
    pub telemetry_retention_hours: Option<u64>,
    /// Log format on standard error.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Export traces over OTLP/HTTP to this collector URL, such as
    /// http://127.0.0.1:4318/v1/traces; off when not given.
    #[arg(long)]
    pub otlp_endpoint: Option<String>,
    /// Serve the inference gateway with the models, limits and replica settings in this
    /// TOML file. It speaks Open Inference Protocol v2 under /v2 on the --http listener
    /// (docs/gateway.md).
    #[arg(long)]
    pub gateway_config: Option<std::path::PathBuf>,
    /// Folder for uploaded bundle archives, created if missing [default: fleet-bundles
    /// beside the SQLite database, or in the working directory for PostgreSQL].
    #[arg(long)]
    pub bundle_dir: Option<PathBuf>,
    /// Accept only bundle uploads signed with this ed25519 public key file, as written by
    /// `compress keygen`. Without it any readable bundle archive is stored, and only
    /// devices check signatures.
    #[arg(long)]
    pub bundle_public_key: Option<PathBuf>,
    /// Largest bundle archive accepted by POST /api/bundles, in bytes.
    #[arg(long, default_value_t = DEFAULT_MAX_BUNDLE_BYTES)]
    pub max_bundle_bytes: u64,
    /// Base URL devices download bundle archives from, as they reach this server, such as
    /// http://fleet.example:8080 [default: http:// and the --http address].
    #[arg(long)]
    pub public_url: Option<String>,
    /// Folder for the hard samples devices upload, created if missing [default:
    /// fleet-samples beside the SQLite database, or in the working directory for
    /// PostgreSQL].
    #[arg(long)]
    pub sample_dir: Option<PathBuf>,
    /// Maximum size of a hard sample that POST /api/samples accepts, in bytes.
    #[arg(long, default_value_t = DEFAULT_MAX_SAMPLE_BYTES)]
    pub max_sample_bytes: u64,
}

impl ServerArgs {
    /// Turns the flags into a server configuration.
    pub fn to_config(&self) -> anyhow::Result<ServerConfig> {
        let broker = match &self.broker {
            Some(url) => {
                let url = fleet_mqtt::BrokerUrl::parse(url).context("invalid --broker")?;
                BrokerMode::External {
                    url,
                    tls: fleet_mqtt::TlsFiles {
                        ca: self.broker_ca.clone(),
                        client_cert: self.broker_client_cert.clone(),
                        client_key: self.broker_client_key.clone(),
                    },
                    connections: self.ingest_connections,
                }
            }
            None => BrokerMode::Embedded {
                listen: self.mqtt_listen,
                access: if self.allow_anonymous {
                    crate::broker::ClientAccess::AllowAnonymous
                } else {
                    crate::broker::ClientAccess::Credentials
                },
            },
        };
        if let Some(group) = &self.shared_group
            && (group.is_empty() || group.contains(['/', '+', '#']))
        {
            anyhow::bail!("invalid --shared-group {group:?}: use a name without '/', '+' or '#'");
        }
        let mqtt_credentials = match (&self.mqtt_username, &self.mqtt_password_file) {
            (Some(username), Some(path)) => Some(
                fleet_wire::MqttCredentials::read(username.clone(), path)
                    .map_err(anyhow::Error::msg)?,
            ),
            _ => None,
        };
        Ok(ServerConfig {
            mqtt_credentials,
            http_listen: self.http,
            broker,
            database: self.database.clone(),
            mqtt_client_id: self
                .mqtt_client_id
                .clone()
                .unwrap_or_else(|| ServerConfig::default_client_id(self.http)),
            shared_group: self.shared_group.clone(),
            clean_session: self.mqtt_clean_session,
            telemetry_retention: self
                .telemetry_retention_hours
                .map(|hours| std::time::Duration::from_secs(hours * 3600)),
            updates: self.update_settings()?,
            samples: self.sample_settings()?,
        })
    }

    /// Checks and collects the over-the-air update flags.
    fn update_settings(&self) -> anyhow::Result<UpdateSettings> {
        if let Some(url) = &self.public_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            anyhow::bail!("invalid --public-url {url:?}: expected http://HOST:PORT or https://...");
        }
        if self.max_bundle_bytes == 0 {
            anyhow::bail!("invalid --max-bundle-bytes 0: give a limit of at least 1 byte");
        }
        Ok(UpdateSettings {
            bundle_dir: self.bundle_dir.clone(),
            public_key: self.bundle_public_key.clone(),
            max_bundle_bytes: self.max_bundle_bytes,
            public_url: self.public_url.clone(),
        })
    }

    /// Checks and collects the hard-sample flags.
    fn sample_settings(&self) -> anyhow::Result<SampleSettings> {
        if self.max_sample_bytes == 0 {
            anyhow::bail!("invalid --max-sample-bytes 0: give a limit of at least 1 byte");
        }
        Ok(SampleSettings {
            sample_dir: self.sample_dir.clone(),
            max_sample_bytes: self.max_sample_bytes,
        })
    }
}

/// Runs the server until SIGINT or SIGTERM.
pub async fn run(args: ServerArgs) -> anyhow::Result<()> {
    let gateway = match &args.gateway_config {
        Some(path) => Some(crate::gateway::GatewayConfig::from_file(path)?),
        None => None,
    };
    let server = Server::start_with_gateway(args.to_config()?, gateway).await?;
    tracing::info!(console = %format!("http://{}/", server.http_addr), "console ready");
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result?,
        _ = terminate.recv() => {}
    }
    server.shutdown().await;
    Ok(())
}
