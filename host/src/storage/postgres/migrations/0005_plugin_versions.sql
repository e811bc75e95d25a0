-- Plugin versions uploaded through the admin API: one row per plugin, the
-- version every gateway sharing the database loads for it (a restart
-- included), until it is unloaded or replaced.

CREATE TABLE plugin_versions (
    name        TEXT PRIMARY KEY,
    sha256      TEXT NOT NULL,
    bytes       BYTEA NOT NULL,
    uploaded_at BIGINT NOT NULL
);
