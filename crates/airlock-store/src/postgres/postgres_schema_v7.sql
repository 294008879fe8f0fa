-- Version 7 of the PostgreSQL schema: claim holds. A claim takes the next queued job with
-- `FOR UPDATE SKIP LOCKED` and marks it held until `held_until` (milliseconds), so that the
-- claims of every replica run Gate B on different jobs instead of racing for the queue's head.
-- Not indexed, and job pages keep a fifth free, so that setting it is a HOT update (no index
-- entries written).
ALTER TABLE jobs ADD COLUMN held_until BIGINT NOT NULL DEFAULT 0;
ALTER TABLE jobs SET (fillfactor = 80);
