//! Configuration commands: publishing a device's latest change as a
//! [`Command::SetConfig`] on `fleet/v1/{device}/cmd`, and publishing it again whenever
//! the device comes online while the change is pending.

use fleet_wire::Command;

use super::RemoteConfigs;
use crate::store::StoreError;
use crate::store::remote_config::{ConfigRecord, ConfigStatus};

/// Stores `record` as its device's configuration and publishes its command. Returns
/// whether the MQTT client took the command. A command that was not taken is sent again
/// when the device next comes online.
pub(super) async fn store_and_send(
    configs: &RemoteConfigs,
    record: &ConfigRecord,
) -> Result<bool, StoreError> {
    let _order = configs.order.lock().await;
    configs.store.put_config(record).await?;
    Ok(send_counted(configs, record).await)
}

/// Publishes a device's configuration again when its latest change is pending, so a
/// device that was away when the change was first published still gets it. Devices
/// apply a repeated change again and acknowledge it again, which is harmless.
pub async fn resend_pending(configs: &RemoteConfigs, device_id: &str) {
    let _order = configs.order.lock().await;
    let record = match configs.store.config(device_id).await {
        Ok(Some(record)) => record,
        Ok(None) => return,
        Err(error) => {
            tracing::error!(
                %device_id,
                error = format!("{:#}", anyhow::Error::from(error)),
                "failed to look up the configuration of a device that came online"
            );
            return;
        }
    };
    if record.status == ConfigStatus::Pending {
        send_counted(configs, &record).await;
    }
}

/// Publishes the command of `record`, counting and logging the result. Returns whether
/// the MQTT client took it.
async fn send_counted(configs: &RemoteConfigs, record: &ConfigRecord) -> bool {
    let command = Command::SetConfig(record.settings.to_remote_config(&record.change_id));
    let metrics = &configs.metrics.remote_config;
    match configs.publisher.publish(&record.device_id, &command).await {
        Ok(()) => {
            metrics.commands_sent.inc();
            tracing::info!(
                device_id = %record.device_id,
                change_id = %record.change_id,
                "configuration command sent"
            );
            true
        }
        Err(error) => {
            metrics.commands_failed.inc();
            tracing::warn!(
                device_id = %record.device_id,
                change_id = %record.change_id,
                error = format!("{:#}", anyhow::Error::from(error)),
                "configuration command not sent; it is sent again when the device comes online"
            );
            false
        }
    }
}
