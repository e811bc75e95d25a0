-- Cluster mode: one row per node id, holding its lease. Times are unix
-- milliseconds of the database's clock (clock_timestamp()), so nodes'
-- clocks never have to agree.
CREATE TABLE cluster_nodes (
    node_id     TEXT PRIMARY KEY,
    incarnation TEXT NOT NULL,           -- changes at every start of the node
    address     TEXT NOT NULL,
    started_at  BIGINT NOT NULL,
    lease_until BIGINT NOT NULL,
    reaped      BOOLEAN NOT NULL DEFAULT FALSE
);
