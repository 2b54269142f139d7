-- 001_schemas.sql: the three schemas of the outreach pipeline.
--
-- The files sql/NNN_*.sql are the single source of every SQL object: the
-- extension loads them in this order, and bin/build-trigger-only concatenates
-- the same files into the trigger-only script for hosts such as Neon.
--
-- Security (PostgreSQL's "Security Considerations for Extension Scripts" and
-- "Writing SECURITY DEFINER Functions Safely"):
--   * While these files run, names resolve in pg_catalog only: a function,
--     operator or type that the database owner (or anyone who may create in
--     public or in a schema named like the installing role) planted never runs.
--     Every object of the pipeline is created and referenced schema-qualified.
--   * Every function runs with search_path = pg_catalog, pg_temp, whoever
--     calls it, so a caller's search_path cannot redirect its names either.
--     The few SQL functions left inlinable (they sit in CHECK constraints on
--     the write path) qualify every operator instead.
--   * Nothing runs with raised rights: there is no SECURITY DEFINER function.
--     A watched row becomes JSON as the role that wrote it; what it may then
--     write to the event queue is decided by row-level security policies
--     (004_capture.sql). Queue consumers get column privileges only.

SET LOCAL search_path = pg_catalog, pg_temp;

CREATE SCHEMA intake;
COMMENT ON SCHEMA intake IS
    'Raw company records as they arrive, before validation.';

CREATE SCHEMA marketing;
COMMENT ON SCHEMA marketing IS
    'Validated companies, their role slots and contacts, email checks, and the pipeline event queue.';

CREATE SCHEMA pipeline;
COMMENT ON SCHEMA pipeline IS
    'The pipeline_ext API: watches, queue operations, error handling and self-checks.';

-- Looking names up in these schemas is harmless on its own: every table,
-- view and function in them has privileges of its own. Writers of watched
-- tables need it, since their own rights store the events (004_capture.sql).
GRANT USAGE ON SCHEMA marketing, pipeline TO PUBLIC;
