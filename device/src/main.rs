//! `fleet-device`: the device agent binary.

use clap::Parser;
use fleet_device::{DeviceArgs, DeviceConfig};

/// Run a signed model bundle on local data and report telemetry over MQTT.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    args: DeviceArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let config = DeviceConfig::resolve(Cli::parse().args)?;
    fleet_device::run(config).await
}
