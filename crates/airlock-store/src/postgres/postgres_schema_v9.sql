-- Version 9 of the PostgreSQL schema: exact gates, and keys that name a person.
--
-- `airlock_decided_under(v)` is how a write proves, inside its own transaction, that the policy
-- snapshot it was decided under is still the active one (SPEC 6, linearizable policy). It takes
-- a KEY SHARE lock on the active-snapshot row, held until the write commits; a publish takes the
-- row FOR UPDATE, so it waits for every write decided under the old version, and every write
-- that locks the row after the publish commits reads the new version and is refused with
-- SQLSTATE Z9001 (its message is the active version), rolling back all the write did.
CREATE FUNCTION airlock_decided_under(decided BIGINT) RETURNS BIGINT
LANGUAGE plpgsql AS $$
DECLARE
    active BIGINT;
BEGIN
    SELECT version INTO active FROM active_snapshot WHERE id = 1 FOR KEY SHARE;
    IF active IS DISTINCT FROM decided THEN
        RAISE EXCEPTION USING ERRCODE = 'Z9001', MESSAGE = COALESCE(active, 0)::TEXT;
    END IF;
    RETURN active;
END
$$;

-- The person a key authenticates as (SPEC 7: quorum and self-approval compare principals); NULL
-- means the key's name, as before.
ALTER TABLE api_keys ADD COLUMN principal TEXT;

-- A job's audit records, for the job view (every gate decision, not only the last).
CREATE INDEX audit_by_subject ON audit (tenant, subject, seq);
