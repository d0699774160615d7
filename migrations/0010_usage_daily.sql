-- Per-day totals of the usage ledger, by UTC day, tenant and model: what the console's overview and budget
-- bars read instead of aggregating every ledger row of their range (docs/console.md, "Pages stay fast").
-- Exact, not sampled: the usage writer adds each batch's totals here in the same transaction as the batch's
-- rows (`ledger::rollup`), and ledger rows are never updated or deleted afterwards. One file for both
-- databases, like every migration: integer division of BIGINTs truncates on SQLite and PostgreSQL alike.
CREATE TABLE usage_daily (
    day              BIGINT NOT NULL,            -- UTC midnight starting the day, Unix milliseconds
    tenant_id        TEXT NOT NULL,
    model            TEXT NOT NULL,              -- as stored in usage_events.model
    requests         BIGINT NOT NULL,            -- ledger rows
    images           BIGINT NOT NULL,            -- SUM(COALESCE(images_returned, 0)), cached answers included
    images_billed    BIGINT NOT NULL,            -- the same without cache hits: what image budgets count
    cost_usd         DOUBLE PRECISION NOT NULL,  -- SUM(cost_usd)
    cache_hits       BIGINT NOT NULL,            -- rows with cache_hit = 1
    refused          BIGINT NOT NULL,            -- rows with refused_by set (imagegate's limits or the upstream's 429)
    errors           BIGINT NOT NULL,            -- rows with status >= 500 that were not refusals
    PRIMARY KEY (day, tenant_id, model)
);
-- One tenant's range (a team's overview, budget bars).
CREATE INDEX usage_daily_tenant ON usage_daily (tenant_id, day);

-- Backfill: every row written before this migration.
INSERT INTO usage_daily (day, tenant_id, model, requests, images, images_billed, cost_usd, cache_hits, refused, errors)
SELECT (created_at / 86400000) * 86400000, tenant_id, model,
       COUNT(*),
       CAST(SUM(COALESCE(images_returned, 0)) AS BIGINT),
       CAST(SUM(CASE WHEN cache_hit = 0 THEN COALESCE(images_returned, 0) ELSE 0 END) AS BIGINT),
       CAST(SUM(cost_usd) AS DOUBLE PRECISION),
       CAST(SUM(CASE WHEN cache_hit <> 0 THEN 1 ELSE 0 END) AS BIGINT),
       CAST(SUM(CASE WHEN refused_by IS NOT NULL THEN 1 ELSE 0 END) AS BIGINT),
       CAST(SUM(CASE WHEN status >= 500 AND refused_by IS NULL THEN 1 ELSE 0 END) AS BIGINT)
FROM usage_events
GROUP BY (created_at / 86400000) * 86400000, tenant_id, model;

-- Migration 0009's covering index served only the overview's scan of raw rows, which the rollup replaces; it
-- cost every ledger insert an eight-column index entry (and on SQLite made the year's scan slower than the
-- table). The usage table and spend queries use usage_events_time and usage_events_tenant_time.
DROP INDEX usage_events_console;
