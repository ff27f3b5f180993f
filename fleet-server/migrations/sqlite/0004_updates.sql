-- Over-the-air updates: bundle archives the server stores, one update per device and
-- archive, and every progress event devices report.
CREATE TABLE bundles (
    -- Lowercase hex SHA-256 of the archive; the file is BUNDLE_DIR/{sha256}.tar.
    sha256 TEXT PRIMARY KEY NOT NULL,
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    -- Archive size in bytes.
    size INTEGER NOT NULL,
    uploaded_ms INTEGER NOT NULL,
    -- Operator or API token (token:NAME) that uploaded it.
    uploaded_by TEXT NOT NULL
);

CREATE TABLE updates (
    id TEXT PRIMARY KEY NOT NULL,
    device_id TEXT NOT NULL,
    sha256 TEXT NOT NULL REFERENCES bundles (sha256),
    created_ms INTEGER NOT NULL,
    created_by TEXT NOT NULL,
    -- 'pending' until the device reports, then the latest stage it reported, or
    -- 'superseded' when a newer update for the device replaced this one.
    stage TEXT NOT NULL,
    detail TEXT NOT NULL,
    updated_ms INTEGER NOT NULL
);

CREATE INDEX updates_by_device ON updates (device_id, created_ms);

-- Append-only. update_id has no foreign key: events of unknown updates, such as a
-- rollback an agent starts on its own with an empty update_id, are kept as well.
CREATE TABLE update_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    update_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    version TEXT NOT NULL,
    stage TEXT NOT NULL,
    detail TEXT NOT NULL,
    device_time_ms INTEGER NOT NULL,
    received_ms INTEGER NOT NULL
);

CREATE INDEX update_events_by_update ON update_events (update_id, id);
