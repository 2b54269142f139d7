-- 009_stage_work.sql: the work of the stages that decide something, as
-- functions the receivers call (the n8n workflows of n8n/workflows and
-- examples/stage_runner.rs), so that the rules live here, beside the
-- constraints they must agree with, and not in each receiver.
--
--   pipeline.validate_company(intake_id)   stage 2: valid or invalid, with reasons
--   pipeline.promote_company(intake_id)    stage 3: into marketing.company_master
--   pipeline.create_slots(company_id)      stage 4: the role slots of a company
--   pipeline.record_enrichment(slot, items)    stage 5: a people-finder's (Apify) answer
--   pipeline.record_verification(slot, answer) stage 6: an email verifier's (MillionVerifier) answer
--
-- Each may be called again for the same row (deliveries are at least once):
-- a second call changes nothing and answers as the first did. What cannot be
-- done raises an error whose message says why, in words a person can act
-- on; a receiver passes it back, and it ends in marketing.pipeline_error_log.
-- They run with the rights of their caller (no SECURITY DEFINER): the
-- receiver's role needs the table rights the work takes (docs/security.md).

-- What is wrong with a website, in words, or NULL when the pipeline can use
-- it: when pipeline.website_url reads it as a URL the rule of
-- marketing.company_master's CHECK (pipeline._is_http_url) accepts, and its
-- host has a dot and no empty label. The reasons only name what failed.
CREATE FUNCTION pipeline.website_problem(website text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE
        WHEN pipeline._is_http_url(pipeline.website_url(website))
             AND pipeline.website_domain(website) ~ '^[^.]+(\.[^.]+)+$' THEN NULL
        WHEN website IS NULL OR pipeline._is_blank(website) THEN 'website is missing'
        WHEN char_length(website) > 2048 THEN 'website is longer than 2048 characters'
        WHEN pipeline.website_url(website) !~* '^https?://' THEN 'website is not an http(s) URL or a domain name'
        WHEN pipeline.website_url(website) ~ '\s' THEN 'website contains spaces'
        WHEN pipeline.website_url(website) ~* '^https?://[^/?#]*@' THEN 'website has a user name or password in it'
        WHEN pipeline.website_domain(website) IS NULL THEN 'website has no host'
        WHEN pipeline.website_domain(website) !~ '\.' THEN 'website host has no dot'
        WHEN pipeline.website_domain(website) ~ '(^|\.)(\.|$)' THEN 'website host has an empty label'
        ELSE 'website is not a valid http(s) URL'
    END
$$;
COMMENT ON FUNCTION pipeline.website_problem(text) IS
    'Why a website cannot be used (missing, not http(s) or a domain, host without a dot, ...), or NULL when it can. '
    'A bare domain is read as https://<domain> (pipeline.website_url).';

-- Looking for an earlier valid row of the same company stays an index scan.
CREATE INDEX company_raw_intake_valid_domain_idx ON intake.company_raw_intake (pipeline.website_domain(website))
    WHERE validation_status = 'valid';

-- Which domain is being decided: validate_company takes a row lock here, so
-- that the rows of one domain are decided one at a time. A table of the
-- pipeline's and not an advisory lock: any role can take any advisory lock
-- key, and so hold up the validation of a domain; a row here can be locked
-- only by roles that may validate (UPDATE on the intake table), as the
-- policy says. One row per domain ever validated.
CREATE TABLE pipeline.domain_locks (
    domain text PRIMARY KEY
);
COMMENT ON TABLE pipeline.domain_locks IS
    'Domains being validated: pipeline.validate_company locks a row here so that one domain is decided at a time.';
ALTER TABLE pipeline.domain_locks ENABLE ROW LEVEL SECURITY;
CREATE POLICY domain_locks_validators ON pipeline.domain_locks
    USING (has_column_privilege('intake.company_raw_intake'::regclass, 'validation_status', 'UPDATE'))
    WITH CHECK (has_column_privilege('intake.company_raw_intake'::regclass, 'validation_status', 'UPDATE'));
GRANT SELECT, INSERT, UPDATE ON pipeline.domain_locks TO PUBLIC;

-- A stage's decision is the stage's: a role that may only insert into a
-- stage table cannot insert a row already decided (an intake row marked
-- valid would be promoted without validation; a slot marked enriched
-- would skip enrichment). Deciding takes UPDATE on the column that says
-- the decision, as the stage functions have it; the owner has it.
-- NB: row triggers whose WHEN says "decided", so that an undecided row (all
-- of them, as a rule) costs the executor one test of its columns and calls
-- no function (as statement triggers over the new rows, they cost about
-- 1% of a single-row intake insert: docs/benchmark-notes.md, "Seventh pass").
CREATE FUNCTION pipeline._intake_arrives_pending() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NOT has_column_privilege(TG_RELID, 'validation_status', 'UPDATE') THEN
        RAISE EXCEPTION 'role % may not insert an intake row that is already validated', current_user
            USING ERRCODE = 'insufficient_privilege',
                  DETAIL = 'validated, validation_status, validation_errors and validated_at are set by validation '
                           '(pipeline.validate_company); a new row is pending.',
                  HINT = 'Leave those columns out, or grant UPDATE (validation_status) to a role that validates.';
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER intake_arrives_pending AFTER INSERT ON intake.company_raw_intake
    FOR EACH ROW
    WHEN (NEW.validation_status <> 'pending' OR NEW.validated
          OR cardinality(NEW.validation_errors) > 0 OR NEW.validated_at IS NOT NULL)
    EXECUTE FUNCTION pipeline._intake_arrives_pending();

CREATE FUNCTION pipeline._slots_arrive_pending() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NOT has_column_privilege(TG_RELID, 'enrichment_status', 'UPDATE') THEN
        RAISE EXCEPTION 'role % may not insert a slot that is already enriched', current_user
            USING ERRCODE = 'insufficient_privilege',
                  DETAIL = 'enrichment_status, enrichment_source and enriched_at are set by enrichment '
                           '(pipeline.record_enrichment); a new slot is pending.',
                  HINT = 'Leave those columns out, or grant UPDATE (enrichment_status) to a role that enriches.';
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER slots_arrive_pending AFTER INSERT ON marketing.company_slots
    FOR EACH ROW
    WHEN (NEW.enrichment_status <> 'pending' OR NEW.enriched_at IS NOT NULL OR NEW.enrichment_source IS NOT NULL)
    EXECUTE FUNCTION pipeline._slots_arrive_pending();

-- Stage 2. Decides a pending intake row: valid when its website is usable
-- and no other company has its domain; invalid otherwise, with every reason.
-- A row already decided is answered as it is. A duplicate is rejected with
-- the row it duplicates (promoted company or earlier valid intake row),
-- never dropped: promotion keeps one company per domain.
CREATE FUNCTION pipeline.validate_company(intake_id bigint)
RETURNS TABLE (id bigint, validation_status text, validation_errors text[], domain text)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_row     intake.company_raw_intake;
    v_errors  text[] := '{}';
    v_domain  text;
    v_problem text;
    v_other   bigint;
BEGIN
    IF validate_company.intake_id IS NULL THEN
        RAISE EXCEPTION 'pipeline.validate_company: intake_id must not be NULL'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    SELECT * INTO v_row FROM intake.company_raw_intake r WHERE r.id = validate_company.intake_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pipeline.validate_company: intake row % does not exist', validate_company.intake_id
            USING ERRCODE = 'no_data_found';
    END IF;
    v_domain := pipeline.website_domain(v_row.website);
    IF v_row.validation_status <> 'pending' THEN
        RETURN QUERY SELECT v_row.id, v_row.validation_status, v_row.validation_errors, v_domain;
        RETURN;
    END IF;

    v_problem := pipeline.website_problem(v_row.website);
    IF v_problem IS NOT NULL THEN
        v_errors := v_errors || v_problem;
        v_domain := NULL;
    ELSE
        -- One decision per domain at a time: two rows of one company
        -- validated at once would otherwise both pass (see domain_locks).
        -- NB: by the constraint's name: "domain" is also this function's output.
        INSERT INTO pipeline.domain_locks AS l (domain) VALUES (v_domain)
        ON CONFLICT ON CONSTRAINT domain_locks_pkey DO UPDATE SET domain = excluded.domain;
        SELECT m.id INTO v_other FROM marketing.company_master m WHERE m.domain = v_domain;
        IF FOUND THEN
            v_errors := v_errors || format('duplicate: %s is already promoted (company_master id %s)', v_domain, v_other);
        ELSE
            SELECT r.id INTO v_other FROM intake.company_raw_intake r
            WHERE pipeline.website_domain(r.website) = v_domain AND r.validation_status = 'valid' AND r.id <> v_row.id
            ORDER BY r.id LIMIT 1;
            IF FOUND THEN
                v_errors := v_errors || format('duplicate: %s is the domain of intake row %s, already valid', v_domain, v_other);
            END IF;
        END IF;
    END IF;

    UPDATE intake.company_raw_intake r
    SET validated = cardinality(v_errors) = 0,
        validation_status = CASE WHEN cardinality(v_errors) = 0 THEN 'valid' ELSE 'invalid' END,
        validation_errors = v_errors,
        validated_at = now()
    WHERE r.id = v_row.id;
    RETURN QUERY SELECT v_row.id, CASE WHEN cardinality(v_errors) = 0 THEN 'valid' ELSE 'invalid' END, v_errors, v_domain;
END
$$;
COMMENT ON FUNCTION pipeline.validate_company(bigint) IS
    'Stage 2: marks a pending intake row valid or invalid with its reasons (website rules, duplicate domains); '
    'returns the outcome. A row already decided is returned unchanged.';

-- Stage 3. Copies a valid intake row into marketing.company_master and
-- returns the company's id; the same id again when it is there already.
CREATE FUNCTION pipeline.promote_company(intake_id bigint) RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_row   intake.company_raw_intake;
    v_id    bigint;
    v_other marketing.company_master;
BEGIN
    SELECT * INTO v_row FROM intake.company_raw_intake r WHERE r.id = promote_company.intake_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pipeline.promote_company: intake row % does not exist', promote_company.intake_id
            USING ERRCODE = 'no_data_found';
    END IF;
    SELECT m.id INTO v_id FROM marketing.company_master m WHERE m.intake_id = v_row.id;
    IF FOUND THEN
        RETURN v_id;
    END IF;
    IF NOT v_row.validated THEN
        RAISE EXCEPTION 'pipeline.promote_company: intake row % is not valid (validation_status %)',
                        v_row.id, v_row.validation_status
            USING ERRCODE = 'check_violation',
                  HINT = 'Only rows that pipeline.validate_company accepted are promoted.';
    END IF;
    INSERT INTO marketing.company_master AS m (intake_id, company_name, website, industry, employee_count,
                                               city, state, country, linkedin_url)
    VALUES (v_row.id, v_row.company, pipeline.website_url(v_row.website), v_row.industry, v_row.employee_count,
            v_row.city, v_row.state, v_row.country, v_row.linkedin_url)
    ON CONFLICT (domain) DO NOTHING
    RETURNING m.id INTO v_id;
    IF v_id IS NULL THEN
        -- The same row, promoted by a delivery of the same event at once.
        SELECT m.id INTO v_id FROM marketing.company_master m WHERE m.intake_id = v_row.id;
        IF FOUND THEN
            RETURN v_id;
        END IF;
        SELECT * INTO v_other FROM marketing.company_master m WHERE m.domain = pipeline.website_domain(v_row.website);
        RAISE EXCEPTION 'pipeline.promote_company: intake row % has the domain %, already promoted as company_master id % (from intake row %)',
                        v_row.id, v_other.domain, v_other.id, coalesce(v_other.intake_id::text, 'none')
            USING ERRCODE = 'unique_violation';
    END IF;
    RETURN v_id;
END
$$;
COMMENT ON FUNCTION pipeline.promote_company(bigint) IS
    'Stage 3: copies a valid intake row into marketing.company_master; returns the company id (the same one when called again).';

-- Stage 4. The role slots of a promoted company (default: ceo and cfo);
-- returns how many were created now (0 when they were all there).
CREATE FUNCTION pipeline.create_slots(company_id bigint, roles text[] DEFAULT '{ceo,cfo}') RETURNS integer
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_count integer;
BEGIN
    PERFORM FROM marketing.company_master m WHERE m.id = create_slots.company_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pipeline.create_slots: company_master id % does not exist', create_slots.company_id
            USING ERRCODE = 'no_data_found';
    END IF;
    IF roles IS NULL OR cardinality(roles) = 0 THEN
        RAISE EXCEPTION 'pipeline.create_slots: roles must name at least one role'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    INSERT INTO marketing.company_slots AS s (company_id, slot_role)
    SELECT create_slots.company_id, r FROM unnest(roles) WITH ORDINALITY AS u(r, n) ORDER BY n
    ON CONFLICT ON CONSTRAINT company_slots_company_role_key DO NOTHING;
    GET DIAGNOSTICS v_count = ROW_COUNT;
    RETURN v_count;
END
$$;
COMMENT ON FUNCTION pipeline.create_slots(bigint, text[]) IS
    'Stage 4: creates the role slots (default ceo, cfo) of a company that lack; returns how many were created.';

-- The first non-empty field of an item among names (a JSON array of field
-- names, in order of preference), trimmed.
CREATE FUNCTION pipeline._first_field(item jsonb, names jsonb) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $$
    SELECT v FROM jsonb_array_elements_text(CASE jsonb_typeof(names) WHEN 'array' THEN names ELSE '[]' END)
                  WITH ORDINALITY AS k(name, n)
    CROSS JOIN LATERAL (SELECT nullif(btrim(CASE jsonb_typeof(item -> k.name)
                                                WHEN 'string' THEN item ->> k.name
                                                WHEN 'number' THEN item ->> k.name END), '') AS v) f
    WHERE v IS NOT NULL
    ORDER BY n LIMIT 1
$$;

-- Stage 5. Fills a slot from what a people-finder returned: `items` is the
-- JSON array of dataset items of an Apify actor run
-- (run-sync-get-dataset-items), one person per item. Which item field fills
-- which column is pipeline.services_in_effect.fields (the apify row: the
-- one place to change, with pipeline.set_service, when another actor is
-- used). The first item with a name or a
-- usable email fills the slot (enriched, source `source`); an email the
-- table would refuse is left out. No such item: the slot is not_found. A
-- slot already decided is left as it is; returns the slot's
-- enrichment_status. Recording ends the slot's call (pipeline.service_calls).
CREATE FUNCTION pipeline.record_enrichment(slot_id bigint, items jsonb, source text DEFAULT 'apify')
RETURNS text
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_slot   marketing.company_slots;
    v_fields jsonb;
    v_person jsonb;
    v_name   text;
    v_email  text;
BEGIN
    SELECT * INTO v_slot FROM marketing.company_slots s WHERE s.id = record_enrichment.slot_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pipeline.record_enrichment: slot % does not exist', record_enrichment.slot_id
            USING ERRCODE = 'no_data_found';
    END IF;
    IF jsonb_typeof(items) IS DISTINCT FROM 'array' THEN
        RAISE EXCEPTION 'pipeline.record_enrichment: items must be the JSON array of the actor''s dataset items, not %',
                        coalesce(jsonb_typeof(items), 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT s.fields INTO v_fields FROM pipeline.services_in_effect s WHERE s.service = 'apify';
    IF v_slot.enrichment_status IN ('enriched', 'not_found') THEN
        UPDATE pipeline.service_calls c SET leased_until = NULL, done_at = coalesce(c.done_at, now())
        WHERE c.stage = 'enrichment' AND c.slot_id = v_slot.id;
        RETURN v_slot.enrichment_status;
    END IF;
    SELECT p.person, p.name, p.email INTO v_person, v_name, v_email
    FROM (SELECT i.item AS person, i.n,
                 pipeline._first_field(i.item, v_fields -> 'full_name') AS name,
                 CASE WHEN pipeline._is_email(lower(pipeline._first_field(i.item, v_fields -> 'email')))
                      THEN lower(pipeline._first_field(i.item, v_fields -> 'email')) END AS email
          FROM jsonb_array_elements(items) WITH ORDINALITY AS i(item, n)
          WHERE jsonb_typeof(i.item) = 'object') p
    WHERE p.name IS NOT NULL OR p.email IS NOT NULL
    ORDER BY p.n
    LIMIT 1;
    IF v_person IS NULL THEN
        UPDATE marketing.company_slots s
        SET enrichment_status = 'not_found', enrichment_source = record_enrichment.source, enriched_at = now()
        WHERE s.id = v_slot.id;
    ELSE
        UPDATE marketing.company_slots s
        SET enrichment_status = 'enriched', enrichment_source = record_enrichment.source, enriched_at = now(),
            full_name = left(v_name, 200),
            title = left(pipeline._first_field(v_person, v_fields -> 'title'), 200),
            email = v_email,
            linkedin_url = left(pipeline._first_field(v_person, v_fields -> 'linkedin_url'), 2048),
            phone = left(pipeline._first_field(v_person, v_fields -> 'phone'), 50)
        WHERE s.id = v_slot.id;
    END IF;
    UPDATE pipeline.service_calls c SET leased_until = NULL, done_at = now()
    WHERE c.stage = 'enrichment' AND c.slot_id = v_slot.id;
    RETURN CASE WHEN v_person IS NULL THEN 'not_found' ELSE 'enriched' END;
END
$$;
COMMENT ON FUNCTION pipeline.record_enrichment(bigint, jsonb, text) IS
    'Stage 5: fills a slot from an Apify actor''s dataset items (the first person with a name or email, fields '
    'mapped by pipeline.services_in_effect), or marks it not_found; a slot already decided is left as it is. Returns the '
    'enrichment_status.';

-- Stage 6. Stores a MillionVerifier answer (GET /api/v3/?api=...&email=...)
-- for a slot's email: result ok → valid, catch_all → catch_all, unknown →
-- unknown, invalid and disposable → invalid; score from quality (good 90,
-- risky 50, bad 10); the whole answer in details. MillionVerifier answers a
-- bad key or an empty balance with HTTP 200 and result "error": that is
-- raised with its message, so the event is retried and the error log says
-- why. The same verdict twice (credits and executiontime aside) is stored
-- once; returns the verification's id.
CREATE FUNCTION pipeline.record_verification(slot_id bigint, answer jsonb, provider text DEFAULT 'millionverifier')
RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_slot   marketing.company_slots;
    v_result text;
    v_id     bigint;
BEGIN
    SELECT * INTO v_slot FROM marketing.company_slots s WHERE s.id = record_verification.slot_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pipeline.record_verification: slot % does not exist', record_verification.slot_id
            USING ERRCODE = 'no_data_found';
    END IF;
    IF v_slot.email IS NULL THEN
        RAISE EXCEPTION 'pipeline.record_verification: slot % has no email to verify', v_slot.id
            USING ERRCODE = 'no_data_found';
    END IF;
    IF jsonb_typeof(answer) IS DISTINCT FROM 'object' THEN
        RAISE EXCEPTION 'pipeline.record_verification: the answer must be a JSON object, not %',
                        coalesce(jsonb_typeof(answer), 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF answer ->> 'result' = 'error' OR coalesce(answer ->> 'error', '') <> '' THEN
        RAISE EXCEPTION '%: %', provider, coalesce(nullif(answer ->> 'error', ''), 'error without a message')
            USING ERRCODE = 'external_routine_exception',
                  DETAIL = format('resultcode %s, credits %s', coalesce(answer ->> 'resultcode', '?'),
                                  coalesce(answer ->> 'credits', '?'));
    END IF;
    IF lower(answer ->> 'email') IS DISTINCT FROM lower(v_slot.email) THEN
        RAISE EXCEPTION 'pipeline.record_verification: the answer is about %, slot % has %',
                        coalesce(answer ->> 'email', 'no email'), v_slot.id, v_slot.email
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_result := CASE answer ->> 'result'
                    WHEN 'ok' THEN 'valid'
                    WHEN 'catch_all' THEN 'catch_all'
                    WHEN 'unknown' THEN 'unknown'
                    WHEN 'invalid' THEN 'invalid'
                    WHEN 'disposable' THEN 'invalid'
                END;
    IF v_result IS NULL THEN
        RAISE EXCEPTION 'pipeline.record_verification: unknown result % (expected ok, catch_all, unknown, invalid, disposable or error)',
                        coalesce(answer -> 'result', 'null'::jsonb)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- The same verdict again (a retried delivery, a late receiver) is the
    -- same verification, whatever its credits or execution time say.
    SELECT v.id INTO v_id FROM marketing.email_verification v
    WHERE v.slot_id = v_slot.id AND v.email = v_slot.email AND v.provider = record_verification.provider
      AND v.details - '{credits,executiontime}'::text[] = answer - '{credits,executiontime}'::text[]
    ORDER BY v.id DESC LIMIT 1;
    IF NOT FOUND THEN
        INSERT INTO marketing.email_verification AS v (slot_id, email, result, provider, score, details)
        VALUES (v_slot.id, v_slot.email, v_result, record_verification.provider,
                CASE answer ->> 'quality' WHEN 'good' THEN 90 WHEN 'risky' THEN 50 WHEN 'bad' THEN 10 END,
                answer)
        RETURNING v.id INTO v_id;
    END IF;
    UPDATE pipeline.service_calls c SET leased_until = NULL, done_at = now()
    WHERE c.stage = 'verification' AND c.slot_id = v_slot.id;
    RETURN v_id;
END
$$;
COMMENT ON FUNCTION pipeline.record_verification(bigint, jsonb, text) IS
    'Stage 6: stores a MillionVerifier answer for a slot''s email (result, score from quality, the answer as details); '
    'raises the provider''s error (bad key, no credits) so the event is retried. Returns the verification id.';
