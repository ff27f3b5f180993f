-- Hard samples: inputs a device classified with low confidence, uploaded for retraining.
CREATE TABLE samples (
    -- Lowercase hex SHA-256 of the content; the file is SAMPLE_DIR/{sha256}. A content
    -- uploaded again, by any device, keeps its first record.
    sha256 TEXT PRIMARY KEY NOT NULL,
    -- Taken from the credential of the uploading device, never from the request.
    device_id TEXT NOT NULL,
    model_name TEXT NOT NULL,
    model_version TEXT NOT NULL,
    -- Top-1 class index, its name from the bundle's labels, and its confidence (0 to 1).
    predicted_class INTEGER NOT NULL,
    predicted_label TEXT NOT NULL,
    confidence REAL NOT NULL,
    -- Ground-truth class index, when the device's data set has labels.
    true_class INTEGER,
    -- Origin of the input on the device, such as an IDX file and index or a file path.
    source TEXT NOT NULL,
    device_time_ms INTEGER NOT NULL,
    received_ms INTEGER NOT NULL,
    -- image/png or image/jpeg.
    content_type TEXT NOT NULL,
    size INTEGER NOT NULL
);

CREATE INDEX samples_by_received ON samples (received_ms);
CREATE INDEX samples_by_device ON samples (device_id, received_ms);
CREATE INDEX samples_by_model ON samples (model_name, received_ms);
