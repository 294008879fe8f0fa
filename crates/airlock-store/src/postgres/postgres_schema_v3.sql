-- Version 3 of the PostgreSQL schema: the transactional outbox. A row is written in the same
-- transaction that makes a job queued, and deleted by a relay once the wake-up it stands for is
-- acknowledged by the job bus (NATS JetStream), so a crash between commit and publish delays a
-- wake-up but never loses it. The job itself is always read from `jobs`: the bus only wakes.
CREATE TABLE outbox (
    id         BIGSERIAL PRIMARY KEY,
    tenant     TEXT NOT NULL,
    job_id     TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
