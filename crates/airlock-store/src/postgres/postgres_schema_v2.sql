-- Version 2 of the PostgreSQL schema: the safety-check circuit breaker, one row shared by
-- every replica, locked while a replica asks it for admission or reports to it.
CREATE TABLE breaker (
    id    INTEGER PRIMARY KEY CHECK (id = 1),
    kind  TEXT NOT NULL,
    value BIGINT NOT NULL
);
