-- Who refused a request: 'gateway' (imagegate's own limits: a 429, or the fail-closed 503) or 'upstream'
-- (the upstream answered 429); NULL for every other row. Tells a tenant's own limits apart from the shared
-- upstream quota in the ledger and in usage summaries.
ALTER TABLE usage_events ADD COLUMN refused_by TEXT;
