//! `fleet`: one binary for the whole path. `fleet demo` runs a fleet on this machine;
//! `fleet server`, `fleet device` and `fleet compress` are the same programs as the
//! `fleet-server`, `fleet-device` and `compress` binaries.

mod demo;

use clap::{Parser, Subcommand};
use fleet_server::logging::LogFormat;

/// Compress a model, run device agents and the fleet server, or start the demo.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Build the bundle of a shipped model, start the fleet server with its embedded
    /// broker and SQLite, and run device agents on shards of real data until Ctrl-C.
    Demo(demo::DemoArgs),
    /// Run the fleet server, administer its credentials and operators, or upload bundles,
    /// send updates and set devices' configuration through it.
    Server(fleet_server::cli::ServerCommand),
    /// Run one device agent.
    Device(fleet_device::DeviceArgs),
    /// Serve one signed bundle over Open Inference Protocol v2 REST with dynamic
    /// batching; the inference gateway starts these as its local replicas.
    Replica(fleet_server::replica::ReplicaArgs),
    /// Inspect, compress (quantize, prune, fp16, distil), evaluate and bundle models.
    Compress {
        #[command(subcommand)]
        command: fleet_compress::cli::Command,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // rumqttd logs routine disconnects at error level, so its log is off unless
    // RUST_LOG enables it.
    let (format, default_filter, otlp_endpoint) = match &cli.command {
        Command::Server(command) if command.subcommand.is_some() => {
            (LogFormat::Text, "warn,rumqttd=off", None)
        }
        Command::Server(command) => (
            command.args.log_format,
            "info,rumqttd=off",
            command.args.otlp_endpoint.clone(),
        ),
        Command::Device(_) => (LogFormat::Text, "info", None),
        Command::Replica(args) => (args.log_format, "info", None),
        Command::Compress { .. } | Command::Demo(_) => (LogFormat::Text, "warn,rumqttd=off", None),
    };
    let _tracing =
        fleet_server::logging::init(format, default_filter, otlp_endpoint.as_deref(), "fleet")?;

    match cli.command {
        Command::Compress { command } => fleet_compress::cli::run(command),
        Command::Demo(args) => runtime()?.block_on(demo::run(args)),
        Command::Server(command) => runtime()?.block_on(command.run()),
        Command::Replica(args) => runtime()?.block_on(fleet_server::replica::run(args)),
        Command::Device(args) => {
            let config = fleet_device::DeviceConfig::resolve(args)?;
            runtime()?.block_on(fleet_device::run(config))
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}
