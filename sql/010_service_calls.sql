-- 010_service_calls.sql: the calls the stage work makes to outside services
-- (Apify for enrichment, MillionVerifier for verification), so that a
-- delivery answers 2xx only when all of its work is recorded, and a retry
-- redoes only what is undone, without paying twice.
--
-- A receiver (an n8n workflow, examples/stage_runner.rs) does, for the slots
-- of one event:
--
--   SELECT * FROM pipeline.enrichment_calls(slot_ids)     -- or verification_calls
--       each slot: 'call' (with the request to send), 'done', 'busy', 'missing'
--   ... sends each 'call' request, with its own key ...
--   SELECT * FROM pipeline.finish_call(stage, slot, http_status, body, retry_after_header, error)
--       records what the service answered: the slot filled, or the failure
--       with the HTTP status the delivery should answer
--   SELECT * FROM pipeline.stage_answer(stage, slot_ids)
--       the one answer for the delivery, from what is recorded: 200 when every part is,
--       else the failing service's meaning (429 with Retry-After, 503/504,
--       424 for a key or credits the service refuses, 409 while another
--       delivery calls, 422 for input no retry can fix)
--
-- Which service, actor, input and field mapping is configuration, in one
-- place: pipeline.services_in_effect, the defaults with what
-- pipeline.set_service changed (the keys are not: they stay with the
-- receiver, n8n credentials or environment variables).

-- Where the services are and how they are called: the defaults below,
-- changed by a row here (pipeline.set_service), whose non-NULL columns win.
-- Only the pipeline's owner may change it: a receiver sends its key to the
-- base_url it says. Empty at install, so that pg_dump carries exactly what
-- was changed and a restore, after CREATE EXTENSION, adds it without a
-- conflict.
CREATE TABLE pipeline.services (
    service        text PRIMARY KEY,
    base_url       text,
    actor          text,
    input          jsonb,
    role_titles    jsonb,
    fields         jsonb,
    max_items      integer,
    call_timeout_s integer,
    updated_at     timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT service_known CHECK (service IN ('apify', 'millionverifier')),
    CONSTRAINT base_url_is_http_url CHECK (base_url ~ '^https?://[^\s/?#@]+$'),
    CONSTRAINT actor_is_username_tilde_name CHECK (
        actor IS NULL OR (service = 'apify' AND actor ~ '^[A-Za-z0-9._-]+~[A-Za-z0-9._-]+$')),
    CONSTRAINT input_is_object_with_domain CHECK (
        input IS NULL OR (service = 'apify' AND jsonb_typeof(input) = 'object' AND strpos(input::text, '"{domain}"') > 0)),
    CONSTRAINT role_titles_is_object_of_arrays CHECK (
        role_titles IS NULL OR (service = 'apify' AND jsonb_typeof(role_titles) = 'object'
                                AND NOT jsonb_path_exists(role_titles, '$.* ? (@.type() != "array")'))),
    CONSTRAINT fields_names_slot_columns CHECK (
        fields IS NULL OR (service = 'apify' AND jsonb_typeof(fields) = 'object'
                           AND fields ?& ARRAY['full_name', 'email']
                           AND NOT fields ?| ARRAY['id', 'company_id', 'slot_role', 'enrichment_status',
                                                   'enrichment_source', 'enriched_at', 'created_at'])),
    CONSTRAINT max_items_between_1_and_100 CHECK (max_items IS NULL OR (service = 'apify' AND max_items BETWEEN 1 AND 100)),
    CONSTRAINT call_timeout_s_range CHECK (
        call_timeout_s BETWEEN 2 AND CASE service WHEN 'millionverifier' THEN 60 ELSE 3600 END)
);
COMMENT ON TABLE pipeline.services IS
    'Changes to the outside services'' defaults (pipeline.services_in_effect shows the result): base URL, and for '
    'Apify the actor, its input (with "{domain}", "{role}" and "{titles}" placeholders), the job titles searched per '
    'slot role, and which item fields fill which slot column. NULL keeps the default. Keys are not here: they stay '
    'with the receiver.';
