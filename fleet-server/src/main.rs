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
    let args = Cli::parse().args;
    // rumqttd logs routine disconnects at error level, so its log is off unless RUST_LOG
    // enables it.
    let _tracing = fleet_server::logging::init(
        args.log_format,
        "info,rumqttd=off",
        args.otlp_endpoint.as_deref(),
        "fleet-server",
    )?;
    fleet_server::cli::run(args).await
}
