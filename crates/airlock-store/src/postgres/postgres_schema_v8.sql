-- Version 8 of the PostgreSQL schema: fewer index entries per job. A job changes state three
-- times or more, and each change writes a new entry into every index whose predicate the new row
-- version matches. Indexes over states that a query looks up alone now hold only that state:
-- leases by expiry (the lapsed-lease sweep), dead letters by tenant (the DLQ listing and depth).
-- The index on `state` alone served nothing else (counts per state read every row anyway).
DROP INDEX jobs_by_state;
DROP INDEX jobs_by_lease_expiry;
CREATE INDEX jobs_leased ON jobs (lease_expires_at) WHERE state = 'leased';
CREATE INDEX jobs_dead_lettered ON jobs (tenant, id) WHERE state = 'dead_lettered';
