-- worker_role.sql (extension only): the role the delivery worker's SQL runs as.
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
