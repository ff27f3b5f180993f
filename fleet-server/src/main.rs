//! `fleet-server`: the fleet server binary.

use clap::Parser;

/// Take in device telemetry over MQTT, store it in SQLite and serve the console.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    args: fleet_server::cli::ServerArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                // rumqttd logs routine disconnects at error level.
                .unwrap_or_else(|_| "info,rumqttd=off".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    fleet_server::cli::run(Cli::parse().args).await
}
