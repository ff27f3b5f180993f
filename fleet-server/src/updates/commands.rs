//! Install commands: publishing them on `fleet/v1/{device}/cmd`, and publishing them
//! again for a device's unfinished updates whenever the device comes online.
//!
//! [`CommandPublisher`] publishes any [`Command`], so remote configuration sends its
//! commands through it as well.

use std::time::Duration;

use fleet_wire::topic::{self, TopicKind};
use fleet_wire::{Command, Encoding, InstallBundle};
use rumqttc::{AsyncClient, QoS};

use super::{UpdateError, Updates};
use crate::store::updates::UpdateRecord;

/// How long a publish may wait for room in the MQTT client's request queue.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors of [`CommandPublisher::publish`].
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("failed to encode the command")]
    Encode(#[from] fleet_wire::WireError),
    #[error("the MQTT client is stopped")]
    Client(#[from] rumqttc::ClientError),
    #[error("the MQTT client queue stayed full for {seconds} s")]
    QueueFull { seconds: u64 },
}

/// Publishes commands through the ingester's MQTT client, whose credential may publish on
/// every device's command topic.
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

    /// Hands the update's command to the MQTT client, as [`CommandPublisher::publish`]
    /// does. A device that misses it gets it again when it next comes online.
    pub async fn send(&self, update: &UpdateRecord) -> Result<(), UpdateError> {
        self.publish(&update.device_id, &self.command(update))
            .await
            .map_err(|error| UpdateError::Publish(format!("{:#}", anyhow::Error::from(error))))
    }

    /// Hands `command`, postcard-encoded, to the MQTT client for QoS 1 delivery on the
    /// device's command topic. Success means the client queued it, not that the device
    /// received it.
    pub async fn publish(&self, device_id: &str, command: &Command) -> Result<(), PublishError> {
        let payload = fleet_wire::encode(command, Encoding::Postcard)?;
        let topic = topic::device_topic(device_id, TopicKind::Command);
        let publish = self.client.publish(topic, QoS::AtLeastOnce, false, payload);
        match tokio::time::timeout(PUBLISH_TIMEOUT, publish).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(PublishError::QueueFull {
                seconds: PUBLISH_TIMEOUT.as_secs(),
            }),
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

/// Publishes the commands of every unfinished update of a device that came online, so a
/// device that was away when its command was first published still gets it. Devices
/// skip an archive they already run or are installing, so a repeated command is
/// harmless.
pub async fn resend_unfinished(updates: &Updates, device_id: &str) {
    let unfinished = match updates.store.unfinished_updates(device_id).await {
        Ok(unfinished) => unfinished,
        Err(error) => {
            tracing::error!(
                %device_id,
                error = format!("{:#}", anyhow::Error::from(error)),
                "failed to look up unfinished updates of a device that came online"
            );
            return;
        }
    };
    for update in &unfinished {
        send_counted(updates, update).await;
    }
}
