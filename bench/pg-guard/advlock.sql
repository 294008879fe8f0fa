WITH p0 AS (INSERT INTO jobs (tenant, payload) VALUES ('acme', 'payload')) SELECT guard_advlock(1);
