-- 012_progress.sql: where every company stands, so that none ends silently.
--
--   marketing.vw_work_progress   one row per company (before it has slots) or
--                                slot: the stage it is at, its state and why
--   marketing.vw_stuck_work      the rows that are stuck: not at an end state,
--                                no event waiting or failing for them, and not
--                                moved for pipeline.stuck_after (default 1h), or
--                                whose last event is dead, or was answered 2xx
--                                by a receiver that recorded nothing
--   marketing.vw_pipeline_funnel per stage: arrived, in progress, done,
--                                failed (with reasons), stuck
--   pipeline.resume_company(..)  sets a company moving again from where it
--                                stopped (pipeline.resume_stuck(): all of them)
--
-- Stages of the work items: 2 validation (pending or invalid intake rows),
-- 3 promotion, 4 slots (companies without slots), 5 enrichment (slots not
-- enriched; not_found ends here), 6 verification (enriched slots without a
-- verification of their email; no email ends here), 7 outreach ready
-- (verified: valid is done, any other result ends here).
-- States: in_progress (an event waits or fails for it, a service call is out,
-- or it moved less than pipeline.stuck_after ago), done (outreach ready),
-- failed (ended at a stage with a reason), stuck.

-- Each stage's work item: the event type that carries it, and the row id
-- that the event names (data.new.id; slots_created: data.key.company_id).
CREATE FUNCTION pipeline._event_row_id(event_type text, payload jsonb) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE WHEN event_type = 'slots_created' THEN payload -> 'key' ->> 'company_id'
                ELSE payload -> 'new' ->> 'id' END::bigint
$$;

