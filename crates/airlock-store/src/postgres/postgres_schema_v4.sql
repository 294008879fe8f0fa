-- Version 4 of the PostgreSQL schema: audit records are sequenced after commit. A writing
-- transaction inserts its records here, with the state change they describe; a sealer (one at a
-- time, under an advisory lock) chains them in `id` order into `audit` and moves the tenants'
-- heads, many records per transaction. Writers never lock a chain head, so replicas no longer
-- queue behind one tenant's head. `id` comes from a sequence: a transaction that starts after
-- another commits gets larger ids, so the chain keeps causal order.
CREATE TABLE audit_pending (
    id      BIGSERIAL PRIMARY KEY,
    tenant  TEXT COLLATE "C" NOT NULL,
    at      BIGINT NOT NULL,
    kind    TEXT NOT NULL,
    subject TEXT NOT NULL,
    actor   TEXT NOT NULL,
    data    TEXT NOT NULL
);
