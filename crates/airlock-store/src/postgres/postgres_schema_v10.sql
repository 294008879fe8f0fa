-- Version 10 of the PostgreSQL schema: the exact-gates guard without row locks.
--
-- Version 9's guard took a KEY SHARE lock on the active-snapshot row. A row lock is a write: each
-- guarded commit logged a heap lock record (about 140 more WAL bytes per transaction, measured
-- with pgbench in BENCHMARKS.md), and concurrent writers on the one row made multixacts. The
-- guard now takes the publish lock (advisory lock (0x4169726c, 2), which `publish` takes
-- exclusively) in shared mode until the commit: a publish still waits for every write decided
-- under the old version, and a write that gets the lock after a publish committed reads the new
-- version (a volatile function's statements each see a fresh snapshot under READ COMMITTED)
-- and is refused with SQLSTATE Z9001 (its message is the active version). Nothing is written.
CREATE OR REPLACE FUNCTION airlock_decided_under(decided BIGINT) RETURNS BIGINT
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    active BIGINT;
BEGIN
    PERFORM pg_advisory_xact_lock_shared(1097429612, 2);
    SELECT version INTO active FROM active_snapshot WHERE id = 1;
    IF active IS DISTINCT FROM decided THEN
        RAISE EXCEPTION USING ERRCODE = 'Z9001', MESSAGE = COALESCE(active, 0)::TEXT;
    END IF;
    RETURN active;
END
$$;
