WITH p0 AS (INSERT INTO jobs (tenant, payload) VALUES ('acme', 'payload')) SELECT 1;
