-- Remote configuration: the settings the server overrides on each device, and every
-- acknowledgement devices send back.
CREATE TABLE device_config (
    device_id TEXT PRIMARY KEY NOT NULL,
    -- Id of the latest change, repeated in the device's acknowledgement.
    change_id TEXT NOT NULL,
    -- JSON object of the overridden settings; a setting left out uses the agent's own
    -- value.
    settings TEXT NOT NULL,
    -- 'pending' until the device acknowledges the change, then 'applied' or 'rejected'.
    status TEXT NOT NULL,
    -- The settings in use on the device, or why it rejected the change.
    detail TEXT NOT NULL,
    -- Operator or API token (token:NAME) that requested the change.
    requested_by TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL
);

-- Append-only, and kept also for acknowledgements of older changes.
CREATE TABLE config_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    change_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    applied BOOLEAN NOT NULL,
    detail TEXT NOT NULL,
    device_time_ms INTEGER NOT NULL,
    received_ms INTEGER NOT NULL
);

CREATE INDEX config_events_by_device ON config_events (device_id, id);
