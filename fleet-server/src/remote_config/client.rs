//! Calls of the configuration routes on [`FleetClient`], used by the
//! `fleet-server config` commands. Like the rest of the client they block, so call them
//! from a plain thread or from `tokio::task::spawn_blocking`.

use reqwest::Method;

use crate::store::remote_config::{ConfigRecord, ConfigSettings};
use crate::updates::client::{ClientError, FleetClient};

impl FleetClient {
    /// Replaces the settings the server overrides on a device, as `PUT
    /// /api/devices/{id}/config` describes, and returns the stored change.
    pub fn set_config(
        &self,
        device_id: &str,
        settings: &ConfigSettings,
    ) -> Result<ConfigRecord, ClientError> {
        let path = config_path(device_id)?;
        self.call_json(Method::PUT, &path, Some(settings))
    }

    /// Returns a device's latest configuration change and its status.
    pub fn config(&self, device_id: &str) -> Result<ConfigRecord, ClientError> {
        let path = config_path(device_id)?;
        self.call_json(Method::GET, &path, None::<&ConfigSettings>)
    }
}

/// Returns the route of a device's configuration after checking that the id is one a
/// device may have, so it needs no escaping in the URL.
fn config_path(device_id: &str) -> Result<String, ClientError> {
    fleet_wire::topic::validate_device_id(device_id)
        .map_err(|reason| ClientError::InvalidDeviceId { reason })?;
    Ok(format!("/api/devices/{device_id}/config"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_path_rejects_ids_that_need_escaping() {
        assert_eq!(
            config_path("jetson-07").unwrap(),
            "/api/devices/jetson-07/config"
        );
        for id in ["", "a/b", "a b", "a?b"] {
            let error = config_path(id).unwrap_err();
            assert!(
                matches!(error, ClientError::InvalidDeviceId { .. }),
                "{id}: {error}"
            );
        }
    }
}
