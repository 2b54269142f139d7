-- The extension's own part of the upgrade from 0.1.0 to 0.2.0 (after the
-- part both modes share, sql/upgrade/0.1.0--0.2.0.sql).

-- The library's versions of two functions that the shared part made in SQL.
CREATE OR REPLACE FUNCTION pipeline._payload_bytes(payload jsonb) RETURNS bigint
LANGUAGE c IMMUTABLE STRICT AS 'MODULE_PATHNAME', 'payload_bytes_wrapper';
CREATE OR REPLACE FUNCTION pipeline._worker_pid() RETURNS integer
LANGUAGE c STABLE AS 'MODULE_PATHNAME', 'worker_pid_wrapper';
-- Only its own triggers call the wake-up (0.1.0 left it to PUBLIC).
REVOKE ALL ON FUNCTION pipeline._wake_worker() FROM PUBLIC;
-- A changed or removed endpoint, or its credentials, take back what the
-- worker holds for it (0.1.0 woke it on INSERT and UPDATE of the endpoints).
DROP TRIGGER pipeline_wake_worker ON pipeline.webhooks;
CREATE TRIGGER pipeline_wake_worker
    AFTER INSERT OR UPDATE OR DELETE ON pipeline.webhooks
    FOR EACH STATEMENT EXECUTE FUNCTION pipeline._wake_worker('always');
CREATE TRIGGER pipeline_wake_worker
    AFTER INSERT OR UPDATE OR DELETE ON pipeline.webhook_credentials
    FOR EACH STATEMENT EXECUTE FUNCTION pipeline._wake_worker('always');
-- Each database with the extension has a worker of its own now, which
-- the launcher starts; this asks for this database's once the update
-- commits. NB: the library must be the new one (restart the server
-- first): the old one has no such function, and the update stops here.
CREATE FUNCTION pipeline._start_worker() RETURNS void
LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'start_worker_wrapper';
COMMENT ON FUNCTION pipeline._start_worker() IS
    'Asks for this database''s delivery worker when the transaction commits (extension only).';
REVOKE ALL ON FUNCTION pipeline._start_worker() FROM PUBLIC;
SELECT pipeline._start_worker();

-- the role the delivery worker's SQL runs as.
--
-- The worker never runs SQL as a superuser (src/transaction.rs): every
-- transaction switches to pipeline.worker_role, by default pipeline_worker,
-- made here with exactly the rights delivery needs and owning nothing. It
-- cannot log in. Another role named in pipeline.worker_role gets these
-- rights by membership: GRANT pipeline_worker TO that_role.
--
-- Roles belong to the whole server: the role is made once and reused by
-- every database with the extension; DROP EXTENSION leaves it (drop it by
-- hand once no database uses the extension).

-- A role of that name made by someone else is not adopted as it is: it is
-- reset to what this script makes (no login, no password, no attribute),
-- saying what it had, so that nobody logs in with the worker's rights (the
-- webhook secrets among them). A superuser is refused (only a superuser
-- can take that away).
DO $$
DECLARE
    v_role  record;
    v_had   text[];
BEGIN
    SELECT r.* INTO v_role FROM pg_catalog.pg_authid r WHERE r.rolname = 'pipeline_worker';
    IF NOT FOUND THEN
        CREATE ROLE pipeline_worker NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT NOREPLICATION NOBYPASSRLS;
    ELSIF v_role.rolsuper THEN
        RAISE EXCEPTION 'role pipeline_worker exists and is a superuser'
            USING HINT = 'The delivery worker must not run with superuser rights: ALTER ROLE pipeline_worker NOSUPERUSER.';
    ELSE
        v_had := array_remove(ARRAY[
            CASE WHEN v_role.rolcanlogin THEN 'LOGIN' END,
            CASE WHEN v_role.rolpassword IS NOT NULL THEN 'a password' END,
            CASE WHEN v_role.rolcreaterole THEN 'CREATEROLE' END,
            CASE WHEN v_role.rolcreatedb THEN 'CREATEDB' END,
            CASE WHEN v_role.rolinherit THEN 'INHERIT' END,
            CASE WHEN v_role.rolreplication THEN 'REPLICATION' END,
            CASE WHEN v_role.rolbypassrls THEN 'BYPASSRLS' END], NULL);
        IF cardinality(v_had) > 0 THEN
            ALTER ROLE pipeline_worker NOLOGIN PASSWORD NULL NOCREATEDB NOCREATEROLE NOINHERIT NOREPLICATION NOBYPASSRLS;
            RAISE WARNING 'role pipeline_worker existed with %: reset to NOLOGIN without a password or attributes',
                array_to_string(v_had, ', ')
                USING HINT = 'It gets the delivery worker''s rights. Roles granted it keep them: '
                             'see \du pipeline_worker.';
        END IF;
    END IF;
END
$$;

-- Claim, settle, release and purge events: the delivery columns only, so
-- that it cannot change what an event says or where it goes.
GRANT SELECT, DELETE ON marketing.pipeline_events TO pipeline_worker;
GRANT UPDATE (status, attempts, next_attempt_at, processed_at, last_error, claimed_by)
    ON marketing.pipeline_events TO pipeline_worker;
