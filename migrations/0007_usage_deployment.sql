-- Which pool deployment a request went to ([upstreams.<name>], or 'upstream'); NULL when none was reached
-- (refusals, cache hits, failures before any call).
ALTER TABLE usage_events ADD COLUMN deployment TEXT;
-- 1 when the request went upstream and no answer came (read timeout, connection broken mid-answer): the
-- upstream may have generated and billed images this row cannot count. Such requests are never retried or
-- moved to another deployment.
ALTER TABLE usage_events ADD COLUMN possibly_billed BIGINT NOT NULL DEFAULT 0;
