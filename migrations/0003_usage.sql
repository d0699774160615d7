-- The usage ledger: one row per image request that reached the pipeline. No prompt text (unless the tenant
-- opted in) and never image data.
CREATE TABLE usage_events (
    request_id          TEXT PRIMARY KEY,      -- imagegate's x-request-id
    created_at          BIGINT NOT NULL,       -- when the request finished
    tenant_id           TEXT NOT NULL,
    key_id              TEXT NOT NULL,
    endpoint            TEXT NOT NULL,         -- generations | edits | variations
    model               TEXT NOT NULL,
    images_requested    BIGINT NOT NULL,       -- n
    images_returned     BIGINT,                -- len(data) of a successful answer; NULL when unknown
    size                TEXT,
    quality             TEXT,
    input_tokens        BIGINT,                -- from the upstream's usage object (GPT image models)
    output_tokens       BIGINT,
    cost_usd            DOUBLE PRECISION NOT NULL, -- estimate; 0 for failed, rejected and cached requests
    status              BIGINT NOT NULL,       -- HTTP status returned to the caller
    latency_ms          BIGINT NOT NULL,
    stream              BIGINT NOT NULL,       -- 1 = stream=true
    cache_hit           BIGINT NOT NULL,       -- 1 = answered from the cache
    upstream_request_id TEXT,
    prompt              TEXT                   -- only when the tenant opted into prompt logging
);
CREATE INDEX usage_events_tenant_time ON usage_events (tenant_id, created_at);
CREATE INDEX usage_events_time ON usage_events (created_at);
