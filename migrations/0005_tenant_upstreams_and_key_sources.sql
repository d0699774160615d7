-- Named upstreams per tenant, and where each key came from (so keys removed from the configuration file can
-- be revoked at startup without touching keys issued through the admin API or the CLI).
ALTER TABLE tenants ADD COLUMN upstream TEXT;                   -- an [upstreams.<name>] table; NULL = [upstream]
ALTER TABLE api_keys ADD COLUMN source TEXT NOT NULL DEFAULT 'api'; -- 'config' (declared in the file) or 'api'
-- Earlier versions stored configuration keys with the label 'config' on configuration tenants.
UPDATE api_keys SET source = 'config'
 WHERE name = 'config' AND tenant_id IN (SELECT id FROM tenants WHERE source = 'config');
