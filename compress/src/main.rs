//! `compress`: the build-time compressor's command line.

use clap::Parser;

/// Inspect ONNX models, measure them, distil smaller students and write signed bundles
/// for the fleet.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: fleet_compress::cli::Command,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    fleet_compress::cli::run(Cli::parse().command)
}
