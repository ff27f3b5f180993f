//! `fleet-server config ...`: set and show the settings the server overrides on a device,
//! through a running server's HTTP API.

use clap::{Args, Subcommand};

use crate::store::remote_config::{ConfigRecord, ConfigSettings};
use crate::updates::cli::{ServerConnection, blocking};

/// `fleet-server config` commands.
#[derive(Debug, Clone, Subcommand)]
pub enum ConfigCommand {
    /// Replace the settings the server overrides on a device, clearing those left out.
    ///
    /// The flags given form the whole new set: a setting whose flag is left out is
    /// cleared, and the device goes back to its own value for it. Without any setting
    /// flag, every override is cleared. Prints the stored change, which stays pending
    /// until the device acknowledges it.
    Set {
        /// Device to configure.
        #[arg(long, value_name = "ID")]
        device: String,
        #[command(flatten)]
        settings: SettingsArgs,
        #[command(flatten)]
        connection: ServerConnection,
    },
    /// Show a device's latest configuration change and whether the device applied it.
    Show {
        /// Device whose configuration to show.
        #[arg(long, value_name = "ID")]
        device: String,
        #[command(flatten)]
        connection: ServerConnection,
    },
}

/// The settings of `config set`. Each one left out is cleared. Negative numbers are
/// taken as values, so the server can reject them with the range they are outside.
#[derive(Debug, Clone, Args)]
pub struct SettingsArgs {
    /// Top-1 confidence under which an inference counts as low-confidence, 0 to 1.
    #[arg(long, value_name = "F", allow_negative_numbers = true)]
    pub confidence_threshold: Option<f32>,
    /// Seconds between telemetry messages, 0.05 to 3600.
    #[arg(long, value_name = "F", allow_negative_numbers = true)]
    pub interval_seconds: Option<f64>,
    /// Inferences per second, 0 for as fast as the model allows.
    #[arg(long, value_name = "F", allow_negative_numbers = true)]
    pub rate: Option<f64>,
    /// Backlog records sent per second at most, above 0.
    #[arg(long, value_name = "F", allow_negative_numbers = true)]
    pub drain_rate: Option<f64>,
    /// Seconds an update may wait for its commit, 1 to 86400.
    #[arg(long, value_name = "F", allow_negative_numbers = true)]
    pub commit_timeout_seconds: Option<f64>,
    /// Top-1 confidence under which the device's local inference API sends a request to
    /// the cloud, 0 to 1.
    #[arg(long, value_name = "F", allow_negative_numbers = true)]
    pub fallback_threshold: Option<f32>,
}

impl SettingsArgs {
    /// Rejects NaN and infinite values, which JSON cannot carry: they would reach the
    /// server as `null` and clear the setting instead of being rejected.
    fn check_finite(&self) -> anyhow::Result<()> {
        let values = [
            (
                "--confidence-threshold",
                self.confidence_threshold.map(f64::from),
            ),
            ("--interval-seconds", self.interval_seconds),
            ("--rate", self.rate),
            ("--drain-rate", self.drain_rate),
            ("--commit-timeout-seconds", self.commit_timeout_seconds),
            (
                "--fallback-threshold",
                self.fallback_threshold.map(f64::from),
            ),
        ];
        for (flag, value) in values {
            if let Some(value) = value.filter(|value| !value.is_finite()) {
                anyhow::bail!("invalid {flag} {value}: expected a finite number");
            }
        }
        Ok(())
    }
}

impl From<SettingsArgs> for ConfigSettings {
    fn from(args: SettingsArgs) -> ConfigSettings {
        ConfigSettings {
            confidence_threshold: args.confidence_threshold,
            interval_seconds: args.interval_seconds,
            rate: args.rate,
            drain_rate: args.drain_rate,
            commit_timeout_seconds: args.commit_timeout_seconds,
            fallback_threshold: args.fallback_threshold,
        }
    }
}

/// Runs a `config` command, printing the result on standard output.
pub async fn run_config(command: ConfigCommand) -> anyhow::Result<()> {
    blocking(move || match command {
        ConfigCommand::Set {
            device,
            settings,
            connection,
        } => {
            settings.check_finite()?;
            let record = connection.client()?.set_config(&device, &settings.into())?;
            print_record(&record);
            Ok(())
        }
        ConfigCommand::Show { device, connection } => {
            let record = connection.client()?.config(&device)?;
            print_record(&record);
            Ok(())
        }
    })
    .await
}

/// Prints a configuration change, one field per line.
fn print_record(record: &ConfigRecord) {
    println!("device        {}", record.device_id);
    println!("change        {}", record.change_id);
    println!("status        {}", record.status.as_str());
    println!("settings      {}", settings_text(&record.settings));
    println!("detail        {}", record.detail);
    println!("requested by  {}", record.requested_by);
    println!("created_ms    {}", record.created_ms);
    println!("updated_ms    {}", record.updated_ms);
}

/// Returns the overrides as `name=value` pairs, or a note that there are none.
fn settings_text(settings: &ConfigSettings) -> String {
    // The threshold is an f32, printed as such so that 0.7 does not show as 0.699999988.
    let values = [
        (
            "confidence_threshold",
            settings.confidence_threshold.map(|value| value.to_string()),
        ),
        (
            "interval_seconds",
            settings.interval_seconds.map(|value| value.to_string()),
        ),
        ("rate", settings.rate.map(|value| value.to_string())),
        (
            "drain_rate",
            settings.drain_rate.map(|value| value.to_string()),
        ),
        (
            "commit_timeout_seconds",
            settings
                .commit_timeout_seconds
                .map(|value| value.to_string()),
        ),
        (
            "fallback_threshold",
            settings.fallback_threshold.map(|value| value.to_string()),
        ),
    ];
    let pairs: Vec<String> = values
        .iter()
        .filter_map(|(name, value)| value.as_ref().map(|value| format!("{name}={value}")))
        .collect();
    if pairs.is_empty() {
        "none (the device uses its own values)".to_owned()
    } else {
        pairs.join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_text_lists_overrides() {
        let settings = ConfigSettings {
            confidence_threshold: Some(0.7),
            rate: Some(2.5),
            commit_timeout_seconds: Some(600.0),
            fallback_threshold: Some(0.3),
            ..ConfigSettings::default()
        };
        assert_eq!(
            settings_text(&settings),
            "confidence_threshold=0.7 rate=2.5 commit_timeout_seconds=600 fallback_threshold=0.3"
        );
        assert!(settings_text(&ConfigSettings::default()).starts_with("none"));
    }

    #[test]
    fn non_finite_settings_rejected() {
        let args = SettingsArgs {
            confidence_threshold: None,
            interval_seconds: None,
            rate: Some(f64::INFINITY),
            drain_rate: None,
            commit_timeout_seconds: None,
            fallback_threshold: None,
        };
        let error = args.check_finite().unwrap_err().to_string();
        assert!(error.contains("--rate inf"), "{error}");
        let args = SettingsArgs {
            rate: None,
            fallback_threshold: Some(f32::NAN),
            ..args
        };
        let error = args.check_finite().unwrap_err().to_string();
        assert!(error.contains("--fallback-threshold NaN"), "{error}");
    }
}
