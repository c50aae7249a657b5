-- Keeps the analysts' day-ranged questions fast on millions of calls: `cost_daily`
-- groups by this expression, so `WHERE day >= …` on the view becomes an index
-- range scan. (`started_at` never changes after insert, so settling a call stays a
-- HOT update.) Per-batch questions use the primary keys' `batch_id` prefix.
CREATE INDEX calls_day_model ON sheepdog.calls (((started_at AT TIME ZONE 'UTC')::date), model);
