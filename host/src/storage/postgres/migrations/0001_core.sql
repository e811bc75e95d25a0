-- Sessions, the outbox, webhook delivery queues and plugin key-value stores.
-- Numbers are BIGINT throughout (times are unix milliseconds).

CREATE TABLE sessions (
    connection_id TEXT PRIMARY KEY,
    user_id       TEXT NOT NULL,
    device_id     TEXT NOT NULL,
    node_id       TEXT NOT NULL,
    opened_at     BIGINT NOT NULL,
    remote_addr   TEXT NOT NULL
);
CREATE INDEX sessions_by_user ON sessions (user_id);
CREATE INDEX sessions_by_node ON sessions (node_id);

-- seq is drawn under the write lock, so it follows commit order.
CREATE TABLE outbox (
    seq        BIGSERIAL PRIMARY KEY,
    id         TEXT NOT NULL UNIQUE,
    type       TEXT NOT NULL,
    order_key  TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    data       TEXT NOT NULL
);

CREATE TABLE endpoints (
    name            TEXT PRIMARY KEY,
    cursor          BIGINT NOT NULL,
    disabled_at     BIGINT,
    disabled_reason TEXT,
    failing_since   BIGINT,
    delivered_total BIGINT NOT NULL DEFAULT 0,
    skipped_total   BIGINT NOT NULL DEFAULT 0,
    last_error      TEXT
);

-- next_at of a row waiting behind an earlier one of its key is the largest
-- BIGINT: only the head of each (endpoint, order_key) is ever due.
CREATE TABLE deliveries (
    endpoint   TEXT NOT NULL,
    event_seq  BIGINT NOT NULL,
    order_key  TEXT NOT NULL,
    state      TEXT NOT NULL,            -- 'pending' | 'failed'
    attempts   BIGINT NOT NULL DEFAULT 0,
    next_at    BIGINT NOT NULL,
    leased     BOOLEAN NOT NULL DEFAULT FALSE,
    last_error TEXT,
    PRIMARY KEY (endpoint, event_seq)
);
CREATE INDEX deliveries_due ON deliveries (endpoint, state, next_at, event_seq);
CREATE INDEX deliveries_by_key ON deliveries (endpoint, order_key, state, event_seq);

CREATE TABLE plugin_kv (
    plugin TEXT NOT NULL,
    key    TEXT NOT NULL,
    value  BYTEA NOT NULL,
    PRIMARY KEY (plugin, key)
);
