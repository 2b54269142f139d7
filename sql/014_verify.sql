-- 014_verify.sql: a self-check of the installation (last, so that it can
-- look at every object).
--
-- SELECT * FROM pipeline.verify() lists every object the pipeline needs with
-- ok or what is wrong; SELECT * FROM pipeline.verify() WHERE status <> 'ok'
-- is empty on a healthy install. It works the same in trigger-only mode.

CREATE FUNCTION pipeline.verify()
RETURNS TABLE (kind text, name text, status text)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
WITH expected (kind, name) AS (
    VALUES ('schema', 'intake'), ('schema', 'marketing'), ('schema', 'pipeline'),
           ('table', 'intake.company_raw_intake'),
           ('table', 'marketing.company_master'),
           ('table', 'marketing.company_slots'),
           ('table', 'marketing.email_verification'),
           ('table', 'marketing.pipeline_events'),
           ('table', 'marketing.pipeline_error_log'),
           ('table', 'pipeline.watches'),
           ('table', 'pipeline.stages'),
           ('table', 'pipeline.webhooks'),
           ('table', 'marketing.pipeline_delivery_attempts'),
           ('table', 'pipeline.settled_below'),
           ('view', 'marketing.vw_outreach_ready'),
           ('view', 'marketing.vw_pipeline_funnel'),
           ('view', 'marketing.vw_pending_events'),
           ('view', 'marketing.vw_processing_latency'),
           ('view', 'marketing.vw_unresolved_errors'),
           ('view', 'marketing.vw_error_rate_24h'),
           ('view', 'marketing.vw_endpoint_health'),
           ('function', 'pipeline._capture'),
           ('function', 'pipeline.watch'),
           ('function', 'pipeline.unwatch'),
           ('function', 'pipeline.emit'),
           ('function', 'pipeline.claim'),
           ('function', 'pipeline.mark_delivered'),
           ('function', 'pipeline.mark_delivered_many'),
           ('function', 'pipeline.mark_failed'),
           ('function', 'pipeline.replay'),
           ('function', 'pipeline.replay_many'),
           ('function', 'pipeline.replay_failed'),
           ('function', 'pipeline.log_error'),
           ('function', 'pipeline.resolve_error'),
           ('function', 'pipeline.resolve_errors'),
           ('function', 'pipeline.register_webhook'),
           ('function', 'pipeline.update_webhook'),
           ('function', 'pipeline.disable_webhook'),
           ('function', 'pipeline.enable_webhook'),
           ('function', 'pipeline.remove_webhook'),
           ('function', 'pipeline.import_registry'),
           ('function', 'pipeline.export_registry'),
           ('function', 'pipeline.purge'),
           ('function', 'pipeline.status'),
           ('function', 'pipeline.release_claims'),
           ('function', 'pipeline.grant_event_type'),
           ('function', 'pipeline.revoke_event_type'),
           ('table', 'pipeline.event_type_grants'),
           ('table', 'pipeline.webhook_credentials'),
           ('table', 'pipeline.endpoint_health'),
           ('table', 'pipeline.domain_locks'),
           ('view', 'marketing.vw_pipeline_status'),
           ('table', 'pipeline.services'),
           ('table', 'pipeline.service_calls'),
           ('table', 'pipeline.undelivered_types'),
           ('view', 'marketing.vw_work_progress'),
           ('view', 'marketing.vw_stuck_work'),
           ('view', 'pipeline.services_in_effect'),
           ('function', 'pipeline.set_service'),
           ('function', 'pipeline.enrichment_calls'),
           ('function', 'pipeline.verification_calls'),
           ('function', 'pipeline.finish_call'),
           ('function', 'pipeline.stage_answer'),
           ('function', 'pipeline.resume_company'),
           ('function', 'pipeline.resume_stuck')
),
objects AS (
    SELECT x.kind, x.name,
           CASE x.kind
               WHEN 'schema' THEN
                   CASE WHEN to_regnamespace(x.name) IS NULL THEN 'missing' ELSE 'ok' END
               WHEN 'function' THEN
                   CASE WHEN EXISTS (
                       SELECT 1 FROM pg_proc p
                       WHERE p.pronamespace = to_regnamespace(split_part(x.name, '.', 1))
                         AND p.proname = split_part(x.name, '.', 2))
                   THEN 'ok' ELSE 'missing' END
               ELSE
                   (SELECT CASE
                               WHEN r.relkind IS NULL THEN 'missing'
                               WHEN r.relkind IN ('r', 'p') AND x.kind = 'table' THEN 'ok'
                               WHEN r.relkind = 'v' AND x.kind = 'view' THEN 'ok'
                               ELSE 'not a ' || x.kind
                           END
                    FROM (SELECT (SELECT c.relkind FROM pg_class c
                                  WHERE c.oid = to_regclass(x.name)) AS relkind) r)
           END AS status
    FROM expected x
),
-- Every stage trigger, and every watch a user added.
wanted_triggers AS (
    SELECT s.source_table::text AS table_name,
           format('pipeline_%s_%s', s.event_type, lower(s.operation)) AS trigger_name,
           true AS stage
    FROM pipeline.stages s
    WHERE s.event_type IS NOT NULL
    UNION
    SELECT w.source_table::text, w.trigger_name::text, w.builtin
    FROM pipeline.watches w
),
triggers AS (
    SELECT 'trigger'::text AS kind,
           wt.table_name || '.' || wt.trigger_name AS name,
           CASE
               WHEN to_regclass(wt.table_name) IS NULL THEN 'missing table'
               WHEN t.oid IS NULL THEN 'missing'
               WHEN t.tgenabled = 'D' THEN 'disabled'
               WHEN CASE WHEN wt.stage THEN t.tgfoid <> 'pipeline._capture_stage()'::regprocedure
                         ELSE t.tgfoid NOT IN ('pipeline._capture_sealed()'::regprocedure,
                                               'pipeline._capture()'::regprocedure)
                    END THEN 'calls another function'
               ELSE 'ok'
           END AS status
    FROM wanted_triggers wt
    LEFT JOIN pg_trigger t
           ON t.tgrelid = to_regclass(wt.table_name) AND t.tgname = wt.trigger_name
)
SELECT kind, name, status FROM objects
UNION ALL
(SELECT kind, name, status FROM triggers ORDER BY name)
UNION ALL
-- An endpoint restored from a dump has no credentials until they are
-- imported; a disabled one says why; one that fails every request says
-- since when, and when it is given up unless it answers.
(SELECT 'endpoint', w.event_type::text,
        CASE WHEN c.event_type IS NULL THEN 'missing credentials (import them with pipeline.import_registry)'
             WHEN NOT w.enabled THEN 'disabled: ' || coalesce(w.disabled_reason, 'no reason given')
             WHEN h.failing_since IS NOT NULL THEN
                 format('failing since %s (the last: %s)', h.failing_since, coalesce(h.last_failure, 'no answer'))
                 || CASE WHEN pipeline._setting('disable_after', '3d')::interval > interval '0'
                         THEN format('; given up at %s unless it answers',
                                     h.failing_since + pipeline._setting('disable_after', '3d')::interval)
                         ELSE '' END
             ELSE 'ok' END
 FROM pipeline.webhooks w
 LEFT JOIN pipeline.webhook_credentials c ON c.event_type = w.event_type
 LEFT JOIN pipeline.endpoint_health h ON h.event_type = w.event_type
 ORDER BY 2)
