//! `fleet-device`: the device agent binary.

use clap::{Parser, Subcommand};
use fleet_device::check::SelfTestArgs;
use fleet_device::{DeviceArgs, DeviceConfig};

/// Run a signed model bundle on local data and report telemetry over MQTT.
#[derive(Debug, Parser)]
#[command(version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Check>,
    #[command(flatten)]
    args: DeviceArgs,
}

/// Checks that run without a broker.
#[derive(Debug, Subcommand)]
enum Check {
    /// Verify a bundle, reproduce its reference outputs and classify a few inputs.
    SelfTest(SelfTestArgs),
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    // The self-test starts no thread, so it also runs where threads cannot be created,
    // such as under qemu-user on some build machines.
    if let Some(Check::SelfTest(args)) = cli.command {
        return fleet_device::check::self_test(&args);
    }
    let config = DeviceConfig::resolve(cli.args)?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(fleet_device::run(config))
}
