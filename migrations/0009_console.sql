-- The web console (docs/console.md): signed-in sessions, and an index the overview reads instead of the table.
-- A session row is keyed by the SHA-256 of its id: the cookie carries the id (signed), the database only its hash,
-- so a copy of the database signs nobody in.
CREATE TABLE console_sessions (
    id_sha256   TEXT PRIMARY KEY,
    kind        TEXT NOT NULL,             -- 'admin' or 'tenant'
    tenant_id   TEXT,                      -- for 'tenant': the tenant it may see
    key_id      TEXT,                      -- for 'tenant': the key it signed in with (revoking it ends the session)
    credential  TEXT NOT NULL,             -- for 'admin': a MAC of the admin token (rotating the token ends it)
    csrf        TEXT NOT NULL,             -- the token every form of the session carries
    created_at  BIGINT NOT NULL,
    expires_at  BIGINT NOT NULL
);
CREATE INDEX console_sessions_expires ON console_sessions (expires_at);
-- The overview groups a time range by day, tenant and model: this index holds every column it reads, so the
-- range is answered from the index alone (SQLite) or by an index-only scan (PostgreSQL), without the table's
-- wide rows (prompts, request ids).
CREATE INDEX usage_events_console ON usage_events
    (created_at, tenant_id, model, status, cache_hit, images_returned, cost_usd, refused_by);