UNION ALL
-- The event history's partitions (015_partitions.sql): events are written
-- to the newest one; the deliverers' purge keeps one made ahead of it.
-- NB: reads only the events' ids, which every role may.
SELECT 'partitions', 'marketing.pipeline_events',
       CASE WHEN p.newest IS NULL THEN 'none: writes of events fail until pipeline.purge (by a deliverer or the owner) makes one'
            WHEN EXISTS (SELECT FROM marketing.pipeline_events e WHERE e.id >= p.newest * 68719476736)
            THEN format('none made ahead of partition %s, where events are written now: a deliverer with EXECUTE '
                        'on pipeline._maintain_partitions makes the next one (docs/data-model.md#partitions)', p.newest)
            ELSE 'ok' END
FROM (SELECT max(substr(c.relname, 17)::bigint) AS newest
      FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
      WHERE i.inhparent = 'marketing.pipeline_events'::regclass AND c.relname ~ '^pipeline_events_[0-9]+$') p
UNION ALL
-- Work that stopped where nobody will pick it up again by itself.
SELECT 'work', 'stuck companies and slots',
       CASE WHEN count(*) = 0 THEN 'ok'
            ELSE format('%s stuck (marketing.vw_stuck_work; pipeline.resume_stuck() sets them moving), the oldest since %s: %s',
                        count(*), min(s.since), (array_agg(s.reason ORDER BY s.since))[1]) END
FROM marketing.vw_stuck_work s
$$;
COMMENT ON FUNCTION pipeline.verify() IS
    'Lists every schema, table, view, function and stage trigger the pipeline needs, each endpoint, whether a '
    'partition of the events is made ahead and whether work is stuck, with ok or what is wrong.';
