-- Re-hosted images. The bytes live in the object store under their SHA-256, stored once however often the
-- same image is returned: `image_blobs` has one row per stored object, `images` one row per link handed out.
CREATE TABLE image_blobs (
    sha256       TEXT PRIMARY KEY,        -- hex; the object's key in the store
    content_type TEXT NOT NULL,
    bytes        BIGINT NOT NULL,
    created_at   BIGINT NOT NULL,
    expires_at   BIGINT NOT NULL          -- the latest expiry of any image using it; then the sweeper deletes it
);
CREATE INDEX image_blobs_expires ON image_blobs (expires_at);

CREATE TABLE images (
    id           TEXT PRIMARY KEY,        -- random, 128 bits; signed into the link
    tenant_id    TEXT NOT NULL,
    sha256       TEXT NOT NULL,           -- which blob holds the bytes
    content_type TEXT NOT NULL,
    bytes        BIGINT NOT NULL,
    width        BIGINT,
    height       BIGINT,
    model        TEXT NOT NULL,           -- the model that produced it
    request_id   TEXT NOT NULL,           -- imagegate's x-request-id of the request that returned it
    created_at   BIGINT NOT NULL,
    expires_at   BIGINT NOT NULL          -- created_at + the tenant's retention; the link stops working then
);
CREATE INDEX images_expires ON images (expires_at);
CREATE INDEX images_tenant_time ON images (tenant_id, created_at);

-- Per-tenant re-hosting policy (JSON): response format default, retention, download fallback.
ALTER TABLE tenants ADD COLUMN image_policy TEXT NOT NULL DEFAULT '{}';
