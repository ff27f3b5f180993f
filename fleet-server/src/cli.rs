//! Command-line flags of the server, shared by `fleet-server` and `fleet server`.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use crate::{BrokerMode, Server, ServerConfig};

/// Flags of the fleet server.
#[derive(Debug, Clone, Args)]
pub struct ServerArgs {
    /// Address for the HTTP API and web console.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub http: SocketAddr,
    /// Use an existing MQTT broker, as mqtt://HOST:PORT, instead of the embedded one.
    #[arg(long)]
    pub broker: Option<String>,
    /// Address the embedded broker listens on when --broker is not given.
    #[arg(long, default_value = "127.0.0.1:1883")]
    pub mqtt_listen: SocketAddr,
    /// SQLite database file, created if missing.
    #[arg(long, default_value = "fleet.db")]
    pub database: PathBuf,
}

impl ServerArgs {
    /// Turns the flags into a server configuration.
    pub fn to_config(&self) -> anyhow::Result<ServerConfig> {
        let broker = match &self.broker {
            Some(url) => {
                let (host, port) = fleet_wire::parse_broker_url(url)
                    .map_err(anyhow::Error::msg)
                    .context("invalid --broker")?;
                BrokerMode::External { host, port }
            }
            None => BrokerMode::Embedded {
                listen: self.mqtt_listen,
            },
        };
        Ok(ServerConfig {
            http_listen: self.http,
            broker,
            database: self.database.clone(),
        })
    }
}

/// Runs the server until SIGINT or SIGTERM.
pub async fn run(args: ServerArgs) -> anyhow::Result<()> {
    let server = Server::start(args.to_config()?).await?;
    tracing::info!(console = %format!("http://{}/", server.http_addr), "console ready");
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result?,
        _ = terminate.recv() => {}
    }
    server.shutdown().await;
    Ok(())
}
