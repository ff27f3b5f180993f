-- Devices and the telemetry they send, with the same columns and meaning as the SQLite
-- schema. Counters in `devices` are running totals over every stored (non-duplicate)
-- telemetry message, so the console reads them directly.
CREATE TABLE devices (
    id TEXT PRIMARY KEY NOT NULL,
    first_seen_ms BIGINT NOT NULL,
    last_seen_ms BIGINT NOT NULL,
    state TEXT NOT NULL DEFAULT 'unknown',
    model_name TEXT,
    model_version TEXT,
    agent_version TEXT,
    messages BIGINT NOT NULL DEFAULT 0,
    min_seq BIGINT,
    max_seq BIGINT,
    duplicates BIGINT NOT NULL DEFAULT 0,
    inferences BIGINT NOT NULL DEFAULT 0,
    input_errors BIGINT NOT NULL DEFAULT 0,
    labeled BIGINT NOT NULL DEFAULT 0,
    correct BIGINT NOT NULL DEFAULT 0
);

CREATE TABLE telemetry (
    device_id TEXT NOT NULL REFERENCES devices (id),
    seq BIGINT NOT NULL,
    device_time_ms BIGINT NOT NULL,
    received_ms BIGINT NOT NULL,
    interval_ms BIGINT NOT NULL,
    model_name TEXT NOT NULL,
    model_version TEXT NOT NULL,
    inferences BIGINT NOT NULL,
    input_errors BIGINT NOT NULL,
    labeled BIGINT NOT NULL,
    correct BIGINT NOT NULL,
    confidence_sum DOUBLE PRECISION NOT NULL,
    low_confidence BIGINT NOT NULL,
    -- The latency histogram as JSON text, so windows can be merged exactly. TEXT rather
    -- than JSONB because the server parses and merges it and never queries inside it.
    latency TEXT NOT NULL,
    latency_p50_us DOUBLE PRECISION,
    latency_p95_us DOUBLE PRECISION,
    cpu_percent DOUBLE PRECISION,
    process_memory_bytes BIGINT,
    memory_used_bytes BIGINT,
    memory_total_bytes BIGINT,
    temperature_celsius DOUBLE PRECISION,
    PRIMARY KEY (device_id, seq)
);

CREATE INDEX telemetry_by_received ON telemetry (received_ms);
