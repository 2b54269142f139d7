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
--   * Little runs with raised rights, and only what must: the capture of
--     the stage watches and of tables with plain columns
--     (pipeline._capture_stage, pipeline._capture_sealed, 004_capture.sql)
--     and the making and dropping of the history's partitions
--     (pipeline._maintain_partitions, 015_partitions.sql) are SECURITY
--     DEFINER, each checked as docs/security.md says. Other watched rows
--     become JSON as the role that wrote them, and what it may then write
--     to the event queue is decided by row-level security policies
--     (004_capture.sql). Queue consumers get column privileges only.

SET LOCAL search_path = pg_catalog, pg_temp;

CREATE SCHEMA intake;
COMMENT ON SCHEMA intake IS
    'Raw company records as they arrive, before validation.';

CREATE SCHEMA marketing;
COMMENT ON SCHEMA marketing IS
    'Validated companies, their role slots and contacts, email checks, and the pipeline event queue.';

-- NB: under CREATE EXTENSION this schema exists already: the control file
-- names it as the extension's schema (pg_extension.extnamespace), and
-- PostgreSQL makes it, owned by the installing role, before these files run.
-- PostgreSQL also takes a schema of that name that was there before, so one
-- that a role other than a superuser owns, or that holds anything, is
-- refused: its owner could replace the pipeline's functions. The trigger-only script, where no
-- extension row exists, creates the schema here (one that is there already
-- stops it, as any existing object does).
DO $schema$
DECLARE
    v_owner name;
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_extension WHERE extname OPERATOR(pg_catalog.=) 'pipeline_ext') THEN
        CREATE SCHEMA pipeline;
        RETURN;
    END IF;
    SELECT pg_catalog.pg_get_userbyid(n.nspowner) INTO v_owner
    FROM pg_catalog.pg_namespace n WHERE n.nspname OPERATOR(pg_catalog.=) 'pipeline';
    -- NB: a superuser's schema is as safe as one's own: pg_restore makes the
    -- schema as the dump's superuser before it runs CREATE EXTENSION.
    IF v_owner OPERATOR(pg_catalog.<>) CURRENT_USER
       AND NOT (SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.rolname OPERATOR(pg_catalog.=) v_owner) THEN
        RAISE EXCEPTION 'pipeline_ext: schema pipeline exists and belongs to %, not to %', v_owner, CURRENT_USER
            USING HINT = 'CREATE EXTENSION makes the schema itself: drop or rename the existing one first.';
    END IF;
    IF EXISTS (SELECT FROM pg_catalog.pg_class WHERE relnamespace OPERATOR(pg_catalog.=) 'pipeline'::pg_catalog.regnamespace)
       OR EXISTS (SELECT FROM pg_catalog.pg_proc WHERE pronamespace OPERATOR(pg_catalog.=) 'pipeline'::pg_catalog.regnamespace)
       OR EXISTS (SELECT FROM pg_catalog.pg_type WHERE typnamespace OPERATOR(pg_catalog.=) 'pipeline'::pg_catalog.regnamespace) THEN
        RAISE EXCEPTION 'pipeline_ext: schema pipeline exists and is not empty'
            USING HINT = 'CREATE EXTENSION makes the schema itself: drop or rename the existing one first.';
    END IF;
END
$schema$;
COMMENT ON SCHEMA pipeline IS
    'The pipeline_ext API: watches, queue operations, error handling and self-checks.';

-- Looking names up in these schemas is harmless on its own: every table,
-- view and function in them has privileges of its own. Writers of watched
-- tables need it, since their own rights store the events (004_capture.sql).
GRANT USAGE ON SCHEMA marketing, pipeline TO PUBLIC;

-- The version of the objects installed here, in either mode (an upgrade
-- script of the trigger-only mode checks it before it changes anything).
CREATE FUNCTION pipeline.version() RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $$
    SELECT '0.2.0'
$$;
COMMENT ON FUNCTION pipeline.version() IS
    'The version of pipeline_ext whose objects are installed in this database (extension or trigger-only).';
