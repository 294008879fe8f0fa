-- Version 4: the safety-check circuit breaker, one row shared by every process on this store.
CREATE TABLE breaker (
    id    INTEGER PRIMARY KEY CHECK (id = 1),
    kind  TEXT NOT NULL,
    value INTEGER NOT NULL
);
