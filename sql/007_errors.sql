-- 007_errors.sql: reporting, resolving and watching errors.
--
-- Delivery failures are logged by pipeline.mark_failed. Receivers report their
-- own failures (a validation API down, an enrichment quota hit) with
-- pipeline.log_error, so one log shows every stage.

-- Logging an error of a stage (and, when known, of an event).
CREATE FUNCTION pipeline.log_error(
    stage    text,
    error    text,
    event_id bigint DEFAULT NULL,
    details  jsonb DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_id bigint;
BEGIN
    IF stage IS NULL OR pipeline._is_blank(stage) THEN
        RAISE EXCEPTION 'pipeline.log_error: stage must name the stage or event type that failed'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF error IS NULL OR pipeline._is_blank(error) THEN
        RAISE EXCEPTION 'pipeline.log_error: error must describe the failure'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF event_id IS NOT NULL THEN
        PERFORM pipeline._require_events(ARRAY[event_id]);
    END IF;
    INSERT INTO marketing.pipeline_error_log (stage, event_id, error_message, details)
    VALUES (stage, event_id, error, coalesce(details, '{}'))
    RETURNING id INTO v_id;
    RETURN v_id;
END
$$;
COMMENT ON FUNCTION pipeline.log_error(text, text, bigint, jsonb) IS
    'Adds an error to marketing.pipeline_error_log; returns its id.';

-- Marking one error resolved.
CREATE FUNCTION pipeline.resolve_error(error_id bigint, note text DEFAULT NULL) RETURNS boolean
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    UPDATE marketing.pipeline_error_log l
    SET resolved = true, resolved_at = now(), resolution_note = note
    WHERE l.id = error_id AND NOT l.resolved;
    IF FOUND THEN
        RETURN true;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM marketing.pipeline_error_log l WHERE l.id = error_id) THEN
        RAISE EXCEPTION 'no error with id %', coalesce(error_id::text, 'NULL')
            USING ERRCODE = 'no_data_found';
    END IF;
    RETURN false;
END
$$;
COMMENT ON FUNCTION pipeline.resolve_error(bigint, text) IS
    'Marks an error resolved; false when it already was.';

-- Marking many errors resolved: those of a stage and/or an event, up to a time.
CREATE FUNCTION pipeline.resolve_errors(
    stage    text DEFAULT NULL,
    event_id bigint DEFAULT NULL,
    before   timestamptz DEFAULT NULL,
    note     text DEFAULT NULL
) RETURNS integer
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_count integer;
BEGIN
    UPDATE marketing.pipeline_error_log l
    SET resolved = true, resolved_at = now(), resolution_note = note
    WHERE NOT l.resolved
      AND (resolve_errors.stage IS NULL OR l.stage = resolve_errors.stage)
      AND (resolve_errors.event_id IS NULL OR l.event_id = resolve_errors.event_id)
      AND l.created_at <= coalesce(before, now());
    GET DIAGNOSTICS v_count = ROW_COUNT;
    RETURN v_count;
END
$$;
COMMENT ON FUNCTION pipeline.resolve_errors(text, bigint, timestamptz, text) IS
    'Marks every unresolved error of a stage and/or event, logged up to before (default now), resolved; returns how many.';

-- What a role that may not read the error log (pg_monitor) sees of an
-- error: what failed, where, when and with which status, but none of the
-- words of a receiver or a service (an answer may echo the request's
-- payload; a stage's own report may quote a company). Whoever may read the
-- error log reads them there, and in the view (docs/security.md).
CREATE FUNCTION pipeline._reads_error_text() RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT has_table_privilege('marketing.pipeline_error_log', 'SELECT')
$$;

-- An endpoint's URL as a role sees it: whole to roles that may read the
-- endpoints' credentials, else only its origin (a path or a query may be the
-- secret: Slack's and Discord's webhook URLs carry their token in the path).
-- NB: the table is named in a string, looked up when it runs (it is made
-- after this file's views).
CREATE FUNCTION pipeline._url_seen(url text) RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE WHEN has_table_privilege('pipeline.webhook_credentials', 'SELECT') THEN url
                ELSE substring(url FROM '^[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*') || '/...' END
$$;

-- An error as monitoring sees it: a delivery failure by its status (the
-- deliverer's own words when no answer came: a timeout, a refused
-- connection), a stage's report by nothing but that it was one.
CREATE FUNCTION pipeline._error_summary(error_message text, details jsonb) RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE
        WHEN details ? 'status_code' THEN 'HTTP ' || (details ->> 'status_code')
        WHEN details ? 'outcome' THEN error_message
        ELSE 'reported by the stage (its words are in marketing.pipeline_error_log)'
    END
$$;

CREATE VIEW marketing.vw_unresolved_errors AS
SELECT l.id,
       l.stage,
       l.event_id,
       e.status AS event_status,
       e.attempts AS event_attempts,
       CASE WHEN r.full THEN l.error_message
            ELSE pipeline._error_summary(l.error_message, l.details) END AS error_message,
       CASE WHEN r.full THEN l.details
            ELSE jsonb_strip_nulls(jsonb_build_object('url', pipeline._url_seen(l.details ->> 'url'),
                                                      'status_code', l.details -> 'status_code',
                                                      'outcome', l.details -> 'outcome',
                                                      'attempt', l.details -> 'attempt',
                                                      'status', l.details -> 'status')) END AS details,
       l.created_at,
       now() - l.created_at AS age
FROM marketing.pipeline_error_log l
CROSS JOIN (SELECT pipeline._reads_error_text() AS full) r
LEFT JOIN marketing.pipeline_events e ON e.id = l.event_id
WHERE NOT l.resolved
ORDER BY l.created_at DESC, l.id DESC;
COMMENT ON VIEW marketing.vw_unresolved_errors IS
    'Unresolved errors, newest first, with the current state of their event. Roles that may not read '
    'marketing.pipeline_error_log (pg_monitor) see the status of a failure but not what a receiver said.';

-- Error rate per stage over the last 24 hours: errors logged against events
-- created (of that type) in the same window.
CREATE VIEW marketing.vw_error_rate_24h AS
WITH errors AS (
    SELECT l.stage,
           count(*) AS errors,
           count(*) FILTER (WHERE NOT l.resolved) AS unresolved,
           count(DISTINCT l.event_id) AS failed_events,
           max(l.created_at) AS last_error_at
    FROM marketing.pipeline_error_log l
    WHERE l.created_at > now() - interval '24 hours'
    GROUP BY l.stage
), events AS (
    SELECT e.event_type AS stage, count(*) AS events
    FROM marketing.pipeline_events e
    WHERE e.created_at > now() - interval '24 hours'
    GROUP BY e.event_type
)
SELECT coalesce(er.stage, ev.stage) AS stage,
       coalesce(ev.events, 0) AS events,
       coalesce(er.errors, 0) AS errors,
       coalesce(er.unresolved, 0) AS unresolved,
       coalesce(er.failed_events, 0) AS failed_events,
       CASE WHEN coalesce(ev.events, 0) = 0 THEN NULL
            ELSE round(100.0 * coalesce(er.failed_events, 0) / ev.events, 2) END AS failed_event_pct,
       er.last_error_at
FROM errors er
FULL JOIN events ev ON ev.stage = er.stage
ORDER BY errors DESC, stage;
COMMENT ON VIEW marketing.vw_error_rate_24h IS
    'Per stage, last 24 hours: events created, errors logged, unresolved errors, events with errors and their share.';
