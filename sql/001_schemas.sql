-- 001_schemas.sql: the three schemas of the outreach pipeline.
--
-- The files sql/NNN_*.sql are the single source of every SQL object: the
-- extension loads them in this order, and bin/build-trigger-only concatenates
-- the same files into the trigger-only script for hosts such as Neon.

CREATE SCHEMA intake;
COMMENT ON SCHEMA intake IS
    'Raw company records as they arrive, before validation.';

CREATE SCHEMA marketing;
COMMENT ON SCHEMA marketing IS
    'Validated companies, their role slots and contacts, email checks, and the pipeline event queue.';

CREATE SCHEMA pipeline;
COMMENT ON SCHEMA pipeline IS
    'The pipeline_ext API: watches, queue operations, error handling and self-checks.';
