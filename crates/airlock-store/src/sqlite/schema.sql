-- Version 1 of the embedded schema. Applied once, in a transaction, when PRAGMA user_version < 1.
CREATE TABLE api_keys (
    id          TEXT PRIMARY KEY,
    tenant      TEXT NOT NULL,
    name        TEXT NOT NULL,
    roles       TEXT NOT NULL,
    secret_hash BLOB NOT NULL UNIQUE,
    created_at  INTEGER NOT NULL,
    revoked_at  INTEGER,
    UNIQUE (tenant, name)
);

CREATE TABLE snapshots (
    version    INTEGER PRIMARY KEY,
    hash       TEXT NOT NULL,
    source     TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    created_by TEXT NOT NULL,
    note       TEXT
);

CREATE TABLE active_snapshot (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    version INTEGER NOT NULL REFERENCES snapshots (version)
);

CREATE TABLE jobs (
    id              TEXT PRIMARY KEY,
    tenant          TEXT NOT NULL,
    principal       TEXT NOT NULL,
    topic           TEXT NOT NULL,
    env             TEXT NOT NULL,
    labels          TEXT NOT NULL,
    payload         TEXT NOT NULL,
    plan_hash       TEXT,
    idempotency_key TEXT,
    job_hash        TEXT NOT NULL,
    state           TEXT NOT NULL,
    gate_a          TEXT NOT NULL,
    approval_id     TEXT,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL
);
CREATE INDEX jobs_by_tenant ON jobs (tenant, id);
CREATE INDEX jobs_by_tenant_state ON jobs (tenant, state, id);
CREATE INDEX jobs_by_state ON jobs (state);

CREATE TABLE job_transitions (
    job_id     TEXT NOT NULL,
    seq        INTEGER NOT NULL,
    from_state TEXT,
    to_state   TEXT NOT NULL,
    at         INTEGER NOT NULL,
    actor      TEXT NOT NULL,
    reason     TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
) WITHOUT ROWID;

CREATE TABLE approvals (
    id            TEXT PRIMARY KEY,
    tenant        TEXT NOT NULL,
    job_id        TEXT NOT NULL,
    status        TEXT NOT NULL,
    job_hash      TEXT NOT NULL,
    snapshot_hash TEXT NOT NULL,
    rule_ids      TEXT NOT NULL,
    rule_hashes   TEXT NOT NULL,
    requested_by  TEXT NOT NULL,
    created_at    INTEGER NOT NULL,
    expires_at    INTEGER NOT NULL,
    quorum        INTEGER NOT NULL,
    approvers     TEXT NOT NULL,
    decided_at    INTEGER,
    decided_by    TEXT
);
CREATE INDEX approvals_by_tenant_status ON approvals (tenant, status, id);
CREATE INDEX approvals_by_status_expiry ON approvals (status, expires_at);

CREATE TABLE idempotency (
    tenant     TEXT NOT NULL,
    key        TEXT NOT NULL,
    job_hash   TEXT NOT NULL,
    job_id     TEXT NOT NULL,
    status     INTEGER NOT NULL,
    body       TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (tenant, key)
) WITHOUT ROWID;

CREATE TABLE throttle_buckets (
    key        TEXT PRIMARY KEY,
    tokens     REAL NOT NULL,
    updated_at INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE audit (
    tenant    TEXT NOT NULL,
    seq       INTEGER NOT NULL,
    at        INTEGER NOT NULL,
    kind      TEXT NOT NULL,
    subject   TEXT NOT NULL,
    actor     TEXT NOT NULL,
    data      TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash      TEXT NOT NULL,
    PRIMARY KEY (tenant, seq)
) WITHOUT ROWID;

CREATE TABLE audit_heads (
    tenant TEXT PRIMARY KEY,
    seq    INTEGER NOT NULL,
    hash   TEXT NOT NULL
) WITHOUT ROWID;
