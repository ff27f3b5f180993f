//! Install commands: publishing them on `fleet/v1/{device}/cmd`, and publishing them
//! again for a device's unfinished updates whenever the device comes online.

use std::sync::Arc;
use std::time::Duration;

use fleet_wire::topic::{self, TopicKind};
use fleet_wire::{Command, Encoding, InstallBundle};
use rumqttc::{AsyncClient, QoS};
use tokio::sync::{mpsc, watch};

use super::{UpdateError, Updates};
use crate::store::updates::UpdateRecord;

/// How long a publish may wait for room in the MQTT client's request queue.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);

/// Publishes install commands through the ingester's MQTT client, whose credential may
/// publish on every device's command topic.
#[derive(Debug, Clone)]
pub struct CommandPublisher {
    client: AsyncClient,
    /// Base of the archive URLs in commands, such as `http://fleet.example:8080`.
    public_url: String,
}

impl CommandPublisher {
    pub fn new(client: AsyncClient, public_url: String) -> CommandPublisher {
        CommandPublisher {
            client,
            public_url: public_url.trim_end_matches('/').to_owned(),
        }
    }

    /// Returns the URL devices download an archive from.
    pub fn archive_url(&self, sha256: &str) -> String {
        format!("{}/api/bundles/{sha256}/archive", self.public_url)
    }

    /// Builds the install command of an update.
    pub fn command(&self, update: &UpdateRecord) -> Command {
        Command::InstallBundle(InstallBundle {
            update_id: update.update_id.clone(),
            name: update.name.clone(),
            version: update.version.clone(),
            url: self.archive_url(&update.sha256),
            size: u64::try_from(update.size).unwrap_or_default(),
            sha256: update.sha256.clone(),
        })
    }

    /// Hands the update's command, postcard-encoded, to the MQTT client for QoS 1
    /// delivery on the device's command topic.
    ///
    /// Success means the client queued it, not that the device received it; a device
    /// that misses it gets it again when it next comes online.
    pub async fn send(&self, update: &UpdateRecord) -> Result<(), UpdateError> {
        let payload = fleet_wire::encode(&self.command(update), Encoding::Postcard)
            .map_err(|error| UpdateError::Publish(error.to_string()))?;
        let topic = topic::device_topic(&update.device_id, TopicKind::Command);
        let publish = self.client.publish(topic, QoS::AtLeastOnce, false, payload);
        match tokio::time::timeout(PUBLISH_TIMEOUT, publish).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(UpdateError::Publish(error.to_string())),
            Err(_) => Err(UpdateError::Publish(format!(
                "the MQTT client queue stayed full for {} s",
                PUBLISH_TIMEOUT.as_secs()
            ))),
        }
    }
}

/// Sends the update's command, counting and logging the result; returns whether the
/// MQTT client took it.
pub(super) async fn send_counted(updates: &Updates, update: &UpdateRecord) -> bool {
    match updates.publisher.send(update).await {
        Ok(()) => {
            updates.metrics.updates.commands_sent.inc();
            tracing::info!(
                update_id = %update.update_id,
                device_id = %update.device_id,
                sha256 = %update.sha256,
                stage = %update.stage,
                "install command sent"
            );
            true
        }
        Err(error) => {
            updates.metrics.updates.commands_failed.inc();
            tracing::warn!(
                update_id = %update.update_id,
                device_id = %update.device_id,
                %error,
                "install command not sent; it is sent again when the device comes online"
            );
            false
        }
    }
}

/// Publishes the commands of every unfinished update of each device id received on
/// `online`, until shutdown. Ingestion sends a device id each time that device's status
/// turns online, so a device that was away when its command was first published still
/// gets it. Devices skip an archive they already run or are installing, so a repeated
/// command is harmless.
pub async fn resend_on_online(
    updates: Arc<Updates>,
    mut online: mpsc::UnboundedReceiver<String>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let device_id = tokio::select! {
            device_id = online.recv() => match device_id {
                Some(device_id) => device_id,
                None => return,
            },
            _ = shutdown.changed() => return,
        };
        let unfinished = match updates.store.unfinished_updates(&device_id).await {
            Ok(unfinished) => unfinished,
            Err(error) => {
                tracing::error!(
                    %device_id,
                    error = format!("{:#}", anyhow::Error::from(error)),
                    "failed to look up unfinished updates of a device that came online"
                );
                continue;
            }
        };
        for update in &unfinished {
            send_counted(&updates, update).await;
        }
    }
}
