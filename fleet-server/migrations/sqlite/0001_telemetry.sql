-- Devices and the telemetry they send. Counters in `devices` are running totals over
-- every stored (non-duplicate) telemetry message, so the console reads them directly.
CREATE TABLE devices (
    id TEXT PRIMARY KEY NOT NULL,
    first_seen_ms INTEGER NOT NULL,
    last_seen_ms INTEGER NOT NULL,
    state TEXT NOT NULL DEFAULT 'unknown',
    model_name TEXT,
    model_version TEXT,
    agent_version TEXT,
    messages INTEGER NOT NULL DEFAULT 0,
    min_seq INTEGER,
    max_seq INTEGER,
    duplicates INTEGER NOT NULL DEFAULT 0,
    inferences INTEGER NOT NULL DEFAULT 0,
    input_errors INTEGER NOT NULL DEFAULT 0,
    labeled INTEGER NOT NULL DEFAULT 0,
    correct INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE telemetry (
    device_id TEXT NOT NULL REFERENCES devices (id),
    seq INTEGER NOT NULL,
    device_time_ms INTEGER NOT NULL,
    received_ms INTEGER NOT NULL,
    interval_ms INTEGER NOT NULL,
    model_name TEXT NOT NULL,
    model_version TEXT NOT NULL,
    inferences INTEGER NOT NULL,
    input_errors INTEGER NOT NULL,
    labeled INTEGER NOT NULL,
    correct INTEGER NOT NULL,
    confidence_sum REAL NOT NULL,
    low_confidence INTEGER NOT NULL,
    -- The latency histogram as JSON, so windows can be merged exactly.
    latency TEXT NOT NULL,
    latency_p50_us REAL,
    latency_p95_us REAL,
    cpu_percent REAL,
    process_memory_bytes INTEGER,
    memory_used_bytes INTEGER,
    memory_total_bytes INTEGER,
    temperature_celsius REAL,
    PRIMARY KEY (device_id, seq)
);

CREATE INDEX telemetry_by_received ON telemetry (received_ms);