COMMENT ON COLUMN pipeline.services.call_timeout_s IS
    'Apify: the actor run''s own timeout (?timeout=, below run-sync''s 300 s); MillionVerifier: its timeout '
    'parameter (2-60 s).';
COMMENT ON COLUMN pipeline.services.fields IS
    'Slot column -> the dataset item fields that fill it, the first non-empty one wins '
    '(full_name, title, email, linkedin_url, phone).';
GRANT SELECT ON pipeline.services TO PUBLIC;

-- What the stage work uses: each service's defaults, with what
-- pipeline.services changes. The actor: Leads Finder
-- (apify.com/code_crafter/leads-finder), a public Apify Store actor that
-- finds the people of a company by its domain and their job title (its
-- documented input: company_domain, contact_job_title, fetch_count; each
-- dataset item is a person with full_name, first_name, last_name,
-- job_title, email, linkedin, mobile_number, company_domain, ...).
-- n8n/README.md says how to use another actor.
CREATE VIEW pipeline.services_in_effect AS
SELECT d.service,
       coalesce(s.base_url, d.base_url) AS base_url,
       coalesce(s.actor, d.actor) AS actor,
       coalesce(s.input, d.input) AS input,
       coalesce(s.role_titles, d.role_titles) AS role_titles,
       coalesce(s.fields, d.fields) AS fields,
       coalesce(s.max_items, d.max_items) AS max_items,
       coalesce(s.call_timeout_s, d.call_timeout_s) AS call_timeout_s,
       s.updated_at AS changed_at
FROM (VALUES
        ('apify', 'https://api.apify.com', 'code_crafter~leads-finder',
         '{"company_domain": ["{domain}"], "contact_job_title": "{titles}", "fetch_count": 1}'::jsonb,
         '{"ceo": ["CEO", "Chief Executive Officer", "Founder"], "cfo": ["CFO", "Chief Financial Officer"]}'::jsonb,
         '{"full_name": ["full_name", "fullName", "name"], "title": ["job_title", "jobTitle", "title", "position"],
           "email": ["email"], "linkedin_url": ["linkedin", "linkedinUrl", "linkedin_url"],
           "phone": ["mobile_number", "phone"]}'::jsonb,
         1, 240),
        ('millionverifier', 'https://api.millionverifier.com', NULL, NULL, NULL, NULL, NULL, 20)
     ) AS d(service, base_url, actor, input, role_titles, fields, max_items, call_timeout_s)
LEFT JOIN pipeline.services s ON s.service = d.service;
COMMENT ON VIEW pipeline.services_in_effect IS
    'Each outside service as the stage work calls it: its defaults with what pipeline.services changes '
    '(changed_at: when, NULL for the defaults).';
GRANT SELECT ON pipeline.services_in_effect TO PUBLIC;

