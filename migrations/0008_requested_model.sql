-- The model the caller named when an alias (`[models.aliases]` in the config) moved the request to another
-- model; `model` is then the model actually used and sent upstream. NULL when no alias applied.
ALTER TABLE usage_events ADD COLUMN requested_model TEXT;