-- The attempt log, and the error log (failures; resolved once delivered).
GRANT SELECT, INSERT, DELETE ON marketing.pipeline_delivery_attempts TO pipeline_worker;
GRANT SELECT, INSERT ON marketing.pipeline_error_log TO pipeline_worker;
GRANT UPDATE (resolved, resolved_at, resolution_note) ON marketing.pipeline_error_log TO pipeline_worker;
-- Endpoints: read them, and disable one that answered 410 Gone.
GRANT SELECT ON pipeline.webhooks, pipeline.webhook_credentials TO pipeline_worker;
GRANT UPDATE (enabled, disabled_reason, updated_at) ON pipeline.webhooks TO pipeline_worker;
-- Say when it last claimed events (pipeline.status()).
GRANT SELECT, INSERT, DELETE ON pipeline.deliverers TO pipeline_worker;
GRANT UPDATE (last_active_at) ON pipeline.deliverers TO pipeline_worker;
-- Make the event history's partitions and drop old ones (pipeline.purge).
GRANT EXECUTE ON FUNCTION pipeline._maintain_partitions(interval) TO pipeline_worker;
-- Keep each endpoint's health (and give up on one that never answers).
GRANT SELECT, INSERT, UPDATE ON pipeline.endpoint_health TO pipeline_worker;

-- The extension's schema. 0.2.0's control file names it (schema =
-- pipeline), and PostgreSQL makes it before an install script runs, so a
-- fresh install has it as the extension's schema and not as a member. 0.1.0
-- made it in its script (a member) and was recorded in the schema that was
-- first on the search_path, usually public. ALTER EXTENSION cannot run in
-- an extension's own script, so the two catalog rows it would change are
-- changed here; the upgrade's test compares the result with a fresh install.
DELETE FROM pg_catalog.pg_depend
WHERE classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_namespace'::pg_catalog.regclass
  AND objid OPERATOR(pg_catalog.=) 'pipeline'::pg_catalog.regnamespace::pg_catalog.oid
  AND refclassid OPERATOR(pg_catalog.=) 'pg_catalog.pg_extension'::pg_catalog.regclass
  AND deptype OPERATOR(pg_catalog.=) 'e';
UPDATE pg_catalog.pg_depend
SET refobjid = 'pipeline'::pg_catalog.regnamespace::pg_catalog.oid
WHERE classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_extension'::pg_catalog.regclass
  AND objid OPERATOR(pg_catalog.=) (SELECT e.oid FROM pg_catalog.pg_extension e WHERE e.extname OPERATOR(pg_catalog.=) 'pipeline_ext')
  AND refclassid OPERATOR(pg_catalog.=) 'pg_catalog.pg_namespace'::pg_catalog.regclass;
UPDATE pg_catalog.pg_extension
SET extnamespace = 'pipeline'::pg_catalog.regnamespace::pg_catalog.oid
WHERE extname OPERATOR(pg_catalog.=) 'pipeline_ext';

-- pg_dump keeps the new tables of the stage work as a fresh install does
-- (sql/extension/config_dump.sql).
SELECT pg_catalog.pg_extension_config_dump('pipeline.services', '');
SELECT pg_catalog.pg_extension_config_dump('pipeline.service_calls', '');
SELECT pg_catalog.pg_extension_config_dump('pipeline.undelivered_types', 'WHERE event_type <> ''email_verified''');

-- The event history is partitioned (015_partitions.sql): the 0.1.0 tables
-- of events and attempts are the first partitions and stay configuration
-- tables; the second partitions are too, and the sequences are new. The
-- 0.1.0 sequences went with their tables' identity: PostgreSQL leaves them
-- in the list of configuration tables, where pg_dump would trip on them.
UPDATE pg_catalog.pg_extension e
SET (extconfig, extcondition) = (
    SELECT pg_catalog.array_agg(c.rel ORDER BY c.n), pg_catalog.array_agg(c.cond ORDER BY c.n)
    FROM ROWS FROM (pg_catalog.unnest(e.extconfig), pg_catalog.unnest(e.extcondition)) WITH ORDINALITY AS c(rel, cond, n)
    WHERE EXISTS (SELECT FROM pg_catalog.pg_class k WHERE k.oid OPERATOR(pg_catalog.=) c.rel))
WHERE e.extname OPERATOR(pg_catalog.=) 'pipeline_ext';
SELECT pg_catalog.pg_extension_config_dump('marketing.pipeline_events_1', '');
SELECT pg_catalog.pg_extension_config_dump('marketing.pipeline_delivery_attempts_1', '');
SELECT pg_catalog.pg_extension_config_dump(pg_catalog.pg_get_serial_sequence('marketing.pipeline_events', 'id'), '');
SELECT pg_catalog.pg_extension_config_dump(pg_catalog.pg_get_serial_sequence('marketing.pipeline_delivery_attempts', 'id'), '');
-- The wake-up trigger of the events moves to the partitioned table
-- (the shared part dropped the 0.1.0 table's).
CREATE TRIGGER pipeline_wake_worker
    AFTER INSERT OR UPDATE ON marketing.pipeline_events
    FOR EACH STATEMENT EXECUTE FUNCTION pipeline._wake_worker();
