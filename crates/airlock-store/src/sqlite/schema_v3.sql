-- Version 3: claims read queued jobs in (not_before, id) order; index it whole so that a
-- claim never sorts the queue.
DROP INDEX jobs_dispatchable;
CREATE INDEX jobs_dispatchable ON jobs (tenant, state, not_before, id);
