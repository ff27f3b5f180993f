-- Hourly rollups of raw telemetry that `Store::downsample` has deleted, one row per
-- device and hour of the server's receive time. Device totals stay in `devices`.
CREATE TABLE telemetry_hourly (
    device_id TEXT NOT NULL REFERENCES devices (id),
    -- Start of the hour in milliseconds since the Unix epoch.
    hour_start_ms BIGINT NOT NULL,
    messages BIGINT NOT NULL,
    inferences BIGINT NOT NULL,
    input_errors BIGINT NOT NULL,
    labeled BIGINT NOT NULL,
    correct BIGINT NOT NULL,
    -- The merged latency histogram of the hour's messages, as JSON text.
    latency TEXT NOT NULL,
    PRIMARY KEY (device_id, hour_start_ms)
);
