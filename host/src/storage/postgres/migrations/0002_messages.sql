-- Channels, messages, groups and every user's conversation list.
-- `type` and `state` columns hold the codes of ChannelType and RowState.
-- Column meanings are those of the SQLite engine (storage/sqlite/messages.rs).
--
-- Ids and keys that pages are ordered and cut by (channel keys, user ids,
-- group ids) are `COLLATE "C"`: byte order, as in SQLite and Rust, whatever
-- the database's locale (a locale's order may ignore the \x1f of person keys).

-- The one version counter. Read and advanced under the write lock, in the
-- transaction that stamps the rows (a sequence would not do: its value is
-- visible before the transaction that drew it commits).
CREATE TABLE counters (
    name  TEXT PRIMARY KEY,
    value BIGINT NOT NULL
);
INSERT INTO counters (name, value) VALUES ('version', 0);

CREATE TABLE channels (
    channel  TEXT COLLATE "C" PRIMARY KEY,
    type     BIGINT NOT NULL,
    last_seq BIGINT NOT NULL
);

CREATE TABLE messages (
    channel       TEXT COLLATE "C" NOT NULL,
    seq           BIGINT NOT NULL,
    id            TEXT NOT NULL,
    type          BIGINT NOT NULL,
    sender        TEXT NOT NULL,
    system        BOOLEAN NOT NULL,
    client_msg_id BYTEA,                 -- the sender's id, byte for byte (text cannot hold U+0000)
    payload       TEXT NOT NULL,         -- JSON text, kept byte for byte
    created_at    BIGINT NOT NULL,
    version       BIGINT NOT NULL,
    PRIMARY KEY (channel, seq)
);
CREATE UNIQUE INDEX messages_by_id ON messages (id);
CREATE UNIQUE INDEX messages_dedup ON messages (sender, client_msg_id)
    WHERE client_msg_id IS NOT NULL;
CREATE INDEX messages_by_version ON messages (channel, version);

CREATE TABLE chat_groups (
    group_id   TEXT COLLATE "C" PRIMARY KEY,
    name       TEXT NOT NULL,
    data       TEXT NOT NULL,            -- JSON text
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

CREATE TABLE group_members (
    group_id  TEXT COLLATE "C" NOT NULL,
    user_id   TEXT COLLATE "C" NOT NULL,
    role      TEXT NOT NULL,
    joined_at BIGINT NOT NULL,
    PRIMARY KEY (group_id, user_id)
);
CREATE INDEX group_members_by_user ON group_members (user_id);

CREATE TABLE conversations (
    user_id      TEXT COLLATE "C" NOT NULL,
    channel      TEXT COLLATE "C" NOT NULL,
    type         BIGINT NOT NULL,
    peer         TEXT COLLATE "C" NOT NULL,
    state        BIGINT NOT NULL,        -- 0 live, 1 hidden, 2 deleted
    unread       BIGINT NOT NULL,
    read_seq     BIGINT NOT NULL,
    version      BIGINT NOT NULL,
    updated_at   BIGINT NOT NULL,
    last_id      TEXT,
    last_seq     BIGINT NOT NULL,
    last_sender  TEXT,
    last_preview TEXT,
    last_at      BIGINT,
    PRIMARY KEY (user_id, channel)
);
CREATE INDEX conversations_by_version ON conversations (user_id, version);
CREATE INDEX conversations_by_channel ON conversations (channel);
-- Pruning runs under the write lock: it finds old tombstones by index, not
-- by scanning every row while every writer waits.
CREATE INDEX conversations_tombstones ON conversations (updated_at) WHERE state = 2;

CREATE TABLE conversation_floors (
    user_id TEXT COLLATE "C" PRIMARY KEY,
    floor   BIGINT NOT NULL
);
