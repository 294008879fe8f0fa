-- Version 5 of the embedded schema: the person a key authenticates as (SPEC 7: quorum and
-- self-approval compare principals, so one person's two keys count once); NULL means the key's
-- name, as before.
ALTER TABLE api_keys ADD COLUMN principal TEXT;
