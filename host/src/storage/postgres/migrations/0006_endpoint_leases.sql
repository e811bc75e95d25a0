-- Which worker delivers each webhook endpoint: one row per endpoint whose
-- lease was ever taken. `holder` is a worker of one gateway process
-- (`<node_id>/<id of that start>`); `lease_until` is unix milliseconds of
-- the database's clock (clock_timestamp()), so the processes' clocks never
-- have to agree. A row whose lease_until has passed is free to take; a
-- released lease is deleted. Kept apart from `endpoints`, whose row the
-- writer's batches lock, so that a renewal never waits for a batch.
CREATE TABLE endpoint_leases (
    endpoint    TEXT PRIMARY KEY,
    holder      TEXT NOT NULL,
    lease_until BIGINT NOT NULL
);
