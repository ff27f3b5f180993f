-- Hourly rollups of raw telemetry that `Store::downsample` has deleted, one row per
-- device and hour of the server's receive time. Device totals stay in `devices`.
CREATE TABLE telemetry_hourly (
    device_id TEXT NOT NULL REFERENCES devices (id),
    -- Start of the hour in milliseconds since the Unix epoch.
    hour_start_ms INTEGER NOT NULL,
    messages INTEGER NOT NULL,
    inferences INTEGER NOT NULL,
    input_errors INTEGER NOT NULL,
    labeled INTEGER NOT NULL,
    correct INTEGER NOT NULL,
    -- The merged latency histogram of the hour's messages, as JSON.
    latency TEXT NOT NULL,
    PRIMARY KEY (device_id, hour_start_ms)
);
