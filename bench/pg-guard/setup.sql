-- A scratch database for guard.sh: the active-snapshot row, a job table, and both guards.
DROP TABLE IF EXISTS active_snapshot, jobs;
CREATE TABLE active_snapshot (id INT PRIMARY KEY, version BIGINT NOT NULL);
INSERT INTO active_snapshot VALUES (1, 1);
CREATE TABLE jobs (id BIGSERIAL PRIMARY KEY, tenant TEXT NOT NULL, payload TEXT NOT NULL);

-- Migration v9: a KEY SHARE lock on the active-snapshot row.
CREATE OR REPLACE FUNCTION guard_rowlock(decided BIGINT) RETURNS BIGINT
LANGUAGE plpgsql AS $$
DECLARE active BIGINT;
BEGIN
    SELECT version INTO active FROM active_snapshot WHERE id = 1 FOR KEY SHARE;
    IF active IS DISTINCT FROM decided THEN RAISE EXCEPTION USING ERRCODE = 'Z9001'; END IF;
    RETURN active;
END $$;

-- Migration v10: the publish advisory lock, shared, then a plain read.
CREATE OR REPLACE FUNCTION guard_advlock(decided BIGINT) RETURNS BIGINT
LANGUAGE plpgsql VOLATILE AS $$
DECLARE active BIGINT;
BEGIN
    PERFORM pg_advisory_xact_lock_shared(1097429612, 2);
    SELECT version INTO active FROM active_snapshot WHERE id = 1;
    IF active IS DISTINCT FROM decided THEN RAISE EXCEPTION USING ERRCODE = 'Z9001'; END IF;
    RETURN active;
END $$;
