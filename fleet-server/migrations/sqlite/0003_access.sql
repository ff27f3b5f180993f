-- Who may connect and act: broker credentials of devices and ingesters, operator
-- logins, API tokens and console sessions. Secrets are stored only as hashes.
CREATE TABLE credentials (
    -- MQTT user name: the device id, or the name of an ingester.
    name TEXT PRIMARY KEY NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('device', 'ingester')),
    -- Hex SHA-256 of the random secret; the secret is also the device's API token.
    secret_sha256 TEXT NOT NULL UNIQUE,
    -- The same secret in Mosquitto's password-file format (PBKDF2-SHA512).
    mosquitto_hash TEXT NOT NULL,
    created_ms INTEGER NOT NULL
);

CREATE TABLE operators (
    name TEXT PRIMARY KEY NOT NULL,
    -- Argon2id in PHC string format.
    password_hash TEXT NOT NULL,
    created_ms INTEGER NOT NULL
);

CREATE TABLE api_tokens (
    name TEXT PRIMARY KEY NOT NULL,
    token_sha256 TEXT NOT NULL UNIQUE,
    created_ms INTEGER NOT NULL
);

CREATE TABLE sessions (
    token_sha256 TEXT PRIMARY KEY NOT NULL,
    operator TEXT NOT NULL REFERENCES operators (name) ON DELETE CASCADE,
    expires_ms INTEGER NOT NULL
);
