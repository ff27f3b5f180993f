//! Administration commands: issue and revoke credentials, set operator passwords,
//! create API tokens, and write Mosquitto's password and ACL files.
//!
//! They work on the database directly, so they run beside a running server (SQLite
//! waits for the server's write lock) or before the first start.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};

use crate::store::Store;
use crate::store::access::CredentialRole;

/// The fleet database to administer.
#[derive(Debug, Clone, Args)]
pub struct DatabaseArg {
    /// Fleet state: a SQLite file or a PostgreSQL URL, as for the server.
    #[arg(long, default_value = "fleet.db")]
    pub database: String,
}

/// Administration commands of `fleet-server`.
#[derive(Debug, Clone, Subcommand)]
pub enum AdminCommand {
    /// Issue broker credentials for devices and write each secret to DIR/ID.secret.
    ///
    /// A device connects with its id as MQTT user name and the secret as password,
    /// and may use the secret as its bearer token for the HTTP API.
    ProvisionDevice {
        /// Device ids: letters, digits, '-', '_' and '.'.
        #[arg(required = true)]
        ids: Vec<String>,
        /// Folder for the secret files, created if missing.
        #[arg(long)]
        out: PathBuf,
        /// Replace the secret of a device that already has one.
        #[arg(long)]
        rotate: bool,
        #[command(flatten)]
        database: DatabaseArg,
    },
    /// Issue a broker credential for a fleet server replica (an ingester) on an external
    /// broker, and write its secret to FILE.
    ProvisionIngester {
        name: String,
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        rotate: bool,
        #[command(flatten)]
        database: DatabaseArg,
    },
    /// Delete the broker credential of a device or ingester; its next login fails.
    Revoke {
        name: String,
        #[command(flatten)]
        database: DatabaseArg,
    },
    /// Create a console operator, or set a new password for one.
    SetOperatorPassword {
        name: String,
        /// File whose first line is the password (at least 12 characters).
        #[arg(long)]
        password_file: PathBuf,
        #[command(flatten)]
        database: DatabaseArg,
    },
    /// Create an API token for scripts and write it to FILE.
    CreateToken {
        name: String,
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        database: DatabaseArg,
    },
    /// Delete an API token.
    RevokeToken {
        name: String,
        #[command(flatten)]
        database: DatabaseArg,
    },
    /// Write Mosquitto's password file (DIR/passwd) and ACL file (DIR/acl) from the
    /// stored credentials, then print the mosquitto.conf lines that use them.
    MosquittoConfig {
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        database: DatabaseArg,
    },
}

impl AdminCommand {
    fn database(&self) -> &str {
        match self {
            AdminCommand::ProvisionDevice { database, .. }
            | AdminCommand::ProvisionIngester { database, .. }
            | AdminCommand::Revoke { database, .. }
            | AdminCommand::SetOperatorPassword { database, .. }
            | AdminCommand::CreateToken { database, .. }
            | AdminCommand::RevokeToken { database, .. }
            | AdminCommand::MosquittoConfig { database, .. } => &database.database,
        }
    }
}

const SECRET_NOT_SAVED: &str =
    "the credential is stored but its secret was not saved; run again with --rotate";

/// Runs one administration command, printing what it did on standard output.
pub async fn run(command: AdminCommand) -> anyhow::Result<()> {
    let store = Store::open(command.database()).await?;
    match command {
        AdminCommand::ProvisionDevice {
            ids, out, rotate, ..
        } => {
            for id in &ids {
                let secret = super::provision(&store, id, CredentialRole::Device, rotate).await?;
                let path = out.join(format!("{id}.secret"));
                write_secret(&path, &secret).context(SECRET_NOT_SAVED)?;
                println!("{id}: secret written to {}", path.display());
            }
            println!(
                "start each agent with --username ID --password-file {}/ID.secret",
                out.display()
            );
        }
        AdminCommand::ProvisionIngester {
            name, out, rotate, ..
        } => {
            let secret = super::provision(&store, &name, CredentialRole::Ingester, rotate).await?;
            write_secret(&out, &secret).context(SECRET_NOT_SAVED)?;
            println!("{name}: secret written to {}", out.display());
        }
        AdminCommand::Revoke { name, .. } => {
            if !store.delete_credential(&name).await? {
                anyhow::bail!("no credential named {name:?}");
            }
            println!("{name}: credential revoked");
        }
        AdminCommand::SetOperatorPassword {
            name,
            password_file,
            ..
        } => {
            let credentials = fleet_wire::MqttCredentials::read(name.clone(), &password_file)
                .map_err(anyhow::Error::msg)?;
            super::set_operator_password(&store, &name, &credentials.password).await?;
            println!("{name}: operator password set");
        }
        AdminCommand::CreateToken { name, out, .. } => {
            let token = super::create_api_token(&store, &name).await?;
            write_secret(&out, &token)
                .context("the token is stored but was not saved; revoke it and create it again")?;
            println!("{name}: token written to {}", out.display());
        }
        AdminCommand::RevokeToken { name, .. } => {
            if !store.delete_api_token(&name).await? {
                anyhow::bail!("no API token named {name:?}");
            }
            println!("{name}: token revoked");
        }
        AdminCommand::MosquittoConfig { out, .. } => {
            let credentials = store.credentials().await?;
            let files = super::mosquitto::write_files(&out, &credentials)
                .with_context(|| format!("failed to write Mosquitto files in {}", out.display()))?;
            println!(
                "wrote {} ({} users) and {}; add to mosquitto.conf:\n\n\
                 allow_anonymous false\n\
                 password_file {}\n\
                 acl_file {}\n\n\
                 and send Mosquitto SIGHUP after each change to reload them",
                files.password_file.display(),
                credentials.len(),
                files.acl_file.display(),
                absolute(&files.password_file).display(),
                absolute(&files.acl_file).display(),
            );
        }
    }
    Ok(())
}

/// Writes `secret` and a newline to `path`, readable by its owner only (0600), through
/// a temporary file that is renamed into place so no half-written secret is left.
pub fn write_secret(path: &Path, secret: &str) -> anyhow::Result<()> {
    if let Some(parent) = path
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty())
    {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("failed to create {}", parent.display()))?;
    }
    let temporary = path.with_extension("tmp");
    let written = (|| -> std::io::Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temporary)?;
        writeln!(file, "{secret}")?;
        file.sync_all()?;
        std::fs::rename(&temporary, path)
    })();
    written.with_context(|| format!("failed to write secret file {}", path.display()))
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_owned())
}
