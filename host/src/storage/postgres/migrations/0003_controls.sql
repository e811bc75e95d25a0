-- Business control messages: one row per control, one per (control, target).

CREATE TABLE controls (
    id              TEXT PRIMARY KEY,
    kind            TEXT NOT NULL,
    payload         TEXT NOT NULL,       -- JSON text
    priority        BIGINT NOT NULL,
    persist         BOOLEAN NOT NULL,
    receipt         BOOLEAN NOT NULL,
    expires_at      BIGINT,
    idempotency_key TEXT UNIQUE,
    request_hash    TEXT,
    answer          TEXT,
    created_at      BIGINT NOT NULL
);

CREATE TABLE control_targets (
    control_id   TEXT NOT NULL,
    user_id      TEXT NOT NULL,
    payload      TEXT,
    state        TEXT NOT NULL,
    reason       TEXT,
    priority     BIGINT NOT NULL,
    persist      BOOLEAN NOT NULL,
    receipt      BOOLEAN NOT NULL,
    created_at   BIGINT NOT NULL,
    expires_at   BIGINT,
    delivered_at BIGINT,
    PRIMARY KEY (control_id, user_id)
);
CREATE INDEX control_targets_by_user
    ON control_targets (user_id, state, priority, created_at);
CREATE INDEX control_targets_expiry
    ON control_targets (state, expires_at) WHERE persist;
