-- Version 2: Gate B. Attempts, the lease (fenced by its token), Gate B's decision, the
-- dead-letter reason and the worker's result.
ALTER TABLE jobs ADD COLUMN scheduling_attempts INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN execution_attempts INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN not_before INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN lease_token TEXT;
ALTER TABLE jobs ADD COLUMN lease_expires_at INTEGER;
ALTER TABLE jobs ADD COLUMN leased_by TEXT;
ALTER TABLE jobs ADD COLUMN gate_b TEXT;
ALTER TABLE jobs ADD COLUMN dead_letter_reason TEXT;
ALTER TABLE jobs ADD COLUMN discarded_at INTEGER;
ALTER TABLE jobs ADD COLUMN result TEXT;
ALTER TABLE jobs ADD COLUMN error TEXT;
CREATE INDEX jobs_dispatchable ON jobs (tenant, state, not_before);
CREATE INDEX jobs_by_lease_expiry ON jobs (state, lease_expires_at);