CREATE VIEW marketing.vw_work_progress AS
WITH stage_events AS MATERIALIZED (
    -- The events of the stage types that are not delivered yet, and the
    -- last dead one of each row: one pass over the open and dead events.
    SELECT e.event_type::text AS event_type, pipeline._event_row_id(e.event_type, e.payload) AS row_id,
           bool_or(e.status IN ('pending', 'processing', 'failed')) AS open,
           (array_agg(e.id ORDER BY e.id DESC) FILTER (WHERE e.status = 'dead'))[1] AS dead_id,
           (array_agg(e.last_error ORDER BY e.id DESC) FILTER (WHERE e.status = 'dead'))[1] AS dead_error,
           -- NB: when the dead event was written: it is about the stage the
           -- row is at when it was written at or after the row got there.
           max(e.created_at) FILTER (WHERE e.status = 'dead') AS dead_at,
           max(e.id) FILTER (WHERE e.status IN ('pending', 'processing', 'failed')) AS open_id,
           (array_agg(e.last_error ORDER BY e.id DESC) FILTER (WHERE e.status = 'failed'))[1] AS failing_error
    -- NB: the open events and the dead ones apart, each from its partial
    -- index: one condition on the four statuses matches neither index, and
    -- PostgreSQL read the whole table, delivered history included (1.5 s
    -- with 20 million delivered events; bin/bench --only history).
    FROM (SELECT o.id, o.event_type, o.payload, o.status, o.last_error, o.created_at
          FROM marketing.pipeline_events o
          WHERE o.status IN ('pending', 'processing', 'failed')
            AND o.event_type IN ('company_created', 'company_validated', 'company_promoted', 'slots_created',
                                 'contact_enriched')
          UNION ALL
          SELECT d.id, d.event_type, d.payload, d.status, d.last_error, d.created_at
          FROM marketing.pipeline_events d
          WHERE d.status = 'dead'
            AND d.event_type IN ('company_created', 'company_validated', 'company_promoted', 'slots_created',
                                 'contact_enriched')) e
    GROUP BY 1, 2
), items AS (
    -- Companies that have no slots yet: at validation, promotion or slots.
    SELECT r.id AS intake_id, m.id AS company_id, NULL::bigint AS slot_id, coalesce(m.company_name, r.company) AS company,
           coalesce(m.domain, pipeline.website_domain(r.website)) AS domain, NULL::text AS slot_role,
           CASE WHEN r.validation_status <> 'valid' THEN 2 WHEN m.id IS NULL THEN 3 ELSE 4 END AS stage_no,
           CASE WHEN r.validation_status = 'invalid'
                THEN 'invalid: ' || array_to_string(r.validation_errors, '; ') END AS ended,
           -- NB: the kind of an end or a stoppage, in the pipeline's words
           -- only (no domain, address or receiver's words): what monitoring
           -- roles see, counted, in the funnel.
           CASE WHEN r.validation_status = 'invalid'
                THEN 'invalid: ' || split_part(r.validation_errors[1], ':', 1) END AS ended_kind,
           CASE WHEN r.validation_status = 'pending' THEN 'company_created'
                WHEN m.id IS NULL THEN 'company_validated' ELSE 'company_promoted' END AS event_type,
           CASE WHEN m.id IS NULL THEN r.id ELSE m.id END AS event_row_id,
           coalesce(m.created_at, r.validated_at, r.created_at) AS since,
           coalesce(m.created_at, r.validated_at, r.created_at) AS entered,
           NULL::timestamptz AS leased_until, NULL::text AS call_error
    FROM intake.company_raw_intake r
    LEFT JOIN marketing.company_master m ON m.intake_id = r.id
    WHERE m.id IS NULL OR NOT EXISTS (SELECT 1 FROM marketing.company_slots s WHERE s.company_id = m.id)
    UNION ALL
    -- Companies entered by hand (no intake row) without slots.
    SELECT NULL, m.id, NULL, m.company_name, m.domain, NULL, 4, NULL, NULL, 'company_promoted', m.id, m.created_at,
           m.created_at, NULL, NULL
    FROM marketing.company_master m
    WHERE m.intake_id IS NULL AND NOT EXISTS (SELECT 1 FROM marketing.company_slots s WHERE s.company_id = m.id)
    UNION ALL
    -- Slots: at enrichment, verification, or outreach ready.
    SELECT m.intake_id, m.id, s.id, m.company_name, m.domain, s.slot_role,
           CASE WHEN s.enrichment_status <> 'enriched' THEN 5
                WHEN s.email IS NULL OR v.result IS NULL THEN 6
                ELSE 7 END,
           CASE WHEN s.enrichment_status = 'not_found' THEN format('nobody found for %s', s.slot_role)
                WHEN s.enrichment_status = 'enriched' AND s.email IS NULL
                    THEN format('%s found for %s, without an email to verify', coalesce(s.full_name, 'someone'), s.slot_role)
                WHEN v.result IS NOT NULL AND v.result <> 'valid' THEN format('%s: %s', s.email, v.result) END,
           CASE WHEN s.enrichment_status = 'not_found' THEN 'nobody found'
                WHEN s.enrichment_status = 'enriched' AND s.email IS NULL THEN 'found without an email'
                WHEN v.result IS NOT NULL AND v.result <> 'valid' THEN 'email ' || v.result END,
           CASE WHEN s.enrichment_status NOT IN ('enriched', 'not_found') THEN 'slots_created' ELSE 'contact_enriched' END,
           CASE WHEN s.enrichment_status NOT IN ('enriched', 'not_found') THEN m.id ELSE s.id END,
           greatest(s.created_at, s.enriched_at, v.verified_at, c.failed_at),
           coalesce(s.enriched_at, s.created_at),
           c.leased_until, c.last_error
    FROM marketing.company_slots s
    JOIN marketing.company_master m ON m.id = s.company_id
    LEFT JOIN LATERAL (
        SELECT ev.result, ev.verified_at FROM marketing.email_verification ev
        WHERE ev.slot_id = s.id AND ev.email = s.email
        ORDER BY ev.verified_at DESC, ev.id DESC LIMIT 1
    ) v ON true
    LEFT JOIN pipeline.service_calls c
        ON c.slot_id = s.id
       AND c.stage = CASE WHEN s.enrichment_status NOT IN ('enriched', 'not_found') THEN 'enrichment' ELSE 'verification' END
), tracked AS (
    -- Each row with its stage's open and dead events, and whether its stage
    -- event may have been answered 2xx with nothing recorded: recent, not at
    -- an end, no event open or dead for it, no service call out.
    SELECT i.*, e.open, e.dead_id, e.dead_error, e.dead_at, e.open_id, e.failing_error,
           i.stage_no < 7 AND i.ended IS NULL AND e.open IS NOT TRUE AND e.dead_id IS NULL
               AND (i.leased_until IS NULL OR i.leased_until <= now())
               AND i.since >= now() - pipeline._setting('stuck_after', '1h')::interval AS may_be_answered
    FROM items i
    LEFT JOIN stage_events e ON e.event_type = i.event_type AND e.row_id = i.event_row_id
), unanswered AS (
    -- Of them, those that got to their stage recently too.
    SELECT t.event_type, t.event_row_id, t.entered
    FROM tracked t
    WHERE t.may_be_answered AND t.entered >= now() - pipeline._setting('stuck_after', '1h')::interval
), bulk AS (
    -- Whether they are many (more than 20): then answered_since finds them,
    -- else each is looked up alone.
    SELECT count(*) > 20 AS many FROM unanswered
), answered_since AS MATERIALIZED (
    -- For many of them (a bulk import whose events were all delivered), one
    -- pass over the processed stage events written since the first of them
    -- got there, by row; a look-up per row would read those events once
    -- per row (10 minutes for 100,000 rows).
    -- NB: the first condition is implied by the second (the rows of
    -- unanswered got there within stuck_after) but, unlike it, can be
    -- estimated: with a subquery alone the planner priced a third of the
    -- history, the view's estimate passed jit_above_cost, and reading it
    -- took 170 ms of JIT instead of 3 ms beside 20 million events
    -- (bin/bench --only history).
    SELECT pe.event_type::text AS event_type, pipeline._event_row_id(pe.event_type, pe.payload) AS row_id,
           max(pe.created_at) AS last_at,
           (array_agg(pe.id ORDER BY pe.created_at DESC, pe.id DESC))[1] AS id
    FROM marketing.pipeline_events pe
    WHERE pe.created_at >= now() - pipeline._setting('stuck_after', '1h')::interval
      AND pe.created_at >= (SELECT min(u.entered) FROM unanswered u WHERE (SELECT b.many FROM bulk b))
      AND pe.status = 'processed'
      AND pe.event_type IN ('company_created', 'company_validated', 'company_promoted', 'slots_created',
                            'contact_enriched')
    GROUP BY 1, 2
), looked_up AS (
    -- The rows answered_since does not cover, to be looked up one by one:
    -- those that got to their stage long ago (and moved since, by a failed
    -- service call), or all of them when they are few; once per distinct
    -- stage event, row and time they got there.
    -- NB: handed over as arrays: the planner prices what unnest gives at
    -- 100 rows whatever they hold, where a look-up joined to every tracked
    -- row was priced for each of them (it cannot see that the gate above
    -- turns most of them away), and after a bulk import of 10,000 rows the
    -- view passed jit_optimize_above_cost: 1.4 s of JIT for a 0.2 s read.
    SELECT array_agg(g.event_type) AS event_types, array_agg(g.event_row_id) AS row_ids,
           array_agg(g.entered) AS entered
    FROM (SELECT DISTINCT t.event_type, t.event_row_id, t.entered
          FROM tracked t
          WHERE t.may_be_answered
            AND (t.entered < now() - pipeline._setting('stuck_after', '1h')::interval
                 OR NOT (SELECT b.many FROM bulk b))) g
), answered_alone AS MATERIALIZED (
    SELECT l.event_type, l.row_id, l.entered, last.id
    FROM looked_up
    CROSS JOIN LATERAL unnest(looked_up.event_types, looked_up.row_ids, looked_up.entered)
        AS l(event_type, row_id, entered)
    CROSS JOIN LATERAL (
        SELECT pe.id FROM marketing.pipeline_events pe
        WHERE pe.created_at >= l.entered AND pe.event_type = l.event_type AND pe.status = 'processed'
          AND pipeline._event_row_id(pe.event_type, pe.payload) = l.row_id
        ORDER BY pe.id DESC
        LIMIT 1
    ) last
)
SELECT i.intake_id, i.company_id, i.slot_id, i.company, i.domain, i.slot_role, i.stage_no, st.stage,
       CASE WHEN i.ended IS NOT NULL THEN 'failed'
            WHEN i.stage_no = 7 THEN 'done'
            WHEN i.open OR i.leased_until > now() THEN 'in_progress'
            WHEN i.dead_id IS NOT NULL AND i.dead_at >= i.entered THEN 'stuck'
            WHEN answered.id IS NOT NULL THEN 'stuck'
            WHEN i.since < now() - pipeline._setting('stuck_after', '1h')::interval THEN 'stuck'
            ELSE 'in_progress' END AS state,
       CASE WHEN i.ended IS NOT NULL THEN i.ended
            WHEN i.stage_no = 7 THEN NULL
            WHEN i.open OR i.leased_until > now() THEN coalesce(i.call_error, i.failing_error)
            WHEN i.dead_id IS NOT NULL AND i.dead_at >= i.entered
                THEN format('%s event %s is dead: %s', i.event_type, i.dead_id, coalesce(i.call_error, i.dead_error))
            WHEN answered.id IS NOT NULL
                THEN format('%s event %s was answered 2xx, but its work is not recorded%s', i.event_type, answered.id,
                            coalesce(' (the last failure: ' || i.call_error || ')', ''))
            WHEN i.call_error IS NOT NULL THEN i.call_error
            WHEN w.event_type IS NULL THEN format('no endpoint is registered for %s', i.event_type)
            WHEN NOT w.enabled THEN format('the endpoint of %s is disabled: %s', i.event_type,
                                           coalesce(w.disabled_reason, 'no reason given'))
            ELSE format('no %s event waits or fails for it, and it has not moved since %s', i.event_type, i.since)
       END AS reason,
       CASE WHEN i.ended IS NOT NULL THEN i.ended_kind
            WHEN i.stage_no = 7 OR i.open OR i.leased_until > now() THEN NULL
            WHEN i.dead_id IS NOT NULL AND i.dead_at >= i.entered THEN 'event dead'
            WHEN answered.id IS NOT NULL THEN 'answered 2xx, nothing recorded'
            WHEN i.since >= now() - pipeline._setting('stuck_after', '1h')::interval THEN NULL
            WHEN i.call_error IS NOT NULL THEN 'service failure'
            WHEN w.event_type IS NULL THEN 'no endpoint'
            WHEN NOT w.enabled THEN 'endpoint disabled'
            ELSE 'not moving'
       END AS reason_kind,
       i.event_type AS waiting_for,
       coalesce(i.open_id, i.dead_id, answered.id) AS event_id,
       i.since
FROM tracked i
JOIN pipeline.stages st ON st.stage_no = i.stage_no
-- A receiver answered 2xx for the row's stage event but recorded nothing
-- (n8n answers 200 while it starts up): stuck at once, not after
-- pipeline.stuck_after. Looked for only while the row is recent (older
-- ones are stuck anyway), among the events written since it got there:
-- from answered_since for many rows that got there recently, else row by
-- row (answered_alone: a row that got there long ago and moved since, by a
-- failed service call, is looked up alone: a pass from then would read all
-- history since).
LEFT JOIN answered_since a
       ON i.may_be_answered AND a.event_type = i.event_type AND a.row_id = i.event_row_id AND a.last_at >= i.entered
-- NB: the same condition as looked_up's, so that a row that shares its
-- event, row id and time with one looked up (two slots of a company) but is
-- not itself waiting for an answer gets none.
LEFT JOIN answered_alone aa
       ON i.may_be_answered
      AND (i.entered < now() - pipeline._setting('stuck_after', '1h')::interval OR NOT (SELECT b.many FROM bulk b))
      AND aa.event_type = i.event_type AND aa.row_id = i.event_row_id AND aa.entered = i.entered
CROSS JOIN LATERAL (SELECT coalesce(aa.id, a.id) AS id) answered
LEFT JOIN pipeline.webhooks w ON w.event_type = i.event_type;
COMMENT ON VIEW marketing.vw_work_progress IS
    'Every company without slots and every slot: the stage it is at, its state (in_progress, done, failed, stuck), '
    'why (the reason it ended or is stuck, and its kind in the pipeline''s words), the event it waits for and '
    'since when it has not moved.';

CREATE VIEW marketing.vw_stuck_work AS
SELECT p.intake_id, p.company_id, p.slot_id, p.company, p.domain, p.slot_role, p.stage_no, p.stage, p.reason,
       p.waiting_for, p.event_id, p.since, now() - p.since AS stuck_for
FROM marketing.vw_work_progress p
WHERE p.state = 'stuck';
COMMENT ON VIEW marketing.vw_stuck_work IS
    'Companies and slots that are not at an end state, have no event waiting or failing for them and have not '
    'moved for pipeline.stuck_after (or whose last event is dead), with why. pipeline.resume_company sets one '
    'moving again.';

-- How many companies reached each stage (and, from stage 4 on, how many
-- contacts), and the work of each stage (companies up to stage 4, contacts
-- from 5 on): arrived, in progress, done (the stage's work is recorded:
-- companies or contacts), failed (ended there) and stuck, with how often
-- each kind of reason came (vw_work_progress.reason_kind: the pipeline's
-- words, no company's data: monitoring roles read the funnel).
-- arrived = done + in_progress + failed + stuck.
CREATE VIEW marketing.vw_pipeline_funnel AS
WITH counts (stage_no, companies, contacts) AS (
    SELECT 1, (SELECT count(*) FROM intake.company_raw_intake), NULL::bigint
    UNION ALL
    SELECT 2, (SELECT count(*) FROM intake.company_raw_intake WHERE validated), NULL
    UNION ALL
    SELECT 3, (SELECT count(*) FROM marketing.company_master), NULL
    UNION ALL
    SELECT 4, count(DISTINCT company_id), count(*) FROM marketing.company_slots
    UNION ALL
    SELECT 5, count(DISTINCT company_id), count(*)
    FROM marketing.company_slots WHERE enrichment_status = 'enriched'
    UNION ALL
    SELECT 6, count(DISTINCT s.company_id), count(DISTINCT s.id)
    FROM marketing.company_slots s
    WHERE EXISTS (SELECT 1 FROM marketing.email_verification v WHERE v.slot_id = s.id)
    UNION ALL
    SELECT 7, count(DISTINCT company_id), count(*) FROM marketing.vw_outreach_ready
), progress AS MATERIALIZED (
    SELECT p.stage_no, p.state, p.reason_kind FROM marketing.vw_work_progress p
), states AS (
    SELECT p.stage_no,
           count(*) FILTER (WHERE p.state = 'in_progress') AS in_progress,
           count(*) FILTER (WHERE p.state = 'failed') AS failed,
           count(*) FILTER (WHERE p.state = 'stuck') AS stuck
    FROM progress p
    GROUP BY p.stage_no
), reasons AS (
    SELECT r.stage_no, jsonb_object_agg(r.reason, r.n) AS failure_reasons
    FROM (SELECT p.stage_no, p.reason_kind AS reason, count(*) AS n
          FROM progress p WHERE p.state IN ('failed', 'stuck') GROUP BY 1, 2) r
    GROUP BY r.stage_no
)
SELECT st.stage_no, st.stage, st.event_type, c.companies, c.contacts,
       CASE WHEN st.stage_no <= 4 THEN c.companies ELSE c.contacts END
           + coalesce(s.in_progress, 0) + coalesce(s.failed, 0) + coalesce(s.stuck, 0) AS arrived,
       coalesce(s.in_progress, 0) AS in_progress,
       CASE WHEN st.stage_no <= 4 THEN c.companies ELSE c.contacts END AS done,
       coalesce(s.failed, 0) AS failed,
       coalesce(s.stuck, 0) AS stuck,
       coalesce(r.failure_reasons, '{}') AS failure_reasons
FROM pipeline.stages st
JOIN counts c USING (stage_no)
LEFT JOIN states s USING (stage_no)
LEFT JOIN reasons r USING (stage_no)
ORDER BY st.stage_no;
COMMENT ON VIEW marketing.vw_pipeline_funnel IS
    'The seven stages with the number of companies that reached each (and of contacts, from slots on), and the '
    'work at each: in progress, done, failed (ended there; failure_reasons counts each reason) and stuck.';

-- Sets a company moving again from where it stopped: for each of its work
-- items that is neither done nor ended and has no event waiting or failing,
-- the event of the stage it is at is written again (pipeline.emit, so the
-- caller needs the right to produce it), shaped as the stage's trigger
-- writes it. Finished and paid work is not redone: the stage functions skip
-- what is recorded (pipeline.enrichment_calls and verification_calls do
-- not call a service for a slot that is filled or an address verified).
-- Replaying the company's dead events (pipeline.replay) is the other way.
-- Give the intake row or, for a company entered by hand, the company id.
CREATE FUNCTION pipeline.resume_company(intake_id bigint DEFAULT NULL, company_id bigint DEFAULT NULL)
RETURNS TABLE (stage text, event_type text, event_id bigint, detail text)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_item    record;
    v_payload jsonb;
    v_done    boolean := false;
BEGIN
    IF (resume_company.intake_id IS NULL) = (resume_company.company_id IS NULL) THEN
        RAISE EXCEPTION 'pipeline.resume_company: give intake_id or company_id (one of them)'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOR v_item IN
        SELECT p.* FROM marketing.vw_work_progress p
        WHERE (p.intake_id = resume_company.intake_id OR p.company_id = resume_company.company_id)
        ORDER BY p.stage_no, p.slot_id
    LOOP
        v_done := true;
        IF v_item.state IN ('done', 'failed') THEN
            RETURN QUERY SELECT v_item.stage, NULL::text, NULL::bigint,
                                format('%s: %s', v_item.state, coalesce(v_item.reason, 'outreach ready'));
            CONTINUE;
        END IF;
        IF EXISTS (SELECT 1 FROM marketing.pipeline_events e
                   WHERE e.event_type = v_item.waiting_for AND e.status IN ('pending', 'processing', 'failed')
                     AND pipeline._event_row_id(e.event_type, e.payload)
                         = CASE WHEN v_item.waiting_for IN ('company_created', 'company_validated') THEN v_item.intake_id
                                WHEN v_item.waiting_for IN ('company_promoted', 'slots_created') THEN v_item.company_id
                                ELSE v_item.slot_id END) THEN
            RETURN QUERY SELECT v_item.stage, v_item.waiting_for, NULL::bigint,
                                'moving already: an event waits or is being delivered';
            CONTINUE;
        END IF;
        -- slots_created carries all the company's slots that wait for
        -- enrichment at once: written for the first of them only.
        IF v_item.waiting_for = 'slots_created' AND EXISTS (
               SELECT 1 FROM marketing.company_slots s
               WHERE s.company_id = v_item.company_id AND s.id < v_item.slot_id
                 AND s.enrichment_status NOT IN ('enriched', 'not_found')) THEN
            CONTINUE;
        END IF;
        v_payload := CASE v_item.waiting_for
            WHEN 'company_created' THEN
                (SELECT jsonb_build_object('new', to_jsonb(r)) FROM intake.company_raw_intake r WHERE r.id = v_item.intake_id)
            WHEN 'company_validated' THEN
                (SELECT jsonb_build_object('new', to_jsonb(r), 'old', to_jsonb(r))
                 FROM intake.company_raw_intake r WHERE r.id = v_item.intake_id)
            WHEN 'company_promoted' THEN
                (SELECT jsonb_build_object('new', to_jsonb(m)) FROM marketing.company_master m WHERE m.id = v_item.company_id)
            WHEN 'slots_created' THEN
                (SELECT jsonb_build_object('key', jsonb_build_object('company_id', v_item.company_id), 'count', count(*),
                                           'new', jsonb_agg(to_jsonb(s) ORDER BY s.id))
                 FROM marketing.company_slots s
                 WHERE s.company_id = v_item.company_id AND s.enrichment_status NOT IN ('enriched', 'not_found'))
            ELSE
                (SELECT jsonb_build_object('new', to_jsonb(s), 'old', to_jsonb(s))
                 FROM marketing.company_slots s WHERE s.id = v_item.slot_id)
        END;
        RETURN QUERY SELECT v_item.stage, v_item.waiting_for, pipeline.emit(v_item.waiting_for, v_payload),
                            format('written again (%s)', coalesce(v_item.reason, 'in progress, not moving'));
    END LOOP;
    IF NOT v_done THEN
        RAISE EXCEPTION 'pipeline.resume_company: no company with %', CASE WHEN intake_id IS NOT NULL
            THEN format('intake_id %s', intake_id) ELSE format('company_id %s', company_id) END
            USING ERRCODE = 'no_data_found';
    END IF;
END
$$;
COMMENT ON FUNCTION pipeline.resume_company(bigint, bigint) IS
    'Sets a company (by intake_id, or company_id for one entered by hand) moving again from the stage where it '
    'stopped: writes that stage''s event again for each of its work items that is not done, not ended and not '
    'moving. Finished and paid work is not redone. Returns what it did per item.';

-- Resumes every stuck company (at most max_companies); returns what was done.
CREATE FUNCTION pipeline.resume_stuck(max_companies integer DEFAULT 100)
RETURNS TABLE (intake_id bigint, company_id bigint, stage text, event_type text, event_id bigint, detail text)
LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    SELECT s.intake_id, s.company_id, r.stage, r.event_type, r.event_id, r.detail
    FROM (SELECT DISTINCT w.intake_id, CASE WHEN w.intake_id IS NULL THEN w.company_id END AS company_id
          FROM marketing.vw_stuck_work w
          ORDER BY 1, 2
          LIMIT max_companies) s
    CROSS JOIN LATERAL pipeline.resume_company(s.intake_id, s.company_id) r
$$;
COMMENT ON FUNCTION pipeline.resume_stuck(integer) IS
    'pipeline.resume_company for every stuck company (marketing.vw_stuck_work), at most max_companies.';

-- NB: not to pg_monitor: the rows name companies, addresses and what
-- receivers answered. Monitoring reads the counts (pipeline.status(), the
-- funnel).
