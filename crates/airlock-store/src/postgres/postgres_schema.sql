-- Version 1 of the PostgreSQL schema: the embedded schema at its version 3, in PostgreSQL types
-- (BIGINT millis, TEXT JSON so that payloads round-trip byte for byte, BYTEA key hashes).
-- Ids, tenants and keys use the "C" collation so that ordering and cursors are bytewise, as in
-- SQLite. Applied once, in a transaction, under the migration advisory lock.
CREATE TABLE api_keys (
    id          TEXT COLLATE "C" PRIMARY KEY,
    tenant      TEXT COLLATE "C" NOT NULL,
    name        TEXT NOT NULL,
    roles       TEXT NOT NULL,
    secret_hash BYTEA NOT NULL UNIQUE,
    created_at  BIGINT NOT NULL,
    revoked_at  BIGINT,
    UNIQUE (tenant, name)
);

CREATE TABLE snapshots (
    version    BIGINT PRIMARY KEY,
    hash       TEXT NOT NULL,
    source     TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    created_by TEXT NOT NULL,
    note       TEXT
);

CREATE TABLE active_snapshot (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    version BIGINT NOT NULL REFERENCES snapshots (version)
);

CREATE TABLE jobs (
    id                  TEXT COLLATE "C" PRIMARY KEY,
    tenant              TEXT COLLATE "C" NOT NULL,
    principal           TEXT NOT NULL,
    topic               TEXT NOT NULL,
    env                 TEXT NOT NULL,
    labels              TEXT NOT NULL,
    payload             TEXT NOT NULL,
    plan_hash           TEXT,
    idempotency_key     TEXT,
    job_hash            TEXT NOT NULL,
    state               TEXT NOT NULL,
    gate_a              TEXT NOT NULL,
    approval_id         TEXT,
    created_at          BIGINT NOT NULL,
    updated_at          BIGINT NOT NULL,
    scheduling_attempts BIGINT NOT NULL DEFAULT 0,
    execution_attempts  BIGINT NOT NULL DEFAULT 0,
    not_before          BIGINT NOT NULL DEFAULT 0,
    lease_token         TEXT,
    lease_expires_at    BIGINT,
    leased_by           TEXT,
    gate_b              TEXT,
    dead_letter_reason  TEXT,
    discarded_at        BIGINT,
    result              TEXT,
    error               TEXT
);
CREATE INDEX jobs_by_tenant ON jobs (tenant, id);
CREATE INDEX jobs_by_tenant_state ON jobs (tenant, state, id);
CREATE INDEX jobs_by_state ON jobs (state);
CREATE INDEX jobs_dispatchable ON jobs (tenant, state, not_before, id);
CREATE INDEX jobs_by_lease_expiry ON jobs (state, lease_expires_at);

CREATE TABLE job_transitions (
    job_id     TEXT COLLATE "C" NOT NULL,
    seq        BIGINT NOT NULL,
    from_state TEXT,
    to_state   TEXT NOT NULL,
    at         BIGINT NOT NULL,
    actor      TEXT NOT NULL,
    reason     TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
);

CREATE TABLE approvals (
    id            TEXT COLLATE "C" PRIMARY KEY,
    tenant        TEXT COLLATE "C" NOT NULL,
    job_id        TEXT COLLATE "C" NOT NULL,
    status        TEXT NOT NULL,
    job_hash      TEXT NOT NULL,
    snapshot_hash TEXT NOT NULL,
    rule_ids      TEXT NOT NULL,
    rule_hashes   TEXT NOT NULL,
    requested_by  TEXT NOT NULL,
    created_at    BIGINT NOT NULL,
    expires_at    BIGINT NOT NULL,
    quorum        BIGINT NOT NULL,
    approvers     TEXT NOT NULL,
    decided_at    BIGINT,
    decided_by    TEXT
);
CREATE INDEX approvals_by_tenant_status ON approvals (tenant, status, id);
CREATE INDEX approvals_by_status_expiry ON approvals (status, expires_at);

CREATE TABLE idempotency (
    tenant     TEXT COLLATE "C" NOT NULL,
    key        TEXT COLLATE "C" NOT NULL,
    job_hash   TEXT NOT NULL,
    job_id     TEXT COLLATE "C" NOT NULL,
    status     INTEGER NOT NULL,
    body       TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (tenant, key)
);

-- `tokens` is NULL for a bucket row created only to be locked, never charged: it reads as a
-- fresh bucket.
CREATE TABLE throttle_buckets (
    key        TEXT COLLATE "C" PRIMARY KEY,
    tokens     DOUBLE PRECISION,
    updated_at BIGINT NOT NULL
);

CREATE TABLE audit (
    tenant    TEXT COLLATE "C" NOT NULL,
    seq       BIGINT NOT NULL,
    at        BIGINT NOT NULL,
    kind      TEXT NOT NULL,
    subject   TEXT NOT NULL,
    actor     TEXT NOT NULL,
    data      TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash      TEXT NOT NULL,
    PRIMARY KEY (tenant, seq)
);

-- `seq` 0 marks a head row created only to be locked, before the tenant's first record.
CREATE TABLE audit_heads (
    tenant TEXT COLLATE "C" PRIMARY KEY,
    seq    BIGINT NOT NULL,
    hash   TEXT NOT NULL
);
