//! `fleet-server bundle ...` and `fleet-server update ...`: upload bundles, start
//! updates and follow them through a running server's HTTP API.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};

use super::client::FleetClient;
use super::http::CreateUpdates;
use crate::store::updates::UpdateRecord;

/// The server to call and the token to call it with.
#[derive(Debug, Clone, Args)]
pub struct ServerConnection {
    /// Base URL of the fleet server's HTTP API.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub server: String,
    /// File whose first line is an operator API token, as `fleet-server create-token`
    /// writes it.
    #[arg(long)]
    pub token_file: PathBuf,
}

impl ServerConnection {
    /// Reads the token file and returns a client of the server.
    pub(crate) fn client(&self) -> anyhow::Result<FleetClient> {
        let token = std::fs::read_to_string(&self.token_file)
            .with_context(|| format!("failed to read token file {}", self.token_file.display()))?;
        let token = token.lines().next().unwrap_or_default().trim();
        if token.is_empty() {
            anyhow::bail!("token file {} is empty", self.token_file.display());
        }
        Ok(FleetClient::new(&self.server, token)?)
    }
}

/// `fleet-server bundle` commands.
#[derive(Debug, Clone, Subcommand)]
pub enum BundleCommand {
    /// Pack a signed bundle folder into an archive and upload it. Prints the archive's
    /// SHA-256, which `update send --bundle` takes, then the bundle's name and version.
    Upload {
        /// Bundle folder with manifest.json and manifest.sig, as `compress bundle`
        /// writes it.
        bundle_dir: PathBuf,
        #[command(flatten)]
        connection: ServerConnection,
    },
    /// List the stored bundles, newest first.
    List {
        #[command(flatten)]
        connection: ServerConnection,
    },
}

/// `fleet-server update` commands.
#[derive(Debug, Clone, Subcommand)]
pub enum UpdateCommand {
    /// Send a stored bundle to devices. Each device gets an update that replaces its
    /// unfinished one, if any.
    Send {
        /// SHA-256 of the bundle archive, as `bundle upload` prints it.
        #[arg(long)]
        bundle: String,
        #[command(flatten)]
        targets: UpdateTargets,
        #[command(flatten)]
        connection: ServerConnection,
    },
    /// List updates, newest first, with their current stage.
    List {
        /// Only the updates of this device.
        #[arg(long)]
        device: Option<String>,
        /// Maximum number of updates to list.
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[command(flatten)]
        connection: ServerConnection,
    },
    /// Show one update and every event its device reported.
    Show {
        id: String,
        #[command(flatten)]
        connection: ServerConnection,
    },
}

/// The devices an update goes to: a list of ids or a pattern, exactly one of the two.
#[derive(Debug, Clone, Args)]
#[group(required = true, multiple = false)]
pub struct UpdateTargets {
    /// Device to update; repeat for several.
    #[arg(long = "device", value_name = "ID")]
    pub devices: Vec<String>,
    /// Update every known device whose id matches this pattern, with `*` for any run of
    /// characters and `?` for one, such as 'jetson-*'.
    #[arg(long)]
    pub group: Option<String>,
}

/// Runs a `bundle` command, printing the result on standard output.
pub async fn run_bundle(command: BundleCommand) -> anyhow::Result<()> {
    blocking(move || match command {
        BundleCommand::Upload {
            bundle_dir,
            connection,
        } => {
            let uploaded = connection.client()?.upload_bundle(&bundle_dir)?;
            let bundle = uploaded.bundle;
            println!("{}  {} {}", bundle.sha256, bundle.name, bundle.version);
            if !uploaded.created {
                eprintln!("the server already stored this archive");
            }
            Ok(())
        }
        BundleCommand::List { connection } => {
            let bundles = connection.client()?.bundles()?;
            println!(
                "{:<64}  {:<24} {:<12} {:>12}  uploaded by",
                "sha256", "name", "version", "bytes"
            );
            for bundle in bundles {
                println!(
                    "{:<64}  {:<24} {:<12} {:>12}  {}",
                    bundle.sha256, bundle.name, bundle.version, bundle.size, bundle.uploaded_by
                );
            }
            Ok(())
        }
    })
    .await
}

/// Runs an `update` command, printing the result on standard output.
pub async fn run_update(command: UpdateCommand) -> anyhow::Result<()> {
    blocking(move || match command {
        UpdateCommand::Send {
            bundle,
            targets,
            connection,
        } => {
            let request = CreateUpdates {
                bundle,
                devices: targets.group.is_none().then_some(targets.devices),
                group: targets.group,
            };
            let created = connection.client()?.create_updates(&request)?;
            print_updates(&created.updates);
            for old in &created.superseded {
                println!(
                    "{} on {} superseded by {}",
                    old.update_id, old.device_id, old.replaced_by
                );
            }
            if !created.unsent.is_empty() {
                eprintln!(
                    "commands of {} not sent yet; the server sends them when each device \
                     comes online",
                    created.unsent.join(", ")
                );
            }
            Ok(())
        }
        UpdateCommand::List {
            device,
            limit,
            connection,
        } => {
            let updates = connection.client()?.updates(device.as_deref(), limit)?;
            print_updates(&updates);
            Ok(())
        }
        UpdateCommand::Show { id, connection } => {
            let detail = connection.client()?.update(&id)?;
            print_updates(std::slice::from_ref(&detail.update));
            println!();
            println!("{:<16} {:<16} detail", "received_ms", "stage");
            for event in &detail.events {
                println!(
                    "{:<16} {:<16} {}",
                    event.received_ms, event.stage, event.detail
                );
            }
            Ok(())
        }
    })
    .await
}

/// Prints updates as a table, one per line.
fn print_updates(updates: &[UpdateRecord]) {
    println!(
        "{:<18} {:<20} {:<24} {:<12} {:<16} {:<16} detail",
        "update", "device", "bundle", "version", "stage", "updated_ms"
    );
    for update in updates {
        println!(
            "{:<18} {:<20} {:<24} {:<12} {:<16} {:<16} {}",
            update.update_id,
            update.device_id,
            update.name,
            update.version,
            update.stage,
            update.updated_ms,
            update.detail
        );
    }
}

/// Runs `work` on the blocking pool, where the blocking HTTP client may run.
pub(crate) async fn blocking(
    work: impl FnOnce() -> anyhow::Result<()> + Send + 'static,
) -> anyhow::Result<()> {
    tokio::task::spawn_blocking(work)
        .await
        .context("the command's worker thread failed")?
}
