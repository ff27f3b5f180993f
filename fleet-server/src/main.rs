//! `fleet-server`: the fleet server binary.

use clap::Parser;

/// Take in device telemetry over MQTT, store it in SQLite and serve the console; or,
/// with a subcommand, administer credentials and operators, upload bundles, send
/// updates and set devices' remote configuration.
#[derive(Debug, Parser)]
#[command(version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    subcommand: Option<fleet_server::cli::ServerSubcommand>,
    #[command(flatten)]
    args: fleet_server::cli::ServerArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let command = fleet_server::cli::ServerCommand {
        subcommand: cli.subcommand,
        args: cli.args,
    };
    let args = &command.args;
    // rumqttd logs routine disconnects at error level, so its log is off unless RUST_LOG
    // enables it.
    let _tracing = fleet_server::logging::init(
        args.log_format,
        "info,rumqttd=off",
        args.otlp_endpoint.as_deref(),
        "fleet-server",
    )?;
    command.run().await
}
