-- Tenant keys. The key itself (ig_<id>_<secret>) is shown once; only the SHA-256 of the whole key is kept.
CREATE TABLE api_keys (
    id            TEXT PRIMARY KEY,            -- the public 8-character id embedded in the key
    tenant_id     TEXT NOT NULL REFERENCES tenants (id),
    name          TEXT,                        -- optional label ("ci", "laptop")
    secret_sha256 TEXT NOT NULL,               -- hex SHA-256 of the whole key
    created_at    BIGINT NOT NULL,
    expires_at    BIGINT,                      -- NULL = never
    revoked_at    BIGINT,                      -- NULL = active
    last_used_at  BIGINT                       -- updated in batches, not on every request
);
CREATE INDEX api_keys_tenant ON api_keys (tenant_id);
