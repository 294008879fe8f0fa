-- Version 6 of the PostgreSQL schema: a relay takes outbox rows for a while (`taken_until`,
-- milliseconds since the epoch on the database's clock) instead of only for the length of the
-- reading statement, so that the relays of several replicas no longer publish the same rows;
-- a relay that dies before deleting its rows leaves them to be taken again when that lapses.
ALTER TABLE outbox ADD COLUMN taken_until BIGINT NOT NULL DEFAULT 0;
