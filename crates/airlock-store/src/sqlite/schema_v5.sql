-- Version 5 of the embedded schema: the person a key authenticates as (SPEC 7: quorum and
-- self-approval compare principals, so one person's two keys count once); NULL means the key's
-- name, as before.
ALTER TABLE api_keys ADD COLUMN principal TEXT;

-- A job's audit records, for the job view (every gate decision, not only the last).
CREATE INDEX audit_by_subject ON audit (tenant, subject, seq);