-- Changing a service (the pipeline's owner): NULL keeps what is in effect;
-- reset => true goes back to the defaults. Refused values name the field
-- (the table's constraints). Returns the service as it is now in effect.
CREATE FUNCTION pipeline.set_service(
    service        text,
    base_url       text DEFAULT NULL,
    actor          text DEFAULT NULL,
    input          jsonb DEFAULT NULL,
    role_titles    jsonb DEFAULT NULL,
    fields         jsonb DEFAULT NULL,
    max_items      integer DEFAULT NULL,
    call_timeout_s integer DEFAULT NULL,
    reset          boolean DEFAULT false
) RETURNS pipeline.services_in_effect
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_now pipeline.services_in_effect;
BEGIN
    IF reset THEN
        DELETE FROM pipeline.services s WHERE s.service = set_service.service;
    END IF;
    INSERT INTO pipeline.services AS s (service, base_url, actor, input, role_titles, fields, max_items, call_timeout_s)
    VALUES (set_service.service, set_service.base_url, set_service.actor, set_service.input, set_service.role_titles,
            set_service.fields, set_service.max_items, set_service.call_timeout_s)
    ON CONFLICT ON CONSTRAINT services_pkey DO UPDATE
    SET base_url = coalesce(excluded.base_url, s.base_url), actor = coalesce(excluded.actor, s.actor),
        input = coalesce(excluded.input, s.input), role_titles = coalesce(excluded.role_titles, s.role_titles),
        fields = coalesce(excluded.fields, s.fields), max_items = coalesce(excluded.max_items, s.max_items),
        call_timeout_s = coalesce(excluded.call_timeout_s, s.call_timeout_s), updated_at = now();
    SELECT * INTO v_now FROM pipeline.services_in_effect e WHERE e.service = set_service.service;
    RETURN v_now;
END
$$;
COMMENT ON FUNCTION pipeline.set_service(text, text, text, jsonb, jsonb, jsonb, integer, integer, boolean) IS
    'Changes how an outside service is called (NULL keeps a field; reset => true goes back to the defaults); '
    'returns it as now in effect. For the pipeline''s owner.';

-- One row per slot and stage that a service was called for: the calls
-- started (each may be paid), the lease of the call in flight, and the last
-- failure, so that every part's failure stays visible (pipeline.stuck_work)
-- after the delivery that saw it.
CREATE TABLE pipeline.service_calls (
    stage        text NOT NULL,
    slot_id      bigint NOT NULL REFERENCES marketing.company_slots (id) ON DELETE CASCADE,
    subject      text NOT NULL,
    calls        integer NOT NULL DEFAULT 0,
    leased_until timestamptz,
    last_status  integer,
    last_error   text,
    failed_at    timestamptz,
    answer_status integer,
    retry_after_s integer,
    done_at      timestamptz,
    PRIMARY KEY (stage, slot_id),
    CONSTRAINT stage_known CHECK (stage IN ('enrichment', 'verification'))
);
COMMENT ON TABLE pipeline.service_calls IS
    'Per slot and stage: the service calls started, the one in flight (leased_until), the last failure '
    '(the service''s status and words, keys masked; what the delivery answers for it: answer_status, '
    'retry_after_s) and when the work was recorded.';
-- Who may do a stage's work may call for it: enrichment takes UPDATE on
-- the slots' enrichment_status, verification INSERT on email_verification.
ALTER TABLE pipeline.service_calls ENABLE ROW LEVEL SECURITY;
CREATE POLICY service_calls_stage_workers ON pipeline.service_calls
    USING (CASE stage
               WHEN 'enrichment' THEN has_column_privilege('marketing.company_slots'::regclass, 'enrichment_status', 'UPDATE')
               ELSE has_table_privilege('marketing.email_verification'::regclass, 'INSERT')
           END)
    WITH CHECK (CASE stage
                    WHEN 'enrichment' THEN has_column_privilege('marketing.company_slots'::regclass, 'enrichment_status', 'UPDATE')
                    ELSE has_table_privilege('marketing.email_verification'::regclass, 'INSERT')
                END);
GRANT SELECT, INSERT, UPDATE ON pipeline.service_calls TO PUBLIC;

-- A service's words with what could be a key masked: query parameters
-- (api=, token=, key=), bearer tokens. A receiver may pass a client's error
-- message that repeats the URL it called.
CREATE FUNCTION pipeline._mask_keys(message text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $$
    SELECT left(regexp_replace(regexp_replace(message,
                   '((?:api|apikey|api_key|token|key|access_token)=)[^&\s"'']+', '\1***', 'gi'),
               '(bearer\s+)[A-Za-z0-9._~+/=-]+', '\1***', 'gi'), 1000)
$$;

-- The slots' calls to make, and the lease of each: a slot that another
-- delivery is calling for is 'busy' until its lease ends (the call's
-- timeout and a margin), so concurrent or late deliveries of one event
-- never pay twice; a slot already recorded is 'done'.
CREATE FUNCTION pipeline._begin_call(stage text, slot_id bigint, subject text, lease interval)
RETURNS text
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_call pipeline.service_calls;
BEGIN
    INSERT INTO pipeline.service_calls AS c (stage, slot_id, subject)
    VALUES (_begin_call.stage, _begin_call.slot_id, _begin_call.subject)
    ON CONFLICT ON CONSTRAINT service_calls_pkey DO NOTHING;
    SELECT * INTO v_call FROM pipeline.service_calls c
    WHERE c.stage = _begin_call.stage AND c.slot_id = _begin_call.slot_id
    FOR UPDATE;
    IF v_call.leased_until > now() AND v_call.subject = _begin_call.subject THEN
        RETURN format('another delivery is calling for slot %s until %s', slot_id, v_call.leased_until);
    END IF;
    UPDATE pipeline.service_calls c
    SET calls = c.calls + 1, leased_until = now() + lease, subject = _begin_call.subject
    WHERE c.stage = _begin_call.stage AND c.slot_id = _begin_call.slot_id;
    RETURN NULL;
END
$$;

-- Stage 5's calls: for each slot of a slots_created event, the Apify
-- run-sync-get-dataset-items request to send (url, query, body), or why not.
CREATE FUNCTION pipeline.enrichment_calls(slot_ids bigint[])
RETURNS TABLE (slot_id bigint, action text, method text, url text, query jsonb, body jsonb, detail text)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_service pipeline.services_in_effect;
    v_id      bigint;
    v_slot    marketing.company_slots;
    v_domain  text;
    v_titles  jsonb;
    v_busy    text;
BEGIN
    SELECT * INTO v_service FROM pipeline.services_in_effect s WHERE s.service = 'apify';
    FOR v_id IN SELECT DISTINCT u.id FROM unnest(slot_ids) AS u(id) WHERE u.id IS NOT NULL ORDER BY u.id LOOP
        SELECT * INTO v_slot FROM marketing.company_slots s WHERE s.id = v_id FOR UPDATE;
        IF NOT FOUND THEN
            RETURN QUERY SELECT v_id, 'missing', NULL::text, NULL::text, NULL::jsonb, NULL::jsonb,
                                format('slot %s does not exist', v_id);
            CONTINUE;
        END IF;
        IF v_slot.enrichment_status IN ('enriched', 'not_found') THEN
            RETURN QUERY SELECT v_id, 'done', NULL::text, NULL::text, NULL::jsonb, NULL::jsonb,
                                format('slot %s is %s already', v_id, v_slot.enrichment_status);
            CONTINUE;
        END IF;
        SELECT c.domain INTO v_domain FROM marketing.company_master c WHERE c.id = v_slot.company_id;
        v_titles := coalesce(v_service.role_titles -> v_slot.slot_role, jsonb_build_array(upper(v_slot.slot_role)));
        v_busy := pipeline._begin_call('enrichment', v_id, v_domain || ' ' || v_slot.slot_role,
                                       make_interval(secs => least(v_service.call_timeout_s, 300) + 60));
        IF v_busy IS NOT NULL THEN
            RETURN QUERY SELECT v_id, 'busy', NULL::text, NULL::text, NULL::jsonb, NULL::jsonb, v_busy;
            CONTINUE;
        END IF;
        RETURN QUERY SELECT v_id, 'call', 'POST',
            format('%s/v2/acts/%s/run-sync-get-dataset-items', v_service.base_url, v_service.actor),
            jsonb_build_object('timeout', v_service.call_timeout_s::text, 'maxItems', v_service.max_items::text),
            replace(replace(replace(v_service.input::text,
                                    '"{domain}"', to_jsonb(v_domain)::text),
                            '"{role}"', to_jsonb(v_slot.slot_role)::text),
                    '"{titles}"', v_titles::text)::jsonb,
            format('slot %s: %s at %s', v_id, v_slot.slot_role, v_domain);
    END LOOP;
END
$$;
COMMENT ON FUNCTION pipeline.enrichment_calls(bigint[]) IS
    'Stage 5: for each slot, the Apify request to send (action call, leased to the caller), or done, busy '
    '(another delivery calls) or missing. Built from pipeline.services_in_effect.';

-- Stage 6's calls: the MillionVerifier request for each slot's email
-- (without the key: the receiver adds it), or why not: an address verified
-- already is 'done' and not paid for again.
CREATE FUNCTION pipeline.verification_calls(slot_ids bigint[])
RETURNS TABLE (slot_id bigint, action text, method text, url text, query jsonb, body jsonb, detail text)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_service pipeline.services_in_effect;
    v_id      bigint;
    v_slot    marketing.company_slots;
    v_busy    text;
BEGIN
    SELECT * INTO v_service FROM pipeline.services_in_effect s WHERE s.service = 'millionverifier';
    FOR v_id IN SELECT DISTINCT u.id FROM unnest(slot_ids) AS u(id) WHERE u.id IS NOT NULL ORDER BY u.id LOOP
        SELECT * INTO v_slot FROM marketing.company_slots s WHERE s.id = v_id FOR UPDATE;
        IF NOT FOUND THEN
            RETURN QUERY SELECT v_id, 'missing', NULL::text, NULL::text, NULL::jsonb, NULL::jsonb,
                                format('slot %s does not exist', v_id);
            CONTINUE;
        END IF;
        IF v_slot.email IS NULL THEN
            RETURN QUERY SELECT v_id, 'done', NULL::text, NULL::text, NULL::jsonb, NULL::jsonb,
                                format('slot %s has no email to verify', v_id);
            CONTINUE;
        END IF;
        IF EXISTS (SELECT 1 FROM marketing.email_verification v WHERE v.slot_id = v_id AND v.email = v_slot.email) THEN
            RETURN QUERY SELECT v_id, 'done', NULL::text, NULL::text, NULL::jsonb, NULL::jsonb,
                                format('%s is verified already', v_slot.email);
            CONTINUE;
        END IF;
        v_busy := pipeline._begin_call('verification', v_id, v_slot.email,
                                       make_interval(secs => v_service.call_timeout_s + 30));
        IF v_busy IS NOT NULL THEN
            RETURN QUERY SELECT v_id, 'busy', NULL::text, NULL::text, NULL::jsonb, NULL::jsonb, v_busy;
            CONTINUE;
        END IF;
        RETURN QUERY SELECT v_id, 'call', 'GET', v_service.base_url || '/api/v3/',
            jsonb_build_object('email', v_slot.email, 'timeout', v_service.call_timeout_s::text),
            NULL::jsonb, format('slot %s: %s', v_id, v_slot.email);
    END LOOP;
END
$$;
COMMENT ON FUNCTION pipeline.verification_calls(bigint[]) IS
    'Stage 6: for each slot, the MillionVerifier request to send (without the key), or done (no email, or the '
    'address is verified already), busy or missing.';

-- What a service's failure means for the delivery: the HTTP status the
-- receiver answers, so the deliverer retries the right way.
--   no answer: 504 after a timeout, else 503       429: 429 (with Retry-After)
--   408 (Apify's run outlived run-sync): 504       5xx: 503
--   401, 402, 403 (key, credits), 400 and 404 (the actor's input or id):
--     424, not retried: a person must fix the configuration
--   anything else: 502
CREATE FUNCTION pipeline._failure_status(http_status integer, error text) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE
        WHEN http_status IS NULL THEN CASE WHEN error ~* 'time[ds]?[ -]?out' THEN 504 ELSE 503 END
        WHEN http_status = 429 THEN 429
        WHEN http_status = 408 THEN 504
        WHEN http_status IN (400, 401, 402, 403, 404) THEN 424
        WHEN http_status >= 500 THEN 503
        ELSE 502
    END
$$;

-- Records what the service answered for one slot's call and says what it
-- means: 200 with the outcome when the work is recorded (the slot filled,
-- or the verification stored), else the status the delivery should answer
-- (pipeline._failure_status), the Retry-After to pass on (seconds), and the
-- failure in words, kept in pipeline.service_calls. http_status is NULL
-- when no answer came (error says why). MillionVerifier's failures that
-- come as HTTP 200 ("result": "error": a bad key, no credits) are read from
-- the body.
CREATE FUNCTION pipeline.finish_call(stage text, slot bigint, http_status integer, body text,
                                     retry_after_header text DEFAULT NULL, error text DEFAULT NULL)
RETURNS TABLE (slot_id bigint, status integer, retry_after integer, outcome text)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_service text := CASE stage WHEN 'enrichment' THEN 'apify' ELSE 'millionverifier' END;
    v_json    jsonb;
    v_status  integer;
    v_wait    integer;
    v_error   text;
    v_outcome text;
BEGIN
    IF stage IS NULL OR stage NOT IN ('enrichment', 'verification') THEN
        RAISE EXCEPTION 'pipeline.finish_call: stage must be enrichment or verification, not %',
                        coalesce(quote_literal(stage), 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF http_status BETWEEN 200 AND 299 THEN
        BEGIN
            v_json := body::jsonb;
        EXCEPTION WHEN invalid_text_representation THEN
            v_json := NULL;
        END;
        IF v_json IS NULL THEN
            v_status := 502;
            v_error := format('%s answered HTTP %s with a body that is not JSON', v_service, http_status);
        ELSIF stage = 'verification' AND (v_json ->> 'result' = 'error' OR coalesce(v_json ->> 'error', '') <> '') THEN
            v_error := format('%s: %s', v_service, coalesce(nullif(v_json ->> 'error', ''), 'error without a message'));
            -- A key it does not know, or no credits left: a person must act.
            v_status := CASE WHEN v_json ->> 'error' ~* 'api ?key|credit|balance|unauthori[sz]ed|suspended'
                             THEN 424 ELSE 502 END;
        ELSIF stage = 'enrichment' AND jsonb_typeof(v_json) <> 'array' THEN
            v_status := 502;
            v_error := format('%s answered HTTP %s with JSON that is not the array of dataset items',
                              v_service, http_status);
        ELSE
            -- NB: what the database refuses to record (an answer about
            -- another address, a slot gone) is that part's failure too.
            BEGIN
                IF stage = 'enrichment' THEN
                    v_outcome := pipeline.record_enrichment(finish_call.slot, v_json);
                ELSE
                    PERFORM pipeline.record_verification(finish_call.slot, v_json);
                    v_outcome := 'verified ' || (v_json ->> 'result');
                END IF;
            EXCEPTION WHEN data_exception OR integrity_constraint_violation OR no_data_found
                           OR invalid_parameter_value OR external_routine_exception THEN
                v_status := 422;
                v_error := SQLERRM;
            END;
        END IF;
    ELSE
        v_status := pipeline._failure_status(http_status, error);
        v_error := format('%s: %s%s', v_service,
                          CASE WHEN http_status IS NULL THEN 'no answer' ELSE 'HTTP ' || http_status END,
                          coalesce(': ' || nullif(left(regexp_replace(coalesce(error, body, ''), '\s+', ' ', 'g'), 300), ''), ''));
    END IF;
    -- NB: recording ended the call (record_enrichment, record_verification).
    IF v_status IS NULL THEN
        RETURN QUERY SELECT finish_call.slot, 200, NULL::integer, v_outcome;
        RETURN;
    END IF;
    -- The service's own wait, else 30 s for a rate limit, so that the
    -- deliverer holds back from the service.
    IF v_status = 429 THEN
        v_wait := CASE WHEN finish_call.retry_after_header ~ '^\s*[0-9]{1,6}\s*$' THEN btrim(finish_call.retry_after_header)::integer
                       ELSE 30 END;
    END IF;
    v_error := pipeline._mask_keys(v_error);
    INSERT INTO pipeline.service_calls AS c (stage, slot_id, subject, leased_until, last_status, last_error, failed_at,
                                             answer_status, retry_after_s)
    SELECT finish_call.stage, finish_call.slot, '', NULL, coalesce(http_status, 0), v_error, now(), v_status, v_wait
    WHERE EXISTS (SELECT 1 FROM marketing.company_slots s WHERE s.id = finish_call.slot)
    ON CONFLICT ON CONSTRAINT service_calls_pkey DO UPDATE
    SET leased_until = NULL, last_status = excluded.last_status, last_error = excluded.last_error, failed_at = now(),
        answer_status = excluded.answer_status, retry_after_s = excluded.retry_after_s;
    RETURN QUERY SELECT finish_call.slot, v_status, v_wait, v_error;
END
$$;
COMMENT ON FUNCTION pipeline.finish_call(text, bigint, integer, text, text, text) IS
    'Records a service''s answer to one slot''s call (enrichment: Apify''s dataset items; verification: '
    'MillionVerifier''s answer) and returns 200 with the outcome, or the status the delivery should answer '
    '(429, 503, 504, 502, 424), the Retry-After in seconds, and the failure in words.';

-- The one answer of a delivery whose work has several parts (the slots of
-- the event), read from what is recorded, so that it holds whichever
-- receiver did the work, and however it went: 200 when every slot's work
-- is recorded; else the most urgent failure, so that the deliverer retries
-- the undone parts the right way (the parts done are not redone): 429 (the
-- longest Retry-After), then 503/504/502, then 409 (a part another delivery
-- is calling for), then 424 (a person must act), then 422. The body names
-- every part.
CREATE FUNCTION pipeline.stage_answer(stage text, slot_ids bigint[])
RETURNS TABLE (status integer, retry_after integer, body jsonb)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    WITH p AS (
        SELECT u.id AS slot_id,
               CASE WHEN s.id IS NULL THEN 422
                    WHEN stage_answer.stage = 'enrichment' AND s.enrichment_status IN ('enriched', 'not_found') THEN 200
                    WHEN stage_answer.stage = 'verification'
                         AND (s.email IS NULL OR EXISTS (SELECT 1 FROM marketing.email_verification v
                                                         WHERE v.slot_id = s.id AND v.email = s.email)) THEN 200
                    WHEN c.leased_until > now() THEN 409
                    ELSE coalesce(c.answer_status, 503) END AS status,
               CASE WHEN c.leased_until IS NULL OR c.leased_until <= now() THEN c.retry_after_s END AS retry_after,
               CASE WHEN s.id IS NULL THEN format('slot %s does not exist', u.id)
                    WHEN stage_answer.stage = 'enrichment' AND s.enrichment_status IN ('enriched', 'not_found')
                        THEN s.enrichment_status
                    WHEN stage_answer.stage = 'verification' AND s.email IS NULL THEN 'no email to verify'
                    WHEN stage_answer.stage = 'verification'
                         AND EXISTS (SELECT 1 FROM marketing.email_verification v WHERE v.slot_id = s.id AND v.email = s.email)
                        THEN 'verified'
                    WHEN c.leased_until > now() THEN format('another delivery is calling for it until %s', c.leased_until)
                    ELSE coalesce(c.last_error, 'not called: the receiver recorded no answer for it') END AS outcome
        FROM (SELECT DISTINCT x.id FROM unnest(slot_ids) AS x(id) WHERE x.id IS NOT NULL) u
        LEFT JOIN marketing.company_slots s ON s.id = u.id
        LEFT JOIN pipeline.service_calls c ON c.stage = stage_answer.stage AND c.slot_id = u.id
    ), worst AS (
        SELECT p.status FROM p WHERE p.status NOT BETWEEN 200 AND 299
        ORDER BY CASE WHEN p.status = 429 THEN 0 WHEN p.status >= 500 THEN 1 WHEN p.status = 409 THEN 2
                      WHEN p.status = 424 THEN 3 ELSE 4 END, p.status DESC
        LIMIT 1
    )
    SELECT coalesce(w.status, 200),
           (SELECT max(p.retry_after) FROM p WHERE p.status = w.status),
           CASE WHEN w.status IS NULL
                THEN jsonb_build_object('parts', coalesce((SELECT jsonb_agg(jsonb_build_object('slot_id', p.slot_id, 'outcome', p.outcome)
                                                                            ORDER BY p.slot_id) FROM p), '[]'))
                ELSE jsonb_build_object(
                    'error', (SELECT string_agg(format('slot %s: %s', p.slot_id, p.outcome), '; ' ORDER BY p.slot_id)
                              FROM p WHERE p.status NOT BETWEEN 200 AND 299),
                    'parts', (SELECT jsonb_agg(jsonb_build_object('slot_id', p.slot_id, 'status', p.status,
                                                                  'outcome', p.outcome) ORDER BY p.slot_id) FROM p))
           END
    FROM (SELECT NULL) one LEFT JOIN worst w ON true
$$;
COMMENT ON FUNCTION pipeline.stage_answer(text, bigint[]) IS
    'The answer of a delivery of enrichment or verification work for slot_ids, from what is recorded: 200 when '
    'every slot''s work is, else the most urgent failure (429 with the longest Retry-After, 5xx, 409, 424, 422) '
    'with every part named in the body.';
