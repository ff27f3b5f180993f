//! `fleet-replica`: serves one signed bundle over Open Inference Protocol v2 REST with
//! dynamic batching; the same program as `fleet replica`.

use clap::Parser;

/// Serve a bundle's model over Open Inference Protocol v2 REST.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    args: fleet_server::replica::ReplicaArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let _tracing = fleet_server::logging::init(cli.args.log_format, "info", None, "fleet-replica")?;
    fleet_server::replica::run(cli.args).await
}
